//! `DiTTransformer2DModel` (diffusers `models/transformers/dit_transformer_2d.py`): the
//! class-conditional DiT of Peebles & Xie. Blocks are diffusers' `BasicTransformerBlock` with
//! `norm_type="ada_norm_zero"`; every block owns its own timestep + class embedder
//! (`norm1.emb`), and the final layer is conditioned on block 0's embedder. The pieces of
//! `BasicTransformerBlock` and the config checks it shares with PixArt are in `layers.rs`.

use std::collections::BTreeMap;

use ditto_ir::{DType, Graph, Id};
use serde::Deserialize;

use crate::layers::{
    self, attention, batch_vector, check_dims, check_eps, check_known_inputs, check_shapes,
    config_error, feed_forward, image_tokens, latent_input, layer_norm, positive, Activation, R,
};
use crate::{BuildOptions, ModelError, Shapes, Summary};

const CLASS: &str = "DiTTransformer2DModel";
/// Sinusoidal channels of `Timesteps` inside `CombinedTimestepLabelEmbeddings`.
const TIME_CHANNELS: usize = 256;
/// `CombinedTimestepLabelEmbeddings` builds `Timesteps(256, flip_sin_to_cos=True,
/// downscale_freq_shift=1)`; the 1 is DiT-specific (PixArt/SD3/Flux use 0).
const TIME_FREQ_SHIFT: f64 = 1.0;
/// AdaLayerNormZero's own `nn.LayerNorm(elementwise_affine=False, eps=1e-6)` and `norm_out`
/// are hard-coded in diffusers; `norm_eps` from the config only reaches norm3.
const ADA_LN_EPS: f64 = 1e-6;

fn d_heads() -> usize {
    16
}
fn d_head_dim() -> usize {
    72
}
fn d_in_channels() -> usize {
    4
}
fn d_layers() -> usize {
    28
}
fn d_groups() -> usize {
    32
}
fn d_true() -> bool {
    true
}
fn d_sample_size() -> usize {
    32
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
    "ada_norm_zero".into()
}
fn d_norm_eps() -> f64 {
    1e-5
}

/// `config.json` of a `DiTTransformer2DModel`, with diffusers' defaults.
#[derive(Clone, Debug, Deserialize)]
pub struct DiTConfig {
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_head_dim")]
    pub attention_head_dim: usize,
    #[serde(default = "d_in_channels")]
    pub in_channels: usize,
    /// `None` means `in_channels`; learned-sigma checkpoints have 2 * in_channels.
    #[serde(default)]
    pub out_channels: Option<usize>,
    #[serde(default = "d_layers")]
    pub num_layers: usize,
    /// Inference ignores dropout.
    #[serde(default)]
    pub dropout: f64,
    /// Unused by the patched-input DiT (kept for completeness of the config).
    #[serde(default = "d_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "d_true")]
    pub attention_bias: bool,
    #[serde(default = "d_sample_size")]
    pub sample_size: usize,
    #[serde(default = "d_patch")]
    pub patch_size: usize,
    #[serde(default = "d_activation")]
    pub activation_fn: String,
    /// Number of classes; the label table has one more row (the null class used for CFG).
    #[serde(default = "d_num_embeds")]
    pub num_embeds_ada_norm: Option<usize>,
    /// Only changes the precision of the attention logits in diffusers; we compute in f32.
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default = "d_norm_type")]
    pub norm_type: String,
    /// Affine weights for norm3 (`norm3.weight`, `norm3.bias`) when true.
    #[serde(default)]
    pub norm_elementwise_affine: bool,
    #[serde(default = "d_norm_eps")]
    pub norm_eps: f64,
}

