//! The pipeline: order, reports, dumps (which must re-parse), verification, errors.

use std::path::PathBuf;

use ditto_ir::{text, verify, DType, Graph, Op};
use ditto_passes::{Pass, PassError, PassOutcome, Pipeline, RunOptions, PASS_NAMES};

/// A small adaLN DiT block in the style of the model files.
fn dit_block() -> Graph {
    let mut g = Graph::new();
    let x = g.input("hidden_states", DType::F32, &[2, 4, 8, 8]).unwrap();
    let c = g.input("conditioning", DType::F32, &[2, 32]).unwrap();
    let w_in = g.weight("proj_in.weight", &[32, 16]).unwrap();
    let w_ada = g.weight("norm1.linear.weight", &[96, 32]).unwrap();
    let w_q = g.weight("attn.to_q.weight", &[32, 32]).unwrap();
    let w_out = g.weight("attn.to_out.weight", &[32, 32]).unwrap();
    let r = g.reshape(x, &[2, 4, 4, 2, 4, 2]).unwrap();
    let p = g.permute(r, &[0, 2, 4, 1, 3, 5]).unwrap();
    let tok = g.reshape(p, &[2, 16, 16]).unwrap();
    let h = g.linear(tok, w_in).unwrap();
    let act = g.silu(c).unwrap();
    let emb = g.linear(act, w_ada).unwrap();
    let emb = g.reshape(emb, &[2, 1, 96]).unwrap();
    let parts = g.chunk(emb, 3, 2).unwrap();
    let n = g.layer_norm(h, 1e-6).unwrap();
    let one = g.add_scalar(parts[1], 1.0).unwrap();
    let m = g.mul(n, one).unwrap();
    let m = g.add_(m, parts[0]).unwrap();
    let q = g.linear(m, w_q).unwrap();
    let a = g.attention(q, q, q, 4, 0.25).unwrap();
    let o = g.linear(a, w_out).unwrap();
    let o = g.mul_scalar(o, 1.0).unwrap();
    let gated = g.mul(parts[2], o).unwrap();
    let out = g.add_(h, gated).unwrap();
    let back = g.reshape(out, &[2, 4, 4, 32]).unwrap();
    let back = g.reshape(back, &[2, 16, 32]).unwrap();
    g.output("sample", back);
    g.output("block.0.out0", out);
    g
}

fn temp_dir(tag: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    std::env::temp_dir().join(format!("ditto-passes-{tag}-{}-{nanos}", std::process::id()))
}

#[test]
fn default_cpu_lists_its_passes_in_order() {
    let p = Pipeline::default_cpu();
    assert_eq!(
        p.names(),
        vec!["verify", "canonicalize", "fuse_elementwise", "verify"]
    );
    let q = Pipeline::from_names(&p.names()).unwrap();
    assert_eq!(q.names(), p.names());
    for name in PASS_NAMES {
        assert_eq!(ditto_passes::pass_by_name(name).unwrap().name(), *name);
    }
}

#[test]
fn default_cpu_simplifies_fuses_and_verifies() {
    let g = dit_block();
    let opts = RunOptions {
        dump_dir: None,
        verify_each: true,
    };
    let (out, reports) = Pipeline::default_cpu().run(g.clone(), &opts).unwrap();
    verify(&out).unwrap();
    assert_eq!(reports.len(), 4);
    assert_eq!(reports[1].name, "canonicalize");
    assert_eq!(reports[0].nodes_before, g.len());
    assert_eq!(reports[3].nodes_after, out.len());
    assert!(
        reports[1].notes[0].starts_with("e-graph: "),
        "{:?}",
        reports[1].notes
    );
    assert!(
        reports[1].notes[0].ends_with("saturated"),
        "{:?}",
        reports[1].notes
    );
    for (name, id) in &g.outputs {
        let (_, new) = out.outputs.iter().find(|(n, _)| n == name).unwrap();
        assert_eq!(g.meta(*id), out.meta(*new), "{name}");
    }
    let printed = text::print(&out);
    assert!(!out.nodes().iter().any(Op::is_elementwise), "{printed}");
    // The trailing reshape pair folded into nothing (it ends where it started), so both
    // outputs are the residual; `* 1.0` is gone from the gate kernel.
    assert_eq!(out.outputs[0].1, out.outputs[1].1, "{printed}");
    assert!(
        printed.contains(
            "kernel k1_add_mul_add = (add (mul (arg 0) (add (arg 1) (scalar 1.0))) (arg 2))"
        ),
        "{printed}"
    );
    assert!(
        printed.contains("kernel k2_mul_add = (add (arg 0) (mul (arg 1) (arg 2)))"),
        "{printed}"
    );
    assert_eq!(out.kernels.len(), 3, "{printed}");
}

