//! PipeFusion: the transformer's blocks split into pipeline stages (one rank each, holding
//! only its stage's weights), the image into row patches that flow through the stages one
//! after another, so stage s works on patch i while stage s+1 works on patch i-1.
//!
//! Each attention writes its patch's fresh K/V into a per-layer buffer of the whole image
//! and attends to all of it: the other patches are one step stale, or already fresh when
//! they went through this layer earlier in the step (the displaced attention of
//! `ditto_runtime::parallel::stale`, run in virtual mode: one executor plays every patch).
//! The last stage applies guidance and steps the scheduler on its patch (multistep
//! schedulers keep full-size history; a step's patches all finish before the next step's
//! start), then sends the patch back to stage 0: the stages form a ring.
//!
//! Warmup steps run the whole image through all stages exactly (a 1-part program of the
//! same stage graph, filling every layer's buffer), so with `warmup_steps >= steps` the
//! result is the serial one. Per step, stage s sends one activation (its patches' carried
//! streams) to stage s+1 and the last stage sends the latents to stage 0: far less than
//! sequence parallelism's K/V traffic per layer.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

use ditto_codegen::Program;
use ditto_ir::cut::{carry_name, Span};
use ditto_ir::mesh::Mesh;
use ditto_ir::Op;
use ditto_models::Shapes;
use ditto_passes::MethodChoice;
use ditto_runtime::comm::{run_ranks, CommStats, Communicator};
use ditto_runtime::cpu::executor::{CpuExecutor, Weights};
use ditto_runtime::parallel::stale::{StaleMode, StaleState};
use ditto_runtime::scheduler::Scheduler;

use super::conditioning::{BatchInputs, FamilyConfig};
use super::guidance::Guidance;
use super::{PipelineError, Progress};
use crate::parallel::RankOptions;
use crate::{CompileOptions, HostTensor, Model, Parallel};

/// A PipeFusion layout (`--pipefusion-degree`, `--num-pipeline-patch`,
/// `--attn-layer-num-for-pp`, `--warmup-steps`).
#[derive(Clone, Debug, PartialEq)]
pub struct PipeFusion {
    /// Pipeline stages P (ranks).
    pub stages: usize,
    /// Row patches M the image is cut into.
    pub patches: usize,
    /// Blocks per stage (summing to the model's blocks); `None`: balanced by estimated cost.
    pub blocks_per_stage: Option<Vec<usize>>,
    /// Steps run exactly, the whole image through all stages.
    pub warmup_steps: usize,
}

/// What a PipeFusion generation did, per rank (= stage), for `--report`.
#[derive(Clone, Debug, Default)]
pub struct PipeFusionReport {
    pub stage_blocks: Vec<Range<usize>>,
    /// Bytes of the weights each rank loaded.
    pub weight_bytes: Vec<u64>,
    /// Bytes of each rank's K/V buffers at the end of the generation.
    pub kv_bytes: Vec<u64>,
    /// What each rank sent over the whole generation.
    pub comm: Vec<CommStats>,
    /// What each rank sends in one patch-wise (non-warmup) step, from the shapes alone.
    pub analytic_step_bytes: Vec<u64>,
    /// What each rank sends in one warmup step, from the shapes alone.
    pub analytic_warmup_bytes: Vec<u64>,
    pub steps: usize,
    pub warmup_steps: usize,
}

/// One stage's programs: the whole image (warmup) and one patch (virtual ranks over the
/// patches); both compiled from the same stage graph, so their displaced attentions match.
pub(crate) struct Stage {
    blocks: Range<usize>,
    warm: Arc<Program>,
    warm_weights: Weights,
    patch: Arc<Program>,
    patch_weights: Weights,
    weight_bytes: u64,
}

/// The compiled stages of one input shape.
pub(crate) struct Stages {
    pub(crate) shapes: Shapes,
    pub(crate) layout: PipeFusion,
    stages: Vec<Stage>,
}