impl DiTConfig {
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads
            .saturating_mul(self.attention_head_dim)
    }

    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    /// Rows of each block's class table: `LabelEmbedding` adds the CFG null class because
    /// `class_dropout_prob` is 0.1 > 0 in `CombinedTimestepLabelEmbeddings`.
    fn class_rows(&self) -> usize {
        self.num_embeds_ada_norm.unwrap_or(0).saturating_add(1)
    }

    pub fn validate(&self) -> Result<(), ModelError> {
        let err = |field: &str, reason: String| config_error(CLASS, field, reason);
        positive(CLASS, "num_attention_heads", self.num_attention_heads)?;
        positive(CLASS, "attention_head_dim", self.attention_head_dim)?;
        positive(CLASS, "in_channels", self.in_channels)?;
        positive(CLASS, "patch_size", self.patch_size)?;
        positive(CLASS, "sample_size", self.sample_size)?;
        if self.out_channels == Some(0) {
            return Err(err("out_channels", "must be positive, got 0".into()));
        }
        if self.num_layers == 0 {
            return Err(err(
                "num_layers",
                "must be at least 1: the final layer is conditioned on transformer_blocks[0].norm1.emb"
                    .into(),
            ));
        }
        if self.norm_type != "ada_norm_zero" {
            return Err(err(
                "norm_type",
                format!(
                    "`{}` is not supported (DiTTransformer2DModel only has \"ada_norm_zero\")",
                    self.norm_type
                ),
            ));
        }
        match self.num_embeds_ada_norm {
            None | Some(0) => {
                return Err(err(
                    "num_embeds_ada_norm",
                    "must be a positive class count for ada_norm_zero".into(),
                ))
            }
            Some(_) => {}
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

    /// Inputs: `hidden_states` [B, in_channels, H, W], `timestep` [B], `class_labels` [B].
    pub fn shapes_from_inputs(
        &self,
        inputs: &BTreeMap<String, Vec<usize>>,
    ) -> Result<Shapes, ModelError> {
        self.validate()?;
        check_known_inputs(inputs, &["hidden_states", "timestep", "class_labels"])?;
        let (batch, height, width) = latent_input(inputs, self.in_channels, self.patch_size)?;
        batch_vector(inputs, "timestep", batch)?;
        batch_vector(inputs, "class_labels", batch)?;
        Ok(Shapes {
            batch,
            height,
            width,
            text_len: 0,
        })
    }

    pub fn default_shapes(&self) -> Shapes {
        Shapes {
            batch: 2,
            height: self.sample_size,
            width: self.sample_size,
            text_len: 0,
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
        check_shapes(shapes, self.patch_size, false)?;
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
        let t = g.input("timestep", DType::F32, &[b])?;
        let labels = g.input("class_labels", DType::I64, &[b])?;

        // PatchEmbed: conv patchify, then the fixed 2-D sin-cos table. diffusers recomputes the
        // table for grids other than sample_size/p with base_size = sample_size // p and the
        // default interpolation_scale 1 (DiT does not pass one).
        let x = layers::patch_embed(&mut g, hs, "pos_embed.proj", c, d, p)?;
        let pos = g.sincos_pos_embed(d, gh, gw, (self.sample_size / p) as f64, 1.0)?;
        let x = g.add_(x, pos)?;
        // The image token stream: what sequence parallelism splits across ranks.
        let mut x = g.seq(x)?;
        g.mark_boundary(&[x]);

        let mut cond0 = None;
        for i in 0..self.num_layers {
            let prefix = format!("transformer_blocks.{i}");
            let emb = self.label_timestep_embedding(&mut g, t, labels, &prefix)?;
            cond0.get_or_insert(emb);
            x = self.block(&mut g, x, emb, &prefix, act)?;
            g.mark_boundary(&[x]);
            if opts.block_outputs {
                g.output(&format!("block.transformer_blocks.{i}.out0"), x);
            }
        }
        let cond =
            cond0.ok_or_else(|| config_error(CLASS, "num_layers", "must be at least 1".into()))?;

        // Final layer: chunk order (shift, scale), unlike AdaLayerNormContinuous.
        let s = g.silu(cond)?;
        let m = layers::linear(&mut g, s, "proj_out_1", d, 2 * d, true)?;
        let ss = g.chunk(m, 2, 1)?;
        let n = g.layer_norm(x, ADA_LN_EPS)?;
        let n = layers::modulate(&mut g, n, ss[0], ss[1])?;
        let oc = self.out_channels();
        let y = layers::linear(&mut g, n, "proj_out_2", d, p * p * oc, true)?;
        // diffusers takes height = width = sqrt(tokens) here, so it only handles square grids;
        // with the real grid sizes this is the same for square inputs and correct otherwise.
        let y = layers::unpatchify(&mut g, y, p, gh, gw, oc)?;
        g.output("sample", y);
        Ok(g)
    }

    /// `CombinedTimestepLabelEmbeddings` at `{prefix}.norm1.emb`: timestep MLP + class row.
    fn label_timestep_embedding(&self, g: &mut Graph, t: Id, labels: Id, prefix: &str) -> R {
        let d = self.inner_dim();
        let emb_prefix = format!("{prefix}.norm1.emb");
        let te = layers::timestep_embedder(
            g,
            t,
            &format!("{emb_prefix}.timestep_embedder"),
            TIME_CHANNELS,
            d,
            true,
            TIME_FREQ_SHIFT,
        )?;
        let table = g.weight(
            &format!("{emb_prefix}.class_embedder.embedding_table.weight"),
            &[self.class_rows(), d],
        )?;
        let ce = g.embedding(table, labels)?;
        Ok(g.add_(te, ce)?)
    }

    /// `BasicTransformerBlock` with `norm_type="ada_norm_zero"` and no cross-attention.
    fn block(&self, g: &mut Graph, x: Id, emb: Id, prefix: &str, act: Activation) -> R {
        let d = self.inner_dim();
        let c = layers::ada_chunks(g, emb, &format!("{prefix}.norm1"), d, d, 6)?;
        let (shift_msa, scale_msa, gate_msa) = (c[0], c[1], c[2]);
        let (shift_mlp, scale_mlp, gate_mlp) = (c[3], c[4], c[5]);

        let n = g.layer_norm(x, ADA_LN_EPS)?;
        let n = layers::modulate(g, n, shift_msa, scale_msa)?;
        g.tap(format!("{prefix}.modulated_input"), n);
        let a = attention(
            g,
            n,
            n,
            &format!("{prefix}.attn1"),
            d,
            d,
            self.num_attention_heads,
            self.attention_head_dim,
            self.attention_bias,
        )?;
        let x = layers::gated_residual(g, x, gate_msa, a)?;

        let n = layer_norm(
            g,
            x,
            &format!("{prefix}.norm3"),
            d,
            self.norm_eps,
            self.norm_elementwise_affine,
        )?;
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

    fn config() -> DiTConfig {
        fixture_config("dit")
    }

    #[test]
    fn fixture_graph_matches_checkpoint() {
        config().validate().expect("valid");
        let (shapes, g) = check_fixture::<DiTConfig>("dit");
        assert_eq!(
            shapes,
            Shapes {
                batch: 2,
                height: 16,
                width: 16,
                text_len: 0
            }
        );
        let ins = inputs_of(&g);
        assert_eq!(ins["hidden_states"], ("f32".into(), vec![2, 4, 16, 16]));
        assert_eq!(ins["timestep"], ("f32".into(), vec![2]));
        assert_eq!(ins["class_labels"], ("i64".into(), vec![2]));
        assert_eq!(ins.len(), 3);
        // Learned sigma: all 2 * in_channels come out of the model.
        assert_eq!(config().out_channels(), 8);
    }

    #[test]
    fn without_block_outputs_only_sample() {
        let cfg = config();
        let g = cfg
            .build(&cfg.default_shapes(), &BuildOptions::default())
            .expect("build");
        assert_eq!(g.outputs.len(), 1);
        assert_eq!(g.outputs[0].0, "sample");
    }

    #[test]
    fn shapes_follow_config_and_inputs() {
        for (heads, layers, batch, h, w) in [
            (3, 2, 2, 16, 16),
            (5, 4, 3, 16, 24),
            (4, 3, 1, 8, 32),
            (1, 1, 2, 6, 10),
        ] {
            let mut cfg = config();
            cfg.num_attention_heads = heads;
            cfg.num_layers = layers;
            let shapes = Shapes {
                batch,
                height: h,
                width: w,
                text_len: 0,
            };
            let g = build_all(&cfg, shapes);
            let d = heads * 16;
            assert_eq!(output_shape(&g, "sample"), vec![batch, 8, h, w]);
            let tokens = (h / 2) * (w / 2);
            for i in 0..layers {
                assert_eq!(
                    output_shape(&g, &format!("block.transformer_blocks.{i}.out0")),
                    vec![batch, tokens, d]
                );
            }
            assert!(g
                .outputs
                .iter()
                .all(|(n, _)| !n.contains(&format!(".{layers}."))));
            let ws = weights(&g);
            assert_eq!(
                ws[&format!("transformer_blocks.{}.norm1.linear.weight", layers - 1)],
                vec![6 * d, d]
            );
            assert_eq!(
                ws["transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"],
                vec![11, d]
            );
            assert_eq!(ws["proj_out_2.weight"], vec![2 * 2 * 8, d]);
            assert_eq!(cfg.summary(&shapes).image_tokens, tokens);
        }
    }

    #[test]
    fn out_channels_default_and_affine_norm3() {
        let mut cfg = config();
        cfg.out_channels = None;
        cfg.norm_elementwise_affine = true;
        let g = build_all(&cfg, cfg.default_shapes());
        assert_eq!(output_shape(&g, "sample"), vec![2, 4, 16, 16]);
        let ws = weights(&g);
        assert_eq!(ws["transformer_blocks.1.norm3.weight"], vec![64]);
        assert_eq!(ws["transformer_blocks.1.norm3.bias"], vec![64]);
        assert_eq!(ws["proj_out_2.weight"], vec![16, 64]);
    }

    #[test]
    fn defaults_are_diffusers_defaults() {
        let cfg: DiTConfig =
            crate::parse_config(&serde_json::json!({}), "config.json").expect("parse");
        assert_eq!(cfg.num_attention_heads, 16);
        assert_eq!(cfg.attention_head_dim, 72);
        assert_eq!(cfg.num_layers, 28);
        assert_eq!(cfg.sample_size, 32);
        assert_eq!(cfg.out_channels(), 4);
        assert_eq!(cfg.num_embeds_ada_norm, Some(1000));
        assert_eq!(cfg.norm_eps, 1e-5);
        cfg.validate().expect("DiT-XL/2 defaults are valid");
        let s = cfg.summary(&cfg.default_shapes());
        assert_eq!((s.hidden, s.image_tokens), (1152, 256));
        assert_eq!(s.class_name, CLASS);
    }

    #[test]
    fn bad_configs() {
        type Edit = Box<dyn Fn(&mut DiTConfig)>;
        let cases: Vec<(Edit, &str)> = vec![
            (Box::new(|c| c.patch_size = 0), "patch_size"),
            (
                Box::new(|c| c.num_attention_heads = 0),
                "num_attention_heads",
            ),
            (Box::new(|c| c.attention_head_dim = 0), "attention_head_dim"),
            (Box::new(|c| c.in_channels = 0), "in_channels"),
            (Box::new(|c| c.out_channels = Some(0)), "out_channels"),
            (Box::new(|c| c.num_layers = 0), "num_layers"),
            (Box::new(|c| c.norm_type = "ada_norm".into()), "norm_type"),
            (
                Box::new(|c| c.num_embeds_ada_norm = None),
                "num_embeds_ada_norm",
            ),
            (
                Box::new(|c| c.activation_fn = "geglu".into()),
                "activation_fn",
            ),
            (Box::new(|c| c.norm_eps = f64::NAN), "norm_eps"),
            (Box::new(|c| c.sample_size = 15), "sample_size"),
            (
                Box::new(|c| {
                    c.num_attention_heads = 3;
                    c.attention_head_dim = 5
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
        let bad = serde_json::json!({"patch_size": -1});
        assert!(crate::parse_config::<DiTConfig>(&bad, "x/config.json").is_err());
    }

    #[test]
    fn bad_inputs() {
        let cfg = config();
        let good = fixture_inputs("dit");
        let with = |name, shape| with_input(&good, name, shape);
        let without = |name| without_input(&good, name);
        for (inputs, want) in [
            (with("hidden_states", vec![2, 3, 16, 16]), "hidden_states"),
            (with("hidden_states", vec![2, 4, 15, 16]), "hidden_states"),
            (with("hidden_states", vec![2, 4, 16]), "hidden_states"),
            (with("hidden_states", vec![0, 4, 16, 16]), "hidden_states"),
            (with("timestep", vec![3]), "timestep"),
            (with("timestep", vec![2, 1]), "timestep"),
            (with("class_labels", vec![1]), "class_labels"),
            (without("class_labels"), "missing input `class_labels`"),
            (without("hidden_states"), "missing input `hidden_states`"),
            (
                with("encoder_hidden_states", vec![2, 7, 32]),
                "unexpected input",
            ),
        ] {
            let e = err_text(cfg.shapes_from_inputs(&inputs));
            assert!(e.contains(want), "{e} should mention {want}");
        }
        for shapes in [
            Shapes {
                batch: 0,
                height: 16,
                width: 16,
                text_len: 0,
            },
            Shapes {
                batch: 2,
                height: 17,
                width: 16,
                text_len: 0,
            },
            Shapes {
                batch: 2,
                height: 16,
                width: 0,
                text_len: 0,
            },
        ] {
            let e = err_text(cfg.build(&shapes, &with_block_outputs()));
            assert!(e.contains("bad input"), "{e}");
        }
    }
}
