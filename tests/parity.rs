//! Forward parity with diffusers: every model fixture (and the transformer/VAE of every
//! pipeline fixture) against the outputs diffusers recorded in `io.safetensors`, block by
//! block, at max relative error 1e-4 (`max|ours - ref| / max|ref|`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use ditto::{CompileOptions, HostTensor, Model};

const TOL: f32 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Runs the model in `dir` on its recorded inputs; returns (name, rel err) for the output
/// and every recorded block output.
fn check(dir: &str) -> Vec<(String, f32)> {
    let dir = fixture(dir);
    let model = Model::load(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let io = ditto::read_tensors(&dir.join("io.safetensors")).unwrap();
    let inputs: BTreeMap<String, HostTensor> = io
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("input.").map(|k| (k.to_string(), v.clone())))
        .collect();
    let outs = model
        .forward_with(
            &inputs,
            &CompileOptions {
                block_outputs: true,
                verify: true,
                ..Default::default()
            },
        )
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let mut errs = vec![];
    for (name, reference) in &io {
        let ours = if name == "output" {
            outs.get("sample")
        } else if name.starts_with("block.") {
            outs.get(name)
        } else {
            continue;
        };
        let ours = ours.unwrap_or_else(|| panic!("{}: no `{name}` in our outputs", dir.display()));
        assert_eq!(
            ours.shape,
            reference.shape,
            "{}: shape of {name}",
            dir.display()
        );
        errs.push((name.clone(), ours.max_rel_err(reference)));
    }
    errs
}

fn assert_parity(dir: &str) {
    let errs = check(dir);
    assert!(errs.iter().any(|(n, _)| n == "output"));
    let bad: Vec<_> = errs
        .iter()
        .filter(|(_, e)| e.is_nan() || *e > TOL)
        .collect();
    eprintln!("{dir}: {errs:?}");
    assert!(bad.is_empty(), "{dir}: max rel err above {TOL}: {bad:?}");
}

#[test]
fn dit_matches_diffusers() {
    assert_parity("dit");
}
#[test]
fn pixart_matches_diffusers() {
    assert_parity("pixart");
}
#[test]
fn sd3_matches_diffusers() {
    assert_parity("sd3");
}
#[test]
fn flux_matches_diffusers() {
    assert_parity("flux");
}
#[test]
fn vae_matches_diffusers() {
    assert_parity("vae");
}
#[test]
fn pipeline_transformers_match_diffusers() {
    for p in ["dit", "pixart", "sd3", "flux"] {
        assert_parity(&format!("{p}-pipeline/transformer"));
    }
}
#[test]
fn pipeline_vaes_match_diffusers() {
    for p in ["dit", "pixart", "sd3", "flux"] {
        assert_parity(&format!("{p}-pipeline/vae"));
    }
}
