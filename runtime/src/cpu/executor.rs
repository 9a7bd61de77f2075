//! The CPU backend: executes a `Program` step by step in f32 over its planned buffers.

use std::sync::Arc;
use std::time::Instant;

use ditto_codegen::{MeshAxis, Program, SeqMethod, Step, Storage, ValueId};

use super::fused::run_fused;
use super::kernels::{attention, conv, embed, gemm, layout, norm};
use crate::comm::{CommStats, Communicator};
use crate::parallel::stale::{self, StaleState};
use crate::parallel::{self, ParallelStats, Placement, RankCtx, SeqAttn};
use crate::RuntimeError;

/// Weights of a program, in `Program::weights` order, as f32.
pub type Weights = Arc<Vec<Vec<f32>>>;

/// Executes one rank's copy of a Program. Multi-rank programs (a mesh of more than one
/// rank) run one executor per rank, each with its rank and communicator.
pub struct CpuExecutor {
    program: Arc<Program>,
    weights: Weights,
    buffers: Vec<Vec<f32>>,
    rank: usize,
    /// `None` for single-rank programs: their parallel steps need no communication.
    comm: Option<Box<dyn Communicator>>,
    parallel_stats: ParallelStats,
    /// Built by [`placed`](Self::placed): where the program's ranks are on the
    /// communicator, and whether this executor plays virtual patches in turn (as
    /// [`StaleState::patch`] says). `rank` is then this executor's physical rank.
    placement: Option<Placement>,
}

/// Time spent per step kind during one run.
#[derive(Clone, Debug, Default)]
pub struct Profile {
    pub by_kind: Vec<(&'static str, f64, usize)>,
}

impl Profile {
    fn add(&mut self, kind: &'static str, secs: f64) {
        match self.by_kind.iter_mut().find(|(k, _, _)| *k == kind) {
            Some(e) => {
                e.1 += secs;
                e.2 += 1;
            }
            None => self.by_kind.push((kind, secs, 1)),
        }
    }
}

impl CpuExecutor {
    /// An executor for a single-rank program (mesh of one rank; its parallel steps are
    /// local: shard pads, gather drops the padding, sequence attention masks it).
    pub fn new(program: Arc<Program>, weights: Weights) -> Result<Self, RuntimeError> {
        let world = program.mesh.world_size();
        if world != 1 {
            return Err(RuntimeError::Binding(format!(
                "the program was compiled for a mesh of {world} rank(s) ({:?}); \
                 run each rank with CpuExecutor::with_comm",
                program.mesh
            )));
        }
        Self::build(program, weights, 0, None)
    }

    /// One executor that plays every patch of a program in turn, alone (PipeFusion's patches
    /// on a stage of one rank): [`placed`](Self::placed) with `mesh.ring` patches on one
    /// rank, which needs no communicator. The mesh must have no CFG split and no Ulysses
    /// axis (those need ranks of their own).
    pub fn virtual_ranks(program: Arc<Program>, weights: Weights) -> Result<Self, RuntimeError> {
        let mesh = program.mesh;
        if mesh.cfg != 1 || mesh.ulysses != 1 {
            return Err(RuntimeError::Binding(format!(
                "virtual ranks alone play the ring members of one CFG group; the program was \
                 compiled for CFG degree {} and Ulysses degree {} ({mesh:?}): place it on a \
                 group of ranks with CpuExecutor::placed",
                mesh.cfg, mesh.ulysses
            )));
        }
        let placement = Placement {
            patches: mesh.ring,
            ranks: vec![0],
        };
        Self::placed(program, weights, 0, placement)
    }

