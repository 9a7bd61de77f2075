//! 2-D convolution (im2col + GEMM) and nearest-neighbour upsampling, NCHW.

use rayon::prelude::*;

use super::gemm::gemm_f32;
use super::PAR_MIN_ELEMS;

/// Upper bound on the im2col scratch, in floats (16 MiB). Large convolutions
/// (VAE decoders) would otherwise need hundreds of MiB for the full matrix, so
/// output rows are processed in bands that fit.
const COL_BUDGET: usize = 4 << 20;
/// Work (m·n·k) above which one GEMM uses the whole rayon pool.
const GEMM_PAR_WORK: usize = 64 * 64 * 64;

/// Convolution of `x: [n, c_in, h, w]` with `weight: [c_out, c_in, kh, kw]`
/// (PyTorch layout), zero padding `pad` on every side and equal `stride` in
/// both directions. Writes `out: [n, c_out, ho, wo]` with
/// `ho = (h + 2·pad - kh) / stride + 1` (likewise `wo`).
#[allow(clippy::too_many_arguments)]
pub fn conv2d(
    x: &[f32],
    n: usize,
    c_in: usize,
    h: usize,
    w: usize,
    weight: &[f32],
    c_out: usize,
    kh: usize,
    kw: usize,
    bias: Option<&[f32]>,
    stride: usize,
    pad: usize,
    out: &mut [f32],
) {
    debug_assert!(stride > 0 && kh > 0 && kw > 0);
    debug_assert!(h + 2 * pad >= kh && w + 2 * pad >= kw);
    if stride == 0 || h + 2 * pad < kh || w + 2 * pad < kw {
        return;
    }
    let ho = (h + 2 * pad - kh) / stride + 1;
    let wo = (w + 2 * pad - kw) / stride + 1;
    let kdim = c_in * kh * kw;
    let plane = ho * wo;
    debug_assert!(x.len() >= n * c_in * h * w);
    debug_assert!(weight.len() >= c_out * kdim);
    debug_assert!(out.len() >= n * c_out * plane);
    debug_assert!(bias.is_none_or(|b| b.len() == c_out));
    if n == 0 || c_out == 0 || plane == 0 {
        return;
    }

    let direct = kh == 1 && kw == 1 && stride == 1 && pad == 0;
    // Whole output rows per band, at least one even if it exceeds the budget.
    let band_rows = if direct {
        ho
    } else {
        (COL_BUDGET / (kdim * wo).max(1)).clamp(1, ho)
    };
    let mut col = if direct {
        Vec::new()
    } else {
        vec![0.0f32; kdim * band_rows * wo]
    };

    for (xs, os) in x
        .chunks_exact(c_in * h * w)
        .zip(out.chunks_exact_mut(c_out * plane))
        .take(n)
    {
        // The bias seeds the output so the GEMMs can accumulate onto it.
        if let Some(b) = bias {
            for (row, &bv) in os.chunks_exact_mut(plane).zip(b) {
                row.fill(bv);
            }
        }
        if direct {
            gemm_f32(
                c_out,
                plane,
                kdim,
                os,
                plane,
                weight,
                kdim,
                1,
                xs,
                plane,
                1,
                bias.is_some(),
                c_out * plane * kdim > GEMM_PAR_WORK,
            );
            continue;
        }
        let mut oy0 = 0;
        while oy0 < ho {
            let rows = band_rows.min(ho - oy0);
            let cols = rows * wo;
            let col = &mut col[..kdim * cols];
            im2col(xs, h, w, kh, kw, stride, pad, oy0, rows, wo, col);
            gemm_f32(
                c_out,
                cols,
                kdim,
                &mut os[oy0 * wo..],
                plane,
                weight,
                kdim,
                1,
                col,
                cols,
                1,
                bias.is_some(),
                c_out * cols * kdim > GEMM_PAR_WORK,
            );
            oy0 += rows;
        }
    }
}

