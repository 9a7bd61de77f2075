//! Displaced patch parallelism (DistriFusion, PCPP) on whole generations of the built-in
//! model and on the fixture families: exact when every step is a warmup step, the traffic
//! of a step against the analytic volumes, the quality of 1 warmup step against the serial
//! run, and the 1-part / M-part programs PipeFusion shares a state between.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::{fixture, random_inputs};
use ditto::codegen::{Program, SeqMethod, Step};
use ditto::ir::mesh::{Mesh, MeshAxis};
use ditto::parallel::RankOptions;
use ditto::passes::MethodChoice;
use ditto::quality::per_sample;
use ditto::runtime::comm::CommStats;
use ditto::runtime::cpu::executor::CpuExecutor;
use ditto::runtime::parallel::stale::{edge_rows, StaleMode, StaleState};
use ditto::{
    CompileOptions, GenerateRequest, Generation, HostTensor, Model, Noise, Parallel, Pipeline,
    StaleConfig,
};

/// DistriFusion (PCPP with a portion) over `sp` ranks, times the CFG pair when `cfg`.
fn stale(sp: usize, cfg: bool, pcpp: Option<f32>, warmup_steps: usize) -> Parallel {
    Parallel {
        mesh: Mesh {
            cfg: if cfg { 2 } else { 1 },
            ring: sp,
            ulysses: 1,
        },
        stale: Some(StaleConfig {
            pcpp_portion: pcpp,
            warmup_steps,
        }),
        ..Parallel::default()
    }
}

/// The same with each patch split over `u` Ulysses ranks (exact inside a patch).
fn with_ulysses(mut p: Parallel, u: usize) -> Parallel {
    p.mesh.ulysses = u;
    p
}

/// Classes 0..4 with `seeds` seeds each (DDIM 20 steps, guidance 3: the built-in defaults).
fn request(seeds: &[u64]) -> GenerateRequest {
    let labels: Vec<usize> = (0..4).flat_map(|c| seeds.iter().map(move |_| c)).collect();
    let noise: Vec<u64> = (0..4).flat_map(|_| seeds.iter().copied()).collect();
    GenerateRequest::classes(labels).with_noise(Noise::Seeds(noise))
}

