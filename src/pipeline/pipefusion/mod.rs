//! PipeFusion: the transformer's blocks split into pipeline stages (each holding only its
//! stage's weights), the image into row patches that flow through the stages one after
//! another, so stage s works on patch i while stage s+1 works on patch i-1.
//!
//! Each attention writes its patch's fresh K/V into a per-layer buffer of the whole image
//! and attends to all of it: the other patches are one step stale, or already fresh when
//! they went through this layer earlier in the step (the displaced attention of
//! `ditto_runtime::parallel::stale`, run on virtual patches). The last stage applies
//! guidance and steps the scheduler on its patch (multistep schedulers keep full-size
//! history; a step's patches all finish before the next step's start), then sends the patch
//! back to stage 0: the stages form a ring.
//!
//! **Hybrids.** Each stage may itself be a group of ranks with the pipeline's exact layout
//! (`--ulysses-degree`, `--ring-degree`, `--use-cfg-parallel`): the stage's programs are
//! compiled for that mesh, with the ring axis also cut into the patches
//! ([`Placement`](ditto_runtime::parallel::Placement)), so that a patch's tokens are split
//! over the stage's sequence-parallel ranks and its batch over the CFG pair. Inside an
//! attention the Ulysses members exchange heads exactly, the ring members gather the
//! patch's K/V exactly, and every rank keeps the K/V of the whole image (its share of the
//! heads) for the patches it is not computing. Rank g of stage s talks to rank g of the
//! next stage only, sending the rows its counterpart's programs compute (its CFG half, its
//! piece of the patch).
//!
//! **Step caching** (TeaCache, First-Block-Cache) decides per patch, on stage 0, as each
//! patch's cheap front part (the head, or the head and block 0) is done: a skipped patch
//! does not enter the later blocks at all, and the last stage adds the residual it cached
//! for that patch the last time it was computed. Warmup steps decide on the whole image,
//! so with `warmup_steps >= steps` the cached run is the serial cached run.
//!
//! Warmup steps run the whole image through all stages exactly (a 1-patch program of the
//! same stage graph, filling every layer's buffer), so with `warmup_steps >= steps` the
//! result is the serial one.

mod patch_cache;
mod rank;
mod rows;

use std::ops::Range;
use std::sync::{mpsc, Arc, Mutex};

use ditto_codegen::{Program, Step};
use ditto_ir::cut::Span;
use ditto_ir::mesh::{Mesh, MeshAxis};
use ditto_ir::Op;
use ditto_models::Shapes;
use ditto_passes::MethodChoice;
use ditto_runtime::comm::{run_ranks, CommStats, Communicator};
use ditto_runtime::cpu::executor::Weights;
use ditto_runtime::scheduler::Scheduler;

use super::cache::{self, CachePolicy, CacheReport, TeaCacheRescale, FIRST_IN};
use super::conditioning::{BatchInputs, FamilyConfig};
use super::guidance::Guidance;
use super::{PipelineError, Progress};
use crate::parallel::RankOptions;
use crate::{CompileOptions, HostTensor, Model, Parallel};

/// A PipeFusion layout (`--pipefusion-degree`, `--num-pipeline-patch`,
/// `--attn-layer-num-for-pp`, `--warmup-steps`). The layout inside each stage is the
/// pipeline's [`Parallel`] mesh.
#[derive(Clone, Debug, PartialEq)]
pub struct PipeFusion {
    /// Pipeline stages P.
    pub stages: usize,
    /// Row patches M the image is cut into.
    pub patches: usize,
    /// Blocks per stage (summing to the model's blocks); `None`: balanced by estimated cost.
    pub blocks_per_stage: Option<Vec<usize>>,
    /// Steps run exactly, the whole image through all stages.
    pub warmup_steps: usize,
}

