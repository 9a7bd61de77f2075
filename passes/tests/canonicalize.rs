//! `canonicalize`: one test per rule, as before/after IR text, plus the cases where a rule
//! must not fire and the e-graph bounds.

mod common;

use common::{check_pass, run_checked};
use ditto_ir::{text, DType, Graph, Op};
use ditto_passes::{Canonicalize, FuseElementwise, Limits, Pass};

fn canon() -> Canonicalize {
    Canonicalize::default()
}

#[test]
fn reshape_of_reshape_is_one_reshape() {
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, &[2, 3, 4]).unwrap();
    let a = g.reshape(x, &[6, 4]).unwrap();
    let b = g.reshape(a, &[4, 6]).unwrap();
    g.output("y", b);
    let out = check_pass(
        &canon(),
        &g,
        "input x: f32[2, 3, 4]
%0 = reshape in:x 6 4  # f32[6, 4]
%1 = reshape %0 4 6  # f32[4, 6]
output y = %1
",
        "input x: f32[2, 3, 4]
%0 = reshape in:x 4 6  # f32[4, 6]
output y = %0
",
    );
    assert!(out.notes[0].contains("saturated"), "{:?}", out.notes);
    assert!(
        out.notes[1].contains("reshape-reshape x1"),
        "{:?}",
        out.notes
    );
}

#[test]
fn reshape_back_to_the_operand_shape_disappears() {
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, &[2, 3, 4]).unwrap();
    let a = g.reshape(x, &[6, 4]).unwrap();
    let b = g.reshape(a, &[2, 3, 4]).unwrap();
    let s = g.silu(b).unwrap();
    g.output("y", s);
    check_pass(
        &canon(),
        &g,
        "input x: f32[2, 3, 4]
%0 = reshape in:x 6 4  # f32[6, 4]
%1 = reshape %0 2 3 4  # f32[2, 3, 4]
%2 = silu %1  # f32[2, 3, 4]
output y = %2
",
        "input x: f32[2, 3, 4]
%0 = silu in:x  # f32[2, 3, 4]
output y = %0
",
    );
}

#[test]
fn identity_reshape_added_directly_disappears() {
    // The builder already elides it; a parsed or rewritten graph may still carry one.
    let g = text::parse(
        "input x: f32[2, 3]
%0 = reshape in:x 2 3
%1 = neg %0
output y = %1
",
    )
    .unwrap();
    let out = run_checked(&canon(), &g);
    assert_eq!(
        text::print(&out.graph),
        "input x: f32[2, 3]
%0 = neg in:x  # f32[2, 3]
output y = %0
"
    );
}

#[test]
fn permute_of_permute_composes() {
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, &[2, 3, 4, 5]).unwrap();
    let p = g.permute(x, &[0, 2, 1, 3]).unwrap();
    let q = g.permute(p, &[3, 1, 0, 2]).unwrap();
    g.output("y", q);
    // r[i] = p[q[i]] = [p3, p1, p0, p2] = [3, 2, 0, 1]: x[2,3,4,5] -> [5, 4, 2, 3].
    check_pass(
        &canon(),
        &g,
        "input x: f32[2, 3, 4, 5]
%0 = permute in:x 0 2 1 3  # f32[2, 4, 3, 5]
%1 = permute %0 3 1 0 2  # f32[5, 4, 2, 3]
output y = %1
",
        "input x: f32[2, 3, 4, 5]
%0 = permute in:x 3 2 0 1  # f32[5, 4, 2, 3]
output y = %0
",
    );
}

#[test]
fn permute_of_permute_in_a_square_shape_composes_correctly() {
    // All axes the same length: only the composition, not the shapes, says which is right.
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, &[3, 3, 3]).unwrap();
    let p = g.permute(x, &[1, 2, 0]).unwrap();
    let q = g.permute(p, &[1, 2, 0]).unwrap();
    g.output("y", q);
    // r = [p[1], p[2], p[0]] = [2, 0, 1].
    let out = run_checked(&canon(), &g);
    assert!(
        text::print(&out.graph).contains("%0 = permute in:x 2 0 1  # f32[3, 3, 3]"),
        "{}",
        text::print(&out.graph)
    );
}

