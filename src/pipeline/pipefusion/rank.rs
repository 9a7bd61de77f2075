//! One rank's whole PipeFusion generation: receive what its stage needs, run the stage's
//! pieces on each unit (the whole image in a warmup step, else patch by patch), send what
//! the next stage needs; on the last stage, guidance and the scheduler on the unit's rows.
//!
//! Messages go between rank g of one stage and rank g of another, tagged by step, unit and
//! kind, so that every receive names exactly the message it waits for.

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::time::Instant;

use ditto_codegen::Program;
use ditto_runtime::comm::{CommError, CommStats, Communicator};
use ditto_runtime::cpu::executor::CpuExecutor;
use ditto_runtime::parallel::stale::{StaleMode, StaleState};
use ditto_runtime::parallel::Placement;

use super::super::cache::{as_carry, carried, CacheReport};
use super::super::conditioning::BatchInputs;
use super::super::PipelineError;
use super::patch_cache::{Decider, Residuals};
use super::rows::{self, Geometry, RowsOf, Unit};
use super::{latent_row_axis, Piece, Role, Run, Stages, StepDone};
use crate::HostTensor;

/// Message kinds (the low 4 bits of a tag): carried stream j (< 8), the cache's base
/// stream j (8 + j), the cache decision, the latents.
const KIND_BASE: u64 = 8;
const KIND_DECISION: u64 = 14;
const KIND_LATENTS: u64 = 15;

fn tag(step: usize, unit: Unit, kind: u64) -> u64 {
    ((step as u64 * 4096 + unit.index() as u64) << 4) | kind
}

fn comm_err(e: CommError) -> PipelineError {
    PipelineError::model("PipeFusion", crate::Error::Rank(e.to_string()))
}
fn run_err(e: ditto_runtime::RuntimeError) -> PipelineError {
    PipelineError::model("PipeFusion", crate::Error::from(e))
}

/// Binds a program's inputs, in order, from the carried streams or the named inputs.
fn bind<'a>(
    program: &Program,
    carry: &'a BTreeMap<String, HostTensor>,
    named: &'a BTreeMap<String, HostTensor>,
) -> Result<Vec<&'a [f32]>, PipelineError> {
    program
        .inputs
        .iter()
        .map(|b| {
            carry
                .get(&b.name)
                .or_else(|| named.get(&b.name))
                .map(|t| t.data.as_slice())
                .ok_or_else(|| PipelineError::Internal(format!("stage input `{}` missing", b.name)))
        })
        .collect()
}

fn outputs(program: &Program, data: Vec<Vec<f32>>) -> BTreeMap<String, HostTensor> {
    program
        .outputs
        .iter()
        .zip(data)
        .map(|((n, v), d)| {
            (
                n.clone(),
                HostTensor::new(program.values[*v].shape.clone(), d),
            )
        })
        .collect()
}

/// A piece of this rank's stage, ready to run: both programs placed on the stage's ranks,
/// and the displaced attentions' state they share.
struct PieceRun<'a> {
    piece: &'a Piece,
    warm: CpuExecutor,
    patch: CpuExecutor,
    state: StaleState,
}

impl<'a> PieceRun<'a> {
    fn new(
        piece: &'a Piece,
        rank: usize,
        ranks: Vec<usize>,
        patches: usize,
    ) -> Result<Self, PipelineError> {
        let warm = CpuExecutor::placed(
            piece.warm.clone(),
            piece.warm_weights.clone(),
            rank,
            Placement::on(ranks.clone()),
        )
        .map_err(run_err)?;
        let patch = CpuExecutor::placed(
            piece.patch.clone(),
            piece.patch_weights.clone(),
            rank,
            Placement { patches, ranks },
        )
        .map_err(run_err)?;
        Ok(PieceRun {
            piece,
            warm,
            patch,
            state: StaleState::default(),
        })
    }

    fn run(
        &mut self,
        unit: Unit,
        carry: &BTreeMap<String, HostTensor>,
        named: &BTreeMap<String, HostTensor>,
        comm: &mut dyn Communicator,
    ) -> Result<BTreeMap<String, HostTensor>, PipelineError> {
        let (exec, program) = match unit.patch {
            None => (&mut self.warm, &self.piece.warm),
            Some(_) => (&mut self.patch, &self.piece.patch),
        };
        // A warmup step gathers every layer's K/V exactly; a patch writes its own.
        self.state.mode = match unit.patch {
            None => StaleMode::Exact,
            Some(_) => StaleMode::Stale,
        };
        self.state.patch = unit.patch;
        let args = bind(program, carry, named)?;
        let out = exec
            .run_placed(&args, &mut self.state, Some(comm))
            .map_err(run_err)?;
        Ok(outputs(program, out))
    }
}

