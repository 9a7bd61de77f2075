//! Row-wise normalizations and softmax (no affine parameters; the graph applies
//! scale/shift as separate, fusable elementwise ops).

use rayon::prelude::*;

use super::vmath::{self, multiversion};
use super::PAR_MIN_ELEMS;

/// Applies `f(input_row, output_row)` to each of `rows` rows of `cols`
/// elements, over the rayon pool when there is enough work.
fn for_each_row<F>(x: &[f32], rows: usize, cols: usize, out: &mut [f32], f: F)
where
    F: Fn(&[f32], &mut [f32]) + Sync + Send,
{
    debug_assert!(x.len() >= rows * cols && out.len() >= rows * cols);
    if rows == 0 || cols == 0 {
        return;
    }
    let x = &x[..rows * cols];
    let out = &mut out[..rows * cols];
    if rows > 1 && rows * cols >= PAR_MIN_ELEMS && rayon::current_num_threads() > 1 {
        // Batch short rows into tasks of at least a few thousand elements.
        let min_rows = (4096 / cols).max(1);
        out.par_chunks_mut(cols)
            .zip(x.par_chunks(cols))
            .with_min_len(min_rows)
            .for_each(|(o, i)| f(i, o));
    } else {
        for (o, i) in out.chunks_exact_mut(cols).zip(x.chunks_exact(cols)) {
            f(i, o);
        }
    }
}

multiversion! {
    fn layer_norm_row(x: &[f32], out: &mut [f32], eps: f32) {
        let n = x.len() as f64;
        // Two passes (mean, then squared deviations) avoid the cancellation
        // of E[x²] - E[x]² on rows with a large mean.
        let mean = (vmath::sum(x) / n) as f32;
        let var = vmath::sum_sq_dev(x, mean) / n;
        let rstd = (1.0 / (var + eps as f64).sqrt()) as f32;
        for (o, &v) in out.iter_mut().zip(x) {
            *o = (v - mean) * rstd;
        }
    }
}

multiversion! {
    fn rms_norm_row(x: &[f32], out: &mut [f32], eps: f32) {
        let ms = vmath::sum_sq(x) / x.len() as f64;
        let rstd = (1.0 / (ms + eps as f64).sqrt()) as f32;
        for (o, &v) in out.iter_mut().zip(x) {
            *o = v * rstd;
        }
    }
}

/// `out = (x - mean) / sqrt(var + eps)` over each row of `cols` elements,
/// with the biased variance (as `torch.nn.LayerNorm`).
pub fn layer_norm(x: &[f32], rows: usize, cols: usize, eps: f32, out: &mut [f32]) {
    for_each_row(x, rows, cols, out, |i, o| layer_norm_row(i, o, eps));
}

/// `out = x / sqrt(mean(x²) + eps)` over each row of `cols` elements.
pub fn rms_norm(x: &[f32], rows: usize, cols: usize, eps: f32, out: &mut [f32]) {
    for_each_row(x, rows, cols, out, |i, o| rms_norm_row(i, o, eps));
}

/// Group normalization of `x: [n, c, hw]` with statistics per (sample, group)
/// over its `c/groups · hw` elements. `c` must be divisible by `groups`.
#[allow(clippy::too_many_arguments)]
pub fn group_norm(
    x: &[f32],
    n: usize,
    c: usize,
    hw: usize,
    groups: usize,
    eps: f32,
    out: &mut [f32],
) {
    debug_assert!(groups > 0 && c % groups == 0);
    if groups == 0 {
        return;
    }
    // A group's channels are adjacent, so each (sample, group) is one
    // contiguous run: exactly a layer norm over those runs.
    layer_norm(x, n * groups, c / groups * hw, eps, out);
}