/// What a PipeFusion generation did, per rank (rank = stage x ranks per stage + index in
/// the stage), for `--report`.
#[derive(Clone, Debug, Default)]
pub struct PipeFusionReport {
    pub stage_blocks: Vec<Range<usize>>,
    /// The ranks the per-rank entries below (`weight_bytes`, `kv_bytes`, `comm`) are of:
    /// every rank, or this process's own with one process per rank.
    pub ranks: Vec<usize>,
    /// The layout inside each stage.
    pub stage_mesh: Mesh,
    pub patches: usize,
    /// Bytes of the weights each of `ranks` loaded.
    pub weight_bytes: Vec<u64>,
    /// Bytes of each rank's K/V buffers at the end of the generation.
    pub kv_bytes: Vec<u64>,
    /// What each rank sent over the whole generation.
    pub comm: Vec<CommStats>,
    /// What every rank (by rank) sends in one patch-wise (non-warmup) step, from the shapes:
    /// to the next stage, and inside its stage (attention and gathers).
    pub analytic_step_bytes: Vec<u64>,
    /// The same for a warmup step (the whole image at once).
    pub analytic_warmup_bytes: Vec<u64>,
    /// What each rank sends over the whole generation, from the shapes alone (every step
    /// computed; the last stage sends no latents after the last step).
    pub analytic_total_bytes: Vec<u64>,
    pub steps: usize,
    pub warmup_steps: usize,
}

/// What a piece of a stage is to the step cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// Blocks (and, without a cache, the head of stage 0 and the tail of the last stage).
    Blocks,
    /// Stage 0's part before the decision: the head (TeaCache) or head and block 0
    /// (First-Block-Cache), with the values the decision needs as extra outputs.
    Front,
    /// The last stage's tail (final norm, projection, unpatchify) after the blocks.
    Tail,
}

/// One program pair of a stage: the whole image (warmup) and one patch (placed with
/// virtual patches); both compiled from the same graph, so their displaced attentions match.
pub(crate) struct Piece {
    role: Role,
    warm: Arc<Program>,
    warm_weights: Weights,
    patch: Arc<Program>,
    patch_weights: Weights,
}

pub(crate) struct Stage {
    blocks: Range<usize>,
    /// Run one after the other, each taking the previous one's carried streams.
    pieces: Vec<Piece>,
    weight_bytes: u64,
}

/// Which cache the stages were cut for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CacheCut {
    None,
    TeaCache,
    FirstBlock,
}

impl CacheCut {
    pub(crate) fn of(policy: &CachePolicy) -> CacheCut {
        match policy {
            CachePolicy::None => CacheCut::None,
            CachePolicy::TeaCache { .. } => CacheCut::TeaCache,
            CachePolicy::FirstBlock { .. } => CacheCut::FirstBlock,
        }
    }
}

/// The compiled stages of one input shape.
pub(crate) struct Stages {
    pub(crate) shapes: Shapes,
    pub(crate) layout: PipeFusion,
    /// The layout inside each stage.
    pub(crate) mesh: Mesh,
    pub(crate) cut: CacheCut,
    stages: Vec<Stage>,
    /// TeaCache: the name of block 0's modulated input among the front's outputs.
    modulated: Option<String>,
}

impl Stages {
    /// Whether these stages serve a request (same shapes, layout, stage mesh and cache cut).
    pub(crate) fn fits(
        &self,
        shapes: &Shapes,
        layout: &PipeFusion,
        mesh: Mesh,
        cut: CacheCut,
    ) -> bool {
        self.shapes == *shapes && self.layout == *layout && self.mesh == mesh && self.cut == cut
    }
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
    /// Checks the layout against the model and returns the stage ranges.
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
            stale: None,
            ..parallel.clone()
        },
        ..Default::default()
    };
    let compiled = model.compile_graph(graph, &opts)?;
    let weights = model.load_weights(&compiled.program)?;
    Ok((Arc::new(compiled.program), weights))
}

fn span(from: Option<usize>, to: Option<usize>) -> Span {
    Span { from, to }
}

/// The pieces of stage `s` of `p` over blocks `blocks` of `n`: what the cache cut needs.
fn stage_cuts(
    cut: CacheCut,
    s: usize,
    p: usize,
    blocks: &Range<usize>,
    n: usize,
) -> Vec<(Role, Span)> {
    let (first, last) = (s == 0, s + 1 == p);
    if cut == CacheCut::None {
        let from = (!first).then_some(blocks.start);
        let to = (!last).then_some(blocks.end);
        return vec![(Role::Blocks, span(from, to))];
    }
    let mut v = Vec::new();
    let mut from = blocks.start;
    if first {
        let front_end = if cut == CacheCut::TeaCache { 0 } else { 1 };
        v.push((Role::Front, span(None, Some(front_end))));
        from = front_end;
    }
    if from < blocks.end {
        v.push((Role::Blocks, span(Some(from), Some(blocks.end))));
    }
    if last {
        v.push((Role::Tail, span(Some(n), None)));
    }
    v
}

