//! A model cut at its block boundaries into head, block ranges and tail (what PipeFusion's
//! stages and step caching run) computes the same as the whole forward, and each part
//! holds only its own blocks' weights.

mod common;

use std::collections::BTreeMap;

use ditto::ir::cut::Span;
use ditto::parallel::RankOptions;
use ditto::{CompileOptions, HostTensor, Model};

fn fixture_inputs(name: &str) -> BTreeMap<String, HostTensor> {
    let all = ditto::read_tensors(&common::fixture(name).join("io.safetensors")).unwrap();
    all.into_iter()
        .filter_map(|(k, v)| k.strip_prefix("input.").map(|k| (k.to_string(), v)))
        .collect()
}

/// Runs the parts between consecutive `cuts` one after another, feeding each part's
/// `carry.*` outputs to the next; returns the last part's outputs and each part's weights.
fn run_parts(
    model: &Model,
    inputs: &BTreeMap<String, HostTensor>,
    cuts: &[usize],
) -> (BTreeMap<String, HostTensor>, Vec<Vec<String>>) {
    let shapes_in: BTreeMap<String, Vec<usize>> = inputs
        .iter()
        .map(|(k, v)| (k.clone(), v.shape.clone()))
        .collect();
    let shapes = model.family().shapes_from_inputs(&shapes_in).unwrap();
    let mut bounds: Vec<Option<usize>> = vec![None];
    bounds.extend(cuts.iter().map(|&c| Some(c)));
    bounds.push(None);
    let mut carry: BTreeMap<String, HostTensor> = BTreeMap::new();
    let mut weights = Vec::new();
    for w in bounds.windows(2) {
        let span = Span {
            from: w[0],
            to: w[1],
        };
        let g = model.part_graph(&shapes, span, &[]).unwrap();
        let mut ranks = model
            .ranks_for_graph(g, &CompileOptions::default(), RankOptions::default())
            .unwrap();
        let program = ranks.program();
        weights.push(program.weights.iter().map(|b| b.name.clone()).collect());
        let mut feed: BTreeMap<String, HostTensor> = BTreeMap::new();
        for b in &program.inputs {
            let t = carry
                .get(&b.name)
                .or_else(|| inputs.get(&b.name))
                .unwrap_or_else(|| panic!("part {span:?} needs `{}`", b.name));
            feed.insert(b.name.clone(), t.clone());
        }
        let (out, _) = ranks.run(&feed).unwrap();
        carry = out;
    }
    (carry, weights)
}

fn check(name: &str, cuts: &[usize]) {
    let model = Model::load(common::fixture(name)).unwrap();
    let inputs = fixture_inputs(name);
    let full = model.forward(&inputs).unwrap();
    let (parts, weights) = run_parts(&model, &inputs, cuts);
    let (a, b) = (&full["sample"], &parts["sample"]);
    assert_eq!(a.shape, b.shape);
    let max = a
        .data
        .iter()
        .zip(&b.data)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(max <= 1e-5, "{name}: parts differ from the whole by {max}");
    // No block weight is loaded by two parts (conditioning weights may be shared).
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for (p, ws) in weights.iter().enumerate() {
        for w in ws {
            if w.contains("blocks.") && !w.contains(".emb.") {
                if let Some(q) = seen.insert(w, p) {
                    panic!("{name}: `{w}` loaded by parts {q} and {p}");
                }
            }
        }
    }
}

#[test]
fn dit_parts_compose_to_the_whole() {
    check("dit", &[0, 1, 2]);
}

#[test]
fn pixart_parts_compose_to_the_whole() {
    check("pixart", &[1]);
}

#[test]
fn sd3_parts_compose_to_the_whole() {
    // Includes the cut after the context_pre_only block, which carries the image only.
    let model = Model::load(common::fixture("sd3")).unwrap();
    let n = model
        .graph(&model.family().default_shapes(), false)
        .unwrap()
        .num_blocks();
    check("sd3", &[1, n]);
}

#[test]
fn flux_parts_compose_to_the_whole() {
    // One cut between the double and single blocks, one inside the single blocks.
    let model = Model::load(common::fixture("flux")).unwrap();
    let n = model
        .graph(&model.family().default_shapes(), false)
        .unwrap()
        .num_blocks();
    check("flux", &[1, n - 1]);
}

#[test]
fn a_cut_past_the_last_block_is_an_error() {
    let model = Model::load(common::fixture("dit")).unwrap();
    let shapes = model.family().default_shapes();
    let e = model
        .part_graph(
            &shapes,
            Span {
                from: Some(99),
                to: None,
            },
            &[],
        )
        .unwrap_err();
    assert!(e.to_string().contains("past the last block"), "{e}");
}
