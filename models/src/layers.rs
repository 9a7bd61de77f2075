//! Building blocks shared by the model families, named after the diffusers modules they
//! mirror. Each takes the weight-name prefix the diffusers module has in the checkpoint.
//! At the bottom, the config and input checks DiT and PixArt share.

use std::collections::BTreeMap;

use ditto_ir::{Graph, Id};

use crate::{ModelError, Shapes};

pub type R<T = Id> = Result<T, ModelError>;

/// `nn.Linear(in_features, out_features, bias)` at `prefix`.
pub fn linear(g: &mut Graph, x: Id, prefix: &str, in_f: usize, out_f: usize, bias: bool) -> R {
    let w = g.weight(&format!("{prefix}.weight"), &[out_f, in_f])?;
    if bias {
        let b = g.weight(&format!("{prefix}.bias"), &[out_f])?;
        Ok(g.linear_bias(x, w, b)?)
    } else {
        Ok(g.linear(x, w)?)
    }
}

/// diffusers `TimestepEmbedding` fed by `Timesteps(in_ch, flip_sin_to_cos, shift)`:
/// sinusoidal features -> linear_1 -> SiLU -> linear_2.
pub fn timestep_embedder(
    g: &mut Graph,
    t: Id,
    prefix: &str,
    in_ch: usize,
    dim: usize,
    flip_sin_to_cos: bool,
    downscale_freq_shift: f64,
) -> R {
    let f = g.timestep_embedding(t, in_ch, flip_sin_to_cos, downscale_freq_shift, 1.0)?;
    mlp_silu(g, f, prefix, in_ch, dim)
}

/// linear_1 -> SiLU -> linear_2 (diffusers `TimestepEmbedding`, `PixArtAlphaTextProjection`
/// with act "silu").
pub fn mlp_silu(g: &mut Graph, x: Id, prefix: &str, in_f: usize, dim: usize) -> R {
    let h = linear(g, x, &format!("{prefix}.linear_1"), in_f, dim, true)?;
    let h = g.silu(h)?;
    linear(g, h, &format!("{prefix}.linear_2"), dim, dim, true)
}

/// diffusers `FeedForward(dim, activation_fn="gelu-approximate")`: net.0.proj -> GELU(tanh)
/// -> net.2.
pub fn feed_forward_gelu_tanh(g: &mut Graph, x: Id, prefix: &str, dim: usize, inner: usize) -> R {
    let h = linear(g, x, &format!("{prefix}.net.0.proj"), dim, inner, true)?;
    let h = g.gelu_tanh(h)?;
    linear(g, h, &format!("{prefix}.net.2"), inner, dim, true)
}

/// `x * (1 + scale) + shift` with per-sample vectors `shift`, `scale` of shape [B, D]
/// broadcast over the tokens of x [B, S, D].
pub fn modulate(g: &mut Graph, x: Id, shift: Id, scale: Id) -> R {
    let b = g.shape(shift)[0];
    let d = g.shape(shift)[1];
    let shift = g.reshape(shift, &[b, 1, d])?;
    let scale = g.reshape(scale, &[b, 1, d])?;
    let one_plus = g.add_scalar(scale, 1.0)?;
    let y = g.mul(x, one_plus)?;
    Ok(g.add_(y, shift)?)
}

/// `x + gate * y` with a per-sample gate [B, D] broadcast over tokens.
pub fn gated_residual(g: &mut Graph, x: Id, gate: Id, y: Id) -> R {
    let b = g.shape(gate)[0];
    let d = g.shape(gate)[1];
    let gate = g.reshape(gate, &[b, 1, d])?;
    let gy = g.mul(y, gate)?;
    Ok(g.add_(x, gy)?)
}

/// Conv2d(kernel = stride = p) patch embedding as patchify + linear:
/// x[B, C, H, W] -> tokens [B, (H/p)*(W/p), D] in row-major patch order.
pub fn patch_embed(g: &mut Graph, x: Id, prefix: &str, in_ch: usize, dim: usize, p: usize) -> R {
    let s = g.shape(x).to_vec();
    let (b, h, w) = (s[0], s[2], s[3]);
    if s[1] != in_ch || h % p != 0 || w % p != 0 {
        return Err(ModelError::Input(format!(
            "hidden_states must be [B, {in_ch}, H, W] with H and W multiples of the patch size {p}, got {s:?}"
        )));
    }
    let (gh, gw) = (h / p, w / p);
    let r = g.reshape(x, &[b, in_ch, gh, p, gw, p])?;
    let r = g.permute(r, &[0, 2, 4, 1, 3, 5])?;
    let tokens = g.reshape(r, &[b, gh * gw, in_ch * p * p])?;
    let w4 = g.weight(&format!("{prefix}.weight"), &[dim, in_ch, p, p])?;
    let w2 = g.reshape(w4, &[dim, in_ch * p * p])?;
    let bias = g.weight(&format!("{prefix}.bias"), &[dim])?;
    Ok(g.linear_bias(tokens, w2, bias)?)
}

