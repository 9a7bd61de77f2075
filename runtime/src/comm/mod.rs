//! Communication between ranks: one trait, several backends.
//!
//! The [`Communicator`] trait is the only thing the executor and the parallel
//! strategies (Ulysses all-to-all, Ring attention, CFG all-gather, PipeFusion
//! send/recv) see. Backends:
//! - [`in_process`]: ranks are threads of one process (tests, CPU runs);
//! - later: NCCL (one process per GPU) and TCP (separate processes), which is why the
//!   trait only moves flat `f32` slices (a byte count is all a wire needs), takes an
//!   explicit [`Group`] of global ranks on every collective (NCCL communicators and
//!   TCP meshes are built per group), and reports failures as values, never panics.
//!
//! Robustness contract (DESIGN.md, "Every collective has a timeout"): every blocking
//! call is bounded by the backend's timeout and returns [`CommError::Timeout`] naming the
//! ranks that never arrived; a rank that calls [`Communicator::fail`] (or, in-process,
//! panics) makes every other rank's pending and later calls return
//! [`CommError::PeerFailed`] naming it, promptly rather than after the timeout.

mod collectives;
pub mod error;
pub mod in_process;
pub mod store;
pub mod tcp;

#[cfg(test)]
mod tests;

pub use error::{CommError, CommOp};
pub use in_process::{in_process_world, run_ranks, FailHandle, InProcessComm, RankError};
pub use store::{StoreError, StoreServer, TcpStore};
pub use tcp::{loopback_bandwidth, TcpComm};

/// Size of one element on the wire. All traffic is f32 for now; kept as a constant so
/// the byte accounting below has one place to change when bf16 transfers arrive.
pub const ELEM_BYTES: u64 = std::mem::size_of::<f32>() as u64;

/// A communicator for one rank of a world of `world_size` ranks.
///
/// Collectives must be called by every member of `group`, in the same order per group
/// (each backend matches calls by a per-group sequence number). Groups are identified
/// by their ordered rank list: all members must pass the same list.
pub trait Communicator: Send {
    /// This rank's global id, in `0..world_size()`.
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;

    /// `output` = concatenation of every member's `input`, in group order.
    /// `output.len()` must be `group.size() * input.len()`; all inputs the same length.
    fn all_gather(
        &mut self,
        group: &Group,
        input: &[f32],
        output: &mut [f32],
    ) -> Result<(), CommError>;

    /// `input` is G equal chunks; chunk j goes to member j. Output chunk i is what
    /// member i sent to this rank. `input.len() == output.len()`, divisible by G.
    fn all_to_all(
        &mut self,
        group: &Group,
        input: &[f32],
        output: &mut [f32],
    ) -> Result<(), CommError>;

    /// In-place elementwise sum over the group. The result is bit-identical on every
    /// member (replicated tensors must stay replicated exactly).
    fn all_reduce_sum(&mut self, group: &Group, data: &mut [f32]) -> Result<(), CommError>;

    /// Sends `data` to global rank `to`, matched by `(sender, tag)` on the receiver;
    /// messages with the same sender and tag arrive in order.
    fn send(&mut self, to: usize, tag: u64, data: &[f32]) -> Result<(), CommError>;

    /// Receives the next message with `tag` from `from`; `out.len()` must equal the
    /// length that was sent.
    fn recv(&mut self, from: usize, tag: u64, out: &mut [f32]) -> Result<(), CommError>;

    /// Sends `send` to `to` and receives `recv` from `from` (both with `tag`) without
    /// deadlocking when every rank of a ring calls it at once: the send is posted
    /// before the receive is waited for. This is Ring attention's K/V rotation.
    fn sendrecv(
        &mut self,
        to: usize,
        send: &[f32],
        from: usize,
        recv: &mut [f32],
        tag: u64,
    ) -> Result<(), CommError>;

    /// Returns once every member of `group` has entered the barrier.
    fn barrier(&mut self, group: &Group) -> Result<(), CommError>;

    /// Bytes this rank put on the wire, per kind (see [`CommStats`] for the convention).
    fn stats(&self) -> &CommStats;

    /// Resets the counters (e.g. after warmup, before a measured step).
    fn reset_stats(&mut self);