    /// An executor for physical rank `rank` of a group that plays a program as `placement`
    /// says (see [`parallel::placement`]): with `placement.patches` > 1 every run computes
    /// the patch [`StaleState::patch`] names (PipeFusion's patches on a stage's ranks): a
    /// `Shard` takes that patch's piece, an `AllGather` over Sp gathers the patch from the
    /// group into a persistent assembly buffer, and displaced attention works on the shared
    /// K/V store (see [`parallel::stale`]); every sequence-parallel attention must then be
    /// displaced. Collectives go through the communicator given to each run
    /// ([`run_placed`](Self::run_placed)), on the ranks `placement.ranks` names.
    pub fn placed(
        program: Arc<Program>,
        weights: Weights,
        rank: usize,
        placement: Placement,
    ) -> Result<Self, RuntimeError> {
        let mesh = program.mesh;
        placement.check(&mesh)?;
        if rank >= placement.ranks.len() {
            return Err(RuntimeError::Binding(format!(
                "physical rank {rank} is outside the group of {} rank(s)",
                placement.ranks.len()
            )));
        }
        if placement.patches > 1 {
            for (i, step) in program.steps.iter().enumerate() {
                let bad = match step {
                    Step::SeqAttention { method, .. } if *method != SeqMethod::Displaced => {
                        Some("only displaced attention can run on virtual patches".to_string())
                    }
                    Step::Shard {
                        mesh: axis, parts, ..
                    }
                    | Step::AllGather {
                        mesh: axis, parts, ..
                    } if !matches!(axis, MeshAxis::Sp | MeshAxis::Cfg) && *parts > 1 => {
                        Some(format!(
                            "virtual patches split over the `sp` and `cfg` axes only, not `{}`",
                            axis.as_str()
                        ))
                    }
                    _ => None,
                };
                if let Some(why) = bad {
                    return Err(RuntimeError::Unsupported(format!(
                        "step {i} (`{}`): {why}",
                        step.kind()
                    )));
                }
            }
        }
        let mut e = Self::build(program, weights, rank, None)?;
        e.placement = Some(placement);
        Ok(e)
    }

    /// An executor for rank `rank` of a multi-rank program, talking to the other ranks
    /// through `comm` (whose world must be the program's mesh). On error the failure is
    /// announced through `comm`, so peers already waiting for this rank learn why.
    pub fn with_comm(
        program: Arc<Program>,
        weights: Weights,
        rank: usize,
        mut comm: Box<dyn Communicator>,
    ) -> Result<Self, RuntimeError> {
        match Self::check_comm(&program, rank, comm.as_ref()) {
            Ok(()) => Self::build(program, weights, rank, Some(comm)),
            Err(e) => {
                comm.fail(&e.to_string());
                Err(e)
            }
        }
    }

    fn check_comm(
        program: &Program,
        rank: usize,
        comm: &dyn Communicator,
    ) -> Result<(), RuntimeError> {
        let world = program.mesh.world_size();
        if rank >= world {
            return Err(RuntimeError::Binding(format!(
                "rank {rank} is outside the program's mesh of {world} rank(s) ({:?})",
                program.mesh
            )));
        }
        if comm.world_size() != world {
            return Err(RuntimeError::Binding(format!(
                "the communicator's world has {} rank(s), the program's mesh {world} ({:?})",
                comm.world_size(),
                program.mesh
            )));
        }
        if comm.rank() != rank {
            return Err(RuntimeError::Binding(format!(
                "executor for rank {rank} was given the communicator of rank {}",
                comm.rank()
            )));
        }
        Ok(())
    }

    fn build(
        program: Arc<Program>,
        weights: Weights,
        rank: usize,
        mut comm: Option<Box<dyn Communicator>>,
    ) -> Result<Self, RuntimeError> {
        let checked = Self::check(&program, &weights);
        if let (Err(e), Some(c)) = (&checked, comm.as_deref_mut()) {
            c.fail(&e.to_string());
        }
        checked?;
        let buffers = program.buffers.iter().map(|&n| vec![0.0; n]).collect();
        Ok(CpuExecutor {
            program,
            weights,
            buffers,
            rank,
            comm,
            parallel_stats: ParallelStats::default(),
            placement: None,
        })
    }

    /// Weights against their bindings, and the parallel steps against the mesh.
    fn check(program: &Program, weights: &Weights) -> Result<(), RuntimeError> {
        if weights.len() != program.weights.len() {
            return Err(RuntimeError::Binding(format!(
                "the program needs {} weights, {} were given",
                program.weights.len(),
                weights.len()
            )));
        }
        for (b, w) in program.weights.iter().zip(weights.iter()) {
            let n: usize = b.shape.iter().product();
            if w.len() != n {
                return Err(RuntimeError::Binding(format!(
                    "weight `{}` has {} elements, the program expects {n}",
                    b.name,
                    w.len()
                )));
            }
        }
        for step in &program.steps {
            parallel::validate(program, step)?;
        }
        Ok(())
    }

    pub fn program(&self) -> &Program {
        &self.program
    }

