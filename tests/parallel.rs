//! Exact parallelism: Ulysses, Ring, USP and CFG parallel give the serial result (up to
//! float rounding, max relative error 1e-5) for every fixture family, for shapes that do not
//! divide the degrees (padded sequences and heads), and for whole generations; the cost
//! model's choice follows the link.

mod common;

use std::collections::BTreeMap;

use common::{fixture, fixture_config, random_inputs, random_model, set};
use ditto::ir::mesh::Mesh;
use ditto::passes::shard_sequence::{link_preset, ETHERNET, NVLINK};
use ditto::passes::{MethodChoice, ShardSequence};
use ditto::{CompileOptions, HostTensor, Model, Parallel, Shapes};

const TOL: f32 = 1e-5;

fn layout(cfg: usize, ring: usize, ulysses: usize) -> Parallel {
    Parallel {
        mesh: Mesh { cfg, ring, ulysses },
        choice: MethodChoice::Forced,
        link: NVLINK,
        stale: None,
    }
}

fn io_inputs(dir: &std::path::Path) -> BTreeMap<String, HostTensor> {
    ditto::read_tensors(&dir.join("io.safetensors"))
        .unwrap()
        .into_iter()
        .filter_map(|(k, v)| k.strip_prefix("input.").map(|k| (k.to_string(), v)))
        .collect()
}

fn forward(model: &Model, inputs: &BTreeMap<String, HostTensor>, p: Parallel) -> HostTensor {
    let opts = CompileOptions {
        parallel: p,
        verify: true,
        ..Default::default()
    };
    model.forward_with(inputs, &opts).unwrap()["sample"].clone()
}

/// Every layout of `layouts` against the serial forward of the same model and inputs.
fn assert_layouts_match_serial(
    what: &str,
    model: &Model,
    inputs: &BTreeMap<String, HostTensor>,
    layouts: &[(usize, usize, usize)],
) {
    let serial = forward(model, inputs, Parallel::default());
    for &(c, r, u) in layouts {
        let out = forward(model, inputs, layout(c, r, u));
        let err = out.max_rel_err(&serial);
        eprintln!("{what} cfg{c} r{r} u{u}: {err:.2e}");
        assert!(
            err <= TOL,
            "{what}: cfg {c} ring {r} ulysses {u}: rel err {err}"
        );
    }
}

#[test]
fn every_fixture_family_matches_serial() {
    for fam in ["dit", "pixart", "sd3", "flux"] {
        let dir = fixture(fam);
        let model = Model::load(&dir).unwrap();
        let inputs = io_inputs(&dir);
        let mut layouts = vec![(1, 1, 2), (1, 2, 1), (1, 2, 2)];
        if inputs["hidden_states"].shape[0] % 2 == 0 {
            layouts.extend([(2, 1, 1), (2, 1, 2)]);
        }
        assert_layouts_match_serial(fam, &model, &inputs, &layouts);
    }
}

#[test]
fn odd_head_counts_and_sequences_that_do_not_divide() {
    // 3 heads on 2 and 4 Ulysses ranks (heads padded), 63 image tokens on 4 Ring ranks
    // (sequence padded and masked), 60 tokens on r4.
    let cfg = fixture_config("dit", |c| set(c, "num_attention_heads", 3.into()));
    for (h, w, layouts) in [
        (16, 16, vec![(1, 1, 2), (1, 1, 4), (1, 2, 2)]),
        (14, 18, vec![(1, 4, 1), (1, 1, 4), (2, 2, 1)]),
        (12, 20, vec![(1, 4, 1)]),
    ] {
        let shapes = Shapes {
            batch: 2,
            height: h,
            width: w,
            text_len: 0,
        };
        let dir = random_model(&cfg, &shapes);
        let model = Model::load(dir.path()).unwrap();
        let inputs = random_inputs(&model, &shapes);
        assert_layouts_match_serial(&format!("dit 3 heads {h}x{w}"), &model, &inputs, &layouts);
    }
}

#[test]
fn joint_attention_with_text_that_does_not_divide() {
    // SD3 ([image; text]) and Flux ([text; image], RoPE): 5 text tokens on 2 and 4 ranks.
    for (fam, shapes) in [
        (
            "sd3",
            Shapes {
                batch: 2,
                height: 8,
                width: 12,
                text_len: 5,
            },
        ),
        (
            "flux",
            Shapes {
                batch: 1,
                height: 6,
                width: 10,
                text_len: 5,
            },
        ),
    ] {
        let dir = random_model(&fixture_config(fam, |_| {}), &shapes);
        let model = Model::load(dir.path()).unwrap();
        let inputs = random_inputs(&model, &shapes);
        assert_layouts_match_serial(fam, &model, &inputs, &[(1, 1, 2), (1, 4, 1), (1, 2, 2)]);
    }
}

