//! Positional/timestep embeddings and embedding lookup, matching diffusers.
//!
//! The rounding steps (which intermediates are f32, which f64) follow the
//! PyTorch code of diffusers 0.42 so results agree to the last ulp or so:
//! timestep frequencies are computed in f32, sincos and RoPE tables in f64.

use rayon::prelude::*;

use super::PAR_MIN_ELEMS;

/// Sinusoidal timestep embedding (`diffusers.models.embeddings.get_timestep_embedding`):
/// `out: [t.len(), dim]`, each row `[sin(t·f), cos(t·f)]` (or `[cos, sin]` with
/// `flip_sin_to_cos`) with `f_i = exp(-ln(max_period)·i / (dim/2 - shift))`,
/// zero-padded by one column when `dim` is odd.
pub fn timestep_embedding(
    t: &[f32],
    dim: usize,
    flip_sin_to_cos: bool,
    downscale_freq_shift: f32,
    scale: f32,
    max_period: f32,
    out: &mut [f32],
) {
    debug_assert!(out.len() >= t.len() * dim);
    let half = dim / 2;
    if dim == 0 {
        return;
    }
    // torch: `-math.log(max_period)` is a Python double, applied to a float32
    // arange (so rounded to f32), then divided by the f32-rounded
    // `half - shift`; exp, the products and sin/cos are all float32.
    let neg_log = (-(max_period as f64).ln()) as f32;
    let denom = (half as f64 - downscale_freq_shift as f64) as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|i| ((neg_log * i as f32) / denom).exp())
        .collect();
    let (sin_at, cos_at) = if flip_sin_to_cos {
        (half, 0)
    } else {
        (0, half)
    };
    for (row, &tv) in out.chunks_exact_mut(dim).zip(t) {
        for (i, &f) in freqs.iter().enumerate() {
            let arg = scale * (tv * f);
            row[sin_at + i] = arg.sin();
            row[cos_at + i] = arg.cos();
        }
        if dim % 2 == 1 {
            row[dim - 1] = 0.0;
        }
    }
}

/// 1-D sincos table of width `d` for one position, as diffusers
/// `get_1d_sincos_pos_embed_from_grid`: `[sin(pos·ω), cos(pos·ω)]` with
/// `ω_j = 1 / 10000^(j / (d/2))`, all in f64.
fn sincos_1d(pos: f32, omega: &[f64], out: &mut [f32]) {
    let (s, c) = out.split_at_mut(omega.len());
    for ((s, c), &w) in s.iter_mut().zip(c).zip(omega) {
        let a = pos as f64 * w;
        *s = a.sin() as f32;
        *c = a.cos() as f32;
    }
}

/// 2-D sincos position embedding (diffusers `get_2d_sincos_pos_embed` with
/// `grid_size = (grid_h, grid_w)`): `out: [grid_h·grid_w, embed_dim]`, tokens
/// in row-major (row, col) order. The first half of each row encodes the
/// column coordinate, the second half the row coordinate; coordinates are
/// `i / (grid / base_size) / interpolation_scale` in f32. `embed_dim` must be
/// a multiple of 4.
pub fn sincos_pos_embed_2d(
    embed_dim: usize,
    grid_h: usize,
    grid_w: usize,
    base_size: f32,
    interpolation_scale: f32,
    out: &mut [f32],
) {
    debug_assert!(embed_dim % 4 == 0);
    debug_assert!(out.len() >= grid_h * grid_w * embed_dim);
    let half = embed_dim / 2;
    if half == 0 {
        return;
    }
    let omega: Vec<f64> = (0..half / 2)
        .map(|j| 1.0 / 10000f64.powf(j as f64 / (half as f64 / 2.0)))
        .collect();
    // torch: float32 arange divided by the Python double `grid / base_size`
    // (rounded to f32), then by `interpolation_scale`, in f32.
    let coords = |n: usize| -> Vec<f32> {
        let d = (n as f64 / base_size as f64) as f32;
        (0..n).map(|i| i as f32 / d / interpolation_scale).collect()
    };
    let (hv, wv) = (coords(grid_h), coords(grid_w));
    for (tok, row) in out
        .chunks_exact_mut(embed_dim)
        .take(grid_h * grid_w)
        .enumerate()
    {
        let (first, second) = row.split_at_mut(half);
        sincos_1d(wv[tok % grid_w], &omega, first);
        sincos_1d(hv[tok / grid_w], &omega, second);
    }
}

