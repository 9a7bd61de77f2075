//! Flux.1 (`FluxTransformer2DModel`).
//!
//! Input tokens are latents already packed 2x2 by the pipeline. Double-stream blocks are MMDiT
//! blocks whose joint attention runs over [text; image] (text first) with RMS qk-norm and 3-axis
//! RoPE; single-stream blocks then process the concatenated [text; image] stream with a
//! parallel attention + MLP; the text tokens are dropped before `norm_out`.

use std::collections::BTreeMap;

use ditto_ir::{DType, Graph, Id};
use serde::Deserialize;

use crate::layers::{self, R};
use crate::{BuildOptions, ModelError, Shapes, Summary};

/// LayerNorms (adaptive and plain) and the RMS qk-norms all use this epsilon.
const EPS: f64 = 1e-6;
/// `FluxPosEmbed(theta=10000, ...)`, fixed in the model.
const ROPE_THETA: f64 = 10000.0;
/// The pipeline passes t / 1000 (and the guidance scale); the model multiplies both back.
const TIME_SCALE: f64 = 1000.0;

fn d_patch_size() -> usize {
    1
}
fn d_in_channels() -> usize {
    64
}
fn d_num_layers() -> usize {
    19
}
fn d_num_single_layers() -> usize {
    38
}
fn d_attention_head_dim() -> usize {
    128
}
fn d_num_attention_heads() -> usize {
    24
}
fn d_joint_attention_dim() -> usize {
    4096
}
fn d_pooled_projection_dim() -> usize {
    768
}
fn d_axes_dims_rope() -> Vec<usize> {
    vec![16, 56, 56]
}

/// `config.json` of a `FluxTransformer2DModel`, defaults as in diffusers.
#[derive(Clone, Debug, Deserialize)]
pub struct FluxConfig {
    /// Only sizes `proj_out` (p*p*out_channels); the pipeline does the 2x2 packing.
    #[serde(default = "d_patch_size")]
    pub patch_size: usize,
    /// Channels of a packed token (latent channels * 4).
    #[serde(default = "d_in_channels")]
    pub in_channels: usize,
    /// `null` means `in_channels`.
    #[serde(default)]
    pub out_channels: Option<usize>,
    #[serde(default = "d_num_layers")]
    pub num_layers: usize,
    #[serde(default = "d_num_single_layers")]
    pub num_single_layers: usize,
    #[serde(default = "d_attention_head_dim")]
    pub attention_head_dim: usize,
    #[serde(default = "d_num_attention_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_joint_attention_dim")]
    pub joint_attention_dim: usize,
    #[serde(default = "d_pooled_projection_dim")]
    pub pooled_projection_dim: usize,
    #[serde(default)]
    pub guidance_embeds: bool,
    #[serde(default = "d_axes_dims_rope")]
    pub axes_dims_rope: Vec<usize>,
}

fn cfg_err(field: &str, reason: impl Into<String>) -> ModelError {
    ModelError::Config {
        path: format!("FluxTransformer2DModel config `{field}`"),
        reason: reason.into(),
    }
}

fn input_err(name: &str, shape: &[usize], expected: impl std::fmt::Display) -> ModelError {
    ModelError::Input(format!("`{name}` has shape {shape:?}, expected {expected}"))
}

/// The most square h x w grid with h * w = n (h <= w): image tokens arrive flattened, and
/// only their count matters to the graph.
fn grid_of(n: usize) -> (usize, usize) {
    let mut h = (n as f64).sqrt() as usize;
    while h > 1 && n % h != 0 {
        h -= 1;
    }
    let h = h.max(1);
    (h, n / h)
}

#[derive(Clone, Copy)]
struct Dims {
    dim: usize,
    heads: usize,
    head_dim: usize,
}