fn generate(req: &GenerateRequest, parallel: Parallel) -> Generation {
    Pipeline::builtin()
        .unwrap()
        .with_parallel(parallel)
        .generate(req)
        .unwrap()
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn all_warmup_steps_equal_the_serial_generation() {
    let req = request(&[0]).with_steps(6);
    let serial = generate(&req, Parallel::default());
    for (what, p) in [
        ("distrifusion 2", stale(2, false, None, 6)),
        ("distrifusion 4", stale(4, false, None, 6)),
        ("pcpp 4", stale(4, false, Some(0.3), 6)),
        ("distrifusion 2 x cfg", stale(2, true, None, 6)),
        (
            "distrifusion 2 x ulysses 2",
            with_ulysses(stale(2, false, None, 6), 2),
        ),
        (
            "distrifusion 2 x ulysses 2 x cfg",
            with_ulysses(stale(2, true, None, 6), 2),
        ),
    ] {
        let g = generate(&req, p);
        let d = max_abs(&serial.latents.data, &g.latents.data);
        eprintln!("{what}: latents max abs diff {d:.2e}");
        assert!(d <= 1e-5, "{what}: {d}");
    }
}

/// The fixture families' forward (one exact run) with displaced attention equals the
/// serial forward: DiT, PixArt (cross-attention to text), SD3 and Flux (joint attention
/// with 5 text tokens that do not divide the degree: padded and masked).
#[test]
fn fixture_families_match_serial_in_exact_mode() {
    for fam in ["dit", "pixart", "sd3", "flux"] {
        let dir = fixture(fam);
        let model = Model::load(&dir).unwrap();
        let inputs: BTreeMap<String, HostTensor> = ditto::read_tensors(&dir.join("io.safetensors"))
            .unwrap()
            .into_iter()
            .filter_map(|(k, v)| k.strip_prefix("input.").map(|k| (k.to_string(), v)))
            .collect();
        let forward = |p: Parallel| {
            let opts = CompileOptions {
                parallel: p,
                verify: true,
                ..Default::default()
            };
            model.forward_with(&inputs, &opts).unwrap()["sample"].clone()
        };
        let serial = forward(Parallel::default());
        let mut layouts = vec![(2, false), (4, false)];
        if inputs["hidden_states"].shape[0] % 2 == 0 {
            layouts.push((2, true));
        }
        for (n, cfg) in layouts {
            let out = forward(stale(n, cfg, None, 1));
            let err = out.max_rel_err(&serial);
            eprintln!("{fam} distrifusion {n} cfg {cfg}: {err:.2e}");
            assert!(err <= 1e-5, "{fam} distrifusion {n} cfg {cfg}: {err}");
        }
    }
}

fn displaced(p: &Program) -> Vec<&Step> {
    p.steps
        .iter()
        .filter(|s| {
            matches!(
                s,
                Step::SeqAttention {
                    method: SeqMethod::Displaced,
                    ..
                }
            )
        })
        .collect()
}

/// What one run of a displaced program sends per rank, by the formulas of ALGORITHMS.md
/// (4 bytes per element): the program's own all-gathers (the output), plus per stale or
/// warmup step the K/V of every displaced attention (`edge` rows per segment to each
/// neighbour for PCPP, else every local row to every other Sp member).
struct Volume {
    gathers: u64,
    gather_calls: u64,
    kv_all_gather: u64,
    pcpp_per_neighbour: u64,
}

fn volume(p: &Program, pcpp: Option<f32>) -> Volume {
    let sp = p.mesh.sp();
    let mut v = Volume {
        gathers: 0,
        gather_calls: 0,
        kv_all_gather: 0,
        pcpp_per_neighbour: 0,
    };
    for s in &p.steps {
        match s {
            Step::AllGather { x, parts, .. } if *parts > 1 => {
                v.gathers += CommStats::all_gather_bytes(p.values[*x].numel(), *parts);
                v.gather_calls += 1;
            }
            Step::SeqAttention {
                method: SeqMethod::Displaced,
                batch,
                sk,
                heads,
                head_dim,
                key_segments,
                ..
            } => {
                let width = heads * head_dim;
                v.kv_all_gather += CommStats::all_gather_bytes(2 * batch * sk * width, sp);
                if let Some(f) = pcpp {
                    let w: usize = key_segments.iter().map(|s| edge_rows(s.local, f)).sum();
                    v.pcpp_per_neighbour += (2 * batch * w * width * 4) as u64;
                }
            }
            _ => {}
        }
    }
    v
}

#[test]
fn traffic_per_step_matches_the_analytic_volume() {
    let pipe = Pipeline::builtin().unwrap();
    let model = pipe.transformer_model();
    let shapes = model.family().default_shapes();
    let summary = model.family().summary(&shapes);
    let blocks = model.graph(&shapes, false).unwrap().num_blocks();
    let inputs = random_inputs(model, &shapes);
    for (n, cfg, pcpp) in [
        (2, false, None),
        (4, false, None),
        (4, true, None),
        (4, false, Some(0.3f32)),
        (2, false, Some(0.5)),
    ] {
        let what = format!("sp {n} cfg {cfg} pcpp {pcpp:?}");
        let opts = CompileOptions {
            parallel: stale(n, cfg, pcpp, 1),
            ..Default::default()
        };
        let mut ranks = model.ranks(&shapes, &opts, RankOptions::default()).unwrap();
        let program = ranks.program().clone();
        let layers = displaced(&program).len();
        assert_eq!(layers, blocks, "{what}: one displaced attention per block");
        let v = volume(&program, pcpp);
        // DistriFusion by hand: every layer's local K and V ([B, S/N, D] each, B the
        // batch of a CFG group) to the N-1 others.
        let b = (shapes.batch / if cfg { 2 } else { 1 }) as u64;
        let s = summary.image_tokens as u64;
        let d = summary.hidden as u64;
        let by_hand = 2 * layers as u64 * b * (s / n as u64) * d * 4 * (n as u64 - 1);
        assert_eq!(v.kv_all_gather, by_hand, "{what}");

        let warm = ranks.run(&inputs).unwrap().1;
        let step = ranks.run(&inputs).unwrap().1;
        let step2 = ranks.run(&inputs).unwrap().1;
        assert_eq!(warm.per_rank.len(), n * if cfg { 2 } else { 1 });
        for (rank, ((w, st), st2)) in warm
            .per_rank
            .iter()
            .zip(&step.per_rank)
            .zip(&step2.per_rank)
            .enumerate()
        {
            let i = program.mesh.index(rank, MeshAxis::Sp);
            // Warmup: two all-gathers (K, V) per layer, synchronously.
            assert_eq!(w.all_gather().bytes, v.gathers + v.kv_all_gather, "{what}");
            assert_eq!(
                w.all_gather().calls,
                v.gather_calls + 2 * layers as u64,
                "{what}"
            );
            assert_eq!(w.send_recv().bytes, 0);
            for st in [st, st2] {
                match pcpp {
                    None => {
                        // Stale: the same bytes, in ONE all-gather of every layer's K/V.
                        assert_eq!(st.all_gather().bytes, w.all_gather().bytes, "{what}");
                        assert_eq!(st.all_gather().calls, v.gather_calls + 1, "{what}");
                        assert_eq!(st.send_recv().bytes, 0);
                    }
                    Some(_) => {
                        // PCPP: 2 w rows of K and V per layer to each neighbour, one
                        // message per neighbour.
                        let neighbours = (i > 0) as u64 + (i + 1 < n) as u64;
                        assert_eq!(st.all_gather().bytes, v.gathers, "{what}");
                        assert_eq!(
                            st.send_recv().bytes,
                            neighbours * v.pcpp_per_neighbour,
                            "{what} rank {rank}"
                        );
                        assert_eq!(st.send_recv().calls, neighbours, "{what} rank {rank}");
                    }
                }
            }
            if rank == 0 {
                eprintln!(
                    "{what}: per rank per step: warmup {} B in {} all-gathers, stale {} B all-gather in {} + {} B send/recv in {}",
                    w.all_gather().bytes,
                    w.all_gather().calls,
                    st.all_gather().bytes,
                    st.all_gather().calls,
                    st.send_recv().bytes,
                    st.send_recv().calls
                );
            }
        }
        // Every rank keeps every member's K/V: 2 x layers x [B, S, D] f32.
        let kv = 2 * layers as u64 * b * s * d * 4;
        assert!(ranks.kv_bytes().iter().all(|&x| x as u64 == kv), "{what}");
        ranks.reset_stale();
        assert!(ranks.kv_bytes().iter().all(|&x| x == 0));
    }
}

/// PipeFusion's programs: a 1-part and an M-part program of the same graph have the same
/// steps, the same displaced attentions in the same order with the same store layout, and
/// an executor of virtual ranks running every patch of the M-part program after an exact
/// run of the 1-part one, with nothing changed in between, reproduces the exact output.
#[test]
fn one_part_and_m_part_programs_share_a_state() {
    let pipe = Pipeline::builtin().unwrap();
    let model = pipe.transformer_model();
    let shapes = model.family().default_shapes();
    let inputs = random_inputs(model, &shapes);
    let compile = |sp: usize| {
        let opts = CompileOptions {
            parallel: Parallel {
                // Virtual patches are ring members.
                mesh: Mesh {
                    cfg: 1,
                    ring: sp,
                    ulysses: 1,
                },
                choice: MethodChoice::Stale,
                ..Parallel::default()
            },
            verify: true,
            ..Default::default()
        };
        let program = model.compile(&shapes, &opts).unwrap().program;
        let weights = model.load_weights(&program).unwrap();
        (Arc::new(program), weights)
    };
    let (one, w1) = compile(1);
    let (many, wm) = compile(4);
    // The same program but for the part count: gathers in the same places too.
    let kinds = |p: &Program| p.steps.iter().map(|s| s.kind()).collect::<Vec<_>>();
    assert_eq!(kinds(&one), kinds(&many));
    let (a, b) = (displaced(&one), displaced(&many));
    assert!(!a.is_empty());
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        let (
            Step::SeqAttention {
                batch: b1,
                heads: h1,
                key_segments: k1,
                ..
            },
            Step::SeqAttention {
                batch: b2,
                heads: h2,
                key_segments: k2,
                ..
            },
        ) = (x, y)
        else {
            unreachable!()
        };
        assert_eq!((b1, h1), (b2, h2));
        let valid = |k: &[ditto::codegen::Segment]| k.iter().map(|s| s.valid).collect::<Vec<_>>();
        assert_eq!(valid(k1), valid(k2));
        assert!(k2.iter().all(|s| s.local * 4 == s.valid));
    }

    let bind = |p: &Program| -> Vec<Vec<f32>> {
        p.inputs
            .iter()
            .map(|b| inputs[&b.name].data.clone())
            .collect()
    };
    let x1 = bind(&one);
    let r1: Vec<&[f32]> = x1.iter().map(|v| v.as_slice()).collect();
    let serial = model
        .session(&shapes, &CompileOptions::default())
        .unwrap()
        .run(&inputs)
        .unwrap()["sample"]
        .clone();
    let mut state = StaleState::default();
    let mut warm = CpuExecutor::new(one.clone(), w1).unwrap();
    let out1 = warm.run_with_state(&r1, &mut state).unwrap();
    let sample = |p: &Program, out: &[Vec<f32>]| {
        let i = p.outputs.iter().position(|(n, _)| n == "sample").unwrap();
        out[i].clone()
    };
    assert!(max_abs(&sample(&one, &out1), &serial.data) <= 1e-5);
    let kv = state.kv_bytes();

    let xm = bind(&many);
    let rm: Vec<&[f32]> = xm.iter().map(|v| v.as_slice()).collect();
    let mut patches = CpuExecutor::virtual_ranks(many.clone(), wm).unwrap();
    state.mode = StaleMode::Stale;
    let mut last = Vec::new();
    for i in 0..4 {
        state.patch = Some(i);
        last = patches.run_with_state(&rm, &mut state).unwrap();
    }
    let d = max_abs(&sample(&many, &last), &serial.data);
    eprintln!("virtual patches after an exact 1-part run: max abs diff {d:.2e}");
    assert!(d <= 1e-5, "{d}");
    assert_eq!(state.kv_bytes(), kv);
}

