//! Deterministic inputs and error metrics for the kernel tests.

/// SplitMix64: tiny, seedable, and good enough for test data.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    pub(crate) fn uniform(&mut self) -> f32 {
        // 24 random bits map exactly onto f32's mantissa.
        let u = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        2.0 * u - 1.0
    }

    pub(crate) fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.uniform()).collect()
    }

    /// Uniform integer in `0..n`.
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// `max|a - b| / max|b|` (plain max|a - b| when `b` is all zeros).
pub(crate) fn max_rel_err(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let mut num = 0.0f64;
    let mut den = 0.0f64;
    for (&x, &y) in a.iter().zip(b) {
        let d = (x as f64 - y).abs();
        // NaN must fail the comparison, not vanish in `max`.
        num = if d.is_nan() || d > num { d } else { num };
        den = den.max(y.abs());
    }
    if den == 0.0 {
        num
    } else {
        num / den
    }
}

#[track_caller]
pub(crate) fn assert_close(a: &[f32], b: &[f64], tol: f64) {
    let err = max_rel_err(a, b);
    assert!(err <= tol, "max relative error {err:e} > {tol:e}");
}

/// Widens for use as a reference input.
pub(crate) fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}
