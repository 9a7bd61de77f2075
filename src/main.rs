//! The `ditto` command line.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use ditto::bench::{bench_forward, ForwardBenchOptions};
use ditto::dist_env::{DistEnv, Membership};
use ditto::parallel::RankOptions;
use ditto::{CompileOptions, HostTensor, Model, Session, Shapes};

#[derive(Parser)]
#[command(
    name = "ditto",
    version,
    about = "Compile and run Diffusion Transformers"
)]
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
    /// Generate images with a diffusers pipeline folder (default: the built-in shapes model).
    Generate(GenerateArgs),
    /// Record how much every layer's K, V, attention output and block output change between
    /// denoising steps (CSV, SVG plots, stability summary); optionally fit TeaCache.
    Analyze(AnalyzeArgs),
    /// Benchmarks (compare with bench/*.py, which time PyTorch on the same inputs).
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Run `forward` or `generate` as one process per rank: `ditto launch
    /// --nproc-per-node 4 -- forward --ulysses-degree 2 --ring-degree 2 ...`.
    Launch(LaunchArgs),
}

#[derive(Args)]
struct LaunchArgs {
    /// Ranks (processes) to start on this node.
    #[arg(long)]
    nproc_per_node: usize,
    /// Nodes taking part; each runs `ditto launch` with its own --node-rank.
    #[arg(long, default_value_t = 1)]
    nnodes: usize,
    /// This node's index (its ranks are node-rank x nproc-per-node + 0, 1, ...).
    #[arg(long, default_value_t = 0)]
    node_rank: usize,
    /// Host of node 0, where rank 0 serves the rendezvous.
    #[arg(long, default_value = "127.0.0.1")]
    master_addr: String,
    /// Port of the rendezvous (default: a free port on one node, 29500 on several).
    #[arg(long)]
    master_port: Option<u16>,
    /// Also write each rank's output to DIR/rank<r>.log.
    #[arg(long)]
    log_dir: Option<PathBuf>,
    /// Seconds between SIGTERM and SIGKILL when the ranks are stopped.
    #[arg(long, default_value_t = 5.0)]
    grace_period: f64,
    /// The subcommand each rank runs, after `--`.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    command: Vec<OsString>,
}

/// PipeFusion: blocks in pipeline stages, the image in row patches.
#[derive(Args, Clone)]
struct PipeFusionArgs {
    /// Pipeline stages, each holding a contiguous range of blocks and only their weights;
    /// patches attend to one-step-stale K/V of the others after --warmup-steps. Each stage
    /// runs on one rank, or on --ulysses-degree x --ring-degree (x 2 with
    /// --use-cfg-parallel) ranks that split each patch exactly.
    #[arg(long)]
    pipefusion_degree: Option<usize>,
    /// Row patches the image is cut into (they must divide the token rows).
    #[arg(long, default_value_t = 2)]
    num_pipeline_patch: usize,
    /// Blocks per stage, comma-separated (default: balanced by estimated cost).
    #[arg(long, value_delimiter = ',')]
    attn_layer_num_for_pp: Vec<usize>,
}

impl PipeFusionArgs {
    fn layout(&self, warmup_steps: usize) -> Result<Option<ditto::pipeline::PipeFusion>> {
        let Some(stages) = self.pipefusion_degree else {
            if !self.attn_layer_num_for_pp.is_empty() {
                bail!("--attn-layer-num-for-pp needs --pipefusion-degree");
            }
            return Ok(None);
        };
        Ok(Some(ditto::pipeline::PipeFusion {
            stages,
            patches: self.num_pipeline_patch,
            blocks_per_stage: (!self.attn_layer_num_for_pp.is_empty())
                .then(|| self.attn_layer_num_for_pp.clone()),
            warmup_steps,
        }))
    }
}

#[derive(Args, Clone)]
struct TimeoutArgs {
    /// Seconds any collective, and the rendezvous of a multi-process run, may wait for a
    /// rank before failing with an error naming it.
    #[arg(long, default_value_t = 60.0)]
    timeout: f64,
}

impl TimeoutArgs {
    fn duration(&self) -> Result<Duration> {
        if !(self.timeout.is_finite() && self.timeout > 0.0) {
            bail!(
                "--timeout {} must be a positive number of seconds",
                self.timeout
            );
        }
        Duration::try_from_secs_f64(self.timeout)
            .map_err(|e| anyhow!("--timeout {}: {e}", self.timeout))
    }
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Time one forward pass with random weights (written as a real checkpoint folder, so
    /// a reference implementation can load the very same weights), on the CPU or a GPU.
    Forward(BenchForwardArgs),
    /// Time every generated CUDA kernel of a model's plan on a GPU: GB/s against the
    /// device's copy bandwidth, and the flash-attention kernel's TFLOP/s.
    Kernels(BenchKernelsArgs),
}

#[derive(Args)]
struct BenchKernelsArgs {
    #[command(flatten)]
    model: BenchModelArgs,
    /// Timed launches per kernel.
    #[arg(long, default_value_t = 20)]
    reps: usize,
    /// Write the table here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    #[command(flatten)]
    device: DeviceArgs,
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
    #[command(flatten)]
    parallel: ParallelArgs,
    #[command(flatten)]
    device: DeviceArgs,
    #[command(flatten)]
    timeout: TimeoutArgs,
    /// Print per-rank bytes sent per collective, next to the analytic volume.
    #[arg(long)]
    report: bool,
}

#[derive(Args, Clone)]
struct DeviceArgs {
    /// Where to run: cpu, cuda (GPU 0) or cuda:N. On the GPU, parallel degrees run one
    /// process per rank (`ditto launch`); DistriFusion and PipeFusion stay on the CPU.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Storage type of weights and activations on the GPU: bf16, f16 or f32 (arithmetic
    /// and accumulation are f32).
    #[arg(long, default_value = "bf16")]
    dtype: String,
}

impl DeviceArgs {
    fn backend(&self) -> Result<ditto::Backend> {
        Ok(ditto::Backend::parse(&self.device, &self.dtype)?)
    }

    /// The backend of this process: under a launcher, a plain `cuda` is the node's GPU
    /// LOCAL_RANK (modulo the GPUs there, so ranks share a GPU when there are fewer GPUs
    /// than ranks); `cuda:N` is GPU N whatever the rank.
    fn backend_for(&self, env: Option<&DistEnv>) -> Result<ditto::Backend> {
        let backend = self.backend()?;
        match (backend, env) {
            (ditto::Backend::Cuda { dtype, .. }, Some(env)) if self.device == "cuda" => {
                let count = ditto::runtime::gpu::CudaDevice::count()?;
                Ok(ditto::Backend::Cuda {
                    ordinal: env.local_rank % count.max(1),
                    dtype,
                })
            }
            _ => Ok(backend),
        }
    }

