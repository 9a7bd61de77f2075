//! [`Device`] on a real GPU: the CUDA driver API (contexts, memory, modules, launches,
//! stream capture) and cuBLASLt, both through cudarc's raw bindings, loaded at run time.

use std::collections::HashMap;
use std::ffi::{c_void, CString};

use cudarc::cublaslt::{result as lt, sys as lts};
use cudarc::driver::{result as drv, sys};
use ditto_codegen::cuda::{CudaKernel, StorageDType};

use super::device::{Device, DevicePtr, Gemm, LaunchArg};
use super::libraries::{self, Library};
use super::nccl::Nccl;
use super::GpuError;
use crate::comm::{Communicator, Group};

/// cuBLASLt workspace: NVIDIA's recommendation for Hopper (32 MiB; 4 MiB suffices before).
const WORKSPACE_BYTES: usize = 32 << 20;

fn driver(what: &str) -> impl Fn(drv::DriverError) -> GpuError + '_ {
    move |e| {
        let name = e
            .error_string()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|_| format!("{:?}", e.0));
        GpuError::Driver(format!("{what}: {name}"))
    }
}

fn blas(what: &str) -> impl Fn(lt::CublasError) -> GpuError + '_ {
    move |e| GpuError::Blas(format!("{what}: {:?}", e.0))
}

/// A GEMM shape's cuBLASLt descriptors and chosen algorithm, made once and reused.
struct GemmPlan {
    desc: lts::cublasLtMatmulDesc_t,
    layouts: [lts::cublasLtMatrixLayout_t; 3],
    algo: lts::cublasLtMatmulAlgo_t,
}

/// One GPU: a context, one non-blocking stream, the plan's kernels and a cuBLASLt handle.
pub struct CudaDevice {
    ordinal: usize,
    dev: sys::CUdevice,
    ctx: sys::CUcontext,
    stream: sys::CUstream,
    name: String,
    arch: (i32, i32),
    allocations: Vec<sys::CUdeviceptr>,
    modules: Vec<sys::CUmodule>,
    functions: Vec<sys::CUfunction>,
    blas: lts::cublasLtHandle_t,
    workspace: sys::CUdeviceptr,
    /// Per GEMM shape (a [`Gemm`] without its operand addresses).
    gemms: HashMap<Gemm, GemmPlan>,
    graph: Option<sys::CUgraphExec>,
    /// Collectives with the other ranks' devices, once [`enable_nccl`](Self::enable_nccl).
    nccl: Option<Nccl>,
}

impl CudaDevice {
    /// Opens GPU `ordinal` (its primary context, as the runtime API would).
    pub fn new(ordinal: usize) -> Result<CudaDevice, GpuError> {
        // The driver first: without one, that is the error to report.
        Self::check_ordinal(ordinal)?;
        libraries::require(Library::CublasLt)?;
        let dev = drv::device::get(ordinal as i32).map_err(driver("cuDeviceGet"))?;
        // SAFETY: `dev` came from cuDeviceGet.
        let ctx =
            unsafe { drv::primary_ctx::retain(dev) }.map_err(driver("cuDevicePrimaryCtxRetain"))?;
        // SAFETY: `ctx` is the live primary context just retained.
        unsafe { drv::ctx::set_current(ctx) }.map_err(driver("cuCtxSetCurrent"))?;
        let attr = |a| {
            unsafe { drv::device::get_attribute(dev, a) }.map_err(driver("cuDeviceGetAttribute"))
        };
        let arch = (
            attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
            attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
        );
        let name = drv::device::get_name(dev).map_err(driver("cuDeviceGetName"))?;
        let stream = drv::stream::create(drv::stream::StreamKind::NonBlocking)
            .map_err(driver("cuStreamCreate"))?;
        let blas = lt::create_handle().map_err(blas("cublasLtCreate"))?;
        let mut d = CudaDevice {
            ordinal,
            dev,
            ctx,
            stream,
            name,
            arch,
            allocations: Vec::new(),
            modules: Vec::new(),
            functions: Vec::new(),
            blas,
            workspace: 0,
            gemms: HashMap::new(),
            graph: None,
            nccl: None,
        };
        d.workspace = d.alloc(WORKSPACE_BYTES, "cuBLASLt workspace")?;
        Ok(d)
    }