/// Quality of stale activations on the built-in model (DDIM 20 steps, guidance 3, classes
/// 0..4 x seeds 0..4): per-image PSNR against the serial run of the same seed, mean over the
/// 16 images. Measured with 1 warmup step (`tests/stale_quality.rs` prints the whole
/// table): DistriFusion N=2 27.51 dB (worst image 23.10), N=4 25.80 (21.88), PCPP N=4
/// F=0.3 12.76 (10.96); the CFG pair and Ulysses inside a patch give DistriFusion N=2's
/// numbers exactly. The floors sit a little below. PCPP drops every non-neighbouring patch,
/// which this small 32x32 model (global shapes on 4 patches of 2 token rows) cannot afford.
#[test]
fn one_warmup_step_keeps_the_quality() {
    let req = request(&[0, 1, 2, 3]);
    let serial = generate(&req, Parallel::default());
    let samples = serial.image.shape[0];
    let cases = [
        ("DistriFusion N=2", stale(2, false, None, 1), 27.0),
        ("DistriFusion N=4", stale(4, false, None, 1), 25.5),
        ("PCPP N=4 F=0.3", stale(4, false, Some(0.3f32), 1), 12.5),
        ("DistriFusion N=2 x CFG", stale(2, true, None, 1), 27.0),
        // No warmup: the first step attends to what exists (its own patch).
        (
            "DistriFusion N=4, no warmup",
            stale(4, false, None, 0),
            25.5,
        ),
    ];
    for (what, parallel, floor) in cases {
        let g = generate(&req, parallel);
        let s = per_sample(&serial.image.data, &g.image.data, samples);
        eprintln!(
            "{what}: mean {:.2} dB, worst {:.2} dB",
            s.mean_db, s.worst_db
        );
        assert!(s.mean_db >= floor, "{what}: {:.2} dB < {floor}", s.mean_db);
        assert!(s.mean_db < 90.0, "{what}: identical to serial");
    }
}

