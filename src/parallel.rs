//! Multi-rank runs: in one process, every rank a thread with its own Program, buffers and
//! executor, sharing the weights, talking through the in-process communicator; or, in a
//! multi-process run (`ditto launch`, torchrun, ...), only this process's rank, talking to
//! the other processes through a communicator it was given ([`RankOptions::comm`]).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ditto_codegen::{Program, SeqMethod, Step};
use ditto_runtime::comm::{run_ranks, CommError, CommStats, Communicator, Group};
use ditto_runtime::cpu::executor::Weights;
use ditto_runtime::parallel::stale::{StaleMode, StaleState};

use crate::{Backend, Error, HostTensor, Session};

/// How ranks are run.
#[derive(Clone, Debug)]
pub struct RankOptions {
    /// Every collective gives up after this long, naming the ranks that did not arrive
    /// (in-process ranks; a given [`comm`](Self::comm) has its own timeout).
    pub timeout: Duration,
    /// This process is one rank of a multi-process run: run only `comm.rank()`, with this
    /// communicator to the others, instead of every rank as a thread.
    pub comm: Option<SharedComm>,
    /// Where single-rank programs run. Programs over several ranks run on the CPU backend
    /// only (the GPU backend has no communicator yet), and say so.
    pub backend: Backend,
}

impl Default for RankOptions {
    fn default() -> Self {
        RankOptions {
            timeout: Duration::from_secs(60),
            comm: None,
            backend: Backend::Cpu,
        }
    }
}

/// One communicator shared by every program of this process (a pipeline may compile the
/// transformer for several shapes; all of them are the same rank talking to the same
/// peers), and by the caller, who keeps a clone for the final barrier.
///
/// Calls are serialized by a mutex; ranks of a multi-process run are single-threaded
/// callers, so it is never contended. Every member issues the same collectives in the
/// same order whichever program it runs, which is all the communicator's matching needs.
#[derive(Clone)]
pub struct SharedComm {
    inner: Arc<Mutex<Box<dyn Communicator>>>,
    rank: usize,
    world_size: usize,
    /// This handle's copy of the counters, refreshed after each call through it, because
    /// [`Communicator::stats`] hands out a reference and the real ones sit behind the lock.
    stats: CommStats,
}

impl SharedComm {
    pub fn new(comm: Box<dyn Communicator>) -> SharedComm {
        SharedComm {
            rank: comm.rank(),
            world_size: comm.world_size(),
            stats: comm.stats().clone(),
            inner: Arc::new(Mutex::new(comm)),
        }
    }

    fn lock(inner: &Mutex<Box<dyn Communicator>>) -> MutexGuard<'_, Box<dyn Communicator>> {
        // A panic while holding the lock leaves the communicator usable (its own state is
        // consistent between calls, and a failed call reports its error).
        inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn with<R>(&mut self, f: impl FnOnce(&mut dyn Communicator) -> R) -> R {
        let mut guard = Self::lock(&self.inner);
        let r = f(guard.as_mut());
        self.stats = guard.stats().clone();
        r
    }

    /// The counters as they are now (over every handle's calls).
    pub fn current_stats(&self) -> CommStats {
        Self::lock(&self.inner).stats().clone()
    }

    /// A barrier over the whole world.
    pub fn barrier_all(&mut self) -> Result<(), CommError> {
        let world = Group::world(self.world_size);
        self.barrier(&world)
    }
}

impl fmt::Debug for SharedComm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SharedComm(rank {} of {})", self.rank, self.world_size)
    }
}

impl Communicator for SharedComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world_size
    }
    fn all_gather(
        &mut self,
        group: &Group,
        input: &[f32],
        output: &mut [f32],
    ) -> Result<(), CommError> {
        self.with(|c| c.all_gather(group, input, output))
    }
    fn all_to_all(
        &mut self,
        group: &Group,
        input: &[f32],
        output: &mut [f32],
    ) -> Result<(), CommError> {
        self.with(|c| c.all_to_all(group, input, output))
    }
    fn all_reduce_sum(&mut self, group: &Group, data: &mut [f32]) -> Result<(), CommError> {
        self.with(|c| c.all_reduce_sum(group, data))
    }
    fn send(&mut self, to: usize, tag: u64, data: &[f32]) -> Result<(), CommError> {
        self.with(|c| c.send(to, tag, data))
    }
    fn recv(&mut self, from: usize, tag: u64, out: &mut [f32]) -> Result<(), CommError> {
        self.with(|c| c.recv(from, tag, out))
    }
    fn sendrecv(
        &mut self,
        to: usize,
        send: &[f32],
        from: usize,
        recv: &mut [f32],
        tag: u64,
    ) -> Result<(), CommError> {
        self.with(|c| c.sendrecv(to, send, from, recv, tag))
    }
    fn barrier(&mut self, group: &Group) -> Result<(), CommError> {
        self.with(|c| c.barrier(group))
    }
    fn stats(&self) -> &CommStats {
        &self.stats
    }
    fn reset_stats(&mut self) {
        self.with(|c| c.reset_stats())
    }
    fn fail(&mut self, reason: &str) {
        self.with(|c| c.fail(reason))
    }
}

