//! `ditto analyze`: the recorded changes equal a direct computation on the same tensors; the
//! CLI writes the CSV, the summary and the SVG plots (checked by content) for the built-in
//! model and a text-conditioned fixture; `--fit-teacache` installs a polynomial that
//! `generate` then uses; bad input gives clear errors.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ditto::analyze::{self, AnalyzeOptions, Change, Condition};
use ditto::ir::cut::Span;
use ditto::parallel::RankOptions;
use ditto::{
    CompileOptions, GenerateRequest, HostTensor, Noise, Pipeline, Progress, Shapes,
    TimestepSchedule,
};

fn ditto(args: &[&str], extra: &[&Path]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ditto"))
        .args(args)
        .args(extra)
        .output()
        .expect("run ditto")
}

fn ok(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn failure(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// CSV rows as maps, after checking the header.
fn read_csv(path: &Path) -> Vec<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(path).expect("redundancy.csv");
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().expect("header").split(',').collect();
    assert_eq!(
        header,
        [
            "model",
            "condition",
            "seed",
            "steps",
            "layer",
            "tensor",
            "step",
            "l1",
            "rel_l1"
        ]
    );
    lines
        .map(|l| {
            let cells: Vec<&str> = l.split(',').collect();
            assert_eq!(cells.len(), header.len(), "{l}");
            header
                .iter()
                .zip(cells)
                .map(|(h, c)| (h.to_string(), c.to_string()))
                .collect()
        })
        .collect()
}

/// The analysis of class 2, seed 5, 5 steps recorded by the library, against the taps
/// computed here by a separately compiled program on the inputs of steps 2 and 3 (the
/// latents the plain pipeline reports), and mean|a - b|, mean|a - b| / mean|a| by hand.
#[test]
fn recorded_changes_equal_a_direct_computation() {
    let (class, seed, steps) = (2usize, 5u64, 5usize);
    let mut pipe = Pipeline::builtin().expect("builtin");
    let opts = AnalyzeOptions {
        conditions: vec![Condition::Class {
            label: class,
            name: String::new(),
        }],
        seeds: vec![seed],
        steps: vec![steps],
        guidance: Some(3.0),
        height: None,
        width: None,
        timesteps: TimestepSchedule::Pipeline,
    };
    let mut calls = 0;
    let analysis = analyze::record(&mut pipe, &opts, &mut |done, total| {
        calls += 1;
        assert_eq!(total, steps);
        assert_eq!(done, calls);
    })
    .expect("record");
    assert_eq!(calls, steps);
    assert_eq!(analysis.runs.len(), 1);
    assert_eq!(analysis.runs[0].condition, "class 2");
    // Every series has a change per step after the first.
    for curve in &analysis.changes[0] {
        assert_eq!(curve.len(), steps - 1);
    }

    // The latents entering each step, and the timesteps, from a plain run.
    let mut entering: Vec<HostTensor> = vec![HostTensor::new(
        vec![1, 3, 32, 32],
        ditto::pipeline::torch_randn(3072, seed),
    )];
    let req = GenerateRequest::classes(vec![class])
        .with_noise(Noise::Seed(seed))
        .with_steps(steps)
        .with_guidance(3.0);
    let gen = Pipeline::builtin()
        .expect("builtin")
        .generate_with(&req, &mut |p| {
            if let Progress::Step { latents, .. } = p {
                entering.push(latents.clone());
            }
        })
        .expect("plain run");
    assert_eq!(entering.len(), steps + 1);

    let model = pipe.transformer_model();
    let shapes = Shapes {
        batch: 2,
        height: 32,
        width: 32,
        text_len: 0,
    };
    let taps = [
        "transformer_blocks.3.attn1.k_img",
        "transformer_blocks.0.modulated_input",
    ];
    let graph = model
        .part_graph(
            &shapes,
            Span {
                from: None,
                to: None,
            },
            &taps,
        )
        .expect("graph");
    let mut ranks = model
        .ranks_for_graph(graph, &CompileOptions::default(), RankOptions::default())
        .expect("compile");
    let mut outputs_at = |step: usize| {
        let lat = &entering[step];
        let mut hs = lat.data.clone();
        hs.extend_from_slice(&lat.data);
        let t = gen.timesteps[step];
        let inputs = BTreeMap::from([
            (
                "hidden_states".to_string(),
                HostTensor::new(vec![2, 3, 32, 32], hs),
            ),
            ("timestep".to_string(), HostTensor::new(vec![2], vec![t, t])),
            // CFG: [null class, class]; the null class is num_embeds_ada_norm = 4.
            (
                "class_labels".to_string(),
                HostTensor::new(vec![2], vec![4.0, class as f32]),
            ),
        ]);
        ranks.run(&inputs).expect("run").0
    };
    let (a, b) = (outputs_at(2), outputs_at(3));
    let by_hand = |x: &HostTensor, y: &HostTensor| {
        let n = x.data.len() as f64;
        let diff: f64 = x
            .data
            .iter()
            .zip(&y.data)
            .map(|(p, q)| (*q as f64 - *p as f64).abs())
            .sum::<f64>()
            / n;
        let base: f64 = x.data.iter().map(|p| (*p as f64).abs()).sum::<f64>() / n;
        (diff, diff / base)
    };
    for name in taps.iter().copied().chain(["sample"]) {
        let (l1, rel) = by_hand(&a[name], &b[name]);
        let s = analysis
            .series
            .iter()
            .position(|s| s == &analyze::Series::from_output(name))
            .unwrap_or_else(|| panic!("no series {name}"));
        // changes[t - 1] is the change from step t - 1 to step t.
        let got: Change = analysis.changes[0][s][2];
        eprintln!("{name}: recorded {got:?}, by hand l1 {l1:e} rel {rel:e}");
        assert!(l1 > 0.0);
        assert!(
            (got.l1 - l1).abs() <= 1e-5 * l1,
            "{name}: l1 {} vs {l1}",
            got.l1
        );
        assert!(
            (got.rel_l1 - rel).abs() <= 1e-5 * rel,
            "{name}: rel_l1 {} vs {rel}",
            got.rel_l1
        );
    }
    // The CSV holds the same numbers.
    let csv = analysis.csv();
    let line = csv
        .lines()
        .find(|l| l.contains(",transformer_blocks.3.attn1,k_img,3,"))
        .expect("csv row");
    let cells: Vec<&str> = line.split(',').collect();
    let s = analysis
        .series
        .iter()
        .position(|s| s.layer == "transformer_blocks.3.attn1" && s.tensor == "k_img")
        .expect("series");
    assert_eq!(
        cells[7].parse::<f64>().unwrap(),
        analysis.changes[0][s][2].l1
    );
    assert_eq!(
        cells[8].parse::<f64>().unwrap(),
        analysis.changes[0][s][2].rel_l1
    );
}

fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("analyze-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch");
    dir
}