    /// Makes this device exchange with the other ranks' devices through NCCL (every rank
    /// of `host`'s world calls this at once); the executor's collectives then run on the
    /// device instead of through the host.
    pub fn enable_nccl(&mut self, host: &mut dyn Communicator) -> Result<(), GpuError> {
        self.bind()?;
        self.nccl = Some(Nccl::new(host)?);
        Ok(())
    }

    /// GPUs on this machine.
    pub fn count() -> Result<usize, GpuError> {
        libraries::require(Library::Driver)?;
        drv::init().map_err(driver("cuInit"))?;
        Ok(drv::device::get_count().map_err(driver("cuDeviceGetCount"))? as usize)
    }

    /// Whether GPU `ordinal` exists (the driver loaded), without opening it.
    pub fn check_ordinal(ordinal: usize) -> Result<(), GpuError> {
        let count = Self::count()?;
        if ordinal >= count {
            return Err(GpuError::NoDevice { ordinal, count });
        }
        Ok(())
    }

    /// The GPU's compute capability, e.g. (9, 0) for an H100.
    pub fn arch(&self) -> (i32, i32) {
        self.arch
    }

    /// `sm_90` for an H100: the `--gpu-architecture` its kernels are compiled for.
    pub fn arch_name(&self) -> String {
        format!("sm_{}{}", self.arch.0, self.arch.1)
    }

    /// Milliseconds per call of `work` on this device's stream: one untimed call, then
    /// `reps` calls between two CUDA events.
    pub fn time_ms(
        &mut self,
        reps: usize,
        mut work: impl FnMut(&mut Self) -> Result<(), GpuError>,
    ) -> Result<f64, GpuError> {
        self.bind()?;
        work(self)?;
        let flags = sys::CUevent_flags::CU_EVENT_DEFAULT;
        let start = drv::event::create(flags).map_err(driver("cuEventCreate"))?;
        let end = drv::event::create(flags).map_err(driver("cuEventCreate"));
        let timed = end.and_then(|end| {
            // SAFETY: both events and the stream are live; the events are destroyed below.
            let ms = unsafe {
                drv::event::record(start, self.stream).map_err(driver("cuEventRecord"))?;
                for _ in 0..reps.max(1) {
                    work(self)?;
                }
                drv::event::record(end, self.stream).map_err(driver("cuEventRecord"))?;
                drv::event::synchronize(end).map_err(driver("cuEventSynchronize"))?;
                drv::event::elapsed(start, end).map_err(driver("cuEventElapsedTime"))
            };
            // SAFETY: created above, no longer recorded.
            let _ = unsafe { drv::event::destroy(end) };
            ms
        });
        // SAFETY: created above, no longer recorded.
        let _ = unsafe { drv::event::destroy(start) };
        Ok(timed? as f64 / reps.max(1) as f64)
    }

    fn nccl_mut(&mut self) -> Result<&mut Nccl, GpuError> {
        self.nccl
            .as_mut()
            .ok_or_else(|| GpuError::Unsupported("collectives before enable_nccl".into()))
    }

    fn bind(&self) -> Result<(), GpuError> {
        // SAFETY: the context lives as long as `self`.
        unsafe { drv::ctx::set_current(self.ctx) }.map_err(driver("cuCtxSetCurrent"))
    }

    fn gemm_plan(&mut self, g: &Gemm) -> Result<&GemmPlan, GpuError> {
        // Operands move between calls; the shape, strides, bias, type and the operands'
        // alignment make the plan (the key holds each operand's alignment in its place).
        let align = |p: DevicePtr| 1u64 << p.trailing_zeros().min(8);
        let key = Gemm {
            a: align(g.a),
            b: align(g.b),
            c: align(g.c),
            ..*g
        };
        if !self.gemms.contains_key(&key) {
            let plan = self.make_gemm_plan(&key)?;
            self.gemms.insert(key, plan);
        }
        Ok(&self.gemms[&key])
    }