/// Compiles every stage for `shapes`: `parallel.mesh` is the layout inside each stage.
pub(crate) fn compile_stages(
    model: &Model,
    shapes: &Shapes,
    layout: &PipeFusion,
    parallel: &Parallel,
    cut: CacheCut,
) -> Result<Stages, PipelineError> {
    let ranges = layout.stage_blocks(model, shapes)?;
    let p = ranges.len();
    let component = |e: crate::Error| PipelineError::model("PipeFusion stage", e);
    let mut full = model.graph(shapes, false).map_err(component)?;
    let n = full.num_blocks();
    let mut taps: Vec<String> = Vec::new();
    let mut modulated = None;
    match cut {
        CacheCut::None => {}
        CacheCut::TeaCache => {
            let tap = cache::first_modulated_tap(&full).map_err(part_err)?;
            taps.push(tap.clone());
            modulated = Some(tap);
        }
        CacheCut::FirstBlock => {
            if n < 2 {
                return Err(PipelineError::Request(format!(
                    "First-Block-Cache needs at least 2 blocks (block 0 always runs); this transformer has {n}"
                )));
            }
            for (j, id) in full.boundaries[0].clone().into_iter().enumerate() {
                let name = format!("{FIRST_IN}{j}");
                full.tap(name.clone(), id);
                taps.push(name);
            }
        }
    }
    let mesh = parallel.mesh;
    let patch_mesh = Mesh {
        ring: mesh.ring * layout.patches,
        ..mesh
    };
    let mut stages = Vec::with_capacity(p);
    for (s, blocks) in ranges.into_iter().enumerate() {
        let mut pieces = Vec::new();
        let mut weight_names = std::collections::BTreeSet::new();
        let mut weight_bytes = 0u64;
        for (role, sp) in stage_cuts(cut, s, p, &blocks, n) {
            let names: Vec<&str> = match role {
                Role::Front => taps.iter().map(String::as_str).collect(),
                _ => Vec::new(),
            };
            let graph = full.part(sp, &names).map_err(|e| component(e.into()))?;
            let (warm, warm_weights) =
                stage_program(model, graph.clone(), mesh, parallel).map_err(component)?;
            let (patch, mut patch_weights) =
                stage_program(model, graph, patch_mesh, parallel).map_err(component)?;
            check_pieces_divide(&patch, layout.patches, mesh)?;
            check_reads_own_rows(&warm)?;
            check_reads_own_rows(&patch)?;
            // One copy of the piece's weights when both programs list them alike.
            if warm.weights == patch.weights {
                patch_weights = warm_weights.clone();
            }
            for b in &warm.weights {
                if weight_names.insert(b.name.clone()) {
                    weight_bytes += 4 * b.shape.iter().product::<usize>() as u64;
                }
            }
            pieces.push(Piece {
                role,
                warm,
                warm_weights,
                patch,
                patch_weights,
            });
        }
        stages.push(Stage {
            blocks,
            pieces,
            weight_bytes,
        });
    }
    Ok(Stages {
        shapes: *shapes,
        layout: layout.clone(),
        mesh,
        cut,
        stages,
        modulated,
    })
}

fn part_err(e: cache::PartError) -> PipelineError {
    match e {
        cache::PartError::Model(e) => PipelineError::model("PipeFusion stage", e),
        cache::PartError::Pipeline(e) => e,
    }
}

/// Every token stream must cut into `patches x sp` equal pieces: the stores of the 1-patch
/// and the M-patch programs are then the same unsplit sequence.
fn check_pieces_divide(patch: &Program, patches: usize, mesh: Mesh) -> Result<(), PipelineError> {
    for step in &patch.steps {
        if let Step::Shard {
            mesh: MeshAxis::Sp,
            parts,
            segments,
            ..
        } = step
        {
            for s in segments {
                if s.local * parts != s.valid {
                    return Err(PipelineError::Request(format!(
                        "PipeFusion cuts every token stream into {parts} equal pieces ({patches} \
                         patch(es) x {} sequence-parallel rank(s)), but a stream has {} tokens",
                        mesh.sp(),
                        s.valid
                    )));
                }
            }
        }
    }
    Ok(())
}

