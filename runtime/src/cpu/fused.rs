//! Interpreter for fused elementwise kernels: the bytecode runs over register blocks of a few
//! thousand elements, so the per-instruction dispatch is amortized and each instruction's
//! inner loop vectorizes. Arguments are broadcast to the output shape as they are loaded.

use rayon::prelude::*;

use ditto_codegen::{KInstr, Kernel};

use super::kernels::vmath::{exp_f32, multiversion};

/// Target elements per register block.
const BLOCK: usize = 4096;

/// Per-argument access pattern: element strides along each output axis (0 = broadcast).
struct ArgView<'a> {
    data: &'a [f32],
    strides: Vec<usize>,
}

fn arg_view<'a>(data: &'a [f32], shape: &[usize], out_shape: &[usize]) -> ArgView<'a> {
    let r = out_shape.len();
    let mut strides = vec![0; r];
    let mut s = 1;
    for i in (0..shape.len()).rev() {
        let axis = r - shape.len() + i;
        strides[axis] = if shape[i] == 1 && out_shape[axis] != 1 {
            0
        } else {
            s
        };
        s *= shape[i];
    }
    ArgView { data, strides }
}

// The activations below go through `exp_f32` instead of libm: a libm call per element
// cannot vectorize and made GELU alone cost more than all of PixArt's other elementwise
// work together. `inline(always)` puts them inside `eval`'s per-ISA builds.

#[inline(always)]
fn silu(x: f32) -> f32 {
    x / (1.0 + exp_f32(-x))
}
/// `0.5·x·(1 + tanh(u))` rewritten as `x / (1 + e^(-2u))` (the same function, since
/// `1 + tanh(u) = 2 / (1 + e^(-2u))`): one exponential, no tanh. For very negative `x` the
/// exponential overflows to +inf and the result is -0, as the tanh form gives.
#[inline(always)]
fn gelu_tanh(x: f32) -> f32 {
    const C: f32 = 0.797_884_6; // sqrt(2/pi)
    let u = C * (x + 0.044715 * x * x * x);
    x / (1.0 + exp_f32(-2.0 * u))
}
#[inline(always)]
fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2))
}
#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp_f32(-x))
}

/// Runs `kernel` over `args` (data + shape) into `out` of shape `out_shape`.
pub fn run_fused(
    kernel: &Kernel,
    args: &[(&[f32], &[usize])],
    out_shape: &[usize],
    out: &mut [f32],
) {
    let views: Vec<ArgView> = args
        .iter()
        .map(|(d, s)| arg_view(d, s, out_shape))
        .collect();
    let last = out_shape.last().copied().unwrap_or(1).max(1);
    let rows_per_block = (BLOCK / last).max(1);
    let block_len = rows_per_block * last;
    let outer: Vec<usize> = if out_shape.is_empty() {
        vec![]
    } else {
        out_shape[..out_shape.len() - 1].to_vec()
    };
    out.par_chunks_mut(block_len).enumerate().for_each_init(
        || vec![Vec::<f32>::new(); kernel.body.len()],
        |regs, (bi, out_block)| {
            let n = out_block.len();
            let first_row = bi * rows_per_block;
            for (ri, instr) in kernel.body.iter().enumerate() {
                let (before, rest) = regs.split_at_mut(ri);
                let dst = &mut rest[0];
                dst.resize(n, 0.0);
                match *instr {
                    KInstr::Arg(a) => load_arg(&views[a], &outer, last, first_row, dst),
                    KInstr::Const(c) => dst.fill(c),
                    ref op => eval(op, dst, before),
                }
            }
            out_block.copy_from_slice(&regs[kernel.body.len() - 1][..n]);
        },
    );
}

multiversion! {
    /// One arithmetic instruction over a register block (`dst.len()` elements; `regs` are the
    /// earlier registers). Compiled per ISA because the crate targets baseline x86-64: the
    /// AVX-512 build runs the loops, and the exponentials in the activations, 16 wide.
    fn eval(instr: &KInstr, dst: &mut [f32], regs: &[Vec<f32>]) {
        let n = dst.len();
        let src = |r: usize| &regs[r][..n];
        match *instr {
            KInstr::Add(a, b) => zip2(dst, src(a), src(b), |x, y| x + y),
            KInstr::Sub(a, b) => zip2(dst, src(a), src(b), |x, y| x - y),
            KInstr::Mul(a, b) => zip2(dst, src(a), src(b), |x, y| x * y),
            KInstr::Div(a, b) => zip2(dst, src(a), src(b), |x, y| x / y),
            KInstr::Neg(a) => map1(dst, src(a), |x| -x),
            KInstr::Silu(a) => map1(dst, src(a), silu),
            KInstr::GeluTanh(a) => map1(dst, src(a), gelu_tanh),
            KInstr::Gelu(a) => map1(dst, src(a), gelu),
            KInstr::Sigmoid(a) => map1(dst, src(a), sigmoid),
            KInstr::Tanh(a) => map1(dst, src(a), f32::tanh),
            KInstr::Exp(a) => map1(dst, src(a), f32::exp),
            // Loads and constants are handled by the caller.
            KInstr::Arg(_) | KInstr::Const(_) => unreachable!("not an arithmetic instruction"),
        }
    }
}