#[test]
fn inverse_permutes_cancel() {
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, &[2, 3, 4]).unwrap();
    let p = g.permute(x, &[1, 2, 0]).unwrap();
    let q = g.permute(p, &[2, 0, 1]).unwrap();
    let e = g.exp(q).unwrap();
    g.output("y", e);
    check_pass(
        &canon(),
        &g,
        "input x: f32[2, 3, 4]
%0 = permute in:x 1 2 0  # f32[3, 4, 2]
%1 = permute %0 2 0 1  # f32[2, 3, 4]
%2 = exp %1  # f32[2, 3, 4]
output y = %2
",
        "input x: f32[2, 3, 4]
%0 = exp in:x  # f32[2, 3, 4]
output y = %0
",
    );
}

#[test]
fn identity_permute_disappears() {
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, &[2, 3]).unwrap();
    let p = g.permute(x, &[0, 1]).unwrap();
    let t = g.tanh(p).unwrap();
    g.output("y", t);
    check_pass(
        &canon(),
        &g,
        "input x: f32[2, 3]
%0 = permute in:x 0 1  # f32[2, 3]
%1 = tanh %0  # f32[2, 3]
output y = %1
",
        "input x: f32[2, 3]
%0 = tanh in:x  # f32[2, 3]
output y = %0
",
    );
}

#[test]
fn multiplying_by_one_disappears_on_either_side() {
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, &[2, 4]).unwrap();
    let a = g.mul_scalar(x, 1.0).unwrap();
    let one = g.scalar(1.0).unwrap();
    let b = g.mul(one, a).unwrap();
    let s = g.silu(b).unwrap();
    g.output("y", s);
    check_pass(
        &canon(),
        &g,
        "input x: f32[2, 4]
%0 = scalar 1.0  # f32[]
%1 = mul in:x %0  # f32[2, 4]
%2 = mul %0 %1  # f32[2, 4]
%3 = silu %2  # f32[2, 4]
output y = %3
",
        "input x: f32[2, 4]
%0 = silu in:x  # f32[2, 4]
output y = %0
",
    );
}

#[test]
fn adding_zero_disappears_including_integer_spellings() {
    let g = text::parse(
        "input x: f32[2, 4]
%0 = scalar 0.0
%1 = add in:x %0
%2 = scalar 0
%3 = add %2 %1
%4 = sub %3 %2
%5 = scalar 1
%6 = div %4 %5
%7 = gelu %6
output y = %7
",
    )
    .unwrap();
    let out = run_checked(&canon(), &g);
    assert_eq!(
        text::print(&out.graph),
        "input x: f32[2, 4]
%0 = gelu in:x  # f32[2, 4]
output y = %0
"
    );
    let rules = &out.notes[1];
    for r in ["add-zero-right", "add-zero-left", "sub-zero", "div-one"] {
        assert!(rules.contains(r), "{rules}");
    }
}

#[test]
fn identities_that_would_change_the_dtype_do_not_fire() {
    // `x * 1.0` and `x + 0.0` are f32 even when x is not: replacing them by x would change
    // the value's type, which the analysis refuses. (With a 0-d `scalar`, broadcasting can
    // never change the shape, so the dtype is how the condition fails here.)
    let mut g = Graph::new();
    let t = g.input("t", DType::I64, &[2]).unwrap();
    let h = g.input("h", DType::BF16, &[2, 8]).unwrap();
    let a = g.mul_scalar(t, 1.0).unwrap();
    let b = g.add_scalar(h, 0.0).unwrap();
    let n = g.neg(h).unwrap();
    let nn = g.neg(n).unwrap();
    g.output("a", a);
    g.output("b", b);
    g.output("c", nn);
    let before = text::print(&g);
    let out = run_checked(&canon(), &g);
    assert_eq!(text::print(&out.graph), before);
    assert_eq!(out.notes[1], "rewrites applied: none");
}

#[test]
fn adding_a_zero_tensor_that_broadcasts_is_kept() {
    // `x + zeros[2, 4]` with x[4] is [2, 4]: not x, and not a `scalar` either.
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, &[4]).unwrap();
    let zero = g.scalar(0.0).unwrap();
    let wide = g.input("zeros", DType::F32, &[2, 4]).unwrap();
    let z = g.mul(wide, zero).unwrap(); // a [2, 4] tensor of zeros
    let y = g.add_(x, z).unwrap();
    g.output("y", y);
    let before = text::print(&g);
    let out = run_checked(&canon(), &g);
    assert_eq!(text::print(&out.graph), before);
}

#[test]
fn double_negation_disappears() {
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, &[3]).unwrap();
    let a = g.neg(x).unwrap();
    let b = g.neg(a).unwrap();
    let c = g.neg(b).unwrap();
    g.output("y", c);
    check_pass(
        &canon(),
        &g,
        "input x: f32[3]
%0 = neg in:x  # f32[3]
%1 = neg %0  # f32[3]
%2 = neg %1  # f32[3]
output y = %2
",
        "input x: f32[3]
%0 = neg in:x  # f32[3]
output y = %0
",
    );
}