    /// This executor's rank in the program's mesh (0 for single-rank programs).
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Bytes and calls this rank put on the wire since creation or the last
    /// [`reset_comm_stats`](Self::reset_comm_stats) (`None` without a communicator:
    /// nothing was sent).
    pub fn comm_stats(&self) -> Option<&CommStats> {
        self.comm.as_deref().map(|c| c.stats())
    }

    /// Resets the traffic and parallel-step counters (e.g. after a warmup run).
    pub fn reset_comm_stats(&mut self) {
        if let Some(c) = self.comm.as_deref_mut() {
            c.reset_stats();
        }
        self.parallel_stats = ParallelStats::default();
    }

    /// Counters of the parallel steps run so far (head padding added for Ulysses).
    pub fn parallel_stats(&self) -> ParallelStats {
        self.parallel_stats
    }

    /// Runs the program on `inputs` (in `Program::inputs` order) and returns the outputs in
    /// `Program::outputs` order.
    pub fn run(&mut self, inputs: &[&[f32]]) -> Result<Vec<Vec<f32>>, RuntimeError> {
        self.run_announced(inputs, None, None, None)
    }

    /// [`run`](Self::run) for programs with displaced attention: `state` holds every
    /// displaced attention's K/V across runs (the denoising steps of one generation) and
    /// says how to use them ([`StaleState::mode`], PCPP portion, virtual rank). In stale
    /// mode the run ends with the exchange of the fresh K/V for the next run. Every rank
    /// keeps its own state; reset it between generations.
    pub fn run_with_state(
        &mut self,
        inputs: &[&[f32]],
        state: &mut StaleState,
    ) -> Result<Vec<Vec<f32>>, RuntimeError> {
        self.run_announced(inputs, None, Some(state), None)
    }

    /// A run of an executor built with [`placed`](Self::placed): collectives go through
    /// `comm` (whose ranks the placement names; `None` when the group is one rank), the
    /// stale state says which patch this run computes.
    pub fn run_placed(
        &mut self,
        inputs: &[&[f32]],
        state: &mut StaleState,
        comm: Option<&mut dyn Communicator>,
    ) -> Result<Vec<Vec<f32>>, RuntimeError> {
        if self.placement.is_none() {
            return Err(RuntimeError::Binding(
                "run_placed needs an executor built with CpuExecutor::placed".into(),
            ));
        }
        self.run_announced(inputs, None, Some(state), comm)
    }

    /// Whether the program has displaced attention (and so needs a [`StaleState`]).
    pub fn needs_stale_state(&self) -> bool {
        self.program.steps.iter().any(|s| {
            matches!(
                s,
                Step::SeqAttention {
                    method: SeqMethod::Displaced,
                    ..
                }
            )
        })
    }

    /// Like [`run`](Self::run), also timing each step kind.
    pub fn run_profiled(
        &mut self,
        inputs: &[&[f32]],
    ) -> Result<(Vec<Vec<f32>>, Profile), RuntimeError> {
        let mut p = Profile::default();
        let out = self.run_announced(inputs, Some(&mut p), None, None)?;
        Ok((out, p))
    }

    /// Runs, and on failure tells the other ranks at once: they may be waiting in a
    /// collective for this rank, and would otherwise only leave it at the timeout. The
    /// error they get names this rank and carries the reason.
    fn run_announced(
        &mut self,
        inputs: &[&[f32]],
        profile: Option<&mut Profile>,
        state: Option<&mut StaleState>,
        mut ext: Option<&mut dyn Communicator>,
    ) -> Result<Vec<Vec<f32>>, RuntimeError> {
        let result = self.run_inner(inputs, profile, state, reborrow(&mut ext));
        if let Err(e) = &result {
            if let Some(comm) = either_comm(reborrow(&mut ext), &mut self.comm) {
                comm.fail(&e.to_string());
            }
        }
        result
    }