    /// Refuses what the GPU backend does not run, before any rank meets another.
    fn check_gpu_layout(
        &self,
        parallel: &ditto::Parallel,
        pipefusion: bool,
        env: Option<&DistEnv>,
    ) -> Result<()> {
        if self.backend()? == ditto::Backend::Cpu {
            return Ok(());
        }
        if pipefusion || parallel.stale.is_some() {
            bail!(
                "--device {}: DistriFusion and PipeFusion keep activations across steps on the \
                 CPU backend only for now (use --device cpu)",
                self.device
            );
        }
        let world = parallel.mesh.world_size();
        if world > 1 && env.is_none() {
            bail!(
                "--device {} over {world} ranks runs one process per rank: `ditto launch \
                 --nproc-per-node {world} -- <this command>` (or torchrun-style variables)",
                self.device
            );
        }
        Ok(())
    }
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

#[derive(Args, Clone)]
struct ParallelArgs {
    /// Ranks that split the sequence with all-to-all (Ulysses), over the fastest links.
    #[arg(long, default_value_t = 1)]
    ulysses_degree: usize,
    /// Ranks that split the sequence and pass K/V around a ring.
    #[arg(long, default_value_t = 1)]
    ring_degree: usize,
    /// Run the negative and positive halves of a CFG batch on two rank groups.
    #[arg(long)]
    use_cfg_parallel: bool,
    /// `auto`: let the cost model choose the layout for --world-size ranks.
    #[arg(long)]
    parallel: Option<String>,
    /// Ranks for --parallel auto.
    #[arg(long)]
    world_size: Option<usize>,
    /// Link preset of the cost model: nvlink, pcie or ethernet.
    #[arg(long, default_value = "nvlink")]
    link: String,
    /// DistriFusion (displaced patch parallelism): N ranks, each computing one of N equal
    /// patches of the image; after --warmup-steps exact steps, each attends to the other
    /// patches' K/V of the previous step, exchanged in one batched all-gather per step.
    /// Composes with --ulysses-degree U (each patch on U ranks, exact inside: N x U ranks)
    /// and --use-cfg-parallel (x 2); not with --ring-degree.
    #[arg(long)]
    distrifusion_degree: Option<usize>,
    /// PCPP (with --distrifusion-degree): after warmup, each patch attends to itself and to
    /// this portion F (0 < F <= 1) of each neighbouring patch, exchanging only those rows.
    #[arg(long)]
    pcpp_portion: Option<f32>,
    /// Denoising steps run exactly before stale activations are used (DistriFusion, PCPP,
    /// PipeFusion). One exact step fills every layer's K/V buffers, which is all the stale
    /// steps need (xDiT's default; DistriFusion's own code uses 4, for a little more
    /// quality at the price of three more synchronous steps).
    #[arg(long, default_value_t = 1)]
    warmup_steps: usize,
}

impl ParallelArgs {
    /// `--distrifusion-degree` and `--pcpp-portion` checked against the other flags: the
    /// stale layout, or `None` for exact parallelism.
    fn stale(&self) -> Result<Option<(usize, ditto::StaleConfig)>> {
        let Some(n) = self.distrifusion_degree else {
            if self.pcpp_portion.is_some() {
                bail!("--pcpp-portion needs --distrifusion-degree N (PCPP is DistriFusion with partial neighbour attention)");
            }
            return Ok(None);
        };
        if n == 0 {
            bail!("--distrifusion-degree must be at least 1");
        }
        if self.ring_degree != 1 {
            bail!(
                "--distrifusion-degree with --ring-degree is not supported: displaced patch \
                 parallelism passes the patches' K/V itself (it composes with --ulysses-degree \
                 inside each patch and with --use-cfg-parallel)"
            );
        }
        if self.ulysses_degree != 1 && self.pcpp_portion.is_some() {
            bail!(
                "--pcpp-portion with --ulysses-degree is not supported: PCPP's window is per \
                 patch rank"
            );
        }
        if self.parallel.is_some() {
            bail!("--distrifusion-degree with --parallel auto is not supported: give the layout explicitly");
        }
        if let Some(f) = self.pcpp_portion {
            if !(f.is_finite() && f > 0.0 && f <= 1.0) {
                bail!("--pcpp-portion must be in (0, 1], got {f}");
            }
        }
        Ok(Some((
            n,
            ditto::StaleConfig {
                pcpp_portion: self.pcpp_portion,
                warmup_steps: self.warmup_steps,
            },
        )))
    }