impl FluxConfig {
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
        }
    }
    fn input_names(&self) -> Vec<&'static str> {
        let mut v = vec![
            "hidden_states",
            "encoder_hidden_states",
            "pooled_projections",
            "timestep",
            "img_ids",
            "txt_ids",
        ];
        if self.guidance_embeds {
            v.push("guidance");
        }
        v
    }

    pub fn validate(&self) -> Result<(), ModelError> {
        let positive = [
            ("patch_size", self.patch_size),
            ("in_channels", self.in_channels),
            ("attention_head_dim", self.attention_head_dim),
            ("num_attention_heads", self.num_attention_heads),
            ("joint_attention_dim", self.joint_attention_dim),
            ("pooled_projection_dim", self.pooled_projection_dim),
            ("out_channels", self.out_ch()),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err(cfg_err(field, "must be at least 1"));
            }
        }
        if self.num_layers + self.num_single_layers == 0 {
            return Err(cfg_err(
                "num_layers",
                "num_layers and num_single_layers are both 0",
            ));
        }
        let axes = &self.axes_dims_rope;
        if axes.is_empty() || axes.iter().any(|&a| a == 0 || a % 2 != 0) {
            return Err(cfg_err(
                "axes_dims_rope",
                format!("{axes:?}: every axis needs a positive even width (rotated in pairs)"),
            ));
        }
        let total: usize = axes.iter().sum();
        if total != self.attention_head_dim {
            return Err(cfg_err(
                "axes_dims_rope",
                format!(
                    "{axes:?} sums to {total}, but RoPE rotates whole heads of attention_head_dim {}",
                    self.attention_head_dim
                ),
            ));
        }
        Ok(())
    }

    fn check_shapes(&self, s: &Shapes) -> Result<(), ModelError> {
        if s.batch == 0 || s.height == 0 || s.width == 0 || s.text_len == 0 {
            return Err(ModelError::Input(format!(
                "batch ({}), packed grid ({}x{}) and text length ({}) must be at least 1",
                s.batch, s.height, s.width, s.text_len
            )));
        }
        Ok(())
    }

    /// `height`/`width` come back as the most square grid with the image-token count (the
    /// inputs only give the count).
    pub fn shapes_from_inputs(
        &self,
        inputs: &BTreeMap<String, Vec<usize>>,
    ) -> Result<Shapes, ModelError> {
        let names = self.input_names();
        if let Some(name) = inputs.keys().find(|k| !names.contains(&k.as_str())) {
            let why = if name == "guidance" {
                " (guidance_embeds is false in this config)".to_string()
            } else {
                String::new()
            };
            return Err(ModelError::Input(format!(
                "FluxTransformer2DModel has no input `{name}`{why}; it takes {}",
                names.join(", ")
            )));
        }
        let get = |name: &str| {
            inputs.get(name).ok_or_else(|| {
                ModelError::Input(format!(
                    "missing input `{name}` (FluxTransformer2DModel takes {})",
                    names.join(", ")
                ))
            })
        };
        let hs = get("hidden_states")?;
        if hs.len() != 3 || hs[2] != self.in_channels || hs[1] == 0 {
            return Err(input_err(
                "hidden_states",
                hs,
                format!(
                    "packed latents [B, S, {}] with S >= 1 image tokens",
                    self.in_channels
                ),
            ));
        }
        let (b, s) = (hs[0], hs[1]);
        let ehs = get("encoder_hidden_states")?;
        if ehs.len() != 3 || ehs[0] != b || ehs[2] != self.joint_attention_dim || ehs[1] == 0 {
            return Err(input_err(
                "encoder_hidden_states",
                ehs,
                format!("[{b}, T, {}] with T >= 1", self.joint_attention_dim),
            ));
        }
        let t = ehs[1];
        let pooled = get("pooled_projections")?;
        if pooled.as_slice() != [b, self.pooled_projection_dim] {
            return Err(input_err(
                "pooled_projections",
                pooled,
                format!("[{b}, {}]", self.pooled_projection_dim),
            ));
        }
        let ts = get("timestep")?;
        if ts.as_slice() != [b] {
            return Err(input_err("timestep", ts, format!("[{b}] (one per sample)")));
        }
        if self.guidance_embeds {
            let gd = get("guidance")?;
            if gd.as_slice() != [b] {
                return Err(input_err("guidance", gd, format!("[{b}] (one per sample)")));
            }
        }
        let n_axes = self.axes_dims_rope.len();
        for (name, len) in [("img_ids", s), ("txt_ids", t)] {
            let ids = get(name)?;
            if ids.as_slice() != [len, n_axes] {
                let note = if ids.len() == 3 {
                    format!("; the deprecated 3-D form with a batch axis is not supported, pass {name}[0]")
                } else {
                    String::new()
                };
                return Err(input_err(
                    name,
                    ids,
                    format!("[{len}, {n_axes}] (one id per token, one column per RoPE axis){note}"),
                ));
            }
        }
        let (height, width) = grid_of(s);
        let shapes = Shapes {
            batch: b,
            height,
            width,
            text_len: t,
        };
        self.check_shapes(&shapes)?;
        Ok(shapes)
    }

    /// 1024x1024 images (128x128 latents, packed 64x64), one sample (Flux pipelines run no
    /// CFG batch), the dev pipeline's 512 T5 tokens.
    pub fn default_shapes(&self) -> Shapes {
        Shapes {
            batch: 1,
            height: 64,
            width: 64,
            text_len: 512,
        }
    }

    pub fn summary(&self, shapes: &Shapes) -> Summary {
        Summary {
            class_name: "FluxTransformer2DModel".into(),
            layers: format!(
                "{} double-stream + {} single-stream blocks",
                self.num_layers, self.num_single_layers
            ),
            heads: self.num_attention_heads,
            head_dim: self.attention_head_dim,
            hidden: self.inner_dim(),
            in_channels: self.in_channels,
            patch_size: self.patch_size,
            image_tokens: shapes.height * shapes.width,
        }
    }

    pub fn build(&self, shapes: &Shapes, opts: &BuildOptions) -> Result<Graph, ModelError> {
        self.validate()?;
        self.check_shapes(shapes)?;
        let b = shapes.batch;
        let s = shapes.height * shapes.width;
        let t = shapes.text_len;
        let dims = self.dims();
        let d = dims.dim;
        let n_axes = self.axes_dims_rope.len();
        let mut g = Graph::new();

        let hs = g.input("hidden_states", DType::F32, &[b, s, self.in_channels])?;
        let ehs = g.input(
            "encoder_hidden_states",
            DType::F32,
            &[b, t, self.joint_attention_dim],
        )?;
        let pooled = g.input(
            "pooled_projections",
            DType::F32,
            &[b, self.pooled_projection_dim],
        )?;
        let ts = g.input("timestep", DType::F32, &[b])?;
        let img_ids = g.input("img_ids", DType::F32, &[s, n_axes])?;
        let txt_ids = g.input("txt_ids", DType::F32, &[t, n_axes])?;
        let guidance = if self.guidance_embeds {
            let gd = g.input("guidance", DType::F32, &[b])?;
            Some(g.mul_scalar(gd, TIME_SCALE)?)
        } else {
            None
        };

        let x = layers::linear(&mut g, hs, "x_embedder", self.in_channels, d, true)?;
        // The image token stream: what sequence parallelism splits across ranks.
        let mut x = g.seq(x)?;
        let ts = g.mul_scalar(ts, TIME_SCALE)?;
        let temb = layers::combined_timestep_text_proj(
            &mut g,
            ts,
            guidance,
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
            d,
            true,
        )?;
        // The text stream joins the image in every attention: split it with the image.
        let mut c = g.seq(c)?;

        let ids = g.concat(0, &[txt_ids, img_ids])?;
        let (cos, sin) = g.rope_tables(ids, ROPE_THETA, &self.axes_dims_rope)?;
        let rope = Rope { cos, sin };
        g.mark_boundary(&[c, x]);

        for i in 0..self.num_layers {
            let prefix = format!("transformer_blocks.{i}");
            (c, x) = double_block(&mut g, x, c, temb, &prefix, dims, rope)?;
            g.mark_boundary(&[c, x]);
            if opts.block_outputs {
                g.output(&format!("block.{prefix}.out0"), c);
                g.output(&format!("block.{prefix}.out1"), x);
            }
        }

        // diffusers concatenates and splits again around every single block, and so do we:
        // the boundaries between single blocks carry the text and the image streams apart,
        // like the double blocks', so that a pipeline stage cut there splits each stream
        // into patches on its own (a patch is the same tokens on both sides of any cut).
        // canonicalize joins the adjacent slices back (`concat-of-slices`).
        for i in 0..self.num_single_layers {
            let prefix = format!("single_transformer_blocks.{i}");
            let joint = g.concat(1, &[c, x])?;
            let out = single_block(&mut g, joint, temb, &prefix, dims, rope, t)?;
            c = g.slice(out, 1, 0, t)?;
            x = g.slice(out, 1, t, t + s)?;
            g.mark_boundary(&[c, x]);
            if opts.block_outputs {
                g.output(&format!("block.{prefix}.out0"), c);
                g.output(&format!("block.{prefix}.out1"), x);
            }
        }

        let x = layers::ada_layer_norm_continuous(&mut g, x, temb, "norm_out", d, d, EPS)?;
        let p = self.patch_size;
        let out = layers::linear(&mut g, x, "proj_out", d, p * p * self.out_ch(), true)?;
        g.output("sample", out);
        Ok(g)
    }
}

