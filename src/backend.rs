//! Where a program runs: the CPU backend, or one CUDA GPU.

use std::path::PathBuf;
use std::sync::Arc;

use ditto_codegen::cuda::{cuda_include_dirs, cuda_plan, CudaPlan, KernelCache, StorageDType};
use ditto_codegen::Program;
use ditto_runtime::comm::{CommStats, Communicator};
use ditto_runtime::cpu::executor::{CpuExecutor, Weights};
use ditto_runtime::gpu::{CudaDevice, Device, GpuExecutor};

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

/// A program bound to its weights on one backend.
pub enum Executor {
    Cpu(CpuExecutor),
    Cuda(Box<GpuExecutor<CudaDevice>>),
}

impl Executor {
    /// A single-rank program on `backend` (on the GPU: its kernels compiled, its weights
    /// uploaded).
    pub fn on(
        backend: Backend,
        program: Arc<Program>,
        weights: Weights,
    ) -> Result<Executor, Error> {
        Ok(match backend {
            Backend::Cpu => Executor::Cpu(CpuExecutor::new(program, weights)?),
            Backend::Cuda { ordinal, dtype } => {
                Executor::Cuda(Box::new(cuda_executor(program, &weights, ordinal, dtype)?))
            }
        })
    }

    /// Rank `rank` of a multi-rank program on `backend`, talking to the others through
    /// `comm`.
    pub fn with_comm_on(
        backend: Backend,
        program: Arc<Program>,
        weights: Weights,
        rank: usize,
        comm: Box<dyn Communicator>,
    ) -> Result<Executor, Error> {
        Ok(match backend {
            Backend::Cpu => Executor::Cpu(CpuExecutor::with_comm(program, weights, rank, comm)?),
            Backend::Cuda { ordinal, dtype } => Executor::Cuda(Box::new(cuda_executor_with_comm(
                program, &weights, ordinal, dtype, rank, comm,
            )?)),
        })
    }

    /// Runs on `inputs` (f32, `Program::inputs` order).
    pub fn run(&mut self, inputs: &[&[f32]]) -> Result<Vec<Vec<f32>>, Error> {
        Ok(match self {
            Executor::Cpu(e) => e.run(inputs)?,
            Executor::Cuda(e) => e.run(inputs)?,
        })
    }

    pub fn program(&self) -> &Program {
        match self {
            Executor::Cpu(e) => e.program(),
            Executor::Cuda(e) => e.program(),
        }
    }

    /// Bytes this rank sent, per collective (multi-rank executors).
    pub fn comm_stats(&self) -> Option<&CommStats> {
        match self {
            Executor::Cpu(e) => e.comm_stats(),
            Executor::Cuda(e) => e.comm_stats(),
        }
    }

    /// Where it runs, for reports: the GPU, its storage type and device memory.
    pub fn describe(&self) -> String {
        match self {
            Executor::Cpu(_) => "cpu (f32)".into(),
            Executor::Cuda(e) => {
                let m = e.memory();
                let mib = |b: usize| b as f64 / (1 << 20) as f64;
                format!(
                    "{}, {} storage; device memory {:.1} MiB (weights {:.1}, activations {:.1}, scratch {:.1}){}",
                    e.device().describe(),
                    e.plan().dtype,
                    mib(m.total()),
                    mib(m.weights),
                    mib(m.buffers),
                    mib(m.scratch),
                    if e.graph_captured() { ", steps as one CUDA graph" } else { "" }
                )
            }
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
