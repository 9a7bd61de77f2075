pub mod executor;
mod fused;
pub mod kernels;
