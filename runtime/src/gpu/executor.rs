//! One rank's Program on a [`Device`]: memory from the plan, steps in order, graph replay.

use std::sync::Arc;

use ditto_codegen::cuda::{CudaPlan, KArg, Launch, LibraryOp, SeqAttentionLayout, StorageDType};
use ditto_codegen::{Program, Segment, SeqMethod, Step, Storage, ValueId};

use super::device::{Device, DevicePtr, Gemm, LaunchArg};
use super::{decode, encode, GpuError};
use crate::comm::{CommStats, Communicator, Group};
use crate::parallel::{self, ParallelStats, RankCtx, SeqAttn};

/// Device memory of an executor, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryReport {
    pub weights: usize,
    /// The memory plan's buffers: the activation peak.
    pub buffers: usize,
    /// The one scratch area (the largest step's: a convolution's column matrix).
    pub scratch: usize,
    pub inputs: usize,
}

impl MemoryReport {
    pub fn total(&self) -> usize {
        self.weights + self.buffers + self.scratch + self.inputs
    }
}

/// Where the run stands with graph capture.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Graph {
    /// Runs so far without a graph (the first warms up: module loading, GEMM heuristics).
    Eager(usize),
    /// The steps are one captured graph.
    Captured,
    /// The device cannot capture, or graphs are off: steps are enqueued every run.
    Never,
}

/// Executes one rank of a Program and its [`CudaPlan`] on a device.
///
/// A multi-rank program exchanges data with the other ranks either on the device, when it
/// has collectives of its own ([`Device::collectives`]: NCCL), or through the host
/// communicator (in-process or TCP): an all-gather's rows are downloaded, exchanged and
/// uploaded for the plan's launches; sequence-parallel attention (Ulysses, Ring, USP)
/// exchanges the downloaded q, k, v as the CPU backend does (the same code). Either way the
/// attention of every K/V block and the merges run on the device. Such programs are not
/// captured as a graph (the host takes part in every step: the masks, the host path).
pub struct GpuExecutor<D: Device> {
    program: Arc<Program>,
    plan: Arc<CudaPlan>,
    device: D,
    rank: usize,
    comm: Option<Box<dyn Communicator>>,
    parallel_stats: ParallelStats,
    inputs: Vec<DevicePtr>,
    weights: Vec<DevicePtr>,
    buffers: Vec<DevicePtr>,
    scratch: DevicePtr,
    memory: MemoryReport,
    graph: Graph,
    /// Every step's launches with their arguments resolved, once: the addresses never
    /// change, and programs that are not captured enqueue them on every run.
    bound: Vec<Vec<BoundLaunch>>,
}

/// The (m, k, n) a linear step's operands must have.
fn check_linear(
    p: &Program,
    x: ValueId,
    w: ValueId,
    out: ValueId,
    m: usize,
    k: usize,
    n: usize,
) -> Result<(), String> {
    let numel = |v: ValueId| p.values[v].numel();
    if numel(x) != m * k || numel(w) != n * k || numel(out) != m * n {
        return Err(format!(
            "linear [{m}, {k}] x [{n}, {k}]ᵀ does not fit operands of {}, {} and {} elements",
            numel(x),
            numel(w),
            numel(out)
        ));
    }
    Ok(())
}

impl<D: Device> GpuExecutor<D> {
    /// Uploads `weights` (f32, `Program::weights` order) converted to the plan's storage type,
    /// allocates the plan's buffers and loads its kernels (`ptx[i]` is kernel i's).
    pub fn new(
        program: Arc<Program>,
        plan: Arc<CudaPlan>,
        ptx: &[String],
        weights: &[Vec<f32>],
        device: D,
    ) -> Result<Self, GpuError> {
        if program.mesh.world_size() != 1 {
            return Err(GpuError::Unsupported(format!(
                "a program over {} ranks (cfg {} x ring {} x ulysses {}) runs one executor per \
                 rank, each with its communicator (GpuExecutor::with_comm)",
                program.mesh.world_size(),
                program.mesh.cfg,
                program.mesh.ring,
                program.mesh.ulysses
            )));
        }
        Self::build(program, plan, ptx, weights, device, 0, None)
    }

