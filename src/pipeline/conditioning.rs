//! Per-family knowledge the denoising loop needs: the latent layout, the defaults of the
//! diffusers pipeline, and the transformer's inputs for a batch (class labels, prompt
//! embeddings, Flux's ids and embedded guidance), laid out [negative, positive] for
//! classifier-free guidance.

use std::collections::BTreeMap;
use std::path::Path;

use ditto_models::dit::DiTConfig;
use ditto_models::flux::FluxConfig;
use ditto_models::pixart::PixArtConfig;
use ditto_models::sd3::Sd3Config;
use ditto_models::Shapes;

use super::packing;
use super::{PipelineError, PromptEmbeds};
use crate::HostTensor;

/// The transformer of a pipeline, with its parsed `config.json`.
#[derive(Clone, Debug)]
pub enum FamilyConfig {
    Dit(DiTConfig),
    PixArt(PixArtConfig),
    Sd3(Sd3Config),
    Flux(FluxConfig),
}

impl FamilyConfig {
    /// Parses `config.json` text of a pipeline's transformer; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<FamilyConfig, PipelineError> {
        let folder_err = |reason: String| PipelineError::Folder {
            path: path.to_path_buf(),
            reason,
        };
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| folder_err(format!("invalid JSON: {e}")))?;
        let class = value
            .get("_class_name")
            .and_then(|v| v.as_str())
            .ok_or_else(|| folder_err("missing `_class_name`".into()))?;
        let p = path.display().to_string();
        let parsed = match class {
            "DiTTransformer2DModel" => {
                FamilyConfig::Dit(ditto_models::parse_config(&value, &p).map_err(model_err)?)
            }
            "PixArtTransformer2DModel" => {
                FamilyConfig::PixArt(ditto_models::parse_config(&value, &p).map_err(model_err)?)
            }
            "SD3Transformer2DModel" => {
                FamilyConfig::Sd3(ditto_models::parse_config(&value, &p).map_err(model_err)?)
            }
            "FluxTransformer2DModel" => {
                FamilyConfig::Flux(ditto_models::parse_config(&value, &p).map_err(model_err)?)
            }
            other => {
                return Err(folder_err(format!(
                    "transformer class `{other}` cannot drive a generation pipeline (supported: \
                     DiTTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel, \
                     FluxTransformer2DModel)"
                )))
            }
        };
        Ok(parsed)
    }

    /// Short family name, as `ModelFamily::family` spells it.
    pub fn name(&self) -> &'static str {
        match self {
            FamilyConfig::Dit(_) => "dit",
            FamilyConfig::PixArt(_) => "pixart",
            FamilyConfig::Sd3(_) => "sd3",
            FamilyConfig::Flux(_) => "flux",
        }
    }

    /// Channels of the (unpacked) latent image.
    pub fn latent_channels(&self) -> usize {
        match self {
            FamilyConfig::Dit(c) => c.in_channels,
            FamilyConfig::PixArt(c) => c.in_channels,
            FamilyConfig::Sd3(c) => c.in_channels,
            // A packed token holds a 2x2 block of latent pixels.
            FamilyConfig::Flux(c) => c.in_channels / 4,
        }
    }

    /// Output channels per position (2 x latent channels for learned sigma).
    fn out_channels(&self) -> usize {
        match self {
            FamilyConfig::Dit(c) => c.out_channels(),
            FamilyConfig::PixArt(c) => c.out_channels(),
            FamilyConfig::Sd3(c) => c.out_channels.unwrap_or(c.in_channels),
            FamilyConfig::Flux(c) => c.out_channels.unwrap_or(c.in_channels),
        }
    }

    /// diffusers' test `out_channels // 2 == latent_channels` (DiTPipeline, PixArt): the
    /// model predicts [epsilon; variance] and the pipeline keeps epsilon.
    pub fn learned_sigma(&self) -> bool {
        matches!(self, FamilyConfig::Dit(_) | FamilyConfig::PixArt(_))
            && self.out_channels() / 2 == self.latent_channels()
    }

    /// The patch size latent sides must be multiples of (2 for Flux's packing).
    pub fn patch(&self) -> usize {
        match self {
            FamilyConfig::Dit(c) => c.patch_size,
            FamilyConfig::PixArt(c) => c.patch_size,
            FamilyConfig::Sd3(c) => c.patch_size,
            FamilyConfig::Flux(_) => 2,
        }
    }

    /// The unpacked latent size a pipeline uses when no size is given: the config's
    /// `sample_size`, and for Flux FluxPipeline's `default_sample_size` of 128 (1024 px).
    pub fn default_latent_size(&self) -> usize {
        match self {
            FamilyConfig::Dit(c) => c.sample_size,
            FamilyConfig::PixArt(c) => c.sample_size,
            FamilyConfig::Sd3(c) => c.sample_size,
            FamilyConfig::Flux(_) => 128,
        }
    }

    /// `num_inference_steps` and `guidance_scale` defaults of the diffusers pipelines
    /// (DiTPipeline, PixArtSigmaPipeline, StableDiffusion3Pipeline, FluxPipeline).
    pub fn pipeline_defaults(&self) -> (usize, f32) {
        match self {
            FamilyConfig::Dit(_) => (50, 4.0),
            FamilyConfig::PixArt(_) => (20, 4.5),
            FamilyConfig::Sd3(_) => (28, 7.0),
            FamilyConfig::Flux(_) => (28, 3.5),
        }
    }

    /// Whether `guidance` means classifier-free guidance: diffusers runs it when the scale
    /// is > 1. Flux-dev embeds the scale instead (no CFG batch).
    pub fn uses_cfg(&self, guidance: f32) -> bool {
        !matches!(self, FamilyConfig::Flux(_)) && guidance > 1.0
    }

    /// Number of classes of a class-conditional model (the null class is this number).
    pub fn num_classes(&self) -> Option<usize> {
        match self {
            FamilyConfig::Dit(c) => c.num_embeds_ada_norm,
            _ => None,
        }
    }

    /// Tokens of the image sequence for a latent grid, the `image_seq_len` of the
    /// resolution-dependent shift (SD3: patches; Flux: packed tokens).
    pub fn image_seq_len(&self, lh: usize, lw: usize) -> usize {
        let p = self.patch().max(1);
        (lh / p) * (lw / p)
    }

    /// The transformer's `hidden_states` shape for B samples of an lh x lw latent.
    pub fn latent_shape(&self, b: usize, lh: usize, lw: usize) -> Vec<usize> {
        let c = self.latent_channels();
        match self {
            FamilyConfig::Flux(_) => vec![b, (lh / 2) * (lw / 2), c * 4],
            _ => vec![b, c, lh, lw],
        }
    }
}

