//! ditto-models: diffusers checkpoints -> ditto IR graphs.
//!
//! One file per family builds the forward graph from `config.json` (the family is chosen by
//! `_class_name`) using diffusers' weight names, so a checkpoint folder loads as it is.

pub mod checkpoint;
pub mod dit;
pub mod family;
pub mod flux;
pub mod layers;
pub mod pixart;
pub mod sd3;
pub mod tensor_file;
#[cfg(test)]
pub(crate) mod test_support;
pub mod vae;

use std::path::Path;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ModelError {
    #[error(transparent)]
    Ir(#[from] ditto_ir::IrError),
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::CheckpointError),
    #[error("{path}: {reason}")]
    Config { path: String, reason: String },
    #[error("unknown model class `{0}` (supported: DiTTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel, FluxTransformer2DModel, AutoencoderKL)")]
    UnknownClass(String),
    #[error("bad input: {0}")]
    Input(String),
}

/// The sizes a graph is built for. `height`/`width` are in latent pixels (the transformer's
/// input grid, before patching); for Flux, whose input is already packed into tokens, they
/// are the packed grid (latent / 2) and `height * width` is the number of image tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shapes {
    pub batch: usize,
    pub height: usize,
    pub width: usize,
    /// Text tokens (ignored by families without text).
    pub text_len: usize,
}

#[derive(Clone, Debug, Default)]
pub struct BuildOptions {
    /// Also output every block's results as `block.<list>.<i>.out<j>` (diffusers' block outputs
    /// in the fixtures), to localize a mismatch.
    pub block_outputs: bool,
}

/// What `ditto inspect` prints about a model.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub class_name: String,
    pub layers: String,
    pub heads: usize,
    pub head_dim: usize,
    pub hidden: usize,
    pub in_channels: usize,
    pub patch_size: usize,
    /// Image tokens for a latent grid of `height` x `width`.
    pub image_tokens: usize,
}

/// Reads and parses `config.json` of a model folder.
pub fn read_config(dir: &Path) -> Result<serde_json::Value, ModelError> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| ModelError::Config {
        path: path.display().to_string(),
        reason: format!("cannot read: {e}"),
    })?;
    serde_json::from_str(&text).map_err(|e| ModelError::Config {
        path: path.display().to_string(),
        reason: format!("invalid JSON: {e}"),
    })
}

/// Deserializes a family config, naming the file on error.
pub fn parse_config<T: serde::de::DeserializeOwned>(
    value: &serde_json::Value,
    path: &str,
) -> Result<T, ModelError> {
    serde_json::from_value(value.clone()).map_err(|e| ModelError::Config {
        path: path.to_string(),
        reason: e.to_string(),
    })
}
