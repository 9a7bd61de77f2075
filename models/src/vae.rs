//! diffusers `AutoencoderKL`, decode path only: what `vae.decode(latents)` computes.
//!
//! `post_quant_conv` (1x1, when `use_post_quant_conv`) -> `decoder`: `conv_in` -> `mid_block`
//! (resnet, single-head self-attention over the H*W positions, resnet) -> `up_blocks` (widest
//! channels first, each `layers_per_block + 1` resnets and, except the last, a nearest x2
//! upsample + 3x3 conv) -> `conv_norm_out` -> SiLU -> `conv_out`.
//!
//! The pipeline's latent scaling (`latents / scaling_factor + shift_factor`) is not part of
//! the graph; the fields are exposed for the pipeline to apply. Ignored config fields:
//! `force_upcast` (only selects a dtype in diffusers; ditto computes in f32), `latents_mean` /
//! `latents_std` (pipeline-side normalization some pipelines do, not part of `decode`), and the
//! encoder (`in_channels`, `use_quant_conv`): its weights `encoder.*` and `quant_conv.*` are
//! simply not referenced by the decode graph.
//!
//! Block outputs (`opts.block_outputs`): `block.up_blocks.<i>.out0` = output of up block i.

use std::collections::BTreeMap;

use ditto_ir::{DType, Graph, Id};

use crate::layers::{self, R};
use crate::{BuildOptions, ModelError, Shapes, Summary};

/// Epsilon of every GroupNorm in diffusers' VAE decoder (resnets, attention, conv_norm_out).
const EPS: f64 = 1e-6;

const UP_BLOCK: &str = "UpDecoderBlock2D";
const DOWN_BLOCK: &str = "DownEncoderBlock2D";

/// `sample_size` is an int in most configs, a `[height, width]` pair in some.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(untagged)]
pub enum SampleSize {
    Square(usize),
    Pair(Vec<usize>),
}

impl Default for SampleSize {
    fn default() -> Self {
        SampleSize::Square(32)
    }
}

impl SampleSize {
    /// (height, width) in image pixels, or `None` when the list is not a pair.
    pub fn hw(&self) -> Option<(usize, usize)> {
        match self {
            SampleSize::Square(s) => Some((*s, *s)),
            SampleSize::Pair(v) => match v.as_slice() {
                [h, w] => Some((*h, *w)),
                _ => None,
            },
        }
    }
}

/// `AutoencoderKL`'s config.json, with diffusers' defaults.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct AutoencoderKLConfig {
    #[serde(default = "d_3")]
    pub in_channels: usize,
    #[serde(default = "d_3")]
    pub out_channels: usize,
    #[serde(default = "d_down_block_types")]
    pub down_block_types: Vec<String>,
    #[serde(default = "d_up_block_types")]
    pub up_block_types: Vec<String>,
    #[serde(default = "d_block_out_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d_1")]
    pub layers_per_block: usize,
    #[serde(default = "d_act_fn")]
    pub act_fn: String,
    #[serde(default = "d_4")]
    pub latent_channels: usize,
    #[serde(default = "d_32")]
    pub norm_num_groups: usize,
    #[serde(default)]
    pub sample_size: SampleSize,
    /// The pipeline divides by this before decoding (not applied by the graph).
    #[serde(default = "d_scaling_factor")]
    pub scaling_factor: f64,
    /// The pipeline adds this after dividing by `scaling_factor` (SD3, Flux); `None` elsewhere.
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "d_true")]
    pub use_quant_conv: bool,
    #[serde(default = "d_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "d_true")]
    pub mid_block_add_attention: bool,
}

fn d_1() -> usize {
    1
}
fn d_3() -> usize {
    3
}
fn d_4() -> usize {
    4
}
fn d_32() -> usize {
    32
}
fn d_true() -> bool {
    true
}
fn d_down_block_types() -> Vec<String> {
    vec![DOWN_BLOCK.to_string()]
}
fn d_up_block_types() -> Vec<String> {
    vec![UP_BLOCK.to_string()]
}
fn d_block_out_channels() -> Vec<usize> {
    vec![64]
}
fn d_act_fn() -> String {
    "silu".to_string()
}
fn d_scaling_factor() -> f64 {
    0.18215
}