    /// Rank `rank` of a multi-rank program, talking to the others through `comm`.
    pub fn with_comm(
        program: Arc<Program>,
        plan: Arc<CudaPlan>,
        ptx: &[String],
        weights: &[Vec<f32>],
        device: D,
        rank: usize,
        comm: Box<dyn Communicator>,
    ) -> Result<Self, GpuError> {
        let world = program.mesh.world_size();
        if rank >= world || comm.world_size() != world {
            return Err(GpuError::Input(format!(
                "rank {rank} with a communicator of {} ranks, for a program over {world}",
                comm.world_size()
            )));
        }
        Self::build(program, plan, ptx, weights, device, rank, Some(comm))
    }

    fn build(
        program: Arc<Program>,
        plan: Arc<CudaPlan>,
        ptx: &[String],
        weights: &[Vec<f32>],
        mut device: D,
        rank: usize,
        comm: Option<Box<dyn Communicator>>,
    ) -> Result<Self, GpuError> {
        check_plan(&program, &plan)?;
        for step in &program.steps {
            parallel::validate(&program, step).map_err(|e| GpuError::Plan(e.to_string()))?;
        }
        if ptx.len() != plan.kernels.len() {
            return Err(GpuError::Plan(format!(
                "{} kernels but {} PTX modules",
                plan.kernels.len(),
                ptx.len()
            )));
        }
        if weights.len() != program.weights.len() {
            return Err(GpuError::Input(format!(
                "the program takes {} weights, {} were given",
                program.weights.len(),
                weights.len()
            )));
        }
        let mut memory = MemoryReport::default();
        let mut wptr = Vec::with_capacity(weights.len());
        for (b, w) in program.weights.iter().zip(weights) {
            b.check_len("weight", w.len()).map_err(GpuError::Input)?;
            let bytes = encode(w, plan.dtype);
            let ptr = device.alloc(bytes.len().max(16), &format!("weight `{}`", b.name))?;
            device.upload(ptr, &bytes)?;
            memory.weights += bytes.len();
            wptr.push(ptr);
        }
        let mut iptr = Vec::with_capacity(program.inputs.len());
        for (b, &d) in program.inputs.iter().zip(&plan.input_dtypes) {
            let bytes = b.shape.iter().product::<usize>() * d.bytes();
            iptr.push(device.alloc(bytes.max(16), &format!("input `{}`", b.name))?);
            memory.inputs += bytes;
        }
        let mut bptr = Vec::with_capacity(plan.buffer_bytes.len());
        for (i, &bytes) in plan.buffer_bytes.iter().enumerate() {
            bptr.push(device.alloc(bytes.max(16), &format!("buffer {i}"))?);
            memory.buffers += bytes;
        }
        memory.scratch = plan
            .steps
            .iter()
            .map(|s| s.scratch_bytes)
            .max()
            .unwrap_or(0);
        let scratch = device.alloc(memory.scratch.max(16), "step scratch")?;
        device.load_kernels(&plan.kernels, ptx)?;
        device.synchronize()?;
        // The host takes part in a communicating step: such programs run eagerly.
        let communicates = plan.steps.iter().any(|s| {
            matches!(
                s.library,
                Some(LibraryOp::Collective | LibraryOp::Attention)
            )
        });
        let mut exec = GpuExecutor {
            program,
            plan,
            device,
            rank,
            comm,
            parallel_stats: ParallelStats::default(),
            graph: if communicates {
                Graph::Never
            } else {
                Graph::Eager(0)
            },
            inputs: iptr,
            weights: wptr,
            buffers: bptr,
            scratch,
            memory,
            bound: Vec::new(),
        };
        exec.bound = exec
            .plan
            .steps
            .iter()
            .map(|sp| sp.launches.iter().map(|l| exec.bind(l)).collect())
            .collect::<Result<_, _>>()?;
        Ok(exec)
    }

    pub fn program(&self) -> &Program {
        &self.program
    }

