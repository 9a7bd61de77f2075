//! Step caching (TeaCache, First-Block-Cache): threshold 0 changes nothing, parallel ranks
//! take the same decisions as one rank, the built-in model keeps a measured quality floor,
//! and bad policies are clear errors.

mod common;

use std::process::Command;

use ditto::ir::mesh::Mesh;
use ditto::{CachePolicy, GenerateRequest, Noise, Parallel, Pipeline, TeaCacheRescale};

fn builtin() -> Pipeline {
    Pipeline::builtin().expect("built-in model")
}

/// One class, one seed, CFG: the batch TeaCache and First-Block-Cache decide on.
fn request(class: usize, seed: u64, steps: usize) -> GenerateRequest {
    GenerateRequest::classes(vec![class])
        .with_noise(Noise::Seed(seed))
        .with_steps(steps)
        .with_guidance(3.0)
}

fn psnr(reference: &ditto::Generation, run: &ditto::Generation) -> f64 {
    ditto::quality::distance(&reference.image.data, &run.image.data).psnr_db
}

#[test]
fn threshold_zero_changes_nothing() {
    let mut pipe = builtin();
    let req = request(2, 7, 12);
    let plain = pipe.generate(&req).expect("uncached");
    let none = pipe.cache_report().expect("report").clone();
    assert_eq!(none.policy, CachePolicy::None);
    assert_eq!(none.computed, vec![true; 12]);
    for policy in [
        CachePolicy::TeaCache { threshold: 0.0 },
        CachePolicy::FirstBlock { threshold: 0.0 },
    ] {
        let cached = pipe
            .generate(&req.clone().with_cache(policy.clone()))
            .expect("cached");
        let report = pipe.cache_report().expect("report");
        assert_eq!(report.computed, vec![true; 12], "{policy}");
        // The parts chain to the very arithmetic of the whole forward: bit-equal.
        assert_eq!(cached.latents, plain.latents, "{policy}");
    }
}

#[test]
fn a_cache_skips_steps_and_stays_close() {
    let mut pipe = builtin();
    let req = request(0, 1, 20);
    let plain = pipe.generate(&req).expect("uncached");
    for policy in [
        CachePolicy::TeaCache { threshold: 0.02 },
        CachePolicy::FirstBlock { threshold: 0.1 },
    ] {
        let cached = pipe
            .generate(&req.clone().with_cache(policy.clone()))
            .expect("cached");
        let report = pipe.cache_report().expect("report").clone();
        assert_eq!(report.computed.len(), 20);
        assert!(report.computed[0], "{policy}: the first step always runs");
        assert!(
            report.computed_steps() < 20,
            "{policy}: nothing skipped: {report:?}"
        );
        if let CachePolicy::TeaCache { .. } = policy {
            assert!(report.computed[19], "TeaCache always runs the last step");
            assert!(report.rescale.as_deref().unwrap().contains("built-in"));
        }
        let p = psnr(&plain, &cached);
        eprintln!(
            "{policy}: {} of 20 computed, PSNR {p:.2} dB",
            report.computed_steps()
        );
        assert!(p.is_finite() && p > 20.0, "{policy}: PSNR {p}");
    }
}

/// The recommended thresholds (README) keep the built-in model at >= 30 dB PSNR against the
/// uncached run while skipping steps, on these measured classes and seeds (DDIM 20 steps,
/// guidance 3; they measured 35.7 / 38.6 / 42.5 / 39.9 dB with TeaCache and 35.7 / 38.8 /
/// 44.6 / 40.9 dB with First-Block-Cache, 2 of 20 steps skipped). Not every seed does:
/// class 0 seed 3 falls to 24 dB (see the README's table). Numbers, not timings.
#[test]
fn recommended_thresholds_keep_30_db() {
    let mut pipe = builtin();
    for (class, seed) in [(0, 0), (1, 1), (2, 1), (3, 1)] {
        let req = request(class, seed, 20);
        let plain = pipe.generate(&req).expect("uncached");
        for policy in [
            CachePolicy::TeaCache {
                threshold: TEACACHE_30DB,
            },
            CachePolicy::FirstBlock {
                threshold: FBCACHE_30DB,
            },
        ] {
            let cached = pipe
                .generate(&req.clone().with_cache(policy.clone()))
                .expect("cached");
            let n = pipe.cache_report().expect("report").computed_steps();
            let p = psnr(&plain, &cached);
            eprintln!("class {class} seed {seed} {policy}: {n}/20 computed, {p:.2} dB");
            assert!(n < 20, "{policy}: skipped nothing");
            assert!(
                p >= 30.0,
                "class {class} seed {seed} {policy}: PSNR {p:.2} dB"
            );
        }
    }
}

