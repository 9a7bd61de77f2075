//! Multi-rank runs in one process: every rank a thread with its own Program, buffers and
//! executor, sharing the weights, talking through the in-process communicator.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ditto_codegen::Program;
use ditto_runtime::comm::{run_ranks, CommStats};
use ditto_runtime::cpu::executor::Weights;

use crate::{Error, HostTensor, Session};

/// How ranks are run.
#[derive(Clone, Debug)]
pub struct RankOptions {
    /// Every collective gives up after this long, naming the ranks that did not arrive.
    pub timeout: Duration,
}

impl Default for RankOptions {
    fn default() -> Self {
        RankOptions {
            timeout: Duration::from_secs(60),
        }
    }
}

/// The ranks of one parallel program, ready to run.
pub struct Ranks {
    program: Arc<Program>,
    weights: Weights,
    opts: RankOptions,
    /// One-rank programs keep their session (and buffers) across runs.
    single: Option<Session>,
    /// Communication of every run so far, per rank.
    totals: RankStats,
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
        Ranks {
            program,
            weights,
            opts,
            single: None,
            totals: RankStats::default(),
        }
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
    pub fn run(
        &mut self,
        inputs: &BTreeMap<String, HostTensor>,
    ) -> Result<(BTreeMap<String, HostTensor>, RankStats), Error> {
        let world = self.program.mesh.world_size();
        if world == 1 {
            if self.single.is_none() {
                self.single = Some(Session::new(self.program.clone(), self.weights.clone())?);
            }
            let s = self.single.as_mut().expect("set above");
            return Ok((s.run(inputs)?, RankStats::default()));
        }
        let results = run_ranks(world, self.opts.timeout, |comm| {
            let rank = ditto_runtime::comm::Communicator::rank(&comm);
            let mut s = Session::with_comm(
                self.program.clone(),
                self.weights.clone(),
                rank,
                Box::new(comm),
            )?;
            let out = s.run(inputs)?;
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
}