    fn run_inner(
        &mut self,
        inputs: &[&[f32]],
        mut profile: Option<&mut Profile>,
        mut state: Option<&mut StaleState>,
        mut ext: Option<&mut dyn Communicator>,
    ) -> Result<Vec<Vec<f32>>, RuntimeError> {
        let program = self.program.clone();
        let member = self.check_state(state.as_deref())?;
        if let Some(st) = state.as_deref_mut() {
            st.begin_run()?;
        }
        if inputs.len() != program.inputs.len() {
            return Err(RuntimeError::Binding(format!(
                "the program takes {} inputs, {} were given",
                program.inputs.len(),
                inputs.len()
            )));
        }
        for (b, x) in program.inputs.iter().zip(inputs) {
            b.check_len("input", x.len())
                .map_err(RuntimeError::Binding)?;
        }
        for (i, step) in program.steps.iter().enumerate() {
            let t0 = profile.as_ref().map(|_| Instant::now());
            self.exec(
                &program,
                step,
                inputs,
                member,
                state.as_deref_mut(),
                reborrow(&mut ext),
            )
            .map_err(|e| in_step(e, i, step))?;
            if let (Some(p), Some(t0)) = (profile.as_deref_mut(), t0) {
                p.add(step.kind(), t0.elapsed().as_secs_f64());
            }
        }
        if let Some(st) = state {
            let t0 = profile.as_ref().map(|_| Instant::now());
            let mut ctx = RankCtx {
                mesh: program.mesh,
                rank: member,
                comm: either_comm(reborrow(&mut ext), &mut self.comm),
                placement: self.placement.as_ref(),
            };
            stale::finish_run(&mut ctx, st)?;
            if let (Some(p), Some(t0)) = (profile, t0) {
                p.add("stale_exchange", t0.elapsed().as_secs_f64());
            }
        }
        Ok(program
            .outputs
            .iter()
            .map(|(_, v)| self.read(&program, *v, inputs).to_vec())
            .collect())
    }

    /// The program rank this run plays (with virtual patches, this rank's member of the
    /// patch the state names), after checking that the state and the executor agree.
    fn check_state(&self, state: Option<&StaleState>) -> Result<usize, RuntimeError> {
        let mesh = self.program.mesh;
        let patch = state.and_then(|s| s.patch);
        let Some(placement) = &self.placement else {
            return match patch {
                None => Ok(self.rank),
                // One part: the patch is the only one there is.
                Some(0) if mesh.world_size() == 1 => Ok(self.rank),
                Some(i) => Err(RuntimeError::Binding(format!(
                    "the stale state asks for patch {i}, but this executor runs rank {} of a \
                     real mesh: build it with CpuExecutor::placed",
                    self.rank
                ))),
            };
        };
        let patches = placement.patches;
        match patch {
            Some(i) if i < patches => Ok(placement.program_rank(&mesh, self.rank, i)),
            Some(i) => Err(RuntimeError::Input(format!(
                "patch {i} is outside the program's {patches} virtual patch(es)"
            ))),
            None if patches == 1 => Ok(placement.program_rank(&mesh, self.rank, 0)),
            None if state.is_none() => Err(RuntimeError::Binding(
                "an executor of virtual patches runs with a StaleState (run_with_state or run_placed)"
                    .into(),
            )),
            None => Err(RuntimeError::Input(
                "an executor of virtual patches needs StaleState::patch: the patch to compute"
                    .into(),
            )),
        }
    }