#[derive(Clone, Copy)]
struct Rope {
    cos: Id,
    sin: Id,
}

/// A projection to heads followed by the per-head RMS norm at `<prefix>.<norm>`.
fn proj(g: &mut Graph, x: Id, prefix: &str, lin: &str, norm: Option<&str>, dims: Dims) -> R {
    let y = layers::linear(g, x, &format!("{prefix}.{lin}"), dims.dim, dims.dim, true)?;
    match norm {
        Some(n) => layers::head_rms_norm(g, y, &format!("{prefix}.{n}"), dims.heads, EPS),
        None => Ok(y),
    }
}

/// RoPE on a [B, S, H*D] projection, rotating each head.
fn rotate(g: &mut Graph, x: Id, rope: Rope, dims: Dims) -> R {
    let s = g.shape(x).to_vec();
    let r = g.reshape(x, &[s[0], s[1], dims.heads, dims.head_dim])?;
    let r = g.rope(r, rope.cos, rope.sin)?;
    Ok(g.reshape(r, &s)?)
}

/// Attention over already-concatenated [text; image] tokens (`t` text tokens), RoPE on q
/// and k after their norms.
#[allow(clippy::too_many_arguments)]
fn rope_attention(
    g: &mut Graph,
    q: Id,
    k: Id,
    v: Id,
    rope: Rope,
    dims: Dims,
    prefix: &str,
    t: usize,
) -> R {
    let q = rotate(g, q, rope, dims)?;
    let k = rotate(g, k, rope, dims)?;
    let scale = 1.0 / (dims.head_dim as f64).sqrt();
    let o = g.attention(q, k, v, dims.heads, scale)?;
    let n = g.shape(o)[1];
    for (name, x) in [("k", k), ("v", v), ("out", o)] {
        let txt = g.slice(x, 1, 0, t)?;
        let img = g.slice(x, 1, t, n)?;
        g.tap(format!("{prefix}.{name}_txt"), txt);
        g.tap(format!("{prefix}.{name}_img"), img);
    }
    Ok(o)
}