fn config_err(field: &str, reason: impl Into<String>) -> ModelError {
    ModelError::Config {
        path: format!("AutoencoderKL config `{field}`"),
        reason: reason.into(),
    }
}

/// The resnets' nonlinearity (diffusers `get_activation(act_fn)`); the decoder's final
/// activation before `conv_out` is always SiLU whatever `act_fn` says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Act {
    Silu,
    Gelu,
}

impl AutoencoderKLConfig {
    /// 2^(number of blocks - 1): image pixels per latent pixel along each axis.
    pub fn scale_factor(&self) -> usize {
        1usize
            .checked_shl(self.block_out_channels.len().saturating_sub(1) as u32)
            .unwrap_or(0)
    }

    fn act(&self) -> Result<Act, ModelError> {
        match self.act_fn.as_str() {
            "silu" | "swish" => Ok(Act::Silu),
            "gelu" => Ok(Act::Gelu),
            other => Err(config_err(
                "act_fn",
                format!("unsupported activation `{other}` (supported: silu, swish, gelu)"),
            )),
        }
    }

    pub fn validate(&self) -> Result<(), ModelError> {
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err(config_err("block_out_channels", "must not be empty"));
        }
        // The up blocks double the resolution n-1 times; beyond this the factor overflows.
        if n > 16 {
            return Err(config_err(
                "block_out_channels",
                format!("{n} blocks is more than the 16 supported"),
            ));
        }
        if self.norm_num_groups == 0 {
            return Err(config_err("norm_num_groups", "must be positive"));
        }
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            if c == 0 || c % self.norm_num_groups != 0 {
                return Err(config_err(
                    "block_out_channels",
                    format!(
                        "entry {i} = {c} must be a positive multiple of norm_num_groups = {}",
                        self.norm_num_groups
                    ),
                ));
            }
        }
        if self.latent_channels == 0 {
            return Err(config_err("latent_channels", "must be positive"));
        }
        if self.out_channels == 0 {
            return Err(config_err("out_channels", "must be positive"));
        }
        // diffusers pairs up block i with reversed(block_out_channels)[i] and marks the last
        // block by len(block_out_channels), so the lengths must agree (likewise the encoder).
        for (field, types, want) in [
            ("up_block_types", &self.up_block_types, UP_BLOCK),
            ("down_block_types", &self.down_block_types, DOWN_BLOCK),
        ] {
            if let Some(t) = types.iter().find(|t| t.as_str() != want) {
                return Err(config_err(
                    field,
                    format!("unsupported block type `{t}` (only {want} is implemented)"),
                ));
            }
            if types.len() != n {
                return Err(config_err(
                    field,
                    format!("has {} entries but block_out_channels has {n}", types.len()),
                ));
            }
        }
        self.act()?;
        if !self.scaling_factor.is_finite() || self.scaling_factor == 0.0 {
            return Err(config_err(
                "scaling_factor",
                format!("must be finite and non-zero, got {}", self.scaling_factor),
            ));
        }
        if let Some(s) = self.shift_factor {
            if !s.is_finite() {
                return Err(config_err(
                    "shift_factor",
                    format!("must be finite, got {s}"),
                ));
            }
        }
        match self.sample_size.hw() {
            Some((h, w)) if h > 0 && w > 0 => {}
            _ => {
                return Err(config_err(
                    "sample_size",
                    format!(
                        "must be a positive int or [height, width], got {:?}",
                        self.sample_size
                    ),
                ))
            }
        }
        Ok(())
    }

    /// Channels of the mid block (the widest, last entry of `block_out_channels`).
    fn mid_channels(&self) -> usize {
        self.block_out_channels.last().copied().unwrap_or(0)
    }

    pub fn shapes_from_inputs(
        &self,
        inputs: &BTreeMap<String, Vec<usize>>,
    ) -> Result<Shapes, ModelError> {
        if let Some(other) = inputs.keys().find(|k| k.as_str() != "latents") {
            return Err(ModelError::Input(format!(
                "unexpected input `{other}`: AutoencoderKL decode takes only `latents`"
            )));
        }
        let s = inputs.get("latents").ok_or_else(|| {
            ModelError::Input("missing input `latents` [B, latent_channels, h, w]".into())
        })?;
        let c = self.latent_channels;
        match s.as_slice() {
            &[b, ch, h, w] if ch == c && b > 0 && h > 0 && w > 0 => Ok(Shapes {
                batch: b,
                height: h,
                width: w,
                text_len: 0,
            }),
            _ => Err(ModelError::Input(format!(
                "latents has shape {s:?}, expected [B, {c}, h, w] with B, h, w positive"
            ))),
        }
    }

    /// The latent grid of a `sample_size` image, batch 2 (text length unused).
    pub fn default_shapes(&self) -> Shapes {
        let (h, w) = self.sample_size.hw().unwrap_or((32, 32));
        let f = self.scale_factor().max(1);
        Shapes {
            batch: 2,
            height: (h / f).max(1),
            width: (w / f).max(1),
            text_len: 0,
        }
    }

    /// `heads`/`head_dim`/`hidden` describe the mid-block attention (one head over all
    /// channels); `image_tokens` is its sequence length h*w (0 without it); no patching.
    pub fn summary(&self, shapes: &Shapes) -> Summary {
        let attn = self.mid_block_add_attention;
        Summary {
            class_name: "AutoencoderKL".into(),
            layers: format!(
                "decoder: mid block ({}) + {} up blocks x {} resnets, output x{}",
                if attn {
                    "2 resnets + attention"
                } else {
                    "2 resnets"
                },
                self.up_block_types.len(),
                self.layers_per_block + 1,
                self.scale_factor()
            ),
            heads: usize::from(attn),
            head_dim: if attn { self.mid_channels() } else { 0 },
            hidden: self.mid_channels(),
            in_channels: self.latent_channels,
            patch_size: 1,
            image_tokens: if attn {
                shapes.height * shapes.width
            } else {
                0
            },
        }
    }

    pub fn build(&self, shapes: &Shapes, opts: &BuildOptions) -> Result<Graph, ModelError> {
        self.validate()?;
        let Shapes {
            batch,
            height,
            width,
            ..
        } = *shapes;
        if batch == 0 || height == 0 || width == 0 {
            return Err(ModelError::Input(format!(
                "latents [B, {}, h, w] needs positive sizes, got B = {batch}, h = {height}, w = {width}",
                self.latent_channels
            )));
        }
        let act = self.act()?;
        let groups = self.norm_num_groups;
        let lc = self.latent_channels;
        let mut g = Graph::new();
        let latents = g.input("latents", DType::F32, &[batch, lc, height, width])?;

        let mut x = latents;
        if self.use_post_quant_conv {
            x = conv(&mut g, x, "post_quant_conv", lc, lc, 1)?;
        }

        let mid = self.mid_channels();
        x = conv(&mut g, x, "decoder.conv_in", lc, mid, 3)?;

        x = resnet(
            &mut g,
            x,
            "decoder.mid_block.resnets.0",
            mid,
            mid,
            groups,
            act,
        )?;
        if self.mid_block_add_attention {
            x = mid_attention(&mut g, x, "decoder.mid_block.attentions.0", groups)?;
        }
        x = resnet(
            &mut g,
            x,
            "decoder.mid_block.resnets.1",
            mid,
            mid,
            groups,
            act,
        )?;

        let reversed: Vec<usize> = self.block_out_channels.iter().rev().copied().collect();
        let mut ch = mid;
        for (i, &out) in reversed.iter().enumerate() {
            let prefix = format!("decoder.up_blocks.{i}");
            for j in 0..=self.layers_per_block {
                let cin = if j == 0 { ch } else { out };
                x = resnet(
                    &mut g,
                    x,
                    &format!("{prefix}.resnets.{j}"),
                    cin,
                    out,
                    groups,
                    act,
                )?;
            }
            ch = out;
            if i + 1 < reversed.len() {
                x = g.upsample_nearest(x, 2)?;
                x = conv(&mut g, x, &format!("{prefix}.upsamplers.0.conv"), ch, ch, 3)?;
            }
            if opts.block_outputs {
                g.output(&format!("block.up_blocks.{i}.out0"), x);
            }
        }

        x = group_norm_affine(&mut g, x, "decoder.conv_norm_out", groups)?;
        x = g.silu(x)?;
        x = conv(&mut g, x, "decoder.conv_out", ch, self.out_channels, 3)?;
        g.output("sample", x);
        Ok(g)
    }
}