    pub fn plan(&self) -> &CudaPlan {
        &self.plan
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    pub fn memory(&self) -> MemoryReport {
        self.memory
    }

    /// Bytes this rank sent, per collective (multi-rank executors).
    pub fn comm_stats(&self) -> Option<&CommStats> {
        self.comm.as_deref().map(|c| c.stats())
    }

    /// Counters of the sequence-parallel attentions run so far.
    pub fn parallel_stats(&self) -> ParallelStats {
        self.parallel_stats
    }

    /// Whether the steps now replay as a captured graph.
    pub fn graph_captured(&self) -> bool {
        self.graph == Graph::Captured
    }

    /// Runs on `inputs` (f32, `Program::inputs` order) and returns the outputs as f32. A
    /// rank that fails tells its peers (they stop at their next collective, naming it).
    pub fn run(&mut self, inputs: &[&[f32]]) -> Result<Vec<Vec<f32>>, GpuError> {
        let result = self.run_inner(inputs);
        if let (Err(e), Some(comm)) = (&result, self.comm.as_deref_mut()) {
            if !matches!(e, GpuError::Comm(_)) {
                comm.fail(&format!("rank {} failed: {e}", self.rank));
            }
        }
        result
    }

    fn run_inner(&mut self, inputs: &[&[f32]]) -> Result<Vec<Vec<f32>>, GpuError> {
        let p = self.program.clone();
        if inputs.len() != p.inputs.len() {
            return Err(GpuError::Input(format!(
                "the program takes {} inputs, {} were given",
                p.inputs.len(),
                inputs.len()
            )));
        }
        for (i, (b, x)) in p.inputs.iter().zip(inputs).enumerate() {
            b.check_len("input", x.len()).map_err(GpuError::Input)?;
            self.device
                .upload(self.inputs[i], &encode(x, self.plan.input_dtypes[i]))?;
        }
        self.enqueue_steps()?;
        p.outputs.iter().map(|&(_, v)| self.read(v)).collect()
    }

    /// The steps, as a graph from the third run on when the device can capture one.
    fn enqueue_steps(&mut self) -> Result<(), GpuError> {
        match self.graph {
            Graph::Captured => self.device.replay(),
            Graph::Never | Graph::Eager(0) => {
                if let Graph::Eager(n) = &mut self.graph {
                    *n += 1;
                }
                self.run_steps()
            }
            Graph::Eager(_) => {
                if !self.device.begin_capture()? {
                    self.graph = Graph::Never;
                    return self.run_steps();
                }
                let recorded = self.run_steps();
                let ended = self.device.end_capture();
                recorded?;
                ended?;
                self.graph = Graph::Captured;
                self.device.replay()
            }
        }
    }

    fn run_steps(&mut self) -> Result<(), GpuError> {
        let p = self.program.clone();
        for (si, step) in p.steps.iter().enumerate() {
            let sp = &self.plan.steps[si];
            match sp.library {
                None => self.launches(si)?,
                Some(LibraryOp::Gemm) => {
                    let Step::Linear {
                        x,
                        w,
                        b,
                        out,
                        m,
                        k,
                        n,
                    } = *step
                    else {
                        unreachable!("checked by check_plan");
                    };
                    let g = Gemm {
                        batch: 1,
                        m,
                        n,
                        k,
                        a: self.ptr(x)?,
                        stride_a: 0,
                        b: self.ptr(w)?,
                        stride_b: 0,
                        c: self.ptr(out)?,
                        stride_c: 0,
                        bias: b.map(|b| self.ptr(b)).transpose()?,
                        accumulate: false,
                        dtype: self.plan.dtype,
                    };
                    self.device.gemm(&g)?;
                    self.launches(si)?;
                }
                Some(LibraryOp::Conv2d) => {
                    // The launches write the column matrix and the bias first.
                    self.launches(si)?;
                    let Step::Conv2d { x, w, out, .. } = *step else {
                        unreachable!("checked by check_plan");
                    };
                    let (xs, ws, os) =
                        (&p.values[x].shape, &p.values[w].shape, &p.values[out].shape);
                    let (co, depth) = (ws[0], ws[1] * ws[2] * ws[3]);
                    let pixels = os[2] * os[3];
                    if xs[0] * pixels * depth == 0 {
                        continue;
                    }
                    let g = Gemm {
                        batch: xs[0],
                        m: co,
                        n: pixels,
                        k: depth,
                        a: self.ptr(w)?,
                        stride_a: 0,
                        b: self.scratch,
                        stride_b: pixels * depth,
                        c: self.ptr(out)?,
                        stride_c: co * pixels,
                        bias: None,
                        accumulate: true,
                        dtype: self.plan.dtype,
                    };
                    self.device.gemm(&g)?;
                }
                Some(LibraryOp::Collective) => {
                    self.all_gather(step)?;
                    self.launches(si)?;
                }
                Some(LibraryOp::Attention) => self.seq_attention(si, step)?,
            }
        }
        Ok(())
    }

    /// Value `v` as f32, once the work before has finished.
    fn read(&mut self, v: ValueId) -> Result<Vec<f32>, GpuError> {
        let d = self.plan.value_dtypes[v];
        let n = self.program.values[v].numel();
        let bytes = self.device.download(self.ptr(v)?, n * d.bytes())?;
        Ok(decode(&bytes, d, n))
    }

    /// The communicator, or an error naming the step that needs one.
    fn comm_for(&mut self, step: &Step) -> Result<&mut dyn Communicator, GpuError> {
        match &mut self.comm {
            Some(c) => Ok(c.as_mut()),
            None => Err(GpuError::Unsupported(format!(
                "`{}` over more than one rank needs a communicator",
                step.kind()
            ))),
        }
    }

    /// `Step::AllGather`: the members' rows side by side in the scratch (in `x`'s storage
    /// type), for the step's launches to drop the padding.
    fn all_gather(&mut self, step: &Step) -> Result<(), GpuError> {
        let Step::AllGather { x, mesh, .. } = *step else {
            unreachable!("checked by check_plan");
        };
        let group = Group::new(self.program.mesh.group(self.rank, mesh));
        let bytes = self.program.values[x].numel() * self.plan.value_dtypes[x].bytes();
        if group.size() == 1 {
            return self.device.copy(self.scratch, self.ptr(x)?, bytes);
        }
        if self.device.collectives() {
            return self
                .device
                .all_gather(&group, self.ptr(x)?, self.scratch, bytes);
        }
        let local = self.read(x)?;
        let mut gathered = vec![0.0f32; local.len() * group.size()];
        self.comm_for(step)?
            .all_gather(&group, &local, &mut gathered)?;
        let bytes = encode(&gathered, self.plan.value_dtypes[x]);
        self.device.upload(self.scratch, &bytes)
    }

    /// `Step::SeqAttention`. The attention of every K/V block and the merges run on the
    /// device (the plan's launches over its scratch layout). The exchanges run on the
    /// device too when it has collectives (NCCL); otherwise q, k, v are downloaded and
    /// exchanged through the host as the CPU backend does (the same code), and the output
    /// uploaded.
    fn seq_attention(&mut self, si: usize, step: &Step) -> Result<(), GpuError> {
        let (Step::SeqAttention { q, k, v, out, .. }, Some(a)) = (step, SeqAttn::of(step)) else {
            unreachable!("checked by check_plan");
        };
        let (q, k, v, out) = (*q, *k, *v, *out);
        let plan = self.plan.clone();
        let sp = &plan.steps[si];
        let layout = sp
            .seq_attention
            .ok_or_else(|| GpuError::Plan(format!("step {si}: no attention layout")))?;
        let dtype = plan.value_dtypes[q];
        let on_device = self.device.collectives();
        let host = if on_device {
            None
        } else {
            Some((self.read(q)?, self.read(k)?, self.read(v)?))
        };
        // Where q, k, v are and their bytes, for the exchange on the device.
        let mut qkv = [(0u64, 0usize); 3];
        for (slot, x) in qkv.iter_mut().zip([q, k, v]) {
            *slot = (
                self.ptr(x)?,
                self.program.values[x].numel() * plan.value_dtypes[x].bytes(),
            );
        }
        let mut o = vec![
            0.0f32;
            if on_device {
                0
            } else {
                self.program.values[out].numel()
            }
        ];
        let (scratch, rank, mesh) = (self.scratch, self.rank, self.program.mesh);
        let GpuExecutor {
            device,
            comm,
            parallel_stats,
            bound,
            ..
        } = self;
        let comm: Option<&mut dyn Communicator> = match comm {
            Some(c) => Some(c.as_mut()),
            None => None,
        };
        let mut ctx = RankCtx {
            mesh,
            rank,
            comm,
            placement: None,
        };
        let run = (|| {
            let g = parallel::seq_groups(&ctx, &a, parallel_stats)?;
            if (g.ulysses.size(), g.ring.size()) != (layout.ulysses, layout.ring) {
                return Err(GpuError::Plan(format!(
                    "step {si}: planned for Ulysses {} x Ring {}, the rank has {} x {}",
                    layout.ulysses,
                    layout.ring,
                    g.ulysses.size(),
                    g.ring.size()
                ))
                .into());
            }
            let mut blocks = DeviceBlocks {
                device,
                launches: &bound[si],
                scratch,
                layout,
                dtype,
                segments: a.key_segments,
            };
            blocks.upload_masks()?;
            match &host {
                None => blocks.exchange_on_device(&g, qkv),
                Some((qh, kh, vh)) => parallel::around_ulysses(
                    &mut ctx,
                    &g.ulysses,
                    g.split,
                    &a,
                    qh,
                    kh,
                    vh,
                    &mut o,
                    |ctx, q, k, v, o| {
                        blocks.ring_through_host(ctx, &g.ring, g.ring_index, q, k, v, o)
                    },
                ),
            }
        })();
        run.map_err(|e| match e {
            crate::RuntimeError::Gpu(g) => g,
            crate::RuntimeError::Comm(c) => GpuError::Comm(c),
            other => GpuError::Parallel(other.to_string()),
        })?;
        if !on_device {
            let bytes = encode(&o, plan.value_dtypes[out]);
            self.device.upload(self.ptr(out)?, &bytes)?;
        }
        Ok(())
    }

    fn launches(&mut self, si: usize) -> Result<(), GpuError> {
        for l in &self.bound[si] {
            l.enqueue(&mut self.device)?;
        }
        Ok(())
    }

    /// `l` with its arguments resolved to this rank's addresses.
    fn bind(&self, l: &Launch) -> Result<BoundLaunch, GpuError> {
        Ok(BoundLaunch {
            kernel: l.kernel,
            grid: l.grid,
            block: l.block,
            shared_bytes: l.shared_bytes,
            args: l
                .args
                .iter()
                .map(|a| self.arg(*a))
                .collect::<Result<_, _>>()?,
        })
    }

    fn arg(&self, a: KArg) -> Result<LaunchArg, GpuError> {
        Ok(match a {
            KArg::Value(v) => LaunchArg::Ptr(self.ptr(v)?),
            KArg::ValueAt { value, offset } => LaunchArg::Ptr(
                self.ptr(value)? + (offset * self.plan.value_dtypes[value].bytes()) as u64,
            ),
            KArg::Scratch => LaunchArg::Ptr(self.scratch),
            KArg::ScratchAt(bytes) => LaunchArg::Ptr(self.scratch + bytes as u64),
            KArg::MeshIndex(axis) => {
                LaunchArg::I32(self.program.mesh.index(self.rank, axis) as i32)
            }
        })
    }

    /// The device address of value `v`'s first element.
    fn ptr(&self, v: ValueId) -> Result<DevicePtr, GpuError> {
        let s = self
            .program
            .values
            .get(v)
            .ok_or_else(|| GpuError::Plan(format!("value {v} does not exist")))?
            .storage;
        let found = match s {
            Storage::Input(i) => self.inputs.get(i),
            Storage::Weight(w) => self.weights.get(w),
            Storage::Buffer(b) => self.buffers.get(b),
        };
        found.copied().ok_or_else(|| {
            GpuError::Plan(format!("value {v} has storage {s:?}, which does not exist"))
        })
    }
}

/// A planned launch with its arguments resolved to device addresses.
#[derive(Clone)]
struct BoundLaunch {
    kernel: usize,
    grid: [u32; 3],
    block: [u32; 3],
    shared_bytes: u32,
    args: Vec<LaunchArg>,
}

impl BoundLaunch {
    fn enqueue(&self, device: &mut impl Device) -> Result<(), GpuError> {
        device.launch(
            self.kernel,
            self.grid,
            self.block,
            self.shared_bytes,
            &self.args,
        )
    }
}

/// The device half of a sequence-parallel attention: the plan's attention and merge
/// launches over one step's scratch.
struct DeviceBlocks<'a, D: Device> {
    device: &'a mut D,
    /// Attention, then (Ring) the first-block and the later-block merges.
    launches: &'a [BoundLaunch],
    scratch: DevicePtr,
    layout: SeqAttentionLayout,
    dtype: StorageDType,
    segments: &'a [Segment],
}