#[test]
fn slice_of_a_whole_axis_disappears_and_a_partial_one_stays() {
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, &[2, 8]).unwrap();
    let whole = g.slice(x, 1, 0, 8).unwrap();
    let part = g.slice(whole, 1, 0, 4).unwrap();
    let tail = g.slice(x, 1, 4, 8).unwrap();
    let y = g.add_(part, tail).unwrap();
    g.output("y", y);
    check_pass(
        &canon(),
        &g,
        "input x: f32[2, 8]
%0 = slice in:x 1 0 8  # f32[2, 8]
%1 = slice %0 1 0 4  # f32[2, 4]
%2 = slice in:x 1 4 8  # f32[2, 4]
%3 = add %1 %2  # f32[2, 4]
output y = %3
",
        "input x: f32[2, 8]
%0 = slice in:x 1 0 4  # f32[2, 4]
%1 = slice in:x 1 4 8  # f32[2, 4]
%2 = add %0 %1  # f32[2, 4]
output y = %2
",
    );
}

#[test]
fn adjacent_slices_concatenated_back_are_the_operand() {
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, &[2, 8, 3]).unwrap();
    let a = g.slice(x, 1, 0, 3).unwrap();
    let b = g.slice(x, 1, 3, 8).unwrap();
    let joined = g.concat(1, &[a, b]).unwrap();
    // A gap, the wrong order or another axis stay.
    let c = g.slice(x, 1, 4, 8).unwrap();
    let gap = g.concat(1, &[a, c]).unwrap();
    let swapped = g.concat(1, &[b, a]).unwrap();
    let y = g.add_(joined, joined).unwrap();
    g.output("y", y);
    g.output("gap", gap);
    g.output("swapped", swapped);
    check_pass(
        &canon(),
        &g,
        "input x: f32[2, 8, 3]
%0 = slice in:x 1 0 3  # f32[2, 3, 3]
%1 = slice in:x 1 3 8  # f32[2, 5, 3]
%2 = concat 1 %0 %1  # f32[2, 8, 3]
%3 = slice in:x 1 4 8  # f32[2, 4, 3]
%4 = concat 1 %0 %3  # f32[2, 7, 3]
%5 = concat 1 %1 %0  # f32[2, 8, 3]
%6 = add %2 %2  # f32[2, 8, 3]
output y = %6
output gap = %4
output swapped = %5
",
        "input x: f32[2, 8, 3]
%0 = slice in:x 1 0 3  # f32[2, 3, 3]
%1 = slice in:x 1 3 8  # f32[2, 5, 3]
%2 = slice in:x 1 4 8  # f32[2, 4, 3]
%3 = concat 1 %0 %2  # f32[2, 7, 3]
%4 = concat 1 %1 %0  # f32[2, 8, 3]
%5 = add in:x in:x  # f32[2, 8, 3]
output y = %5
output gap = %3
output swapped = %4
",
    );
}

#[test]
fn nothing_to_do_leaves_the_text_unchanged() {
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, &[2, 4, 8]).unwrap();
    let w = g.weight("w", &[16, 8]).unwrap();
    let h = g.linear(x, w).unwrap();
    let r = g.reshape(h, &[2, 4, 2, 8]).unwrap();
    let p = g.permute(r, &[0, 2, 1, 3]).unwrap();
    g.output("y", p);
    let before = text::print(&g);
    let out = run_checked(&canon(), &g);
    assert_eq!(text::print(&out.graph), before);
    assert!(out.notes[0].ends_with("saturated"), "{:?}", out.notes);
    assert_eq!(out.notes[1], "rewrites applied: none");
}

#[test]
fn shared_outputs_and_names_survive() {
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, &[2, 4]).unwrap();
    let a = g.mul_scalar(x, 1.0).unwrap();
    let s = g.silu(a).unwrap();
    g.output("out", s);
    g.output("block.0.out0", s);
    g.output("raw", a);
    let out = run_checked(&canon(), &g);
    assert_eq!(
        text::print(&out.graph),
        "input x: f32[2, 4]
%0 = silu in:x  # f32[2, 4]
output out = %0
output block.0.out0 = %0
output raw = in:x
"
    );
}

