//! PipeFusion: stages of blocks on ranks, the image in row patches attending to one-step-stale
//! K/V of the other patches. Exact when every step is a warmup step; measured quality and
//! traffic otherwise.

mod common;

use ditto::ir::mesh::Mesh;
use ditto::pipeline::{PipeFusion, PipeFusionReport};
use ditto::quality::{distance, per_sample};
use ditto::{GenerateRequest, Generation, HostTensor, Noise, Parallel, Pipeline};

fn layout(stages: usize, patches: usize, warmup_steps: usize) -> Option<PipeFusion> {
    Some(PipeFusion {
        stages,
        patches,
        blocks_per_stage: None,
        warmup_steps,
    })
}

/// Classes 0..4 with two seeds each, DDIM 20 steps, guidance 3 (the built-in defaults).
fn request(seed: u64) -> GenerateRequest {
    let labels: Vec<usize> = (0..4).flat_map(|c| [c, c]).collect();
    let seeds: Vec<u64> = (0..4).flat_map(|_| [seed, seed + 1]).collect();
    GenerateRequest::classes(labels).with_noise(Noise::Seeds(seeds))
}

fn serial(req: &GenerateRequest) -> Generation {
    Pipeline::builtin().unwrap().generate(req).unwrap()
}

fn pipefusion(req: &GenerateRequest, pf: Option<PipeFusion>) -> (Generation, PipeFusionReport) {
    let mut pipe = Pipeline::builtin().unwrap().with_pipefusion(pf);
    let g = pipe.generate(req).unwrap();
    (g, pipe.pipefusion_report().cloned().unwrap())
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn all_warmup_steps_equal_the_serial_run() {
    let req = request(0).with_steps(4);
    let reference = serial(&req);
    for (p, m) in [(2, 2), (2, 4), (1, 2), (3, 2)] {
        let (g, _) = pipefusion(&req, layout(p, m, 4));
        let d = max_abs(&reference.latents.data, &g.latents.data);
        assert!(d <= 1e-5, "P={p} M={m}: {d}");
    }
}

#[test]
fn patch_steps_with_nothing_stale_equal_the_serial_run() {
    // One patch: the displaced attention sees only fresh K/V, so patch steps are exact
    // too, and the stages still pass every step through the pipeline ring.
    let req = request(3).with_steps(3);
    let reference = serial(&req);
    let (g, _) = pipefusion(&req, layout(2, 1, 0));
    let d = max_abs(&reference.latents.data, &g.latents.data);
    assert!(d <= 1e-5, "{d}");
}

/// Quality on the trained built-in model (DDIM 20, guidance 3, classes 0..4 x seeds 0..4):
/// per-image PSNR against the serial run of the same seed, mean over the 16 images.
/// Measured with 1 warmup step (`tests/stale_quality.rs` prints the whole table): P=2 M=2
/// 32.02 dB (worst image 23.30), P=2 M=4 28.76 (22.82); without warmup 31.24 and 27.88.
/// The floors sit a little below.
#[test]
fn stale_patches_stay_close_to_the_serial_run() {
    let seeds = [0u64, 1, 2, 3];
    let labels: Vec<usize> = (0..4).flat_map(|c| seeds.iter().map(move |_| c)).collect();
    let noise: Vec<u64> = (0..4).flat_map(|_| seeds).collect();
    let req = GenerateRequest::classes(labels).with_noise(Noise::Seeds(noise));
    let reference = serial(&req);
    for (p, m, warmup, floor) in [(2, 2, 1, 31.5), (2, 4, 1, 28.5), (2, 2, 0, 30.5)] {
        let (g, _) = pipefusion(&req, layout(p, m, warmup));
        let s = per_sample(&reference.image.data, &g.image.data, 16);
        eprintln!(
            "P={p} M={m} warmup {warmup}: mean {:.2} dB, worst {:.2} dB",
            s.mean_db, s.worst_db
        );
        assert!(
            s.mean_db >= floor,
            "P={p} M={m} warmup {warmup}: {:.2} dB < {floor} dB",
            s.mean_db
        );
        // Staleness does change the result: this is not a disguised serial run.
        assert!(s.worst_db < 60.0, "P={p} M={m}: identical to serial");
    }
}

#[test]
fn traffic_matches_the_analytic_volume_and_is_far_below_ring() {
    let steps = 4;
    let req = request(0).with_steps(steps);
    let (_, rep) = pipefusion(&req, layout(2, 2, 1));
    assert_eq!(rep.comm.len(), 2);
    // Stage 0 sends its carried stream every step; the last stage sends the latents back
    // after every step but the last.
    let sent: Vec<u64> = rep.comm.iter().map(|c| c.total_bytes()).collect();
    assert_eq!(sent[0], rep.analytic_step_bytes[0] * steps as u64);
    assert_eq!(sent[1], rep.analytic_step_bytes[1] * (steps as u64 - 1));
    // Every rank holds only its stage's blocks.
    let whole: u64 = {
        let pipe = Pipeline::builtin().unwrap();
        let model = pipe.transformer_model();
        model
            .compile(&model.family().default_shapes(), &Default::default())
            .unwrap()
            .program
            .weights
            .iter()
            .map(|b| 4 * b.shape.iter().product::<usize>() as u64)
            .sum()
    };
    for (r, &w) in rep.weight_bytes.iter().enumerate() {
        assert!(
            w < whole * 3 / 4,
            "rank {r} holds {w} of {whole} weight bytes"
        );
    }
    assert!(rep.kv_bytes.iter().all(|&b| b > 0));

    // Ring attention over 2 ranks on the same request: K/V of every layer, every step.
    let mut ring = Pipeline::builtin().unwrap().with_parallel(Parallel {
        mesh: Mesh {
            cfg: 1,
            ring: 2,
            ulysses: 1,
        },
        ..Default::default()
    });
    ring.generate(&req).unwrap();
    let (_, stats) = ring.transformer_ranks().unwrap();
    let ring_per_rank = stats.per_rank[0].total_bytes();
    let pf_per_rank = sent[0].max(sent[1]);
    assert!(
        pf_per_rank * 4 < ring_per_rank,
        "PipeFusion {pf_per_rank} B vs Ring {ring_per_rank} B per rank"
    );
}

#[test]
fn layouts_that_do_not_fit_are_clear_errors() {
    let req = request(0).with_steps(2);
    let run = |pf| {
        Pipeline::builtin()
            .unwrap()
            .with_pipefusion(pf)
            .generate(&req)
            .unwrap_err()
            .to_string()
    };
    // 16 token rows.
    let e = run(layout(2, 3, 1));
    assert!(e.contains("do not divide by 3"), "{e}");
    let e = run(layout(2, 0, 1));
    assert!(e.contains("at least 1"), "{e}");
    let e = run(layout(99, 2, 1));
    assert!(e.contains("more stages than"), "{e}");
    let e = run(Some(PipeFusion {
        stages: 2,
        patches: 2,
        blocks_per_stage: Some(vec![1, 1]),
        warmup_steps: 1,
    }));
    assert!(e.contains("summing to the model's"), "{e}");
}

#[test]
fn explicit_stage_sizes_are_used() {
    let req = request(0).with_steps(2);
    let pipe = Pipeline::builtin().unwrap();
    let n = pipe
        .transformer_model()
        .graph(&pipe.transformer_model().family().default_shapes(), false)
        .unwrap()
        .num_blocks();
    let (_, rep) = pipefusion(
        &req,
        Some(PipeFusion {
            stages: 2,
            patches: 2,
            blocks_per_stage: Some(vec![1, n - 1]),
            warmup_steps: 2,
        }),
    );
    assert_eq!(rep.stage_blocks, vec![0..1, 1..n]);
}

#[test]
fn text_conditioned_pipelines_are_exact_with_all_warmup_steps() {
    // SD3 (joint attention, image first, a context_pre_only last block) and Flux (text
    // first, RoPE, double then single blocks): the text stream is cut into patches with
    // the image, and a stage boundary may fall between block kinds.
    for name in ["sd3-pipeline", "flux-pipeline"] {
        let dir = common::fixture(name);
        let mut prompt = ditto::PromptEmbeds::read(&dir.join("prompt.safetensors")).unwrap();
        // Patches cut the text stream too: keep an even number of tokens.
        prompt.prompt_embeds = even(&prompt.prompt_embeds);
        prompt.negative_prompt_embeds = prompt.negative_prompt_embeds.as_ref().map(even);
        let req = GenerateRequest::prompt(prompt)
            .with_steps(3)
            .with_noise(Noise::Seed(1));
        let reference = Pipeline::load(&dir).unwrap().generate(&req).unwrap();
        let mut pipe = Pipeline::load(&dir)
            .unwrap()
            .with_pipefusion(layout(2, 2, 3));
        let g = match pipe.generate(&req) {
            Ok(g) => g,
            Err(e) => panic!("{name}: {e}"),
        };
        let d = max_abs(&reference.latents.data, &g.latents.data);
        assert!(d <= 1e-4, "{name}: {d}");
    }
}

/// The first tokens of [B, n, w] text embeddings, an even number of them.
fn even(t: &HostTensor) -> HostTensor {
    let (b, n, w) = (t.shape[0], t.shape[1], t.shape[2]);
    let keep = n - n % 2;
    let data = (0..b)
        .flat_map(|i| t.data[i * n * w..(i * n + keep) * w].iter().copied())
        .collect();
    HostTensor::new(vec![b, keep, w], data)
}

fn mesh(cfg: usize, ring: usize, ulysses: usize) -> Parallel {
    Parallel {
        mesh: Mesh { cfg, ring, ulysses },
        ..Default::default()
    }
}

/// PipeFusion with a layout inside each stage (`cfg x ring x ulysses` ranks per stage).
fn hybrid(
    req: &GenerateRequest,
    pf: Option<PipeFusion>,
    inside: Parallel,
) -> (Generation, PipeFusionReport) {
    let mut pipe = Pipeline::builtin()
        .unwrap()
        .with_parallel(inside)
        .with_pipefusion(pf);
    let g = pipe.generate(req).unwrap();
    (g, pipe.pipefusion_report().cloned().unwrap())
}

const INSIDE: [(&str, usize, usize, usize); 5] = [
    ("ulysses 2", 1, 1, 2),
    ("ring 2", 1, 2, 1),
    ("cfg 2", 2, 1, 1),
    ("cfg 2 x ulysses 2", 2, 1, 2),
    ("ring 2 x ulysses 2", 1, 2, 2),
];

#[test]
fn hybrids_with_all_warmup_steps_equal_the_serial_run() {
    let req = request(5).with_steps(3);
    let reference = serial(&req);
    for (name, c, r, u) in INSIDE {
        let (g, rep) = hybrid(&req, layout(2, 2, 3), mesh(c, r, u));
        assert_eq!(rep.comm.len(), 2 * c * r * u, "{name}");
        let d = max_abs(&reference.latents.data, &g.latents.data);
        eprintln!("PipeFusion 2 x {name}, all warmup: {d:e} from serial");
        assert!(d <= 1e-5, "PipeFusion 2 x {name}: {d}");
    }
}

/// Inside a stage the patch is computed exactly (Ulysses' all-to-all, the ring's gather of
/// the patch's K/V, the CFG halves), so a hybrid has the staleness of plain PipeFusion with
/// the same stages and patches: the same result, up to float rounding.
#[test]
fn hybrids_are_plain_pipefusion_computed_on_more_ranks() {
    let req = request(20).with_steps(6);
    let (plain, _) = pipefusion(&req, layout(2, 2, 1));
    let reference = serial(&req);
    let stale = distance(&reference.image.data, &plain.image.data);
    assert!(
        stale.max_rel_err > 1e-4,
        "plain PipeFusion is not stale here"
    );
    for (name, c, r, u) in INSIDE {
        let (g, _) = hybrid(&req, layout(2, 2, 1), mesh(c, r, u));
        let d = max_abs(&plain.latents.data, &g.latents.data);
        eprintln!(
            "PipeFusion 2 x {name}: {d:e} from PipeFusion 2 (which is {:e} from serial)",
            max_abs(&plain.latents.data, &reference.latents.data)
        );
        assert!(d <= 1e-5, "PipeFusion 2 x {name} vs PipeFusion 2: {d}");
    }
}

#[test]
fn hybrid_traffic_matches_the_analytic_volume() {
    let steps = 4;
    let req = request(1).with_steps(steps);
    for (name, c, r, u) in INSIDE {
        let (_, rep) = hybrid(&req, layout(2, 2, 1), mesh(c, r, u));
        let ranks = 2 * c * r * u;
        assert_eq!(rep.analytic_total_bytes.len(), ranks);
        eprintln!(
            "PipeFusion 2 x {name}: bytes per rank {:?}",
            rep.comm.iter().map(|c| c.total_bytes()).collect::<Vec<_>>()
        );
        for (rank, st) in rep.comm.iter().enumerate() {
            assert_eq!(
                st.total_bytes(),
                rep.analytic_total_bytes[rank],
                "{name}: rank {rank}"
            );
        }
        // Every rank of a stage holds the stage's weights and the K/V of the whole image
        // (its share of the heads with Ulysses).
        let kv0 = rep.kv_bytes[0];
        assert!(rep.kv_bytes.iter().all(|&b| b > 0), "{name}");
        if u > 1 {
            let (_, plain) = pipefusion(&req, layout(2, 2, 1));
            assert_eq!(kv0 * u as u64, plain.kv_bytes[0] / c as u64, "{name}");
        }
    }
}

fn cached(
    req: &GenerateRequest,
    pf: Option<PipeFusion>,
    inside: Parallel,
    policy: ditto::CachePolicy,
) -> (Generation, ditto::CacheReport) {
    let (g, c, _) = cached_with_report(req, pf, inside, policy);
    (g, c)
}

fn cached_with_report(
    req: &GenerateRequest,
    pf: Option<PipeFusion>,
    inside: Parallel,
    policy: ditto::CachePolicy,
) -> (Generation, ditto::CacheReport, PipeFusionReport) {
    let mut pipe = Pipeline::builtin()
        .unwrap()
        .with_parallel(inside)
        .with_pipefusion(pf);
    let g = pipe.generate(&req.clone().with_cache(policy)).unwrap();
    (
        g,
        pipe.cache_report().cloned().unwrap(),
        pipe.pipefusion_report().cloned().unwrap(),
    )
}

const POLICIES: [ditto::CachePolicy; 2] = [
    ditto::CachePolicy::TeaCache { threshold: 0.02 },
    ditto::CachePolicy::FirstBlock { threshold: 0.1 },
];

#[test]
fn caching_with_threshold_zero_changes_nothing() {
    let req = request(2).with_steps(5);
    let (plain, _) = pipefusion(&req, layout(2, 2, 1));
    for policy in [
        ditto::CachePolicy::TeaCache { threshold: 0.0 },
        ditto::CachePolicy::FirstBlock { threshold: 0.0 },
    ] {
        let (g, rep, pf) = cached_with_report(&req, layout(2, 2, 1), mesh(1, 1, 2), policy.clone());
        assert_eq!(rep.patches, vec![vec![true; 2]; 5], "{policy}");
        assert_eq!(g.latents, plain.latents, "{policy}");
        // Nothing skipped: the traffic is the analytic volume, with the cache's decisions
        // and base included.
        for (rank, st) in pf.comm.iter().enumerate() {
            assert_eq!(
                st.total_bytes(),
                pf.analytic_total_bytes[rank],
                "{policy} rank {rank}"
            );
        }
    }
}

/// Warmup steps decide for the whole image as the serial run does: with every step a warmup
/// step, PipeFusion (on its own and with a layout inside the stages) skips the same steps as
/// the serial cached run and gives its result.
#[test]
fn caching_with_all_warmup_steps_is_the_serial_cached_run() {
    let steps = 12;
    let req = request(3).with_steps(steps);
    for policy in POLICIES {
        let mut one = Pipeline::builtin().unwrap();
        let reference = one
            .generate(&req.clone().with_cache(policy.clone()))
            .unwrap();
        let want = one.cache_report().unwrap().computed.clone();
        assert!(
            want.contains(&false),
            "{policy}: the serial run skips nothing"
        );
        for (name, c, r, u) in [("plain", 1, 1, 1), ("cfg 2 x ulysses 2", 2, 1, 2)] {
            let (g, rep) = cached(&req, layout(2, 2, steps), mesh(c, r, u), policy.clone());
            assert_eq!(rep.computed, want, "{policy} {name}");
            let d = max_abs(&reference.latents.data, &g.latents.data);
            assert!(d <= 1e-5, "{policy} {name}: {d}");
        }
    }
}

/// After warmup every patch decides on its own rows (the decision rules per patch are unit
/// tests of `patch_cache`); the image stays close to the uncached serial run.
#[test]
fn cached_patches_skip_steps_and_stay_close() {
    let req = request(4);
    let reference = serial(&req);
    let (plain, _) = pipefusion(&req, layout(2, 2, 1));
    let plain_db = distance(&reference.image.data, &plain.image.data).psnr_db;
    for policy in POLICIES {
        let (g, rep) = cached(&req, layout(2, 2, 1), Parallel::default(), policy.clone());
        let (done, all) = rep.computed_patches();
        assert_eq!(all, 2 * 20);
        assert!(done < all, "{policy}: nothing skipped");
        assert!(rep.patches.iter().all(|p| p.len() == 2));
        // Both patches are computed in the first step (the warmup step), TeaCache also in
        // the last.
        assert_eq!(rep.patches[0], vec![true, true]);
        let db = distance(&reference.image.data, &g.image.data).psnr_db;
        eprintln!("{policy}: {done} of {all} patch steps computed, {db:.2} dB vs serial (PipeFusion alone {plain_db:.2} dB)");
        assert!(db >= 20.0, "{policy}: {db:.2} dB");
    }
}

/// The command line: a hybrid with a cache reports its stages, traffic and patches, and
/// the combinations that cannot work are clear errors.
#[test]
fn cli_hybrid_reports_and_bad_combinations_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("pf.png");
    let png = png.to_str().unwrap();
    let ditto = |extra: &[&str]| {
        let mut a = vec![
            "generate",
            "--steps",
            "3",
            "--num-samples",
            "1",
            "--out",
            png,
        ];
        a.extend_from_slice(extra);
        std::process::Command::new(env!("CARGO_BIN_EXE_ditto"))
            .args(&a)
            .output()
            .expect("run ditto")
    };
    let out = ditto(&[
        "--pipefusion-degree",
        "2",
        "--ulysses-degree",
        "2",
        "--use-cfg-parallel",
        "--cache",
        "fbcache:0.05",
        "--report",
        "--compare-serial",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "each stage on cfg 2 x ring 1 x ulysses 2 = 4 rank(s)",
        "patch steps computed",
        "vs serial: image PSNR",
        "analytic",
    ] {
        assert!(text.contains(want), "`{want}` missing from:\n{text}");
    }
    // Rank rows 0..7, two stages of four.
    assert!(text.lines().any(|l| l.starts_with("7 ")), "{text}");
    for (flags, want) in [
        (
            &["--pipefusion-degree", "2", "--distrifusion-degree", "2"][..],
            "not supported",
        ),
        (
            &[
                "--pipefusion-degree",
                "2",
                "--parallel",
                "auto",
                "--world-size",
                "4",
            ][..],
            "not supported",
        ),
        (
            &["--pipefusion-degree", "2", "--num-pipeline-patch", "3"][..],
            "do not divide by 3",
        ),
        (
            &[
                "--pipefusion-degree",
                "2",
                "--num-pipeline-patch",
                "8",
                "--ring-degree",
                "16",
            ][..],
            "equal pieces",
        ),
    ] {
        let out = ditto(flags);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{flags:?}: {err}");
        assert!(err.contains(want), "{flags:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}