/// A stage's carried streams arrive with only this rank's rows fresh (its CFG half, its
/// piece of the patch): the program must read them through its `Shard` steps only.
fn check_reads_own_rows(p: &Program) -> Result<(), PipelineError> {
    for (i, b) in p.inputs.iter().enumerate() {
        if !b.name.starts_with("carry.") {
            continue;
        }
        let Some(v) = p
            .values
            .iter()
            .position(|x| x.storage == ditto_codegen::Storage::Input(i))
        else {
            continue;
        };
        let other = p
            .steps
            .iter()
            .find(|s| !matches!(s, Step::Shard { .. }) && s.operands().contains(&v));
        if let Some(s) = other {
            return Err(PipelineError::Internal(format!(
                "a PipeFusion stage reads its carried stream `{}` whole (in `{}`), not through \
                 its shards",
                b.name,
                s.kind()
            )));
        }
    }
    Ok(())
}

/// Which axis of the latents holds the rows the patches cut: the image rows ([B, C, H, W]),
/// or the tokens of packed latents (Flux, [B, S, C]).
fn latent_row_axis(family: &FamilyConfig) -> usize {
    match family {
        FamilyConfig::Flux(_) => 1,
        _ => 2,
    }
}

/// Checks that the patches cut the latents into whole token rows.
pub(crate) fn check_latent_rows(
    patches: usize,
    family: &FamilyConfig,
    latent_shape: &[usize],
) -> Result<(), PipelineError> {
    if patches == 0 {
        return Err(PipelineError::Request(
            "--pipefusion-degree and --num-pipeline-patch must be at least 1".into(),
        ));
    }
    let axis = latent_row_axis(family);
    let rows = match family {
        FamilyConfig::Flux(_) => latent_shape[axis],
        _ => latent_shape[axis] / family.patch().max(1),
    };
    if rows % patches != 0 {
        return Err(PipelineError::Request(format!(
            "PipeFusion cuts the image into {patches} row patches, but its {rows} token rows do not divide by {patches}"
        )));
    }
    Ok(())
}

/// A step cache run with the stages.
pub(crate) struct StageCache {
    pub policy: CachePolicy,
    pub rescale: Option<TeaCacheRescale>,
}

/// Everything a rank's loop needs besides its stage.
pub(crate) struct Run<'a> {
    pub family: &'a FamilyConfig,
    pub batch: &'a BatchInputs,
    pub mix: Guidance,
    pub timesteps: &'a [f32],
    pub latents: &'a HostTensor,
    pub scheduler_path: &'a std::path::Path,
    /// One prepared scheduler per rank of the last stage (each steps its own copy alike).
    pub schedulers: Mutex<Vec<Box<dyn Scheduler>>>,
    pub cache: Option<StageCache>,
    /// Each rank is its own process (`ditto launch`, torchrun, ...): every one must end
    /// with the final latents.
    pub one_process_per_rank: bool,
}

/// Messages from the last stage to the caller's thread (progress).
struct StepDone {
    step: usize,
    seconds: f64,
    latents: HostTensor,
}

