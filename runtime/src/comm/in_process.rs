//! In-process communicator: every rank is a thread of this process with its own
//! Program and buffers, and messages are copies through shared mailboxes.
//!
//! Design:
//! - One mailbox per rank (a `Mutex<HashMap>` plus a `Condvar`), keyed by
//!   `(sender, key)` where the key is either a point-to-point tag or a collective's
//!   `(group, sequence number)`. So collectives on different groups, successive
//!   collectives on one group, and point-to-point traffic can never be confused, and
//!   messages with the same key stay in order (FIFO).
//! - Sends are eager: the payload is copied into the receiver's mailbox and the sender
//!   goes on. Collectives are "send to every member, then wait for every member", so no
//!   call order between members can deadlock; only a missing member can block, and
//!   that wait is bounded by the timeout.
//! - Failure is world-wide: `fail()` (or dropping a communicator while panicking) records
//!   the failure, raises a flag and wakes every mailbox, so waiting ranks return
//!   `PeerFailed` at once instead of after the timeout. A rank that simply finishes
//!   (drops its communicator) is marked exited, so a peer still waiting for it gets
//!   `PeerExited` at once — messages it sent before exiting are still delivered.

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use super::collectives::{self, Received};
use super::{CommError, CommOp, CommStats, Communicator, Group};

/// What a message belongs to. Collectives carry the ordered group so that two groups
/// sharing members (say {0,1} and the world {0,1,2,3}) never mix.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    P2p { tag: u64 },
    Coll { group: Vec<usize>, seq: u64 },
}

struct Message {
    /// The sender's operation, to diagnose members calling different collectives.
    op: CommOp,
    data: Vec<f32>,
}

#[derive(Default)]
struct Mailbox {
    queues: HashMap<(usize, Key), VecDeque<Message>>,
}

struct Slot {
    mailbox: Mutex<Mailbox>,
    arrived: Condvar,
}

struct World {
    size: usize,
    slots: Vec<Slot>,
    /// Set once the first failure is recorded; checked before every wait.
    poisoned: AtomicBool,
    /// Every announced failure, in order; the first one is what peers report.
    failures: Mutex<Vec<(usize, String)>>,
    exited: Vec<AtomicBool>,
}

/// Locks ignoring poisoning: our critical sections only move data in and out of maps,
/// so a panic elsewhere cannot leave them inconsistent, and failure handling must keep
/// working precisely when some thread panicked.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl World {
    fn deliver(&self, from: usize, to: usize, key: Key, msg: Message) {
        let slot = &self.slots[to];
        lock(&slot.mailbox)
            .queues
            .entry((from, key))
            .or_default()
            .push_back(msg);
        slot.arrived.notify_all();
    }

    fn fail(&self, rank: usize, reason: &str) {
        {
            let mut failures = lock(&self.failures);
            // One entry per rank: a rank whose comm was dropped while panicking and whose
            // runner then reports the panic message must not be listed twice.
            if !failures.iter().any(|(r, _)| *r == rank) {
                failures.push((rank, reason.to_string()));
            }
        }
        self.poisoned.store(true, Ordering::SeqCst);
        self.wake_all();
    }

    fn mark_exited(&self, rank: usize) {
        self.exited[rank].store(true, Ordering::SeqCst);
        self.wake_all();
    }

    /// Taking each mailbox lock before notifying closes the window between a waiter's
    /// flag check and its `wait`: the waiter holds its lock across both.
    fn wake_all(&self) {
        for slot in &self.slots {
            let _guard = lock(&slot.mailbox);
            slot.arrived.notify_all();
        }
    }

    fn first_failure(&self) -> Option<(usize, String)> {
        if !self.poisoned.load(Ordering::SeqCst) {
            return None;
        }
        lock(&self.failures).first().cloned()
    }

    fn has_exited(&self, rank: usize) -> bool {
        self.exited[rank].load(Ordering::SeqCst)
    }
}

/// One rank's endpoint of an in-process world. Move it into the rank's thread.
pub struct InProcessComm {
    rank: usize,
    world: Arc<World>,
    timeout: Duration,
    /// Next sequence number per group (keyed by the ordered rank list).
    seqs: HashMap<Vec<usize>, u64>,
    stats: CommStats,
    /// False under `run_ranks`, which marks the exit itself only after it has recorded
    /// the rank's error: otherwise peers could see "exited" first and blame themselves.
    exit_on_drop: bool,
}

