//! PyTorch's CPU `torch.randn(shape, generator=torch.Generator().manual_seed(seed))`, bit for
//! bit, so that `--seed S` gives the same initial noise as a diffusers pipeline called with
//! `generator=torch.Generator().manual_seed(S)`.
//!
//! How ATen fills a float32 tensor (`normal_kernel` in `aten/src/ATen/native/cpu`):
//! - The generator is a 32-bit Mersenne Twister (`at::mt19937`) seeded with the low 32 bits of
//!   the seed. `random()` is one 32-bit output.
//! - numel >= 16 (contiguous f32): every element first gets a uniform
//!   `u = (random() & (2^24 - 1)) * 2^-24`; then Box-Muller runs over blocks of 16: for
//!   `j in 0..8`, `u1 = 1 - d[j]`, `u2 = d[j + 8]`, `r = sqrt(-2 ln u1)`, `th = 2 pi u2`,
//!   `d[j] = r cos th`, `d[j + 8] = r sin th`. When numel % 16 != 0 the last 16 elements are
//!   refilled with fresh uniforms and transformed again (overlapping the previous block).
//! - numel < 16: a scalar path, `at::normal_distribution<double>` per element (uniforms from
//!   53-bit `random64()`, Box-Muller in double with the sine cached for the next element).
//!
//! On x86 CPUs with AVX2 (where diffusers' reference noise was made, and what PyTorch's wheels
//! dispatch to there), the 16-blocks go through `normal_fill_16_AVX2`, whose `log` and
//! `sincos` are the Cephes polynomials of `avx_mathfun.h`, compiled by GCC with FMA
//! contraction. We evaluate exactly those polynomials, in f32, with the same fused
//! multiply-adds; this reproduces the shapes-dit reference noise exactly (every bit of
//! 4 x 3072 values; see the tests). PyTorch's plain-C++ fallback (`normal_fill_16`, used on
//! CPUs without AVX2, e.g. ARM) calls libm instead and differs from this by about an ulp.
//! The scalar path for numel < 16 follows ATen's source but has no reference to test against.

/// `at::mt19937`: the standard 32-bit Mersenne Twister (Matsumoto & Nishimura).
pub struct Mt19937 {
    state: [u32; N],
    index: usize,
}

const N: usize = 624;
const M: usize = 397;