/// `nn.Conv2d(cin, cout, k, padding=k/2)` with bias at `prefix`.
fn conv(g: &mut Graph, x: Id, prefix: &str, cin: usize, cout: usize, k: usize) -> R {
    let w = g.weight(&format!("{prefix}.weight"), &[cout, cin, k, k])?;
    let b = g.weight(&format!("{prefix}.bias"), &[cout])?;
    Ok(g.conv2d(x, w, b, 1, k / 2)?)
}

/// `nn.GroupNorm(groups, C, eps=1e-6, affine=True)` on x[B, C, H, W].
fn group_norm_affine(g: &mut Graph, x: Id, prefix: &str, groups: usize) -> R {
    let c = g.shape(x)[1];
    let n = g.group_norm(x, groups, EPS)?;
    let w = g.weight(&format!("{prefix}.weight"), &[c])?;
    let b = g.weight(&format!("{prefix}.bias"), &[c])?;
    let w = g.reshape(w, &[c, 1, 1])?;
    let b = g.reshape(b, &[c, 1, 1])?;
    let y = g.mul(n, w)?;
    Ok(g.add_(y, b)?)
}

fn activate(g: &mut Graph, x: Id, act: Act) -> R {
    Ok(match act {
        Act::Silu => g.silu(x)?,
        Act::Gelu => g.gelu(x)?,
    })
}

