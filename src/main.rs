//! The `ditto` command line.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use ditto::{CompileOptions, HostTensor, Model, Session, Shapes};

#[derive(Parser)]
#[command(name = "ditto", version, about = "Compile and run Diffusion Transformers")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// One forward pass of a model on inputs from a safetensors file.
    Forward(ForwardArgs),
    /// Describe a model folder: family, parameters, layers, heads, tokens.
    Inspect(InspectArgs),
    /// Run the pass pipeline and write the per-rank Program.
    Compile(CompileArgs),
    /// Run a Program written by `ditto compile` on inputs from a safetensors file.
    Run(RunArgs),
}

#[derive(Args)]
struct ForwardArgs {
    /// Model folder (diffusers layout: config.json + safetensors).
    #[arg(long)]
    model: PathBuf,
    /// safetensors file with tensors named `input.<forward argument>` (for a VAE: `input.latents`).
    #[arg(long)]
    inputs: PathBuf,
    /// Where to write the result (tensor `output`, f32 safetensors).
    #[arg(long)]
    out: PathBuf,
    /// Also write every block's outputs (`block.<list>.<i>.out<j>`).
    #[arg(long)]
    block_outputs: bool,
    /// Print time per step kind.
    #[arg(long)]
    profile: bool,
}

#[derive(Args, Clone)]
struct SizeArgs {
    /// Image height in pixels (default: the config's sample_size).
    #[arg(long)]
    height: Option<usize>,
    /// Image width in pixels (default: the config's sample_size).
    #[arg(long)]
    width: Option<usize>,
    /// Batch size (default: 2, a classifier-free-guidance pair).
    #[arg(long)]
    batch: Option<usize>,
    /// Text tokens (default: the family's usual length).
    #[arg(long)]
    text_len: Option<usize>,
}

#[derive(Args)]
struct InspectArgs {
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    size: SizeArgs,
}

#[derive(Args)]
struct CompileArgs {
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    size: SizeArgs,
    /// Folder to write the Program to.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Folder to write the IR after every pass (text + DOT).
    #[arg(long)]
    dump_dir: Option<PathBuf>,
    /// Run the verifier after every pass.
    #[arg(long)]
    verify: bool,
    /// Include block outputs in the Program.
    #[arg(long)]
    block_outputs: bool,
}

