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
}

/// What every rank sent, for `--report`.
#[derive(Clone, Debug, Default)]
pub struct RankStats {
    pub per_rank: Vec<CommStats>,
}

impl Ranks {
    pub fn new(program: Arc<Program>, weights: Weights, opts: RankOptions) -> Ranks {
        Ranks {
            program,
            weights,
            opts,
        }
    }

    pub fn program(&self) -> &Program {
        &self.program
    }

    /// Runs every rank on the same inputs; returns rank 0's outputs (every rank holds the
    /// gathered result) and each rank's communication statistics. A rank that fails makes
    /// the run fail with an error naming it, within the collective timeout.
    pub fn run(
        &self,
        inputs: &BTreeMap<String, HostTensor>,
    ) -> Result<(BTreeMap<String, HostTensor>, RankStats), Error> {
        let world = self.program.mesh.world_size();
        if world == 1 {
            let mut s = Session::new(self.program.clone(), self.weights.clone())?;
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
        Ok((first.unwrap_or_default(), stats))
    }
}
