//! Sizes other than the fixtures': odd head counts, non-square latents, batch > 2, more
//! layers. Without diffusers outputs for these, the reference is ditto itself run one sample
//! at a time: a batched forward must equal the per-sample forwards (no mixing across the
//! batch in attention, modulation or normalization), and every output must be finite.

use std::collections::BTreeMap;
use std::path::PathBuf;

use ditto::ir::Op;
use ditto::models::family;
use ditto::{HostTensor, Model, Shapes};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Tiny deterministic generator (xorshift) for weights and inputs.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next() * scale).collect()
    }
}

/// Writes `config` and random weights for it into a new folder.
fn random_model(config: &serde_json::Value, shapes: &Shapes) -> tempfile::TempDir {
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

fn random_inputs(model: &Model, shapes: &Shapes) -> BTreeMap<String, HostTensor> {
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
    let mut config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture(fixture_name).join("config.json")).unwrap(),
    )
    .unwrap();
    edit(&mut config);
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

fn set(cfg: &mut serde_json::Value, key: &str, v: serde_json::Value) {
    cfg.as_object_mut().unwrap().insert(key.into(), v);
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