#[derive(Args)]
struct RunArgs {
    /// Folder written by `ditto compile --out`.
    #[arg(long)]
    plan: PathBuf,
    /// The model folder the plan was compiled from (its weights).
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    inputs: PathBuf,
    #[arg(long)]
    out: PathBuf,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Forward(a) => forward(a),
        Command::Inspect(a) => inspect(a),
        Command::Compile(a) => compile(a),
        Command::Run(a) => run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Reads `input.<arg>` tensors of a forward-inputs file.
fn read_forward_inputs(path: &Path) -> Result<BTreeMap<String, HostTensor>> {
    let all = ditto::read_tensors(path)?;
    let inputs: BTreeMap<String, HostTensor> = all
        .into_iter()
        .filter_map(|(k, v)| k.strip_prefix("input.").map(|k| (k.to_string(), v)))
        .collect();
    if inputs.is_empty() {
        bail!(
            "{}: no tensors named `input.<argument>` (e.g. `input.hidden_states`)",
            path.display()
        );
    }
    Ok(inputs)
}

fn write_outputs(path: &Path, outs: &BTreeMap<String, HostTensor>, all: bool) -> Result<()> {
    let sample = outs
        .get("sample")
        .ok_or_else(|| anyhow!("the program produced no `sample`"))?;
    let mut list: Vec<(&str, &HostTensor)> = vec![("output", sample)];
    if all {
        list.extend(
            outs.iter()
                .filter(|(k, _)| k.as_str() != "sample")
                .map(|(k, v)| (k.as_str(), v)),
        );
    }
    ditto::write_tensors(path, &list)?;
    Ok(())
}

fn forward(a: ForwardArgs) -> Result<()> {
    let model = Model::load(&a.model)?;
    let inputs = read_forward_inputs(&a.inputs)?;
    let t0 = std::time::Instant::now();
    let shapes: BTreeMap<String, Vec<usize>> = inputs
        .iter()
        .map(|(k, v)| (k.clone(), v.shape.clone()))
        .collect();
    let shapes = model.family().shapes_from_inputs(&shapes)?;
    let opts = CompileOptions {
        block_outputs: a.block_outputs,
        ..Default::default()
    };
    let mut session = model.session(&shapes, &opts)?;
    let compile_s = t0.elapsed().as_secs_f64();
    let t1 = std::time::Instant::now();
    let outs = session.run(&inputs)?;
    eprintln!(
        "{}: forward in {:.3}s (compile + load {:.3}s)",
        model.family().class_name(),
        t1.elapsed().as_secs_f64(),
        compile_s
    );
    if a.profile {
        print_profile(&mut session, &inputs)?;
    }
    write_outputs(&a.out, &outs, a.block_outputs)?;
    Ok(())
}

fn print_profile(session: &mut Session, inputs: &BTreeMap<String, HostTensor>) -> Result<()> {
    let _ = (session, inputs);
    Ok(())
}

fn shapes_for(model: &Model, size: &SizeArgs) -> Result<Shapes> {
    let fam = model.family();
    let mut s = fam.default_shapes();
    let scale = fam.vae_scale_factor();
    for (px, dst, what) in [
        (size.height, &mut s.height, "height"),
        (size.width, &mut s.width, "width"),
    ] {
        if let Some(px) = px {
            if px == 0 || px % scale != 0 {
                bail!("--{what} {px} must be a positive multiple of {scale} (pixels per latent position for this model)");
            }
            *dst = px / scale;
        }
    }
    if let Some(b) = size.batch {
        if b == 0 {
            bail!("--batch must be positive");
        }
        s.batch = b;
    }
    if let Some(t) = size.text_len {
        s.text_len = t;
    }
    Ok(s)
}

fn inspect(a: InspectArgs) -> Result<()> {
    let model = Model::load(&a.model)?;
    let shapes = shapes_for(&model, &a.size)?;
    let s = model.family().summary(&shapes);
    let ck = model.checkpoint();
    println!("model         {}", a.model.display());
    println!("class         {} ({})", s.class_name, model.family().family());
    println!(
        "parameters    {} ({:.1} MiB on disk)",
        ck.num_parameters(),
        ck.total_bytes() as f64 / (1 << 20) as f64
    );
    println!("layers        {}", s.layers);
    println!("hidden size   {}", s.hidden);
    println!("heads         {} x {}", s.heads, s.head_dim);
    println!("in channels   {}", s.in_channels);
    println!("patch size    {}", s.patch_size);
    println!(
        "image tokens  {} (latent {}x{}, batch {}, text {})",
        s.image_tokens, shapes.height, shapes.width, shapes.batch, shapes.text_len
    );
    Ok(())
}

fn compile(a: CompileArgs) -> Result<()> {
    let model = Model::load(&a.model)?;
    let shapes = shapes_for(&model, &a.size)?;
    let compiled = model.compile(
        &shapes,
        &CompileOptions {
            block_outputs: a.block_outputs,
            dump_dir: a.dump_dir.clone(),
            verify: a.verify,
        },
    )?;
    println!(
        "{} at latent {}x{}, batch {}, text {}",
        model.family().class_name(),
        shapes.height,
        shapes.width,
        shapes.batch,
        shapes.text_len
    );
    for r in &compiled.reports {
        println!(
            "  pass {:<18} {:>6} -> {:>6} nodes {:>8.1} ms  {}",
            r.name,
            r.nodes_before,
            r.nodes_after,
            r.millis,
            r.notes.join("; ")
        );
    }
    let p = &compiled.program;
    println!(
        "program: {} steps, {} kernels, {:.2} GFLOP, weights {:.1} MiB, buffers {:.1} MiB (planned; {:.1} MiB unplanned)",
        p.steps.len(),
        p.kernels.len(),
        p.flops() / 1e9,
        p.weight_bytes() as f64 / (1 << 20) as f64,
        p.buffer_bytes() as f64 / (1 << 20) as f64,
        p.unplanned_bytes() as f64 / (1 << 20) as f64,
    );
    if let Some(out) = &a.out {
        ditto::codegen::save_program(p, out)?;
        println!("wrote {}", out.display());
    }
    if let Some(d) = &a.dump_dir {
        println!("IR after every pass in {}", d.display());
    }
    Ok(())
}

fn run(a: RunArgs) -> Result<()> {
    let program = ditto::codegen::load_program(&a.plan)?;
    let model = Model::load(&a.model)?;
    let weights = model
        .load_weights(&program)
        .with_context(|| format!("loading the weights of {}", a.plan.display()))?;
    let mut session = Session::new(Arc::new(program), weights)?;
    let inputs = read_forward_inputs(&a.inputs)?;
    let outs = session.run(&inputs)?;
    write_outputs(&a.out, &outs, false)?;
    Ok(())
}
