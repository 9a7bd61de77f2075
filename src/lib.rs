//! ditto: a compiler and runtime for fast, parallel inference of Diffusion Transformers.
//!
//! A diffusers checkpoint folder is loaded into the graph IR ([`ir`]), optimized by an
//! explicit pass pipeline ([`passes`]), lowered to a per-rank [`Program`] ([`codegen`]) and
//! executed by a backend ([`runtime`]).
//!
//! ```no_run
//! use std::collections::BTreeMap;
//! let model = ditto::Model::load("tests/fixtures/dit")?;
//! let inputs = ditto::read_tensors("tests/fixtures/dit/io.safetensors".as_ref())?;
//! let inputs: BTreeMap<_, _> = inputs
//!     .into_iter()
//!     .filter_map(|(k, v)| k.strip_prefix("input.").map(|k| (k.to_string(), v)))
//!     .collect();
//! let out = model.forward(&inputs)?;
//! println!("{:?}", out["sample"].shape);
//! # Ok::<(), ditto::Error>(())
//! ```

pub mod analyze;
pub mod backend;
pub mod bench;
pub mod bench_kernels;
pub mod dist_env;
mod error;
#[cfg(unix)]
pub mod launch;
mod model;
pub mod parallel;
pub mod pipeline;
pub mod quality;
pub mod report;

pub use ditto_codegen as codegen;
pub use ditto_ir as ir;
pub use ditto_models as models;
pub use ditto_passes as passes;
pub use ditto_runtime as runtime;

pub use backend::Backend;
pub use ditto_codegen::Program;
pub use ditto_models::tensor_file::{read_tensors, write_tensors, HostTensor};
pub use ditto_models::{BuildOptions, Shapes, Summary};
pub use error::Error;
pub use model::{CompileOptions, Compiled, Model, Parallel, Session, StaleConfig};
pub use pipeline::{
    CachePolicy, CacheReport, GenerateRequest, Generation, Noise, Pipeline, PipelineError,
    Progress, PromptEmbeds, TeaCacheRescale, TimestepSchedule,
};