    /// Announces this rank's failure to every rank: their pending and later calls return
    /// [`CommError::PeerFailed`] naming this rank with `reason`. Idempotent; the first
    /// failure in a world is the one reported.
    fn fail(&mut self, reason: &str);
}

/// An ordered set of global ranks taking part in a collective.
///
/// The order defines chunk order: member `i` of the group (its index, not its global
/// rank) owns chunk `i` of an all-gather output or all-to-all buffer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Group {
    pub ranks: Vec<usize>,
}

impl Group {
    pub fn new(ranks: Vec<usize>) -> Group {
        Group { ranks }
    }

    /// All ranks `0..world_size`.
    pub fn world(world_size: usize) -> Group {
        Group {
            ranks: (0..world_size).collect(),
        }
    }

    /// Number of members (G in the volume formulas).
    pub fn size(&self) -> usize {
        self.ranks.len()
    }

    pub fn contains(&self, rank: usize) -> bool {
        self.ranks.contains(&rank)
    }

    /// Position of global `rank` in the group (its chunk index), if a member.
    pub fn index_of(&self, rank: usize) -> Option<usize> {
        self.ranks.iter().position(|&r| r == rank)
    }

    /// Splits `0..world_size` into groups of `size` consecutive ranks:
    /// world 4, size 2 -> {0,1},{2,3}. This is the inner (fast-link) axis of a mesh, the
    /// one USP gives to Ulysses. `None` unless `size` divides `world_size`.
    pub fn contiguous(world_size: usize, size: usize) -> Option<Vec<Group>> {
        if size == 0 || world_size % size != 0 {
            return None;
        }
        Some(
            (0..world_size / size)
                .map(|g| Group::new((g * size..(g + 1) * size).collect()))
                .collect(),
        )
    }

    /// Splits `0..world_size` into groups of ranks `stride` apart:
    /// world 4, stride 2 -> {0,2},{1,3}. The outer mesh axis (Ring in USP, the CFG
    /// pair). `None` unless `stride` divides `world_size`.
    pub fn strided(world_size: usize, stride: usize) -> Option<Vec<Group>> {
        if stride == 0 || world_size % stride != 0 {
            return None;
        }
        Some(
            (0..stride)
                .map(|s| Group::new((s..world_size).step_by(stride).collect()))
                .collect(),
        )
    }

    /// The group among `groups` that contains `rank`.
    pub fn find(groups: &[Group], rank: usize) -> Option<&Group> {
        groups.iter().find(|g| g.contains(rank))
    }

    /// Checks the group against a world and a calling rank; returns the caller's index.
    /// Backends call this first so that a bad group is an error naming the caller, not a
    /// hang (a rank outside the group would wait for messages nobody sends).
    pub fn validate(&self, rank: usize, world_size: usize, op: CommOp) -> Result<usize, CommError> {
        let invalid = |reason: String| CommError::InvalidGroup {
            rank,
            op,
            group: self.ranks.clone(),
            reason,
        };
        if self.ranks.is_empty() {
            return Err(invalid("empty group".into()));
        }
        if let Some(&r) = self.ranks.iter().find(|&&r| r >= world_size) {
            return Err(invalid(format!(
                "rank {r} is outside the world of {world_size}"
            )));
        }
        for (i, r) in self.ranks.iter().enumerate() {
            if self.ranks[..i].contains(r) {
                return Err(invalid(format!("rank {r} appears twice")));
            }
        }
        self.index_of(rank).ok_or_else(|| CommError::NotMember {
            rank,
            op,
            group: self.ranks.clone(),
        })
    }
}

/// Calls and bytes of one kind of operation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KindStats {
    pub calls: u64,
    pub bytes: u64,
}

