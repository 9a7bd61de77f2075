//! What the executor needs of a GPU: memory, kernel launches, GEMMs and graph capture.

use ditto_codegen::cuda::{CudaKernel, StorageDType};

use super::GpuError;
use crate::comm::Group;

/// A device address. Allocations are at least 256-byte aligned (the generated kernels'
/// 16-byte vector accesses rely on 16).
pub type DevicePtr = u64;

/// One kernel parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LaunchArg {
    Ptr(DevicePtr),
    I32(i32),
}

/// `c[i] (+)= a[i] · b[i]ᵀ (+ bias)` for `i < batch`: row-major `a [m, k]`, `b [n, k]`,
/// `c [m, n]`, every batch entry `stride_*` elements after the previous one (0: shared).
/// Both operands are K-contiguous, the form a linear layer (`x · wᵀ`) and an im2col
/// convolution (`W · colᵀ`) both take.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Gemm {
    pub batch: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: DevicePtr,
    pub stride_a: usize,
    pub b: DevicePtr,
    pub stride_b: usize,
    pub c: DevicePtr,
    pub stride_c: usize,
    /// `[n]`, added to every row of `c`.
    pub bias: Option<DevicePtr>,
    /// Add to `c` instead of overwriting it.
    pub accumulate: bool,
    /// Element type of `a`, `b`, `c` and the bias; accumulation is f32.
    pub dtype: StorageDType,
}

/// A GPU as the executor uses it: work is enqueued in order on one stream; `download` and
/// `synchronize` wait for it.
pub trait Device {
    /// What this device is, for reports (`NVIDIA H100 80GB HBM3, sm_90`).
    fn describe(&self) -> String;
    /// `bytes` of device memory (zeroed). `what` names it in an out-of-memory error.
    fn alloc(&mut self, bytes: usize, what: &str) -> Result<DevicePtr, GpuError>;
    /// Copies `data` to `dst` (after the work enqueued so far).
    fn upload(&mut self, dst: DevicePtr, data: &[u8]) -> Result<(), GpuError>;
    /// `len` bytes at `src`, once the work enqueued so far has finished.
    fn download(&mut self, src: DevicePtr, len: usize) -> Result<Vec<u8>, GpuError>;
    /// Loads the plan's kernels from their PTX (`ptx[i]` is `kernels[i]`'s); `launch`
    /// then names them by index.
    fn load_kernels(&mut self, kernels: &[CudaKernel], ptx: &[String]) -> Result<(), GpuError>;
    /// Enqueues a launch of kernel `kernel`.
    fn launch(
        &mut self,
        kernel: usize,
        grid: [u32; 3],
        block: [u32; 3],
        shared_bytes: u32,
        args: &[LaunchArg],
    ) -> Result<(), GpuError>;
    /// Enqueues a GEMM.
    fn gemm(&mut self, g: &Gemm) -> Result<(), GpuError>;
    /// Enqueues a copy of `bytes` bytes between two places of this device.
    fn copy(&mut self, dst: DevicePtr, src: DevicePtr, bytes: usize) -> Result<(), GpuError>;
    /// Waits for all enqueued work.
    fn synchronize(&mut self) -> Result<(), GpuError>;
    /// Starts recording the work enqueued from now on into a graph instead of running it.
    /// `false`: this device cannot, and the work runs as usual.
    fn begin_capture(&mut self) -> Result<bool, GpuError> {
        Ok(false)
    }
    /// Ends the recording begun by `begin_capture`; the graph replaces any earlier one.
    fn end_capture(&mut self) -> Result<(), GpuError> {
        Err(GpuError::Unsupported("graph capture".into()))
    }
    /// Enqueues the recorded graph.
    fn replay(&mut self) -> Result<(), GpuError> {
        Err(GpuError::Unsupported("graph replay".into()))
    }

    /// Whether this device exchanges data with the other ranks' devices itself (NCCL):
    /// then the executor's collectives are the three below, ordered on the device's
    /// stream; otherwise the executor stages them through the host communicator.
    /// Ranks are global ranks, as for [`crate::comm::Communicator`]; sizes are bytes.
    fn collectives(&self) -> bool {
        false
    }
    /// `recv` = every member's `bytes` at `send`, in group order.
    fn all_gather(
        &mut self,
        _group: &Group,
        _send: DevicePtr,
        _recv: DevicePtr,
        _bytes: usize,
    ) -> Result<(), GpuError> {
        Err(GpuError::Unsupported("device collectives".into()))
    }
    /// `recv` chunk j = what member j sent this rank: its chunk for this rank's index, of
    /// `chunk` bytes (chunk j of `send` goes to member j).
    fn all_to_all(
        &mut self,
        _group: &Group,
        _send: DevicePtr,
        _recv: DevicePtr,
        _chunk: usize,
    ) -> Result<(), GpuError> {
        Err(GpuError::Unsupported("device collectives".into()))
    }
    /// Sends `bytes` at `send` to rank `to` and receives as many from rank `from` into
    /// `recv` (a ring's step: every member calls it at once).
    fn sendrecv(
        &mut self,
        _to: usize,
        _send: DevicePtr,
        _from: usize,
        _recv: DevicePtr,
        _bytes: usize,
    ) -> Result<(), GpuError> {
        Err(GpuError::Unsupported("device collectives".into()))
    }
}
