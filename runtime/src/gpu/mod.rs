//! The GPU backend: a Program and its [`CudaPlan`] executed on a [`Device`].
//!
//! [`GpuExecutor`] owns the device memory of one rank — the runtime inputs, the weights
//! (uploaded once, converted to the plan's storage type), the buffers of the memory plan
//! (liveness-based reuse, so their sum is the activation peak) and one scratch area sized
//! for the largest step — and runs the plan's steps in order on one stream: generated
//! kernels, GEMMs, convolutions as im2col + GEMM. From the third run on, the steps replay
//! as one captured graph (the first run warms up, the second captures), since a fixed-shape
//! Program's launches never change: only the input bytes do.
//!
//! Multi-rank programs run one executor per rank, each with its communicator; their
//! exchanges run on the device with NCCL (`CudaDevice::enable_nccl`) or through the host
//! (see [`GpuExecutor`]).
//!
//! [`Device`] is the seam between that logic and CUDA: [`CudaDevice`] implements it with
//! the driver API and cuBLASLt (through cudarc, loaded at run time), and the tests
//! implement it with a host emulation of the generated kernels, so everything above the
//! driver calls runs in CI without a GPU.
//!
//! cudarc panics when a CUDA library cannot be loaded; [`libraries`] looks for each one
//! first, so a machine without the driver or cuBLASLt gets an error naming the library.

mod cuda;
mod device;
mod executor;
pub mod libraries;
mod nccl;

pub use cuda::CudaDevice;
pub use device::{Device, DevicePtr, Gemm, LaunchArg};
pub use ditto_codegen::cuda::{CudaPlan, StorageDType};
pub use executor::{GpuExecutor, MemoryReport};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum GpuError {
    #[error(
        "{lib} was not found (tried: {}). {hint}",
        tried.join(", ")
    )]
    LibraryMissing {
        lib: String,
        tried: Vec<String>,
        hint: String,
    },
    #[error("no CUDA device {ordinal}: this machine has {count}")]
    NoDevice { ordinal: usize, count: usize },
    #[error("CUDA driver: {0}")]
    Driver(String),
    #[error("cuBLASLt: {0}")]
    Blas(String),
    #[error("out of device memory allocating {bytes} bytes ({what}): {reason}")]
    OutOfMemory {
        bytes: usize,
        what: String,
        reason: String,
    },
    #[error("the plan does not fit the program: {0}")]
    Plan(String),
    #[error("unsupported on the GPU backend: {0}")]
    Unsupported(String),
    #[error("bad input: {0}")]
    Input(String),
    #[error("communication: {0}")]
    Comm(#[from] crate::comm::CommError),
    #[error("{0}")]
    Parallel(String),
}

/// Elements per parallel chunk of [`encode`] / [`decode`]: a checkpoint's weights are
/// billions of values, converted once at load, so the conversion runs on every core.
const CHUNK: usize = 1 << 16;

/// `x` in storage type `d`, little-endian (bf16 rounds to nearest even, as the kernels'
/// `__float2bfloat16_rn`).
pub fn encode(x: &[f32], d: StorageDType) -> Vec<u8> {
    use rayon::prelude::*;
    let mut out = vec![0u8; x.len() * d.bytes()];
    let one = |src: &[f32], dst: &mut [u8]| match d {
        StorageDType::F32 => {
            for (v, o) in src.iter().zip(dst.chunks_exact_mut(4)) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        StorageDType::Bf16 => {
            for (&v, o) in src.iter().zip(dst.chunks_exact_mut(2)) {
                o.copy_from_slice(&half::bf16::from_f32(v).to_bits().to_le_bytes());
            }
        }
        StorageDType::F16 => {
            for (&v, o) in src.iter().zip(dst.chunks_exact_mut(2)) {
                o.copy_from_slice(&half::f16::from_f32(v).to_bits().to_le_bytes());
            }
        }
    };
    if x.len() <= CHUNK {
        one(x, &mut out);
    } else {
        x.par_chunks(CHUNK)
            .zip(out.par_chunks_mut(CHUNK * d.bytes()))
            .for_each(|(src, dst)| one(src, dst));
    }
    out
}

/// The first `n` elements of storage type `d` in `b`, as f32.
pub fn decode(b: &[u8], d: StorageDType, n: usize) -> Vec<f32> {
    match d {
        StorageDType::F32 => b[..4 * n]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        StorageDType::Bf16 => b[..2 * n]
            .chunks_exact(2)
            .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        StorageDType::F16 => b[..2 * n]
            .chunks_exact(2)
            .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
    }
}

#[cfg(test)]
mod tests;
