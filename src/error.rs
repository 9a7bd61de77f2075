use thiserror::Error;

/// Everything that can go wrong in ditto, each naming its cause.
#[derive(Debug, Error)]
pub enum Error {
    #[error(transparent)]
    Model(#[from] ditto_models::ModelError),
    #[error(transparent)]
    Checkpoint(#[from] ditto_models::checkpoint::CheckpointError),
    #[error(transparent)]
    Ir(#[from] ditto_ir::IrError),
    #[error(transparent)]
    Pass(#[from] ditto_passes::PassError),
    #[error(transparent)]
    Codegen(#[from] ditto_codegen::CodegenError),
    #[error(transparent)]
    Runtime(#[from] ditto_runtime::RuntimeError),
    #[error(transparent)]
    Gpu(#[from] ditto_runtime::gpu::GpuError),
    #[error(transparent)]
    Cuda(#[from] ditto_codegen::cuda::CudaError),
    /// Loading a pipeline or generating with it, so that `?` on a [`crate::Pipeline`]'s
    /// results works in functions returning `ditto::Error`.
    #[error(transparent)]
    Pipeline(#[from] crate::PipelineError),
    /// A rank of a parallel run failed (the message names it).
    #[error("{0}")]
    Rank(String),
    #[error("bad input: {0}")]
    Input(String),
    #[error("{path}: {reason}")]
    Io { path: String, reason: String },
}
