//! Helpers shared by the unit tests of the model families (and of the checkpoint readers):
//! the fixtures under `tests/fixtures`, what a built graph holds, and the check of a graph
//! against its fixture's checkpoint and io files.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{Debug, Display};
use std::path::{Path, PathBuf};

use ditto_ir::{Graph, Op};
use serde::de::DeserializeOwned;

use crate::checkpoint::Checkpoint;
use crate::family::ModelFamily;
use crate::{BuildOptions, Shapes};

/// Input shapes by forward-argument name.
pub(crate) type Inputs = BTreeMap<String, Vec<usize>>;

/// `tests/fixtures/<rel>` of the workspace.
pub(crate) fn fixture(rel: &str) -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures")).join(rel)
}

/// The fixture's `config.json`, parsed as `T`.
pub(crate) fn fixture_config<T: DeserializeOwned>(rel: &str) -> T {
    let value = crate::read_config(&fixture(rel)).expect("fixture config");
    crate::parse_config(&value, &format!("{rel}/config.json")).expect("parse fixture config")
}

/// Input shapes recorded in the fixture's io.safetensors (`input.<name>`).
pub(crate) fn fixture_inputs(rel: &str) -> Inputs {
    let io = Checkpoint::open(&fixture(rel).join("io.safetensors")).expect("io.safetensors");
    io.names()
        .into_iter()
        .filter_map(|n| {
            let arg = n.strip_prefix("input.")?;
            Some((arg.to_string(), io.shape(n)?.to_vec()))
        })
        .collect()
}

/// `inputs` with `name` set to `shape` (added or replaced).
pub(crate) fn with_input(inputs: &Inputs, name: &str, shape: Vec<usize>) -> Inputs {
    let mut m = inputs.clone();
    m.insert(name.to_string(), shape);
    m
}

/// `inputs` without `name`.
pub(crate) fn without_input(inputs: &Inputs, name: &str) -> Inputs {
    let mut m = inputs.clone();
    m.remove(name);
    m
}

/// Build options that also output every block's results, as the fixtures record them.
pub(crate) fn with_block_outputs() -> BuildOptions {
    BuildOptions {
        block_outputs: true,
    }
}

/// Builds `cfg` for `shapes` with block outputs.
pub(crate) fn build_all(cfg: &dyn ModelFamily, shapes: Shapes) -> Graph {
    cfg.build(&shapes, &with_block_outputs()).expect("builds")
}

/// The message of an expected error.
pub(crate) fn err_text<T: Debug, E: Display>(r: Result<T, E>) -> String {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.to_string(),
    }
}

/// Every `weight` node as name -> dims; a name requested with two different shapes fails.
pub(crate) fn weights(g: &Graph) -> BTreeMap<String, Vec<usize>> {
    let mut out: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for op in g.nodes() {
        if let Op::Weight(ch) = op {
            let name = g.name_attr(ch[0]).expect("weight name").to_string();
            let dims: Vec<usize> = ch[1..]
                .iter()
                .map(|&c| g.int_attr(c).expect("dim") as usize)
                .collect();
            if let Some(prev) = out.insert(name.clone(), dims.clone()) {
                assert_eq!(prev, dims, "weight {name} requested with two shapes");
            }
        }
    }
    out
}

/// [`weights`] of the nodes reachable from the outputs.
pub(crate) fn reachable_weights(g: &Graph) -> BTreeMap<String, Vec<usize>> {
    weights(&g.pruned().expect("prunes"))
}

/// The input nodes as name -> (dtype, dims).
pub(crate) fn inputs_of(g: &Graph) -> BTreeMap<String, (String, Vec<usize>)> {
    let mut out = BTreeMap::new();
    for op in g.nodes() {
        if let Op::Input(ch) = op {
            let name = g.name_attr(ch[0]).expect("name").to_string();
            let dt = g.name_attr(ch[1]).expect("dtype").to_string();
            let dims = ch[2..]
                .iter()
                .map(|&c| g.int_attr(c).expect("dim") as usize)
                .collect();
            out.insert(name, (dt, dims));
        }
    }
    out
}

pub(crate) fn output_shape<'a>(g: &'a Graph, name: &str) -> &'a [usize] {
    let id = g
        .outputs
        .iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no output {name}"))
        .1;
    g.shape(id)
}

/// Builds the graph of the fixture at `rel` from its config and the inputs of its io file,
/// with block outputs, and checks it with [`check_against_fixture`]; returns its shapes and
/// the graph.
pub(crate) fn check_fixture<C: ModelFamily + DeserializeOwned>(rel: &str) -> (Shapes, Graph) {
    let cfg: C = fixture_config(rel);
    let shapes = cfg
        .shapes_from_inputs(&fixture_inputs(rel))
        .expect("shapes");
    let g = build_all(&cfg, shapes);
    check_against_fixture(&g, rel, &[]);
    (shapes, g)
}

/// Checks a graph built for the fixture at `rel` against its files. Weights: every one the
/// graph reaches is in the checkpoint with its shape, and every checkpoint tensor is used but
/// those under `ignored_prefixes`, which must not be. Outputs: exactly `sample` (shaped as
/// `output` in io.json and io.safetensors) and the `block.*` outputs of io.safetensors, each
/// once and with its shape there.
pub(crate) fn check_against_fixture(g: &Graph, rel: &str, ignored_prefixes: &[&str]) {
    let dir = fixture(rel);
    let ignored = |name: &str| ignored_prefixes.iter().any(|p| name.starts_with(p));
    let ckpt = Checkpoint::open(&dir).expect("checkpoint");
    let used = reachable_weights(g);
    for (name, dims) in &used {
        let have = ckpt
            .shape(name)
            .unwrap_or_else(|| panic!("{rel}: graph weight {name} is not in the checkpoint"));
        assert_eq!(have, dims.as_slice(), "{rel}: shape of {name}");
        assert!(!ignored(name), "{rel}: graph uses ignored weight {name}");
    }
    for name in ckpt.names() {
        assert!(
            used.contains_key(name) || ignored(name),
            "{rel}: checkpoint tensor {name} is unused by the graph"
        );
    }

    let io_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("io.json")).expect("io.json"))
            .expect("io.json parses");
    let want: Vec<usize> =
        serde_json::from_value(io_json["output"]["shape"].clone()).expect("output shape");
    let io = Checkpoint::open(&dir.join("io.safetensors")).expect("io.safetensors");
    assert_eq!(output_shape(g, "sample"), want, "{rel}");
    assert_eq!(io.shape("output"), Some(want.as_slice()), "{rel}");

    let blocks: BTreeSet<&str> = io
        .names()
        .into_iter()
        .filter(|n| n.starts_with("block."))
        .collect();
    for &name in &blocks {
        assert_eq!(
            output_shape(g, name),
            io.shape(name).expect("shape"),
            "{rel}: {name}"
        );
    }
    let mut outs: Vec<&str> = g.outputs.iter().map(|(n, _)| n.as_str()).collect();
    outs.sort_unstable();
    let mut want_outs: Vec<&str> = blocks.into_iter().chain(["sample"]).collect();
    want_outs.sort_unstable();
    assert_eq!(outs, want_outs, "{rel}");
}
