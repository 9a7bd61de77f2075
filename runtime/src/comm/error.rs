//! Errors of the communication layer.
//!
//! Every variant names the rank that observed the error (`rank`, or `observer` where
//! `rank` is the peer to blame) and the operation it was in, so that a failure in a
//! many-rank run can be traced to its origin from any one rank's log line.

use std::fmt;
use std::time::Duration;

use thiserror::Error;

/// The operation a communicator was performing when an error occurred.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CommOp {
    AllGather,
    AllToAll,
    AllReduce,
    Send,
    Recv,
    SendRecv,
    Barrier,
}

impl CommOp {
    pub fn name(self) -> &'static str {
        match self {
            CommOp::AllGather => "all_gather",
            CommOp::AllToAll => "all_to_all",
            CommOp::AllReduce => "all_reduce",
            CommOp::Send => "send",
            CommOp::Recv => "recv",
            CommOp::SendRecv => "sendrecv",
            CommOp::Barrier => "barrier",
        }
    }
}

impl fmt::Display for CommOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, PartialEq, Error)]
pub enum CommError {
    /// A blocking wait ran out of time; `waiting_for` lists the peers whose data never
    /// arrived (the ones to look at first).
    #[error("rank {rank}: {op} timed out after {after:?} waiting for rank(s) {waiting_for:?}")]
    Timeout {
        rank: usize,
        op: CommOp,
        waiting_for: Vec<usize>,
        after: Duration,
    },
    /// Rank `rank` announced a failure (an error or a panic); every rank's pending and
    /// later operations end with this error.
    #[error("rank {observer}: {op} aborted because rank {rank} failed: {reason}")]
    PeerFailed {
        rank: usize,
        reason: String,
        observer: usize,
        op: CommOp,
    },
    /// Rank `rank` finished (dropped its communicator) without sending what `observer`
    /// was waiting for, or before `observer` could send to it.
    #[error("rank {observer}: {op} needs rank {rank}, which has already exited")]
    PeerExited {
        rank: usize,
        observer: usize,
        op: CommOp,
    },
    /// The calling rank is not in the group it passed.
    #[error("rank {rank}: {op} on group {group:?}, which does not contain rank {rank}")]
    NotMember {
        rank: usize,
        op: CommOp,
        group: Vec<usize>,
    },
    /// The group is empty, has duplicates or names a rank outside the world.
    #[error("rank {rank}: {op} on invalid group {group:?}: {reason}")]
    InvalidGroup {
        rank: usize,
        op: CommOp,
        group: Vec<usize>,
        reason: String,
    },
    /// A point-to-point peer outside `0..world_size`.
    #[error("rank {rank}: {op} with rank {peer}, outside the world of {world_size} rank(s)")]
    InvalidRank {
        rank: usize,
        op: CommOp,
        peer: usize,
        world_size: usize,
    },
    /// The caller's buffers do not fit the operation (lengths in f32 elements).
    #[error("rank {rank}: {op}: {detail}")]
    BadLength {
        rank: usize,
        op: CommOp,
        detail: String,
    },
    /// A peer contributed a different number of elements than this rank expected.
    #[error("rank {rank}: {op}: rank {peer} sent {got} element(s), expected {expected}")]
    SizeMismatch {
        rank: usize,
        op: CommOp,
        peer: usize,
        expected: usize,
        got: usize,
    },
    /// Two members of a group called different collectives at the same point of the
    /// group's sequence (a program bug: every member must issue the same collectives in
    /// the same order).
    #[error("rank {rank}: called {op} but rank {peer} called {peer_op} at the same point")]
    OpMismatch {
        rank: usize,
        op: CommOp,
        peer: usize,
        peer_op: CommOp,
    },
    /// A transport-level failure (sockets, NCCL) for backends that have one.
    #[error("rank {rank}: {op}: transport error: {message}")]
    Transport {
        rank: usize,
        op: CommOp,
        message: String,
    },
}

impl CommError {
    /// The rank this error blames: the failed/exited/missing peer where there is one,
    /// otherwise the rank that reported it.
    pub fn culprit(&self) -> Vec<usize> {
        match self {
            CommError::Timeout { waiting_for, .. } => waiting_for.clone(),
            CommError::PeerFailed { rank, .. } | CommError::PeerExited { rank, .. } => {
                vec![*rank]
            }
            CommError::NotMember { rank, .. }
            | CommError::InvalidGroup { rank, .. }
            | CommError::InvalidRank { rank, .. }
            | CommError::BadLength { rank, .. }
            | CommError::Transport { rank, .. } => vec![*rank],
            CommError::SizeMismatch { rank, peer, .. }
            | CommError::OpMismatch { rank, peer, .. } => {
                vec![*rank, *peer]
            }
        }
    }
}