    fn read<'a>(&'a self, p: &Program, v: ValueId, inputs: &[&'a [f32]]) -> &'a [f32] {
        read_value(&self.buffers, &self.weights, p, v, inputs)
    }

    fn exec(
        &mut self,
        p: &Program,
        step: &Step,
        inputs: &[&[f32]],
        member: usize,
        state: Option<&mut StaleState>,
        mut ext: Option<&mut dyn Communicator>,
    ) -> Result<(), RuntimeError> {
        let out_v = &p.values[step.output()];
        let Storage::Buffer(ob) = out_v.storage else {
            return Err(RuntimeError::Binding(
                "a step writes outside the planned buffers".into(),
            ));
        };
        let n = out_v.numel();
        // The output buffer is taken out while operands are read: the memory plan guarantees
        // it is not one of them.
        let mut obuf = std::mem::take(&mut self.buffers[ob]);
        let out = &mut obuf[..n];
        // Reads borrow only the buffers and weights, so the communicator and counters
        // stay available to the parallel steps.
        let (buffers, weights) = (&self.buffers, &self.weights);
        let r = |v: ValueId| read_value(buffers, weights, p, v, inputs);
        let virtual_patches = self.placement.as_ref().is_some_and(|pl| pl.patches > 1);
        let mut ctx = RankCtx {
            mesh: p.mesh,
            rank: member,
            comm: either_comm(reborrow(&mut ext), &mut self.comm),
            placement: self.placement.as_ref(),
        };
        let shape = |v: ValueId| p.values[v].shape.as_slice();
        let mut result = Ok(());
        match step {
            Step::Fused { kernel, args, .. } => {
                let a: Vec<(&[f32], &[usize])> = args.iter().map(|&v| (r(v), shape(v))).collect();
                run_fused(&p.kernels[*kernel], &a, &out_v.shape, out);
            }
            Step::Linear {
                x, w, b, m, k, n, ..
            } => gemm::linear(r(*x), *m, *k, r(*w), *n, b.map(r), out),
            Step::Attention {
                q,
                k,
                v,
                batch,
                sq,
                sk,
                heads,
                head_dim,
                head_dim_v,
                scale,
                ..
            } => {
                if head_dim != head_dim_v {
                    result = Err(RuntimeError::Unsupported(format!(
                        "attention with value width {head_dim_v} != key width {head_dim}"
                    )));
                } else {
                    attention::attention(
                        r(*q),
                        r(*k),
                        r(*v),
                        *batch,
                        *sq,
                        *sk,
                        *heads,
                        *head_dim,
                        *scale,
                        out,
                    )
                }
            }
            Step::LayerNorm {
                x, rows, cols, eps, ..
            } => norm::layer_norm(r(*x), *rows, *cols, *eps, out),
            Step::RmsNorm {
                x, rows, cols, eps, ..
            } => norm::rms_norm(r(*x), *rows, *cols, *eps, out),
            Step::GroupNorm {
                x,
                n,
                c,
                hw,
                groups,
                eps,
                ..
            } => norm::group_norm(r(*x), *n, *c, *hw, *groups, *eps, out),
            Step::Softmax { x, rows, cols, .. } => norm::softmax(r(*x), *rows, *cols, out),
            Step::Permute { x, perm, .. } => layout::permute(r(*x), shape(*x), perm, out),
            Step::Concat {
                inputs: xs, axis, ..
            } => {
                let a: Vec<(&[f32], &[usize])> = xs.iter().map(|&v| (r(v), shape(v))).collect();
                layout::concat(&a, *axis, out)
            }
            Step::Slice {
                x,
                axis,
                start,
                end,
                ..
            } => layout::slice(r(*x), shape(*x), *axis, *start, *end, out),
            Step::Conv2d {
                x,
                w,
                b,
                stride,
                pad,
                ..
            } => {
                let xs = shape(*x);
                let ws = shape(*w);
                conv::conv2d(
                    r(*x),
                    xs[0],
                    xs[1],
                    xs[2],
                    xs[3],
                    r(*w),
                    ws[0],
                    ws[2],
                    ws[3],
                    Some(r(*b)),
                    *stride,
                    *pad,
                    out,
                )
            }
            Step::UpsampleNearest { x, factor, .. } => {
                let xs = shape(*x);
                if *factor == 2 {
                    conv::upsample_nearest2x(r(*x), xs[0], xs[1], xs[2], xs[3], out)
                } else {
                    upsample_nearest(r(*x), xs, *factor, out)
                }
            }
            Step::TimestepEmbedding {
                t,
                dim,
                flip_sin_to_cos,
                downscale_freq_shift,
                scale,
                ..
            } => embed::timestep_embedding(
                r(*t),
                *dim,
                *flip_sin_to_cos,
                *downscale_freq_shift,
                *scale,
                10000.0,
                out,
            ),
            Step::Embedding { table, idx, .. } => {
                let ts = shape(*table);
                if let Err(bad) = embed::embedding(r(*table), ts[0], ts[1], r(*idx), out) {
                    result = Err(RuntimeError::Input(format!(
                        "index {} is out of range for an embedding table of {} rows",
                        r(*idx).get(bad).copied().unwrap_or(f32::NAN),
                        ts[0]
                    )));
                }
            }
            Step::SinCosPosEmbed {
                dim,
                grid_h,
                grid_w,
                base_size,
                interpolation_scale,
                ..
            } => embed::sincos_pos_embed_2d(
                *dim,
                *grid_h,
                *grid_w,
                *base_size,
                *interpolation_scale,
                out,
            ),
            Step::RopeTables {
                ids,
                theta,
                axes_dims,
                cos,
                ..
            } => {
                let s = shape(*ids)[0];
                let d: usize = axes_dims.iter().sum();
                let mut other = vec![0.0; s * d];
                if *cos {
                    embed::rope_cos_sin(r(*ids), s, axes_dims, *theta, out, &mut other)
                } else {
                    embed::rope_cos_sin(r(*ids), s, axes_dims, *theta, &mut other, out)
                }
            }
            Step::Rope { x, cos, sin, .. } => {
                let xs = shape(*x);
                embed::apply_rope(r(*x), xs[0], xs[1], xs[2], xs[3], r(*cos), r(*sin), out)
            }
            Step::Shard {
                x,
                axis,
                mesh,
                segments,
                ..
            } => parallel::shard(&ctx, r(*x), shape(*x), *axis, *mesh, segments, out),
            Step::AllGather {
                x,
                axis,
                mesh,
                segments,
                parts,
                ..
            } => {
                result = match state {
                    Some(st) if virtual_patches && *mesh == MeshAxis::Sp && *parts > 1 => {
                        stale::virtual_all_gather(
                            &mut ctx,
                            st,
                            r(*x),
                            shape(*x),
                            *axis,
                            segments,
                            out,
                        )
                    }
                    _ => parallel::all_gather(
                        &mut ctx,
                        r(*x),
                        shape(*x),
                        *axis,
                        *mesh,
                        segments,
                        out,
                    ),
                }
            }
            Step::SeqAttention {
                q, k, v, method, ..
            } => {
                let a = SeqAttn::of(step).expect("a sequence-parallel attention");
                result = match (method, state) {
                    (SeqMethod::Displaced, Some(st)) => {
                        self.parallel_stats.seq_attentions += 1;
                        stale::displaced_attention(&mut ctx, st, &a, r(*q), r(*k), r(*v), out)
                    }
                    _ => parallel::seq_attention(
                        &mut ctx,
                        &a,
                        r(*q),
                        r(*k),
                        r(*v),
                        out,
                        &mut self.parallel_stats,
                    ),
                };
            }
            Step::Fill { value, .. } => out.fill(*value),
            Step::Copy { x, .. } => out.copy_from_slice(r(*x)),
        }
        self.buffers[ob] = obuf;
        result
    }
}

/// A shorter borrow of an optional communicator (the trait object's lifetime shortened
/// with it, which `Option::as_deref_mut` cannot do).
fn reborrow<'s>(c: &'s mut Option<&mut dyn Communicator>) -> Option<&'s mut dyn Communicator> {
    match c {
        Some(c) => Some(&mut **c),
        None => None,
    }
}