/// Creates the communicators of a world of `world_size` ranks sharing one timeout
/// (every blocking wait is bounded by it).
pub fn in_process_world(world_size: usize, timeout: Duration) -> Vec<InProcessComm> {
    let world = Arc::new(World {
        size: world_size,
        slots: (0..world_size)
            .map(|_| Slot {
                mailbox: Mutex::new(Mailbox::default()),
                arrived: Condvar::new(),
            })
            .collect(),
        poisoned: AtomicBool::new(false),
        failures: Mutex::new(Vec::new()),
        exited: (0..world_size).map(|_| AtomicBool::new(false)).collect(),
    });
    (0..world_size)
        .map(|rank| InProcessComm {
            rank,
            world: Arc::clone(&world),
            timeout,
            seqs: HashMap::new(),
            stats: CommStats::default(),
            exit_on_drop: true,
        })
        .collect()
}

/// A cloneable way to announce a rank's failure from outside its communicator (a
/// watchdog, or a runner after the communicator was moved away).
#[derive(Clone)]
pub struct FailHandle {
    rank: usize,
    world: Arc<World>,
}

impl FailHandle {
    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn fail(&self, reason: &str) {
        self.world.fail(self.rank, reason);
    }

    fn mark_exited(&self) {
        self.world.mark_exited(self.rank);
    }
}

impl InProcessComm {
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Changes this rank's timeout (e.g. longer for a first step that compiles kernels).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    pub fn fail_handle(&self) -> FailHandle {
        FailHandle {
            rank: self.rank,
            world: Arc::clone(&self.world),
        }
    }

    fn peer_failed(&self, op: CommOp) -> Option<CommError> {
        self.world
            .first_failure()
            .map(|(rank, reason)| CommError::PeerFailed {
                rank,
                reason,
                observer: self.rank,
                op,
            })
    }

    fn check_failed(&self, op: CommOp) -> Result<(), CommError> {
        match self.peer_failed(op) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn check_peer(&self, op: CommOp, peer: usize) -> Result<(), CommError> {
        if peer >= self.world.size {
            return Err(CommError::InvalidRank {
                rank: self.rank,
                op,
                peer,
                world_size: self.world.size,
            });
        }
        Ok(())
    }

    fn post(&self, op: CommOp, to: usize, key: Key, data: Vec<f32>) -> Result<(), CommError> {
        // Sending to a finished rank would only make us wait for its reply forever.
        if to != self.rank && self.world.has_exited(to) {
            return Err(CommError::PeerExited {
                rank: to,
                observer: self.rank,
                op,
            });
        }
        self.world.deliver(self.rank, to, key, Message { op, data });
        Ok(())
    }

    /// Waits until one message for each `(sender, key)` in `wanted` has arrived, the
    /// world fails, a sender exits, or `deadline` passes. Returns them in `wanted` order.
    fn wait_all(
        &self,
        op: CommOp,
        wanted: &[(usize, Key)],
        deadline: Instant,
    ) -> Result<Vec<Message>, CommError> {
        let slot = &self.world.slots[self.rank];
        let mut got: Vec<Option<Message>> = wanted.iter().map(|_| None).collect();
        let mut mailbox = lock(&slot.mailbox);
        loop {
            // Failure first: once the world is poisoned, data that happens to be there
            // must not let a rank run on into its next collective.
            self.check_failed(op)?;
            for (slot_msg, (from, key)) in got.iter_mut().zip(wanted) {
                if slot_msg.is_some() {
                    continue;
                }
                let qkey = (*from, key.clone());
                if let Some(queue) = mailbox.queues.get_mut(&qkey) {
                    *slot_msg = queue.pop_front();
                    if queue.is_empty() {
                        mailbox.queues.remove(&qkey);
                    }
                }
            }
            let missing: Vec<usize> = got
                .iter()
                .zip(wanted)
                .filter(|(m, _)| m.is_none())
                .map(|(_, (from, _))| *from)
                .collect();
            if missing.is_empty() {
                return Ok(got.into_iter().flatten().collect());
            }
            if let Some(&gone) = missing.iter().find(|&&r| self.world.has_exited(r)) {
                return Err(CommError::PeerExited {
                    rank: gone,
                    observer: self.rank,
                    op,
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(CommError::Timeout {
                    rank: self.rank,
                    op,
                    waiting_for: missing,
                    after: self.timeout,
                });
            }
            mailbox = match slot.arrived.wait_timeout(mailbox, deadline - now) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }

    /// The common shape of every collective: post `payload(j)` to each other member j,
    /// then collect one message from each. Returns the caller's index in the group and
    /// the received payloads indexed by member (`None` at the caller's own index).
    fn exchange<'a>(
        &mut self,
        op: CommOp,
        group: &Group,
        payload: impl Fn(usize) -> &'a [f32],
    ) -> Result<(usize, Received), CommError> {
        let deadline = Instant::now() + self.timeout;
        self.check_failed(op)?;
        let me = group.validate(self.rank, self.world.size, op)?;
        let seq = {
            let counter = self.seqs.entry(group.ranks.clone()).or_insert(0);
            let seq = *counter;
            *counter += 1;
            seq
        };
        let key = Key::Coll {
            group: group.ranks.clone(),
            seq,
        };
        for (j, &to) in group.ranks.iter().enumerate() {
            if j != me {
                self.post(op, to, key.clone(), payload(j).to_vec())?;
            }
        }
        let wanted: Vec<(usize, Key)> = group
            .ranks
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != me)
            .map(|(_, &from)| (from, key.clone()))
            .collect();
        let mut messages = self.wait_all(op, &wanted, deadline)?.into_iter();
        let mut received = Vec::with_capacity(group.size());
        for (i, &from) in group.ranks.iter().enumerate() {
            if i == me {
                received.push(None);
                continue;
            }
            let Some(msg) = messages.next() else {
                // wait_all returns one message per wanted entry; unreachable in practice.
                return Err(CommError::Timeout {
                    rank: self.rank,
                    op,
                    waiting_for: vec![from],
                    after: self.timeout,
                });
            };
            if msg.op != op {
                return Err(CommError::OpMismatch {
                    rank: self.rank,
                    op,
                    peer: from,
                    peer_op: msg.op,
                });
            }
            received.push(Some(msg.data));
        }
        Ok((me, received))
    }

    fn recv_inner(
        &mut self,
        op: CommOp,
        from: usize,
        tag: u64,
        out: &mut [f32],
        deadline: Instant,
    ) -> Result<(), CommError> {
        self.check_peer(op, from)?;
        let mut msgs = self.wait_all(op, &[(from, Key::P2p { tag })], deadline)?;
        let data = msgs.pop().map(|m| m.data).unwrap_or_default();
        collectives::size_check(self.rank, op, from, out.len(), data.len())?;
        out.copy_from_slice(&data);
        Ok(())
    }

    fn send_inner(
        &mut self,
        op: CommOp,
        to: usize,
        tag: u64,
        data: &[f32],
    ) -> Result<(), CommError> {
        self.check_peer(op, to)?;
        self.post(op, to, Key::P2p { tag }, data.to_vec())?;
        self.stats.record_send(data.len());
        Ok(())
    }
}

impl collectives::Exchange for InProcessComm {
    fn this_rank(&self) -> usize {
        self.rank
    }
    fn exchange<'a>(
        &mut self,
        op: CommOp,
        group: &Group,
        payload: impl Fn(usize) -> &'a [f32],
    ) -> Result<(usize, Received), CommError> {
        InProcessComm::exchange(self, op, group, payload)
    }
    fn stats_mut(&mut self) -> &mut CommStats {
        &mut self.stats
    }
}

