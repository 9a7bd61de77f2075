//! Dispatch from `config.json`'s `_class_name` to the family that builds the graph.

use std::collections::BTreeMap;

use ditto_ir::Graph;

use crate::{parse_config, BuildOptions, ModelError, Shapes, Summary};

/// What every model family provides.
pub trait ModelFamily: Send + Sync {
    /// diffusers' `_class_name`.
    fn class_name(&self) -> &'static str;
    /// Short family name (`dit`, `pixart`, `sd3`, `flux`, `vae`).
    fn family(&self) -> &'static str;
    fn validate(&self) -> Result<(), ModelError>;
    fn build(&self, shapes: &Shapes, opts: &BuildOptions) -> Result<Graph, ModelError>;
    fn shapes_from_inputs(
        &self,
        inputs: &BTreeMap<String, Vec<usize>>,
    ) -> Result<Shapes, ModelError>;
    fn default_shapes(&self) -> Shapes;
    fn summary(&self, shapes: &Shapes) -> Summary;
    /// Pixels per latent pixel of the pipeline's VAE this model usually pairs with (8 for the
    /// latent families); `ditto compile --height/--width` divide by it.
    fn vae_scale_factor(&self) -> usize {
        8
    }
}

macro_rules! impl_family {
    ($ty:ty, $class:literal, $fam:literal) => {
        impl ModelFamily for $ty {
            fn class_name(&self) -> &'static str {
                $class
            }
            fn family(&self) -> &'static str {
                $fam
            }
            fn validate(&self) -> Result<(), ModelError> {
                <$ty>::validate(self)
            }
            fn build(&self, shapes: &Shapes, opts: &BuildOptions) -> Result<Graph, ModelError> {
                <$ty>::build(self, shapes, opts)
            }
            fn shapes_from_inputs(
                &self,
                inputs: &BTreeMap<String, Vec<usize>>,
            ) -> Result<Shapes, ModelError> {
                <$ty>::shapes_from_inputs(self, inputs)
            }
            fn default_shapes(&self) -> Shapes {
                <$ty>::default_shapes(self)
            }
            fn summary(&self, shapes: &Shapes) -> Summary {
                <$ty>::summary(self, shapes)
            }
            fn vae_scale_factor(&self) -> usize {
                vae_scale_factor_of(self)
            }
        }
    };
}

trait VaeScale {
    fn vae_scale(&self) -> usize {
        8
    }
}
fn vae_scale_factor_of<T: VaeScale>(t: &T) -> usize {
    t.vae_scale()
}

impl VaeScale for crate::vae::AutoencoderKLConfig {
    // A VAE's own input is the latent, so pixel sizes given to it mean latent pixels times
    // its own scale factor.
    fn vae_scale(&self) -> usize {
        self.scale_factor()
    }
}
impl_family!(crate::vae::AutoencoderKLConfig, "AutoencoderKL", "vae");

impl VaeScale for crate::dit::DiTConfig {}
impl_family!(crate::dit::DiTConfig, "DiTTransformer2DModel", "dit");

impl VaeScale for crate::pixart::PixArtConfig {}
impl_family!(
    crate::pixart::PixArtConfig,
    "PixArtTransformer2DModel",
    "pixart"
);

impl VaeScale for crate::sd3::Sd3Config {}
impl_family!(crate::sd3::Sd3Config, "SD3Transformer2DModel", "sd3");

// Flux's input is the latent packed 2x2 into tokens, so one token covers 16x16 pixels.
impl VaeScale for crate::flux::FluxConfig {
    fn vae_scale(&self) -> usize {
        16
    }
}
impl_family!(crate::flux::FluxConfig, "FluxTransformer2DModel", "flux");

/// Parses a `config.json` value into its family. `path` names the file in errors.
pub fn from_config(
    value: &serde_json::Value,
    path: &str,
) -> Result<Box<dyn ModelFamily>, ModelError> {
    let class = value
        .get("_class_name")
        .and_then(|v| v.as_str())
        .ok_or_else(|| ModelError::Config {
            path: path.to_string(),
            reason: "missing `_class_name`".into(),
        })?;
    let family: Box<dyn ModelFamily> = match class {
        "AutoencoderKL" => Box::new(parse_config::<crate::vae::AutoencoderKLConfig>(
            value, path,
        )?),
        "DiTTransformer2DModel" => Box::new(parse_config::<crate::dit::DiTConfig>(value, path)?),
        "PixArtTransformer2DModel" => {
            Box::new(parse_config::<crate::pixart::PixArtConfig>(value, path)?)
        }
        "SD3Transformer2DModel" => Box::new(parse_config::<crate::sd3::Sd3Config>(value, path)?),
        "FluxTransformer2DModel" => Box::new(parse_config::<crate::flux::FluxConfig>(value, path)?),
        other => return Err(ModelError::UnknownClass(other.to_string())),
    };
    family.validate()?;
    Ok(family)
}
