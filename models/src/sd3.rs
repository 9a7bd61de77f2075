//! Stable Diffusion 3 / 3.5 (`SD3Transformer2DModel`): the MMDiT.
//!
//! Image tokens (patch embedding plus a center-cropped fixed sin-cos table) and text tokens
//! (`context_embedder`) keep separate weights and adaLN-Zero modulation but meet in one joint
//! attention over [image; text]. SD3.5 adds an image-only `attn2` in the `dual_attention_layers`
//! and per-head RMS qk-norm. The last block is `context_pre_only`: it only reads the text.

use std::collections::BTreeMap;

use ditto_ir::{DType, Graph, Id};
use serde::Deserialize;

use crate::layers::{self, R};
use crate::{BuildOptions, ModelError, Shapes, Summary};

/// Every adaptive and plain LayerNorm of the model (AdaLayerNormZero, SD35AdaLayerNormZeroX,
/// norm2, AdaLayerNormContinuous) uses this epsilon, as do the RMS qk-norms.
const EPS: f64 = 1e-6;

fn d_sample_size() -> usize {
    128
}
fn d_patch_size() -> usize {
    2
}
fn d_in_channels() -> usize {
    16
}
fn d_num_layers() -> usize {
    18
}
fn d_attention_head_dim() -> usize {
    64
}
fn d_num_attention_heads() -> usize {
    18
}
fn d_joint_attention_dim() -> usize {
    4096
}
fn d_caption_projection_dim() -> usize {
    1152
}
fn d_pooled_projection_dim() -> usize {
    2048
}
fn d_out_channels() -> Option<usize> {
    Some(16)
}
fn d_pos_embed_max_size() -> Option<usize> {
    Some(96)
}

/// `config.json` of an `SD3Transformer2DModel`, defaults as in diffusers.
#[derive(Clone, Debug, Deserialize)]
pub struct Sd3Config {
    #[serde(default = "d_sample_size")]
    pub sample_size: usize,
    #[serde(default = "d_patch_size")]
    pub patch_size: usize,
    #[serde(default = "d_in_channels")]
    pub in_channels: usize,
    #[serde(default = "d_num_layers")]
    pub num_layers: usize,
    #[serde(default = "d_attention_head_dim")]
    pub attention_head_dim: usize,
    #[serde(default = "d_num_attention_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_joint_attention_dim")]
    pub joint_attention_dim: usize,
    #[serde(default = "d_caption_projection_dim")]
    pub caption_projection_dim: usize,
    #[serde(default = "d_pooled_projection_dim")]
    pub pooled_projection_dim: usize,
    /// `null` means `in_channels`.
    #[serde(default = "d_out_channels")]
    pub out_channels: Option<usize>,
    /// `null`: no stored table; the sin-cos embedding is computed for the actual grid.
    #[serde(default = "d_pos_embed_max_size")]
    pub pos_embed_max_size: Option<usize>,
    #[serde(default)]
    pub dual_attention_layers: Vec<usize>,
    /// `null` or `"rms_norm"`.
    #[serde(default)]
    pub qk_norm: Option<String>,
}

const INPUTS: [&str; 4] = [
    "hidden_states",
    "encoder_hidden_states",
    "pooled_projections",
    "timestep",
];

fn cfg_err(field: &str, reason: impl Into<String>) -> ModelError {
    ModelError::Config {
        path: format!("SD3Transformer2DModel config `{field}`"),
        reason: reason.into(),
    }
}

fn input_err(name: &str, shape: &[usize], expected: impl std::fmt::Display) -> ModelError {
    ModelError::Input(format!("`{name}` has shape {shape:?}, expected {expected}"))
}

/// Sizes every block shares.
#[derive(Clone, Copy)]
struct Dims {
    dim: usize,
    heads: usize,
    head_dim: usize,
    qk_norm: bool,
}