const TEACACHE_30DB: f64 = 0.005;
const FBCACHE_30DB: f64 = 0.05;

fn assert_close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len());
    let max = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(max <= tol, "{what}: max abs diff {max}");
}

/// Every part is compiled with the pipeline's layout (sequence-parallel and CFG-parallel);
/// outputs are gathered, so every rank decides on the same tensors: the same steps are
/// skipped as with one rank, the first step's output equals the whole parallel forward's
/// within 1e-5, and the final latents stay within rounding of the 1-rank cached run (ring
/// attention's online softmax and the CFG halves' GEMMs round differently; over a whole
/// generation that alone reaches ~1e-4).
#[test]
fn parallel_ranks_take_the_same_decisions() {
    let req = request(1, 3, 16);
    let first_sample = |pipe: &mut Pipeline, req: &GenerateRequest| {
        let mut first = None;
        let out = pipe
            .generate_with(req, &mut |p| {
                if let ditto::Progress::Forward {
                    step: 0, outputs, ..
                } = p
                {
                    first = Some(outputs["sample"].clone());
                }
            })
            .expect("generate");
        (out, first.expect("step 0 reported"))
    };
    let meshes = [
        (
            "ulysses 2",
            Mesh {
                cfg: 1,
                ring: 1,
                ulysses: 2,
            },
        ),
        (
            "ring 2",
            Mesh {
                cfg: 1,
                ring: 2,
                ulysses: 1,
            },
        ),
        // The parts cut out of the model find the CFG batch on their carried streams.
        (
            "cfg 2",
            Mesh {
                cfg: 2,
                ring: 1,
                ulysses: 1,
            },
        ),
        (
            "cfg 2 x ulysses 2",
            Mesh {
                cfg: 2,
                ring: 1,
                ulysses: 2,
            },
        ),
    ];
    let uncached_serial = builtin().generate(&req).expect("1 rank");
    for policy in [
        CachePolicy::TeaCache { threshold: 0.02 },
        CachePolicy::FirstBlock { threshold: 0.1 },
    ] {
        let creq = req.clone().with_cache(policy.clone());
        let mut one = builtin();
        let (serial, serial_first) = first_sample(&mut one, &creq);
        let serial_report = one.cache_report().expect("report").clone();
        assert!(
            serial_report.computed_steps() < 16,
            "{policy}: nothing skipped"
        );
        for (name, mesh) in meshes {
            let parallel = Parallel {
                mesh,
                ..Default::default()
            };
            let mut pipe = builtin().with_parallel(parallel.clone());
            let (out, first) = first_sample(&mut pipe, &creq);
            let report = pipe.cache_report().expect("report");
            assert_eq!(report.computed, serial_report.computed, "{policy} {name}");
            let (uncached, uncached_first) =
                first_sample(&mut builtin().with_parallel(parallel), &req);
            // The cached parts compute what the whole parallel forward does.
            assert_close(&first.data, &uncached_first.data, 1e-5, name);
            eprintln!(
                "{name}: first-step sample vs 1 rank: cached {:e}, whole forward {:e}",
                max_diff(&first.data, &serial_first.data),
                max_diff(&uncached_first.data, &serial_first.data)
            );
            let drift = max_diff(&uncached.latents.data, &uncached_serial.latents.data);
            eprintln!(
                "{policy} {name}: final latents vs 1 rank: cached {:e}, uncached {drift:e}",
                max_diff(&out.latents.data, &serial.latents.data)
            );
            // Rounding only: batch halves and split rows change GEMM blocking, and a cache
            // reusing a residual carries its step's rounding on.
            let scale = serial
                .latents
                .data
                .iter()
                .fold(0.0f32, |a, x| a.max(x.abs()));
            assert_close(
                &out.latents.data,
                &serial.latents.data,
                1e-4 * scale + 2.0 * drift,
                name,
            );
        }
    }
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max)
}

/// Displaced attention keeps per-program K/V across steps, which skipped steps would leave
/// behind: refused clearly.
#[test]
fn displaced_attention_caching_is_a_clear_error() {
    let mut pipe = builtin().with_parallel(Parallel {
        mesh: Mesh {
            cfg: 1,
            ring: 1,
            ulysses: 2,
        },
        stale: Some(ditto::StaleConfig {
            pcpp_portion: None,
            warmup_steps: 1,
        }),
        ..Default::default()
    });
    let e = pipe
        .generate(&request(0, 0, 3).with_cache(CachePolicy::TeaCache { threshold: 0.1 }))
        .expect_err("stale")
        .to_string();
    assert!(e.contains("displaced attention"), "{e}");
}

