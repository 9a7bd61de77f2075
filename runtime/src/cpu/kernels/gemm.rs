//! Matrix products on top of the `gemm` crate.

use ::gemm::Parallelism;

/// Work (m·n·k) above which a GEMM is spread over the rayon pool; below it the
/// fork/join overhead outweighs the gain.
const PAR_MIN_WORK: usize = 64 * 64 * 64;

pub(crate) fn parallelism(parallel: bool) -> Parallelism {
    if parallel && rayon::current_num_threads() > 1 {
        Parallelism::Rayon(rayon::current_num_threads())
    } else {
        Parallelism::None
    }
}

/// Number of elements a strided `rows × cols` view spans (0 when empty).
fn extent(rows: usize, cols: usize, rs: usize, cs: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * rs + (cols - 1) * cs + 1
    }
}

/// Raw GEMM: `dst[i, j] = (accumulate ? dst[i, j] : 0) + scale · Σ_p a[i, p] · b[p, j]`,
/// with element `(i, j)` of a matrix `x` at `x + i·rs + j·cs` and `dst` having
/// column stride 1.
///
/// # Safety
/// All three views must be in bounds for their strides, `dst` must be valid
/// for writes and not overlap `a` or `b`, and no other thread may touch the
/// `dst` elements during the call.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_raw(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    a: *const f32,
    a_rs: usize,
    a_cs: usize,
    b: *const f32,
    b_rs: usize,
    b_cs: usize,
    scale: f32,
    par: Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: forwarded from this function's contract. The crate computes
    // `alpha · dst + beta · a·b` and ignores alpha when `read_dst` is false.
    unsafe {
        ::gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            a,
            a_cs as isize,
            a_rs as isize,
            b,
            b_cs as isize,
            b_rs as isize,
            1.0,
            scale,
            false,
            false,
            false,
            par,
        );
    }
}

/// General strided single-precision GEMM:
/// `dst[i·dst_rs + j] (+)= Σ_p a[i·a_rs + p·a_cs] · b[p·b_rs + j·b_cs]`
/// for `i < m`, `j < n`, `p < k`.
///
/// Transposed operands are expressed through the strides, so no copies are
/// made. With `accumulate` the product is added to `dst`, otherwise `dst` is
/// overwritten (its previous contents are never read). `parallel` lets the
/// GEMM use the whole rayon pool; pass `false` when already inside a parallel
/// region that saturates the cores.
///
/// # Panics
/// If any view reaches past the end of its slice.
#[allow(clippy::too_many_arguments)]
pub fn gemm_f32(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    a: &[f32],
    a_rs: usize,
    a_cs: usize,
    b: &[f32],
    b_rs: usize,
    b_cs: usize,
    accumulate: bool,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    // Real asserts, not debug ones: the raw GEMM below would otherwise read or
    // write out of bounds. They are O(1).
    assert!(
        extent(m, n, dst_rs, 1) <= dst.len(),
        "gemm_f32: dst too short"
    );
    assert!(extent(m, k, a_rs, a_cs) <= a.len(), "gemm_f32: a too short");
    assert!(extent(k, n, b_rs, b_cs) <= b.len(), "gemm_f32: b too short");
    // SAFETY: bounds checked above; `dst` is exclusively borrowed so it can
    // neither overlap `a`/`b` nor be touched by anyone else.
    unsafe {
        gemm_raw(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_rs,
            accumulate,
            a.as_ptr(),
            a_rs,
            a_cs,
            b.as_ptr(),
            b_rs,
            b_cs,
            1.0,
            parallelism(parallel),
        );
    }
}

/// `out[m×n] = a[m×k] · b[k×n]`, all contiguous row-major.
pub fn matmul(a: &[f32], m: usize, k: usize, b: &[f32], n: usize, out: &mut [f32]) {
    debug_assert!(a.len() >= m * k && b.len() >= k * n && out.len() >= m * n);
    gemm_f32(
        m,
        n,
        k,
        out,
        n,
        a,
        k,
        1,
        b,
        n,
        1,
        false,
        m * n * k > PAR_MIN_WORK,
    );
}

