//! Helpers shared by the integration tests: fixture paths and models with random weights
//! for configs no fixture covers.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use ditto::ir::Op;
use ditto::models::family;
use ditto::{HostTensor, Model, Shapes};

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A fixture's config.json with edits applied.
pub fn fixture_config(name: &str, edit: impl Fn(&mut serde_json::Value)) -> serde_json::Value {
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture(name).join("config.json")).unwrap())
            .unwrap();
    edit(&mut config);
    config
}

pub fn set(cfg: &mut serde_json::Value, key: &str, v: serde_json::Value) {
    cfg.as_object_mut().unwrap().insert(key.into(), v);
}

/// Tiny deterministic generator (xorshift) for weights and inputs.
pub struct Rng(u64);
impl Rng {
    pub fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next() * scale).collect()
    }
}

/// Writes `config` and random weights for it into a new folder.
pub fn random_model(config: &serde_json::Value, shapes: &Shapes) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let fam = family::from_config(config, "config.json").unwrap();
    let g = fam.build(shapes, &Default::default()).unwrap();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut weights = BTreeMap::new();
    for node in g.nodes() {
        if let Op::Weight(ch) = node {
            let name = g.node(ch[0]).name();
            let dims: Vec<usize> = ch[1..]
                .iter()
                .map(|&d| g.int_attr(d).unwrap() as usize)
                .collect();
            let n = dims.iter().product();
            weights.insert(name, HostTensor::new(dims, rng.vec(n, 0.2)));
        }
    }
    let list: Vec<(&str, &HostTensor)> = weights.iter().map(|(k, v)| (k.as_str(), v)).collect();
    ditto::write_tensors(
        &dir.path().join("diffusion_pytorch_model.safetensors"),
        &list,
    )
    .unwrap();
    dir
}

pub fn random_inputs(model: &Model, shapes: &Shapes) -> BTreeMap<String, HostTensor> {
    let compiled = model.compile(shapes, &Default::default()).unwrap();
    let mut rng = Rng(42);
    compiled
        .program
        .inputs
        .iter()
        .map(|b| {
            let n: usize = b.shape.iter().product();
            let data = match b.name.as_str() {
                "timestep" => (0..n).map(|i| 100.0 + 317.0 * i as f32).collect(),
                "class_labels" => (0..n).map(|i| (i % 3) as f32).collect(),
                "guidance" => vec![3.5; n],
                _ => rng.vec(n, 1.0),
            };
            (b.name.clone(), HostTensor::new(b.shape.clone(), data))
        })
        .collect()
}