    /// The layout. In a multi-process run (`env`), `--parallel auto` defaults to the
    /// launcher's world size, and ranks other than 0 keep the cost model's candidates off
    /// the output (rank 0 prints them once; every rank makes the same choice).
    fn resolve(
        &self,
        model: &Model,
        shapes: &Shapes,
        env: Option<&DistEnv>,
    ) -> Result<ditto::Parallel> {
        let quiet = env.is_some_and(|e| e.rank != 0);
        // The flag combinations first, whatever the branch.
        self.stale()?;
        let link = ditto::passes::shard_sequence::link_preset(&self.link)
            .ok_or_else(|| anyhow!("unknown --link `{}` (nvlink, pcie or ethernet)", self.link))?;
        match self.parallel.as_deref() {
            Some("auto") => {
                let n = self
                    .world_size
                    .or(env.map(|e| e.world_size))
                    .ok_or_else(|| anyhow!("--parallel auto needs --world-size N"))?;
                let (choice, candidates) = model.choose_parallel(shapes, n, link)?;
                if quiet {
                    return Ok(choice);
                }
                for (m, s) in &candidates {
                    eprintln!(
                        "  candidate cfg {} x ring {} x ulysses {}: {:.3} ms per forward",
                        m.cfg,
                        m.ring,
                        m.ulysses,
                        s * 1e3
                    );
                }
                let m = choice.mesh;
                eprintln!(
                    "chose cfg {} x ring {} x ulysses {} for {n} ranks ({} link)",
                    m.cfg, m.ring, m.ulysses, link.name
                );
                Ok(choice)
            }
            Some(other) => bail!("unknown --parallel `{other}` (only `auto`)"),
            None => {
                if self.ulysses_degree == 0 || self.ring_degree == 0 {
                    bail!("--ulysses-degree and --ring-degree must be at least 1");
                }
                let stale = self.stale()?;
                // Displaced attention uses the whole Sp group as one axis; it is laid out
                // as the Ring axis (no heads are split).
                let mesh = ditto::ir::mesh::Mesh {
                    cfg: if self.use_cfg_parallel { 2 } else { 1 },
                    ring: stale.map_or(self.ring_degree, |(n, _)| n),
                    ulysses: self.ulysses_degree,
                };
                if let Some(n) = self.world_size {
                    if n != mesh.world_size() {
                        bail!(
                            "--world-size {n} but ulysses {} x ring {} x cfg {} = {} ranks",
                            mesh.ulysses,
                            mesh.ring,
                            mesh.cfg,
                            mesh.world_size()
                        );
                    }
                }
                Ok(ditto::Parallel {
                    mesh,
                    choice: ditto::passes::MethodChoice::Forced,
                    link,
                    stale: stale.map(|(_, c)| c),
                })
            }
        }
    }
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
    /// `cuda`: also generate the CUDA kernels of the plan and compile them to PTX with NVRTC
    /// (no GPU needed), stored with the plan under `kernels/`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// GPU architecture for `--device cuda`.
    #[arg(long, default_value = "sm_90")]
    arch: String,
    /// Storage type of activations and weights on the GPU: bf16, f16 or f32.
    #[arg(long, default_value = "bf16")]
    dtype: String,
    #[command(flatten)]
    parallel: ParallelArgs,
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
    #[command(flatten)]
    device: DeviceArgs,
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
        Command::Generate(a) => generate(a),
        Command::Analyze(a) => analyze(a),
        Command::Bench(BenchCommand::Forward(a)) => bench_forward_cmd(a),
        Command::Bench(BenchCommand::Kernels(a)) => bench_kernels_cmd(a),
        Command::Launch(a) => return launch(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if caused_by_peer(&e) {
                ExitCode::from(ditto::dist_env::PEER_FAILED_EXIT)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Whether a rank failed only because another rank did (failed, exited, or never came to
/// a collective): such a rank exits with [`ditto::dist_env::PEER_FAILED_EXIT`] rather than
/// 1, so that `ditto launch` blames the rank where the failure started, whichever
/// process happened to exit first.
fn caused_by_peer(e: &anyhow::Error) -> bool {
    use ditto::runtime::comm::CommError;
    use ditto::runtime::RuntimeError;
    fn comm(e: &CommError) -> bool {
        matches!(
            e,
            CommError::PeerFailed { .. } | CommError::PeerExited { .. } | CommError::Timeout { .. }
        )
    }
    fn ditto_error(e: &ditto::Error) -> bool {
        match e {
            ditto::Error::Runtime(RuntimeError::Comm(c)) => comm(c),
            ditto::Error::Gpu(ditto::runtime::gpu::GpuError::Comm(c)) => comm(c),
            ditto::Error::Pipeline(p) => pipeline_error(p),
            _ => false,
        }
    }
    fn pipeline_error(e: &ditto::PipelineError) -> bool {
        match e {
            ditto::PipelineError::Model { error, .. } => ditto_error(error),
            _ => false,
        }
    }
    e.chain().any(|c| {
        c.downcast_ref::<CommError>().is_some_and(comm)
            || c.downcast_ref::<RuntimeError>()
                .is_some_and(|r| matches!(r, RuntimeError::Comm(c) if comm(c)))
            || c.downcast_ref::<ditto::Error>().is_some_and(ditto_error)
            || c.downcast_ref::<ditto::PipelineError>()
                .is_some_and(pipeline_error)
    })
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
    let env = DistEnv::from_env()?;
    let leader = env.as_ref().is_none_or(|e| e.rank == 0);
    let timeout = a.timeout.duration()?;
    let model = Model::load(&a.model)?;
    let inputs = read_forward_inputs(&a.inputs)?;
    let t0 = std::time::Instant::now();
    let shapes: BTreeMap<String, Vec<usize>> = inputs
        .iter()
        .map(|(k, v)| (k.clone(), v.shape.clone()))
        .collect();
    let shapes = model.family().shapes_from_inputs(&shapes)?;
    let parallel = a.parallel.resolve(&model, &shapes, env.as_ref())?;
    a.device.check_gpu_layout(&parallel, false, env.as_ref())?;
    let backend = a.device.backend_for(env.as_ref())?;
    let member = join_run(env, &parallel, 1, timeout)?;
    let opts = CompileOptions {
        block_outputs: a.block_outputs,
        parallel,
        ..Default::default()
    };
    let rank_opts = RankOptions {
        timeout,
        comm: member.as_ref().map(|m| m.comm.clone()),
        backend,
    };
    let result = forward_run(&a, &model, &shapes, &opts, rank_opts, &inputs, leader, t0);
    leave_run(member, result)
}

/// Compiles, runs and (leader only) writes and reports one forward pass.
#[allow(clippy::too_many_arguments)]
fn forward_run(
    a: &ForwardArgs,
    model: &Model,
    shapes: &Shapes,
    opts: &CompileOptions,
    rank_opts: RankOptions,
    inputs: &BTreeMap<String, HostTensor>,
    leader: bool,
    t0: std::time::Instant,
) -> Result<()> {
    let multi_process = rank_opts.comm.is_some();
    let mut ranks = model.ranks(shapes, opts, rank_opts)?;
    let compile_s = t0.elapsed().as_secs_f64();
    let t1 = std::time::Instant::now();
    let (outs, stats) = ranks.run(inputs)?;
    // Every rank holds the gathered result; rank 0 alone writes and reports it.
    if leader {
        eprintln!(
            "{}: forward in {:.3}s on {} rank(s){} (compile + load {:.3}s)",
            model.family().class_name(),
            t1.elapsed().as_secs_f64(),
            ranks.program().mesh.world_size(),
            if multi_process {
                ", one per process"
            } else {
                ""
            },
            compile_s
        );
        if a.report {
            print!(
                "{}",
                ditto::report::communication(ranks.program(), &stats, 1)
            );
            if multi_process {
                println!("{OWN_TRAFFIC_NOTE}");
            }
        }
        write_outputs(&a.out, &outs, a.block_outputs)?;
    }
    Ok(())
}

/// Ends this process's part in a multi-process run: after success, waits for every rank
/// (rank 0 has written the outputs; its store must outlive the others' use of it); after
/// a failure, tells the others why at once, so they fail naming this rank instead of
/// waiting for it at the final barrier.
fn leave_run(member: Option<Membership>, result: Result<()>) -> Result<()> {
    match (member, result) {
        (None, result) => result,
        (Some(m), Ok(())) => {
            let (rank, world) = (m.rank(), m.env.world_size);
            m.finish().with_context(|| {
                format!("rank {rank} of {world}: waiting for the other ranks to finish")
            })
        }
        (Some(m), Err(e)) => {
            m.abort(&format!("{e:#}"));
            Err(e)
        }
    }
}

/// Under `--report` in a multi-process run: each process counts only its own traffic.
const OWN_TRAFFIC_NOTE: &str =
    "(multi-process run: the rows are rank 0's own traffic; every rank sends the same volumes)";

/// Joins the multi-process run a launcher (`ditto launch`, torchrun, srun, mpirun) started
/// this process in, if any: checks that the launcher's world is the layout's, then meets
/// the other ranks. `None`: a plain single-process run (ranks, if any, as threads).
fn join_run(
    env: Option<DistEnv>,
    parallel: &ditto::Parallel,
    stages: usize,
    timeout: Duration,
) -> Result<Option<Membership>> {
    let Some(env) = env else {
        return Ok(None);
    };
    let m = parallel.mesh;
    let world = stages * m.world_size();
    if env.world_size != world {
        let (rank_var, size_var) = env.launcher.variables();
        bail!(
            "this process is {rank_var}={} of {size_var}={} but the parallel layout has {world} rank(s) \
             ({}cfg {} x ring {} x ulysses {}): start {world} process(es), or choose a layout of {} \
             rank(s) with --ulysses-degree, --ring-degree, --use-cfg-parallel{}",
            env.rank,
            env.world_size,
            if stages > 1 {
                format!("{stages} PipeFusion stages x ")
            } else {
                String::new()
            },
            m.cfg,
            m.ring,
            m.ulysses,
            env.world_size,
            if stages > 1 { " and --pipefusion-degree" } else { "" }
        );
    }
    if world == 1 {
        return Ok(None);
    }
    Ok(Some(Membership::join(env, timeout)?))
}

#[cfg(unix)]
fn launch(a: LaunchArgs) -> ExitCode {
    let program = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: cannot find the ditto executable to start the ranks: {e}");
            return ExitCode::FAILURE;
        }
    };
    let grace_period = match Duration::try_from_secs_f64(a.grace_period) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: --grace-period {}: {e}", a.grace_period);
            return ExitCode::FAILURE;
        }
    };
    let opts = ditto::launch::LaunchOptions {
        program,
        args: a.command,
        nproc_per_node: a.nproc_per_node,
        nnodes: a.nnodes,
        node_rank: a.node_rank,
        master_addr: a.master_addr,
        master_port: a.master_port,
        log_dir: a.log_dir,
        grace_period,
    };
    match ditto::launch::launch(&opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: launch: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

#[cfg(not(unix))]
fn launch(_: LaunchArgs) -> ExitCode {
    eprintln!("error: ditto launch needs a Unix system; start the ranks with your own launcher (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)");
    ExitCode::FAILURE
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
    println!(
        "class         {} ({})",
        s.class_name,
        model.family().family()
    );
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
    let parallel = a.parallel.resolve(&model, &shapes, None)?;
    let compiled = model.compile(
        &shapes,
        &CompileOptions {
            block_outputs: a.block_outputs,
            dump_dir: a.dump_dir.clone(),
            verify: a.verify,
            parallel,
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
    match a.device.as_str() {
        "cpu" => {}
        "cuda" => compile_cuda_kernels(p, &a.arch, &a.dtype, a.out.as_deref())?,
        other => bail!("unknown --device `{other}` (cpu or cuda)"),
    }
    if let Some(d) = &a.dump_dir {
        println!("IR after every pass in {}", d.display());
    }
    Ok(())
}

/// Generates the plan's CUDA kernels and compiles them to PTX; with `out`, stores the
/// sources and PTX next to the plan (`kernels/<name>.cu`, `.ptx`).
fn compile_cuda_kernels(
    p: &ditto::Program,
    arch: &str,
    dtype: &str,
    out: Option<&Path>,
) -> Result<()> {
    use ditto::codegen::cuda::{compile_ptx, cuda_include_dirs, cuda_sources, StorageDType};
    let Some(dtype) = StorageDType::parse(dtype) else {
        bail!("unknown --dtype `{dtype}` (bf16, f16 or f32)");
    };
    let kernels = cuda_sources(p, dtype)?;
    let t0 = std::time::Instant::now();
    let ptx = compile_ptx(&kernels, arch, &cuda_include_dirs())?;
    println!(
        "cuda: {} kernels ({}) compiled to PTX for {arch} in {:.2}s",
        kernels.len(),
        dtype.name(),
        t0.elapsed().as_secs_f64()
    );
    if let Some(out) = out {
        let dir = out.join("kernels");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        for (k, (name, text)) in kernels.iter().zip(&ptx) {
            std::fs::write(dir.join(format!("{name}.cu")), &k.source)
                .and_then(|_| std::fs::write(dir.join(format!("{name}.ptx")), text))
                .with_context(|| format!("writing {}", dir.display()))?;
        }
        println!("wrote {} kernels to {}", ptx.len(), dir.display());
    }
    Ok(())
}

fn run(a: RunArgs) -> Result<()> {
    let program = ditto::codegen::load_program(&a.plan)?;
    let model = Model::load(&a.model)?;
    let weights = model
        .load_weights(&program)
        .with_context(|| format!("loading the weights of {}", a.plan.display()))?;
    let mut session = Session::on(a.device.backend()?, Arc::new(program), weights)?;
    let inputs = read_forward_inputs(&a.inputs)?;
    let outs = session.run(&inputs)?;
    write_outputs(&a.out, &outs, false)?;
    Ok(())
}

#[derive(Args)]
struct GenerateArgs {
    /// Pipeline folder in diffusers' layout (model_index.json, transformer/, scheduler/,
    /// optional vae/). Default: the built-in shapes-dit model (32x32 shapes, 4 classes).
    #[arg(long)]
    model: Option<PathBuf>,
    /// safetensors with `prompt_embeds`, `negative_prompt_embeds` and (SD3, Flux)
    /// `pooled_prompt_embeds`, `negative_pooled_prompt_embeds` (text-conditioned models).
    #[arg(long)]
    prompt_embeds: Option<PathBuf>,
    /// Class label(s) of a class-conditional model, numbers or names, comma-separated
    /// (default for the built-in model: all classes).
    #[arg(long, value_delimiter = ',')]
    class_label: Vec<String>,
    /// safetensors whose tensor `latents` is the initial noise, in the transformer's layout
    /// (packed [B, tokens, 4C] for Flux). Default: noise from --seed.
    #[arg(long)]
    latents: Option<PathBuf>,
    /// Seed of PyTorch's CPU generator (the same noise as diffusers with
    /// `torch.Generator().manual_seed(S)`). Sample j of each condition uses seed S + j.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Samples per class label or prompt (a grid row each). Default: 4 for the built-in
    /// model, 1 otherwise.
    #[arg(long)]
    num_samples: Option<usize>,
    /// Denoising steps (default: the pipeline's).
    #[arg(long)]
    steps: Option<usize>,
    /// Classifier-free guidance scale (none when <= 1), or Flux's embedded guidance.
    #[arg(long)]
    guidance: Option<f32>,
    /// Image height in pixels (default: the model's sample size).
    #[arg(long)]
    height: Option<usize>,
    /// Image width in pixels (default: the model's sample size).
    #[arg(long)]
    width: Option<usize>,
    /// Use the scheduler's own timestep spacing even where the diffusers pipeline passes
    /// sigmas (Flux passes linspace(1, 1/n, n)).
    #[arg(long)]
    scheduler_timesteps: bool,
    /// Where to write the PNG (a grid: one row per condition, one column per sample).
    #[arg(long, default_value = "ditto-samples.png")]
    out: PathBuf,
    /// Nearest-neighbour scale factor of the PNG (default: up to about 128 px per image).
    #[arg(long)]
    upscale: Option<usize>,
    /// Also write `latents` (final) and `image` (decoder output, f32, before 8-bit
    /// conversion) to this safetensors file.
    #[arg(long)]
    save_latents: Option<PathBuf>,
    #[command(flatten)]
    parallel: ParallelArgs,
    #[command(flatten)]
    pipefusion: PipeFusionArgs,
    #[command(flatten)]
    device: DeviceArgs,
    #[command(flatten)]
    timeout: TimeoutArgs,
    /// Print per-rank bytes sent per collective per step, next to the analytic volume.
    #[arg(long)]
    report: bool,
    /// Also run the exact serial pipeline (one rank, no stale activations, no caching) on
    /// the same request and print how far this run's image and latents are from it (PSNR,
    /// max relative error).
    #[arg(long)]
    compare_serial: bool,
    /// Step caching: `teacache:THRESH` (skip the block stack while the accumulated, rescaled
    /// change of block 0's modulated input stays under THRESH), `fbcache:THRESH` (skip blocks
    /// 1.. while block 0's residual changes less than THRESH, relative) or `none`.
    #[arg(long, default_value = "none")]
    cache: ditto::CachePolicy,
    /// TeaCache's rescaling polynomial (a `teacache.json` written by `ditto analyze
    /// --fit-teacache`), instead of the one next to the model's transformer config.
    #[arg(long)]
    teacache_rescale: Option<PathBuf>,
}

/// A class label given as a number or as a name from the pipeline's labels.
fn parse_class(text: &str, pipe: &ditto::Pipeline) -> Result<usize> {
    let text = text.trim();
    if let Ok(n) = text.parse::<usize>() {
        return Ok(n);
    }
    let found = pipe
        .labels()
        .iter()
        .find(|(_, name)| name.split(',').any(|n| n.trim().eq_ignore_ascii_case(text)));
    match found {
        Some((&i, _)) => Ok(i),
        None => {
            let known: Vec<String> = pipe
                .labels()
                .iter()
                .take(10)
                .map(|(i, n)| format!("{i} {n}"))
                .collect();
            bail!(
                "--class-label `{text}` is neither a number nor a known class name{}",
                if known.is_empty() {
                    String::new()
                } else {
                    format!(" (known: {})", known.join(", "))
                }
            )
        }
    }
}

/// Each row of a [B, ...] tensor repeated `k` times in place ([a, a, b, b] for k = 2).
fn repeat_rows(t: &HostTensor, k: usize) -> HostTensor {
    let b = t.shape.first().copied().unwrap_or(0);
    let row = t.data.len() / b.max(1);
    let mut shape = t.shape.clone();
    if let Some(s) = shape.first_mut() {
        *s = b * k;
    }
    let data = t
        .data
        .chunks(row.max(1))
        .flat_map(|r| std::iter::repeat_n(r, k).flatten().copied())
        .collect();
    HostTensor::new(shape, data)
}

fn generate(a: GenerateArgs) -> Result<()> {
    use ditto::{GenerateRequest, Noise, Pipeline, PromptEmbeds, TimestepSchedule};

    let env = DistEnv::from_env()?;
    let leader = env.as_ref().is_none_or(|e| e.rank == 0);
    let timeout = a.timeout.duration()?;
    let builtin = a.model.is_none();
    let pipe = match &a.model {
        Some(dir) => Pipeline::load(dir)?,
        None => Pipeline::builtin()?,
    };
    let parallel = {
        let model = pipe.transformer_model();
        let shapes = model.family().default_shapes();
        a.parallel.resolve(model, &shapes, env.as_ref())?
    };
    let mut pipe = pipe
        .with_parallel(parallel.clone())
        .with_cache(a.cache.clone());
    let pipefusion = a.pipefusion.layout(a.parallel.warmup_steps)?;
    a.device
        .check_gpu_layout(&parallel, pipefusion.is_some(), env.as_ref())?;
    let backend = a.device.backend_for(env.as_ref())?;
    if pipefusion.is_some() {
        if a.parallel.distrifusion_degree.is_some() {
            bail!(
                "--pipefusion-degree with --distrifusion-degree is not supported: each \
                 PipeFusion stage splits its patches with --ulysses-degree, --ring-degree and \
                 --use-cfg-parallel"
            );
        }
        if a.parallel.parallel.is_some() {
            bail!(
                "--pipefusion-degree with --parallel auto is not supported: give the layout \
                 inside each stage explicitly (--ulysses-degree, --ring-degree, --use-cfg-parallel)"
            );
        }
    }
    pipe = pipe.with_pipefusion(pipefusion);
    if let Some(path) = &a.teacache_rescale {
        pipe = pipe.with_teacache_rescale(ditto::TeaCacheRescale::read(path)?);
    }
    let per_condition = a.num_samples.unwrap_or(if builtin { 4 } else { 1 });
    if per_condition == 0 {
        bail!("--num-samples must be at least 1");
    }
    let mut classes = a
        .class_label
        .iter()
        .map(|c| parse_class(c, &pipe))
        .collect::<Result<Vec<_>>>()?;
    let prompt = a
        .prompt_embeds
        .as_deref()
        .map(PromptEmbeds::read)
        .transpose()?;
    if let Some(n) = pipe.num_classes() {
        if prompt.is_some() {
            bail!(
                "this {} model is class-conditional: use --class-label, not --prompt-embeds",
                pipe.family()
            );
        }
        if classes.is_empty() {
            if !builtin {
                bail!(
                    "this model is class-conditional: give --class-label (0..={})",
                    n.saturating_sub(1)
                );
            }
            classes = (0..n).collect();
        }
    } else {
        if !classes.is_empty() {
            bail!(
                "this {} model is text-conditioned: use --prompt-embeds, not --class-label",
                pipe.family()
            );
        }
        if prompt.is_none() {
            bail!("this {} model is text-conditioned: give --prompt-embeds FILE (text-encoder outputs)", pipe.family());
        }
    }

    // Rows of the grid are conditions, columns samples; sample j uses seed + j.
    let conditions = match &prompt {
        Some(p) => p.prompt_embeds.shape.first().copied().unwrap_or(1),
        None => classes.len(),
    };
    let mut request = match &prompt {
        Some(p) => GenerateRequest::prompt(PromptEmbeds {
            prompt_embeds: repeat_rows(&p.prompt_embeds, per_condition),
            negative_prompt_embeds: p.negative_prompt_embeds.as_ref().map(|t| {
                if t.shape.first() == Some(&1) {
                    t.clone()
                } else {
                    repeat_rows(t, per_condition)
                }
            }),
            pooled_prompt_embeds: p
                .pooled_prompt_embeds
                .as_ref()
                .map(|t| repeat_rows(t, per_condition)),
            negative_pooled_prompt_embeds: p.negative_pooled_prompt_embeds.as_ref().map(|t| {
                if t.shape.first() == Some(&1) {
                    t.clone()
                } else {
                    repeat_rows(t, per_condition)
                }
            }),
        }),
        None => GenerateRequest::classes(
            classes
                .iter()
                .flat_map(|&c| std::iter::repeat_n(c, per_condition))
                .collect(),
        ),
    };
    let (rows, cols) = match &a.latents {
        Some(path) => {
            if a.num_samples.is_some() {
                bail!("--num-samples does not apply with --latents (the batch is the latents' first axis)");
            }
            let mut file = ditto::read_tensors(path)?;
            let lat = file
                .remove("latents")
                .ok_or_else(|| anyhow!("{}: no tensor named `latents`", path.display()))?;
            let b = lat.shape.first().copied().unwrap_or(0);
            if let Some(p) = &mut request.prompt {
                // The latents set the batch: the prompt rows are taken as they are.
                if let Some(orig) = &prompt {
                    *p = orig.clone();
                }
            } else if classes.len() == 1 || classes.len() == b {
                request.class_labels = classes.clone();
            } else {
                bail!(
                    "{} class labels for {b} latents: give one label, or one per latent",
                    classes.len()
                );
            }
            request.noise = Noise::Latents(lat);
            let cols = (b as f64).sqrt().ceil().max(1.0) as usize;
            (b.div_ceil(cols), cols)
        }
        None => {
            let seeds = (0..conditions)
                .flat_map(|_| (0..per_condition as u64).map(|j| a.seed.wrapping_add(j)))
                .collect();
            request.noise = Noise::Seeds(seeds);
            (conditions, per_condition)
        }
    };
    request.steps = a.steps;
    request.guidance = a.guidance;
    request.height = a.height;
    request.width = a.width;
    if a.scheduler_timesteps {
        request.timesteps = TimestepSchedule::Scheduler;
    }

    // The request is checked before meeting the other ranks: a bad flag fails every rank
    // alike, at once, instead of leaving the others waiting at the rendezvous.
    let stages = a.pipefusion.pipefusion_degree.unwrap_or(1);
    let member = join_run(env, &parallel, stages, timeout)?;
    pipe = pipe.with_rank_options(RankOptions {
        timeout,
        comm: member.as_ref().map(|m| m.comm.clone()),
        backend,
    });
    let labels: Vec<String> = if prompt.is_none() {
        classes
            .iter()
            .map(|c| {
                pipe.labels()
                    .get(c)
                    .map_or(c.to_string(), |n| format!("{c} {n}"))
            })
            .collect()
    } else {
        Vec::new()
    };
    let result = generate_run(
        &a,
        &mut pipe,
        &request,
        leader,
        (rows, cols),
        &labels,
        member.is_some(),
    );
    leave_run(member, result)
}

/// The denoising loop and the outputs of `generate` (written by the leader only: rank 0
/// of a multi-process run, where every process ends with the same image).
fn generate_run(
    a: &GenerateArgs,
    pipe: &mut ditto::Pipeline,
    request: &ditto::GenerateRequest,
    leader: bool,
    (rows, cols): (usize, usize),
    labels: &[String],
    multi_process: bool,
) -> Result<()> {
    use ditto::Progress;
    let steps = a.steps.unwrap_or(pipe.default_steps());
    let guidance = a.guidance.unwrap_or(pipe.default_guidance());
    if leader {
        eprintln!(
            "{} ({}, {}): {} step(s), guidance {guidance}{}; compiling...",
            pipe.source(),
            pipe.pipeline_class(),
            pipe.scheduler_class(),
            steps,
            if pipe.uses_cfg(guidance) {
                " (CFG)"
            } else {
                ""
            },
        );
    }
    let mut bar: Option<indicatif::ProgressBar> = None;
    let mut total = 0.0f64;
    let result = pipe.generate_with(request, &mut |p| match p {
        // Other ranks print nothing but errors.
        _ if !leader => {}
        Progress::Compiled { seconds, num_steps } => {
            eprintln!("compiled in {seconds:.2}s");
            let pb = indicatif::ProgressBar::new(num_steps as u64);
            pb.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40.cyan/blue} {pos}/{len} steps [{elapsed_precise}] {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar = Some(pb);
        }
        Progress::Step { step, seconds, .. } => {
            total += seconds;
            if let Some(pb) = &bar {
                pb.set_message(format!("{:.3} s/step", total / (step + 1) as f64));
                pb.inc(1);
            }
        }
        Progress::Decoded { seconds } => eprintln!("decoded in {seconds:.2}s"),
        Progress::Forward { .. } => {}
    });
    if let Some(pb) = bar.take() {
        pb.finish_and_clear();
    }
    let gen = result?;
    if !leader {
        return Ok(());
    }

    let &[_, _, h, w] = gen.image.shape.as_slice() else {
        bail!("unexpected image shape {:?}", gen.image.shape);
    };
    let upscale = a.upscale.unwrap_or((128 / h.max(w).max(1)).max(1));
    let img = ditto::pipeline::grid(&gen.image, rows, cols, upscale)?;
    ditto::pipeline::write_png(&a.out, &img)?;
    if let Some(path) = &a.save_latents {
        ditto::write_tensors(path, &[("latents", &gen.latents), ("image", &gen.image)])?;
        eprintln!("wrote {}", path.display());
    }
    let n = gen.step_seconds.len().max(1) as f64;
    let per_step = gen.step_seconds.iter().sum::<f64>() / n;
    println!(
        "wrote {} ({}x{} grid of {h}x{w} images{}{}): {} steps at {:.3} s/step{}",
        a.out.display(),
        rows,
        cols,
        if upscale > 1 {
            format!(", shown {upscale}x")
        } else {
            String::new()
        },
        if labels.is_empty() || a.latents.is_some() {
            String::new()
        } else {
            format!("; rows: {}", labels.join(", "))
        },
        gen.step_seconds.len(),
        per_step,
        if gen.cfg {
            format!(" (batch {} with CFG)", 2 * gen.latents.shape[0])
        } else {
            String::new()
        },
    );
    let cache = pipe.cache_report().filter(|c| !c.policy.is_none());
    if let Some(c) = cache {
        println!("{}", ditto::report::cache_summary(c));
    }
    if a.compare_serial {
        print!("{}", compare_serial(a, request, &gen)?);
    }
    if a.report {
        if let Some(c) = cache {
            print!("{}", ditto::report::cache_steps(c, &gen.timesteps));
        }
        if let Some(rep) = pipe.pipefusion_report() {
            print!("{}", ditto::report::pipefusion(rep));
            if multi_process {
                println!("(multi-process run: measured columns for rank 0 only; the analytic ones for every rank)");
            }
        } else if let Some((program, stats)) = pipe.transformer_ranks() {
            print!(
                "{}",
                ditto::report::communication(program, stats, gen.step_seconds.len())
            );
            if multi_process {
                println!("{OWN_TRAFFIC_NOTE}");
            }
        }
    }
    Ok(())
}

/// `--compare-serial`: the same request on the exact serial pipeline, and the distances.
fn compare_serial(
    a: &GenerateArgs,
    request: &ditto::GenerateRequest,
    gen: &ditto::Generation,
) -> Result<String> {
    let mut serial = match &a.model {
        Some(dir) => ditto::Pipeline::load(dir)?,
        None => ditto::Pipeline::builtin()?,
    };
    eprintln!("running the serial pipeline for --compare-serial...");
    let reference = serial.generate(request)?;
    Ok(ditto::report::versus_serial(&reference, gen))
}

#[derive(Args)]
struct BenchForwardArgs {
    #[command(flatten)]
    model: BenchModelArgs,
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    #[arg(long, default_value_t = 3)]
    iters: usize,
    /// Worker threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Write the output (`output`) here as safetensors.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Write the report here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// A safetensors file whose `output` tensor is the reference to compare against.
    #[arg(long)]
    reference: Option<PathBuf>,
    #[command(flatten)]
    device: DeviceArgs,
}

/// The random-weight model a benchmark runs.
#[derive(Args)]
struct BenchModelArgs {
    /// A config.json, or a preset: pixart-sigma (PixArt-Σ XL/2 256 px), pixart-sigma-1024
    /// (1024 px: --latent-size 128 is its default), flux-dev (FLUX.1-dev; 1024 px is
    /// --latent-size 64 --text-len 512 --batch 1).
    #[arg(long, default_value = "pixart-sigma")]
    config: PathBuf,
    #[arg(long, default_value_t = 2)]
    batch: usize,
    #[arg(long, default_value_t = 300)]
    text_len: usize,
    /// Latent height = width (default: the config's sample_size).
    #[arg(long)]
    latent_size: Option<usize>,
    /// Seed of the weights and inputs.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Checkpoint folder to write (default: under the system temp dir); reused when it
    /// already holds the same random weights.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Replace a config entry, e.g. `--set num_layers=2` (a model of the same widths with
    /// fewer blocks); the value is JSON. Repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

impl BenchModelArgs {
    fn options(&self) -> Result<ForwardBenchOptions> {
        Ok(ForwardBenchOptions {
            config: self.config.clone(),
            batch: self.batch,
            text_len: self.text_len,
            latent_size: self.latent_size,
            seed: self.seed,
            weights_out: self.dir.clone(),
            overrides: config_overrides(&self.set)?,
            ..ForwardBenchOptions::default()
        })
    }
}

/// `key=value` pairs of `--set`, the value parsed as JSON (a bare word is a string).
fn config_overrides(set: &[String]) -> Result<Vec<(String, serde_json::Value)>> {
    set.iter()
        .map(|kv| {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| anyhow!("--set `{kv}`: expected KEY=VALUE"))?;
            let value =
                serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::String(v.into()));
            Ok((k.trim().to_string(), value))
        })
        .collect()
}

fn bench_forward_cmd(a: BenchForwardArgs) -> Result<()> {
    let report = bench_forward(&ForwardBenchOptions {
        warmup: a.warmup,
        iters: a.iters,
        threads: a.threads,
        backend: a.device.backend()?,
        ..a.model.options()?
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
            .ok_or_else(|| anyhow!("{} has no `output` tensor", path.display()))?;
        println!(
            "max rel err vs {}: {:.3e}",
            path.display(),
            report.output.max_rel_err(want)
        );
    }
    Ok(())
}

fn bench_kernels_cmd(a: BenchKernelsArgs) -> Result<()> {
    use ditto::codegen::cuda::{cuda_include_dirs, cuda_plan, KernelCache};
    use ditto::runtime::gpu::CudaDevice;
    let ditto::Backend::Cuda { ordinal, dtype } = a.device.backend()? else {
        bail!("bench kernels times CUDA kernels: give --device cuda (or cuda:N)");
    };
    let mut device = CudaDevice::new(ordinal)?;
    let bench = ditto::bench::bench_model(&a.model.options()?)?;
    let model = Model::load(&bench.dir)?;
    let program = model
        .compile(&bench.shapes, &CompileOptions::default())?
        .program;
    let plan = cuda_plan(&program, dtype)?;
    let cache = match ditto::backend::kernel_cache_dir() {
        Some(d) => KernelCache::with_dir(d),
        None => KernelCache::new(),
    };
    let ptx: Vec<String> = cache
        .compile(&plan.kernels, &device.arch_name(), &cuda_include_dirs())?
        .into_iter()
        .map(|(_, p)| p.to_string())
        .collect();
    let report = ditto::bench_kernels::bench_kernels(&mut device, &program, &plan, &ptx, a.reps)?;
    print!("{report}");
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}

#[derive(Args)]
struct AnalyzeArgs {
    /// Pipeline folder in diffusers' layout. Default: the built-in shapes-dit model (all its
    /// classes unless --class-label is given).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Prompt embeddings (text-encoder outputs, as for `generate`), one file per prompt;
    /// repeat the flag or separate with commas. Each file is one condition.
    #[arg(long, value_delimiter = ',')]
    prompt_embeds: Vec<PathBuf>,
    /// Class labels of a class-conditional model, numbers or names, comma-separated.
    #[arg(long, value_delimiter = ',')]
    class_label: Vec<String>,
    /// Seeds; every condition runs once per seed (a batch of one class, or of the rows of
    /// one prompt file).
    #[arg(long, value_delimiter = ',', default_value = "0,1")]
    seeds: Vec<u64>,
    /// Step counts, comma-separated (default: the pipeline's). Several: the summary says
    /// whether the curves keep their shape across step counts.
    #[arg(long, value_delimiter = ',')]
    steps: Vec<usize>,
    /// Classifier-free guidance scale (default: the pipeline's).
    #[arg(long)]
    guidance: Option<f32>,
    /// Scheduler instead of the pipeline's (same betas): ddim, dpm, flow-euler, or a
    /// diffusers class name.
    #[arg(long)]
    scheduler: Option<String>,
    /// Use the scheduler's own timestep spacing even where the pipeline passes sigmas.
    #[arg(long)]
    scheduler_timesteps: bool,
    /// Image height in pixels (default: the model's sample size).
    #[arg(long)]
    height: Option<usize>,
    /// Image width in pixels (default: the model's sample size).
    #[arg(long)]
    width: Option<usize>,
    /// Folder for redundancy.csv, summary.txt, summary.json and the SVG plots.
    #[arg(long)]
    out: PathBuf,
    /// Also fit TeaCache's degree-4 rescaling polynomial (block 0's modulated-input change
    /// -> model-output change) and save it as OUT/teacache.json and, for a pipeline folder,
    /// transformer/teacache.json, where `generate --cache teacache:T` finds it.
    #[arg(long)]
    fit_teacache: bool,
}

fn analyze(a: AnalyzeArgs) -> Result<()> {
    use ditto::analyze::{self as an, AnalyzeOptions, Condition};
    use ditto::{Pipeline, PromptEmbeds, TimestepSchedule};

    let builtin = a.model.is_none();
    let mut pipe = match &a.model {
        Some(dir) => Pipeline::load(dir)?,
        None => Pipeline::builtin()?,
    };
    if let Some(s) = &a.scheduler {
        let class = match s.to_ascii_lowercase().as_str() {
            "ddim" => "DDIMScheduler",
            "dpm" | "dpm-solver" | "dpmsolver" => "DPMSolverMultistepScheduler",
            "flow-euler" | "flow-match" | "flow" => "FlowMatchEulerDiscreteScheduler",
            _ => s.as_str(),
        };
        pipe = pipe.with_scheduler(class)?;
    }
    let conditions: Vec<Condition> = if let Some(n) = pipe.num_classes() {
        if !a.prompt_embeds.is_empty() {
            bail!(
                "this {} model is class-conditional: use --class-label, not --prompt-embeds",
                pipe.family()
            );
        }
        let mut classes = a
            .class_label
            .iter()
            .map(|c| parse_class(c, &pipe))
            .collect::<Result<Vec<_>>>()?;
        if classes.is_empty() {
            if !builtin {
                bail!(
                    "this model is class-conditional: give --class-label (0..={})",
                    n.saturating_sub(1)
                );
            }
            classes = (0..n).collect();
        }
        classes
            .into_iter()
            .map(|label| Condition::Class {
                label,
                name: pipe.labels().get(&label).cloned().unwrap_or_default(),
            })
            .collect()
    } else {
        if !a.class_label.is_empty() {
            bail!(
                "this {} model is text-conditioned: use --prompt-embeds, not --class-label",
                pipe.family()
            );
        }
        if a.prompt_embeds.is_empty() {
            bail!(
                "this {} model is text-conditioned: give --prompt-embeds FILE (one or more)",
                pipe.family()
            );
        }
        a.prompt_embeds
            .iter()
            .map(|path| {
                let stem = path.file_stem().map_or(path.display().to_string(), |s| {
                    s.to_string_lossy().into_owned()
                });
                let name = if a
                    .prompt_embeds
                    .iter()
                    .filter(|p| p.file_stem() == path.file_stem())
                    .count()
                    > 1
                {
                    path.display().to_string()
                } else {
                    stem
                };
                Ok(Condition::Prompt {
                    name,
                    embeds: PromptEmbeds::read(path)?,
                })
            })
            .collect::<Result<Vec<_>>>()?
    };
    let steps = if a.steps.is_empty() {
        vec![pipe.default_steps()]
    } else {
        a.steps.clone()
    };
    if a.fit_teacache {
        if let Some(n) = steps.iter().find(|&&n| n < an::FIT_MIN_STEPS) {
            bail!(
                "--fit-teacache needs at least {} steps per run (5 changes between the steps TeaCache decides on, to fit a degree-4 polynomial), got --steps {n}",
                an::FIT_MIN_STEPS
            );
        }
    }
    if a.seeds.is_empty() {
        bail!("--seeds: give at least one seed");
    }
    let opts = AnalyzeOptions {
        conditions,
        seeds: a.seeds.clone(),
        steps,
        guidance: a.guidance,
        height: a.height,
        width: a.width,
        timesteps: if a.scheduler_timesteps {
            TimestepSchedule::Scheduler
        } else {
            TimestepSchedule::Pipeline
        },
    };
    let runs = opts.conditions.len() * opts.seeds.len() * opts.steps.len();
    eprintln!(
        "{} ({}, {}): {runs} run(s) of {:?} step(s), recording every layer...",
        pipe.source(),
        pipe.pipeline_class(),
        pipe.scheduler_class(),
        opts.steps
    );
    let total: usize = opts.steps.iter().sum::<usize>() * opts.conditions.len() * opts.seeds.len();
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40.cyan/blue} {pos}/{len} steps [{elapsed_precise}<{eta_precise}]",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let analysis = an::record(&mut pipe, &opts, &mut |done, _| {
        bar.set_position(done as u64)
    });
    bar.finish_and_clear();
    let analysis = analysis?;
    let files = an::write_outputs(&analysis, &a.out)?;
    print!("{}", an::stability_text(&analysis, &analysis.summary()));
    println!(
        "wrote {} file(s) to {} (redundancy.csv, summary.txt, summary.json, {} SVG plots)",
        files.len(),
        a.out.display(),
        files
            .iter()
            .filter(|f| f.extension().is_some_and(|e| e == "svg"))
            .count()
    );
    if a.fit_teacache {
        let rescale = an::fit_teacache(&analysis)?;
        let path = a.out.join(ditto::pipeline::cache::TEACACHE_FILE);
        rescale.write(&path)?;
        let r2 = rescale
            .fit
            .as_ref()
            .and_then(|f| f["r2"].as_f64())
            .unwrap_or(f64::NAN);
        println!(
            "TeaCache polynomial (highest degree first): {:?}, R² {r2:.4}; wrote {}",
            rescale.coefficients,
            path.display()
        );
        if builtin {
            println!(
                "the built-in model's polynomial is compiled in: pass --teacache-rescale {} to `ditto generate`, or copy it to assets/shapes-dit/transformer/teacache.json and rebuild",
                path.display()
            );
        } else {
            let dest = pipe.teacache_path();
            match rescale.write(&dest) {
                Ok(()) => println!(
                    "installed as {} (`ditto generate --cache teacache:T` uses it)",
                    dest.display()
                ),
                Err(e) => eprintln!(
                    "warning: could not install the polynomial next to the model ({e}); pass --teacache-rescale {} to `ditto generate`",
                    path.display()
                ),
            }
        }
    }
    Ok(())
}