/// RoPE tables as diffusers `FluxPosEmbed`: `ids: [seq, axes_dims.len()]`
/// positions; `cos`/`sin: [seq, Σ axes_dims]`. Axis `i` of width `d` fills its
/// block with `cos(ids[s, i]·f_j)` for `f_j = 1 / theta^(2j / d)`, each value
/// repeated for the two elements of pair `j` (`repeat_interleave(2)`);
/// computed in f64, stored as f32. Axis widths must be even.
pub fn rope_cos_sin(
    ids: &[f32],
    seq: usize,
    axes_dims: &[usize],
    theta: f64,
    cos: &mut [f32],
    sin: &mut [f32],
) {
    let n_axes = axes_dims.len();
    let width: usize = axes_dims.iter().sum();
    debug_assert!(axes_dims.iter().all(|d| d % 2 == 0));
    debug_assert!(ids.len() >= seq * n_axes);
    debug_assert!(cos.len() >= seq * width && sin.len() >= seq * width);
    if width == 0 || seq == 0 {
        return;
    }
    // Frequencies for all axes, laid out like one output row (pairs repeated).
    let mut freqs = Vec::with_capacity(width);
    for &d in axes_dims {
        for j in 0..d / 2 {
            let f = 1.0 / theta.powf((2 * j) as f64 / d as f64);
            freqs.extend([f, f]);
        }
    }
    let ids = &ids[..seq * n_axes];
    for ((pos, c_row), s_row) in ids
        .chunks_exact(n_axes)
        .zip(cos.chunks_exact_mut(width))
        .zip(sin.chunks_exact_mut(width))
    {
        let mut at = 0;
        for (&p, &d) in pos.iter().zip(axes_dims) {
            for k in (at..at + d).step_by(2) {
                let a = p as f64 * freqs[k];
                let (c, s) = (a.cos() as f32, a.sin() as f32);
                c_row[k..k + 2].fill(c);
                s_row[k..k + 2].fill(s);
            }
            at += d;
        }
    }
}

/// Applies interleaved-pair RoPE (diffusers `apply_rotary_emb` with
/// `use_real_unbind_dim=-1`) to `x: [batch, seq, heads, head_dim]` with
/// `cos`/`sin: [seq, head_dim]`: for each pair `(x0, x1)`,
/// `out = (x0·cos - x1·sin, x1·cos + x0·sin)`, in f32.
#[allow(clippy::too_many_arguments)]
pub fn apply_rope(
    x: &[f32],
    batch: usize,
    seq: usize,
    heads: usize,
    head_dim: usize,
    cos: &[f32],
    sin: &[f32],
    out: &mut [f32],
) {
    let row = heads * head_dim;
    let total = batch * seq * row;
    debug_assert!(head_dim % 2 == 0);
    debug_assert!(x.len() >= total && out.len() >= total);
    debug_assert!(cos.len() >= seq * head_dim && sin.len() >= seq * head_dim);
    if total == 0 {
        return;
    }
    // One token (all heads) at a time; `t` is the flat (batch, seq) index.
    let token = |t: usize, xs: &[f32], os: &mut [f32]| {
        let s = t % seq;
        let c = &cos[s * head_dim..(s + 1) * head_dim];
        let sn = &sin[s * head_dim..(s + 1) * head_dim];
        for (xh, oh) in xs.chunks_exact(head_dim).zip(os.chunks_exact_mut(head_dim)) {
            for (((xp, op), cp), sp) in xh
                .chunks_exact(2)
                .zip(oh.chunks_exact_mut(2))
                .zip(c.chunks_exact(2))
                .zip(sn.chunks_exact(2))
            {
                // Same operation order as torch (`x*cos + rotated*sin`, no FMA).
                op[0] = xp[0] * cp[0] - xp[1] * sp[0];
                op[1] = xp[1] * cp[1] + xp[0] * sp[1];
            }
        }
    };
    let (x, out) = (&x[..total], &mut out[..total]);
    if total >= PAR_MIN_ELEMS && rayon::current_num_threads() > 1 {
        out.par_chunks_mut(row)
            .zip(x.par_chunks(row))
            .enumerate()
            .with_min_len((4096 / row).max(1))
            .for_each(|(t, (o, xs))| token(t, xs, o));
    } else {
        for (t, (o, xs)) in out
            .chunks_exact_mut(row)
            .zip(x.chunks_exact(row))
            .enumerate()
        {
            token(t, xs, o);
        }
    }
}