#[test]
fn cli_analyzes_the_builtin_model() {
    let out = scratch("builtin");
    let stdout = ok(&ditto(
        &[
            "analyze",
            "--class-label",
            "0,square",
            "--seeds",
            "0,1",
            "--steps",
            "4,6",
            "--out",
        ],
        &[&out],
    ));
    assert!(
        stdout.contains("stability across prompts/seeds"),
        "{stdout}"
    );
    assert!(
        stdout.contains("stability across step counts [4, 6]"),
        "{stdout}"
    );

    let rows = read_csv(&out.join("redundancy.csv"));
    // 2 classes x 2 seeds x (3 + 5 changes) per series.
    let series: std::collections::BTreeSet<(String, String)> = rows
        .iter()
        .map(|r| (r["layer"].clone(), r["tensor"].clone()))
        .collect();
    assert_eq!(rows.len(), series.len() * 2 * 2 * (3 + 5));
    // 6 blocks: K, V, output of each attention, modulated input and output of each block,
    // and the model output.
    assert_eq!(series.len(), 6 * 5 + 1);
    for tensor in ["k_img", "v_img", "out_img", "modulated_input", "block_out"] {
        assert!(
            series.contains(&("transformer_blocks.5.attn1".into(), tensor.into()))
                || series.contains(&("transformer_blocks.5".into(), tensor.into())),
            "{tensor}"
        );
    }
    assert!(series.contains(&("model".into(), "sample".into())));
    let conds: std::collections::BTreeSet<&str> =
        rows.iter().map(|r| r["condition"].as_str()).collect();
    assert_eq!(
        conds,
        ["class 0 circle", "class 1 square"].into_iter().collect()
    );
    for r in &rows {
        assert_eq!(r["model"], "built-in shapes-dit");
        let l1: f64 = r["l1"].parse().expect("l1");
        let rel: f64 = r["rel_l1"].parse().expect("rel_l1");
        assert!(l1.is_finite() && l1 > 0.0, "{r:?}");
        assert!(rel.is_finite() && rel > 0.0, "{r:?}");
        let step: usize = r["step"].parse().expect("step");
        let steps: usize = r["steps"].parse().expect("steps");
        assert!((1..steps).contains(&step));
    }

    let summary = std::fs::read_to_string(out.join("summary.txt")).expect("summary.txt");
    assert!(summary.contains("8 run(s)"), "{summary}");
    assert!(
        summary.contains("k_img, 4 steps: mean rel_l1 per layer"),
        "{summary}"
    );
    assert!(summary.contains("most redundant layer"), "{summary}");
    assert!(
        summary.contains("  transformer_blocks.2.attn1 |"),
        "{summary}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap())
            .expect("summary.json");
    let across = json["across_runs"].as_array().expect("across_runs");
    assert_eq!(across.len(), series.len() * 2);
    for s in across {
        let cv = s["cv_across_runs"].as_f64().expect("cv with 4 runs");
        assert!(cv.is_finite() && cv >= 0.0, "{s}");
        assert_eq!(s["runs"], 4);
    }
    assert_eq!(
        json["across_steps"].as_array().expect("across_steps").len(),
        series.len()
    );

    // Plots: per tensor and step count, curves and a heatmap, with their text.
    for tensor in [
        "k_img",
        "v_img",
        "out_img",
        "modulated_input",
        "block_out",
        "sample",
    ] {
        for steps in [4, 6] {
            let curves =
                std::fs::read_to_string(out.join(format!("curves_{tensor}_{steps}steps.svg")))
                    .expect("curves svg");
            assert!(curves.starts_with("<svg"), "{tensor}");
            assert!(curves.contains(&format!(
                "{tensor}: rel. L1 change per step ({steps} steps)"
            )));
            assert!(curves.contains("step t (change from t-1)"));
            assert!(
                curves.contains("<polyline") || curves.contains("<path"),
                "{tensor}"
            );
            let heat =
                std::fs::read_to_string(out.join(format!("heatmap_{tensor}_{steps}steps.svg")))
                    .expect("heatmap svg");
            assert!(heat.contains("<text"));
            let cells = heat.matches("<rect").count();
            let layers = if tensor == "sample" { 1 } else { 6 };
            assert!(cells >= layers * (steps - 1), "{tensor}: {cells} rects");
            if tensor == "k_img" {
                for l in 0..6 {
                    assert!(
                        heat.contains(&format!("transformer_blocks.{l}.attn1")),
                        "{l}"
                    );
                }
            }
        }
    }
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).expect("mkdir");
    for entry in std::fs::read_dir(src).expect("read_dir") {
        let entry = entry.expect("entry");
        let to = dst.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &to);
        } else {
            std::fs::copy(entry.path(), &to).expect("copy");
        }
    }
}