/// Runs the denoising loop of one generation over the stages (in-process ranks), reporting
/// each step as the last stage finishes it. Returns the final latents, the step times, the
/// report, and what a step cache did.
pub(crate) fn denoise(
    stages: &Stages,
    run: &Run,
    opts: &RankOptions,
    on_progress: &mut dyn FnMut(Progress),
) -> Result<(HostTensor, Vec<f64>, PipeFusionReport, Option<CacheReport>), PipelineError> {
    // (The caller checked the latent rows against the patches before compiling.)
    let p = stages.stages.len();
    let group = stages.mesh.world_size();
    let world = p * group;
    if let Some(c) = &opts.comm {
        if c.world_size() != world {
            return Err(PipelineError::Request(format!(
                "PipeFusion over {p} stage(s) of {group} rank(s) needs {world} process(es), \
                 this one is rank {} of {}",
                c.rank(),
                c.world_size()
            )));
        }
    }
    let (tx, rx) = mpsc::channel::<StepDone>();
    let mut step_seconds = Vec::new();
    let results = std::thread::scope(|scope| {
        let worker = scope.spawn(move || match &opts.comm {
            // One process per rank: this process's rank only, over the given communicator;
            // it reports the steps as it finishes them.
            Some(comm) => {
                let mut comm = comm.clone();
                let own = rank::run_rank(stages, run, &mut comm, &tx, true);
                if let Err(e) = &own {
                    comm.fail(&e.to_string());
                }
                own.map(|r| vec![r])
                    .map_err(|e| crate::Error::Rank(e.to_string()))
            }
            // Every rank a thread; the last stage's first rank reports the steps.
            None => run_ranks(world, opts.timeout, |mut comm| {
                let tx = tx.clone();
                let reporter = comm.rank() == (p - 1) * group;
                rank::run_rank(stages, run, &mut comm, &tx, reporter)
            })
            .map_err(|e| crate::Error::Rank(e.to_string())),
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
    .map_err(|e| PipelineError::model("PipeFusion", e))?;
    let n = run.timesteps.len();
    let warmup = stages.layout.warmup_steps.min(n);
    let mut report = PipeFusionReport {
        stage_blocks: stages.stages.iter().map(|s| s.blocks.clone()).collect(),
        stage_mesh: stages.mesh,
        patches: stages.layout.patches,
        steps: n,
        warmup_steps: warmup,
        ..Default::default()
    };
    let mut latents = None;
    let mut cache_report = None;
    for res in results {
        let s = res.rank / group;
        report.ranks.push(res.rank);
        report.weight_bytes.push(stages.stages[s].weight_bytes);
        report.kv_bytes.push(res.kv_bytes);
        report.comm.push(res.comm);
        if res.latents.is_some() {
            latents = res.latents;
        }
        if res.cache.is_some() {
            cache_report = res.cache;
        }
    }
    analytic(stages, run, &mut report, opts.comm.is_some());
    let latents =
        latents.ok_or_else(|| PipelineError::Internal("no stage returned the latents".into()))?;
    Ok((latents, step_seconds, report, cache_report))
}

/// Bytes of a program's carried output streams (whole).
fn carry_bytes(p: &Program) -> u64 {
    p.outputs
        .iter()
        .filter(|(name, _)| name.starts_with("carry."))
        .map(|(_, v)| 4 * p.values[*v].numel() as u64)
        .sum()
}

/// The analytic traffic of every rank (see [`PipeFusionReport`]). With one process per
/// rank, the last stage also sends the final latents to every rank of the other stages,
/// so that every process decodes the same image.
fn analytic(stages: &Stages, run: &Run, report: &mut PipeFusionReport, multi_process: bool) {
    let p = stages.stages.len();
    let mesh = stages.mesh;
    let group = mesh.world_size();
    let m = stages.layout.patches as u64;
    let (n, warmup) = (report.steps as u64, report.warmup_steps as u64);
    let bytes = |x: (f64, f64, f64)| (x.0 + x.1 + x.2).round() as u64;
    let latents = 4 * run.latents.data.len() as u64;
    for (s, st) in stages.stages.iter().enumerate() {
        // Inside the stage, per unit run of each piece (the patch programs talk to the
        // patch's ranks only: the stage's physical layout).
        let warm: u64 = st
            .pieces
            .iter()
            .map(|pc| bytes(crate::report::analytic_bytes_on(&pc.warm, &mesh)))
            .sum();
        let patch: u64 = st
            .pieces
            .iter()
            .map(|pc| bytes(crate::report::analytic_bytes_on(&pc.patch, &mesh)))
            .sum();
        // To the next stage: this rank's rows of the stage's carried streams (its CFG half,
        // its piece of each patch); from the last stage, the latents back to stage 0.
        let send = if s + 1 < p {
            st.pieces
                .last()
                .map_or(0, |pc| carry_bytes(&pc.warm) / group as u64)
        } else if p > 1 {
            latents
        } else {
            0
        };
        // A step cache: stage 0 sends its decision on every unit to every other stage, and
        // its rows of the front's streams (the base the skipped blocks' residual is added
        // to) to the last stage.
        let (base, decisions) = match st.pieces.first() {
            Some(front) if front.role == Role::Front && p > 1 => {
                (carry_bytes(&front.warm) / group as u64, 4 * (p as u64 - 1))
            }
            _ => (0, 0),
        };
        let warm_send = send + base + decisions;
        let patch_send = send + base + m * decisions;
        for _ in 0..group {
            report.analytic_warmup_bytes.push(warm + warm_send);
            report.analytic_step_bytes.push(m * patch + patch_send);
            let mut total = warmup * (warm + warm_send) + (n - warmup) * (m * patch + patch_send);
            if s + 1 == p && p > 1 {
                total -= latents;
                if multi_process {
                    total += (p as u64 - 1) * latents;
                }
            }
            report.analytic_total_bytes.push(total);
        }
    }
}