fn model_err(e: ditto_models::ModelError) -> PipelineError {
    PipelineError::model("transformer", e)
}

/// What the request conditions on, per sample (already broadcast to B samples).
pub enum Condition<'a> {
    Classes(Vec<usize>),
    Text(&'a PromptEmbeds),
}

/// The transformer inputs that stay fixed over the steps, and how to read its output.
pub struct BatchInputs {
    /// Everything but `hidden_states` and `timestep`, which [`BatchInputs::set_step`] fills.
    pub inputs: BTreeMap<String, HostTensor>,
    pub shapes: Shapes,
    pub cfg: bool,
}

impl BatchInputs {
    /// Builds the fixed inputs for `samples` samples of an lh x lw latent.
    pub fn new(
        family: &FamilyConfig,
        condition: &Condition,
        samples: usize,
        (lh, lw): (usize, usize),
        guidance: f32,
    ) -> Result<BatchInputs, PipelineError> {
        let cfg = family.uses_cfg(guidance);
        let rows = if cfg { 2 * samples } else { samples };
        let mut inputs = BTreeMap::new();
        let mut text_len = 0;
        match (family, condition) {
            (FamilyConfig::Dit(c), Condition::Classes(labels)) => {
                let classes = c.num_embeds_ada_norm.unwrap_or(0);
                check_labels(labels, classes)?;
                // [null class x B, labels]: the null class is num_embeds_ada_norm.
                let mut v: Vec<f32> = Vec::with_capacity(rows);
                if cfg {
                    v.extend(std::iter::repeat_n(classes as f32, samples));
                }
                v.extend(labels.iter().map(|&l| l as f32));
                inputs.insert("class_labels".into(), HostTensor::new(vec![rows], v));
            }
            (FamilyConfig::Dit(_), Condition::Text(_)) => {
                return Err(PipelineError::Request(
                    "this DiT is class-conditional: give class labels, not prompt embeddings"
                        .into(),
                ))
            }
            (_, Condition::Classes(_)) => {
                return Err(PipelineError::Request(format!(
                    "a {} pipeline is conditioned on text: give prompt embeddings (--prompt-embeds), not class labels",
                    family.name()
                )))
            }
            (FamilyConfig::PixArt(c), Condition::Text(p)) => {
                let ehs = text_batch(p, "prompt_embeds", c.text_channels(), samples, cfg)?;
                text_len = ehs.shape[1];
                inputs.insert("encoder_hidden_states".into(), ehs);
            }
            (FamilyConfig::Sd3(c), Condition::Text(p)) => {
                let ehs = text_batch(p, "prompt_embeds", c.joint_attention_dim, samples, cfg)?;
                text_len = ehs.shape[1];
                inputs.insert("encoder_hidden_states".into(), ehs);
                let pooled =
                    text_batch(p, "pooled_prompt_embeds", c.pooled_projection_dim, samples, cfg)?;
                inputs.insert("pooled_projections".into(), pooled);
            }
            (FamilyConfig::Flux(c), Condition::Text(p)) => {
                let ehs = text_batch(p, "prompt_embeds", c.joint_attention_dim, samples, false)?;
                text_len = ehs.shape[1];
                inputs.insert("encoder_hidden_states".into(), ehs);
                let pooled = text_batch(
                    p,
                    "pooled_prompt_embeds",
                    c.pooled_projection_dim,
                    samples,
                    false,
                )?;
                inputs.insert("pooled_projections".into(), pooled);
                inputs.insert(
                    "img_ids".into(),
                    packing::latent_image_ids(lh / 2, lw / 2),
                );
                inputs.insert("txt_ids".into(), packing::text_ids(text_len));
                if c.guidance_embeds {
                    // FluxPipeline: torch.full([1], guidance_scale).expand(B); the model
                    // multiplies it by 1000 itself.
                    inputs.insert(
                        "guidance".into(),
                        HostTensor::new(vec![samples], vec![guidance; samples]),
                    );
                }
            }
        }
        let (height, width) = match family {
            FamilyConfig::Flux(_) => (lh / 2, lw / 2),
            _ => (lh, lw),
        };
        Ok(BatchInputs {
            inputs,
            shapes: Shapes {
                batch: rows,
                height,
                width,
                text_len,
            },
            cfg,
        })
    }