/// Estimated FLOPs of each block (its GEMMs and attentions), for balancing the stages.
pub fn block_costs(model: &Model, shapes: &Shapes) -> Result<Vec<f64>, crate::Error> {
    let full = model.graph(shapes, false)?;
    let mut costs = Vec::with_capacity(full.num_blocks());
    for b in 0..full.num_blocks() {
        let g = full.part(
            Span {
                from: Some(b),
                to: Some(b + 1),
            },
            &[],
        )?;
        let mut flops = 0.0;
        for (i, n) in g.nodes().iter().enumerate() {
            let out: f64 = g.shape(i.into()).iter().product::<usize>() as f64;
            match n {
                Op::Linear(ch) => flops += 2.0 * out * g.shape(ch[1])[1] as f64,
                Op::LinearBias(ch) => flops += 2.0 * out * g.shape(ch[1])[1] as f64,
                Op::Attention(ch) => {
                    let (q, k) = (g.shape(ch[0]), g.shape(ch[1]));
                    flops += 4.0 * (q[0] * q[1] * k[1] * q[2]) as f64;
                }
                _ => {}
            }
        }
        costs.push(flops);
    }
    Ok(costs)
}

/// Contiguous block ranges for `stages` stages minimizing the largest stage cost.
pub fn balance(costs: &[f64], stages: usize) -> Vec<Range<usize>> {
    let n = costs.len();
    let prefix: Vec<f64> = std::iter::once(0.0)
        .chain(costs.iter().scan(0.0, |s, &c| {
            *s += c;
            Some(*s)
        }))
        .collect();
    // best[k][j]: the smallest largest-stage cost of blocks 0..j in k stages.
    let inf = f64::INFINITY;
    let mut best = vec![vec![inf; n + 1]; stages + 1];
    let mut cut = vec![vec![0usize; n + 1]; stages + 1];
    best[0][0] = 0.0;
    for k in 1..=stages {
        for j in k..=n {
            for i in (k - 1)..j {
                let c = best[k - 1][i].max(prefix[j] - prefix[i]);
                if c < best[k][j] {
                    best[k][j] = c;
                    cut[k][j] = i;
                }
            }
        }
    }
    let mut ranges = vec![0..0; stages];
    let mut j = n;
    for k in (1..=stages).rev() {
        let i = cut[k][j];
        ranges[k - 1] = i..j;
        j = i;
    }
    ranges
}

impl PipeFusion {
    /// Checks the layout against a model of `blocks` blocks and returns the stage ranges.
    pub fn stage_blocks(
        &self,
        model: &Model,
        shapes: &Shapes,
    ) -> Result<Vec<Range<usize>>, PipelineError> {
        let err = |m: String| PipelineError::Request(m);
        let costs = block_costs(model, shapes)
            .map_err(|e| PipelineError::model("planning PipeFusion stages", e))?;
        let blocks = costs.len();
        if self.stages == 0 || self.patches == 0 {
            return Err(err(
                "--pipefusion-degree and --num-pipeline-patch must be at least 1".into(),
            ));
        }
        if self.stages > blocks {
            return Err(err(format!(
                "--pipefusion-degree {} is more stages than the model's {blocks} block(s)",
                self.stages
            )));
        }
        match &self.blocks_per_stage {
            None => Ok(balance(&costs, self.stages)),
            Some(counts) => {
                if counts.len() != self.stages || counts.iter().sum::<usize>() != blocks {
                    return Err(err(format!(
                        "--attn-layer-num-for-pp {counts:?} must give {} stage(s) summing to the model's {blocks} block(s)",
                        self.stages
                    )));
                }
                if counts.contains(&0) {
                    return Err(err(format!(
                        "--attn-layer-num-for-pp {counts:?}: every stage needs at least one block"
                    )));
                }
                let mut start = 0;
                Ok(counts
                    .iter()
                    .map(|&c| {
                        start += c;
                        start - c..start
                    })
                    .collect())
            }
        }
    }
}