/// Inverse of patchify as diffusers' DiT/PixArt/SD3 do it: tokens [B, h*w, p*p*c] with
/// channel order (py, px, c) -> image [B, c, h*p, w*p].
pub fn unpatchify(g: &mut Graph, x: Id, p: usize, h: usize, w: usize, c: usize) -> R {
    let b = g.shape(x)[0];
    let r = g.reshape(x, &[b, h, w, p, p, c])?;
    let r = g.permute(r, &[0, 5, 1, 3, 2, 4])?;
    Ok(g.reshape(r, &[b, c, h * p, w * p])?)
}

/// Self-attention's projections: q, k, v (each [B, S, D]) from `x` at `prefix.to_{q,k,v}`.
pub fn qkv(
    g: &mut Graph,
    x: Id,
    prefix: &str,
    dim_in: usize,
    inner: usize,
    bias: bool,
) -> R<[Id; 3]> {
    Ok([
        linear(g, x, &format!("{prefix}.to_q"), dim_in, inner, bias)?,
        linear(g, x, &format!("{prefix}.to_k"), dim_in, inner, bias)?,
        linear(g, x, &format!("{prefix}.to_v"), dim_in, inner, bias)?,
    ])
}

/// Per-head RMS norm with weight `prefix.weight` [head_dim] on x [B, S, H*D].
pub fn head_rms_norm(g: &mut Graph, x: Id, prefix: &str, heads: usize, eps: f64) -> R {
    let s = g.shape(x).to_vec();
    let d = s[2] / heads;
    let r = g.reshape(x, &[s[0], s[1], heads, d])?;
    let n = g.rms_norm(r, eps)?;
    let w = g.weight(&format!("{prefix}.weight"), &[d])?;
    let n = g.mul(n, w)?;
    Ok(g.reshape(n, &s)?)
}

/// `linear(silu(emb))` at `prefix.linear` ([n*dim, emb_dim]) split into `n` vectors [B, dim],
/// in the order diffusers' adaptive norms unpack them (AdaLayerNormZero: shift, scale, gate
/// for attention then for the MLP; AdaLayerNormContinuous: scale, shift).
pub fn ada_chunks(
    g: &mut Graph,
    emb: Id,
    prefix: &str,
    emb_dim: usize,
    dim: usize,
    n: usize,
) -> R<Vec<Id>> {
    let e = g.silu(emb)?;
    let e = linear(g, e, &format!("{prefix}.linear"), emb_dim, n * dim, true)?;
    Ok(g.chunk(e, n, 1)?)
}

/// diffusers `AdaLayerNormContinuous(dim, emb_dim, elementwise_affine=False, eps)`, the
/// `norm_out` of SD3/Flux: LN(x) * (1 + scale) + shift with (scale, shift) chunked in that
/// order — the reverse of AdaLayerNormZero.
pub fn ada_layer_norm_continuous(
    g: &mut Graph,
    x: Id,
    emb: Id,
    prefix: &str,
    emb_dim: usize,
    dim: usize,
    eps: f64,
) -> R {
    let c = ada_chunks(g, emb, prefix, emb_dim, dim, 2)?;
    let n = g.layer_norm(x, eps)?;
    modulate(g, n, c[1], c[0])
}

/// diffusers `CombinedTimestepTextProjEmbeddings` (`guidance` None) and
/// `CombinedTimestepGuidanceTextProjEmbeddings` at `prefix`: timestep_embedder(Timesteps(256,
/// flip_sin_to_cos=True, shift=0)(t)) [+ guidance_embedder(same features of guidance)] +
/// text_embedder(pooled) (PixArtAlphaTextProjection, SiLU), summed in that order.
pub fn combined_timestep_text_proj(
    g: &mut Graph,
    t: Id,
    guidance: Option<Id>,
    pooled: Id,
    prefix: &str,
    pooled_dim: usize,
    dim: usize,
) -> R {
    let mut emb = timestep_embedder(
        g,
        t,
        &format!("{prefix}.timestep_embedder"),
        256,
        dim,
        true,
        0.0,
    )?;
    if let Some(gd) = guidance {
        let ge = timestep_embedder(
            g,
            gd,
            &format!("{prefix}.guidance_embedder"),
            256,
            dim,
            true,
            0.0,
        )?;
        emb = g.add_(emb, ge)?;
    }
    let text = mlp_silu(
        g,
        pooled,
        &format!("{prefix}.text_embedder"),
        pooled_dim,
        dim,
    )?;
    Ok(g.add_(emb, text)?)
}