impl Sd3Config {
    fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }
    fn out_ch(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }
    fn dims(&self) -> Dims {
        Dims {
            dim: self.inner_dim(),
            heads: self.num_attention_heads,
            head_dim: self.attention_head_dim,
            qk_norm: self.qk_norm.is_some(),
        }
    }

    pub fn validate(&self) -> Result<(), ModelError> {
        let positive = [
            ("sample_size", self.sample_size),
            ("patch_size", self.patch_size),
            ("in_channels", self.in_channels),
            ("num_layers", self.num_layers),
            ("attention_head_dim", self.attention_head_dim),
            ("num_attention_heads", self.num_attention_heads),
            ("joint_attention_dim", self.joint_attention_dim),
            ("caption_projection_dim", self.caption_projection_dim),
            ("pooled_projection_dim", self.pooled_projection_dim),
            ("out_channels", self.out_ch()),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err(cfg_err(field, "must be at least 1"));
            }
        }
        // The text stream enters blocks built for `inner_dim`.
        if self.caption_projection_dim != self.inner_dim() {
            return Err(cfg_err(
                "caption_projection_dim",
                format!(
                    "is {} but the blocks take num_attention_heads * attention_head_dim = {} * {} = {}",
                    self.caption_projection_dim,
                    self.num_attention_heads,
                    self.attention_head_dim,
                    self.inner_dim()
                ),
            ));
        }
        if self.sample_size % self.patch_size != 0 {
            return Err(cfg_err(
                "sample_size",
                format!(
                    "{} is not a multiple of patch_size {}",
                    self.sample_size, self.patch_size
                ),
            ));
        }
        match self.pos_embed_max_size {
            Some(0) => return Err(cfg_err("pos_embed_max_size", "must be at least 1 or null")),
            Some(m) if self.sample_size / self.patch_size > m => {
                return Err(cfg_err(
                    "pos_embed_max_size",
                    format!(
                        "{m} is smaller than the default grid sample_size / patch_size = {}",
                        self.sample_size / self.patch_size
                    ),
                ))
            }
            Some(_) => {}
            // The computed 2-D sin-cos table splits the width into 4 sin/cos quarters.
            None if self.inner_dim() % 4 != 0 => {
                return Err(cfg_err(
                    "pos_embed_max_size",
                    format!(
                        "null needs a hidden size divisible by 4 for the sin-cos table, got {}",
                        self.inner_dim()
                    ),
                ))
            }
            None => {}
        }
        if let Some(&i) = self
            .dual_attention_layers
            .iter()
            .find(|&&i| i >= self.num_layers)
        {
            return Err(cfg_err(
                "dual_attention_layers",
                format!(
                    "layer {i} does not exist (num_layers = {})",
                    self.num_layers
                ),
            ));
        }
        match self.qk_norm.as_deref() {
            None | Some("rms_norm") => {}
            Some(other) => {
                return Err(cfg_err(
                    "qk_norm",
                    format!("`{other}` is not supported (null or \"rms_norm\")"),
                ))
            }
        }
        Ok(())
    }

    /// Checks a latent grid against the patch size and the stored position table.
    fn check_grid(&self, height: usize, width: usize) -> Result<(), ModelError> {
        let p = self.patch_size;
        if height == 0 || width == 0 || height % p != 0 || width % p != 0 {
            return Err(ModelError::Input(format!(
                "latent size {height}x{width} must be positive multiples of patch_size {p}"
            )));
        }
        if let Some(m) = self.pos_embed_max_size {
            if height / p > m || width / p > m {
                return Err(ModelError::Input(format!(
                    "latent size {height}x{width} is {}x{} patches, more than pos_embed_max_size {m} in a direction",
                    height / p,
                    width / p
                )));
            }
        }
        Ok(())
    }

    fn check_shapes(&self, s: &Shapes) -> Result<(), ModelError> {
        if s.batch == 0 || s.text_len == 0 {
            return Err(ModelError::Input(format!(
                "batch ({}) and text length ({}) must be at least 1",
                s.batch, s.text_len
            )));
        }
        self.check_grid(s.height, s.width)
    }

    pub fn shapes_from_inputs(
        &self,
        inputs: &BTreeMap<String, Vec<usize>>,
    ) -> Result<Shapes, ModelError> {
        if let Some(name) = inputs.keys().find(|k| !INPUTS.contains(&k.as_str())) {
            return Err(ModelError::Input(format!(
                "SD3Transformer2DModel has no input `{name}` (it takes {})",
                INPUTS.join(", ")
            )));
        }
        let get = |name: &str| {
            inputs.get(name).ok_or_else(|| {
                ModelError::Input(format!(
                    "missing input `{name}` (SD3Transformer2DModel takes {})",
                    INPUTS.join(", ")
                ))
            })
        };
        let hs = get("hidden_states")?;
        if hs.len() != 4 || hs[1] != self.in_channels {
            return Err(input_err(
                "hidden_states",
                hs,
                format!("[B, {}, H, W]", self.in_channels),
            ));
        }
        let (b, h, w) = (hs[0], hs[2], hs[3]);
        self.check_grid(h, w)?;
        let ehs = get("encoder_hidden_states")?;
        if ehs.len() != 3 || ehs[0] != b || ehs[2] != self.joint_attention_dim || ehs[1] == 0 {
            return Err(input_err(
                "encoder_hidden_states",
                ehs,
                format!("[{b}, T, {}] with T >= 1", self.joint_attention_dim),
            ));
        }
        let pooled = get("pooled_projections")?;
        if pooled.as_slice() != [b, self.pooled_projection_dim] {
            return Err(input_err(
                "pooled_projections",
                pooled,
                format!("[{b}, {}]", self.pooled_projection_dim),
            ));
        }
        let t = get("timestep")?;
        if t.as_slice() != [b] {
            return Err(input_err("timestep", t, format!("[{b}] (one per sample)")));
        }
        let shapes = Shapes {
            batch: b,
            height: h,
            width: w,
            text_len: ehs[1],
        };
        self.check_shapes(&shapes)?;
        Ok(shapes)
    }

    /// The model's native grid, CFG batch, and 77 CLIP + 256 T5 tokens (the SD3 pipelines'
    /// default `max_sequence_length`).
    pub fn default_shapes(&self) -> Shapes {
        Shapes {
            batch: 2,
            height: self.sample_size,
            width: self.sample_size,
            text_len: 77 + 256,
        }
    }

    pub fn summary(&self, shapes: &Shapes) -> Summary {
        let p = self.patch_size.max(1);
        Summary {
            class_name: "SD3Transformer2DModel".into(),
            layers: format!(
                "{} joint blocks ({} with dual attention, last context_pre_only)",
                self.num_layers,
                self.dual_attention_layers.len()
            ),
            heads: self.num_attention_heads,
            head_dim: self.attention_head_dim,
            hidden: self.inner_dim(),
            in_channels: self.in_channels,
            patch_size: self.patch_size,
            image_tokens: (shapes.height / p) * (shapes.width / p),
        }
    }

    pub fn build(&self, shapes: &Shapes, opts: &BuildOptions) -> Result<Graph, ModelError> {
        self.validate()?;
        self.check_shapes(shapes)?;
        let Shapes {
            batch: b,
            height,
            width,
            text_len,
        } = *shapes;
        let dims = self.dims();
        let d = dims.dim;
        let p = self.patch_size;
        let (gh, gw) = (height / p, width / p);
        let mut g = Graph::new();

        let hs = g.input(
            "hidden_states",
            DType::F32,
            &[b, self.in_channels, height, width],
        )?;
        let ehs = g.input(
            "encoder_hidden_states",
            DType::F32,
            &[b, text_len, self.joint_attention_dim],
        )?;
        let pooled = g.input(
            "pooled_projections",
            DType::F32,
            &[b, self.pooled_projection_dim],
        )?;
        let t = g.input("timestep", DType::F32, &[b])?;

        let x = layers::patch_embed(&mut g, hs, "pos_embed.proj", self.in_channels, d, p)?;
        let pos = self.pos_embed(&mut g, gh, gw)?;
        let x = g.add_(x, pos)?;
        // The image token stream: what sequence parallelism splits across ranks.
        let mut x = g.seq(x)?;

        let temb = layers::combined_timestep_text_proj(
            &mut g,
            t,
            None,
            pooled,
            "time_text_embed",
            self.pooled_projection_dim,
            d,
        )?;
        let c = layers::linear(
            &mut g,
            ehs,
            "context_embedder",
            self.joint_attention_dim,
            self.caption_projection_dim,
            true,
        )?;
        // The text stream joins the image in every attention: split it with the image.
        let mut c = g.seq(c)?;
        g.mark_boundary(&[x, c]);

        for i in 0..self.num_layers {
            let pre_only = i + 1 == self.num_layers;
            let dual = self.dual_attention_layers.contains(&i);
            let prefix = format!("transformer_blocks.{i}");
            let (nc, nx) = joint_block(&mut g, x, c, temb, &prefix, dims, pre_only, dual)?;
            x = nx;
            if let Some(nc) = nc {
                c = nc;
                if opts.block_outputs {
                    g.output(&format!("block.{prefix}.out0"), c);
                }
            }
            if opts.block_outputs {
                g.output(&format!("block.{prefix}.out1"), x);
            }
            // The context_pre_only block ends the text stream.
            if pre_only {
                g.mark_boundary(&[x]);
            } else {
                g.mark_boundary(&[x, c]);
            }
        }

        let x = layers::ada_layer_norm_continuous(&mut g, x, temb, "norm_out", d, d, EPS)?;
        let out_ch = self.out_ch();
        let x = layers::linear(&mut g, x, "proj_out", d, p * p * out_ch, true)?;
        let sample = layers::unpatchify(&mut g, x, p, gh, gw, out_ch)?;
        g.output("sample", sample);
        Ok(g)
    }

    /// diffusers `PatchEmbed` positions for a gh x gw patch grid, as [1, gh*gw, D].
    fn pos_embed(&self, g: &mut Graph, gh: usize, gw: usize) -> R {
        let d = self.inner_dim();
        match self.pos_embed_max_size {
            // `cropped_pos_embed`: the stored max x max table, center-cropped (rounding the
            // margin down at the top and left).
            Some(m) => {
                let table = g.weight("pos_embed.pos_embed", &[1, m * m, d])?;
                let (top, left) = ((m - gh) / 2, (m - gw) / 2);
                let grid = g.reshape(table, &[m, m, d])?;
                let rows = g.slice(grid, 0, top, top + gh)?;
                let crop = g.slice(rows, 1, left, left + gw)?;
                Ok(g.reshape(crop, &[1, gh * gw, d])?)
            }
            // Without a stored table diffusers computes get_2d_sincos_pos_embed for the actual
            // grid with base_size = sample_size / patch_size and interpolation_scale 1.
            None => {
                let base = (self.sample_size / self.patch_size) as f64;
                let pe = g.sincos_pos_embed(d, gh, gw, base, 1.0)?;
                Ok(g.reshape(pe, &[1, gh * gw, d])?)
            }
        }
    }
}