    /// Sets `hidden_states` (the latents, twice over for CFG) and `timestep` for one step.
    /// Flux takes `t / 1000` (FluxPipeline divides; the model multiplies back).
    pub fn set_step(&mut self, family: &FamilyConfig, latents: &HostTensor, t: f32) {
        let hs = if self.cfg {
            let mut shape = latents.shape.clone();
            shape[0] *= 2;
            let mut data = Vec::with_capacity(latents.data.len() * 2);
            data.extend_from_slice(&latents.data);
            data.extend_from_slice(&latents.data);
            HostTensor::new(shape, data)
        } else {
            latents.clone()
        };
        self.inputs.insert("hidden_states".into(), hs);
        self.set_timestep(family, t);
    }

    /// Sets `timestep` alone (what the pipeline stages after the first take).
    pub fn set_timestep(&mut self, family: &FamilyConfig, t: f32) {
        let rows = self.shapes.batch;
        let t = match family {
            FamilyConfig::Flux(_) => t / 1000.0,
            _ => t,
        };
        self.inputs.insert(
            "timestep".into(),
            HostTensor::new(vec![rows], vec![t; rows]),
        );
    }
}

fn check_labels(labels: &[usize], classes: usize) -> Result<(), PipelineError> {
    if labels.is_empty() {
        return Err(PipelineError::Request(
            "a class-conditional DiT needs at least one class label (--class-label)".into(),
        ));
    }
    if let Some(&bad) = labels.iter().find(|&&l| l >= classes) {
        return Err(PipelineError::Request(format!(
            "class label {bad} is out of range: this model has {classes} classes (0..={}); {classes} is the null class used for guidance",
            classes.saturating_sub(1)
        )));
    }
    Ok(())
}

