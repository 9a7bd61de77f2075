//! Branch-free scalar building blocks written so LLVM can vectorize the loops
//! that use them, plus runtime dispatch to AVX-512/AVX2 builds of those loops
//! (the crate is compiled for baseline x86-64, which only guarantees SSE2;
//! AVX-512 halves the cost of the softmax exponentials again over AVX2).

/// Defines `fn $name` whose body is compiled three times — for the baseline
/// target, with AVX2+FMA and with AVX-512F — and picks the best one at runtime.
///
/// The builds round identically: Rust never contracts `a * b + c` into an FMA
/// or reassociates reductions on its own, so only the vector width differs.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn imp($($arg: $ty),*) $(-> $ret)? $body

            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                fn avx512($($arg: $ty),*) $(-> $ret)? {
                    imp($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) $(-> $ret)? {
                    imp($($arg),*)
                }
                let avx2_fma = std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma");
                if avx2_fma && std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU features `avx512` was compiled for were just detected.
                    return unsafe { avx512($($arg),*) };
                }
                if avx2_fma {
                    // SAFETY: the CPU features `avx2` was compiled for were just detected.
                    return unsafe { avx2($($arg),*) };
                }
            }
            imp($($arg),*)
        }
    };
}
pub(crate) use multiversion;

/// Independent accumulators per reduction (one AVX-512 or two AVX registers):
/// enough parallel add chains to hide the add latency.
const LANES: usize = 16;

/// Block length after which partial f32 sums are flushed into an f64 total,
/// so error stays bounded on very long rows (group norm over whole images).
const FLUSH: usize = 1024;

/// `e^x` accurate to a couple of ulp, written without libm calls or branches
/// so that loops over it vectorize (libm `expf` alone would dominate softmax).
///
/// Valid for `x <= 88`; larger inputs return `+inf`. Inputs below the normal
/// range return 0, NaN propagates.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LO: f32 = -87.336_55; // ln(2^-126): 2^n stays a normal number
    const HI: f32 = 88.0; // keeps n <= 127
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n * LN2_HI is exact (Cody–Waite reduction).
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5 * 2^23 rounds to the nearest integer without a `round`
    // instruction (SSE2 has none) and leaves that integer in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;

    let xc = x.clamp(LO, HI);
    let t = xc * LOG2E + MAGIC;
    let n = t - MAGIC;
    let r = xc - n * LN2_HI - n * LN2_LO;
    // Cephes expf minimax polynomial on [-ln2/2, ln2/2].
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * (r * r) + r + 1.0;
    let ni = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let scale = f32::from_bits((ni.wrapping_add(127) << 23) as u32);
    let e = y * scale;
    if x < LO {
        0.0
    } else if x > HI {
        f32::INFINITY
    } else {
        e
    }
}

/// Maximum element (`-inf` for an empty slice). NaNs are skipped.
#[inline(always)]
pub(crate) fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &v in acc.iter().chain(chunks.remainder()) {
        m = if v > m { v } else { m };
    }
    m
}

/// Sums `f(v)` over `x` with f32 lane accumulators, flushed to f64 per block.
#[inline(always)]
fn sum_map(x: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    let mut total = 0.0f64;
    for block in x.chunks(FLUSH) {
        let mut acc = [0.0f32; LANES];
        let mut chunks = block.chunks_exact(LANES);
        for c in &mut chunks {
            for i in 0..LANES {
                acc[i] += f(c[i]);
            }
        }
        let mut s = 0.0f32;
        for &v in chunks.remainder() {
            s += f(v);
        }
        for v in acc {
            s += v;
        }
        total += s as f64;
    }
    total
}

/// Σ x.
#[inline(always)]
pub(crate) fn sum(x: &[f32]) -> f64 {
    sum_map(x, |v| v)
}

/// Σ x².
#[inline(always)]
pub(crate) fn sum_sq(x: &[f32]) -> f64 {
    sum_map(x, |v| v * v)
}

/// Σ (x - c)².
#[inline(always)]
pub(crate) fn sum_sq_dev(x: &[f32], c: f32) -> f64 {
    sum_map(x, |v| (v - c) * (v - c))
}

/// `x *= s` elementwise.
#[inline(always)]
pub(crate) fn scale_inplace(x: &mut [f32], s: f32) {
    for v in x {
        *v *= s;
    }
}

multiversion! {
    /// Replaces a row of logits by `exp(x - max)` and returns `(max, Σ exp)`.
    ///
    /// The caller divides by the sum (or folds it into a later step), which
    /// lets attention scale the much smaller output rows instead of the scores.
    pub(crate) fn softmax_exp_inplace(x: &mut [f32]) -> (f32, f32) {
        let m = max(x);
        // A row of all -inf yields NaN (`-inf - -inf`), matching torch rather
        // than inventing a distribution.
        for v in x.iter_mut() {
            *v = exp_f32(*v - m);
        }
        (m, sum(x) as f32)
    }
}

multiversion! {
    /// `out = exp(x - max) / Σ exp(x - max)` for one row.
    pub(crate) fn softmax_row(x: &[f32], out: &mut [f32]) {
        let m = max(x);
        for (o, &v) in out.iter_mut().zip(x) {
            *o = exp_f32(v - m);
        }
        let s = sum(out) as f32;
        scale_inplace(out, 1.0 / s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_libm() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let got = exp_f32(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
    }

    #[test]
    fn exp_edges() {
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-1000.0), 0.0);
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert!(exp_f32(f32::NAN).is_nan());
    }

    #[test]
    fn reductions() {
        let x: Vec<f32> = (0..5000).map(|i| ((i * 37) % 101) as f32 - 50.0).collect();
        let want: f64 = x.iter().map(|&v| v as f64).sum();
        assert_eq!(sum(&x), want);
        let want_sq: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
        assert_eq!(sum_sq(&x), want_sq);
        assert_eq!(max(&x), 50.0);
        assert_eq!(max(&[]), f32::NEG_INFINITY);
        assert_eq!(max(&[-3.0, f32::NAN, -2.0]), -2.0);
    }
}
