//! `PixArtTransformer2DModel` (diffusers `models/transformers/pixart_transformer_2d.py`):
//! PixArt-α/Σ with adaLN-single. One `adaln_single` MLP per step gives 6·D modulation values
//! that every block offsets by its own `scale_shift_table`; blocks are diffusers'
//! `BasicTransformerBlock` with `norm_type="ada_norm_single"` (gated self-attention,
//! ungated cross-attention to the projected caption without a pre-norm, gated feed-forward).
//!
//! Not supported: `encoder_attention_mask` (the fixtures call the model without one, which
//! means every caption token is attended to; a padded caption needs the mask) and
//! `use_additional_conditions` (PixArt-α's resolution/aspect-ratio embedders).

use std::collections::BTreeMap;

use ditto_ir::{DType, Graph, Id};
use serde::Deserialize;

use crate::layers::{
    self, attention, batch_vector, check_dims, check_eps, check_known_inputs, check_shapes,
    config_error, feed_forward, get_input, image_tokens, latent_input, layer_norm, positive,
    Activation, R,
};
use crate::{BuildOptions, ModelError, Shapes, Summary};

const CLASS: &str = "PixArtTransformer2DModel";
/// `PixArtAlphaCombinedTimestepSizeEmbeddings`: `Timesteps(256, flip_sin_to_cos=True,
/// downscale_freq_shift=0)`.
const TIME_CHANNELS: usize = 256;
/// `norm_out` is `nn.LayerNorm(inner_dim, elementwise_affine=False, eps=1e-6)` whatever
/// `norm_eps` says.
const NORM_OUT_EPS: f64 = 1e-6;
/// PixArt-Σ encodes prompts with 300 T5 tokens.
const DEFAULT_TEXT_LEN: usize = 300;

fn d_heads() -> usize {
    16
}
fn d_head_dim() -> usize {
    72
}
fn d_in_channels() -> usize {
    4
}
fn d_out_channels() -> Option<usize> {
    Some(8)
}
fn d_layers() -> usize {
    28
}
fn d_groups() -> usize {
    32
}
fn d_cross_dim() -> Option<usize> {
    Some(1152)
}
fn d_true() -> bool {
    true
}
fn d_sample_size() -> usize {
    128
}
fn d_patch() -> usize {
    2
}
fn d_activation() -> String {
    "gelu-approximate".into()
}
fn d_num_embeds() -> Option<usize> {
    Some(1000)
}
fn d_norm_type() -> String {
    "ada_norm_single".into()
}
fn d_norm_eps() -> f64 {
    1e-6
}
fn d_attention_type() -> Option<String> {
    Some("default".into())
}

/// `config.json` of a `PixArtTransformer2DModel`, with diffusers' defaults.
#[derive(Clone, Debug, Deserialize)]
pub struct PixArtConfig {
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_head_dim")]
    pub attention_head_dim: usize,
    #[serde(default = "d_in_channels")]
    pub in_channels: usize,
    /// diffusers' default is 8 (learned sigma); an explicit `null` means `in_channels`.
    #[serde(default = "d_out_channels")]
    pub out_channels: Option<usize>,
    #[serde(default = "d_layers")]
    pub num_layers: usize,
    /// Inference ignores dropout.
    #[serde(default)]
    pub dropout: f64,
    /// Unused by the patched-input model.
    #[serde(default = "d_groups")]
    pub norm_num_groups: usize,
    /// Width of `encoder_hidden_states` as attn2's keys/values see it. With a caption
    /// projection that is the projection's output, so it must equal the inner dim.
    #[serde(default = "d_cross_dim")]
    pub cross_attention_dim: Option<usize>,
    #[serde(default = "d_true")]
    pub attention_bias: bool,
    #[serde(default = "d_sample_size")]
    pub sample_size: usize,
    #[serde(default = "d_patch")]
    pub patch_size: usize,
    #[serde(default = "d_activation")]
    pub activation_fn: String,
    /// Must be set for ada_norm_single in diffusers, but no weight depends on it.
    #[serde(default = "d_num_embeds")]
    pub num_embeds_ada_norm: Option<usize>,
    /// Only changes the precision of the attention logits in diffusers; we compute in f32.
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default = "d_norm_type")]
    pub norm_type: String,
    /// Affine weights for the blocks' norm1/norm2 when true.
    #[serde(default)]
    pub norm_elementwise_affine: bool,
    #[serde(default = "d_norm_eps")]
    pub norm_eps: f64,
    /// `None` means `max(sample_size // 64, 1)`. A float so both `2` and `2.0` parse.
    #[serde(default)]
    pub interpolation_scale: Option<f64>,
    /// `None` means `sample_size == 128` (diffusers' PixArt-α 1024 rule).
    #[serde(default)]
    pub use_additional_conditions: Option<bool>,
    /// Width of the text encoder's output; `None` means no caption projection.
    #[serde(default)]
    pub caption_channels: Option<usize>,
    #[serde(default = "d_attention_type")]
    pub attention_type: Option<String>,
}