fn stage_program(
    model: &Model,
    graph: ditto_ir::Graph,
    mesh: Mesh,
    parallel: &Parallel,
) -> Result<(Arc<Program>, Weights), crate::Error> {
    let opts = CompileOptions {
        parallel: Parallel {
            mesh,
            choice: MethodChoice::Stale,
            ..parallel.clone()
        },
        ..Default::default()
    };
    let compiled = model.compile_graph(graph, &opts)?;
    let weights = model.load_weights(&compiled.program)?;
    Ok((Arc::new(compiled.program), weights))
}

/// Compiles every stage for `shapes`.
pub(crate) fn compile_stages(
    model: &Model,
    shapes: &Shapes,
    layout: &PipeFusion,
    parallel: &Parallel,
) -> Result<Stages, PipelineError> {
    let ranges = layout.stage_blocks(model, shapes)?;
    let p = ranges.len();
    let component = |e: crate::Error| PipelineError::model("PipeFusion stage", e);
    let mut stages = Vec::with_capacity(p);
    for (s, blocks) in ranges.into_iter().enumerate() {
        let span = Span {
            from: (s > 0).then_some(blocks.start),
            to: (s + 1 < p).then_some(blocks.end),
        };
        let graph = model.part_graph(shapes, span, &[]).map_err(component)?;
        let (warm, warm_weights) =
            stage_program(model, graph.clone(), Mesh::default(), parallel).map_err(component)?;
        let patch_mesh = Mesh {
            cfg: 1,
            ring: layout.patches,
            ulysses: 1,
        };
        let (patch, mut patch_weights) =
            stage_program(model, graph, patch_mesh, parallel).map_err(component)?;
        // One copy of the stage's weights when both programs list them alike.
        if warm.weights == patch.weights {
            patch_weights = warm_weights.clone();
        }
        let weight_bytes = 4 * warm
            .weights
            .iter()
            .map(|b| b.shape.iter().product::<usize>() as u64)
            .sum::<u64>();
        stages.push(Stage {
            blocks,
            warm,
            warm_weights,
            patch,
            patch_weights,
            weight_bytes,
        });
    }
    Ok(Stages {
        shapes: *shapes,
        layout: layout.clone(),
        stages,
    })
}

/// Row bands of the patches, over tensors whose axis `axis` (of `shape`) is cut in
/// `parts` equal slots: the flat (offset, len) ranges of slot `i`.
fn slot_ranges(shape: &[usize], axis: usize, parts: usize, i: usize) -> Vec<(usize, usize)> {
    let outer: usize = shape[..axis].iter().product();
    let rows = shape[axis];
    let inner: usize = shape[axis + 1..].iter().product();
    let per = rows / parts;
    (0..outer)
        .map(|o| ((o * rows + i * per) * inner, per * inner))
        .collect()
}

fn gather_ranges(data: &[f32], ranges: &[(usize, usize)]) -> Vec<f32> {
    let mut out = Vec::with_capacity(ranges.iter().map(|r| r.1).sum());
    for &(o, n) in ranges {
        out.extend_from_slice(&data[o..o + n]);
    }
    out
}

fn scatter_ranges(data: &mut [f32], ranges: &[(usize, usize)], src: &[f32]) {
    let mut at = 0;
    for &(o, n) in ranges {
        data[o..o + n].copy_from_slice(&src[at..at + n]);
        at += n;
    }
}

/// Which axis of the latents holds the rows the patches cut: the image rows ([B, C, H, W]),
/// or the tokens of packed latents (Flux, [B, S, C]).
fn latent_row_axis(family: &FamilyConfig) -> usize {
    match family {
        FamilyConfig::Flux(_) => 1,
        _ => 2,
    }
}