// ---------------------------------------------------------------------------------------------
// Pieces of diffusers' `BasicTransformerBlock` (DiT, PixArt).

/// The `FeedForward` activations we implement (diffusers' `activation_fn`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Activation {
    /// "gelu-approximate": `GELU(approximate="tanh")`.
    GeluTanh,
    /// "gelu": exact erf GELU.
    Gelu,
}

impl Activation {
    pub(crate) fn parse(class: &str, s: &str) -> Result<Self, ModelError> {
        match s {
            "gelu-approximate" => Ok(Self::GeluTanh),
            "gelu" => Ok(Self::Gelu),
            other => Err(config_error(
                class,
                "activation_fn",
                format!("`{other}` is not supported (expected \"gelu-approximate\" or \"gelu\")"),
            )),
        }
    }
}

/// diffusers `FeedForward(dim, mult=4, activation_fn)`: net.0.proj -> act -> net.2.
pub(crate) fn feed_forward(g: &mut Graph, x: Id, prefix: &str, dim: usize, act: Activation) -> R {
    let inner = 4 * dim;
    match act {
        Activation::GeluTanh => feed_forward_gelu_tanh(g, x, prefix, dim, inner),
        Activation::Gelu => {
            let h = linear(g, x, &format!("{prefix}.net.0.proj"), dim, inner, true)?;
            let h = g.gelu(h)?;
            linear(g, h, &format!("{prefix}.net.2"), inner, dim, true)
        }
    }
}

/// diffusers `Attention` with the default processor: to_q on `x`, to_k/to_v on `ctx`,
/// softmax(q kᵀ / sqrt(head_dim)) v over `heads` heads, then to_out.0 (always biased:
/// `attention_out_bias` defaults to True in `BasicTransformerBlock`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention(
    g: &mut Graph,
    x: Id,
    ctx: Id,
    prefix: &str,
    dim: usize,
    ctx_dim: usize,
    heads: usize,
    head_dim: usize,
    bias: bool,
) -> R {
    let inner = heads * head_dim;
    let q = linear(g, x, &format!("{prefix}.to_q"), dim, inner, bias)?;
    let k = linear(g, ctx, &format!("{prefix}.to_k"), ctx_dim, inner, bias)?;
    let v = linear(g, ctx, &format!("{prefix}.to_v"), ctx_dim, inner, bias)?;
    let o = g.attention(q, k, v, heads, 1.0 / (head_dim as f64).sqrt())?;
    // Self-attention keys are image tokens; cross-attention keys are the caption's.
    let keys = if ctx == x { "img" } else { "txt" };
    g.tap(format!("{prefix}.k_{keys}"), k);
    g.tap(format!("{prefix}.v_{keys}"), v);
    g.tap(format!("{prefix}.out_img"), o);
    linear(g, o, &format!("{prefix}.to_out.0"), inner, dim, true)
}

/// `nn.LayerNorm(dim, eps, elementwise_affine)` at `prefix` (weight and bias when affine).
pub(crate) fn layer_norm(
    g: &mut Graph,
    x: Id,
    prefix: &str,
    dim: usize,
    eps: f64,
    affine: bool,
) -> R {
    let n = g.layer_norm(x, eps)?;
    if !affine {
        return Ok(n);
    }
    let w = g.weight(&format!("{prefix}.weight"), &[dim])?;
    let b = g.weight(&format!("{prefix}.bias"), &[dim])?;
    let n = g.mul(n, w)?;
    Ok(g.add_(n, b)?)
}

// ---------------------------------------------------------------------------------------------
// Config and input checks of the `BasicTransformerBlock` models (DiT, PixArt).

pub(crate) fn config_error(class: &str, field: &str, reason: String) -> ModelError {
    ModelError::Config {
        path: format!("config.json ({class})"),
        reason: format!("`{field}` {reason}"),
    }
}