impl PixArtConfig {
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads
            .saturating_mul(self.attention_head_dim)
    }

    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    pub fn interpolation_scale(&self) -> f64 {
        self.interpolation_scale
            .unwrap_or((self.sample_size / 64).max(1) as f64)
    }

    pub fn use_additional_conditions(&self) -> bool {
        self.use_additional_conditions
            .unwrap_or(self.sample_size == 128)
    }

    /// Last dimension of the `encoder_hidden_states` input.
    pub fn text_channels(&self) -> usize {
        self.caption_channels
            .or(self.cross_attention_dim)
            .unwrap_or(0)
    }

    pub fn validate(&self) -> Result<(), ModelError> {
        let err = |field: &str, reason: String| config_error(CLASS, field, reason);
        positive(CLASS, "num_attention_heads", self.num_attention_heads)?;
        positive(CLASS, "attention_head_dim", self.attention_head_dim)?;
        positive(CLASS, "in_channels", self.in_channels)?;
        positive(CLASS, "patch_size", self.patch_size)?;
        positive(CLASS, "sample_size", self.sample_size)?;
        positive(CLASS, "num_layers", self.num_layers)?;
        if self.out_channels == Some(0) {
            return Err(err("out_channels", "must be positive, got 0".into()));
        }
        if self.norm_type != "ada_norm_single" {
            return Err(err(
                "norm_type",
                format!(
                    "`{}` is not supported (PixArtTransformer2DModel only has \"ada_norm_single\")",
                    self.norm_type
                ),
            ));
        }
        if self.num_embeds_ada_norm.is_none() {
            return Err(err(
                "num_embeds_ada_norm",
                "must be set for ada_norm_single (diffusers refuses null)".into(),
            ));
        }
        match self.attention_type.as_deref() {
            Some("default") => {}
            other => {
                return Err(err(
                    "attention_type",
                    format!("{other:?} is not supported (only \"default\")"),
                ))
            }
        }
        if self.use_additional_conditions() {
            return Err(err(
                "use_additional_conditions",
                format!(
                    "is {} (explicitly or because sample_size is 128): the resolution/aspect-ratio embedders of PixArt-α are not implemented; set it to false for PixArt-Σ checkpoints",
                    match self.use_additional_conditions {
                        Some(_) => "true",
                        None => "implied",
                    }
                ),
            ));
        }
        let d = self.inner_dim();
        match (self.cross_attention_dim, self.caption_channels) {
            (None, _) => {
                return Err(err(
                    "cross_attention_dim",
                    "must be set: blocks without cross-attention are not supported".into(),
                ))
            }
            (Some(0), _) => return Err(err("cross_attention_dim", "must be positive, got 0".into())),
            (_, Some(0)) => return Err(err("caption_channels", "must be positive, got 0".into())),
            (Some(x), Some(_)) if x != d => {
                return Err(err(
                    "cross_attention_dim",
                    format!(
                        "is {x} but the caption projection outputs num_attention_heads * attention_head_dim = {d} features"
                    ),
                ))
            }
            _ => {}
        }
        let scale = self.interpolation_scale();
        if !scale.is_finite() || scale <= 0.0 {
            return Err(err(
                "interpolation_scale",
                format!("must be a positive number, got {scale}"),
            ));
        }
        Activation::parse(CLASS, &self.activation_fn)?;
        check_eps(CLASS, "norm_eps", self.norm_eps)?;
        check_dims(
            CLASS,
            self.num_attention_heads,
            self.attention_head_dim,
            self.sample_size,
            self.patch_size,
        )
    }

    /// Inputs: `hidden_states` [B, in_channels, H, W], `encoder_hidden_states`
    /// [B, T, caption_channels] (or cross_attention_dim without a caption projection),
    /// `timestep` [B].
    pub fn shapes_from_inputs(
        &self,
        inputs: &BTreeMap<String, Vec<usize>>,
    ) -> Result<Shapes, ModelError> {
        self.validate()?;
        if inputs.contains_key("encoder_attention_mask") {
            return Err(ModelError::Input(
                "`encoder_attention_mask` is not supported yet: pass unpadded captions (all tokens attended)"
                    .into(),
            ));
        }
        check_known_inputs(
            inputs,
            &["hidden_states", "encoder_hidden_states", "timestep"],
        )?;
        let (batch, height, width) = latent_input(inputs, self.in_channels, self.patch_size)?;
        batch_vector(inputs, "timestep", batch)?;
        let e = get_input(inputs, "encoder_hidden_states")?;
        let c = self.text_channels();
        if e.len() != 3 || e[0] != batch || e[1] == 0 || e[2] != c {
            return Err(ModelError::Input(format!(
                "`encoder_hidden_states` has shape {e:?}; expected [{batch}, T, {c}] with T > 0"
            )));
        }
        Ok(Shapes {
            batch,
            height,
            width,
            text_len: e[1],
        })
    }

    pub fn default_shapes(&self) -> Shapes {
        Shapes {
            batch: 2,
            height: self.sample_size,
            width: self.sample_size,
            text_len: DEFAULT_TEXT_LEN,
        }
    }

    pub fn summary(&self, shapes: &Shapes) -> Summary {
        Summary {
            class_name: CLASS.into(),
            layers: format!("{} transformer_blocks", self.num_layers),
            heads: self.num_attention_heads,
            head_dim: self.attention_head_dim,
            hidden: self.inner_dim(),
            in_channels: self.in_channels,
            patch_size: self.patch_size,
            image_tokens: image_tokens(shapes, self.patch_size),
        }
    }

    pub fn build(&self, shapes: &Shapes, opts: &BuildOptions) -> Result<Graph, ModelError> {
        self.validate()?;
        check_shapes(shapes, self.patch_size, true)?;
        let (b, c, p, d) = (
            shapes.batch,
            self.in_channels,
            self.patch_size,
            self.inner_dim(),
        );
        let (gh, gw) = (shapes.height / p, shapes.width / p);
        let act = Activation::parse(CLASS, &self.activation_fn)?;

        let mut g = Graph::new();
        let hs = g.input(
            "hidden_states",
            DType::F32,
            &[b, c, shapes.height, shapes.width],
        )?;
        let text = g.input(
            "encoder_hidden_states",
            DType::F32,
            &[b, shapes.text_len, self.text_channels()],
        )?;
        let t = g.input("timestep", DType::F32, &[b])?;

        // PatchEmbed with base_size = sample_size // p and the config's interpolation scale
        // (PixArt-Σ 1024: sample_size 128, scale 2).
        let x = layers::patch_embed(&mut g, hs, "pos_embed.proj", c, d, p)?;
        let pos = g.sincos_pos_embed(
            d,
            gh,
            gw,
            (self.sample_size / p) as f64,
            self.interpolation_scale(),
        )?;
        let x = g.add_(x, pos)?;
        // The image token stream: what sequence parallelism splits across ranks.
        let mut x = g.seq(x)?;
        g.mark_boundary(&[x]);

        // AdaLayerNormSingle: returns linear(SiLU(emb)) for the blocks and emb itself
        // ("embedded_timestep") for the final layer.
        let emb = layers::timestep_embedder(
            &mut g,
            t,
            "adaln_single.emb.timestep_embedder",
            TIME_CHANNELS,
            d,
            true,
            0.0,
        )?;
        let s = g.silu(emb)?;
        let t6 = layers::linear(&mut g, s, "adaln_single.linear", d, 6 * d, true)?;
        let t6 = g.reshape(t6, &[b, 6, d])?;

        // PixArtAlphaTextProjection: linear_1 -> GELU(tanh) -> linear_2.
        let ctx = match self.caption_channels {
            Some(cc) => {
                let h = layers::linear(&mut g, text, "caption_projection.linear_1", cc, d, true)?;
                let h = g.gelu_tanh(h)?;
                layers::linear(&mut g, h, "caption_projection.linear_2", d, d, true)?
            }
            None => text,
        };
        let ctx_dim = g.shape(ctx)[2];

        for i in 0..self.num_layers {
            let prefix = format!("transformer_blocks.{i}");
            x = self.block(&mut g, x, t6, ctx, ctx_dim, &prefix, act)?;
            g.mark_boundary(&[x]);
            if opts.block_outputs {
                g.output(&format!("block.transformer_blocks.{i}.out0"), x);
            }
        }

        // Final layer: (scale_shift_table[None] + embedded_timestep[:, None]).chunk(2, dim=1)
        // gives (shift, scale) in that order.
        let table = g.weight("scale_shift_table", &[2, d])?;
        let e = g.reshape(emb, &[b, 1, d])?;
        let m = g.add_(table, e)?;
        let (shift, scale) = self.row_pair(&mut g, m, 0, 1)?;
        let n = g.layer_norm(x, NORM_OUT_EPS)?;
        let n = layers::modulate(&mut g, n, shift, scale)?;
        let oc = self.out_channels();
        let y = layers::linear(&mut g, n, "proj_out", d, p * p * oc, true)?;
        let y = layers::unpatchify(&mut g, y, p, gh, gw, oc)?;
        g.output("sample", y);
        Ok(g)
    }

    /// Rows `i` and `j` of a [B, n, D] modulation tensor as [B, D] vectors.
    fn row_pair(&self, g: &mut Graph, m: Id, i: usize, j: usize) -> R<(Id, Id)> {
        Ok((self.row(g, m, i)?, self.row(g, m, j)?))
    }

    fn row(&self, g: &mut Graph, m: Id, i: usize) -> R {
        let s = g.shape(m).to_vec();
        let r = g.slice(m, 1, i, i + 1)?;
        Ok(g.reshape(r, &[s[0], s[2]])?)
    }

    /// `BasicTransformerBlock` with `norm_type="ada_norm_single"`.
    #[allow(clippy::too_many_arguments)]
    fn block(
        &self,
        g: &mut Graph,
        x: Id,
        t6: Id,
        ctx: Id,
        ctx_dim: usize,
        prefix: &str,
        act: Activation,
    ) -> R {
        let d = self.inner_dim();
        let (heads, hd, bias) = (
            self.num_attention_heads,
            self.attention_head_dim,
            self.attention_bias,
        );
        // scale_shift_table[None] + timestep.reshape(B, 6, -1), chunked along dim 1 as
        // (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp).
        let table = g.weight(&format!("{prefix}.scale_shift_table"), &[6, d])?;
        let m = g.add_(table, t6)?;
        let (shift_msa, scale_msa) = self.row_pair(g, m, 0, 1)?;
        let (gate_msa, shift_mlp) = self.row_pair(g, m, 2, 3)?;
        let (scale_mlp, gate_mlp) = self.row_pair(g, m, 4, 5)?;
        let affine = self.norm_elementwise_affine;

        let n = layer_norm(g, x, &format!("{prefix}.norm1"), d, self.norm_eps, affine)?;
        let n = layers::modulate(g, n, shift_msa, scale_msa)?;
        g.tap(format!("{prefix}.modulated_input"), n);
        let a = attention(g, n, n, &format!("{prefix}.attn1"), d, d, heads, hd, bias)?;
        let x = layers::gated_residual(g, x, gate_msa, a)?;

        // PixArt applies no norm before cross-attention (the block feeds hidden_states
        // itself to attn2) and no gate after it.
        let a = attention(
            g,
            x,
            ctx,
            &format!("{prefix}.attn2"),
            d,
            ctx_dim,
            heads,
            hd,
            bias,
        )?;
        let x = g.add_(a, x)?;

        // norm2 (not norm3) is the feed-forward's norm for ada_norm_single.
        let n = layer_norm(g, x, &format!("{prefix}.norm2"), d, self.norm_eps, affine)?;
        let n = layers::modulate(g, n, shift_mlp, scale_mlp)?;
        let f = feed_forward(g, n, &format!("{prefix}.ff"), d, act)?;
        layers::gated_residual(g, x, gate_mlp, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{
        build_all, check_fixture, err_text, fixture_config, fixture_inputs, inputs_of,
        output_shape, weights, with_block_outputs, with_input, without_input,
    };

    fn config() -> PixArtConfig {
        fixture_config("pixart")
    }

    #[test]
    fn fixture_graph_matches_checkpoint() {
        config().validate().expect("valid");
        let (shapes, g) = check_fixture::<PixArtConfig>("pixart");
        assert_eq!(
            shapes,
            Shapes {
                batch: 2,
                height: 16,
                width: 16,
                text_len: 7
            }
        );
        let ins = inputs_of(&g);
        assert_eq!(ins["hidden_states"], ("f32".into(), vec![2, 4, 16, 16]));
        assert_eq!(ins["encoder_hidden_states"], ("f32".into(), vec![2, 7, 32]));
        assert_eq!(ins["timestep"], ("f32".into(), vec![2]));
        assert_eq!(ins.len(), 3);
    }

    #[test]
    fn shapes_follow_config_and_inputs() {
        for (heads, layers, batch, h, w, text) in [
            (3, 2, 2, 16, 16, 7),
            (5, 4, 3, 16, 24, 300),
            (4, 3, 1, 8, 32, 1),
            (1, 1, 2, 6, 10, 5),
        ] {
            let mut cfg = config();
            cfg.num_attention_heads = heads;
            cfg.num_layers = layers;
            let d = heads * 16;
            cfg.cross_attention_dim = Some(d);
            let shapes = Shapes {
                batch,
                height: h,
                width: w,
                text_len: text,
            };
            let g = build_all(&cfg, shapes);
            assert_eq!(output_shape(&g, "sample"), vec![batch, 8, h, w]);
            let tokens = (h / 2) * (w / 2);
            for i in 0..layers {
                assert_eq!(
                    output_shape(&g, &format!("block.transformer_blocks.{i}.out0")),
                    vec![batch, tokens, d]
                );
            }
            assert_eq!(g.outputs.len(), layers + 1);
            let ws = weights(&g);
            assert_eq!(
                ws[&format!("transformer_blocks.{}.scale_shift_table", layers - 1)],
                vec![6, d]
            );
            assert_eq!(
                ws[&format!("transformer_blocks.{}.attn2.to_k.weight", layers - 1)],
                vec![d, d]
            );
            assert_eq!(ws["caption_projection.linear_1.weight"], vec![d, 32]);
            assert_eq!(ws["adaln_single.linear.weight"], vec![6 * d, d]);
            assert_eq!(ws["proj_out.weight"], vec![2 * 2 * 8, d]);
            assert_eq!(
                inputs_of(&g)["encoder_hidden_states"].1,
                vec![batch, text, 32]
            );
            assert_eq!(cfg.summary(&shapes).image_tokens, tokens);
        }
    }

    #[test]
    fn without_caption_projection_and_with_affine_norms() {
        let mut cfg = config();
        cfg.caption_channels = None;
        cfg.cross_attention_dim = Some(24);
        cfg.norm_elementwise_affine = true;
        cfg.out_channels = None;
        let shapes = Shapes {
            batch: 2,
            height: 16,
            width: 16,
            text_len: 9,
        };
        let g = build_all(&cfg, shapes);
        assert_eq!(output_shape(&g, "sample"), vec![2, 4, 16, 16]);
        let ws = weights(&g);
        assert!(!ws.keys().any(|k| k.starts_with("caption_projection")));
        assert_eq!(ws["transformer_blocks.0.attn2.to_v.weight"], vec![64, 24]);
        assert_eq!(ws["transformer_blocks.0.attn2.to_q.weight"], vec![64, 64]);
        for norm in ["norm1", "norm2"] {
            assert_eq!(ws[&format!("transformer_blocks.1.{norm}.weight")], vec![64]);
            assert_eq!(ws[&format!("transformer_blocks.1.{norm}.bias")], vec![64]);
        }
        assert_eq!(inputs_of(&g)["encoder_hidden_states"].1, vec![2, 9, 24]);
        let mut inputs = fixture_inputs("pixart");
        inputs.insert("encoder_hidden_states".into(), vec![2, 9, 24]);
        assert_eq!(cfg.shapes_from_inputs(&inputs).expect("shapes").text_len, 9);
    }

    #[test]
    fn defaults_are_diffusers_defaults() {
        let cfg: PixArtConfig =
            crate::parse_config(&serde_json::json!({}), "config.json").expect("parse");
        assert_eq!(cfg.sample_size, 128);
        assert_eq!(cfg.out_channels(), 8);
        assert_eq!(cfg.cross_attention_dim, Some(1152));
        assert_eq!(cfg.norm_eps, 1e-6);
        assert_eq!(cfg.interpolation_scale(), 2.0);
        // sample_size 128 implies the PixArt-α size conditioning.
        assert!(cfg.use_additional_conditions());
        let e = err_text(cfg.validate());
        assert!(e.contains("use_additional_conditions"), "{e}");

        // PixArt-Σ-XL-2-1024-MS's transformer config.
        let sigma: PixArtConfig = crate::parse_config(
            &serde_json::json!({
                "_class_name": "PixArtTransformer2DModel",
                "activation_fn": "gelu-approximate",
                "attention_bias": true,
                "attention_head_dim": 72,
                "attention_type": "default",
                "caption_channels": 4096,
                "cross_attention_dim": 1152,
                "in_channels": 4,
                "interpolation_scale": 2,
                "norm_elementwise_affine": false,
                "norm_eps": 1e-06,
                "norm_num_groups": 32,
                "norm_type": "ada_norm_single",
                "num_attention_heads": 16,
                "num_embeds_ada_norm": 1000,
                "num_layers": 28,
                "out_channels": 8,
                "patch_size": 2,
                "sample_size": 128,
                "upcast_attention": false,
                "use_additional_conditions": false
            }),
            "config.json",
        )
        .expect("parse");
        sigma.validate().expect("valid");
        let shapes = sigma.default_shapes();
        assert_eq!(shapes.text_len, 300);
        let s = sigma.summary(&shapes);
        assert_eq!((s.hidden, s.image_tokens, s.heads), (1152, 4096, 16));
    }

    #[test]
    fn bad_configs() {
        type Edit = Box<dyn Fn(&mut PixArtConfig)>;
        let cases: Vec<(Edit, &str)> = vec![
            (Box::new(|c| c.patch_size = 0), "patch_size"),
            (
                Box::new(|c| c.num_attention_heads = 0),
                "num_attention_heads",
            ),
            (Box::new(|c| c.num_layers = 0), "num_layers"),
            (Box::new(|c| c.out_channels = Some(0)), "out_channels"),
            (
                Box::new(|c| c.norm_type = "ada_norm_zero".into()),
                "norm_type",
            ),
            (
                Box::new(|c| c.num_embeds_ada_norm = None),
                "num_embeds_ada_norm",
            ),
            (
                Box::new(|c| c.attention_type = Some("gated".into())),
                "attention_type",
            ),
            (
                Box::new(|c| c.use_additional_conditions = Some(true)),
                "use_additional_conditions",
            ),
            (
                Box::new(|c| c.cross_attention_dim = None),
                "cross_attention_dim",
            ),
            (
                Box::new(|c| c.cross_attention_dim = Some(32)),
                "cross_attention_dim",
            ),
            (
                Box::new(|c| c.caption_channels = Some(0)),
                "caption_channels",
            ),
            (
                Box::new(|c| c.interpolation_scale = Some(0.0)),
                "interpolation_scale",
            ),
            (
                Box::new(|c| c.activation_fn = "geglu".into()),
                "activation_fn",
            ),
            (Box::new(|c| c.norm_eps = -1.0), "norm_eps"),
            (Box::new(|c| c.sample_size = 17), "sample_size"),
            (
                Box::new(|c| {
                    c.num_attention_heads = 3;
                    c.attention_head_dim = 7;
                    c.cross_attention_dim = Some(21)
                }),
                "multiple of 4",
            ),
        ];
        for (edit, want) in cases {
            let mut cfg = config();
            edit(&mut cfg);
            let e = err_text(cfg.validate());
            assert!(e.contains(want), "{e} should mention {want}");
            let e = err_text(cfg.build(&config().default_shapes(), &with_block_outputs()));
            assert!(e.contains(want), "{e} should mention {want}");
        }
    }

    #[test]
    fn bad_inputs() {
        let cfg = config();
        let good = fixture_inputs("pixart");
        let with = |name, shape| with_input(&good, name, shape);
        let without = |name| without_input(&good, name);
        for (inputs, want) in [
            (with("hidden_states", vec![2, 8, 16, 16]), "hidden_states"),
            (with("hidden_states", vec![2, 4, 16, 13]), "hidden_states"),
            (
                with("encoder_hidden_states", vec![2, 7, 64]),
                "encoder_hidden_states",
            ),
            (
                with("encoder_hidden_states", vec![3, 7, 32]),
                "encoder_hidden_states",
            ),
            (
                with("encoder_hidden_states", vec![2, 0, 32]),
                "encoder_hidden_states",
            ),
            (
                with("encoder_hidden_states", vec![2, 32]),
                "encoder_hidden_states",
            ),
            (with("timestep", vec![1]), "timestep"),
            (
                without("encoder_hidden_states"),
                "missing input `encoder_hidden_states`",
            ),
            (without("timestep"), "missing input `timestep`"),
            (
                with("encoder_attention_mask", vec![2, 7]),
                "encoder_attention_mask",
            ),
            (
                with("class_labels", vec![2]),
                "unexpected input `class_labels`",
            ),
        ] {
            let e = err_text(cfg.shapes_from_inputs(&inputs));
            assert!(e.contains(want), "{e} should mention {want}");
        }
        let shapes = Shapes {
            batch: 2,
            height: 16,
            width: 16,
            text_len: 0,
        };
        let e = err_text(cfg.build(&shapes, &with_block_outputs()));
        assert!(e.contains("text length"), "{e}");
    }
}