/// A projection to heads, with the per-head RMS norm `attn.<norm>` when qk-norm is on.
fn proj(g: &mut Graph, x: Id, prefix: &str, lin: &str, norm: Option<&str>, dims: Dims) -> R {
    let y = layers::linear(g, x, &format!("{prefix}.{lin}"), dims.dim, dims.dim, true)?;
    match norm {
        Some(n) if dims.qk_norm => {
            layers::head_rms_norm(g, y, &format!("{prefix}.{n}"), dims.heads, EPS)
        }
        _ => Ok(y),
    }
}

fn scale(dims: Dims) -> f64 {
    1.0 / (dims.head_dim as f64).sqrt()
}

/// `JointAttnProcessor2_0` with text: one attention over [image; text], split back; `to_out.0`
/// for the image part and (unless `pre_only`) `to_add_out` for the text part.
fn joint_attention(
    g: &mut Graph,
    x: Id,
    c: Id,
    prefix: &str,
    dims: Dims,
    pre_only: bool,
) -> R<(Id, Option<Id>)> {
    let q = proj(g, x, prefix, "to_q", Some("norm_q"), dims)?;
    let k = proj(g, x, prefix, "to_k", Some("norm_k"), dims)?;
    let v = proj(g, x, prefix, "to_v", None, dims)?;
    let cq = proj(g, c, prefix, "add_q_proj", Some("norm_added_q"), dims)?;
    let ck = proj(g, c, prefix, "add_k_proj", Some("norm_added_k"), dims)?;
    let cv = proj(g, c, prefix, "add_v_proj", None, dims)?;
    for (name, id) in [("k_img", k), ("v_img", v), ("k_txt", ck), ("v_txt", cv)] {
        g.tap(format!("{prefix}.{name}"), id);
    }
    let q = g.concat(1, &[q, cq])?;
    let k = g.concat(1, &[k, ck])?;
    let v = g.concat(1, &[v, cv])?;
    let o = g.attention(q, k, v, dims.heads, scale(dims))?;
    let n_img = g.shape(x)[1];
    let n_all = g.shape(o)[1];
    let o_img = g.slice(o, 1, 0, n_img)?;
    let o_txt = g.slice(o, 1, n_img, n_all)?;
    g.tap(format!("{prefix}.out_img"), o_img);
    g.tap(format!("{prefix}.out_txt"), o_txt);
    let d = dims.dim;
    let img = layers::linear(g, o_img, &format!("{prefix}.to_out.0"), d, d, true)?;
    let txt = if pre_only {
        None
    } else {
        Some(layers::linear(
            g,
            o_txt,
            &format!("{prefix}.to_add_out"),
            d,
            d,
            true,
        )?)
    };
    Ok((img, txt))
}