/// The text input `name` for the transformer batch: [negative x B; positive x B] with CFG,
/// else the positive embeddings, each broadcast from batch 1 or taken as B rows. The last
/// axis must be `width`.
fn text_batch(
    p: &PromptEmbeds,
    name: &str,
    width: usize,
    samples: usize,
    cfg: bool,
) -> Result<HostTensor, PipelineError> {
    let (pos, neg) = match name {
        "prompt_embeds" => (Some(&p.prompt_embeds), p.negative_prompt_embeds.as_ref()),
        _ => (
            p.pooled_prompt_embeds.as_ref(),
            p.negative_pooled_prompt_embeds.as_ref(),
        ),
    };
    let pos = pos.ok_or_else(|| {
        PipelineError::Embeddings(format!("`{name}` is missing (this transformer needs it)"))
    })?;
    let pos = broadcast(pos, name, width, samples)?;
    if !cfg {
        return Ok(pos);
    }
    let neg_name = format!("negative_{name}");
    let neg = neg.ok_or_else(|| {
        PipelineError::Embeddings(format!(
            "`{neg_name}` is missing: classifier-free guidance (guidance > 1) needs the text \
             encoder's output for the negative (or empty) prompt; or run with --guidance 1"
        ))
    })?;
    let neg = broadcast(neg, &neg_name, width, samples)?;
    if neg.shape != pos.shape {
        return Err(PipelineError::Embeddings(format!(
            "`{neg_name}` has shape {:?} but `{name}` has {:?}; they are batched together, so pad both to the same length",
            neg.shape, pos.shape
        )));
    }
    let mut shape = pos.shape.clone();
    shape[0] *= 2;
    let mut data = neg.data;
    data.extend_from_slice(&pos.data);
    Ok(HostTensor::new(shape, data))
}

/// Checks the width and repeats a batch-1 tensor `samples` times.
fn broadcast(
    t: &HostTensor,
    name: &str,
    width: usize,
    samples: usize,
) -> Result<HostTensor, PipelineError> {
    let rank_ok = if name.contains("pooled") {
        t.shape.len() == 2
    } else {
        t.shape.len() == 3 && t.shape[1] > 0
    };
    let what = if name.contains("pooled") {
        "[B, width]"
    } else {
        "[B, tokens, width]"
    };
    if !rank_ok || t.shape[0] == 0 {
        return Err(PipelineError::Embeddings(format!(
            "`{name}` has shape {:?}, expected {what}",
            t.shape
        )));
    }
    let got = t.shape[t.shape.len() - 1];
    if got != width {
        return Err(PipelineError::Embeddings(format!(
            "`{name}` has width {got} (shape {:?}) but this transformer takes {width}: embeddings from a different text encoder?",
            t.shape
        )));
    }
    match t.shape[0] {
        b if b == samples => Ok(t.clone()),
        1 => {
            let mut shape = t.shape.clone();
            shape[0] = samples;
            Ok(HostTensor::new(shape, t.data.repeat(samples)))
        }
        b => Err(PipelineError::Embeddings(format!(
            "`{name}` has batch {b}, but {samples} samples are generated (give batch 1 or {samples})"
        ))),
    }
}