#[inline(always)]
fn zip2(dst: &mut [f32], a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) {
    for ((d, &x), &y) in dst.iter_mut().zip(a).zip(b) {
        *d = f(x, y);
    }
}

#[inline(always)]
fn map1(dst: &mut [f32], a: &[f32], f: impl Fn(f32) -> f32) {
    for (d, &x) in dst.iter_mut().zip(a) {
        *d = f(x);
    }
}

/// Loads rows `first_row..` of a broadcast argument into `dst` (whole rows of length `last`).
fn load_arg(v: &ArgView, outer: &[usize], last: usize, first_row: usize, dst: &mut [f32]) {
    let r = v.strides.len();
    let inner_stride = if r == 0 { 0 } else { v.strides[r - 1] };
    for (k, row_dst) in dst.chunks_mut(last).enumerate() {
        let mut row = first_row + k;
        let mut base = 0;
        for axis in (0..outer.len()).rev() {
            base += (row % outer[axis]) * v.strides[axis];
            row /= outer[axis];
        }
        if inner_stride == 0 {
            row_dst.fill(v.data[base]);
        } else {
            row_dst.copy_from_slice(&v.data[base..base + row_dst.len()]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Worst relative error of `f` against the f64 reference on a grid over [-lo, hi],
    /// relative to max(|want|, floor) so values near zero are judged absolutely.
    fn worst(f: fn(f32) -> f32, want: fn(f64) -> f64, lo: f32, hi: f32, floor: f64) -> f64 {
        let mut worst = 0.0f64;
        let mut x = lo;
        while x <= hi {
            let w = want(x as f64);
            worst = worst.max((f(x) as f64 - w).abs() / w.abs().max(floor));
            x += 0.001_37;
        }
        worst
    }

    #[test]
    fn activations_match_f64() {
        let gelu_tanh_ref = |x: f64| {
            let c = (2.0 / std::f64::consts::PI).sqrt();
            0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
        };
        let sigmoid_ref = |x: f64| 1.0 / (1.0 + (-x).exp());
        let silu_ref = |x: f64| x / (1.0 + (-x).exp());
        let e = worst(gelu_tanh, gelu_tanh_ref, -12.0, 12.0, 1e-6);
        assert!(e < 2e-6, "gelu_tanh: {e}");
        let e = worst(sigmoid, sigmoid_ref, -30.0, 30.0, 1e-6);
        assert!(e < 2e-6, "sigmoid: {e}");
        let e = worst(silu, silu_ref, -30.0, 30.0, 1e-6);
        assert!(e < 2e-6, "silu: {e}");
    }

    #[test]
    fn activation_edges() {
        for f in [gelu_tanh, silu] {
            assert_eq!(f(0.0), 0.0);
            assert_eq!(f(-1e4), 0.0);
            assert_eq!(f(1e4), 1e4);
            assert!(f(f32::NAN).is_nan());
        }
        assert_eq!(sigmoid(-1e4), 0.0);
        assert_eq!(sigmoid(1e4), 1.0);
        assert!(sigmoid(f32::NAN).is_nan());
    }

    #[test]
    fn broadcast_kernel_over_many_blocks() {
        // gelu_tanh(x * scale + shift) with scale/shift broadcast along rows, as in
        // PixArt's modulated feed-forward; 3 x 5000 spans several register blocks, and the
        // 5000-wide rows do not divide the block.
        let (rows, cols) = (3, 5000);
        let x: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919) % 2001) as f32 / 200.0 - 5.0)
            .collect();
        let scale: Vec<f32> = (0..cols).map(|j| 0.5 + (j % 7) as f32 / 7.0).collect();
        let shift = [0.25f32];
        let kernel = Kernel {
            name: "test".into(),
            num_args: 3,
            body: vec![
                KInstr::Arg(0),
                KInstr::Arg(1),
                KInstr::Mul(0, 1),
                KInstr::Arg(2),
                KInstr::Add(2, 3),
                KInstr::GeluTanh(4),
                KInstr::Const(2.0),
                KInstr::Mul(5, 6),
            ],
            source: String::new(),
        };
        let mut out = vec![f32::NAN; rows * cols];
        run_fused(
            &kernel,
            &[(&x, &[rows, cols]), (&scale, &[cols]), (&shift, &[1])],
            &[rows, cols],
            &mut out,
        );
        for i in 0..rows * cols {
            let v = x[i] * scale[i % cols] + 0.25;
            let want = 2.0 * gelu_tanh(v);
            assert_eq!(out[i], want, "element {i}");
        }
    }
}