#[test]
fn dumps_are_written_after_every_pass_and_re_parse() {
    let dir = temp_dir("dump");
    let opts = RunOptions {
        dump_dir: Some(dir.clone()),
        verify_each: true,
    };
    let (out, _) = Pipeline::default_cpu().run(dit_block(), &opts).unwrap();
    let stems = [
        "00-input",
        "01-verify",
        "02-canonicalize",
        "03-fuse_elementwise",
        "04-verify",
    ];
    for stem in stems {
        let ir = std::fs::read_to_string(dir.join(format!("{stem}.ir"))).unwrap();
        let dot = std::fs::read_to_string(dir.join(format!("{stem}.dot"))).unwrap();
        assert!(ir.starts_with("# pass "), "{stem}: {ir}");
        assert!(
            dot.starts_with("// pass ") && dot.contains("digraph"),
            "{stem}"
        );
        let parsed = text::parse(&ir).unwrap_or_else(|e| panic!("{stem}: {e}"));
        verify(&parsed).unwrap();
        let body: String = ir
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(text::print(&parsed), body, "{stem} round-trips");
    }
    let canon = std::fs::read_to_string(dir.join("02-canonicalize.ir")).unwrap();
    assert!(
        canon.starts_with("# pass canonicalize: e-graph: "),
        "{canon}"
    );
    assert!(
        canon.contains("# pass canonicalize: rewrites applied: "),
        "{canon}"
    );
    let last = std::fs::read_to_string(dir.join("04-verify.ir")).unwrap();
    assert!(last.ends_with(&text::print(&out)));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_bad_input_fails_in_the_first_verify() {
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, &[2]).unwrap();
    let k = g.name("nope");
    let f = g.add(Op::Fused(vec![k, x].into())).unwrap();
    g.output("y", f);
    let err = Pipeline::default_cpu()
        .run(g, &RunOptions::default())
        .unwrap_err();
    assert!(
        matches!(err, PassError::Verify { pass: "verify", .. }),
        "{err}"
    );
    assert!(err.to_string().contains("no kernel named `nope`"), "{err}");
}

/// A pass that breaks the graph, to check `verify_each` catches it and names the pass.
struct Breaker;

impl Pass for Breaker {
    fn name(&self) -> &'static str {
        "breaker"
    }
    fn run(&self, g: &Graph) -> Result<PassOutcome, PassError> {
        let mut g = g.clone();
        g.kernels.clear();
        Ok(PassOutcome::new(g, vec!["dropped every kernel".into()]))
    }
}

#[test]
fn verify_each_names_the_pass_that_broke_the_graph() {
    let mut p = Pipeline::from_names(&["fuse_elementwise"]).unwrap();
    p.push(Box::new(Breaker));
    let opts = RunOptions {
        dump_dir: None,
        verify_each: true,
    };
    let err = p.run(dit_block(), &opts).unwrap_err();
    assert_eq!(err.pass(), "breaker");
    assert!(err.to_string().contains("after pass `breaker`"), "{err}");
    // Without verification the broken graph goes through.
    assert!(p.run(dit_block(), &RunOptions::default()).is_ok());
}

#[test]
fn unknown_pass_names_are_refused() {
    let err = Pipeline::from_names(&["verify", "fuse_everything"]).unwrap_err();
    assert!(
        err.to_string().contains("unknown pass `fuse_everything`"),
        "{err}"
    );
    assert!(err.to_string().contains("canonicalize"), "{err}");
}