/// The same processor without text: `attn2` of the dual-attention layers.
fn self_attention(g: &mut Graph, x: Id, prefix: &str, dims: Dims) -> R {
    let q = proj(g, x, prefix, "to_q", Some("norm_q"), dims)?;
    let k = proj(g, x, prefix, "to_k", Some("norm_k"), dims)?;
    let v = proj(g, x, prefix, "to_v", None, dims)?;
    let o = g.attention(q, k, v, dims.heads, scale(dims))?;
    g.tap(format!("{prefix}.k_img"), k);
    g.tap(format!("{prefix}.v_img"), v);
    g.tap(format!("{prefix}.out_img"), o);
    layers::linear(
        g,
        o,
        &format!("{prefix}.to_out.0"),
        dims.dim,
        dims.dim,
        true,
    )
}

/// diffusers `JointTransformerBlock`; returns (encoder_hidden_states, hidden_states), the
/// first `None` in the `context_pre_only` block.
#[allow(clippy::too_many_arguments)]
fn joint_block(
    g: &mut Graph,
    x: Id,
    c: Id,
    temb: Id,
    prefix: &str,
    dims: Dims,
    pre_only: bool,
    dual: bool,
) -> R<(Option<Id>, Id)> {
    let d = dims.dim;
    // norm1: AdaLayerNormZero (shift, scale, gate for msa then mlp), or SD35AdaLayerNormZeroX,
    // which appends (shift, scale, gate) for attn2 applied to the same LN(x).
    let n = if dual { 9 } else { 6 };
    let m = layers::ada_chunks(g, temb, &format!("{prefix}.norm1"), d, d, n)?;
    let ln_x = g.layer_norm(x, EPS)?;
    let nx = layers::modulate(g, ln_x, m[0], m[1])?;
    g.tap(format!("{prefix}.modulated_input"), nx);

    // norm1_context: AdaLayerNormZero, or AdaLayerNormContinuous (scale, shift) in the last
    // block, whose text stream is not updated.
    let (nc, cm) = if pre_only {
        let nc = layers::ada_layer_norm_continuous(
            g,
            c,
            temb,
            &format!("{prefix}.norm1_context"),
            d,
            d,
            EPS,
        )?;
        (nc, None)
    } else {
        let cm = layers::ada_chunks(g, temb, &format!("{prefix}.norm1_context"), d, d, 6)?;
        let ln_c = g.layer_norm(c, EPS)?;
        (layers::modulate(g, ln_c, cm[0], cm[1])?, Some(cm))
    };

    let (img, txt) = joint_attention(g, nx, nc, &format!("{prefix}.attn"), dims, pre_only)?;
    let mut x = layers::gated_residual(g, x, m[2], img)?;
    if dual {
        let nx2 = layers::modulate(g, ln_x, m[6], m[7])?;
        let a2 = self_attention(g, nx2, &format!("{prefix}.attn2"), dims)?;
        x = layers::gated_residual(g, x, m[8], a2)?;
    }
    let ln2 = g.layer_norm(x, EPS)?;
    let n2 = layers::modulate(g, ln2, m[3], m[4])?;
    let ff = layers::feed_forward_gelu_tanh(g, n2, &format!("{prefix}.ff"), d, 4 * d)?;
    let x = layers::gated_residual(g, x, m[5], ff)?;

    let c = match (cm, txt) {
        (Some(cm), Some(txt)) => {
            let c = layers::gated_residual(g, c, cm[2], txt)?;
            let ln2c = g.layer_norm(c, EPS)?;
            let n2c = layers::modulate(g, ln2c, cm[3], cm[4])?;
            let ffc =
                layers::feed_forward_gelu_tanh(g, n2c, &format!("{prefix}.ff_context"), d, 4 * d)?;
            Some(layers::gated_residual(g, c, cm[5], ffc)?)
        }
        _ => None,
    };
    Ok((c, x))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use ditto_ir::Op;

    use super::*;
    use crate::test_support::{
        build_all, check_fixture, fixture_config, fixture_inputs, output_shape, reachable_weights,
        with_input, without_input,
    };

    fn parse(v: &serde_json::Value) -> Sd3Config {
        crate::parse_config(v, "config.json").expect("parses")
    }

    fn config() -> Sd3Config {
        fixture_config("sd3")
    }

    fn inputs(
        cfg: &Sd3Config,
        b: usize,
        h: usize,
        w: usize,
        t: usize,
    ) -> BTreeMap<String, Vec<usize>> {
        BTreeMap::from([
            ("hidden_states".to_string(), vec![b, cfg.in_channels, h, w]),
            (
                "encoder_hidden_states".to_string(),
                vec![b, t, cfg.joint_attention_dim],
            ),
            (
                "pooled_projections".to_string(),
                vec![b, cfg.pooled_projection_dim],
            ),
            ("timestep".to_string(), vec![b]),
        ])
    }

    #[test]
    fn fixtures_match_checkpoint_and_io() {
        for rel in ["sd3", "sd3-pipeline/transformer"] {
            check_fixture::<Sd3Config>(rel);
        }
    }

    #[test]
    fn fixture_shapes_and_defaults() {
        let cfg = config();
        let s = cfg.shapes_from_inputs(&fixture_inputs("sd3")).unwrap();
        assert_eq!(
            s,
            Shapes {
                batch: 2,
                height: 16,
                width: 16,
                text_len: 7
            }
        );
        let d = cfg.default_shapes();
        assert_eq!((d.batch, d.height, d.width, d.text_len), (2, 16, 16, 333));
        let sum = cfg.summary(&d);
        assert_eq!(
            (sum.hidden, sum.heads, sum.head_dim, sum.image_tokens),
            (64, 4, 16, 64)
        );
        build_all(&cfg, d);

        // diffusers' defaults (SD3 medium) from an empty config.
        let def: Sd3Config = parse(&serde_json::json!({}));
        def.validate().unwrap();
        assert_eq!(def.inner_dim(), 1152);
        assert_eq!(def.pos_embed_max_size, Some(96));
        assert_eq!(def.out_ch(), 16);
        assert!(def.qk_norm.is_none() && def.dual_attention_layers.is_empty());
        assert_eq!(def.summary(&def.default_shapes()).image_tokens, 64 * 64);
    }

    #[test]
    fn crop_is_centered() {
        let cfg = config();
        // 12x20 latent -> 6x10 patches in the 32x32 table: top 13, left 11.
        let g = build_all(
            &cfg,
            Shapes {
                batch: 1,
                height: 12,
                width: 20,
                text_len: 3,
            },
        );
        let slices: Vec<(i64, i64, i64)> = g
            .nodes()
            .iter()
            .filter_map(|n| match n {
                Op::Slice([_, a, s, e]) => Some((
                    g.int_attr(*a).unwrap(),
                    g.int_attr(*s).unwrap(),
                    g.int_attr(*e).unwrap(),
                )),
                _ => None,
            })
            .collect();
        assert!(slices.contains(&(0, 13, 19)), "{slices:?}");
        assert!(slices.contains(&(1, 11, 21)), "{slices:?}");
        assert_eq!(output_shape(&g, "sample"), &[1, 16, 12, 20]);
    }

    #[test]
    fn shapes_follow_config_and_inputs() {
        let base = config();
        for heads in [3, 5] {
            for dual in [vec![], vec![0, 2], vec![3]] {
                for qk in [None, Some("rms_norm".to_string())] {
                    let cfg = Sd3Config {
                        num_attention_heads: heads,
                        attention_head_dim: 8,
                        caption_projection_dim: heads * 8,
                        num_layers: 4,
                        dual_attention_layers: dual.clone(),
                        qk_norm: qk.clone(),
                        out_channels: Some(8),
                        ..base.clone()
                    };
                    let s = cfg.shapes_from_inputs(&inputs(&cfg, 3, 12, 20, 5)).unwrap();
                    let g = build_all(&cfg, s);
                    assert_eq!(output_shape(&g, "sample"), &[3, 8, 12, 20]);
                    let d = heads * 8;
                    for i in 0..3 {
                        assert_eq!(
                            output_shape(&g, &format!("block.transformer_blocks.{i}.out0")),
                            &[3, 5, d]
                        );
                        assert_eq!(
                            output_shape(&g, &format!("block.transformer_blocks.{i}.out1")),
                            &[3, 60, d]
                        );
                    }
                    assert!(!g
                        .outputs
                        .iter()
                        .any(|(n, _)| n == "block.transformer_blocks.3.out0"));
                    let w = reachable_weights(&g);
                    for i in 0..4 {
                        let chunks = if dual.contains(&i) { 9 } else { 6 };
                        assert_eq!(
                            w[&format!("transformer_blocks.{i}.norm1.linear.weight")],
                            vec![chunks * d, d]
                        );
                        assert_eq!(
                            w.contains_key(&format!("transformer_blocks.{i}.attn2.to_q.weight")),
                            dual.contains(&i)
                        );
                        assert_eq!(
                            w.contains_key(&format!(
                                "transformer_blocks.{i}.attn.norm_added_q.weight"
                            )),
                            qk.is_some()
                        );
                    }
                    assert_eq!(
                        w["transformer_blocks.3.norm1_context.linear.weight"],
                        vec![2 * d, d]
                    );
                    assert!(!w.contains_key("transformer_blocks.3.attn.to_add_out.weight"));
                    assert!(!w.contains_key("transformer_blocks.3.ff_context.net.2.weight"));
                    assert_eq!(w["proj_out.weight"], vec![2 * 2 * 8, d]);
                }
            }
        }
        // Without block outputs only the sample is produced.
        let g = base
            .build(&base.default_shapes(), &BuildOptions::default())
            .unwrap();
        assert_eq!(g.outputs.len(), 1);
    }

    #[test]
    fn computed_pos_embed_without_max_size() {
        let cfg = Sd3Config {
            pos_embed_max_size: None,
            ..config()
        };
        let g = build_all(
            &cfg,
            Shapes {
                batch: 1,
                height: 64,
                width: 8,
                text_len: 2,
            },
        );
        assert!(!reachable_weights(&g).contains_key("pos_embed.pos_embed"));
        assert!(g.nodes().iter().any(|n| matches!(n, Op::SinCosPosEmbed(_))));
        assert_eq!(output_shape(&g, "sample"), &[1, 16, 64, 8]);
    }

    #[test]
    fn bad_configs_are_named() {
        let base = config();
        let cases: Vec<(Sd3Config, &str)> = vec![
            (
                Sd3Config {
                    num_attention_heads: 0,
                    ..base.clone()
                },
                "num_attention_heads",
            ),
            (
                Sd3Config {
                    patch_size: 0,
                    ..base.clone()
                },
                "patch_size",
            ),
            (
                Sd3Config {
                    num_layers: 0,
                    ..base.clone()
                },
                "num_layers",
            ),
            (
                Sd3Config {
                    caption_projection_dim: 32,
                    ..base.clone()
                },
                "caption_projection_dim",
            ),
            (
                Sd3Config {
                    sample_size: 15,
                    ..base.clone()
                },
                "sample_size",
            ),
            (
                Sd3Config {
                    pos_embed_max_size: Some(4),
                    ..base.clone()
                },
                "pos_embed_max_size",
            ),
            (
                Sd3Config {
                    pos_embed_max_size: Some(0),
                    ..base.clone()
                },
                "pos_embed_max_size",
            ),
            (
                Sd3Config {
                    dual_attention_layers: vec![2],
                    ..base.clone()
                },
                "dual_attention_layers",
            ),
            (
                Sd3Config {
                    qk_norm: Some("layer_norm".into()),
                    ..base.clone()
                },
                "qk_norm",
            ),
            (
                Sd3Config {
                    pos_embed_max_size: None,
                    num_attention_heads: 3,
                    attention_head_dim: 6,
                    caption_projection_dim: 18,
                    ..base.clone()
                },
                "pos_embed_max_size",
            ),
        ];
        for (cfg, field) in cases {
            let err = cfg.validate().expect_err(field).to_string();
            assert!(err.contains(field), "{err}");
            assert!(cfg
                .build(&base.default_shapes(), &BuildOptions::default())
                .is_err());
        }
        let bad: Result<Sd3Config, _> =
            crate::parse_config(&serde_json::json!({"num_layers": "two"}), "config.json");
        assert!(bad.is_err());
    }

    #[test]
    fn bad_inputs_are_named() {
        let cfg = config();
        let ok = inputs(&cfg, 2, 16, 16, 7);
        cfg.shapes_from_inputs(&ok).unwrap();
        let with = |name, shape| with_input(&ok, name, shape);
        let without = |name| without_input(&ok, name);
        let cases = vec![
            (with("hidden_states", vec![2, 16, 16]), "hidden_states"),
            (with("hidden_states", vec![2, 4, 16, 16]), "hidden_states"),
            (with("hidden_states", vec![2, 16, 15, 16]), "patch_size"),
            (
                with("hidden_states", vec![2, 16, 80, 16]),
                "pos_embed_max_size",
            ),
            (
                with("encoder_hidden_states", vec![3, 7, 32]),
                "encoder_hidden_states",
            ),
            (
                with("encoder_hidden_states", vec![2, 7, 33]),
                "encoder_hidden_states",
            ),
            (
                with("encoder_hidden_states", vec![2, 0, 32]),
                "encoder_hidden_states",
            ),
            (
                with("pooled_projections", vec![2, 23]),
                "pooled_projections",
            ),
            (with("timestep", vec![1]), "timestep"),
            (with("timestep", vec![]), "timestep"),
            (with("guidance", vec![2]), "guidance"),
            (without("pooled_projections"), "pooled_projections"),
        ];
        for (inputs, needle) in cases {
            let err = cfg
                .shapes_from_inputs(&inputs)
                .expect_err(needle)
                .to_string();
            assert!(err.contains(needle), "{err}");
        }
        let bad = Shapes {
            batch: 1,
            height: 66,
            width: 16,
            text_len: 1,
        };
        assert!(cfg.build(&bad, &BuildOptions::default()).is_err());
        let zero = Shapes { batch: 0, ..bad };
        assert!(cfg.build(&zero, &BuildOptions::default()).is_err());
    }
}
