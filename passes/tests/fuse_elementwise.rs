//! `fuse_elementwise`: grouping, arguments, kernel bodies and names, roots that must stay.

mod common;

use common::{check_pass, run_checked};
use ditto_ir::{text, DType, Graph, Op};
use ditto_passes::fuse_elementwise::MAX_BODY_DEPTH;
use ditto_passes::FuseElementwise;

fn fuse() -> FuseElementwise {
    FuseElementwise
}

fn count(g: &Graph, pred: impl Fn(&Op) -> bool) -> usize {
    g.nodes().iter().filter(|n| pred(n)).count()
}

#[test]
fn modulate_chain_is_one_kernel_with_three_args() {
    // adaLN: shift, scale = chunk(linear(silu(c)), 2); x = layer_norm(h) * (1 + scale) + shift
    let mut g = Graph::new();
    let h = g.input("h", DType::F32, &[2, 4, 8]).unwrap();
    let c = g.input("c", DType::F32, &[2, 1, 8]).unwrap();
    let w = g.weight("adaLN.linear.weight", &[16, 8]).unwrap();
    let act = g.silu(c).unwrap();
    let emb = g.linear(act, w).unwrap();
    let parts = g.chunk(emb, 2, 2).unwrap();
    let (shift, scale) = (parts[0], parts[1]);
    let n = g.layer_norm(h, 1e-6).unwrap();
    let one_plus = g.add_scalar(scale, 1.0).unwrap();
    let m = g.mul(n, one_plus).unwrap();
    let out = g.add_(m, shift).unwrap();
    g.output("x", out);
    let res = check_pass(
        &fuse(),
        &g,
        "input h: f32[2, 4, 8]
input c: f32[2, 1, 8]
weight adaLN.linear.weight: f32[16, 8]
%0 = silu in:c  # f32[2, 1, 8]
%1 = linear %0 w:adaLN.linear.weight  # f32[2, 1, 16]
%2 = slice %1 2 0 8  # f32[2, 1, 8]
%3 = slice %1 2 8 16  # f32[2, 1, 8]
%4 = layer_norm in:h 1e-6  # f32[2, 4, 8]
%5 = scalar 1.0  # f32[]
%6 = add %3 %5  # f32[2, 1, 8]
%7 = mul %4 %6  # f32[2, 4, 8]
%8 = add %7 %2  # f32[2, 4, 8]
output x = %8
",
        "input h: f32[2, 4, 8]
input c: f32[2, 1, 8]
weight adaLN.linear.weight: f32[16, 8]
kernel k0_silu = (silu (arg 0))
kernel k1_add_mul_add = (add (mul (arg 0) (add (arg 1) (scalar 1.0))) (arg 2))
%0 = fused k0_silu in:c  # f32[2, 1, 8]
%1 = linear %0 w:adaLN.linear.weight  # f32[2, 1, 16]
%2 = slice %1 2 0 8  # f32[2, 1, 8]
%3 = slice %1 2 8 16  # f32[2, 1, 8]
%4 = layer_norm in:h 1e-6  # f32[2, 4, 8]
%5 = fused k1_add_mul_add %4 %3 %2  # f32[2, 4, 8]
output x = %5
",
    );
    assert_eq!(
        res.notes,
        vec!["fused 4 elementwise nodes into 2 groups using 2 kernels".to_string()]
    );
    assert_eq!(count(&res.graph, Op::is_elementwise), 0);
}

#[test]
fn a_value_with_consumers_outside_stays_a_root() {
    // a = x + y feeds two different chains and a GEMM: it is its own group.
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, &[2, 8]).unwrap();
    let y = g.input("y", DType::F32, &[8]).unwrap();
    let w = g.weight("w", &[8, 8]).unwrap();
    let a = g.add_(x, y).unwrap();
    let s = g.silu(a).unwrap();
    let s2 = g.mul(s, y).unwrap();
    let t = g.tanh(a).unwrap();
    let l = g.linear(a, w).unwrap();
    let o = g.add_(s2, l).unwrap();
    let o2 = g.add_(o, t).unwrap();
    g.output("out", o2);
    let res = run_checked(&fuse(), &g);
    assert_eq!(
        text::print(&res.graph),
        "input x: f32[2, 8]
input y: f32[8]
weight w: f32[8, 8]
kernel k0_add = (add (arg 0) (arg 1))
kernel k1_silu_mul_add_tanh_add = (add (add (mul (silu (arg 0)) (arg 1)) (arg 2)) (tanh (arg 0)))
%0 = fused k0_add in:x in:y  # f32[2, 8]
%1 = linear %0 w:w  # f32[2, 8]
%2 = fused k1_silu_mul_add_tanh_add %0 in:y %1  # f32[2, 8]
output out = %2
"
    );
}

#[test]
fn graph_outputs_stay_available() {
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, &[4]).unwrap();
    let y = g.input("y", DType::F32, &[4]).unwrap();
    let a = g.mul(x, y).unwrap();
    let b = g.silu(a).unwrap();
    let c = g.neg(b).unwrap();
    g.output("sample", c);
    g.output("block.0.out0", a);
    let res = check_pass(
        &fuse(),
        &g,
        "input x: f32[4]
input y: f32[4]
%0 = mul in:x in:y  # f32[4]
%1 = silu %0  # f32[4]
%2 = neg %1  # f32[4]
output sample = %2
output block.0.out0 = %0
",
        "input x: f32[4]
input y: f32[4]
kernel k0_mul = (mul (arg 0) (arg 1))
kernel k1_silu_neg = (neg (silu (arg 0)))
%0 = fused k0_mul in:x in:y  # f32[4]
%1 = fused k1_silu_neg %0  # f32[4]
output sample = %1
output block.0.out0 = %0
",
    );
    assert_eq!(res.graph.outputs.len(), 2);
}