impl<D: Device> DeviceBlocks<'_, D> {
    fn at(&self, offset: usize) -> DevicePtr {
        self.scratch + offset as u64
    }

    fn launch(&mut self, i: usize) -> Result<(), GpuError> {
        self.launches[i].enqueue(self.device)
    }

    /// Every ring member's block mask into the mask area, once per step.
    fn upload_masks(&mut self) -> Result<(), GpuError> {
        let l = self.layout;
        let masks: Vec<u8> = (0..l.ring)
            .flat_map(|owner| parallel::block_mask(self.segments, l.ulysses, owner))
            .map(u8::from)
            .collect();
        self.device.upload(self.at(l.mask), &masks)
    }

    /// Attention of the current K/V block (ring member `owner`'s) and, with Ring, its
    /// merge into the accumulator (`step` 0 starts it).
    fn block(&mut self, owner: usize, step: usize) -> Result<(), GpuError> {
        let l = self.layout;
        let ix = l.launches();
        let mut attention = self.launches[ix.attention].clone();
        if let Some(mask) = attention.args.last_mut() {
            *mask = LaunchArg::Ptr(self.at(l.mask + owner * l.keys));
        }
        attention.enqueue(self.device)?;
        match (step, ix.merge_first, ix.merge) {
            (0, Some(first), _) => self.launch(first),
            (_, _, Some(merge)) => self.launch(merge),
            _ => Ok(()),
        }
    }

    /// The whole attention on the device: q, k, v from their values (through the Ulysses
    /// all-to-all with `ulysses > 1`), the K/V blocks passed around the ring device to
    /// device, the result into the output value (back through the all-to-all).
    fn exchange_on_device(
        &mut self,
        g: &parallel::SeqGroups,
        qkv: [(DevicePtr, usize); 3],
    ) -> Result<(), crate::RuntimeError> {
        let l = self.layout;
        let ix = l.launches();
        match (ix.pack, ix.interleave) {
            (Some(pack), Some(interleave)) => {
                for i in pack {
                    self.launch(i)?;
                }
                self.device.all_to_all(
                    &g.ulysses,
                    self.at(l.a2a_send),
                    self.at(l.a2a_recv),
                    l.a2a_chunk,
                )?;
                for i in interleave {
                    self.launch(i)?;
                }
            }
            _ => {
                for ((src, n), dst) in qkv.into_iter().zip([l.q, l.k, l.v]) {
                    self.device.copy(self.at(dst), src, n)?;
                }
            }
        }
        let (p, me) = (g.ring.size(), g.ring_index);
        let (next, prev) = (g.ring.ranks[(me + 1) % p], g.ring.ranks[(me + p - 1) % p]);
        for step in 0..p {
            let last = step + 1 == p;
            if !last {
                // On one stream this arrives before the block's attention runs; a
                // communication stream would overlap the two.
                self.device
                    .sendrecv(next, self.at(l.k), prev, self.at(l.kv_next), l.kv_span)?;
            }
            self.block((me + p - step) % p, step)?;
            if !last {
                self.device
                    .copy(self.at(l.k), self.at(l.kv_next), l.kv_span)?;
            }
        }
        match (ix.deinterleave, ix.unpack, ix.finish) {
            (Some(deinterleave), Some(unpack), _) => {
                self.launch(deinterleave)?;
                self.device.all_to_all(
                    &g.ulysses,
                    self.at(l.a2a_send),
                    self.at(l.a2a_recv),
                    l.a2a_out_chunk,
                )?;
                self.launch(unpack)?;
            }
            (_, _, Some(finish)) => self.launch(finish)?,
            _ => {
                return Err(GpuError::Plan("no launch writes the attention's output".into()).into())
            }
        }
        Ok(())
    }

    /// Attention of `q` (this rank's share after the host's Ulysses exchange) over every
    /// ring member's K/V block, the blocks passed around the ring on the host as the CPU
    /// backend's Ring attention passes them; `o` gets the merged output.
    #[allow(clippy::too_many_arguments)]
    fn ring_through_host(
        &mut self,
        ctx: &mut RankCtx,
        ring: &Group,
        me: usize,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        o: &mut [f32],
    ) -> Result<(), crate::RuntimeError> {
        let l = self.layout;
        self.device.upload(self.at(l.q), &encode(q, self.dtype))?;
        let p = ring.size();
        let (next_rank, prev_rank) = (ring.ranks[(me + 1) % p], ring.ranks[(me + p - 1) % p]);
        let blk = k.len();
        let mut cur = Vec::with_capacity(2 * blk);
        cur.extend_from_slice(k);
        cur.extend_from_slice(v);
        let mut next = vec![0.0f32; if p > 1 { 2 * blk } else { 0 }];
        for step in 0..p {
            let last = step + 1 == p;
            if !last {
                let comm = ctx.comm("ring attention")?;
                comm.sendrecv(
                    next_rank,
                    &cur,
                    prev_rank,
                    &mut next,
                    crate::parallel::ring::RING_TAG,
                )?;
            }
            self.device
                .upload(self.at(l.k), &encode(&cur[..blk], self.dtype))?;
            self.device
                .upload(self.at(l.v), &encode(&cur[blk..], self.dtype))?;
            self.block((me + p - step) % p, step)?;
            if !last {
                std::mem::swap(&mut cur, &mut next);
            }
        }
        let d = if p > 1 { StorageDType::F32 } else { self.dtype };
        let bytes = self
            .device
            .download(self.at(l.result()), o.len() * d.bytes())?;
        o.copy_from_slice(&decode(&bytes, d, o.len()));
        Ok(())
    }
}

