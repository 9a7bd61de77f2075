//! Interpreter for fused elementwise kernels: the bytecode runs over register blocks of a few
//! thousand elements, so the per-instruction dispatch is amortized and each instruction's
//! inner loop vectorizes. Arguments are broadcast to the output shape as they are loaded.

use rayon::prelude::*;

use ditto_codegen::{KInstr, Kernel};

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

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}
fn gelu_tanh(x: f32) -> f32 {
    const C: f32 = 0.797_884_6; // sqrt(2/pi)
    0.5 * x * (1.0 + (C * (x + 0.044715 * x * x * x)).tanh())
}
fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2))
}
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
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
                let src = |r: usize| &before[r][..n];
                match *instr {
                    KInstr::Arg(a) => load_arg(&views[a], &outer, last, first_row, dst),
                    KInstr::Const(c) => dst.fill(c),
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
                }
            }
            out_block.copy_from_slice(&regs[kernel.body.len() - 1][..n]);
        },
    );
}

fn zip2(dst: &mut [f32], a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) {
    for ((d, &x), &y) in dst.iter_mut().zip(a).zip(b) {
        *d = f(x, y);
    }
}

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