fn ditto_cli(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_ditto"))
        .args(args)
        .output()
        .expect("run ditto")
}

/// `--distrifusion-degree` in-process and as a multi-process launch (each process keeping
/// its own rank's K/V across steps) give the same generation, and the flag combinations
/// that cannot work are clear errors.
#[test]
fn cli_distrifusion_threads_and_processes_agree() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let args = |name: &str, warmup: usize| -> Vec<String> {
        let warmup = warmup.to_string();
        [
            "generate",
            "--steps",
            "4",
            "--num-samples",
            "1",
            "--distrifusion-degree",
            "2",
            "--warmup-steps",
            &warmup,
            "--out",
            &path(&format!("{name}.png")),
            "--save-latents",
            &path(&format!("{name}.safetensors")),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let run = |args: Vec<String>| {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = ditto_cli(&a);
        assert!(
            out.status.success(),
            "{a:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(args("threads", 1));
    let mut launched = vec![
        "launch".to_string(),
        "--nproc-per-node".into(),
        "2".into(),
        "--".into(),
    ];
    launched.extend(args("launched", 1));
    run(launched);
    // Ulysses inside each patch, one process per rank: exact inside, so the same result.
    let mut ulysses = vec![
        "launch".to_string(),
        "--nproc-per-node".into(),
        "4".into(),
        "--".into(),
    ];
    ulysses.extend(args("ulysses", 1));
    ulysses.extend(["--ulysses-degree".to_string(), "2".into()]);
    run(ulysses);
    run(args("exact", 4));
    let mut serial = args("serial", 1);
    serial.drain(5..9);
    run(serial);
    let read = |name: &str| {
        ditto::read_tensors(dir.path().join(format!("{name}.safetensors")).as_ref()).unwrap()
            ["latents"]
            .data
            .clone()
    };
    let d = max_abs(&read("threads"), &read("launched"));
    assert!(d <= 1e-6, "threads vs processes: {d}");
    let d = max_abs(&read("threads"), &read("ulysses"));
    assert!(d <= 1e-5, "x ulysses 2 in 4 processes: {d}");
    // All warmup: the serial result; one warmup step of four: stale steps changed it.
    let d = max_abs(&read("exact"), &read("serial"));
    assert!(d <= 1e-5, "all warmup vs serial: {d}");
    assert!(max_abs(&read("threads"), &read("serial")) > 1e-4);

    for (flags, want) in [
        (
            &["--pcpp-portion", "0.3"][..],
            "--pcpp-portion needs --distrifusion-degree",
        ),
        (
            &[
                "--distrifusion-degree",
                "2",
                "--ulysses-degree",
                "2",
                "--pcpp-portion",
                "0.3",
            ][..],
            "not supported",
        ),
        (
            &["--distrifusion-degree", "2", "--ring-degree", "2"][..],
            "not supported",
        ),
        (
            &["--distrifusion-degree", "2", "--pcpp-portion", "0"][..],
            "(0, 1]",
        ),
        (
            &["--distrifusion-degree", "2", "--pcpp-portion", "1.5"][..],
            "(0, 1]",
        ),
        (&["--distrifusion-degree", "0"][..], "at least 1"),
        (&["--distrifusion-degree", "3"][..], "does not divide"),
    ] {
        let mut a = vec!["generate", "--steps", "2", "--num-samples", "1", "--out"];
        let png = path("err.png");
        a.push(&png);
        a.extend_from_slice(flags);
        let out = ditto_cli(&a);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{flags:?}: {err}");
        assert!(err.contains(want), "{flags:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

/// Ulysses inside each patch is exact: DistriFusion x Ulysses has DistriFusion's staleness
/// (the same result up to rounding) on more ranks, with the traffic `--report` predicts.
#[test]
fn ulysses_inside_distrifusion_patches_is_exact() {
    let req = request(&[1]).with_steps(5);
    let serial = generate(&req, Parallel::default());
    for cfg in [false, true] {
        let plain = generate(&req, stale(2, cfg, None, 1));
        assert!(max_abs(&plain.latents.data, &serial.latents.data) > 1e-3);
        let g = generate(&req, with_ulysses(stale(2, cfg, None, 1), 2));
        let d = max_abs(&plain.latents.data, &g.latents.data);
        eprintln!("distrifusion 2 x ulysses 2 (cfg {cfg}) vs distrifusion 2: {d:.2e}");
        assert!(d <= 1e-5, "cfg {cfg}: {d}");
    }
    let pipe = Pipeline::builtin().unwrap();
    let model = pipe.transformer_model();
    let shapes = model.family().default_shapes();
    let inputs = random_inputs(model, &shapes);
    let opts = CompileOptions {
        parallel: with_ulysses(stale(2, false, None, 1), 2),
        ..Default::default()
    };
    let mut ranks = model.ranks(&shapes, &opts, RankOptions::default()).unwrap();
    let (gather, a2a, p2p) = ditto::report::analytic_bytes(ranks.program());
    assert!(a2a > 0.0 && gather > 0.0 && p2p == 0.0);
    for run in ["warmup", "stale"] {
        let stats = ranks.run(&inputs).unwrap().1;
        for (rank, st) in stats.per_rank.iter().enumerate() {
            assert_eq!(st.all_to_all().bytes as f64, a2a, "{run} rank {rank}");
            assert_eq!(st.all_gather().bytes as f64, gather, "{run} rank {rank}");
        }
    }
    // Every rank keeps the whole image's K/V of its half of the heads.
    let full = 2
        * model.graph(&shapes, false).unwrap().num_blocks()
        * shapes.batch
        * model.family().summary(&shapes).image_tokens
        * model.family().summary(&shapes).hidden
        * 4;
    assert!(ranks.kv_bytes().iter().all(|&b| b * 2 == full));
}
