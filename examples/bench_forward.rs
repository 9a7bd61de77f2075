//! Forward-pass benchmark entry point until `ditto bench forward` is wired into the CLI:
//!
//! ```text
//! cargo run --release --example bench_forward -- --config pixart-sigma --threads 2 \
//!     --dir target/bench/pixart-sigma-256 --out target/bench/ditto_out.safetensors
//! ```
//!
//! Prints the report (times, profile by step kind) and optionally writes it as JSON, the
//! output as safetensors (`output`), and the max relative error against a reference output
//! (e.g. diffusers' from `bench/pytorch_forward.py`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use ditto::bench::{bench_forward, ForwardBenchOptions};

#[derive(Parser)]
#[command(about = "Time one forward pass on the CPU backend with random weights")]
struct Args {
    /// A config.json, or a preset: pixart-sigma (PixArt-Σ XL/2 256 px).
    #[arg(long, default_value = "pixart-sigma")]
    config: PathBuf,
    #[arg(long, default_value_t = 2)]
    batch: usize,
    #[arg(long, default_value_t = 300)]
    text_len: usize,
    /// Latent height = width (default: the config's sample_size).
    #[arg(long)]
    latent_size: Option<usize>,
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    #[arg(long, default_value_t = 3)]
    iters: usize,
    /// Worker threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Checkpoint folder to write (default: under the system temp dir); reused when it
    /// already holds the same random weights.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Write the output (`output`) here as safetensors.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Write the report here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// A safetensors file whose `output` tensor is the reference to compare against.
    #[arg(long)]
    reference: Option<PathBuf>,
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(a: Args) -> anyhow::Result<()> {
    let report = bench_forward(&ForwardBenchOptions {
        config: a.config,
        batch: a.batch,
        text_len: a.text_len,
        latent_size: a.latent_size,
        warmup: a.warmup,
        iters: a.iters,
        threads: a.threads,
        seed: a.seed,
        weights_out: a.dir,
    })?;
    println!("checkpoint: {}", report.model_dir.display());
    print!("{report}");
    if let Some(path) = &a.out {
        ditto::write_tensors(path, &[("output", &report.output)])?;
    }
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    if let Some(path) = &a.reference {
        let tensors = ditto::read_tensors(path)?;
        let want = tensors
            .get("output")
            .ok_or_else(|| anyhow::anyhow!("{} has no `output` tensor", path.display()))?;
        println!(
            "max rel err vs {}: {:.3e}",
            path.display(),
            report.output.max_rel_err(want)
        );
    }
    Ok(())
}