/// Fills `col: [c_in·kh·kw, rows·wo]` with the receptive-field values of
/// output rows `oy0..oy0+rows` of one image `x: [c_in, h, w]`.
#[allow(clippy::too_many_arguments)]
fn im2col(
    x: &[f32],
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    pad: usize,
    oy0: usize,
    rows: usize,
    wo: usize,
    col: &mut [f32],
) {
    let cols = rows * wo;
    let fill_row = |r: usize, dst: &mut [f32]| {
        let (ci, kij) = (r / (kh * kw), r % (kh * kw));
        let (ki, kj) = (kij / kw, kij % kw);
        let src = &x[ci * h * w..(ci + 1) * h * w];
        // Output columns whose input column ox·stride + kj - pad lies in [0, w).
        let ox_lo = pad.saturating_sub(kj).div_ceil(stride).min(wo);
        let ox_hi = if w + pad > kj {
            ((w + pad - kj - 1) / stride + 1).min(wo)
        } else {
            0
        }
        .max(ox_lo);
        for (oy, d) in (oy0..oy0 + rows).zip(dst.chunks_exact_mut(wo)) {
            let iy = (oy * stride + ki) as isize - pad as isize;
            if iy < 0 || iy >= h as isize {
                d.fill(0.0);
                continue;
            }
            let srow = &src[iy as usize * w..(iy as usize + 1) * w];
            d[..ox_lo].fill(0.0);
            d[ox_hi..].fill(0.0);
            // ox_lo·stride + kj ≥ pad whenever ox_lo < ox_hi.
            let ix0 = ox_lo * stride + kj;
            if ox_lo < ox_hi {
                let ix0 = ix0 - pad;
                if stride == 1 {
                    d[ox_lo..ox_hi].copy_from_slice(&srow[ix0..ix0 + (ox_hi - ox_lo)]);
                } else {
                    for (o, s) in d[ox_lo..ox_hi]
                        .iter_mut()
                        .zip(srow[ix0..].iter().step_by(stride))
                    {
                        *o = *s;
                    }
                }
            }
        }
    };
    if col.len() >= PAR_MIN_ELEMS && rayon::current_num_threads() > 1 {
        col.par_chunks_mut(cols)
            .enumerate()
            .with_min_len((4096 / cols).max(1))
            .for_each(|(r, d)| fill_row(r, d));
    } else {
        for (r, d) in col.chunks_exact_mut(cols).enumerate() {
            fill_row(r, d);
        }
    }
}