/// PixArt: cross-attention keys and values are the caption's, constant over the steps
/// (l1 exactly 0); self-attention's change. Then `--fit-teacache` installs a polynomial
/// next to the transformer config, and `generate --cache teacache:T` picks it up.
#[test]
fn cli_analyzes_a_text_fixture_and_fits_teacache() {
    let base = scratch("pixart");
    let model = base.join("pixart-pipeline");
    copy_dir(&common::fixture("pixart-pipeline"), &model);
    let prompt = model.join("prompt.safetensors");
    let out = base.join("out");
    let stdout = ok(&ditto(
        &[
            "analyze",
            "--steps",
            "7",
            "--seeds",
            "0,1",
            "--fit-teacache",
            "--model",
        ],
        &[
            &model,
            Path::new("--prompt-embeds"),
            &prompt,
            Path::new("--out"),
            &out,
        ],
    ));
    assert!(stdout.contains("TeaCache polynomial"), "{stdout}");
    assert!(stdout.contains("installed as"), "{stdout}");

    let rows = read_csv(&out.join("redundancy.csv"));
    assert!(rows.iter().all(|r| r["condition"] == "prompt"));
    let of = |tensor: &str| -> Vec<f64> {
        rows.iter()
            .filter(|r| r["tensor"] == tensor)
            .map(|r| r["l1"].parse().unwrap())
            .collect()
    };
    let k_txt = of("k_txt");
    assert!(!k_txt.is_empty());
    assert!(
        k_txt.iter().all(|&v| v == 0.0),
        "caption keys changed: {k_txt:?}"
    );
    assert!(of("v_txt").iter().all(|&v| v == 0.0));
    assert!(of("k_img").iter().all(|&v| v > 0.0));
    assert!(of("out_img").iter().all(|&v| v > 0.0));

    let fitted = out.join("teacache.json");
    let installed = model.join("transformer/teacache.json");
    for path in [&fitted, &installed] {
        let r = ditto::TeaCacheRescale::read(path).expect("teacache.json");
        assert_eq!(r.coefficients.len(), 5);
        assert_eq!(r.fit.as_ref().unwrap()["pairs"], 2 * 5);
    }
    let png = base.join("x.png");
    let stdout = ok(&ditto(
        &[
            "generate",
            "--steps",
            "7",
            "--cache",
            "teacache:0.1",
            "--model",
        ],
        &[
            &model,
            Path::new("--prompt-embeds"),
            &prompt,
            Path::new("--out"),
            &png,
        ],
    ));
    assert!(
        stdout.contains(&format!("rescale: {}", installed.display())),
        "{stdout}"
    );
    // Without a fitted polynomial: the identity, and the output says so.
    std::fs::remove_file(&installed).expect("rm");
    let stdout = ok(&ditto(
        &[
            "generate",
            "--steps",
            "3",
            "--cache",
            "teacache:0.1",
            "--model",
        ],
        &[
            &model,
            Path::new("--prompt-embeds"),
            &prompt,
            Path::new("--out"),
            &png,
        ],
    ));
    assert!(stdout.contains("rescale: identity"), "{stdout}");
}

