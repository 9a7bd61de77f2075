//! CUDA C for every kernel a [`Program`] needs beyond GEMMs, convolutions and collectives,
//! its compilation to PTX with NVRTC, and a content-addressed cache of the results.
//!
//! [`cuda_plan`] walks a program and emits, per step, the kernels and their launches:
//! fused elementwise kernels (named after the ops they fuse, `k3_add_mul_add`), layer /
//! RMS / group norm, softmax, RoPE and its tables, timestep and position embeddings,
//! embedding lookups, the layout copies (permute, concat, slice, shard, the local half
//! of all-gather, upsample, copy, fill), and flash attention (tensor cores for 16-bit
//! storage, see `attention`). [`cuda_sources`] is just the kernels.
//!
//! Design choices, and why:
//! - **Shapes are baked in.** A Program is compiled for fixed shapes (its buffers are planned
//!   for them), so every size, stride and broadcast pattern is a constant in the source:
//!   index division becomes multiply-shift, guards vanish where sizes divide, and the
//!   launch needs only pointers. Steps with equal shapes produce equal sources, which the
//!   plan deduplicates by content hash, so a 28-layer model compiles each kernel once.
//! - **Broadcasting by strides.** Each argument of an elementwise kernel is read through its
//!   own strides over the output's (coalesced) dimensions; 0 is a broadcast axis. When the
//!   innermost axis is contiguous or broadcast for every argument, a thread handles one
//!   16-byte vector of the output (4 f32 or 8 f16/bf16) and loads each argument with 16-byte
//!   loads (or one scalar, broadcast); otherwise one element per thread.
//! - **Storage types.** Weights and intermediates are stored as the plan's [`StorageDType`]
//!   (f32, f16 or bf16), except small f32 islands: runtime inputs and what is computed from
//!   them by elementwise/layout steps (timesteps, class labels, position ids, guidance:
//!   bf16 holds integers exactly only to 256), and RoPE tables; a value a GEMM, convolution
//!   or attention reads is always the storage type. All arithmetic, and every reduction,
//!   is f32.
//! - **Row kernels** (norms, softmax) keep the row in registers: a block per row (or an
//!   aligned group of lanes per row when a row is at most 32 vectors), warp shuffles plus
//!   one shared-memory exchange per reduction, two passes over the registers for the
//!   variance (as the CPU backend does) rather than E[x²] - E[x]².
//!
//! Contract with the runtime that launches these (see [`Launch`], [`KArg`]): every value,
//! weight, input and scratch area starts 16-byte aligned (separate `cudaMalloc`s are 256-byte
//! aligned); parameters are passed in `Launch::args` order; `KArg::MeshIndex` is an `int`.

mod attention;
mod cache;
mod conv;
mod elementwise;
mod embed;
mod emit;
mod layout;
mod norm;
mod nvrtc;
mod plan;
mod ptxas;
mod seq_attention;

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use attention::{attention_source, AttentionSpec, HEAD_DIMS};
pub use cache::{kernel_hash, CacheStats, KernelCache};
pub use nvrtc::{
    compile_ptx, cuda_include_dirs, find_nvrtc, library_search_dirs, nvrtc_version,
    COMPILE_OPTIONS, CUDA_INCLUDE_ENV, NVRTC_LIB_ENV,
};
pub use plan::{cuda_plan, cuda_sources, CudaPlan, KArg, Launch, LibraryOp, StepPlan};
pub use ptxas::{find_ptxas, ptxas_info, PtxasFunction, PTXAS_ENV};
pub use seq_attention::{seq_groups, SeqAttentionLaunches, SeqAttentionLayout};

/// How weights and intermediate values are stored on the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum StorageDType {
    F32,
    F16,
    Bf16,
}

impl StorageDType {
    pub fn bytes(self) -> usize {
        match self {
            StorageDType::F32 => 4,
            StorageDType::F16 | StorageDType::Bf16 => 2,
        }
    }
    /// The C type in the generated source.
    pub fn c_type(self) -> &'static str {
        match self {
            StorageDType::F32 => "float",
            StorageDType::F16 => "__half",
            StorageDType::Bf16 => "__nv_bfloat16",
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            StorageDType::F32 => "f32",
            StorageDType::F16 => "f16",
            StorageDType::Bf16 => "bf16",
        }
    }
    /// Parses `f32`, `f16` / `fp16`, `bf16` (and torch-style `float32`, `float16`,
    /// `bfloat16`).
    pub fn parse(s: &str) -> Option<StorageDType> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" | "float" => Some(StorageDType::F32),
            "f16" | "fp16" | "float16" | "half" => Some(StorageDType::F16),
            "bf16" | "bfloat16" => Some(StorageDType::Bf16),
            _ => None,
        }
    }
}

impl std::fmt::Display for StorageDType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One generated kernel: a complete NVRTC program defining `extern "C" __global__ name`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CudaKernel {
    pub name: String,
    pub source: String,
    /// [`kernel_hash`] of `source`.
    pub hash: u64,
}

#[derive(Debug, Error)]
pub enum CudaError {
    #[error(
        "{lib} was not found (searched: {}). Install it, e.g. `pip install \
         nvidia-cuda-nvrtc==13.0.*`, and point {NVRTC_LIB_ENV} at the library or its folder",
        searched.join(", ")
    )]
    LibraryMissing { lib: String, searched: Vec<String> },
    #[error("cannot load {path}: {reason}")]
    LibraryLoad { path: String, reason: String },
    #[error(
        "the CUDA headers ({header}) were not found (searched: {}). Install them, e.g. `pip \
         install nvidia-cuda-runtime==13.0.*`, and point {CUDA_INCLUDE_ENV} at the include folder",
        searched.join(", ")
    )]
    HeadersMissing {
        header: String,
        searched: Vec<String>,
    },
    #[error("NVRTC failed to compile kernel `{kernel}`: {log}")]
    Compile { kernel: String, log: String },
    #[error("NVRTC: {0}")]
    Nvrtc(String),
    #[error("step {step} (`{kind}`): {reason}")]
    Unsupported {
        step: usize,
        kind: String,
        reason: String,
    },
    #[error("{path}: {reason}")]
    Io { path: String, reason: String },
    #[error("ptxas: {0}")]
    Ptxas(String),
}
