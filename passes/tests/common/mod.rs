//! Shared helpers of the pass tests: run a pass, verify, compare before/after text.
#![allow(dead_code)]

use ditto_ir::{text, verify, Graph};
use ditto_passes::{Pass, PassOutcome};

/// Runs `pass` on `g` after checking `g` prints as `before`; checks the result verifies,
/// keeps every output's name and meta, re-parses from its text, and prints as `after`.
pub fn check_pass(pass: &dyn Pass, g: &Graph, before: &str, after: &str) -> PassOutcome {
    assert_eq!(text::print(g), before, "input text of `{}`", pass.name());
    let out = run_checked(pass, g);
    assert_eq!(
        text::print(&out.graph),
        after,
        "output text of `{}`",
        pass.name()
    );
    out
}

/// Runs `pass` and checks verification, outputs and the text round trip.
pub fn run_checked(pass: &dyn Pass, g: &Graph) -> PassOutcome {
    verify(g).expect("input verifies");
    let out = pass.run(g).expect("pass runs");
    verify(&out.graph).expect("output verifies");
    assert_eq!(g.outputs.len(), out.graph.outputs.len());
    for ((n0, a), (n1, b)) in g.outputs.iter().zip(&out.graph.outputs) {
        assert_eq!(n0, n1, "output names keep their order");
        assert_eq!(
            g.meta(*a),
            out.graph.meta(*b),
            "output `{n0}` keeps its meta"
        );
    }
    let printed = text::print(&out.graph);
    let reparsed = text::parse(&printed).expect("output re-parses");
    verify(&reparsed).expect("re-parsed output verifies");
    assert_eq!(text::print(&reparsed), printed, "text round-trips");
    assert_eq!(
        reparsed.kernels, out.graph.kernels,
        "kernels round-trip exactly"
    );
    out
}
