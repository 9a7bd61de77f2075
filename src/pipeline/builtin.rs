//! The built-in default model, `assets/shapes-dit`, compiled into the binary.
//!
//! A small class-conditional DiT in pixel space (32x32 RGB; classes circle, square, triangle,
//! ring; see `assets/shapes-dit/README.md`), so that `ditto generate` works with no download.
//! The weights are the trained f32 ones (8.5 MB). f16 would halve that, but the 20-step
//! guided sampling amplifies its rounding: samples then differ from the reference by up to 5%
//! (relative), against 1.4e-4 with f32. They are served from memory: the transformer is a
//! [`crate::Model`] over [`Checkpoint::from_static_bytes`], compiled and bound to its weights
//! the same way as a folder's, without writing the bytes to a temporary folder (which would
//! leave files behind).

use std::path::Path;

use ditto_models::checkpoint::{Checkpoint, WEIGHTS_NAME};

use super::PipelineError;
use crate::Model;

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

/// The transformer, its weights read from the bytes compiled into the binary.
pub fn transformer() -> Result<Model, PipelineError> {
    let dir = Path::new(NAME).join("transformer");
    let config: serde_json::Value = serde_json::from_str(TRANSFORMER_CONFIG)
        .map_err(|e| PipelineError::Internal(format!("{NAME}: transformer/config.json: {e}")))?;
    let label = dir.join(WEIGHTS_NAME).display().to_string();
    Checkpoint::from_static_bytes(&label, WEIGHTS)
        .map_err(crate::Error::from)
        .and_then(|checkpoint| Model::from_parts(dir, &config, checkpoint))
        .map_err(|error| PipelineError::model("loading the transformer", error))
}