/// Checks that the patches cut every token stream and the latents evenly.
fn check_patches(
    stages: &Stages,
    family: &FamilyConfig,
    latent_shape: &[usize],
) -> Result<(), PipelineError> {
    let m = stages.layout.patches;
    let axis = latent_row_axis(family);
    let rows = latent_shape[axis] / family.patch().max(1);
    let rows = match family {
        FamilyConfig::Flux(_) => latent_shape[axis],
        _ => rows,
    };
    if rows % m != 0 {
        return Err(PipelineError::Request(format!(
            "PipeFusion cuts the image into {m} row patches, but its {rows} token rows do not divide by {m}"
        )));
    }
    for st in &stages.stages {
        for b in &st.warm.inputs {
            if b.name.starts_with("carry.") && b.shape.get(1).is_some_and(|s| s % m != 0) {
                return Err(PipelineError::Request(format!(
                    "PipeFusion cuts every token stream into {m} patches, but `{}` has {} tokens",
                    b.name, b.shape[1]
                )));
            }
        }
    }
    Ok(())
}

/// Everything a rank's loop needs besides its stage.
pub(crate) struct Run<'a> {
    pub family: &'a FamilyConfig,
    pub batch: &'a BatchInputs,
    pub mix: Guidance,
    pub timesteps: &'a [f32],
    pub latents: &'a HostTensor,
    pub scheduler_path: &'a std::path::Path,
    /// The prepared scheduler; the last stage takes it.
    pub scheduler: std::sync::Mutex<Option<Box<dyn Scheduler>>>,
}

/// Messages from the last stage to the caller's thread (progress).
struct StepDone {
    step: usize,
    seconds: f64,
    latents: HostTensor,
}

const TAG_LATENTS: u64 = 15;

fn tag(step: usize, patch: usize, kind: u64) -> u64 {
    ((step as u64 * 4096 + patch as u64) << 4) | kind
}