/// Softmax over the last axis of `x: [rows, cols]`, with max subtraction.
pub fn softmax(x: &[f32], rows: usize, cols: usize, out: &mut [f32]) {
    for_each_row(x, rows, cols, out, vmath::softmax_row);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::kernels::test_util::{assert_close, Rng};

    fn naive_layer_norm(x: &[f32], cols: usize, eps: f32) -> Vec<f64> {
        x.chunks(cols)
            .flat_map(|r| {
                let n = cols as f64;
                let mean = r.iter().map(|&v| v as f64).sum::<f64>() / n;
                let var = r.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
                let rstd = 1.0 / (var + eps as f64).sqrt();
                r.iter().map(move |&v| (v as f64 - mean) * rstd)
            })
            .collect()
    }

    /// Shapes below and above the parallel threshold, rows short and long.
    const SHAPES: &[(usize, usize)] = &[(1, 1), (3, 7), (5, 1152), (300, 200), (2, 40000)];

    #[test]
    fn layer_norm_matches_reference() {
        let mut rng = Rng::new(11);
        for &(rows, cols) in SHAPES {
            // An offset mean checks the two-pass variance.
            let x: Vec<f32> = rng
                .vec(rows * cols)
                .iter()
                .map(|v| v * 3.0 + 10.0)
                .collect();
            let mut out = vec![f32::NAN; x.len()];
            layer_norm(&x, rows, cols, 1e-6, &mut out);
            assert_close(&out, &naive_layer_norm(&x, cols, 1e-6), 1e-5);
        }
    }

    #[test]
    fn layer_norm_constant_row() {
        let x = [2.5f32; 8];
        let mut out = [f32::NAN; 8];
        layer_norm(&x, 1, 8, 1e-5, &mut out);
        assert_eq!(out, [0.0; 8]);
    }

    #[test]
    fn rms_norm_matches_reference() {
        let mut rng = Rng::new(12);
        for &(rows, cols) in SHAPES {
            let x = rng.vec(rows * cols);
            let mut out = vec![f32::NAN; x.len()];
            rms_norm(&x, rows, cols, 1e-6, &mut out);
            let want: Vec<f64> = x
                .chunks(cols)
                .flat_map(|r| {
                    let ms = r.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / cols as f64;
                    let rstd = 1.0 / (ms + 1e-6f32 as f64).sqrt();
                    r.iter().map(move |&v| v as f64 * rstd)
                })
                .collect();
            assert_close(&out, &want, 1e-5);
        }
    }

    #[test]
    fn group_norm_matches_reference() {
        let mut rng = Rng::new(13);
        for &(n, c, hw, groups) in &[(1, 4, 1, 2), (2, 6, 5, 3), (2, 64, 256, 32), (1, 8, 9, 1)] {
            let x = rng.vec(n * c * hw);
            let mut out = vec![f32::NAN; x.len()];
            group_norm(&x, n, c, hw, groups, 1e-5, &mut out);
            // Reference indexes channels explicitly rather than relying on
            // contiguity of groups.
            let cg = c / groups;
            let mut want = vec![0.0f64; x.len()];
            for s in 0..n {
                for g in 0..groups {
                    let idx: Vec<usize> = (g * cg..(g + 1) * cg)
                        .flat_map(|ch| (0..hw).map(move |p| (s * c + ch) * hw + p))
                        .collect();
                    let cnt = idx.len() as f64;
                    let mean = idx.iter().map(|&i| x[i] as f64).sum::<f64>() / cnt;
                    let var = idx
                        .iter()
                        .map(|&i| (x[i] as f64 - mean).powi(2))
                        .sum::<f64>()
                        / cnt;
                    for &i in &idx {
                        want[i] = (x[i] as f64 - mean) / (var + 1e-5f32 as f64).sqrt();
                    }
                }
            }
            assert_close(&out, &want, 1e-5);
        }
    }

    #[test]
    fn softmax_matches_reference() {
        let mut rng = Rng::new(14);
        for &(rows, cols) in SHAPES {
            let x: Vec<f32> = rng.vec(rows * cols).iter().map(|v| v * 30.0).collect();
            let mut out = vec![f32::NAN; x.len()];
            softmax(&x, rows, cols, &mut out);
            let want: Vec<f64> = x
                .chunks(cols)
                .flat_map(|r| {
                    let m = r.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
                    let z: f64 = r.iter().map(|&v| (v as f64 - m).exp()).sum();
                    r.iter().map(move |&v| (v as f64 - m).exp() / z)
                })
                .collect();
            // Relative to the largest probability of the whole tensor, so
            // also check each row sums to one.
            assert_close(&out, &want, 1e-5);
            for r in out.chunks(cols) {
                let s: f64 = r.iter().map(|&v| v as f64).sum();
                assert!((s - 1.0).abs() < 1e-5, "row sum {s}");
            }
        }
    }

    #[test]
    fn softmax_masked_entries() {
        let x = [0.0f32, f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY];
        let mut out = [f32::NAN; 4];
        softmax(&x, 1, 4, &mut out);
        assert_eq!(out, [0.5, 0.0, 0.5, 0.0]);
    }
}