    /// Row-major `c[m, n] = a[m, k] · b[n, k]ᵀ` is column-major `cᵀ[n, m] = bᵀ... `: cuBLASLt
    /// sees `b` as the column-major `[k, n]` matrix transposed (A operand, `T`), `a` as the
    /// column-major `[k, m]` matrix (B operand, `N`), and writes the column-major `[n, m]`
    /// matrix that is row-major `c`. The bias epilogue adds a vector along D's rows, which
    /// are `c`'s columns: exactly `bias[n]`.
    fn make_gemm_plan(&self, g: &Gemm) -> Result<GemmPlan, GpuError> {
        let ty = match g.dtype {
            StorageDType::F32 => lts::cudaDataType::CUDA_R_32F,
            StorageDType::F16 => lts::cudaDataType::CUDA_R_16F,
            StorageDType::Bf16 => lts::cudaDataType::CUDA_R_16BF,
        };
        let (m, n, k) = (g.m as u64, g.n as u64, g.k as i64);
        let layout = |rows: u64, cols: u64, ld: i64, stride: usize| -> Result<_, GpuError> {
            let l = lt::create_matrix_layout(ty, rows, cols, ld)
                .map_err(blas("cublasLtMatrixLayoutCreate"))?;
            if g.batch > 1 {
                let count = g.batch as i32;
                let stride = stride as i64;
                // SAFETY: `l` is a live layout; the values are the attribute's documented types.
                unsafe {
                    lt::set_matrix_layout_attribute(
                        l,
                        lts::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                        &count as *const i32 as *const c_void,
                        4,
                    )
                    .map_err(blas("batch count"))?;
                    lt::set_matrix_layout_attribute(
                        l,
                        lts::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                        &stride as *const i64 as *const c_void,
                        8,
                    )
                    .map_err(blas("batch stride"))?;
                }
            }
            Ok(l)
        };
        let la = layout(k as u64, n, k, g.stride_b)?;
        let lb = layout(k as u64, m, k, g.stride_a)?;
        let lc = layout(n, m, n as i64, g.stride_c)?;
        let desc = lt::create_matmul_desc(
            lts::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            lts::cudaDataType::CUDA_R_32F,
        )
        .map_err(blas("cublasLtMatmulDescCreate"))?;
        let set = |attr, ptr: *const c_void, size: usize| {
            // SAFETY: `desc` is live; each value is the attribute's documented type.
            unsafe { lt::set_matmul_desc_attribute(desc, attr, ptr, size) }
                .map_err(blas("cublasLtMatmulDescSetAttribute"))
        };
        let (t, nt) = (1i32, 0i32);
        set(
            lts::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
            &t as *const i32 as _,
            4,
        )?;
        set(
            lts::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
            &nt as *const i32 as _,
            4,
        )?;
        if let Some(bias) = g.bias {
            let epilogue = lts::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS;
            set(
                lts::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE,
                &epilogue as *const _ as _,
                std::mem::size_of_val(&epilogue),
            )?;
            set(
                lts::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                &bias as *const u64 as _,
                8,
            )?;
        }
        let pref = lt::create_matmul_pref().map_err(blas("cublasLtMatmulPreferenceCreate"))?;
        let ws = WORKSPACE_BYTES;
        // SAFETY: `pref` is live; the value is a size_t.
        unsafe {
            lt::set_matmul_pref_attribute(
                pref,
                lts::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const usize as *const c_void,
                8,
            )
        }
        .map_err(blas("workspace preference"))?;
        // `g.a`, `g.b`, `g.c` hold the operands' alignments here (see `gemm_plan`); later
        // batch entries are only as aligned as their byte stride too. cuBLASLt assumes 256
        // unless told, and an algorithm chosen for more alignment than the pointers have
        // fails at launch.
        let align = |base: u64, stride: usize| -> u32 {
            let bytes = (stride * g.dtype.bytes()) as u64;
            let a = if g.batch <= 1 || bytes == 0 {
                base
            } else {
                base.min(1 << bytes.trailing_zeros().min(8))
            };
            a.min(256) as u32
        };
        for (attr, a) in [
            (lts::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align(g.b, g.stride_b)),
            (lts::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align(g.a, g.stride_a)),
            (lts::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align(g.c, g.stride_c)),
            (lts::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align(g.c, g.stride_c)),
        ] {
            // SAFETY: `pref` is live; the value is a uint32_t.
            unsafe { lt::set_matmul_pref_attribute(pref, attr, &a as *const u32 as *const c_void, 4) }
                .map_err(blas("alignment preference"))?;
        }
        // SAFETY: every descriptor is live.
        let heuristic =
            unsafe { lt::get_matmul_algo_heuristic(self.blas, desc, la, lb, lc, lc, pref) };
        // SAFETY: made above, used by nothing else.
        let _ = unsafe { lt::destroy_matmul_pref(pref) };
        let heuristic = heuristic.map_err(|e| {
            GpuError::Blas(format!(
                "no algorithm for a {} GEMM [{}, {}] x [{}, {}]ᵀ (batch {}): {:?}",
                g.dtype, g.m, g.k, g.n, g.k, g.batch, e.0
            ))
        })?;
        Ok(GemmPlan {
            desc,
            layouts: [la, lb, lc],
            algo: heuristic.algo,
        })
    }
}