impl Communicator for InProcessComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world.size
    }

    fn all_gather(
        &mut self,
        group: &Group,
        input: &[f32],
        output: &mut [f32],
    ) -> Result<(), CommError> {
        collectives::all_gather(self, group, input, output)
    }

    fn all_to_all(
        &mut self,
        group: &Group,
        input: &[f32],
        output: &mut [f32],
    ) -> Result<(), CommError> {
        collectives::all_to_all(self, group, input, output)
    }

    fn all_reduce_sum(&mut self, group: &Group, data: &mut [f32]) -> Result<(), CommError> {
        collectives::all_reduce_sum(self, group, data)
    }

    fn send(&mut self, to: usize, tag: u64, data: &[f32]) -> Result<(), CommError> {
        let op = CommOp::Send;
        self.check_failed(op)?;
        self.send_inner(op, to, tag, data)
    }

    fn recv(&mut self, from: usize, tag: u64, out: &mut [f32]) -> Result<(), CommError> {
        let op = CommOp::Recv;
        let deadline = Instant::now() + self.timeout;
        self.check_failed(op)?;
        self.recv_inner(op, from, tag, out, deadline)
    }

    fn sendrecv(
        &mut self,
        to: usize,
        send: &[f32],
        from: usize,
        recv: &mut [f32],
        tag: u64,
    ) -> Result<(), CommError> {
        let op = CommOp::SendRecv;
        let deadline = Instant::now() + self.timeout;
        self.check_failed(op)?;
        self.check_peer(op, from)?;
        // Eager send first, then wait: every rank of a ring can call this at once.
        self.send_inner(op, to, tag, send)?;
        self.recv_inner(op, from, tag, recv, deadline)
    }

    fn barrier(&mut self, group: &Group) -> Result<(), CommError> {
        collectives::barrier(self, group)
    }

    fn stats(&self) -> &CommStats {
        &self.stats
    }

    fn reset_stats(&mut self) {
        self.stats.reset();
    }

    fn fail(&mut self, reason: &str) {
        self.world.fail(self.rank, reason);
    }
}