/// One process per rank: every process takes its decisions alone, from the gathered part
/// outputs. Had two of them disagreed, one would wait in a collective the other never
/// joins (and fail at the timeout); instead they finish with the in-process result and
/// report the same skipped steps.
#[cfg(target_os = "linux")]
#[test]
fn launched_ranks_agree() {
    let dir = tempfile::tempdir().expect("tmp");
    let args = |name: &str| -> Vec<String> {
        [
            "generate",
            "--steps",
            "12",
            "--num-samples",
            "1",
            "--class-label",
            "1",
            "--seed",
            "3",
            "--ring-degree",
            "2",
            "--cache",
            "teacache:0.02",
            "--timeout",
            "30",
            "--report",
            "--out",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([
            dir.path().join(format!("{name}.png")).display().to_string(),
            "--save-latents".into(),
            dir.path()
                .join(format!("{name}.safetensors"))
                .display()
                .to_string(),
        ])
        .collect()
    };
    let threads = Command::new(env!("CARGO_BIN_EXE_ditto"))
        .args(args("threads"))
        .output()
        .expect("run ditto");
    assert!(
        threads.status.success(),
        "{}",
        String::from_utf8_lossy(&threads.stderr)
    );
    let launched = Command::new(env!("CARGO_BIN_EXE_ditto"))
        .args(["launch", "--nproc-per-node", "2", "--"])
        .args(args("launched"))
        .output()
        .expect("run ditto launch");
    let stdout = String::from_utf8_lossy(&launched.stdout);
    assert!(
        launched.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&launched.stderr)
    );
    let skipped = |out: &str| {
        out.lines()
            .find_map(|l| l.split_once("skipped steps: ").map(|(_, s)| s.to_string()))
            .expect("skipped steps line")
    };
    let want = skipped(&String::from_utf8_lossy(&threads.stdout));
    assert_ne!(want, "none");
    assert_eq!(skipped(&stdout), want, "{stdout}");
    let a = ditto::read_tensors(&dir.path().join("threads.safetensors")).expect("threads");
    let b = ditto::read_tensors(&dir.path().join("launched.safetensors")).expect("launched");
    assert_close(
        &b["latents"].data,
        &a["latents"].data,
        1e-5,
        "launched vs threads",
    );
}

#[test]
fn first_block_cache_on_every_family() {
    // The text-conditioned fixtures: SD3 (the last block drops the text stream), Flux (the
    // double blocks' two streams continue as one joint stream), PixArt (cross-attention).
    for name in ["pixart-pipeline", "sd3-pipeline", "flux-pipeline"] {
        let dir = common::fixture(name);
        let mut pipe = Pipeline::load(&dir).expect("load");
        let prompt = ditto::PromptEmbeds::read(&dir.join("prompt.safetensors")).expect("prompt");
        let mut req = GenerateRequest::prompt(prompt).with_steps(6);
        if name == "flux-pipeline" {
            // Its VAE is slow at the default size; the transformer's parts are the same.
            req = req.with_size(32, 32);
        }
        let plain = pipe.generate(&req).expect("plain");
        for policy in [
            CachePolicy::TeaCache { threshold: 0.0 },
            CachePolicy::FirstBlock { threshold: 0.0 },
        ] {
            let out = pipe
                .generate(&req.clone().with_cache(policy.clone()))
                .unwrap_or_else(|e| panic!("{name} {policy}: {e}"));
            assert_eq!(out.latents, plain.latents, "{name} {policy}");
        }
        // A huge threshold skips every step it may (TeaCache: all but the first and last).
        let out = pipe
            .generate(
                &req.clone()
                    .with_cache(CachePolicy::TeaCache { threshold: 1e9 }),
            )
            .expect("teacache");
        let r = pipe.cache_report().expect("report");
        assert_eq!(
            r.computed,
            vec![true, false, false, false, false, true],
            "{name}"
        );
        assert!(out.latents.data.iter().all(|v| v.is_finite()));
        let out = pipe
            .generate(
                &req.clone()
                    .with_cache(CachePolicy::FirstBlock { threshold: 1e9 }),
            )
            .expect("fbcache");
        let r = pipe.cache_report().expect("report");
        // Step 1 compares with step 0's residuals and may skip already.
        assert_eq!(
            r.computed,
            vec![true, false, false, false, false, false],
            "{name}"
        );
        assert!(out.latents.data.iter().all(|v| v.is_finite()));
    }
}

