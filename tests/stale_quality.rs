//! The quality table of the stale-activation methods on the trained built-in model (DDIM 20
//! steps, guidance 3, classes 0..4 x seeds 0..4, one batch of 16): image PSNR against the
//! serial run of the same seeds, per sample (mean and worst) and over the whole batch, with
//! 1 and 0 warmup steps. A measurement, not a check (the floors are asserted by
//! `stale_parallel.rs` and `pipefusion.rs`); run with
//! `cargo test --release --test stale_quality -- --ignored --nocapture`.

use ditto::ir::mesh::Mesh;
use ditto::pipeline::PipeFusion;
use ditto::quality::{distance, per_sample};
use ditto::{GenerateRequest, Noise, Parallel, Pipeline, StaleConfig};

fn request() -> GenerateRequest {
    let seeds = [0u64, 1, 2, 3];
    let labels: Vec<usize> = (0..4).flat_map(|c| seeds.iter().map(move |_| c)).collect();
    let noise: Vec<u64> = (0..4).flat_map(|_| seeds).collect();
    GenerateRequest::classes(labels).with_noise(Noise::Seeds(noise))
}

fn distrifusion(n: usize, ulysses: usize, pcpp: Option<f32>, warmup_steps: usize) -> Parallel {
    Parallel {
        mesh: Mesh {
            cfg: 1,
            ring: n,
            ulysses,
        },
        stale: Some(StaleConfig {
            pcpp_portion: pcpp,
            warmup_steps,
        }),
        ..Parallel::default()
    }
}

fn pipefusion(p: usize, m: usize, warmup_steps: usize) -> Option<PipeFusion> {
    Some(PipeFusion {
        stages: p,
        patches: m,
        blocks_per_stage: None,
        warmup_steps,
    })
}

fn inside(cfg: usize, ulysses: usize) -> Parallel {
    Parallel {
        mesh: Mesh {
            cfg,
            ring: 1,
            ulysses,
        },
        ..Parallel::default()
    }
}

#[test]
#[ignore = "a measurement: prints the quality table"]
fn stale_quality_table() {
    let req = request();
    let serial = Pipeline::builtin().unwrap().generate(&req).unwrap();
    let samples = serial.image.shape[0];
    let mut table = String::from(
        "| method | ranks | warmup | PSNR mean (dB) | worst (dB) | whole batch (dB) |\n|---|---:|---:|---:|---:|---:|\n",
    );
    type Case = (
        &'static str,
        usize,
        Box<dyn Fn(usize) -> (Parallel, Option<PipeFusion>)>,
    );
    let cases: Vec<Case> = vec![
        (
            "PipeFusion P=2 M=2",
            2,
            Box::new(|w| (Parallel::default(), pipefusion(2, 2, w))),
        ),
        (
            "PipeFusion P=2 M=4",
            2,
            Box::new(|w| (Parallel::default(), pipefusion(2, 4, w))),
        ),
        (
            "PipeFusion P=2 M=2 x Ulysses 2",
            4,
            Box::new(|w| (inside(1, 2), pipefusion(2, 2, w))),
        ),
        (
            "PipeFusion P=2 M=2 x CFG 2 x Ulysses 2",
            8,
            Box::new(|w| (inside(2, 2), pipefusion(2, 2, w))),
        ),
        (
            "DistriFusion N=2",
            2,
            Box::new(|w| (distrifusion(2, 1, None, w), None)),
        ),
        (
            "DistriFusion N=4",
            4,
            Box::new(|w| (distrifusion(4, 1, None, w), None)),
        ),
        (
            "DistriFusion N=2 x Ulysses 2",
            4,
            Box::new(|w| (distrifusion(2, 2, None, w), None)),
        ),
        (
            "PCPP N=4 F=0.3",
            4,
            Box::new(|w| (distrifusion(4, 1, Some(0.3), w), None)),
        ),
    ];
    for (name, ranks, make) in &cases {
        for warmup in [1, 0] {
            let (parallel, pf) = make(warmup);
            let mut pipe = Pipeline::builtin()
                .unwrap()
                .with_parallel(parallel)
                .with_pipefusion(pf);
            let g = pipe.generate(&req).unwrap();
            let s = per_sample(&serial.image.data, &g.image.data, samples);
            let whole = distance(&serial.image.data, &g.image.data).psnr_db;
            let row = format!(
                "| {name} | {ranks} | {warmup} | {:.2} | {:.2} | {whole:.2} |\n",
                s.mean_db, s.worst_db
            );
            eprint!("{row}");
            table += &row;
        }
    }
    println!("{table}");
}
