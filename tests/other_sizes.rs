//! Sizes other than the fixtures': odd head counts, non-square latents, batch > 2, more
//! layers. Without diffusers outputs for these, the reference is ditto itself run one sample
//! at a time: a batched forward must equal the per-sample forwards (no mixing across the
//! batch in attention, modulation or normalization), and every output must be finite.

mod common;

use std::collections::BTreeMap;

use common::{fixture_config, random_inputs, random_model, set};
use ditto::{HostTensor, Model, Shapes};

/// Sample `i` of a batched input (inputs without a batch axis — ids — are shared).
fn take_sample(t: &HostTensor, name: &str, i: usize, batch: usize) -> HostTensor {
    if name.ends_with("_ids") || t.shape.first() != Some(&batch) {
        return t.clone();
    }
    let per = t.numel() / batch;
    let mut shape = t.shape.clone();
    shape[0] = 1;
    HostTensor::new(shape, t.data[i * per..(i + 1) * per].to_vec())
}

fn check_batch_equals_samples(
    fixture_name: &str,
    edit: impl Fn(&mut serde_json::Value),
    shapes: Shapes,
) {
    let config = fixture_config(fixture_name, edit);
    let dir = random_model(&config, &shapes);
    let model = Model::load(dir.path()).unwrap();
    let inputs = random_inputs(&model, &shapes);
    let batched = model.forward(&inputs).unwrap()["sample"].clone();
    assert!(batched.data.iter().all(|x| x.is_finite()));
    let per = batched.numel() / shapes.batch;
    for i in 0..shapes.batch {
        let single: BTreeMap<String, HostTensor> = inputs
            .iter()
            .map(|(k, v)| (k.clone(), take_sample(v, k, i, shapes.batch)))
            .collect();
        let out = model.forward(&single).unwrap()["sample"].clone();
        let reference = HostTensor::new(
            out.shape.clone(),
            batched.data[i * per..(i + 1) * per].to_vec(),
        );
        let err = out.max_rel_err(&reference);
        assert!(
            err <= 1e-5,
            "{fixture_name}: sample {i} differs from the batch: {err}"
        );
    }
}

#[test]
fn dit_three_heads_non_square_batch_three_more_layers() {
    check_batch_equals_samples(
        "dit",
        |c| {
            set(c, "num_attention_heads", 3.into());
            set(c, "num_layers", 3.into());
        },
        Shapes {
            batch: 3,
            height: 8,
            width: 12,
            text_len: 0,
        },
    );
}

#[test]
fn pixart_five_heads_non_square_batch_three() {
    check_batch_equals_samples(
        "pixart",
        |c| {
            set(c, "num_attention_heads", 5.into());
            set(c, "cross_attention_dim", 80.into());
            set(c, "num_layers", 3.into());
        },
        Shapes {
            batch: 3,
            height: 12,
            width: 8,
            text_len: 5,
        },
    );
}

#[test]
fn sd3_three_heads_non_square_batch_three() {
    check_batch_equals_samples(
        "sd3",
        |c| {
            set(c, "num_attention_heads", 3.into());
            set(c, "caption_projection_dim", 48.into());
            set(c, "num_layers", 3.into());
            set(c, "dual_attention_layers", serde_json::json!([0, 1]));
        },
        Shapes {
            batch: 3,
            height: 8,
            width: 12,
            text_len: 5,
        },
    );
}

#[test]
fn flux_three_heads_batch_three_more_blocks() {
    check_batch_equals_samples(
        "flux",
        |c| {
            set(c, "num_attention_heads", 3.into());
            set(c, "num_layers", 2.into());
            set(c, "num_single_layers", 3.into());
        },
        Shapes {
            batch: 3,
            height: 6,
            width: 10,
            text_len: 5,
        },
    );
}

#[test]
fn vae_batch_three_non_square() {
    check_batch_equals_samples(
        "vae",
        |_| {},
        Shapes {
            batch: 3,
            height: 6,
            width: 10,
            text_len: 0,
        },
    );
}