/// The ranks of one parallel program, ready to run.
pub struct Ranks {
    program: Arc<Program>,
    weights: Weights,
    opts: RankOptions,
    /// One-rank programs, and this process's rank of a multi-process run, keep their
    /// session (and buffers) across runs.
    single: Option<Session>,
    /// Communication of every run so far, per rank.
    totals: RankStats,
    /// Per rank, the K/V that displaced attention (DistriFusion, PCPP) keeps across runs.
    /// They live here, not in the sessions: in-process ranks get a new session every run,
    /// while the stores must last a whole generation. A multi-process run uses only its
    /// own rank's entry. Empty when the program has no displaced attention.
    stale: Vec<Mutex<StaleState>>,
    /// With `Some(w)`, the first `w` runs after [`begin_generation`](Self::begin_generation)
    /// are exact and the later ones stale (DistriFusion's warmup); `None`: the mode set by
    /// [`set_stale_mode`](Self::set_stale_mode).
    warmup_steps: Option<usize>,
    /// Runs since the last reset of the states.
    runs_since_reset: usize,
}

/// What every rank sent, for `--report`.
#[derive(Clone, Debug, Default)]
pub struct RankStats {
    pub per_rank: Vec<CommStats>,
}

impl RankStats {
    fn add(&mut self, other: &RankStats) {
        if self.per_rank.len() < other.per_rank.len() {
            self.per_rank
                .resize(other.per_rank.len(), CommStats::default());
        }
        for (a, b) in self.per_rank.iter_mut().zip(&other.per_rank) {
            a.merge(b);
        }
    }
}

impl Ranks {
    pub fn new(program: Arc<Program>, weights: Weights, opts: RankOptions) -> Ranks {
        let displaced = program.steps.iter().any(|s| {
            matches!(
                s,
                Step::SeqAttention {
                    method: SeqMethod::Displaced,
                    ..
                }
            )
        });
        let stale = if displaced {
            (0..program.mesh.world_size())
                .map(|_| Mutex::new(StaleState::default()))
                .collect()
        } else {
            Vec::new()
        };
        Ranks {
            program,
            weights,
            opts,
            single: None,
            totals: RankStats::default(),
            stale,
            warmup_steps: None,
            runs_since_reset: 0,
        }
    }

    /// Whether the program has displaced attention (state kept across runs).
    pub fn is_stale(&self) -> bool {
        !self.stale.is_empty()
    }

    fn states(&mut self) -> impl Iterator<Item = &mut StaleState> {
        self.stale
            .iter_mut()
            .map(|m| m.get_mut().unwrap_or_else(|e| e.into_inner()))
    }

    /// How the next runs' displaced attentions use their K/V: exact (warmup steps: the K/V
    /// gathered synchronously) or stale (the other ranks' K/V of the previous run). Replaces
    /// a warmup schedule ([`set_warmup_steps`](Self::set_warmup_steps)).
    pub fn set_stale_mode(&mut self, mode: StaleMode) {
        self.warmup_steps = None;
        self.states().for_each(|s| s.mode = mode);
    }

    /// The mode by schedule: the first `steps` runs after
    /// [`begin_generation`](Self::begin_generation) exact, the later ones stale. Every
    /// run of the program counts as one denoising step.
    pub fn set_warmup_steps(&mut self, steps: usize) {
        self.warmup_steps = Some(steps);
    }

    /// PCPP: the portion of each neighbour's patch attended to in stale mode (`None`:
    /// DistriFusion, every patch).
    pub fn set_pcpp_portion(&mut self, portion: Option<f32>) {
        self.states().for_each(|s| s.pcpp_portion = portion);
    }

    /// Forgets the stored K/V (between generations: a generation must not attend to the
    /// previous one's keys) and restarts the warmup schedule.
    pub fn reset_stale(&mut self) {
        self.runs_since_reset = 0;
        self.states().for_each(|s| s.reset());
    }

    /// Call before the first step of a generation: [`reset_stale`](Self::reset_stale).
    pub fn begin_generation(&mut self) {
        self.reset_stale();
    }

    /// Sets every state's mode from the warmup schedule for the coming run.
    fn schedule_run(&mut self) {
        if let Some(w) = self.warmup_steps {
            let mode = if self.runs_since_reset < w {
                StaleMode::Exact
            } else {
                StaleMode::Stale
            };
            self.states().for_each(|s| s.mode = mode);
        }
        self.runs_since_reset += 1;
    }