#[test]
fn bad_policies_are_clear_errors() {
    let mut pipe = builtin();
    let e = pipe
        .generate(&request(0, 0, 2).with_cache(CachePolicy::TeaCache { threshold: -1.0 }))
        .expect_err("negative threshold")
        .to_string();
    assert!(e.contains("non-negative"), "{e}");
    let e = pipe
        .generate(&request(0, 0, 2).with_cache(CachePolicy::FirstBlock {
            threshold: f64::NAN,
        }))
        .expect_err("NaN threshold")
        .to_string();
    assert!(e.contains("non-negative"), "{e}");

    let dir = tempfile::tempdir().expect("tmp");
    for (args, want) in [
        (
            &["--cache", "magic:0.1"][..],
            "unknown cache policy `magic:0.1`",
        ),
        (&["--cache", "teacache:-0.5"][..], "non-negative"),
        (&["--cache", "fbcache"][..], "needs a threshold"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_ditto"))
            .arg("generate")
            .args(args)
            .arg("--out")
            .arg(dir.path().join("x.png"))
            .output()
            .expect("run ditto");
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    // A broken polynomial file names itself.
    let bad = dir.path().join("teacache.json");
    std::fs::write(&bad, r#"{"coefficients": []}"#).expect("write");
    let e = TeaCacheRescale::read(&bad).expect_err("empty").to_string();
    assert!(
        e.contains("teacache.json") && e.contains("coefficients"),
        "{e}"
    );
}

#[test]
fn cli_reports_computed_and_skipped_steps() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = Command::new(env!("CARGO_BIN_EXE_ditto"))
        .args([
            "generate",
            "--steps",
            "10",
            "--num-samples",
            "1",
            "--class-label",
            "0",
            "--cache",
            "fbcache:0.1",
            "--report",
            "--compare-serial",
            "--out",
        ])
        .arg(dir.path().join("x.png"))
        .output()
        .expect("run ditto");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("cache fbcache:0.1:"), "{stdout}");
    assert!(stdout.contains("skipped steps:"), "{stdout}");
    assert!(stdout.contains("computed"), "{stdout}");
    assert!(stdout.contains("vs serial: image PSNR"), "{stdout}");
    // One table row per step.
    let rows = stdout
        .lines()
        .filter(|l| l.contains(" computed ") || l.contains(" skipped "))
        .count();
    assert!(rows >= 10, "{stdout}");
}

/// The measurement behind the README's table: threshold -> steps computed -> PSNR against
/// the uncached run, both policies, DDIM 20 and 50 steps, guidance 3, classes 0..3 x seeds
/// 0..3 one at a time. `cargo test --release --test cache -- --ignored --nocapture`.
#[test]
#[ignore]
fn measure_thresholds() {
    let mut pipe = builtin();
    let runs: Vec<(usize, u64)> = (0..4).flat_map(|c| (0..4).map(move |s| (c, s))).collect();
    for steps in [20, 50] {
        let plain: Vec<ditto::Generation> = runs
            .iter()
            .map(|&(c, s)| pipe.generate(&request(c, s, steps)).expect("plain"))
            .collect();
        for (policy_name, thresholds) in [
            (
                "teacache",
                &[0.0, 0.002, 0.003, 0.005, 0.01, 0.02, 0.05, 0.1][..],
            ),
            ("fbcache", &[0.0, 0.02, 0.03, 0.05, 0.08, 0.1, 0.2, 0.5][..]),
        ] {
            println!("\n{policy_name}, {steps} steps: threshold | computed steps (mean, min..max) | PSNR dB (mean over non-identical runs, min) | runs identical to uncached");
            for &t in thresholds {
                let policy: CachePolicy = format!("{policy_name}:{t}").parse().unwrap();
                let mut computed = Vec::new();
                let mut psnrs = Vec::new();
                for (i, &(c, s)) in runs.iter().enumerate() {
                    let out = pipe
                        .generate(&request(c, s, steps).with_cache(policy.clone()))
                        .expect("cached");
                    computed.push(pipe.cache_report().unwrap().computed_steps());
                    psnrs.push(psnr(&plain[i], &out));
                }
                let mean_c = computed.iter().sum::<usize>() as f64 / computed.len() as f64;
                let finite: Vec<f64> = psnrs.iter().copied().filter(|p| p.is_finite()).collect();
                let identical = psnrs.len() - finite.len();
                let mean_p = if finite.is_empty() {
                    "inf".to_string()
                } else {
                    format!("{:.2}", finite.iter().sum::<f64>() / finite.len() as f64)
                };
                let min_p = psnrs.iter().copied().fold(f64::INFINITY, f64::min);
                println!(
                    "| {t} | {mean_c:.1} ({}..{}) | {mean_p} | {min_p:.2} | {identical} |",
                    computed.iter().min().unwrap(),
                    computed.iter().max().unwrap()
                );
            }
        }
    }
}
