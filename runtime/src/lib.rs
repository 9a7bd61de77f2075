//! ditto-runtime: executes per-rank Programs (CPU backend), schedulers and the denoising loop.

pub mod comm;
pub mod cpu;
pub mod gpu;
pub mod parallel;
pub mod scheduler;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum RuntimeError {
    #[error("program binding: {0}")]
    Binding(String),
    #[error("bad input: {0}")]
    Input(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("communication: {0}")]
    Comm(#[from] comm::CommError),
    #[error(transparent)]
    Gpu(#[from] gpu::GpuError),
}