/// AdaLayerNormZero-style modulation of LN(x) with (shift, scale).
fn ada_norm(g: &mut Graph, x: Id, shift: Id, scale: Id) -> R {
    let n = g.layer_norm(x, EPS)?;
    layers::modulate(g, n, shift, scale)
}

/// diffusers `FluxTransformerBlock`; returns (encoder_hidden_states, hidden_states).
fn double_block(
    g: &mut Graph,
    x: Id,
    c: Id,
    temb: Id,
    prefix: &str,
    dims: Dims,
    rope: Rope,
) -> R<(Id, Id)> {
    let d = dims.dim;
    // (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp) per stream.
    let m = layers::ada_chunks(g, temb, &format!("{prefix}.norm1"), d, d, 6)?;
    let cm = layers::ada_chunks(g, temb, &format!("{prefix}.norm1_context"), d, d, 6)?;
    let nx = ada_norm(g, x, m[0], m[1])?;
    g.tap(format!("{prefix}.modulated_input"), nx);
    let nc = ada_norm(g, c, cm[0], cm[1])?;

    let a = format!("{prefix}.attn");
    let q = proj(g, nx, &a, "to_q", Some("norm_q"), dims)?;
    let k = proj(g, nx, &a, "to_k", Some("norm_k"), dims)?;
    let v = proj(g, nx, &a, "to_v", None, dims)?;
    let cq = proj(g, nc, &a, "add_q_proj", Some("norm_added_q"), dims)?;
    let ck = proj(g, nc, &a, "add_k_proj", Some("norm_added_k"), dims)?;
    let cv = proj(g, nc, &a, "add_v_proj", None, dims)?;
    // Text first, matching the order of the RoPE ids.
    let q = g.concat(1, &[cq, q])?;
    let k = g.concat(1, &[ck, k])?;
    let v = g.concat(1, &[cv, v])?;
    let t = g.shape(c)[1];
    let o = rope_attention(g, q, k, v, rope, dims, &a, t)?;
    let n_all = g.shape(o)[1];
    let o_txt = g.slice(o, 1, 0, t)?;
    let o_img = g.slice(o, 1, t, n_all)?;
    let img = layers::linear(g, o_img, &format!("{a}.to_out.0"), d, d, true)?;
    let txt = layers::linear(g, o_txt, &format!("{a}.to_add_out"), d, d, true)?;

    let x = layers::gated_residual(g, x, m[2], img)?;
    let n2 = ada_norm(g, x, m[3], m[4])?;
    let ff = layers::feed_forward_gelu_tanh(g, n2, &format!("{prefix}.ff"), d, 4 * d)?;
    let x = layers::gated_residual(g, x, m[5], ff)?;

    let c = layers::gated_residual(g, c, cm[2], txt)?;
    let n2c = ada_norm(g, c, cm[3], cm[4])?;
    let ffc = layers::feed_forward_gelu_tanh(g, n2c, &format!("{prefix}.ff_context"), d, 4 * d)?;
    let c = layers::gated_residual(g, c, cm[5], ffc)?;
    Ok((c, x))
}