#[test]
fn whole_generations_match_serial() {
    for (fam, (c, r, u)) in [
        ("dit", (2, 1, 2)),
        ("pixart", (2, 2, 1)),
        ("sd3", (1, 2, 2)),
        ("flux", (1, 1, 2)),
    ] {
        let dir = fixture(&format!("{fam}-pipeline"));
        let loop_io = ditto::read_tensors(&dir.join("loop.safetensors")).unwrap();
        let request = |pipe: &ditto::Pipeline| {
            let mut req = match std::fs::metadata(dir.join("prompt.safetensors")) {
                Ok(_) => ditto::GenerateRequest::prompt(
                    ditto::PromptEmbeds::read(&dir.join("prompt.safetensors")).unwrap(),
                ),
                Err(_) => ditto::GenerateRequest::classes(vec![3]),
            };
            req = req.with_noise(ditto::Noise::Latents(loop_io["latents.0"].clone()));
            let _ = pipe;
            req.with_steps(3)
        };
        let mut serial = ditto::Pipeline::load(&dir).unwrap();
        let a = serial.generate(&request(&serial)).unwrap();
        let mut par = ditto::Pipeline::load(&dir)
            .unwrap()
            .with_parallel(layout(c, r, u));
        let b = par.generate(&request(&par)).unwrap();
        let err = b.latents.max_rel_err(&a.latents);
        let err_img = b.image.max_rel_err(&a.image);
        eprintln!("{fam} generate cfg{c} r{r} u{u}: latents {err:.2e}, image {err_img:.2e}");
        assert!(err <= TOL && err_img <= TOL, "{fam}: {err} {err_img}");
    }
}

/// PixArt-Σ at 1024 px with a CFG pair: 4096 image tokens, 300 text tokens.
fn pixart_sigma_1024() -> (Box<dyn ditto::models::family::ModelFamily>, Shapes) {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/assets/bench/pixart-sigma-256/config.json"
    ))
    .unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&text).unwrap();
    set(&mut cfg, "sample_size", 128.into());
    set(&mut cfg, "interpolation_scale", 2.into());
    let fam = ditto::models::family::from_config(&cfg, "pixart-sigma").unwrap();
    (
        fam,
        Shapes {
            batch: 2,
            height: 128,
            width: 128,
            text_len: 300,
        },
    )
}

#[test]
fn cost_model_choice_follows_the_link() {
    let (fam, shapes) = pixart_sigma_1024();
    let g = fam.build(&shapes, &Default::default()).unwrap();
    let best = |link| {
        let mut all = vec![];
        for (c, r, u) in [(1, 1, 4), (1, 4, 1), (1, 2, 2), (2, 1, 2), (2, 2, 1)] {
            let mesh = Mesh {
                cfg: c,
                ring: r,
                ulysses: u,
            };
            let (_, plan, notes) = ShardSequence::new(mesh, MethodChoice::Auto, link)
                .plan(&g)
                .unwrap();
            assert!(notes.iter().any(|n| n.contains("predicted")), "{notes:?}");
            all.push((plan.predicted_s, (c, r, u), plan));
        }
        all.sort_by(|a, b| a.0.total_cmp(&b.0));
        all.remove(0)
    };
    let (fast_s, fast_mesh, fast_plan) = best(NVLINK);
    let (slow_s, slow_mesh, slow_plan) = best(ETHERNET);
    eprintln!("nvlink: {fast_mesh:?} {fast_s:.4}s; ethernet: {slow_mesh:?} {slow_s:.4}s");
    assert!(slow_s > fast_s, "a slower link cannot make the step faster");
    let sequence_parallel = |plan: &ditto::passes::ShardPlan| {
        plan.attentions
            .iter()
            .filter(|(m, _)| m == "ulysses" || m == "usp" || m == "ring")
            .count()
    };
    // Over NVLink, splitting the 4096-token self-attentions pays: all 28 are sequence
    // parallel. Over Ethernet the K/V traffic costs more than the attention it splits, so
    // the plan keeps whole sequences (splitting only the CFG batch, which exchanges one
    // noise prediction).
    assert_eq!(
        sequence_parallel(&fast_plan),
        28,
        "{:?}",
        fast_plan.attentions
    );
    assert_eq!(
        sequence_parallel(&slow_plan),
        0,
        "{:?}",
        slow_plan.attentions
    );
    assert_eq!(
        slow_mesh.0, 2,
        "ethernet should use the CFG pair, chose {slow_mesh:?}"
    );
    assert!(link_preset("pcie").is_some() && link_preset("infiniband-9000").is_none());
}

#[test]
fn forced_layout_that_does_not_fit_is_a_clear_error() {
    let dir = fixture("flux");
    let model = Model::load(&dir).unwrap();
    let inputs = io_inputs(&dir);
    let opts = CompileOptions {
        parallel: layout(2, 1, 1),
        ..Default::default()
    };
    let e = model.forward_with(&inputs, &opts).unwrap_err().to_string();
    assert!(
        e.contains("CFG parallel") && e.contains("batch is 1"),
        "{e}"
    );
}
