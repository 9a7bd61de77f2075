//! Ulysses: the all-to-all that trades a split sequence for split heads, and back.
//!
//! Before: every member holds its own rows of the sequence for all heads. After
//! [`scatter`]: every member holds *all* members' rows for its own range of heads, so
//! it can run ordinary attention on them; [`gather`] is the inverse on the output.
//! Heads are padded with zero heads up to a multiple of the group size (xDiT refuses
//! such head counts instead); a zero head's output is dropped in [`gather`].

use std::ops::Range;

use crate::comm::{CommError, Communicator, Group};

/// How `heads` heads of width `head_dim` are dealt to `members` ranks.
#[derive(Clone, Copy, Debug)]
pub struct HeadSplit {
    pub heads: usize,
    pub head_dim: usize,
    pub members: usize,
    /// Heads per member after padding: `ceil(heads / members)`.
    pub per_member: usize,
}

impl HeadSplit {
    pub fn new(heads: usize, head_dim: usize, members: usize) -> HeadSplit {
        HeadSplit {
            heads,
            head_dim,
            members,
            per_member: heads.div_ceil(members),
        }
    }

    /// Zero heads added to make the count divisible.
    pub fn padding(&self) -> usize {
        self.per_member * self.members - self.heads
    }

    /// Width of one row of a member's heads (`per_member * head_dim`).
    pub fn width(&self) -> usize {
        self.per_member * self.head_dim
    }

    /// Columns of the full `heads * head_dim` row that member `j`'s real heads occupy
    /// (shorter than [`width`](Self::width), or empty, where `j` got padding heads).
    fn cols(&self, j: usize) -> Range<usize> {
        let lo = (j * self.per_member).min(self.heads);
        let hi = ((j + 1) * self.per_member).min(self.heads);
        lo * self.head_dim..hi * self.head_dim
    }
}

/// This member's heads over the whole (member-major) sequence: `q` is
/// `[batch, members * sq, width]`, `k` and `v` are `[batch, members * sk, width]`;
/// rows `[m * sq, (m + 1) * sq)` of a batch came from member `m`.
pub struct Scattered {
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

/// Copies columns `cols` of each `row_len`-wide row of `src` into the first columns of
/// each `width`-wide row of `dst` (the rest of `dst` keeps its zeros: padding heads).
fn pack(src: &[f32], row_len: usize, cols: Range<usize>, width: usize, dst: &mut [f32]) {
    let n = cols.len();
    if n == 0 {
        return;
    }
    for (s, d) in src.chunks_exact(row_len).zip(dst.chunks_exact_mut(width)) {
        d[..n].copy_from_slice(&s[cols.clone()]);
    }
}

/// Forward all-to-all of q, k and v in one message per peer (one latency, not three).
/// `q` is `[batch, sq, heads * head_dim]`, `k`/`v` `[batch, sk, heads * head_dim]`.
#[allow(clippy::too_many_arguments)]
pub fn scatter(
    comm: &mut dyn Communicator,
    group: &Group,
    split: HeadSplit,
    batch: usize,
    sq: usize,
    sk: usize,
    q: &[f32],
    k: &[f32],
    v: &[f32],
) -> Result<Scattered, CommError> {
    let p = split.members;
    let w = split.width();
    let row_len = split.heads * split.head_dim;
    let (nq, nk) = (batch * sq * w, batch * sk * w);
    // Chunk j (for member j) = [q | k | v] restricted to member j's heads.
    let chunk = nq + 2 * nk;
    let mut send = vec![0.0f32; p * chunk];
    for (j, c) in send.chunks_exact_mut(chunk).enumerate() {
        let (cq, ckv) = c.split_at_mut(nq);
        let (ck, cv) = ckv.split_at_mut(nk);
        pack(q, row_len, split.cols(j), w, cq);
        pack(k, row_len, split.cols(j), w, ck);
        pack(v, row_len, split.cols(j), w, cv);
    }
    let mut recv = vec![0.0f32; p * chunk];
    comm.all_to_all(group, &send, &mut recv)?;
    drop(send);

    // Chunk m holds member m's rows as [batch][rows]; interleave them member-major
    // within each batch.
    let mut out = Scattered {
        q: vec![0.0; p * nq],
        k: vec![0.0; p * nk],
        v: vec![0.0; p * nk],
    };
    for (m, c) in recv.chunks_exact(chunk).enumerate() {
        let (cq, ckv) = c.split_at(nq);
        let (ck, cv) = ckv.split_at(nk);
        for b in 0..batch {
            let (qs, ks) = (sq * w, sk * w);
            out.q[(b * p + m) * qs..][..qs].copy_from_slice(&cq[b * qs..][..qs]);
            out.k[(b * p + m) * ks..][..ks].copy_from_slice(&ck[b * ks..][..ks]);
            out.v[(b * p + m) * ks..][..ks].copy_from_slice(&cv[b * ks..][..ks]);
        }
    }
    Ok(out)
}

/// Inverse all-to-all of the attention output: `o` is `[batch, members * sq, width]`
/// (this member's heads, every member's rows); `out` gets this member's rows for all
/// real heads, `[batch, sq, heads * head_dim]`.
pub fn gather(
    comm: &mut dyn Communicator,
    group: &Group,
    split: HeadSplit,
    batch: usize,
    sq: usize,
    o: &[f32],
    out: &mut [f32],
) -> Result<(), CommError> {
    let p = split.members;
    let w = split.width();
    let qs = sq * w;
    let chunk = batch * qs;
    // Chunk m (for member m) = member m's rows of every batch.
    let mut send = vec![0.0f32; p * chunk];
    for (m, c) in send.chunks_exact_mut(chunk).enumerate() {
        for b in 0..batch {
            c[b * qs..][..qs].copy_from_slice(&o[(b * p + m) * qs..][..qs]);
        }
    }
    let mut recv = vec![0.0f32; p * chunk];
    comm.all_to_all(group, &send, &mut recv)?;
    // Chunk j = member j's heads of this member's rows; padding heads are left behind.
    let row_len = split.heads * split.head_dim;
    for (j, c) in recv.chunks_exact(chunk).enumerate() {
        let cols = split.cols(j);
        let n = cols.len();
        if n == 0 {
            continue;
        }
        for (s, d) in c.chunks_exact(w).zip(out.chunks_exact_mut(row_len)) {
            d[cols.clone()].copy_from_slice(&s[..n]);
        }
    }
    Ok(())
}
