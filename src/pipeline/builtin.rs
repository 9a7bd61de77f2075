//! The built-in default model, `assets/shapes-dit`, compiled into the binary.
//!
//! A small class-conditional DiT in pixel space (32x32 RGB; classes circle, square, triangle,
//! ring; see `assets/shapes-dit/README.md`), so that `ditto generate` works with no download.
//! The weights are the trained f32 ones (8.5 MB). f16 would halve that, but the 20-step
//! guided sampling amplifies its rounding: samples then differ from the reference by up to 5%
//! (relative), against 1.4e-4 with f32. They are served from memory rather than through
//! [`crate::Model`], whose checkpoint is a memory-mapped folder on disk: writing the bytes to
//! a temporary folder first would leave files behind.

use std::sync::Arc;

use ditto_models::family::{self, ModelFamily};
use ditto_models::{BuildOptions, Shapes};
use ditto_passes::RunOptions;
use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors};

use super::PipelineError;
use crate::Session;

macro_rules! asset {
    ($file:literal) => {
        concat!(env!("CARGO_MANIFEST_DIR"), "/assets/shapes-dit/", $file)
    };
}

/// Where the model lives in the source tree (for messages and tests).
pub const NAME: &str = "built-in shapes-dit";
pub const MODEL_INDEX: &str = include_str!(asset!("model_index.json"));
pub const TRANSFORMER_CONFIG: &str = include_str!(asset!("transformer/config.json"));
pub const SCHEDULER_CONFIG: &str = include_str!(asset!("scheduler/scheduler_config.json"));
/// How the reference samples were made: steps, guidance, class names.
pub const REFERENCE_JSON: &str = include_str!(asset!("reference.json"));
static WEIGHTS: &[u8] = include_bytes!(asset!("transformer/diffusion_pytorch_model.safetensors"));

/// The fields of `reference.json` the defaults come from.
#[derive(serde::Deserialize)]
pub struct Reference {
    pub classes: Vec<String>,
    pub steps: usize,
    pub guidance_scale: f32,
}

pub fn reference() -> Result<Reference, PipelineError> {
    serde_json::from_str(REFERENCE_JSON)
        .map_err(|e| PipelineError::Internal(format!("built-in reference.json: {e}")))
}

/// A transformer whose config and safetensors bytes live in memory.
pub struct EmbeddedModel {
    family: Box<dyn ModelFamily>,
    tensors: SafeTensors<'static>,
}

impl EmbeddedModel {
    pub fn builtin() -> Result<EmbeddedModel, PipelineError> {
        let internal = |what: String| PipelineError::Internal(format!("{NAME}: {what}"));
        let config: serde_json::Value =
            serde_json::from_str(TRANSFORMER_CONFIG).map_err(|e| internal(e.to_string()))?;
        let family = family::from_config(&config, "transformer/config.json")
            .map_err(|e| internal(e.to_string()))?;
        let tensors = SafeTensors::deserialize(WEIGHTS).map_err(|e| internal(e.to_string()))?;
        Ok(EmbeddedModel { family, tensors })
    }

    /// Compiles the forward program for `shapes` the way [`crate::Model::compile`] does
    /// (same graph builder, pass pipeline and lowering) and binds the weights.
    pub fn session(&self, shapes: &Shapes) -> Result<Session, PipelineError> {
        let err = |e: crate::Error| PipelineError::Model {
            component: format!("{NAME} transformer"),
            error: Box::new(e),
        };
        let graph = self
            .family
            .build(shapes, &BuildOptions::default())
            .map_err(|e| err(e.into()))?;
        let (graph, _) = ditto_passes::Pipeline::default_cpu()
            .run(graph, &RunOptions::default())
            .map_err(|e| err(e.into()))?;
        let program = ditto_codegen::lower(&graph).map_err(|e| err(e.into()))?;
        let weights = program
            .weights
            .iter()
            .map(|b| self.load_f32(&b.name, &b.shape))
            .collect::<Result<Vec<_>, _>>()?;
        Session::new(Arc::new(program), Arc::new(weights)).map_err(err)
    }

    fn load_f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, PipelineError> {
        let internal = |what: String| PipelineError::Internal(format!("{NAME}: {what}"));
        let view = self
            .tensors
            .tensor(name)
            .map_err(|e| internal(format!("weight `{name}`: {e}")))?;
        if view.shape() != shape {
            return Err(internal(format!(
                "weight `{name}` has shape {:?}, the program expects {shape:?}",
                view.shape()
            )));
        }
        let bytes = view.data();
        let words = |n: usize| bytes.chunks_exact(n);
        Ok(match view.dtype() {
            Dtype::F32 => words(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F16 => words(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::BF16 => words(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => {
                return Err(internal(format!(
                    "weight `{name}` has unsupported dtype {other:?}"
                )))
            }
        })
    }
}