impl Mt19937 {
    /// `torch.Generator().manual_seed(seed)`: ATen seeds the engine with `seed & 0xffffffff`.
    pub fn new(seed: u64) -> Self {
        let mut state = [0u32; N];
        state[0] = seed as u32;
        for i in 1..N {
            let prev = state[i - 1];
            state[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        Mt19937 { state, index: N }
    }

    fn twist(&mut self) {
        for i in 0..N {
            let y = (self.state[i] & 0x8000_0000) | (self.state[(i + 1) % N] & 0x7fff_ffff);
            let mut next = self.state[(i + M) % N] ^ (y >> 1);
            if y & 1 != 0 {
                next ^= 0x9908_b0df;
            }
            self.state[i] = next;
        }
        self.index = 0;
    }

    /// One 32-bit output (`CPUGeneratorImpl::random()`).
    pub fn next_u32(&mut self) -> u32 {
        if self.index >= N {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }

    /// `CPUGeneratorImpl::random64()`: two outputs, the first in the high word.
    fn next_u64(&mut self) -> u64 {
        let hi = self.next_u32() as u64;
        let lo = self.next_u32() as u64;
        (hi << 32) | lo
    }

    /// `at::uniform_real_distribution<float>(0, 1)`: 24 random bits, exact in f32.
    fn uniform_f32(&mut self) -> f32 {
        (self.next_u32() & 0x00ff_ffff) as f32 * (1.0 / 16_777_216.0)
    }

    /// `at::uniform_real_distribution<double>(0, 1)`: 53 random bits.
    fn uniform_f64(&mut self) -> f64 {
        (self.next_u64() & ((1u64 << 53) - 1)) as f64 * (1.0 / 9_007_199_254_740_992.0)
    }
}

/// `torch.randn(numel, generator=torch.Generator().manual_seed(seed))` (float32, CPU), flat.
pub fn torch_randn(numel: usize, seed: u64) -> Vec<f32> {
    let mut gen = Mt19937::new(seed);
    if numel < 16 {
        return scalar_normals(&mut gen, numel);
    }
    let mut data: Vec<f32> = (0..numel).map(|_| gen.uniform_f32()).collect();
    for block in data.chunks_exact_mut(16) {
        normal_fill_16(block);
    }
    if numel % 16 != 0 {
        // ATen recomputes the last 16 values from fresh uniforms.
        let tail = &mut data[numel - 16..];
        for v in tail.iter_mut() {
            *v = gen.uniform_f32();
        }
        normal_fill_16(tail);
    }
    data
}

/// `normal_fill_16_AVX2` with mean 0 and std 1 (its final `fmadd(n, std, mean)` is then exact).
fn normal_fill_16(d: &mut [f32]) {
    // `_mm256_set1_ps(2.0f * c10::pi<double>)`: the product is double, rounded to f32.
    let two_pi = (2.0f64 * std::f64::consts::PI) as f32;
    for j in 0..8 {
        let u1 = 1.0f32 - d[j];
        let u2 = d[j + 8];
        let radius = (-2.0f32 * avx_log(u1)).sqrt();
        let (sin, cos) = avx_sincos(two_pi * u2);
        d[j] = radius * cos;
        d[j + 8] = radius * sin;
    }
}

/// `at::normal_distribution<double>` drawn per element (ATen's path for tensors under 16
/// elements): each Box-Muller pair yields `r cos th` now and caches `r sin th` for the next.
fn scalar_normals(gen: &mut Mt19937, numel: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(numel);
    let mut cached: Option<f64> = None;
    while out.len() < numel {
        let v = match cached.take() {
            Some(v) => v,
            None => {
                let u1 = gen.uniform_f64();
                let u2 = gen.uniform_f64();
                let r = (-2.0 * (-u2).ln_1p()).sqrt();
                let theta = 2.0 * std::f64::consts::PI * u1;
                cached = Some(r * theta.sin());
                r * theta.cos()
            }
        };
        out.push(v as f32);
    }
    out
}

/// `log256_ps` of `avx_mathfun.h` (Cephes `logf`) for one lane. GCC contracts its
/// multiply-adds into FMAs; the pairs it fuses are the ones written with `mul_add` here.
fn avx_log(x: f32) -> f32 {
    const P: [f32; 9] = [
        7.037_683_6e-2,
        -1.151_461e-1,
        1.167_699_9e-1,
        -1.242_014_1e-1,
        1.424_932_3e-1,
        -1.666_805_8e-1,
        2.000_071_4e-1,
        -2.499_999_4e-1,
        3.333_333e-1,
    ];
    const Q1: f32 = -2.121_944_4e-4;
    const Q2: f32 = 0.693_359_4;
    const SQRTHF: f32 = std::f32::consts::FRAC_1_SQRT_2;
    // Inputs here are in (0, 1], so the invalid-argument mask of the original never fires.
    let x = x.max(f32::from_bits(0x0080_0000));
    let exponent = (x.to_bits() >> 23) as i32;
    let mut x = f32::from_bits((x.to_bits() & !0x7f80_0000) | 0.5f32.to_bits());
    let mut e = (exponent - 0x7f) as f32 + 1.0;
    let small = x < SQRTHF;
    let tmp = if small { x } else { 0.0 };
    x -= 1.0;
    if small {
        e -= 1.0;
    }
    x += tmp;
    let z = x * x;
    let mut y = P[0];
    for &p in &P[1..] {
        y = y.mul_add(x, p);
    }
    y *= x;
    y = y.mul_add(z, e * Q1);
    y = (-z).mul_add(0.5, y);
    e.mul_add(Q2, x + y)
}

/// `sincos256_ps` of `avx_mathfun.h` (Cephes `sinf`/`cosf`) for one lane: (sin, cos).
fn avx_sincos(x: f32) -> (f32, f32) {
    const FOPI: f32 = 1.273_239_5; // 4 / pi
    const DP1: f32 = -0.785_156_25;
    const DP2: f32 = -2.418_756_5e-4;
    const DP3: f32 = -3.774_895e-8;
    const SIN_P: [f32; 3] = [-1.951_529_6e-4, 8.332_161e-3, -1.666_665_5e-1];
    const COS_P: [f32; 3] = [2.443_315_7e-5, -1.388_731_6e-3, 4.166_664_6e-2];
    let mut sign_sin = x.to_bits() & 0x8000_0000;
    let mut x = x.abs();
    // Octant j = (int(x * 4/pi) + 1) & ~1, then x - j * pi/4 in extended precision.
    let mut j = (x * FOPI) as i32;
    j = (j + 1) & !1;
    let y = j as f32;
    sign_sin ^= ((j & 4) as u32) << 29;
    let use_sin_poly_for_sin = (j & 2) == 0;
    let sign_cos = ((!(j - 2) & 4) as u32) << 29;
    x = y.mul_add(DP1, x);
    x = y.mul_add(DP2, x);
    x = y.mul_add(DP3, x);
    let z = x * x;
    let mut c = COS_P[0];
    c = c.mul_add(z, COS_P[1]);
    c = c.mul_add(z, COS_P[2]);
    c *= z;
    c = c.mul_add(z, -(z * 0.5));
    c += 1.0;
    let mut s = SIN_P[0];
    s = s.mul_add(z, SIN_P[1]);
    s = s.mul_add(z, SIN_P[2]);
    s *= z;
    s = s.mul_add(x, x);
    let (sin, cos) = if use_sin_poly_for_sin { (s, c) } else { (c, s) };
    (
        f32::from_bits(sin.to_bits() ^ sign_sin),
        f32::from_bits(cos.to_bits() ^ sign_cos),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mt19937_matches_the_reference_sequence() {
        // The 10000th output of std::mt19937 with the default seed 5489 is 4123659995 (C++11).
        let mut g = Mt19937::new(5489);
        let mut last = 0;
        for _ in 0..10_000 {
            last = g.next_u32();
        }
        assert_eq!(last, 4_123_659_995);
    }

    #[test]
    fn randn_of_seed_zero_starts_like_torch() {
        // torch.randn(16, generator=torch.Generator().manual_seed(0))[:4]
        let v = torch_randn(16, 0);
        let want = [-1.125_839_8_f32, -1.152_360_2, -0.250_578_58, -0.433_878_8];
        assert_eq!(&v[..4], &want, "{v:?}");
    }

    #[test]
    fn small_tensors_match_torch_scalar_path() {
        // torch.manual_seed(0); torch.randn(2, 3) (the classic example in PyTorch's docs)
        let v = torch_randn(6, 0);
        let want = [1.5410, -0.2934, -2.1788, 0.5684, -1.0845, -1.3986];
        for (a, b) in v.iter().zip(want) {
            assert!((a - b).abs() < 1e-4, "{v:?}");
        }
    }

    #[test]
    fn tail_is_refilled_and_small_tensors_take_the_scalar_path() {
        let a = torch_randn(20, 3);
        let b = torch_randn(16, 3);
        // The first 4 values come from the first full block, untouched by the tail refill.
        assert_eq!(&a[..4], &b[..4]);
        assert_eq!(a.len(), 20);
        let s = torch_randn(5, 3);
        assert_eq!(s.len(), 5);
        assert!(s.iter().all(|x| x.is_finite()));
    }

    #[test]
    fn avx_math_is_close_to_libm() {
        for i in 1..1000 {
            let u = i as f32 / 1000.0;
            assert!((avx_log(u) - u.ln()).abs() < 1e-6 * (1.0 + u.ln().abs()));
            let th = u * 6.283_185_5;
            let (s, c) = avx_sincos(th);
            assert!((s - th.sin()).abs() < 1e-6 && (c - th.cos()).abs() < 1e-6);
        }
    }
}