/// The plan belongs to the program, and every library step is one this backend runs on
/// one rank with operands in the plan's storage type.
fn check_plan(p: &Program, plan: &CudaPlan) -> Result<(), GpuError> {
    let bad = |m: String| Err(GpuError::Plan(m));
    if plan.steps.len() != p.steps.len()
        || plan.value_dtypes.len() != p.values.len()
        || plan.input_dtypes.len() != p.inputs.len()
        || plan.buffer_bytes.len() != p.buffers.len()
    {
        return bad(format!(
            "{} steps, {} values, {} inputs and {} buffers in the plan; the program has {}, {}, {} and {}",
            plan.steps.len(),
            plan.value_dtypes.len(),
            plan.input_dtypes.len(),
            plan.buffer_bytes.len(),
            p.steps.len(),
            p.values.len(),
            p.inputs.len(),
            p.buffers.len()
        ));
    }
    for (si, (step, sp)) in p.steps.iter().zip(&plan.steps).enumerate() {
        if sp.launches.iter().any(|l| l.kernel >= plan.kernels.len()) {
            return bad(format!(
                "step {si} launches a kernel the plan does not have"
            ));
        }
        let same_type = |vs: &[ValueId]| {
            vs.iter()
                .all(|&v| plan.value_dtypes.get(v) == Some(&plan.dtype))
        };
        let ok = match (sp.library, step) {
            (None, _) => true,
            (
                Some(LibraryOp::Gemm),
                Step::Linear {
                    x,
                    w,
                    b,
                    out,
                    m,
                    k,
                    n,
                },
            ) => {
                check_linear(p, *x, *w, *out, *m, *k, *n).map_err(GpuError::Plan)?;
                same_type(&[*x, *w, *out]) && b.is_none_or(|b| same_type(&[b]))
            }
            (Some(LibraryOp::Conv2d), Step::Conv2d { x, w, out, .. }) => {
                let (xs, ws, os) = (
                    &p.values[*x].shape,
                    &p.values[*w].shape,
                    &p.values[*out].shape,
                );
                if xs.len() != 4 || ws.len() != 4 || os.len() != 4 {
                    return bad(format!("step {si}: convolution operands are not 4-D"));
                }
                let need = xs[0] * os[2] * os[3] * ws[1] * ws[2] * ws[3] * plan.dtype.bytes();
                if sp.scratch_bytes < need {
                    return bad(format!(
                        "step {si}: the convolution's column matrix needs {need} bytes of scratch, the plan has {}",
                        sp.scratch_bytes
                    ));
                }
                same_type(&[*w, *out])
            }
            (Some(LibraryOp::Attention), Step::SeqAttention { method, .. }) => {
                if *method == SeqMethod::Displaced {
                    return Err(GpuError::Unsupported(
                        "displaced attention (DistriFusion, PipeFusion) keeps K/V across runs; \
                         it runs on the CPU backend"
                            .into(),
                    ));
                }
                true
            }
            (Some(LibraryOp::Collective), Step::AllGather { x, .. }) => {
                let need =
                    p.values[*x].numel() * p.mesh.world_size() * plan.value_dtypes[*x].bytes();
                if sp.scratch_bytes * p.mesh.world_size() < need {
                    return bad(format!("step {si}: the all-gather's scratch is too small"));
                }
                true
            }
            (Some(op), s) => {
                return bad(format!("step {si} (`{}`) planned as {op:?}", s.kind()));
            }
        };
        if !ok {
            return bad(format!(
                "step {si} (`{}`): the library call reads and writes {} only",
                step.kind(),
                plan.dtype
            ));
        }
    }
    Ok(())
}