impl Device for CudaDevice {
    fn describe(&self) -> String {
        format!(
            "{} (cuda:{}, {})",
            self.name,
            self.ordinal,
            self.arch_name()
        )
    }

    fn alloc(&mut self, bytes: usize, what: &str) -> Result<DevicePtr, GpuError> {
        self.bind()?;
        // SAFETY: a fresh allocation of `bytes`, zeroed before use, freed on drop.
        let ptr = unsafe { drv::malloc_sync(bytes) }.map_err(|e| GpuError::OutOfMemory {
            bytes,
            what: what.into(),
            reason: format!("{:?}", e.0),
        })?;
        self.allocations.push(ptr);
        // SAFETY: `ptr` holds `bytes` bytes.
        unsafe { drv::memset_d8_sync(ptr, 0, bytes) }.map_err(driver("cuMemsetD8"))?;
        Ok(ptr)
    }

    fn upload(&mut self, dst: DevicePtr, data: &[u8]) -> Result<(), GpuError> {
        self.bind()?;
        // SAFETY: the caller's `dst` holds `data.len()` bytes; the stream is synchronized
        // before `data` can go away.
        unsafe {
            drv::memcpy_htod_async(dst, data, self.stream).map_err(driver("cuMemcpyHtoDAsync"))?;
            drv::stream::synchronize(self.stream).map_err(driver("cuStreamSynchronize"))
        }
    }

    fn download(&mut self, src: DevicePtr, len: usize) -> Result<Vec<u8>, GpuError> {
        self.bind()?;
        let mut out = vec![0u8; len];
        // SAFETY: `src` holds `len` bytes; the stream is synchronized first.
        unsafe {
            drv::stream::synchronize(self.stream).map_err(driver("cuStreamSynchronize"))?;
            drv::memcpy_dtoh_sync(&mut out, src).map_err(driver("cuMemcpyDtoH"))?;
        }
        Ok(out)
    }