/// Full-size zero tensors for the `carry.*` values a program takes (`inputs`) or gives.
fn zero_streams(program: &Program, inputs: bool) -> BTreeMap<String, HostTensor> {
    let named: Vec<(String, Vec<usize>)> = if inputs {
        program
            .inputs
            .iter()
            .map(|b| (b.name.clone(), b.shape.clone()))
            .collect()
    } else {
        program
            .outputs
            .iter()
            .map(|(n, v)| (n.clone(), program.values[*v].shape.clone()))
            .collect()
    };
    named
        .into_iter()
        .filter(|(n, _)| n.starts_with("carry."))
        .map(|(n, shape)| {
            let len = shape.iter().product();
            (n, HostTensor::new(shape, vec![0.0; len]))
        })
        .collect()
}

/// What one rank ends with.
pub(super) struct RankResult {
    pub rank: usize,
    /// The final latents (rank 0 of the last stage).
    pub latents: Option<HostTensor>,
    pub kv_bytes: u64,
    pub comm: CommStats,
    /// What the step cache decided (rank 0 of stage 0, with a cache).
    pub cache: Option<CacheReport>,
}

/// Sends the rows `rows_of` selects of each tensor, one message per tensor.
fn send_rows(
    comm: &mut dyn Communicator,
    to: usize,
    tensors: &[&HostTensor],
    rows_of: RowsOf,
    tag_of: &dyn Fn(usize) -> u64,
) -> Result<(), PipelineError> {
    for (j, t) in tensors.iter().enumerate() {
        let r = rows_of(&t.shape);
        comm.send(to, tag_of(j), &rows::gather(&t.data, &r))
            .map_err(comm_err)?;
    }
    Ok(())
}

/// Receives into the rows `rows_of` selects of each tensor.
fn recv_rows(
    comm: &mut dyn Communicator,
    from: usize,
    tensors: &mut [&mut HostTensor],
    rows_of: RowsOf,
    tag_of: &dyn Fn(usize) -> u64,
) -> Result<(), PipelineError> {
    for (j, t) in tensors.iter_mut().enumerate() {
        let r = rows_of(&t.shape);
        let mut buf = vec![0.0; rows::count(&r)];
        comm.recv(from, tag_of(j), &mut buf).map_err(comm_err)?;
        rows::scatter(&mut t.data, &r, &buf);
    }
    Ok(())
}

