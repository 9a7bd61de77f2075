//! One rank's Program on a [`Device`]: memory from the plan, steps in order, graph replay.

use std::sync::Arc;

use ditto_codegen::cuda::{CudaPlan, KArg, LibraryOp};
use ditto_codegen::{Program, Step, Storage, ValueId};

use super::device::{Device, DevicePtr, Gemm, LaunchArg};
use super::{decode, encode, GpuError};

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

/// Executes a single-rank Program and its [`CudaPlan`] on a device.
pub struct GpuExecutor<D: Device> {
    program: Arc<Program>,
    plan: Arc<CudaPlan>,
    device: D,
    inputs: Vec<DevicePtr>,
    weights: Vec<DevicePtr>,
    buffers: Vec<DevicePtr>,
    scratch: DevicePtr,
    memory: MemoryReport,
    graph: Graph,
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
        mut device: D,
    ) -> Result<Self, GpuError> {
        check_plan(&program, &plan)?;
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
            let numel: usize = b.shape.iter().product();
            if w.len() != numel {
                return Err(GpuError::Input(format!(
                    "weight `{}` has {} elements, its shape {:?} needs {numel}",
                    b.name,
                    w.len(),
                    b.shape
                )));
            }
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
        Ok(GpuExecutor {
            program,
            plan,
            device,
            inputs: iptr,
            weights: wptr,
            buffers: bptr,
            scratch,
            memory,
            graph: Graph::Eager(0),
        })
    }

    /// Enqueues the steps anew on every run instead of replaying a captured graph.
    pub fn without_graphs(mut self) -> Self {
        self.graph = Graph::Never;
        self
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

    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    pub fn memory(&self) -> MemoryReport {
        self.memory
    }

    /// Whether the steps now replay as a captured graph.
    pub fn graph_captured(&self) -> bool {
        self.graph == Graph::Captured
    }

    /// Runs on `inputs` (f32, `Program::inputs` order) and returns the outputs as f32.
    pub fn run(&mut self, inputs: &[&[f32]]) -> Result<Vec<Vec<f32>>, GpuError> {
        let p = self.program.clone();
        if inputs.len() != p.inputs.len() {
            return Err(GpuError::Input(format!(
                "the program takes {} inputs, {} were given",
                p.inputs.len(),
                inputs.len()
            )));
        }
        for (i, (b, x)) in p.inputs.iter().zip(inputs).enumerate() {
            let numel: usize = b.shape.iter().product();
            if x.len() != numel {
                return Err(GpuError::Input(format!(
                    "input `{}` has {} elements, its shape {:?} needs {numel}",
                    b.name,
                    x.len(),
                    b.shape
                )));
            }
            self.device
                .upload(self.inputs[i], &encode(x, self.plan.input_dtypes[i]))?;
        }
        self.enqueue_steps()?;
        p.outputs
            .iter()
            .map(|&(_, v)| {
                let d = self.plan.value_dtypes[v];
                let n = p.values[v].numel();
                let bytes = self.device.download(self.ptr(v)?, n * d.bytes())?;
                Ok(decode(&bytes, d, n))
            })
            .collect()
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
                Some(op @ (LibraryOp::Attention | LibraryOp::Collective)) => {
                    return Err(GpuError::Unsupported(format!(
                        "step {si} (`{}`) needs {op:?} between ranks, and the GPU backend runs \
                         single-rank programs only",
                        step.kind()
                    )))
                }
            }
        }
        Ok(())
    }

    fn launches(&mut self, si: usize) -> Result<(), GpuError> {
        let plan = self.plan.clone();
        for l in &plan.steps[si].launches {
            let args = l
                .args
                .iter()
                .map(|a| self.arg(*a))
                .collect::<Result<Vec<_>, _>>()?;
            self.device
                .launch(l.kernel, l.grid, l.block, l.shared_bytes, &args)?;
        }
        Ok(())
    }

    fn arg(&self, a: KArg) -> Result<LaunchArg, GpuError> {
        Ok(match a {
            KArg::Value(v) => LaunchArg::Ptr(self.ptr(v)?),
            KArg::ValueAt { value, offset } => LaunchArg::Ptr(
                self.ptr(value)? + (offset * self.plan.value_dtypes[value].bytes()) as u64,
            ),
            KArg::Scratch => LaunchArg::Ptr(self.scratch),
            KArg::MeshIndex(axis) => LaunchArg::I32(self.program.mesh.index(0, axis) as i32),
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

/// The plan belongs to the program, and every library step is one this backend runs on
/// one rank with operands in the plan's storage type.
fn check_plan(p: &Program, plan: &CudaPlan) -> Result<(), GpuError> {
    let bad = |m: String| Err(GpuError::Plan(m));
    if p.mesh.world_size() != 1 {
        return Err(GpuError::Unsupported(format!(
            "a program over {} ranks (cfg {} x ring {} x ulysses {}): the GPU backend runs \
             single-rank programs only, as there is no GPU communicator yet",
            p.mesh.world_size(),
            p.mesh.cfg,
            p.mesh.ring,
            p.mesh.ulysses
        )));
    }
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
            (Some(LibraryOp::Attention | LibraryOp::Collective), _) => true,
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