fn comm_err(e: ditto_runtime::comm::CommError) -> PipelineError {
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

/// What one rank ends with.
struct RankResult {
    /// The final latents (the last stage).
    latents: Option<HostTensor>,
    kv_bytes: u64,
    comm: CommStats,
}

/// One rank's whole generation.
fn run_rank(
    stages: &Stages,
    run: &Run,
    comm: &mut dyn Communicator,
    progress: &mpsc::Sender<StepDone>,
) -> Result<RankResult, PipelineError> {
    let rank = comm.rank();
    let p = stages.stages.len();
    let m = stages.layout.patches;
    let last = p - 1;
    let st = &stages.stages[rank];
    let mut warm = CpuExecutor::new(st.warm.clone(), st.warm_weights.clone()).map_err(run_err)?;
    let mut patch =
        CpuExecutor::virtual_ranks(st.patch.clone(), st.patch_weights.clone()).map_err(run_err)?;
    let mut state = StaleState::default();
    let mut sched = if rank == last {
        let taken = run
            .scheduler
            .lock()
            .map_err(|_| PipelineError::Internal("scheduler lock poisoned".into()))?
            .take();
        Some(
            taken
                .ok_or_else(|| PipelineError::Internal("no scheduler for the last stage".into()))?,
        )
    } else {
        None
    };
    let mut latents = run.latents.clone();
    let lat_axis = latent_row_axis(run.family);
    let mut batch = BatchInputs {
        inputs: run.batch.inputs.clone(),
        shapes: run.batch.shapes,
        cfg: run.batch.cfg,
    };
    // The streams this stage receives, full size; in a patch step only the current
    // patch's rows are fresh.
    let mut carry: BTreeMap<String, HostTensor> = st
        .warm
        .inputs
        .iter()
        .filter(|b| b.name.starts_with("carry."))
        .map(|b| {
            let n = b.shape.iter().product();
            (
                b.name.clone(),
                HostTensor::new(b.shape.clone(), vec![0.0; n]),
            )
        })
        .collect();
    let n = run.timesteps.len();
    let warmup = stages.layout.warmup_steps.min(n);
    for (step, &t) in run.timesteps.iter().enumerate() {
        let started = Instant::now();
        let exact = step < warmup;
        // After a warmup step the last stage sends stage 0 the whole latents; after a
        // patch step, each patch as soon as it is stepped.
        let whole_latents_due = step > 0 && step - 1 < warmup && p > 1;
        if rank == 0 && whole_latents_due {
            comm.recv(last, tag(step, 0, TAG_LATENTS), &mut latents.data)
                .map_err(comm_err)?;
        }
        let patches: Vec<Option<usize>> = if exact {
            vec![None]
        } else {
            (0..m).map(Some).collect()
        };
        for &pi in &patches {
            let lat_ranges = pi.map(|i| slot_ranges(&latents.shape, lat_axis, m, i));
            if let (0, Some(r), Some(i)) = (rank, &lat_ranges, pi) {
                if p > 1 && step > 0 && !whole_latents_due {
                    let mut buf = vec![0.0; r.iter().map(|x| x.1).sum()];
                    comm.recv(last, tag(step, i, TAG_LATENTS), &mut buf)
                        .map_err(comm_err)?;
                    scatter_ranges(&mut latents.data, r, &buf);
                }
            }
            if rank > 0 {
                for (j, t) in carry.values_mut().enumerate() {
                    let kind = j as u64;
                    match pi {
                        None => comm.recv(rank - 1, tag(step, 0, kind), &mut t.data),
                        Some(i) => {
                            let r = slot_ranges(&t.shape, 1, m, i);
                            let mut buf = vec![0.0; r.iter().map(|x| x.1).sum()];
                            let res = comm.recv(rank - 1, tag(step, i, kind), &mut buf);
                            scatter_ranges(&mut t.data, &r, &buf);
                            res
                        }
                    }
                    .map_err(comm_err)?;
                }
            }
            if rank == 0 {
                batch.set_step(run.family, &latents, t);
            } else {
                batch.set_timestep(run.family, t);
            }
            let (program, out) = match pi {
                None => {
                    state.mode = StaleMode::Exact;
                    state.virtual_rank = None;
                    let args = bind(&st.warm, &carry, &batch.inputs)?;
                    let out = warm.run_with_state(&args, &mut state).map_err(run_err)?;
                    (&st.warm, out)
                }
                Some(i) => {
                    state.mode = StaleMode::Stale;
                    state.virtual_rank = Some(i);
                    let args = bind(&st.patch, &carry, &batch.inputs)?;
                    let out = patch.run_with_state(&args, &mut state).map_err(run_err)?;
                    (&st.patch, out)
                }
            };
            let out = outputs(program, out);
            if rank < last {
                for (j, name) in (0..).map(|j| (j, carry_name(j))) {
                    let Some(t) = out.get(&name) else { break };
                    let kind = j as u64;
                    match pi {
                        None => comm.send(rank + 1, tag(step, 0, kind), &t.data),
                        Some(i) => {
                            let r = slot_ranges(&t.shape, 1, m, i);
                            comm.send(rank + 1, tag(step, i, kind), &gather_ranges(&t.data, &r))
                        }
                    }
                    .map_err(comm_err)?;
                }
                continue;
            }
            // The last stage: guidance and the scheduler on this patch (or the whole image).
            let sample = out.get("sample").ok_or_else(|| {
                PipelineError::Internal("the last PipeFusion stage gave no `sample`".into())
            })?;
            let eps = run.mix.apply(sample)?;
            let sched = sched.as_mut().expect("the last stage has the scheduler");
            let full_len = latents.data.len();
            let step_err = |error| PipelineError::Scheduler {
                path: run.scheduler_path.into(),
                error,
            };
            match &lat_ranges {
                None => sched
                    .step(&eps, step, &mut latents.data)
                    .map_err(step_err)?,
                Some(r) => {
                    for &(o, len) in r {
                        let (e, x) = (&eps[o..o + len], &mut latents.data[o..o + len]);
                        sched
                            .step_slice(e, step, x, o, full_len)
                            .map_err(step_err)?;
                    }
                }
            }
            if p > 1 && step + 1 < n {
                match (&lat_ranges, pi) {
                    (Some(r), Some(i)) => comm.send(
                        0,
                        tag(step + 1, i, TAG_LATENTS),
                        &gather_ranges(&latents.data, r),
                    ),
                    _ => comm.send(0, tag(step + 1, 0, TAG_LATENTS), &latents.data),
                }
                .map_err(comm_err)?;
            }
        }
        if rank == last {
            let _ = progress.send(StepDone {
                step,
                seconds: started.elapsed().as_secs_f64(),
                latents: latents.clone(),
            });
        }
    }
    Ok(RankResult {
        latents: (rank == last).then_some(latents),
        kv_bytes: state.kv_bytes() as u64,
        comm: comm.stats().clone(),
    })
}

/// Runs the denoising loop of one generation over the stages (in-process ranks), reporting
/// each step as the last stage finishes it. Returns the final latents and the report.
pub(crate) fn denoise(
    stages: &Stages,
    run: &Run,
    opts: &RankOptions,
    on_progress: &mut dyn FnMut(Progress),
) -> Result<(HostTensor, Vec<f64>, PipeFusionReport), PipelineError> {
    check_patches(stages, run.family, &run.latents.shape)?;
    if opts.comm.is_some() {
        return Err(PipelineError::Request(
            "PipeFusion runs its stages as ranks of this process; multi-process launch is not supported for it yet".into(),
        ));
    }
    let p = stages.stages.len();
    let (tx, rx) = mpsc::channel::<StepDone>();
    let mut step_seconds = Vec::new();
    let results = std::thread::scope(|scope| {
        let worker = scope.spawn(move || {
            run_ranks(p, opts.timeout, |mut comm| {
                let tx = tx.clone();
                run_rank(stages, run, &mut comm, &tx)
            })
        });
        for done in rx {
            step_seconds.push(done.seconds);
            on_progress(Progress::Step {
                step: done.step,
                num_steps: run.timesteps.len(),
                timestep: run.timesteps[done.step],
                latents: &done.latents,
                seconds: done.seconds,
            });
        }
        worker.join()
    })
    .map_err(|_| PipelineError::Internal("the PipeFusion ranks panicked".into()))?
    .map_err(|e| PipelineError::model("PipeFusion", crate::Error::Rank(e.to_string())))?;
    let mut report = PipeFusionReport {
        stage_blocks: stages.stages.iter().map(|s| s.blocks.clone()).collect(),
        weight_bytes: stages.stages.iter().map(|s| s.weight_bytes).collect(),
        steps: run.timesteps.len(),
        warmup_steps: stages.layout.warmup_steps.min(run.timesteps.len()),
        ..Default::default()
    };
    let mut latents = None;
    for r in results {
        report.kv_bytes.push(r.kv_bytes);
        report.comm.push(r.comm);
        if r.latents.is_some() {
            latents = r.latents;
        }
    }
    // Per step, each stage sends its carried streams once (patch by patch, or whole in a
    // warmup step) and the last stage sends the latents back to stage 0.
    for (s, st) in stages.stages.iter().enumerate() {
        let bytes = if s + 1 < p {
            st.warm
                .outputs
                .iter()
                .filter(|(n, _)| n.starts_with("carry."))
                .map(|(_, v)| 4 * st.warm.values[*v].numel() as u64)
                .sum()
        } else if p > 1 {
            4 * run.latents.data.len() as u64
        } else {
            0
        };
        report.analytic_step_bytes.push(bytes);
        report.analytic_warmup_bytes.push(bytes);
    }
    let latents =
        latents.ok_or_else(|| PipelineError::Internal("no stage returned the latents".into()))?;
    Ok((latents, step_seconds, report))
}