/// The communicator a run was given, else the executor's own.
fn either_comm<'a>(
    given: Option<&'a mut dyn Communicator>,
    own: &'a mut Option<Box<dyn Communicator>>,
) -> Option<&'a mut dyn Communicator> {
    match given {
        Some(c) => Some(c),
        None => match own {
            Some(c) => Some(c.as_mut()),
            None => None,
        },
    }
}

fn read_value<'a>(
    buffers: &'a [Vec<f32>],
    weights: &'a [Vec<f32>],
    p: &Program,
    v: ValueId,
    inputs: &[&'a [f32]],
) -> &'a [f32] {
    let val = &p.values[v];
    let n = val.numel();
    match val.storage {
        Storage::Buffer(b) => &buffers[b][..n],
        Storage::Weight(w) => &weights[w][..n],
        Storage::Input(i) => &inputs[i][..n],
    }
}

/// Says which step failed, for the errors that do not already carry their context
/// (communication errors name ranks and operations and keep their variant, so callers
/// can still match on them).
fn in_step(e: RuntimeError, index: usize, step: &Step) -> RuntimeError {
    let at = |m: String| format!("step {index} (`{}`): {m}", step.kind());
    match e {
        RuntimeError::Binding(m) => RuntimeError::Binding(at(m)),
        RuntimeError::Input(m) => RuntimeError::Input(at(m)),
        RuntimeError::Unsupported(m) => RuntimeError::Unsupported(at(m)),
        other => other,
    }
}

fn upsample_nearest(x: &[f32], s: &[usize], f: usize, out: &mut [f32]) {
    let (h, w) = (s[2], s[3]);
    let (ho, wo) = (h * f, w * f);
    for (plane, o) in x.chunks(h * w).zip(out.chunks_mut(ho * wo)) {
        for y in 0..ho {
            for xx in 0..wo {
                o[y * wo + xx] = plane[(y / f) * w + xx / f];
            }
        }
    }
}