#[test]
fn identical_groups_share_one_kernel() {
    let mut g = Graph::new();
    let w = g.weight("gate", &[8]).unwrap();
    let mut outs = vec![];
    for name in ["a", "b", "c"] {
        let x = g.input(name, DType::F32, &[2, 8]).unwrap();
        let s = g.gelu_tanh(x).unwrap();
        let m = g.mul(s, w).unwrap();
        outs.push(m);
    }
    for (i, o) in outs.into_iter().enumerate() {
        g.output(&format!("out{i}"), o);
    }
    let res = run_checked(&fuse(), &g);
    assert_eq!(res.graph.kernels.len(), 1);
    let printed = text::print(&res.graph);
    assert!(
        printed.contains("kernel k0_gelu_tanh_mul = (mul (gelu_tanh (arg 0)) (arg 1))"),
        "{printed}"
    );
    assert_eq!(
        printed.matches("fused k0_gelu_tanh_mul").count(),
        3,
        "{printed}"
    );
}

#[test]
fn a_member_used_twice_in_its_group_is_written_twice() {
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, &[4]).unwrap();
    let y = g.input("y", DType::F32, &[4]).unwrap();
    let a = g.sub(x, y).unwrap();
    let sq = g.mul(a, a).unwrap();
    let both = g.mul(x, x).unwrap();
    let o = g.div(sq, both).unwrap();
    g.output("o", o);
    let res = run_checked(&fuse(), &g);
    assert_eq!(
        text::print(&res.graph),
        "input x: f32[4]
input y: f32[4]
kernel k0_sub_sub_mul_mul_div = (div (mul (sub (arg 0) (arg 1)) (sub (arg 0) (arg 1))) (mul (arg 0) (arg 0)))
%0 = fused k0_sub_sub_mul_mul_div in:x in:y  # f32[4]
output o = %0
"
    );
}

#[test]
fn exponential_sharing_is_cut_into_groups() {
    // Each level squares the previous one: as one tree the body would have 2^40 nodes.
    let mut g = Graph::new();
    let mut v = g.input("x", DType::F32, &[4]).unwrap();
    for _ in 0..40 {
        v = g.mul(v, v).unwrap();
    }
    g.output("y", v);
    let res = run_checked(&fuse(), &g);
    for body in res.graph.kernels.values() {
        assert!(body.as_ref().len() <= 1024, "{body}");
    }
    assert_eq!(count(&res.graph, Op::is_elementwise), 0);
}

#[test]
fn long_chains_get_short_names_and_are_not_recursive() {
    let mut g = Graph::new();
    let mut v = g.input("x", DType::F32, &[4]).unwrap();
    for i in 0..20_000 {
        v = if i % 2 == 0 {
            g.add_scalar(v, i as f64).unwrap()
        } else {
            g.exp(v).unwrap()
        };
    }
    g.output("y", v);
    let res = run_checked(&fuse(), &g);
    // Cut from the output end: full-depth groups, the remainder first.
    let depth = MAX_BODY_DEPTH as usize;
    let groups = 20_000usize.div_ceil(depth);
    assert_eq!(count(&res.graph, |n| matches!(n, Op::Fused(_))), groups);
    assert_eq!(res.graph.kernels.len(), groups);
    let first = format!("k0_add_exp_add_exp_add_and{}", 20_000 % depth - 5);
    let last = format!("k{}_add_exp_add_exp_add_and{}", groups - 1, depth - 5);
    for name in [first, last] {
        assert!(res.graph.kernels.contains_key(&name), "{name}");
    }
}

#[test]
fn scalar_only_groups_and_non_f32_inputs() {
    let mut g = Graph::new();
    let t = g.input("t", DType::I64, &[2]).unwrap();
    let two = g.scalar(2.0).unwrap();
    let three = g.scalar(3.0).unwrap();
    let c = g.mul(two, three).unwrap();
    let y = g.mul(t, c).unwrap();
    g.output("y", y);
    g.output("c", c);
    let res = run_checked(&fuse(), &g);
    assert_eq!(
        text::print(&res.graph),
        "input t: i64[2]
kernel k0_mul = (mul (scalar 2.0) (scalar 3.0))
kernel k1_mul = (mul (arg 0) (arg 1))
%0 = fused k0_mul  # f32[]
%1 = fused k1_mul in:t %0  # f32[2]
output y = %1
output c = %0
"
    );
}

#[test]
fn running_twice_changes_nothing_more() {
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, &[2, 4]).unwrap();
    let s = g.silu(x).unwrap();
    let w = g.weight("w", &[4, 4]).unwrap();
    let l = g.linear(s, w).unwrap();
    let a = g.add_(l, x).unwrap();
    g.output("y", a);
    let once = run_checked(&fuse(), &g);
    let twice = run_checked(&fuse(), &once.graph);
    assert_eq!(text::print(&once.graph), text::print(&twice.graph));
}

#[test]
fn dead_nodes_do_not_hold_back_fusion_and_disappear() {
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, &[4]).unwrap();
    let a = g.silu(x).unwrap();
    let b = g.neg(a).unwrap();
    let _dead = g.exp(a).unwrap(); // uses `a` but reaches no output
    let _dead2 = g.tanh(x).unwrap();
    g.output("y", b);
    let res = run_checked(&fuse(), &g);
    assert_eq!(
        text::print(&res.graph),
        "input x: f32[4]
kernel k0_silu_neg = (neg (silu (arg 0)))
%0 = fused k0_silu_neg in:x  # f32[4]
output y = %0
"
    );
    assert_eq!(
        res.notes[0],
        "fused 2 elementwise nodes into 1 groups using 1 kernels"
    );
}
