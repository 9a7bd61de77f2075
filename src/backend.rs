//! Where a program runs: the CPU backend, or one CUDA GPU.

use std::path::PathBuf;
use std::sync::Arc;

use ditto_codegen::cuda::{cuda_include_dirs, cuda_plan, CudaPlan, KernelCache, StorageDType};
use ditto_codegen::Program;
use ditto_runtime::comm::Communicator;
use ditto_runtime::gpu::{CudaDevice, GpuExecutor};

use crate::Error;

/// A backend as `--device` and `--dtype` name it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Backend {
    /// f32 on the CPU (rayon, the `gemm` crate).
    #[default]
    Cpu,
    /// GPU `ordinal`, weights and activations stored as `dtype`.
    Cuda { ordinal: usize, dtype: StorageDType },
}

impl Backend {
    /// `cpu`, `cuda` (GPU 0) or `cuda:N`, with the GPU storage type (`bf16`, `f16`, `f32`;
    /// ignored on the CPU).
    pub fn parse(device: &str, dtype: &str) -> Result<Backend, Error> {
        let bad = || {
            Error::Input(format!(
                "unknown --device `{device}` (cpu, cuda, or cuda:N for GPU N)"
            ))
        };
        let dtype = || {
            StorageDType::parse(dtype).ok_or_else(|| {
                Error::Input(format!("unknown --dtype `{dtype}` (bf16, f16 or f32)"))
            })
        };
        match device {
            "cpu" => Ok(Backend::Cpu),
            "cuda" => Ok(Backend::Cuda {
                ordinal: 0,
                dtype: dtype()?,
            }),
            d => {
                let n = d.strip_prefix("cuda:").ok_or_else(bad)?;
                let ordinal = n.parse().map_err(|_| bad())?;
                Ok(Backend::Cuda {
                    ordinal,
                    dtype: dtype()?,
                })
            }
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backend::Cpu => f.write_str("cpu"),
            Backend::Cuda { ordinal, dtype } => write!(f, "cuda:{ordinal} ({dtype})"),
        }
    }
}

/// Where compiled PTX is kept between runs: `DITTO_KERNEL_CACHE`, else
/// `$XDG_CACHE_HOME/ditto/kernels`, else `~/.cache/ditto/kernels`.
pub fn kernel_cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("DITTO_KERNEL_CACHE") {
        return Some(d.into());
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("ditto/kernels"))
}

/// A single-rank program on GPU `ordinal`: the device opened first (so a machine without
/// one fails before any compiling), the plan's kernels compiled for its architecture (or
/// taken from the kernel cache), the weights uploaded as `dtype`.
pub fn cuda_executor(
    program: Arc<Program>,
    weights: &[Vec<f32>],
    ordinal: usize,
    dtype: StorageDType,
) -> Result<GpuExecutor<CudaDevice>, Error> {
    let (device, plan, ptx) = prepare(&program, ordinal, dtype)?;
    Ok(GpuExecutor::new(program, plan, &ptx, weights, device)?)
}

/// [`cuda_executor`] for rank `rank` of a multi-rank program, with its communicator.
pub fn cuda_executor_with_comm(
    program: Arc<Program>,
    weights: &[Vec<f32>],
    ordinal: usize,
    dtype: StorageDType,
    rank: usize,
    comm: Box<dyn Communicator>,
) -> Result<GpuExecutor<CudaDevice>, Error> {
    let (mut device, plan, ptx) = prepare(&program, ordinal, dtype)?;
    let mut comm = comm;
    if nccl_requested() {
        device.enable_nccl(comm.as_mut())?;
    }
    Ok(GpuExecutor::with_comm(
        program, plan, &ptx, weights, device, rank, comm,
    )?)
}

/// Set to 1 to exchange between GPUs with NCCL (all-gathers and Ring's K/V blocks device to
/// device) instead of through the host. Off by default until the GPU checks have run it.
pub const NCCL_ENV: &str = "DITTO_NCCL";

fn nccl_requested() -> bool {
    std::env::var(NCCL_ENV).is_ok_and(|v| v == "1")
}

/// The opened device, the program's plan and its kernels' PTX for that device.
fn prepare(
    program: &Program,
    ordinal: usize,
    dtype: StorageDType,
) -> Result<(CudaDevice, Arc<CudaPlan>, Vec<String>), Error> {
    let device = CudaDevice::new(ordinal)?;
    let plan = cuda_plan(program, dtype)?;
    let cache = match kernel_cache_dir() {
        Some(d) => KernelCache::with_dir(d),
        None => KernelCache::new(),
    };
    let ptx = cache.compile(&plan.kernels, &device.arch_name(), &cuda_include_dirs())?;
    let ptx: Vec<String> = ptx.into_iter().map(|(_, p)| p.to_string()).collect();
    Ok((device, Arc::new(plan), ptx))
}
