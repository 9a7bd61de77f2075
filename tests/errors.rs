//! Bad input gets an error naming its cause: missing and misshaped weights, unknown model
//! classes, truncated or corrupt safetensors, bad configs, inputs of the wrong shape.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ditto::{HostTensor, Model};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A copy of a fixture model folder whose weights and config can be edited.
fn copy_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in [
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "io.safetensors",
    ] {
        std::fs::copy(fixture(name).join(f), dir.path().join(f)).unwrap();
    }
    dir
}

fn forward_inputs(dir: &Path) -> BTreeMap<String, HostTensor> {
    ditto::read_tensors(&dir.join("io.safetensors"))
        .unwrap()
        .into_iter()
        .filter_map(|(k, v)| k.strip_prefix("input.").map(|k| (k.to_string(), v)))
        .collect()
}

/// Rewrites the checkpoint of `dir` through `edit`.
fn edit_weights(dir: &Path, edit: impl FnOnce(&mut BTreeMap<String, HostTensor>)) {
    let path = dir.join("diffusion_pytorch_model.safetensors");
    let mut w = ditto::read_tensors(&path).unwrap();
    edit(&mut w);
    let list: Vec<(&str, &HostTensor)> = w.iter().map(|(k, v)| (k.as_str(), v)).collect();
    ditto::write_tensors(&path, &list).unwrap();
}

fn forward_err(dir: &Path) -> String {
    let model = match Model::load(dir) {
        Ok(m) => m,
        Err(e) => return e.to_string(),
    };
    match model.forward(&forward_inputs(dir)) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_weight_is_named() {
    let d = copy_fixture("dit");
    edit_weights(d.path(), |w| {
        w.remove("transformer_blocks.1.attn1.to_k.weight");
    });
    let e = forward_err(d.path());
    assert!(e.contains("transformer_blocks.1.attn1.to_k.weight"), "{e}");
    assert!(e.contains("not found"), "{e}");
}

#[test]
fn misshaped_weight_is_named_with_both_shapes() {
    let d = copy_fixture("pixart");
    edit_weights(d.path(), |w| {
        w.insert(
            "proj_out.weight".into(),
            HostTensor::new(vec![32, 63], vec![0.0; 32 * 63]),
        );
    });
    let e = forward_err(d.path());
    assert!(e.contains("proj_out.weight"), "{e}");
    assert!(e.contains("32, 64") && e.contains("32, 63"), "{e}");
}

#[test]
fn unknown_class_is_refused() {
    let d = copy_fixture("dit");
    let cfg = std::fs::read_to_string(d.path().join("config.json")).unwrap();
    let cfg = cfg.replace("DiTTransformer2DModel", "UNet2DConditionModel");
    std::fs::write(d.path().join("config.json"), cfg).unwrap();
    let e = forward_err(d.path());
    assert!(
        e.contains("unknown model class `UNet2DConditionModel`"),
        "{e}"
    );
}

#[test]
fn bad_config_values_name_the_field() {
    let d = copy_fixture("sd3");
    let cfg = std::fs::read_to_string(d.path().join("config.json")).unwrap();
    std::fs::write(
        d.path().join("config.json"),
        cfg.replace("\"num_attention_heads\": 4", "\"num_attention_heads\": 0"),
    )
    .unwrap();
    let e = forward_err(d.path());
    assert!(e.contains("num_attention_heads"), "{e}");
    std::fs::write(d.path().join("config.json"), "{ not json").unwrap();
    let e = forward_err(d.path());
    assert!(
        e.contains("config.json") && e.contains("invalid JSON"),
        "{e}"
    );
}

#[test]
fn truncated_checkpoint_names_the_file() {
    let d = copy_fixture("flux");
    let path = d.path().join("diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let e = forward_err(d.path());
    assert!(e.contains("diffusion_pytorch_model.safetensors"), "{e}");
    std::fs::write(&path, b"\x10\x00\x00\x00\x00\x00\x00\x00garbage!garbage!").unwrap();
    let e = forward_err(d.path());
    assert!(e.contains("diffusion_pytorch_model.safetensors"), "{e}");
}

#[test]
fn inputs_of_the_wrong_shape_are_named() {
    let d = fixture("pixart");
    let model = Model::load(&d).unwrap();
    let mut inputs = forward_inputs(&d);
    inputs.insert(
        "encoder_hidden_states".into(),
        HostTensor::new(vec![2, 7, 30], vec![0.0; 2 * 7 * 30]),
    );
    let e = model.forward(&inputs).unwrap_err().to_string();
    assert!(e.contains("encoder_hidden_states"), "{e}");
    assert!(e.contains("30") && e.contains("32"), "{e}");

    let mut inputs = forward_inputs(&d);
    inputs.remove("timestep");
    let e = model.forward(&inputs).unwrap_err().to_string();
    assert!(e.contains("timestep"), "{e}");

    let mut inputs = forward_inputs(&d);
    inputs.insert(
        "hidden_states".into(),
        HostTensor::new(vec![2, 4, 15, 16], vec![0.0; 2 * 4 * 15 * 16]),
    );
    let e = model.forward(&inputs).unwrap_err().to_string();
    assert!(e.contains("hidden_states"), "{e}");
}

#[test]
fn class_label_out_of_range_is_an_error() {
    let d = fixture("dit");
    let model = Model::load(&d).unwrap();
    let mut inputs = forward_inputs(&d);
    inputs.insert(
        "class_labels".into(),
        HostTensor::new(vec![2], vec![3.0, 11.0]),
    );
    let e = model.forward(&inputs).unwrap_err().to_string();
    assert!(e.contains("11") && e.contains("out of range"), "{e}");
}

#[test]
fn missing_model_folder_is_named() {
    let e = match Model::load("/nonexistent/model") {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("/nonexistent/model"), "{e}");
}