#[test]
fn bad_input_is_a_clear_error() {
    let out = scratch("errors");
    let e = failure(&ditto(
        &["analyze", "--steps", "3", "--fit-teacache", "--out"],
        &[&out],
    ));
    assert!(e.contains("--fit-teacache needs at least 7 steps"), "{e}");
    let e = failure(&ditto(&["analyze", "--steps", "1", "--out"], &[&out]));
    assert!(e.contains("needs at least 2"), "{e}");
    let e = failure(&ditto(
        &["analyze", "--scheduler", "EulerDiscreteScheduler", "--out"],
        &[&out],
    ));
    assert!(e.contains("EulerDiscreteScheduler"), "{e}");
    let sd3 = common::fixture("sd3-pipeline");
    let e = failure(&ditto(
        &["analyze", "--out"],
        &[&out, Path::new("--model"), &sd3],
    ));
    assert!(e.contains("give --prompt-embeds"), "{e}");
    let e = failure(&ditto(
        &["analyze", "--class-label", "1", "--out"],
        &[&out, Path::new("--model"), &sd3],
    ));
    assert!(e.contains("text-conditioned"), "{e}");
    let e = failure(&ditto(
        &["analyze", "--class-label", "hexagon", "--out"],
        &[&out],
    ));
    assert!(e.contains("hexagon"), "{e}");
}

/// Another scheduler: DPM-Solver++ on the built-in model's betas records as well.
#[test]
fn another_scheduler_records_too() {
    let mut pipe = Pipeline::builtin()
        .expect("builtin")
        .with_scheduler("DPMSolverMultistepScheduler")
        .expect("dpm");
    assert_eq!(pipe.scheduler_class(), "DPMSolverMultistepScheduler");
    let opts = AnalyzeOptions {
        conditions: vec![Condition::Class {
            label: 0,
            name: "circle".into(),
        }],
        seeds: vec![0],
        steps: vec![3],
        guidance: None,
        height: None,
        width: None,
        timesteps: TimestepSchedule::Pipeline,
    };
    let a = analyze::record(&mut pipe, &opts, &mut |_, _| {}).expect("record");
    assert_eq!(a.runs[0].condition, "class 0 circle");
    assert!(a.rows().all(|r| r.change.l1.is_finite()));
    assert_eq!(a.rows().count(), a.series.len() * 2);
}

#[test]
fn unknown_taps_and_taps_with_a_cache_are_errors() {
    let mut pipe = Pipeline::builtin()
        .expect("builtin")
        .with_taps(vec!["transformer_blocks.9.attn1.k_img".into()]);
    let req = GenerateRequest::classes(vec![0]).with_steps(2);
    let e = pipe.generate(&req).expect_err("unknown tap").to_string();
    assert!(
        e.contains("exposes no value `transformer_blocks.9.attn1.k_img`"),
        "{e}"
    );
    let names = pipe.tap_names().expect("names");
    assert_eq!(names[0], "transformer_blocks.0.modulated_input");
    assert!(names.contains(&"transformer_blocks.5.block_out".to_string()));
    let mut pipe = pipe.with_taps(vec![names[1].clone()]);
    let e = pipe
        .generate(
            &req.clone()
                .with_cache(ditto::CachePolicy::FirstBlock { threshold: 0.1 }),
        )
        .expect_err("taps + cache")
        .to_string();
    assert!(e.contains("compute every step"), "{e}");
    // The tap reaches the progress callback every step.
    let mut seen = Vec::new();
    pipe.generate_with(&req, &mut |p| {
        if let Progress::Forward {
            step,
            outputs,
            computed,
        } = p
        {
            assert!(computed);
            assert!(outputs.contains_key("sample"));
            seen.push((step, outputs.contains_key(&names[1])));
        }
    })
    .expect("tapped run");
    assert_eq!(seen, vec![(0, true), (1, true)]);
}