#[test]
fn hitting_a_bound_is_reported_and_still_correct() {
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, &[2, 3, 4]).unwrap();
    let mut v = x;
    for dims in [[6, 4], [4, 6], [3, 8], [8, 3], [2, 12]] {
        v = g.reshape(v, &dims).unwrap();
    }
    g.output("y", v);

    let one_iter = Canonicalize::with_limits(Limits {
        iterations: 1,
        ..Limits::default()
    });
    let out = run_checked(&one_iter, &g);
    assert!(
        out.notes[0].contains("stopped at iteration limit 1"),
        "{:?}",
        out.notes
    );

    let tiny = Canonicalize::with_limits(Limits {
        nodes: 4,
        ..Limits::default()
    });
    let out = run_checked(&tiny, &g);
    assert!(
        out.notes[0].contains("stopped at node limit 4"),
        "{:?}",
        out.notes
    );

    let full = run_checked(&canon(), &g);
    assert_eq!(
        text::print(&full.graph),
        "input x: f32[2, 3, 4]
%0 = reshape in:x 2 12  # f32[2, 12]
output y = %0
"
    );
}

#[test]
fn kernels_of_fused_nodes_are_kept() {
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, &[2, 4]).unwrap();
    let y = g.input("y", DType::F32, &[4]).unwrap();
    let m = g.mul(x, y).unwrap();
    let s = g.silu(m).unwrap();
    let r = g.reshape(s, &[8]).unwrap();
    let r = g.reshape(r, &[4, 2]).unwrap();
    g.output("out", r);
    let fused = FuseElementwise.run(&g).unwrap().graph;
    let out = run_checked(&canon(), &fused);
    assert_eq!(
        text::print(&out.graph),
        "input x: f32[2, 4]
input y: f32[4]
kernel k0_mul_silu = (silu (mul (arg 0) (arg 1)))
%0 = fused k0_mul_silu in:x in:y  # f32[2, 4]
%1 = reshape %0 4 2  # f32[4, 2]
output out = %1
"
    );
}

#[test]
fn a_bad_input_is_an_error_naming_the_pass() {
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, &[2]).unwrap();
    let k = g.name("missing_kernel");
    let f = g.add(Op::Fused(vec![k, x].into())).unwrap();
    g.output("y", f);
    let err = ditto_passes::Verify.run(&g).unwrap_err();
    assert_eq!(err.pass(), "verify");
    assert!(err.to_string().contains("missing_kernel"), "{err}");
}

#[test]
fn a_deep_residual_stack_is_simplified_even_past_usize_tree_sizes() {
    // `v = v + linear(...(silu(v)))` shares v twice per block, so the term's tree size is
    // ~2^300: the size part of the cost saturates and the height must decide.
    let mut g = Graph::new();
    let mut v = g.input("x", DType::F32, &[2, 8]).unwrap();
    for i in 0..300 {
        let s = g.silu(v).unwrap();
        let s = g.mul_scalar(s, 1.0).unwrap();
        let r = g.reshape(s, &[16]).unwrap();
        let r = g.reshape(r, &[2, 8]).unwrap();
        let w = g.weight(&format!("blocks.{i}.w"), &[8, 8]).unwrap();
        let l = g.linear(r, w).unwrap();
        v = g.add_(v, l).unwrap();
    }
    g.output("y", v);
    let start = std::time::Instant::now();
    let out = run_checked(&canon(), &g);
    assert!(start.elapsed().as_secs() < 5, "took {:?}", start.elapsed());
    assert!(out.notes[0].ends_with("saturated"), "{:?}", out.notes);
    let kinds = |g: &Graph, f: fn(&Op) -> bool| g.nodes().iter().filter(|n| f(n)).count();
    assert_eq!(kinds(&out.graph, |n| matches!(n, Op::Reshape(_))), 0);
    assert_eq!(kinds(&out.graph, |n| matches!(n, Op::Mul(_))), 0);
    assert_eq!(kinds(&out.graph, |n| matches!(n, Op::Silu(_))), 300);
    assert_eq!(kinds(&out.graph, |n| matches!(n, Op::Add(_))), 300);
}

#[test]
fn an_output_that_is_not_a_node_is_an_error_not_a_panic() {
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, &[2]).unwrap();
    g.output("y", x);
    g.outputs.push(("bad".into(), ditto_ir::Id::from(99usize)));
    let err = canon().run(&g).unwrap_err();
    assert_eq!(err.pass(), "canonicalize");
    let err = FuseElementwise.run(&g).unwrap_err();
    assert_eq!(err.pass(), "fuse_elementwise");
}