/// Nearest-neighbour 2× upsampling: `x: [n, c, h, w]` → `out: [n, c, 2h, 2w]`.
pub fn upsample_nearest2x(x: &[f32], n: usize, c: usize, h: usize, w: usize, out: &mut [f32]) {
    let planes = n * c;
    debug_assert!(x.len() >= planes * h * w && out.len() >= planes * 4 * h * w);
    if planes == 0 || h == 0 || w == 0 {
        return;
    }
    let x = &x[..planes * h * w];
    let out = &mut out[..planes * 4 * h * w];
    let one = |src: &[f32], dst: &mut [f32]| {
        for (srow, dpair) in src.chunks_exact(w).zip(dst.chunks_exact_mut(4 * w)) {
            let (even, odd) = dpair.split_at_mut(2 * w);
            for (d, &s) in even.chunks_exact_mut(2).zip(srow) {
                d[0] = s;
                d[1] = s;
            }
            odd.copy_from_slice(even);
        }
    };
    if out.len() >= PAR_MIN_ELEMS && planes > 1 && rayon::current_num_threads() > 1 {
        out.par_chunks_mut(4 * h * w)
            .zip(x.par_chunks(h * w))
            .with_min_len((PAR_MIN_ELEMS / (4 * h * w)).max(1))
            .for_each(|(d, s)| one(s, d));
    } else {
        for (d, s) in out.chunks_exact_mut(4 * h * w).zip(x.chunks_exact(h * w)) {
            one(s, d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::kernels::test_util::{assert_close, Rng};

    #[allow(clippy::too_many_arguments)]
    fn naive_conv(
        x: &[f32],
        n: usize,
        c_in: usize,
        h: usize,
        w: usize,
        wt: &[f32],
        c_out: usize,
        kh: usize,
        kw: usize,
        bias: Option<&[f32]>,
        stride: usize,
        pad: usize,
    ) -> Vec<f64> {
        let ho = (h + 2 * pad - kh) / stride + 1;
        let wo = (w + 2 * pad - kw) / stride + 1;
        let mut out = vec![0.0f64; n * c_out * ho * wo];
        for b in 0..n {
            for co in 0..c_out {
                for oy in 0..ho {
                    for ox in 0..wo {
                        let mut s = bias.map_or(0.0, |b| b[co] as f64);
                        for ci in 0..c_in {
                            for ki in 0..kh {
                                for kj in 0..kw {
                                    let iy = (oy * stride + ki) as isize - pad as isize;
                                    let ix = (ox * stride + kj) as isize - pad as isize;
                                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                        continue;
                                    }
                                    let xv =
                                        x[((b * c_in + ci) * h + iy as usize) * w + ix as usize];
                                    let wv = wt[((co * c_in + ci) * kh + ki) * kw + kj];
                                    s += xv as f64 * wv as f64;
                                }
                            }
                        }
                        out[((b * c_out + co) * ho + oy) * wo + ox] = s;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn conv2d_matches_reference() {
        let mut rng = Rng::new(21);
        // (n, c_in, h, w, c_out, kh, kw, stride, pad)
        let cases = [
            (1, 1, 1, 1, 1, 1, 1, 1, 0),
            (2, 3, 8, 8, 5, 3, 3, 1, 1),    // same-padding 3×3
            (1, 4, 16, 16, 32, 2, 2, 2, 0), // PixArt-style patchify
            (2, 5, 7, 9, 6, 1, 1, 1, 0),    // direct 1×1 path
            (1, 3, 9, 7, 4, 1, 1, 2, 1),    // 1×1 with stride/pad goes through im2col
            (1, 2, 11, 10, 3, 3, 3, 2, 1),  // strided with padding
            (1, 2, 5, 6, 3, 5, 4, 1, 2),    // kernel wider than the padding
            (1, 2, 3, 3, 2, 3, 3, 3, 0),    // single output pixel
            (1, 1, 4, 4, 1, 3, 3, 1, 3),    // padding larger than the kernel
        ];
        for &(n, c_in, h, w, c_out, kh, kw, stride, pad) in &cases {
            let x = rng.vec(n * c_in * h * w);
            let wt = rng.vec(c_out * c_in * kh * kw);
            let b = rng.vec(c_out);
            for bias in [None, Some(&b[..])] {
                let want = naive_conv(&x, n, c_in, h, w, &wt, c_out, kh, kw, bias, stride, pad);
                let mut out = vec![f32::NAN; want.len()];
                conv2d(
                    &x, n, c_in, h, w, &wt, c_out, kh, kw, bias, stride, pad, &mut out,
                );
                assert_close(&out, &want, 1e-5);
            }
        }
    }

    #[test]
    fn conv2d_banded() {
        // kdim·wo large enough that the im2col scratch is split into bands.
        let mut rng = Rng::new(22);
        let (n, c_in, h, w, c_out) = (1, 512, 6, 512, 4);
        let x = rng.vec(n * c_in * h * w);
        let wt = rng.vec(c_out * c_in * 9);
        let want = naive_conv(&x, n, c_in, h, w, &wt, c_out, 3, 3, None, 1, 1);
        let mut out = vec![f32::NAN; want.len()];
        conv2d(&x, n, c_in, h, w, &wt, c_out, 3, 3, None, 1, 1, &mut out);
        assert_close(&out, &want, 1e-5);
    }

    #[test]
    fn upsample_matches_reference() {
        let mut rng = Rng::new(23);
        for &(n, c, h, w) in &[(1, 1, 1, 1), (2, 3, 4, 5), (1, 16, 64, 40)] {
            let x = rng.vec(n * c * h * w);
            let mut out = vec![f32::NAN; 4 * x.len()];
            upsample_nearest2x(&x, n, c, h, w, &mut out);
            let mut want = vec![0.0f64; out.len()];
            for p in 0..n * c {
                for y in 0..2 * h {
                    for xx in 0..2 * w {
                        want[(p * 2 * h + y) * 2 * w + xx] = x[(p * h + y / 2) * w + xx / 2] as f64;
                    }
                }
            }
            assert_close(&out, &want, 0.0);
        }
    }
}