/// Per-rank traffic counters, compared by `--report` with the analytic volumes of
/// ALGORITHMS.md.
///
/// Convention: `bytes` is what *this rank sends over the wire*, as the standard
/// algorithm for the collective would, whatever the backend really does (the in-process
/// backend copies whole buffers; NCCL picks its own algorithm). This makes the numbers
/// backend-independent and equal to the textbook volumes. With G the group size and
/// `n` the bytes of the rank's `input` (`data` for all-reduce):
/// - all_gather: `n * (G-1)` — the input goes to each other member;
/// - all_to_all: `n * (G-1) / G` — every chunk but the one kept locally;
/// - all_reduce: `2 * (G-1) * n / G` (ring all-reduce: reduce-scatter + all-gather),
///   rounded down to a whole byte; exact when the element count is divisible by G;
/// - send_recv: `n` for `send` and for the send half of `sendrecv` (receives are
///   counted by their sender); a send to oneself counts too (a real backend's
///   self-send still costs a copy, and Ring attention on one rank keeps its shape);
/// - barrier: calls only, no bytes.
///
/// Every successful call counts in `calls`, including G = 1 (zero bytes); a call that
/// returns an error counts nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommStats {
    all_gather: KindStats,
    all_to_all: KindStats,
    all_reduce: KindStats,
    send_recv: KindStats,
    barrier_calls: u64,
}

impl CommStats {
    pub fn reset(&mut self) {
        *self = CommStats::default();
    }

    /// Adds another run's counters (totals over several forwards).
    pub fn merge(&mut self, other: &CommStats) {
        for (a, b) in [
            (&mut self.all_gather, &other.all_gather),
            (&mut self.all_to_all, &other.all_to_all),
            (&mut self.all_reduce, &other.all_reduce),
            (&mut self.send_recv, &other.send_recv),
        ] {
            a.calls += b.calls;
            a.bytes += b.bytes;
        }
        self.barrier_calls += other.barrier_calls;
    }

    pub fn all_gather(&self) -> KindStats {
        self.all_gather
    }
    pub fn all_to_all(&self) -> KindStats {
        self.all_to_all
    }
    pub fn all_reduce(&self) -> KindStats {
        self.all_reduce
    }
    pub fn send_recv(&self) -> KindStats {
        self.send_recv
    }
    pub fn barrier_calls(&self) -> u64 {
        self.barrier_calls
    }

    /// Sum of bytes over all kinds.
    pub fn total_bytes(&self) -> u64 {
        self.all_gather.bytes + self.all_to_all.bytes + self.all_reduce.bytes + self.send_recv.bytes
    }

    /// Wire bytes of one all_gather of `input_elems` f32 over `group_size` ranks.
    pub fn all_gather_bytes(input_elems: usize, group_size: usize) -> u64 {
        input_elems as u64 * ELEM_BYTES * group_size.saturating_sub(1) as u64
    }

    /// Wire bytes of one all_to_all of `input_elems` f32 over `group_size` ranks.
    pub fn all_to_all_bytes(input_elems: usize, group_size: usize) -> u64 {
        if group_size == 0 {
            return 0;
        }
        let n = input_elems as u64 * ELEM_BYTES;
        n * (group_size as u64 - 1) / group_size as u64
    }

    /// Wire bytes of one ring all_reduce of `elems` f32 over `group_size` ranks.
    pub fn all_reduce_bytes(elems: usize, group_size: usize) -> u64 {
        if group_size == 0 {
            return 0;
        }
        let n = elems as u64 * ELEM_BYTES;
        2 * (group_size as u64 - 1) * n / group_size as u64
    }

    /// Recording helpers, shared by all backends so the convention lives in one place.
    pub fn record_all_gather(&mut self, input_elems: usize, group_size: usize) {
        self.all_gather.calls += 1;
        self.all_gather.bytes += Self::all_gather_bytes(input_elems, group_size);
    }
    pub fn record_all_to_all(&mut self, input_elems: usize, group_size: usize) {
        self.all_to_all.calls += 1;
        self.all_to_all.bytes += Self::all_to_all_bytes(input_elems, group_size);
    }
    pub fn record_all_reduce(&mut self, elems: usize, group_size: usize) {
        self.all_reduce.calls += 1;
        self.all_reduce.bytes += Self::all_reduce_bytes(elems, group_size);
    }
    pub fn record_send(&mut self, elems: usize) {
        self.send_recv.calls += 1;
        self.send_recv.bytes += elems as u64 * ELEM_BYTES;
    }
    pub fn record_barrier(&mut self) {
        self.barrier_calls += 1;
    }
}