impl Drop for InProcessComm {
    fn drop(&mut self) {
        if thread::panicking() {
            // The panic message is not reachable from here; `run_ranks` reports it in
            // its own error. What matters is that peers stop waiting now.
            self.world
                .fail(self.rank, &format!("rank {} panicked", self.rank));
        } else if self.exit_on_drop {
            self.world.mark_exited(self.rank);
        }
    }
}

impl fmt::Debug for InProcessComm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InProcessComm")
            .field("rank", &self.rank)
            .field("world_size", &self.world.size)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Why `run_ranks` failed: the first rank to fail (in time), with its own message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankError {
    pub rank: usize,
    /// True when the rank panicked, false when its function returned an error.
    pub panicked: bool,
    pub message: String,
    /// Every rank that did not succeed, in rank order (most only because of `rank`).
    pub failed_ranks: Vec<usize>,
}

impl fmt::Display for RankError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = if self.panicked { "panicked" } else { "failed" };
        write!(f, "rank {} {what}: {}", self.rank, self.message)
    }
}

impl std::error::Error for RankError {}

enum Outcome<T> {
    Ok(T),
    Err(String),
    Panic(String),
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

/// Runs `f` on `world_size` threads, one per rank, each with its communicator, and
/// returns the ranks' results in rank order.
///
/// A rank that returns an error or panics is announced as failed at once, so the others
/// leave their collectives with `PeerFailed` instead of hanging; the returned error
/// names the first rank that failed and carries its message. The only thing this
/// cannot interrupt is a rank stuck in its own computation: threads cannot be killed,
/// so the scope waits for it, but its next collective returns immediately.
pub fn run_ranks<T, E, F>(world_size: usize, timeout: Duration, f: F) -> Result<Vec<T>, RankError>
where
    T: Send,
    E: fmt::Display,
    F: Fn(InProcessComm) -> Result<T, E> + Sync,
{
    let comms = in_process_world(world_size, timeout);
    let Some(world) = comms.first().map(|c| Arc::clone(&c.world)) else {
        return Ok(Vec::new());
    };
    let f = &f;
    let outcomes: Vec<Outcome<T>> = thread::scope(|scope| {
        let mut joins = Vec::with_capacity(world_size);
        for mut comm in comms {
            comm.exit_on_drop = false;
            let handle = comm.fail_handle();
            let rank = comm.rank;
            let body = {
                let handle = handle.clone();
                move || {
                    let outcome = match catch_unwind(AssertUnwindSafe(|| f(comm))) {
                        Ok(Ok(v)) => Outcome::Ok(v),
                        Ok(Err(e)) => {
                            let msg = e.to_string();
                            handle.fail(&msg);
                            Outcome::Err(msg)
                        }
                        Err(payload) => {
                            let msg = panic_message(payload.as_ref());
                            handle.fail(&format!("panicked: {msg}"));
                            Outcome::Panic(msg)
                        }
                    };
                    handle.mark_exited();
                    outcome
                }
            };
            let spawned = thread::Builder::new()
                .name(format!("rank-{rank}"))
                .spawn_scoped(scope, body);
            match spawned {
                Ok(join) => joins.push(Ok(join)),
                Err(e) => {
                    let msg = format!("could not start its thread: {e}");
                    handle.fail(&msg);
                    handle.mark_exited();
                    joins.push(Err(msg));
                }
            }
        }
        joins
            .into_iter()
            .map(|j| match j {
                Ok(join) => join.join().unwrap_or_else(|payload| {
                    // Only reachable if formatting the error itself panicked.
                    Outcome::Panic(panic_message(payload.as_ref()))
                }),
                Err(msg) => Outcome::Err(msg),
            })
            .collect()
    });

    let failed_ranks: Vec<usize> = outcomes
        .iter()
        .enumerate()
        .filter(|(_, o)| !matches!(o, Outcome::Ok(_)))
        .map(|(r, _)| r)
        .collect();
    let first = world.first_failure();
    if failed_ranks.is_empty() && first.is_none() {
        return Ok(outcomes
            .into_iter()
            .filter_map(|o| match o {
                Outcome::Ok(v) => Some(v),
                _ => None,
            })
            .collect());
    }
    // Blame the rank that failed first in time, with the message from its own outcome
    // (the recorded reason of a panicking rank lacks the panic message). A rank that
    // called `fail()` yet returned Ok is blamed with the reason it gave.
    let (rank, recorded) = first.unwrap_or_else(|| (failed_ranks[0], String::new()));
    let (panicked, message) = match &outcomes[rank] {
        Outcome::Err(m) => (false, m.clone()),
        Outcome::Panic(m) => (true, m.clone()),
        Outcome::Ok(_) => (false, recorded),
    };
    let mut failed_ranks = failed_ranks;
    if !failed_ranks.contains(&rank) {
        failed_ranks.push(rank);
        failed_ranks.sort_unstable();
    }
    Err(RankError {
        rank,
        panicked,
        message,
        failed_ranks,
    })
}