    fn load_kernels(&mut self, kernels: &[CudaKernel], ptx: &[String]) -> Result<(), GpuError> {
        self.bind()?;
        for (k, src) in kernels.iter().zip(ptx) {
            let image = CString::new(src.as_str()).map_err(|_| {
                GpuError::Plan(format!("kernel `{}`: PTX holds a NUL byte", k.name))
            })?;
            // SAFETY: `image` is NUL-terminated PTX text.
            let module = unsafe { drv::module::load_data(image.as_ptr() as *const c_void) }
                .map_err(|e| {
                    GpuError::Driver(format!(
                    "loading kernel `{}` ({:?}); PTX newer than the driver, or for another GPU \
                     than {}?",
                    k.name,
                    e.0,
                    self.arch_name()
                ))
                })?;
            self.modules.push(module);
            let name = CString::new(k.name.as_str())
                .map_err(|_| GpuError::Plan("kernel name holds a NUL byte".into()))?;
            // SAFETY: `module` was just loaded.
            let f = unsafe { drv::module::get_function(module, name) }
                .map_err(driver("cuModuleGetFunction"))?;
            self.functions.push(f);
        }
        Ok(())
    }

    fn launch(
        &mut self,
        kernel: usize,
        grid: [u32; 3],
        block: [u32; 3],
        shared_bytes: u32,
        args: &[LaunchArg],
    ) -> Result<(), GpuError> {
        let f = *self
            .functions
            .get(kernel)
            .ok_or_else(|| GpuError::Plan(format!("kernel {kernel} is not loaded")))?;
        // Each parameter's value lives in `slots`; the driver copies them at launch.
        let mut slots: Vec<u64> = args
            .iter()
            .map(|a| match *a {
                LaunchArg::Ptr(p) => p,
                LaunchArg::I32(v) => v as u32 as u64,
            })
            .collect();
        let mut params: Vec<*mut c_void> = slots
            .iter_mut()
            .map(|s| s as *mut u64 as *mut c_void)
            .collect();
        // SAFETY: the parameters match the generated kernel's signature (pointers, and
        // `int`s read from the low 4 bytes of a little-endian slot); every pointer is a
        // live allocation of this device.
        unsafe {
            drv::launch_kernel(
                f,
                (grid[0], grid[1], grid[2]),
                (block[0], block[1], block[2]),
                shared_bytes,
                self.stream,
                &mut params,
            )
        }
        .map_err(driver("cuLaunchKernel"))
    }

    fn gemm(&mut self, g: &Gemm) -> Result<(), GpuError> {
        if g.batch > 1 && [g.stride_a, g.stride_b, g.stride_c].contains(&0) {
            // A shared operand (a convolution's weight): one GEMM per batch entry, as
            // cuBLASLt's strided batches are documented for distinct matrices only.
            let bytes = g.dtype.bytes() as u64;
            for i in 0..g.batch as u64 {
                self.gemm(&Gemm {
                    batch: 1,
                    a: g.a + i * (g.stride_a as u64) * bytes,
                    b: g.b + i * (g.stride_b as u64) * bytes,
                    c: g.c + i * (g.stride_c as u64) * bytes,
                    stride_a: 0,
                    stride_b: 0,
                    stride_c: 0,
                    ..*g
                })?;
            }
            return Ok(());
        }
        let (handle, stream, workspace) = (self.blas, self.stream, self.workspace);
        let plan = self.gemm_plan(g)?;
        let alpha = 1.0f32;
        let beta = if g.accumulate { 1.0f32 } else { 0.0 };
        let [la, lb, lc] = plan.layouts;
        // SAFETY: the descriptors describe these allocations (the executor checked the
        // shapes against the program); the workspace is WORKSPACE_BYTES.
        unsafe {
            lt::matmul(
                handle,
                plan.desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                g.b as *const c_void,
                la,
                g.a as *const c_void,
                lb,
                g.c as *const c_void,
                lc,
                g.c as *mut c_void,
                lc,
                &plan.algo,
                workspace as *mut c_void,
                WORKSPACE_BYTES,
                stream as lts::cudaStream_t,
            )
        }
        .map_err(blas("cublasLtMatmul"))
    }

    fn copy(&mut self, dst: DevicePtr, src: DevicePtr, bytes: usize) -> Result<(), GpuError> {
        if bytes == 0 {
            return Ok(());
        }
        // SAFETY: the caller's allocations hold `bytes` bytes each.
        unsafe { drv::memcpy_dtod_async(dst, src, bytes, self.stream) }
            .map_err(driver("cuMemcpyDtoDAsync"))
    }