/// One rank's whole generation; `reporter` sends each step to `progress` as this rank
/// finishes it.
pub(super) fn run_rank(
    stages: &Stages,
    run: &Run,
    comm: &mut dyn Communicator,
    progress: &mpsc::Sender<StepDone>,
    reporter: bool,
) -> Result<RankResult, PipelineError> {
    let group = stages.mesh.world_size();
    let (s, g) = (comm.rank() / group, comm.rank() % group);
    let p = stages.stages.len();
    let m = stages.layout.patches;
    let last = p - 1;
    let st = &stages.stages[s];
    let peer = |stage: usize| stage * group + g;
    let stage_ranks: Vec<usize> = (s * group..(s + 1) * group).collect();
    let geo = Geometry {
        mesh: stages.mesh,
        patches: m,
        rank: g,
    };
    let mut pieces = st
        .pieces
        .iter()
        .map(|pc| PieceRun::new(pc, g, stage_ranks.clone(), m))
        .collect::<Result<Vec<_>, _>>()?;
    let has_front = pieces
        .first()
        .is_some_and(|pc| pc.piece.role == Role::Front);
    let has_tail = pieces.last().is_some_and(|pc| pc.piece.role == Role::Tail);
    let caching = run.cache.is_some() && stages.cut != super::CacheCut::None;
    let mut sched = if s == last {
        let taken = run
            .schedulers
            .lock()
            .map_err(|_| PipelineError::Internal("scheduler lock poisoned".into()))?
            .pop();
        Some(taken.ok_or_else(|| {
            PipelineError::Internal("no scheduler for a rank of the last stage".into())
        })?)
    } else {
        None
    };
    let mut decider = match (&run.cache, has_front) {
        (Some(c), true) => Some(Decider::new(
            c.policy.clone(),
            c.rescale.clone(),
            stages.modulated.clone(),
            m,
        )),
        _ => None,
    };
    let mut residuals = Residuals::default();
    let mut latents = run.latents.clone();
    let lat_axis = latent_row_axis(run.family);
    let mut batch = BatchInputs {
        inputs: run.batch.inputs.clone(),
        shapes: run.batch.shapes,
        cfg: run.batch.cfg,
    };
    // The streams this stage receives, full size; in a unit only this rank's rows of it
    // are fresh (the programs read those only).
    let mut carry = match pieces.first() {
        Some(pc) if s > 0 => zero_streams(&pc.piece.warm, true),
        _ => BTreeMap::new(),
    };
    // The last stage's copy of stage 0's front output (the cache's base), this rank's rows.
    let mut base: Vec<HostTensor> = match (caching, s == last && p > 1) {
        (true, true) => {
            let front = &stages.stages[0].pieces[0].warm;
            zero_streams(front, false).into_values().collect()
        }
        _ => Vec::new(),
    };
    let own = |shape: &[usize], unit: Unit| geo.own_rows(shape, unit);
    let n = run.timesteps.len();
    let warmup = stages.layout.warmup_steps.min(n);
    for (step, &t) in run.timesteps.iter().enumerate() {
        let started = Instant::now();
        // After a warmup step the last stage sends stage 0 the whole latents; after a
        // patch step, each patch as soon as it is stepped.
        let whole_latents_due = step > 0 && step - 1 < warmup && p > 1;
        if s == 0 && whole_latents_due {
            comm.recv(
                peer(last),
                tag(step, Unit::whole(), KIND_LATENTS),
                &mut latents.data,
            )
            .map_err(comm_err)?;
        }
        let units: Vec<Unit> = if step < warmup {
            vec![Unit::whole()]
        } else {
            (0..m).map(Unit::patch).collect()
        };
        for unit in units {
            let lat_rows = geo.unit_rows(&latents.shape, lat_axis, unit);
            if s == 0 && unit.patch.is_some() && p > 1 && step > 0 && !whole_latents_due {
                let mut buf = vec![0.0; rows::count(&lat_rows)];
                comm.recv(peer(last), tag(step, unit, KIND_LATENTS), &mut buf)
                    .map_err(comm_err)?;
                rows::scatter(&mut latents.data, &lat_rows, &buf);
            }
            if s == 0 {
                batch.set_step(run.family, &latents, t);
            } else {
                batch.set_timestep(run.family, t);
            }

            // Stage 0's front and the cache's decision, sent to every other stage.
            let mut compute = true;
            let mut current: Option<BTreeMap<String, HostTensor>> = None;
            let mut front_base = Vec::new();
            let mut first_blocks = 0;
            if has_front {
                let out = pieces[0].run(unit, &BTreeMap::new(), &batch.inputs, comm)?;
                let decider = decider
                    .as_mut()
                    .ok_or_else(|| PipelineError::Internal("a front without a cache".into()))?;
                compute = decider.decide(step, n, unit, &out, &geo)?;
                for other in 1..p {
                    comm.send(
                        peer(other),
                        tag(step, unit, KIND_DECISION),
                        &[if compute { 1.0 } else { 0.0 }],
                    )
                    .map_err(comm_err)?;
                }
                front_base = carried(&out);
                if p > 1 {
                    let refs: Vec<&HostTensor> = front_base.iter().collect();
                    send_rows(comm, peer(last), &refs, &|sh| own(sh, unit), &|j| {
                        tag(step, unit, KIND_BASE + j as u64)
                    })?;
                }
                current = Some(out);
                first_blocks = 1;
            } else if caching {
                let mut d = [0.0f32];
                comm.recv(peer(0), tag(step, unit, KIND_DECISION), &mut d)
                    .map_err(comm_err)?;
                compute = d[0] != 0.0;
            }

            let blocks_end = if has_tail {
                pieces.len() - 1
            } else {
                pieces.len()
            };
            if compute {
                if s > 0 {
                    let mut bufs: Vec<&mut HostTensor> = carry.values_mut().collect();
                    recv_rows(comm, peer(s - 1), &mut bufs, &|sh| own(sh, unit), &|j| {
                        tag(step, unit, j as u64)
                    })?;
                }
                for pc in &mut pieces[first_blocks..blocks_end] {
                    let input = current.as_ref().unwrap_or(&carry);
                    let out = pc.run(unit, input, &batch.inputs, comm)?;
                    current = Some(out);
                }
                if s < last {
                    let out = current.as_ref().ok_or_else(|| {
                        PipelineError::Internal("a PipeFusion stage ran no piece".into())
                    })?;
                    let streams = carried(out);
                    let refs: Vec<&HostTensor> = streams.iter().collect();
                    send_rows(comm, peer(s + 1), &refs, &|sh| own(sh, unit), &|j| {
                        tag(step, unit, j as u64)
                    })?;
                }
            }
            if s < last {
                continue;
            }

            // The last stage: the cache's residual, the tail, guidance and the scheduler.
            if has_tail {
                if p > 1 {
                    let mut bufs: Vec<&mut HostTensor> = base.iter_mut().collect();
                    recv_rows(comm, peer(0), &mut bufs, &|sh| own(sh, unit), &|j| {
                        tag(step, unit, KIND_BASE + j as u64)
                    })?;
                }
                let base_now: &[HostTensor] = if p > 1 { &base } else { &front_base };
                let stack_out = if compute {
                    let out = current.take().ok_or_else(|| {
                        PipelineError::Internal("the blocks gave no output".into())
                    })?;
                    residuals.store(base_now, &carried(&out), &|sh| own(sh, unit))?;
                    out
                } else {
                    as_carry(residuals.apply(base_now, &|sh| own(sh, unit))?)
                };
                let tail = pieces.len() - 1;
                current = Some(pieces[tail].run(unit, &stack_out, &batch.inputs, comm)?);
            }
            let out = current.ok_or_else(|| {
                PipelineError::Internal("the last PipeFusion stage ran no piece".into())
            })?;
            let sample = out.get("sample").ok_or_else(|| {
                PipelineError::Internal("the last PipeFusion stage gave no `sample`".into())
            })?;
            let eps = run.mix.apply(sample)?;
            let sched = sched
                .as_mut()
                .ok_or_else(|| PipelineError::Internal("the last stage has no scheduler".into()))?;
            let full_len = latents.data.len();
            let step_err = |error| PipelineError::Scheduler {
                path: run.scheduler_path.into(),
                error,
            };
            match unit.patch {
                None => sched
                    .step(&eps, step, &mut latents.data)
                    .map_err(step_err)?,
                Some(_) => {
                    for &(o, len) in &lat_rows {
                        let (e, x) = (&eps[o..o + len], &mut latents.data[o..o + len]);
                        sched
                            .step_slice(e, step, x, o, full_len)
                            .map_err(step_err)?;
                    }
                }
            }
            if p > 1 && step + 1 < n {
                let next = step + 1;
                let data = rows::gather(&latents.data, &lat_rows);
                comm.send(peer(0), tag(next, unit, KIND_LATENTS), &data)
                    .map_err(comm_err)?;
            }
        }
        if reporter {
            let _ = progress.send(StepDone {
                step,
                seconds: started.elapsed().as_secs_f64(),
                latents: latents.clone(),
            });
        }
    }
    // One process per rank: every process decodes the final latents itself.
    let multi_process = run.one_process_per_rank;
    if multi_process && p > 1 {
        if s == last {
            for other in 0..last {
                comm.send(
                    peer(other),
                    tag(n, Unit::whole(), KIND_LATENTS),
                    &latents.data,
                )
                .map_err(comm_err)?;
            }
        } else {
            comm.recv(
                peer(last),
                tag(n, Unit::whole(), KIND_LATENTS),
                &mut latents.data,
            )
            .map_err(comm_err)?;
        }
    }
    let cache = match (&decider, g == 0, &run.cache) {
        (Some(d), true, Some(c)) => Some(CacheReport::from_patches(
            c.policy.clone(),
            &d.log,
            c.rescale.as_ref().map(|r| r.source.clone()),
        )),
        _ => None,
    };
    let keeps_latents = (s == last && g == 0) || (multi_process && reporter);
    Ok(RankResult {
        rank: comm.rank(),
        latents: keeps_latents.then_some(latents),
        kv_bytes: pieces.iter().map(|pc| pc.state.kv_bytes() as u64).sum(),
        comm: comm.stats().clone(),
        cache,
    })
}