/// diffusers `ResnetBlock2D` without a time embedding and with output_scale_factor 1:
/// conv2(act(norm2(conv1(act(norm1(x)))))) + shortcut(x), the shortcut a 1x1 conv only when
/// the channel count changes.
fn resnet(
    g: &mut Graph,
    x: Id,
    prefix: &str,
    cin: usize,
    cout: usize,
    groups: usize,
    act: Act,
) -> R {
    let h = group_norm_affine(g, x, &format!("{prefix}.norm1"), groups)?;
    let h = activate(g, h, act)?;
    let h = conv(g, h, &format!("{prefix}.conv1"), cin, cout, 3)?;
    let h = group_norm_affine(g, h, &format!("{prefix}.norm2"), groups)?;
    let h = activate(g, h, act)?;
    let h = conv(g, h, &format!("{prefix}.conv2"), cout, cout, 3)?;
    let shortcut = if cin != cout {
        conv(g, x, &format!("{prefix}.conv_shortcut"), cin, cout, 1)?
    } else {
        x
    };
    Ok(g.add_(shortcut, h)?)
}

/// The mid block's `Attention` (built with `_from_deprecated_attn_block`): GroupNorm over
/// channels, then the H*W positions as tokens of C features, one head of size C (diffusers:
/// heads = in_channels // attention_head_dim with attention_head_dim = in_channels), scale
/// C^-0.5, to_out.0, plus the input (residual_connection, rescale_output_factor 1).
fn mid_attention(g: &mut Graph, x: Id, prefix: &str, groups: usize) -> R {
    let s = g.shape(x).to_vec();
    let (b, c, h, w) = (s[0], s[1], s[2], s[3]);
    let n = group_norm_affine(g, x, &format!("{prefix}.group_norm"), groups)?;
    let t = g.reshape(n, &[b, c, h * w])?;
    let t = g.permute(t, &[0, 2, 1])?;
    let [q, k, v] = layers::qkv(g, t, prefix, c, c, true)?;
    let a = g.attention(q, k, v, 1, 1.0 / (c as f64).sqrt())?;
    let o = layers::linear(g, a, &format!("{prefix}.to_out.0"), c, c, true)?;
    let o = g.permute(o, &[0, 2, 1])?;
    let o = g.reshape(o, &[b, c, h, w])?;
    Ok(g.add_(o, x)?)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use ditto_ir::Op;

    use super::*;
    use crate::test_support::{
        build_all, check_against_fixture, fixture_config, fixture_inputs, output_shape, weights,
    };

    /// The standalone VAE fixture and the VAEs of the pipeline fixtures (SD3's has 16 latent
    /// channels, SD3's and Flux's a shift_factor).
    const DIRS: [&str; 5] = [
        "vae",
        "dit-pipeline/vae",
        "pixart-pipeline/vae",
        "sd3-pipeline/vae",
        "flux-pipeline/vae",
    ];

    fn from_json(v: serde_json::Value) -> AutoencoderKLConfig {
        crate::parse_config(&v, "test").expect("parse config")
    }

    fn base() -> AutoencoderKLConfig {
        fixture_config("vae")
    }

    fn shapes(batch: usize, height: usize, width: usize) -> Shapes {
        Shapes {
            batch,
            height,
            width,
            text_len: 0,
        }
    }

    fn count_attention(g: &Graph) -> usize {
        g.nodes()
            .iter()
            .filter(|n| matches!(n, Op::Attention(_)))
            .count()
    }

    #[test]
    fn fixtures_weights_and_shapes_match() {
        for rel in DIRS {
            let cfg: AutoencoderKLConfig = fixture_config(rel);
            cfg.validate().expect("valid");
            let s = cfg
                .shapes_from_inputs(&fixture_inputs(rel))
                .expect("shapes");
            // The fixtures record no block outputs.
            let g = cfg.build(&s, &BuildOptions::default()).expect("build");
            // The encoder half of the autoencoder is not part of decode.
            check_against_fixture(&g, rel, &["encoder.", "quant_conv."]);
            assert_eq!(count_attention(&g), 1);
            // The pipeline's scaling is not part of the graph.
            assert_eq!(cfg.scaling_factor, 0.5);
            assert_eq!(cfg.scale_factor(), 2);
        }
    }

    #[test]
    fn pipeline_fields() {
        let sd3 = fixture_config::<AutoencoderKLConfig>("sd3-pipeline/vae");
        assert_eq!(sd3.shift_factor, Some(0.1));
        assert_eq!(sd3.latent_channels, 16);
        assert_eq!(
            fixture_config::<AutoencoderKLConfig>("flux-pipeline/vae").shift_factor,
            Some(0.1)
        );
        assert_eq!(base().shift_factor, None);
    }

    #[test]
    fn block_outputs() {
        let cfg = base();
        let g = build_all(&cfg, shapes(1, 8, 8));
        assert_eq!(output_shape(&g, "block.up_blocks.0.out0"), [1, 64, 16, 16]);
        assert_eq!(output_shape(&g, "block.up_blocks.1.out0"), [1, 32, 16, 16]);
        let names: Vec<&str> = g.outputs.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            ["block.up_blocks.0.out0", "block.up_blocks.1.out0", "sample"]
        );
        let plain = cfg
            .build(&shapes(1, 8, 8), &BuildOptions::default())
            .expect("build");
        assert_eq!(plain.outputs.len(), 1);
    }

    #[test]
    fn shapes_follow_config() {
        // Three blocks (x4), two resnets per level + 1, odd group count, non-square, batch 3.
        let cfg = from_json(serde_json::json!({
            "block_out_channels": [15, 30, 45],
            "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
            "layers_per_block": 2,
            "norm_num_groups": 5,
            "latent_channels": 3,
            "out_channels": 5,
            "sample_size": [24, 40],
        }));
        cfg.validate().expect("valid");
        assert_eq!(cfg.scale_factor(), 4);
        let d = cfg.default_shapes();
        assert_eq!((d.batch, d.height, d.width), (2, 6, 10));
        let g = build_all(&cfg, shapes(3, 5, 7));
        assert_eq!(output_shape(&g, "sample"), [3, 5, 20, 28]);
        assert_eq!(output_shape(&g, "block.up_blocks.0.out0"), [3, 45, 10, 14]);
        assert_eq!(output_shape(&g, "block.up_blocks.1.out0"), [3, 30, 20, 28]);
        assert_eq!(output_shape(&g, "block.up_blocks.2.out0"), [3, 15, 20, 28]);
        let w = weights(&g);
        assert_eq!(w["decoder.conv_in.weight"], [45, 3, 3, 3]);
        assert_eq!(w["post_quant_conv.weight"], [3, 3, 1, 1]);
        assert_eq!(
            w["decoder.up_blocks.1.resnets.0.conv_shortcut.weight"],
            [30, 45, 1, 1]
        );
        assert_eq!(
            w["decoder.up_blocks.2.resnets.2.conv2.weight"],
            [15, 15, 3, 3]
        );
        assert!(w.contains_key("decoder.up_blocks.1.upsamplers.0.conv.weight"));
        assert!(!w.contains_key("decoder.up_blocks.2.upsamplers.0.conv.weight"));
        assert!(!w.contains_key("decoder.up_blocks.0.resnets.0.conv_shortcut.weight"));
        assert!(!w.contains_key("decoder.up_blocks.1.resnets.1.conv_shortcut.weight"));
        assert_eq!(w["decoder.mid_block.attentions.0.to_q.weight"], [45, 45]);
        assert_eq!(w["decoder.conv_out.weight"], [5, 15, 3, 3]);
        let sum = cfg.summary(&shapes(3, 5, 7));
        assert_eq!((sum.heads, sum.head_dim, sum.image_tokens), (1, 45, 35));
    }

    #[test]
    fn single_block_has_no_upsampler() {
        let cfg = from_json(serde_json::json!({"norm_num_groups": 8}));
        assert_eq!(cfg.block_out_channels, [64]);
        assert_eq!(cfg.scale_factor(), 1);
        let g = cfg
            .build(&shapes(1, 4, 6), &BuildOptions::default())
            .expect("build");
        assert_eq!(output_shape(&g, "sample"), [1, 3, 4, 6]);
        assert!(!weights(&g).keys().any(|k| k.contains("upsamplers")));
    }

    #[test]
    fn optional_parts() {
        let mut cfg = base();
        cfg.mid_block_add_attention = false;
        cfg.use_post_quant_conv = false;
        let g = cfg
            .build(&shapes(2, 3, 5), &BuildOptions::default())
            .expect("build");
        assert_eq!(output_shape(&g, "sample"), [2, 3, 6, 10]);
        let w = weights(&g);
        assert!(!w
            .keys()
            .any(|k| k.contains("attentions") || k.starts_with("post_quant_conv")));
        assert_eq!(count_attention(&g), 0);
        assert_eq!(cfg.summary(&shapes(2, 3, 5)).heads, 0);

        // act_fn only changes the resnets' activation; conv_act stays SiLU.
        let mut gelu = base();
        gelu.act_fn = "gelu".into();
        let g = gelu
            .build(&shapes(1, 2, 2), &BuildOptions::default())
            .expect("build");
        let n = |op: fn(&Op) -> bool| g.nodes().iter().filter(|x| op(x)).count();
        assert_eq!(n(|x| matches!(x, Op::Silu(_))), 1);
        assert!(n(|x| matches!(x, Op::Gelu(_))) > 0);
    }

    #[test]
    fn defaults_match_diffusers() {
        let cfg = from_json(serde_json::json!({"_class_name": "AutoencoderKL"}));
        assert_eq!(cfg.in_channels, 3);
        assert_eq!(cfg.out_channels, 3);
        assert_eq!(cfg.latent_channels, 4);
        assert_eq!(cfg.block_out_channels, [64]);
        assert_eq!(cfg.layers_per_block, 1);
        assert_eq!(cfg.norm_num_groups, 32);
        assert_eq!(cfg.act_fn, "silu");
        assert_eq!(cfg.scaling_factor, 0.18215);
        assert_eq!(cfg.shift_factor, None);
        assert!(cfg.use_quant_conv && cfg.use_post_quant_conv && cfg.mid_block_add_attention);
        assert_eq!(cfg.sample_size.hw(), Some((32, 32)));
        cfg.validate().expect("defaults are valid");
    }

    fn config_error(v: serde_json::Value, field: &str) {
        let mut base = serde_json::to_value(serde_json::json!({
            "block_out_channels": [32, 64],
            "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
            "norm_num_groups": 8,
        }))
        .expect("json");
        for (k, x) in v.as_object().expect("object") {
            base[k] = x.clone();
        }
        let cfg = from_json(base);
        let err = cfg.validate().expect_err(field);
        let text = err.to_string();
        assert!(text.contains(field), "{field}: {text}");
        assert!(cfg
            .build(&shapes(1, 4, 4), &BuildOptions::default())
            .is_err());
    }

    #[test]
    fn bad_configs() {
        use serde_json::json;
        config_error(json!({"block_out_channels": []}), "block_out_channels");
        config_error(
            json!({"block_out_channels": [30, 64]}),
            "block_out_channels",
        );
        config_error(json!({"norm_num_groups": 0}), "norm_num_groups");
        config_error(json!({"latent_channels": 0}), "latent_channels");
        config_error(json!({"out_channels": 0}), "out_channels");
        config_error(
            json!({"up_block_types": ["AttnUpDecoderBlock2D", "UpDecoderBlock2D"]}),
            "AttnUpDecoderBlock2D",
        );
        config_error(
            json!({"down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]}),
            "down_block_types",
        );
        config_error(
            json!({"up_block_types": ["UpDecoderBlock2D"]}),
            "up_block_types",
        );
        config_error(json!({"act_fn": "relu"}), "relu");
        config_error(json!({"sample_size": [16, 16, 16]}), "sample_size");
        config_error(json!({"sample_size": 0}), "sample_size");
        config_error(json!({"scaling_factor": 0.0}), "scaling_factor");
        let bad = crate::parse_config::<AutoencoderKLConfig>(
            &json!({"block_out_channels": "wide"}),
            "config.json",
        );
        assert!(matches!(bad, Err(ModelError::Config { .. })));
    }

    #[test]
    fn bad_inputs() {
        let cfg = base();
        let check = |inputs: &[(&str, Vec<usize>)], needle: &str| {
            let map: BTreeMap<String, Vec<usize>> = inputs
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect();
            match cfg.shapes_from_inputs(&map) {
                Err(ModelError::Input(m)) => assert!(m.contains(needle), "{m}"),
                other => panic!("expected an input error with {needle}, got {other:?}"),
            }
        };
        check(&[], "missing input `latents`");
        check(&[("latents", vec![1, 4, 8])], "[1, 4, 8]");
        check(&[("latents", vec![1, 3, 8, 8])], "[B, 4, h, w]");
        check(&[("latents", vec![0, 4, 8, 8])], "positive");
        check(&[("latents", vec![1, 4, 0, 8])], "positive");
        check(
            &[("latents", vec![1, 4, 8, 8]), ("timestep", vec![1])],
            "unexpected input `timestep`",
        );
        let ok = cfg
            .shapes_from_inputs(
                &[("latents".to_string(), vec![3, 4, 5, 9])]
                    .into_iter()
                    .collect(),
            )
            .expect("valid");
        assert_eq!((ok.batch, ok.height, ok.width), (3, 5, 9));
        assert!(matches!(
            cfg.build(&shapes(0, 8, 8), &BuildOptions::default()),
            Err(ModelError::Input(_))
        ));
    }

    #[test]
    fn weights_are_distinct_per_block() {
        let g = base()
            .build(&shapes(1, 8, 8), &BuildOptions::default())
            .expect("build");
        let names: BTreeSet<String> = weights(&g).into_keys().collect();
        // 2 blocks x 2 resnets x 8 tensors + shortcut 2 + upsampler 2, mid 2x8 + attention 10,
        // conv_in/out 4, conv_norm_out 2, post_quant_conv 2.
        assert_eq!(names.len(), 32 + 2 + 2 + 16 + 10 + 4 + 2 + 2);
    }
}