    fn synchronize(&mut self) -> Result<(), GpuError> {
        self.bind()?;
        // SAFETY: the stream lives as long as `self`.
        unsafe { drv::stream::synchronize(self.stream) }.map_err(driver("cuStreamSynchronize"))
    }

    fn collectives(&self) -> bool {
        self.nccl.is_some()
    }

    fn all_gather(
        &mut self,
        group: &Group,
        send: DevicePtr,
        recv: DevicePtr,
        bytes: usize,
    ) -> Result<(), GpuError> {
        self.bind()?;
        let stream = self.stream as *mut c_void;
        self.nccl_mut()?
            .all_gather(group, send, recv, bytes, stream)
    }

    fn all_to_all(
        &mut self,
        group: &Group,
        send: DevicePtr,
        recv: DevicePtr,
        chunk: usize,
    ) -> Result<(), GpuError> {
        self.bind()?;
        let stream = self.stream as *mut c_void;
        self.nccl_mut()?
            .all_to_all(group, send, recv, chunk, stream)
    }

    fn sendrecv(
        &mut self,
        to: usize,
        send: DevicePtr,
        from: usize,
        recv: DevicePtr,
        bytes: usize,
    ) -> Result<(), GpuError> {
        self.bind()?;
        let stream = self.stream as *mut c_void;
        self.nccl_mut()?
            .sendrecv(to, send, from, recv, bytes, stream)
    }

    fn begin_capture(&mut self) -> Result<bool, GpuError> {
        self.bind()?;
        // SAFETY: the stream is live and not capturing.
        unsafe {
            drv::stream::begin_capture(
                self.stream,
                sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
            )
        }
        .map_err(driver("cuStreamBeginCapture"))?;
        Ok(true)
    }

    fn end_capture(&mut self) -> Result<(), GpuError> {
        // SAFETY: the stream is capturing (begin_capture succeeded).
        let graph = unsafe { drv::stream::end_capture(self.stream) }
            .map_err(driver("cuStreamEndCapture"))?;
        // SAFETY: `graph` was just captured; it is destroyed once instantiated.
        let exec = unsafe {
            let exec = drv::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0));
            let _ = drv::graph::destroy(graph);
            exec
        }
        .map_err(driver("cuGraphInstantiate"))?;
        if let Some(old) = self.graph.replace(exec) {
            // SAFETY: the old graph is no longer launched.
            let _ = unsafe { drv::graph::exec_destroy(old) };
        }
        Ok(())
    }

    fn replay(&mut self) -> Result<(), GpuError> {
        let exec = self
            .graph
            .ok_or_else(|| GpuError::Unsupported("no captured graph to replay".into()))?;
        self.bind()?;
        // SAFETY: `exec` is a live instantiated graph of this context.
        unsafe { drv::graph::launch(exec, self.stream) }.map_err(driver("cuGraphLaunch"))
    }
}

impl Drop for CudaDevice {
    fn drop(&mut self) {
        // Errors are ignored: nothing can be done about them while dropping, and the
        // process's context goes away with it anyway.
        // SAFETY: each handle was created by this device and is released once.
        unsafe {
            let _ = drv::ctx::set_current(self.ctx);
            let _ = drv::stream::synchronize(self.stream);
            // NCCL's communicators go before the context they live in.
            self.nccl = None;
            if let Some(g) = self.graph.take() {
                let _ = drv::graph::exec_destroy(g);
            }
            for (_, p) in self.gemms.drain() {
                for l in p.layouts {
                    let _ = lt::destroy_matrix_layout(l);
                }
                let _ = lt::destroy_matmul_desc(p.desc);
            }
            let _ = lt::destroy_handle(self.blas);
            for m in self.modules.drain(..) {
                let _ = drv::module::unload(m);
            }
            for p in self.allocations.drain(..) {
                let _ = drv::free_sync(p);
            }
            let _ = drv::stream::destroy(self.stream);
            let _ = drv::primary_ctx::release(self.dev);
        }
    }
}
