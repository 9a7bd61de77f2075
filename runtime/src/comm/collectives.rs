//! The collectives, written once over a backend's `exchange` (post one payload to each
//! other group member, collect one from each). The in-process and TCP backends differ only
//! in how messages travel; what a collective computes from them, its length checks and its
//! byte counts must be identical, so they live here.

use super::{CommError, CommOp, CommStats, Group};

/// Payloads received by one `exchange`, indexed by group member (`None` at the caller).
pub(crate) type Received = Vec<Option<Vec<f32>>>;

/// What a backend provides for the shared collectives.
pub(crate) trait Exchange {
    fn this_rank(&self) -> usize;
    /// Posts `payload(j)` to every other member j and collects one message from each;
    /// returns the caller's index in the group and the received payloads.
    fn exchange<'a>(
        &mut self,
        op: CommOp,
        group: &Group,
        payload: impl Fn(usize) -> &'a [f32],
    ) -> Result<(usize, Received), CommError>;
    fn stats_mut(&mut self) -> &mut CommStats;
    /// Takes back received buffers once their contents are copied (a pool, or nothing).
    fn recycle(&mut self, _received: Received) {}
}

pub(crate) fn size_check(
    rank: usize,
    op: CommOp,
    peer: usize,
    expected: usize,
    got: usize,
) -> Result<(), CommError> {
    if expected != got {
        return Err(CommError::SizeMismatch {
            rank,
            op,
            peer,
            expected,
            got,
        });
    }
    Ok(())
}

/// Copies member i's payload (`own` at the caller's index) into `output` chunk i.
fn assemble(
    rank: usize,
    op: CommOp,
    group: &Group,
    received: &Received,
    own: &[f32],
    output: &mut [f32],
) -> Result<(), CommError> {
    let n = own.len();
    for (i, data) in received.iter().enumerate() {
        let src = match data {
            Some(d) => {
                size_check(rank, op, group.ranks[i], n, d.len())?;
                d.as_slice()
            }
            None => own,
        };
        output[i * n..(i + 1) * n].copy_from_slice(src);
    }
    Ok(())
}

pub(crate) fn all_gather<E: Exchange>(
    c: &mut E,
    group: &Group,
    input: &[f32],
    output: &mut [f32],
) -> Result<(), CommError> {
    let op = CommOp::AllGather;
    let (n, g) = (input.len(), group.size());
    if output.len() != n * g {
        return Err(CommError::BadLength {
            rank: c.this_rank(),
            op,
            detail: format!(
                "output has {} element(s), expected {g} member(s) x {n} = {}",
                output.len(),
                n * g
            ),
        });
    }
    let (_, received) = c.exchange(op, group, |_| input)?;
    assemble(c.this_rank(), op, group, &received, input, output)?;
    c.recycle(received);
    c.stats_mut().record_all_gather(n, g);
    Ok(())
}

pub(crate) fn all_to_all<E: Exchange>(
    c: &mut E,
    group: &Group,
    input: &[f32],
    output: &mut [f32],
) -> Result<(), CommError> {
    let op = CommOp::AllToAll;
    let g = group.size().max(1);
    if input.len() != output.len() || input.len() % g != 0 {
        return Err(CommError::BadLength {
            rank: c.this_rank(),
            op,
            detail: format!(
                "input ({}) and output ({}) must have the same length, divisible by the group size {g}",
                input.len(),
                output.len()
            ),
        });
    }
    let n = input.len() / g;
    let (me, received) = c.exchange(op, group, |j| &input[j * n..(j + 1) * n])?;
    assemble(
        c.this_rank(),
        op,
        group,
        &received,
        &input[me * n..(me + 1) * n],
        output,
    )?;
    c.recycle(received);
    c.stats_mut().record_all_to_all(input.len(), group.size());
    Ok(())
}

pub(crate) fn all_reduce_sum<E: Exchange>(
    c: &mut E,
    group: &Group,
    data: &mut [f32],
) -> Result<(), CommError> {
    let op = CommOp::AllReduce;
    let n = data.len();
    let (_, received) = {
        let input: &[f32] = data;
        c.exchange(op, group, |_| input)?
    };
    for (i, d) in received.iter().enumerate() {
        if let Some(d) = d {
            size_check(c.this_rank(), op, group.ranks[i], n, d.len())?;
        }
    }
    // Sum in group order on every rank (not "mine first"), so that floating-point
    // rounding, and hence the result, is bit-identical on all members.
    let own = data.to_vec();
    let contribution = |i: usize| -> &[f32] {
        match &received[i] {
            Some(d) => d,
            None => &own,
        }
    };
    data.copy_from_slice(contribution(0));
    for i in 1..received.len() {
        for (acc, x) in data.iter_mut().zip(contribution(i)) {
            *acc += *x;
        }
    }
    c.recycle(received);
    c.stats_mut().record_all_reduce(n, group.size());
    Ok(())
}

pub(crate) fn barrier<E: Exchange>(c: &mut E, group: &Group) -> Result<(), CommError> {
    c.exchange(CommOp::Barrier, group, |_| -> &[f32] { &[] })?;
    c.stats_mut().record_barrier();
    Ok(())
}