/// Gathers rows of `table: [rows, dim]`: `out[i] = table[idx[i]]`.
///
/// Indices are integral floats. If any is negative, fractional, non-finite or
/// `>= rows`, returns `Err(i)` with the position `i` of the first such entry
/// in `idx`, leaving `out` untouched.
pub fn embedding(
    table: &[f32],
    rows: usize,
    dim: usize,
    idx: &[f32],
    out: &mut [f32],
) -> Result<(), usize> {
    debug_assert!(table.len() >= rows * dim && out.len() >= idx.len() * dim);
    if let Some(bad) = idx
        .iter()
        .position(|&v| !(v >= 0.0 && v.fract() == 0.0 && (v as f64) < rows as f64))
    {
        return Err(bad);
    }
    if dim == 0 {
        return Ok(());
    }
    for (o, &v) in out.chunks_exact_mut(dim).zip(idx) {
        let r = v as usize;
        o.copy_from_slice(&table[r * dim..(r + 1) * dim]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::kernels::test_util::{assert_close, f64s, Rng};

    #[test]
    fn timestep_embedding_matches_reference() {
        let t = [0.0f32, 1.0, 17.5, 999.0, 500.25];
        for &(dim, flip, shift, scale) in &[
            (256usize, true, 0.0f32, 1.0f32), // PixArt / DiT
            (320, true, 1.0, 1.0),            // SD-style
            (7, false, 1.0, 2.0),             // odd: zero pad
            (2, false, 0.0, 1.0),
            (1, false, 0.0, 1.0),
        ] {
            let mut out = vec![f32::NAN; t.len() * dim];
            timestep_embedding(&t, dim, flip, shift, scale, 10000.0, &mut out);
            // Reference: the same f32-rounded arguments as torch, but sin/cos
            // evaluated in f64.
            let half = dim / 2;
            let mut want = vec![0.0f64; out.len()];
            for (r, &tv) in t.iter().enumerate() {
                for i in 0..half {
                    let e = (-(10000f64.ln()) as f32 * i as f32) / (half as f32 - shift);
                    let f = (e as f64).exp() as f32;
                    let a = (scale * (tv * f)) as f64;
                    let (s, c) = (a.sin(), a.cos());
                    let (first, second) = if flip { (c, s) } else { (s, c) };
                    want[r * dim + i] = first;
                    want[r * dim + half + i] = second;
                }
            }
            assert_close(&out, &want, 1e-5);
        }
    }

    #[test]
    fn timestep_embedding_known_values() {
        // t = 1, dim = 4, shift 0: freqs = [1, 0.01].
        let mut out = [0.0f32; 4];
        timestep_embedding(&[1.0], 4, false, 0.0, 1.0, 10000.0, &mut out);
        let want = [1f64.sin(), 0.01f64.sin(), 1f64.cos(), 0.01f64.cos()];
        assert_close(&out, &want, 1e-6);
    }

    #[test]
    fn sincos_2d_matches_reference() {
        for &(d, gh, gw, base, interp) in &[
            (16usize, 3usize, 5usize, 4.0f32, 1.0f32),
            (1152, 32, 32, 32.0, 1.0), // PixArt-α 256px: 32×32 tokens
            (64, 4, 6, 64.0, 2.0),
        ] {
            let mut out = vec![f32::NAN; gh * gw * d];
            sincos_pos_embed_2d(d, gh, gw, base, interp, &mut out);
            // Reference built the diffusers way: meshgrid(w, h) planes, then
            // 1-D embeddings of each plane concatenated.
            let gvals = |n: usize| -> Vec<f32> {
                (0..n)
                    .map(|i| i as f32 / ((n as f64 / base as f64) as f32) / interp)
                    .collect()
            };
            let (hv, wv) = (gvals(gh), gvals(gw));
            let mut plane0 = Vec::new(); // varies with column
            let mut plane1 = Vec::new(); // varies with row
            for &h in &hv {
                for &w in &wv {
                    plane0.push(w);
                    plane1.push(h);
                }
            }
            let emb1d = |pos: &[f32]| -> Vec<Vec<f64>> {
                let dd = d / 2;
                pos.iter()
                    .map(|&p| {
                        let om: Vec<f64> = (0..dd / 2)
                            .map(|j| 1.0 / 10000f64.powf(j as f64 / (dd as f64 / 2.0)))
                            .collect();
                        let sins = om.iter().map(|&o| (p as f64 * o).sin());
                        let coss = om.iter().map(|&o| (p as f64 * o).cos());
                        sins.chain(coss).collect()
                    })
                    .collect()
            };
            let (e0, e1) = (emb1d(&plane0), emb1d(&plane1));
            let want: Vec<f64> = e0
                .iter()
                .zip(&e1)
                .flat_map(|(a, b)| a.iter().chain(b).cloned().collect::<Vec<_>>())
                .collect();
            assert_close(&out, &want, 1e-6);
        }
    }

    #[test]
    fn sincos_2d_first_token_and_column() {
        // Token 0 has both coordinates 0: sin half 0, cos half 1.
        let mut out = vec![0.0f32; 2 * 3 * 8];
        sincos_pos_embed_2d(8, 2, 3, 2.0, 1.0, &mut out);
        assert_eq!(&out[..8], &[0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0]);
        // Token 1 = (row 0, col 1): only the first (column) half moves.
        // grid_w = 3, base 2: coordinate 1 / 1.5.
        let w = (1.0f32 / 1.5f32) as f64;
        assert!((out[8] as f64 - w.sin()).abs() < 1e-7);
        assert_eq!(&out[12..16], &[0.0, 0.0, 1.0, 1.0]);
    }

    #[test]
    fn rope_tables_match_reference() {
        let mut rng = Rng::new(41);
        let axes = [4usize, 6, 2];
        let seq = 9;
        let ids: Vec<f32> = (0..seq * axes.len())
            .map(|_| rng.below(64) as f32)
            .collect();
        let width: usize = axes.iter().sum();
        let mut c = vec![f32::NAN; seq * width];
        let mut s = vec![f32::NAN; seq * width];
        rope_cos_sin(&ids, seq, &axes, 10000.0, &mut c, &mut s);
        let mut wc = Vec::new();
        let mut ws = Vec::new();
        for p in 0..seq {
            for (ai, &d) in axes.iter().enumerate() {
                for k in 0..d {
                    let j = k / 2;
                    let f = 1.0 / 10000f64.powf((2 * j) as f64 / d as f64);
                    let a = ids[p * axes.len() + ai] as f64 * f;
                    wc.push(a.cos());
                    ws.push(a.sin());
                }
            }
        }
        assert_close(&c, &wc, 1e-6);
        assert_close(&s, &ws, 1e-6);
    }

    #[test]
    fn apply_rope_matches_reference() {
        let mut rng = Rng::new(42);
        for &(b, seq, h, hd) in &[
            (1usize, 1usize, 1usize, 2usize),
            (2, 7, 3, 8),
            (2, 64, 4, 64),
        ] {
            let x = rng.vec(b * seq * h * hd);
            let ang: Vec<f64> = (0..seq * hd / 2)
                .map(|_| rng.uniform() as f64 * 10.0)
                .collect();
            // cos/sin with the pair structure of real RoPE tables.
            let c: Vec<f32> = (0..seq * hd).map(|i| ang[i / 2].cos() as f32).collect();
            let s: Vec<f32> = (0..seq * hd).map(|i| ang[i / 2].sin() as f32).collect();
            let mut out = vec![f32::NAN; x.len()];
            apply_rope(&x, b, seq, h, hd, &c, &s, &mut out);
            let mut want = vec![0.0f64; x.len()];
            for bi in 0..b {
                for si in 0..seq {
                    for hi in 0..h {
                        let base = ((bi * seq + si) * h + hi) * hd;
                        for j in 0..hd / 2 {
                            let (x0, x1) = (x[base + 2 * j] as f64, x[base + 2 * j + 1] as f64);
                            let k = si * hd + 2 * j;
                            want[base + 2 * j] = x0 * c[k] as f64 - x1 * s[k] as f64;
                            want[base + 2 * j + 1] = x1 * c[k + 1] as f64 + x0 * s[k + 1] as f64;
                        }
                    }
                }
            }
            assert_close(&out, &want, 1e-6);
        }
    }

    #[test]
    fn embedding_gathers_and_rejects() {
        let table: Vec<f32> = (0..12).map(|v| v as f32).collect(); // 4 rows × 3
        let mut out = vec![0.0f32; 9];
        embedding(&table, 4, 3, &[3.0, 0.0, 1.0], &mut out).unwrap();
        assert_close(
            &out,
            &f64s(&[9.0, 10.0, 11.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0]),
            0.0,
        );
        let mut out = vec![-1.0f32; 6];
        assert_eq!(embedding(&table, 4, 3, &[1.0, 4.0], &mut out), Err(1));
        assert_eq!(embedding(&table, 4, 3, &[0.5, 1.0], &mut out), Err(0));
        assert_eq!(embedding(&table, 4, 3, &[1.0, -1.0], &mut out), Err(1));
        assert_eq!(embedding(&table, 4, 3, &[f32::NAN, 0.0], &mut out), Err(0));
        assert_eq!(
            embedding(&table, 4, 3, &[f32::INFINITY, 0.0], &mut out),
            Err(0)
        );
        assert!(out.iter().all(|&v| v == -1.0), "out written on error");
    }
}
