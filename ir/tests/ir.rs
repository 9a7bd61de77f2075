//! Builder, shape errors, text round-trip, verifier and DOT export.

use ditto_ir::{text, verify, DType, Graph, IrError};

/// A small attention block in the style of the model files.
fn small_block() -> Graph {
    let mut g = Graph::new();
    let x = g.input("hidden_states", DType::F32, &[2, 4, 8, 8]).unwrap();
    let t = g.input("timestep", DType::I64, &[2]).unwrap();
    let w = g.weight("proj.weight", &[32, 16]).unwrap();
    let b = g.weight("proj.bias", &[32]).unwrap();
    let r = g.reshape(x, &[2, 4, 4, 2, 4, 2]).unwrap();
    let p = g.permute(r, &[0, 2, 4, 1, 3, 5]).unwrap();
    let tok = g.reshape(p, &[2, 16, 16]).unwrap();
    let h = g.linear_bias(tok, w, b).unwrap();
    let temb = g.timestep_embedding(t, 32, true, 0.0, 1.0).unwrap();
    let temb = g.reshape(temb, &[2, 1, 32]).unwrap();
    let n = g.layer_norm(h, 1e-6).unwrap();
    let one = g.add_scalar(temb, 1.0).unwrap();
    let m = g.mul(n, one).unwrap();
    let a = g.attention(m, m, m, 4, 0.25).unwrap();
    let s = g.silu(a).unwrap();
    let out = g.add_(s, h).unwrap();
    g.output("sample", out);
    g.output("block.0.out0", a);
    g
}

#[test]
fn builder_infers_shapes() {
    let g = small_block();
    let out = g.outputs[0].1;
    assert_eq!(g.shape(out), &[2, 16, 32]);
    verify(&g).unwrap();
}

#[test]
fn text_round_trips() {
    let g = small_block();
    let t1 = text::print(&g);
    let g2 = text::parse(&t1).unwrap();
    let t2 = text::print(&g2);
    assert_eq!(t1, t2);
    assert_eq!(g.outputs.len(), g2.outputs.len());
    verify(&g2).unwrap();
    assert!(
        t1.contains("linear_bias %2 w:proj.weight w:proj.bias"),
        "{t1}"
    );
}

#[test]
fn shape_error_names_op_and_operands() {
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, &[2, 7, 64]).unwrap();
    let w = g.weight("w", &[128, 32]).unwrap();
    let err = g.linear(x, w).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, IrError::Shape { .. }));
    assert!(msg.contains("`linear`"), "{msg}");
    assert!(
        msg.contains("f32[2, 7, 64]") && msg.contains("f32[128, 32]"),
        "{msg}"
    );
    let e2 = g.attention(x, x, x, 3, 1.0).unwrap_err().to_string();
    assert!(e2.contains("3 heads do not divide"), "{e2}");
    let e3 = g.reshape(x, &[5, 5]).unwrap_err().to_string();
    assert!(e3.contains("cannot reshape 896 elements"), "{e3}");
}

#[test]
fn parse_errors_name_the_line() {
    let bad = "input x: f32[2, 3]\n%0 = silu %7\n";
    let e = text::parse(bad).unwrap_err().to_string();
    assert!(e.contains("line 2") && e.contains("%7"), "{e}");
    let bad_shape = "input x: f32[2, 3]\nweight w: f32[4, 5]\n%0 = linear in:x w:w\n";
    let e = text::parse(bad_shape).unwrap_err().to_string();
    assert!(e.contains("line 3") && e.contains("linear"), "{e}");
}

#[test]
fn dot_mentions_every_tensor_node() {
    let g = small_block();
    let dot = ditto_ir::dot::to_dot(&g);
    assert!(dot.starts_with("digraph"));
    assert!(dot.contains("attention 4 0.25"));
    assert!(dot.contains("w:proj.weight"));
    assert!(dot.contains("out:sample"));
}

#[test]
fn pruning_drops_unused_nodes() {
    let mut g = small_block();
    let unused = g.weight("unused", &[3]).unwrap();
    let _ = g.silu(unused).unwrap();
    let p = g.pruned().unwrap();
    assert!(p.len() < g.len());
    assert!(!text::print(&p).contains("unused"));
    verify(&p).unwrap();
}