    /// Per rank, the bytes the displaced attentions' K/V stores hold (all zero without
    /// displaced attention; a multi-process run knows only its own rank's).
    pub fn kv_bytes(&self) -> Vec<usize> {
        let world = self.program.mesh.world_size();
        if self.stale.is_empty() {
            return vec![0; world];
        }
        self.stale
            .iter()
            .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()).kv_bytes())
            .collect()
    }

    /// Bytes every rank sent over all runs so far.
    pub fn total_stats(&self) -> &RankStats {
        &self.totals
    }

    pub fn program(&self) -> &Program {
        &self.program
    }

    /// Runs every rank on the same inputs; returns rank 0's outputs (every rank holds the
    /// gathered result) and each rank's communication statistics. A rank that fails makes
    /// the run fail with an error naming it, within the collective timeout.
    ///
    /// With [`RankOptions::comm`], runs only that communicator's rank (the other
    /// processes run theirs) and returns its outputs (the same gathered result) and its
    /// own statistics alone.
    pub fn run(
        &mut self,
        inputs: &BTreeMap<String, HostTensor>,
    ) -> Result<(BTreeMap<String, HostTensor>, RankStats), Error> {
        let world = self.program.mesh.world_size();
        if world > 1 && self.opts.backend != Backend::Cpu && self.opts.comm.is_none() {
            return Err(Error::Input(format!(
                "a program over {world} ranks on {} runs one process per rank (`ditto launch \
                 --nproc-per-node {world} -- ...`, or torchrun-style variables); in one process \
                 it runs on the CPU backend (--device cpu)",
                self.opts.backend
            )));
        }
        self.schedule_run();
        if let (Some(comm), true) = (&self.opts.comm, world > 1) {
            return self.run_own_rank(comm.clone(), inputs);
        }
        if world == 1 {
            if self.single.is_none() {
                self.single = Some(Session::on(
                    self.opts.backend,
                    self.program.clone(),
                    self.weights.clone(),
                )?);
            }
            let s = self.single.as_mut().expect("set above");
            let out = match self.stale.first_mut() {
                Some(st) => {
                    s.run_with_state(inputs, st.get_mut().unwrap_or_else(|e| e.into_inner()))?
                }
                None => s.run(inputs)?,
            };
            return Ok((out, RankStats::default()));
        }
        let stale = &self.stale;
        let results = run_ranks(world, self.opts.timeout, |comm| {
            let rank = ditto_runtime::comm::Communicator::rank(&comm);
            let mut s = Session::with_comm(
                self.program.clone(),
                self.weights.clone(),
                rank,
                Box::new(comm),
            )?;
            // Each rank locks only its own state: never contended.
            let out = match stale.get(rank) {
                Some(st) => {
                    let mut st = st.lock().unwrap_or_else(|e| e.into_inner());
                    s.run_with_state(inputs, &mut st)?
                }
                None => s.run(inputs)?,
            };
            let stats = s.comm_stats().cloned().unwrap_or_default();
            Ok::<_, Error>((out, stats))
        })
        .map_err(|e| Error::Rank(e.to_string()))?;
        let mut stats = RankStats::default();
        let mut first = None;
        for (out, st) in results {
            first.get_or_insert(out);
            stats.per_rank.push(st);
        }
        self.totals.add(&stats);
        Ok((first.unwrap_or_default(), stats))
    }

    fn run_own_rank(
        &mut self,
        mut comm: SharedComm,
        inputs: &BTreeMap<String, HostTensor>,
    ) -> Result<(BTreeMap<String, HostTensor>, RankStats), Error> {
        let world = self.program.mesh.world_size();
        let rank = comm.rank();
        if comm.world_size() != world {
            let msg = format!(
                "the program is split over {world} rank(s) but this process is rank {rank} of {}",
                comm.world_size()
            );
            // Tell the peers now rather than let them wait out their timeout.
            comm.fail(&msg);
            return Err(Error::Rank(msg));
        }
        if self.single.is_none() {
            let handle = Box::new(comm.clone());
            self.single = Some(Session::with_comm_on(
                self.opts.backend,
                self.program.clone(),
                self.weights.clone(),
                rank,
                handle,
            )?);
        }
        let s = self.single.as_mut().expect("set above");
        // Per-run counters, as the in-process ranks (fresh communicators every run) give.
        comm.reset_stats();
        // A failure is announced to the peers by the executor itself.
        let out = match self.stale.get_mut(rank) {
            Some(st) => {
                s.run_with_state(inputs, st.get_mut().unwrap_or_else(|e| e.into_inner()))?
            }
            None => s.run(inputs)?,
        };
        let stats = RankStats {
            per_rank: vec![comm.current_stats()],
        };
        self.totals.add(&stats);
        Ok((out, stats))
    }
}