/// `out[m×n] = x[m×k] · wᵀ + bias`, with `w` of shape `n×k` (the
/// `torch.nn.Linear` weight layout) and `bias` of length `n`.
#[allow(clippy::too_many_arguments)]
pub fn linear(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    n: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    debug_assert!(x.len() >= m * k && w.len() >= n * k && out.len() >= m * n);
    debug_assert!(bias.is_none_or(|b| b.len() == n));
    if m == 0 || n == 0 {
        return;
    }
    // Seeding the output with the bias and accumulating into it saves a
    // separate read-modify-write pass over `out` after the product.
    if let Some(b) = bias {
        for row in out[..m * n].chunks_exact_mut(n) {
            row.copy_from_slice(&b[..n]);
        }
    }
    gemm_f32(
        m,
        n,
        k,
        out,
        n,
        x,
        k,
        1,
        w,
        1,
        k,
        bias.is_some(),
        m * n * k > PAR_MIN_WORK,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::kernels::test_util::{assert_close, Rng};

    fn naive_linear(
        x: &[f32],
        m: usize,
        k: usize,
        w: &[f32],
        n: usize,
        b: Option<&[f32]>,
    ) -> Vec<f64> {
        let mut out = vec![0.0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = b.map_or(0.0, |b| b[j] as f64);
                for p in 0..k {
                    s += x[i * k + p] as f64 * w[j * k + p] as f64;
                }
                out[i * n + j] = s;
            }
        }
        out
    }

    #[test]
    fn linear_matches_reference() {
        let mut rng = Rng::new(1);
        // Covers gemv-like, tiny, odd, and parallel-sized shapes.
        for &(m, k, n) in &[
            (1, 1, 1),
            (1, 37, 5),
            (7, 3, 9),
            (33, 65, 17),
            (128, 96, 80),
            (70, 200, 130),
        ] {
            let x = rng.vec(m * k);
            let w = rng.vec(n * k);
            let b = rng.vec(n);
            for bias in [None, Some(&b[..])] {
                let mut out = vec![f32::NAN; m * n];
                linear(&x, m, k, &w, n, bias, &mut out);
                assert_close(&out, &naive_linear(&x, m, k, &w, n, bias), 1e-5);
            }
        }
    }

    #[test]
    fn linear_zero_k_gives_bias() {
        let b = [1.0f32, 2.0, 3.0];
        let mut out = [f32::NAN; 6];
        linear(&[], 2, 0, &[], 3, Some(&b), &mut out);
        assert_eq!(out, [1.0, 2.0, 3.0, 1.0, 2.0, 3.0]);
        linear(&[], 2, 0, &[], 3, None, &mut out);
        assert_eq!(out, [0.0; 6]);
    }

    #[test]
    fn matmul_matches_reference() {
        let mut rng = Rng::new(2);
        let (m, k, n) = (45, 70, 90);
        let a = rng.vec(m * k);
        let b = rng.vec(k * n);
        let mut out = vec![0.0; m * n];
        matmul(&a, m, k, &b, n, &mut out);
        let mut want = vec![0.0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                want[i * n + j] = (0..k)
                    .map(|p| a[i * k + p] as f64 * b[p * n + j] as f64)
                    .sum();
            }
        }
        assert_close(&out, &want, 1e-5);
    }

    #[test]
    fn gemm_f32_strided_accumulate() {
        let mut rng = Rng::new(3);
        let (m, n, k) = (13, 11, 17);
        // a stored transposed (k×m), b as n×k, dst with padded rows.
        let a = rng.vec(k * m);
        let b = rng.vec(n * k);
        let dst_rs = n + 5;
        let init = rng.vec(m * dst_rs);
        for parallel in [false, true] {
            for accumulate in [false, true] {
                let mut dst = init.clone();
                gemm_f32(
                    m, n, k, &mut dst, dst_rs, &a, 1, m, &b, 1, k, accumulate, parallel,
                );
                let mut want: Vec<f64> = init.iter().map(|&v| v as f64).collect();
                for i in 0..m {
                    for j in 0..n {
                        let s: f64 = (0..k)
                            .map(|p| a[p * m + i] as f64 * b[j * k + p] as f64)
                            .sum();
                        let d = &mut want[i * dst_rs + j];
                        *d = if accumulate { *d + s } else { s };
                    }
                }
                assert_close(&dst, &want, 1e-5);
            }
        }
    }

    #[test]
    #[should_panic(expected = "dst too short")]
    fn gemm_f32_rejects_short_dst() {
        let mut dst = [0.0f32; 3];
        gemm_f32(
            2,
            2,
            1,
            &mut dst,
            2,
            &[1.0, 1.0],
            1,
            1,
            &[1.0, 1.0],
            2,
            1,
            false,
            false,
        );
    }
}