pub(crate) fn positive(class: &str, field: &str, v: usize) -> Result<(), ModelError> {
    if v == 0 {
        return Err(config_error(class, field, "must be positive, got 0".into()));
    }
    Ok(())
}

pub(crate) fn check_eps(class: &str, field: &str, eps: f64) -> Result<(), ModelError> {
    if !eps.is_finite() || eps < 0.0 {
        return Err(config_error(
            class,
            field,
            format!("must be a finite non-negative number, got {eps}"),
        ));
    }
    Ok(())
}

/// Checks shared by the patch-embedded transformers: the sin-cos table needs a width that is
/// a multiple of 4, and `base_size = sample_size // patch_size` must be positive.
pub(crate) fn check_dims(
    class: &str,
    heads: usize,
    head_dim: usize,
    sample_size: usize,
    patch: usize,
) -> Result<(), ModelError> {
    let d = heads.checked_mul(head_dim).ok_or_else(|| {
        config_error(
            class,
            "num_attention_heads",
            format!("* attention_head_dim overflows ({heads} * {head_dim})"),
        )
    })?;
    if d % 4 != 0 {
        return Err(config_error(
            class,
            "num_attention_heads",
            format!(
                "* attention_head_dim = {heads} * {head_dim} = {d} must be a multiple of 4 for the 2-D sin-cos position embedding"
            ),
        ));
    }
    if sample_size % patch != 0 {
        return Err(config_error(
            class,
            "sample_size",
            format!("{sample_size} is not a multiple of patch_size {patch}"),
        ));
    }
    Ok(())
}

pub(crate) fn check_shapes(shapes: &Shapes, p: usize, text: bool) -> Result<(), ModelError> {
    if shapes.batch == 0 {
        return Err(ModelError::Input("batch must be positive, got 0".into()));
    }
    if shapes.height == 0 || shapes.width == 0 || shapes.height % p != 0 || shapes.width % p != 0 {
        return Err(ModelError::Input(format!(
            "latent height and width must be positive multiples of patch_size {p}, got {}x{}",
            shapes.height, shapes.width
        )));
    }
    if text && shapes.text_len == 0 {
        return Err(ModelError::Input(
            "text length must be positive, got 0".into(),
        ));
    }
    Ok(())
}

pub(crate) fn image_tokens(shapes: &Shapes, p: usize) -> usize {
    if p == 0 {
        return 0;
    }
    (shapes.height / p) * (shapes.width / p)
}

pub(crate) fn check_known_inputs(
    inputs: &BTreeMap<String, Vec<usize>>,
    known: &[&str],
) -> Result<(), ModelError> {
    for name in inputs.keys() {
        if !known.contains(&name.as_str()) {
            return Err(ModelError::Input(format!(
                "unexpected input `{name}` (this model takes {})",
                known.join(", ")
            )));
        }
    }
    Ok(())
}

pub(crate) fn get_input<'a>(
    inputs: &'a BTreeMap<String, Vec<usize>>,
    name: &str,
) -> Result<&'a [usize], ModelError> {
    inputs
        .get(name)
        .map(Vec::as_slice)
        .ok_or_else(|| ModelError::Input(format!("missing input `{name}`")))
}

/// `hidden_states` [B, C, H, W] -> (B, H, W), checked against the config.
pub(crate) fn latent_input(
    inputs: &BTreeMap<String, Vec<usize>>,
    in_channels: usize,
    p: usize,
) -> Result<(usize, usize, usize), ModelError> {
    let s = get_input(inputs, "hidden_states")?;
    let ok = s.len() == 4
        && s[0] > 0
        && s[1] == in_channels
        && s[2] > 0
        && s[3] > 0
        && s[2] % p == 0
        && s[3] % p == 0;
    if !ok {
        return Err(ModelError::Input(format!(
            "`hidden_states` has shape {s:?}; expected [B, {in_channels}, H, W] with B > 0 and H, W positive multiples of patch_size {p}"
        )));
    }
    Ok((s[0], s[2], s[3]))
}

/// A per-sample vector input such as `timestep` or `class_labels`: exactly [batch].
pub(crate) fn batch_vector(
    inputs: &BTreeMap<String, Vec<usize>>,
    name: &str,
    batch: usize,
) -> Result<(), ModelError> {
    let s = get_input(inputs, name)?;
    if s != [batch] {
        return Err(ModelError::Input(format!(
            "`{name}` has shape {s:?}; expected [{batch}] (one value per sample of hidden_states)"
        )));
    }
    Ok(())
}