/// diffusers `FluxSingleTransformerBlock` on the joint [text; image] stream.
#[allow(clippy::too_many_arguments)]
fn single_block(
    g: &mut Graph,
    s: Id,
    temb: Id,
    prefix: &str,
    dims: Dims,
    rope: Rope,
    t: usize,
) -> R {
    let d = dims.dim;
    let mlp_dim = 4 * d;
    // AdaLayerNormZeroSingle: (shift, scale, gate).
    let m = layers::ada_chunks(g, temb, &format!("{prefix}.norm"), d, d, 3)?;
    let ns = ada_norm(g, s, m[0], m[1])?;
    g.tap(format!("{prefix}.modulated_input"), ns);
    let mlp = layers::linear(g, ns, &format!("{prefix}.proj_mlp"), d, mlp_dim, true)?;
    let mlp = g.gelu_tanh(mlp)?;
    let a = format!("{prefix}.attn");
    let q = proj(g, ns, &a, "to_q", Some("norm_q"), dims)?;
    let k = proj(g, ns, &a, "to_k", Some("norm_k"), dims)?;
    let v = proj(g, ns, &a, "to_v", None, dims)?;
    let o = rope_attention(g, q, k, v, rope, dims, &a, t)?;
    let h = g.concat(2, &[o, mlp])?;
    let y = layers::linear(g, h, &format!("{prefix}.proj_out"), d + mlp_dim, d, true)?;
    layers::gated_residual(g, s, m[2], y)
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

    fn parse(v: &serde_json::Value) -> FluxConfig {
        crate::parse_config(v, "config.json").expect("parses")
    }

    fn config() -> FluxConfig {
        fixture_config("flux")
    }

    fn inputs(cfg: &FluxConfig, b: usize, s: usize, t: usize) -> BTreeMap<String, Vec<usize>> {
        let n = cfg.axes_dims_rope.len();
        let mut m = BTreeMap::from([
            ("hidden_states".to_string(), vec![b, s, cfg.in_channels]),
            (
                "encoder_hidden_states".to_string(),
                vec![b, t, cfg.joint_attention_dim],
            ),
            (
                "pooled_projections".to_string(),
                vec![b, cfg.pooled_projection_dim],
            ),
            ("timestep".to_string(), vec![b]),
            ("img_ids".to_string(), vec![s, n]),
            ("txt_ids".to_string(), vec![t, n]),
        ]);
        if cfg.guidance_embeds {
            m.insert("guidance".to_string(), vec![b]);
        }
        m
    }

    #[test]
    fn fixtures_match_checkpoint_and_io() {
        for rel in ["flux", "flux-pipeline/transformer"] {
            check_fixture::<FluxConfig>(rel);
        }
    }

    #[test]
    fn fixture_shapes_and_defaults() {
        let cfg = config();
        let s = cfg.shapes_from_inputs(&fixture_inputs("flux")).unwrap();
        assert_eq!(
            s,
            Shapes {
                batch: 1,
                height: 8,
                width: 8,
                text_len: 7
            }
        );
        let d = cfg.default_shapes();
        assert_eq!((d.batch, d.height, d.width, d.text_len), (1, 64, 64, 512));
        assert_eq!(cfg.summary(&d).image_tokens, 4096);
        build_all(&cfg, d);

        let def: FluxConfig = parse(&serde_json::json!({}));
        def.validate().unwrap();
        assert_eq!((def.inner_dim(), def.out_ch()), (3072, 64));
        assert!(!def.guidance_embeds);

        assert_eq!(grid_of(64), (8, 8));
        assert_eq!(grid_of(3072), (48, 64));
        assert_eq!(grid_of(7), (1, 7));
        assert_eq!(grid_of(1), (1, 1));
    }

    /// Scaling by 1000, text-first ids and the shared RoPE tables.
    #[test]
    fn time_scale_and_rope_order() {
        let cfg = config();
        let g = build_all(
            &cfg,
            cfg.shapes_from_inputs(&inputs(&cfg, 1, 64, 7)).unwrap(),
        );
        let scalars: Vec<f64> = g
            .nodes()
            .iter()
            .filter_map(|n| match n {
                Op::Scalar(f) => g.float_attr(*f),
                _ => None,
            })
            .collect();
        assert!(scalars.contains(&1000.0));
        let mut ids_concat = None;
        for n in g.nodes() {
            if let Op::RopeCos(ch) = n {
                assert!(ids_concat.replace(ch[0]).is_none(), "one RoPE table");
            }
        }
        let Op::Concat(ch) = g.node(ids_concat.expect("rope table")) else {
            panic!("ids are a concat");
        };
        let name = |id| match g.node(id) {
            Op::Input(c) => g.name_attr(c[0]).unwrap().to_string(),
            _ => String::new(),
        };
        assert_eq!(
            (name(ch[1]), name(ch[2])),
            ("txt_ids".into(), "img_ids".into())
        );
        let ropes = g
            .nodes()
            .iter()
            .filter(|n| matches!(n, Op::Rope(_)))
            .count();
        assert_eq!(ropes, 2 * (cfg.num_layers + cfg.num_single_layers));
    }

    #[test]
    fn shapes_follow_config_and_inputs() {
        let base = config();
        for heads in [3, 5] {
            for guidance_embeds in [false, true] {
                let cfg = FluxConfig {
                    num_attention_heads: heads,
                    attention_head_dim: 12,
                    axes_dims_rope: vec![2, 4, 6],
                    num_layers: 2,
                    num_single_layers: 3,
                    out_channels: Some(8),
                    patch_size: 2,
                    guidance_embeds,
                    ..base.clone()
                };
                let s = cfg.shapes_from_inputs(&inputs(&cfg, 3, 48, 5)).unwrap();
                assert_eq!((s.height, s.width), (6, 8));
                let g = build_all(&cfg, s);
                let d = heads * 12;
                assert_eq!(output_shape(&g, "sample"), &[3, 48, 2 * 2 * 8]);
                for (list, n) in [("transformer_blocks", 2), ("single_transformer_blocks", 3)] {
                    for i in 0..n {
                        assert_eq!(
                            output_shape(&g, &format!("block.{list}.{i}.out0")),
                            &[3, 5, d]
                        );
                        assert_eq!(
                            output_shape(&g, &format!("block.{list}.{i}.out1")),
                            &[3, 48, d]
                        );
                    }
                }
                let w = reachable_weights(&g);
                assert_eq!(
                    w.contains_key("time_text_embed.guidance_embedder.linear_1.weight"),
                    guidance_embeds
                );
                assert_eq!(
                    w["single_transformer_blocks.2.proj_out.weight"],
                    vec![d, 5 * d]
                );
                assert_eq!(
                    w["single_transformer_blocks.0.norm.linear.weight"],
                    vec![3 * d, d]
                );
                assert_eq!(w["transformer_blocks.1.attn.norm_added_k.weight"], vec![12]);
                assert_eq!(w["x_embedder.weight"], vec![d, 16]);
            }
        }
        // Only one kind of block.
        for (layers, singles) in [(0, 2), (2, 0)] {
            let cfg = FluxConfig {
                num_layers: layers,
                num_single_layers: singles,
                ..base.clone()
            };
            let g = build_all(&cfg, cfg.default_shapes());
            assert_eq!(output_shape(&g, "sample"), &[1, 4096, 16]);
        }
        let g = base
            .build(&base.default_shapes(), &BuildOptions::default())
            .unwrap();
        assert_eq!(g.outputs.len(), 1);
    }

    #[test]
    fn bad_configs_are_named() {
        let base = config();
        let cases: Vec<(FluxConfig, &str)> = vec![
            (
                FluxConfig {
                    num_attention_heads: 0,
                    ..base.clone()
                },
                "num_attention_heads",
            ),
            (
                FluxConfig {
                    in_channels: 0,
                    ..base.clone()
                },
                "in_channels",
            ),
            (
                FluxConfig {
                    out_channels: Some(0),
                    ..base.clone()
                },
                "out_channels",
            ),
            (
                FluxConfig {
                    num_layers: 0,
                    num_single_layers: 0,
                    ..base.clone()
                },
                "num_layers",
            ),
            (
                FluxConfig {
                    axes_dims_rope: vec![4, 6, 8],
                    ..base.clone()
                },
                "axes_dims_rope",
            ),
            (
                FluxConfig {
                    axes_dims_rope: vec![5, 5, 6],
                    ..base.clone()
                },
                "axes_dims_rope",
            ),
            (
                FluxConfig {
                    axes_dims_rope: vec![],
                    ..base.clone()
                },
                "axes_dims_rope",
            ),
        ];
        for (cfg, field) in cases {
            let err = cfg.validate().expect_err(field).to_string();
            assert!(err.contains(field), "{err}");
            assert!(cfg
                .build(&base.default_shapes(), &BuildOptions::default())
                .is_err());
        }
    }

    #[test]
    fn bad_inputs_are_named() {
        let cfg = config();
        let ok = inputs(&cfg, 1, 64, 7);
        cfg.shapes_from_inputs(&ok).unwrap();
        let with = |name, shape| with_input(&ok, name, shape);
        let without = |name| without_input(&ok, name);
        let cases = vec![
            (with("hidden_states", vec![1, 4, 8, 8]), "hidden_states"),
            (with("hidden_states", vec![1, 64, 4]), "hidden_states"),
            (
                with("encoder_hidden_states", vec![2, 7, 32]),
                "encoder_hidden_states",
            ),
            (
                with("pooled_projections", vec![1, 32]),
                "pooled_projections",
            ),
            (with("timestep", vec![2]), "timestep"),
            (with("guidance", vec![]), "guidance"),
            (without("guidance"), "guidance"),
            (with("img_ids", vec![63, 3]), "img_ids"),
            (with("img_ids", vec![1, 64, 3]), "deprecated 3-D"),
            (with("txt_ids", vec![7, 2]), "txt_ids"),
            (without("txt_ids"), "txt_ids"),
            (with("class_labels", vec![1]), "class_labels"),
        ];
        for (inputs, needle) in cases {
            let err = cfg
                .shapes_from_inputs(&inputs)
                .expect_err(needle)
                .to_string();
            assert!(err.contains(needle), "{err}");
        }
        let no_guidance = FluxConfig {
            guidance_embeds: false,
            ..cfg.clone()
        };
        let err = no_guidance.shapes_from_inputs(&ok).unwrap_err().to_string();
        assert!(err.contains("guidance_embeds"), "{err}");
        let zero = Shapes {
            batch: 1,
            height: 0,
            width: 8,
            text_len: 7,
        };
        assert!(cfg.build(&zero, &BuildOptions::default()).is_err());
    }
}
