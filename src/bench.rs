//! Forward-pass benchmark on the CPU backend with random weights.
//!
//! [`bench_forward`] writes a real checkpoint folder (`config.json` +
//! `diffusion_pytorch_model.safetensors`, f32) filled with seeded N(0, 0.02²) weights and an
//! `io.safetensors` with the inputs, then loads that folder through the normal
//! [`Model::load`] path and times the forward pass. Writing the weights to disk (rather than
//! keeping them in memory) is what lets `bench/pytorch_forward.py` run diffusers on the very
//! same weights and inputs, so the speed ratio is measured on outputs known to agree.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;

use ditto_codegen::{Program, Step};
use ditto_ir::{Graph, Op};
use ditto_models::tensor_file::{write_tensors, HostTensor};
use ditto_models::BuildOptions;
use ditto_runtime::gpu::CudaDevice;

use crate::backend::Executor;
use crate::{Backend, CompileOptions, Error, Model};

/// PixArt-Σ XL/2 at 256×256 (`PixArt-alpha/PixArt-Sigma-XL-2-256x256`): 28 blocks, 16 heads of
/// 72, T5-XXL captions (4096 wide), a 32×32 latent and the PE interpolation scale 0.5 that
/// diffusers' `convert_pixart_sigma_to_diffusers.py` uses for 256 px.
pub const PIXART_SIGMA_256_CONFIG: &str =
    include_str!("../assets/bench/pixart-sigma-256/config.json");

/// PixArt-Σ XL/2 at 1024×1024 (`PixArt-alpha/PixArt-Sigma-XL-2-1024-MS`): the 256 px model
/// with a 128×128 latent (4096 image tokens) and PE interpolation scale 2.
pub const PIXART_SIGMA_1024_CONFIG: &str =
    include_str!("../assets/bench/pixart-sigma-1024/config.json");

/// FLUX.1-dev (`black-forest-labs/FLUX.1-dev`): 19 double-stream and 38 single-stream blocks,
/// 24 heads of 128 (3072 wide), T5 4096-wide text, guidance embedding. At 1024×1024 the
/// packed latent is 4096 tokens (`--latent-size 64` of 2×2-packed 128×128).
pub const FLUX_DEV_CONFIG: &str = include_str!("../assets/bench/flux-dev/config.json");

/// Built-in configs accepted in place of a `config.json` path.
pub const PRESETS: &[(&str, &str)] = &[
    ("pixart-sigma", PIXART_SIGMA_256_CONFIG),
    ("pixart-sigma-1024", PIXART_SIGMA_1024_CONFIG),
    ("flux-dev", FLUX_DEV_CONFIG),
];

/// Standard deviation of the random weights (the usual transformer init scale: activations
/// stay O(1) through 28 blocks, so the comparison with PyTorch is not on saturated values).
const WEIGHT_STD: f32 = 0.02;
/// Random numbers are drawn per chunk of this many elements, each chunk from its own seeded
/// stream, so generation runs in parallel yet does not depend on the thread count.
const RNG_CHUNK: usize = 1 << 16;
/// Bumped whenever the weight generator changes, so a cached folder is not reused.
const GENERATOR_VERSION: u32 = 1;
/// Written last into a weights folder: its content identifies the generated weights, and its
/// presence means the safetensors file next to it is complete.
const STAMP_FILE: &str = "bench-weights.json";
const WEIGHTS_FILE: &str = "diffusion_pytorch_model.safetensors";
/// Inputs (`input.<forward argument>`), in the fixtures' naming.
pub const IO_FILE: &str = "io.safetensors";

#[derive(Clone, Debug)]
pub struct ForwardBenchOptions {
    /// A `config.json` path, or a preset name from [`PRESETS`] (`pixart-sigma`).
    pub config: PathBuf,
    pub batch: usize,
    /// Text tokens (PixArt-Σ: 300 T5 tokens).
    pub text_len: usize,
    /// Latent height = width; `None` is the config's `sample_size`.
    pub latent_size: Option<usize>,
    /// Untimed runs first (buffers get faulted in, caches and the thread pool warm up).
    pub warmup: usize,
    /// Timed runs (at least one).
    pub iters: usize,
    /// Rayon threads; 0 means one per core.
    pub threads: usize,
    /// Seed of the weights and inputs.
    pub seed: u64,
    /// Where to write the checkpoint folder; `None` is a folder under the system temp dir
    /// named after the config and seed. A folder already holding the same generated weights
    /// is reused.
    pub weights_out: Option<PathBuf>,
    /// Where the forward pass runs.
    pub backend: Backend,
    /// Config entries replaced before building (`num_layers` -> `2`: a model of the same
    /// widths with fewer blocks). Values are JSON.
    pub overrides: Vec<(String, serde_json::Value)>,
}

impl Default for ForwardBenchOptions {
    fn default() -> Self {
        ForwardBenchOptions {
            config: PathBuf::from("pixart-sigma"),
            batch: 2,
            text_len: 300,
            latent_size: None,
            warmup: 1,
            iters: 3,
            threads: 0,
            seed: 0,
            weights_out: None,
            backend: Backend::Cpu,
            overrides: Vec::new(),
        }
    }
}

/// Time of one step kind, per forward pass (mean over the timed runs).
#[derive(Clone, Debug, Serialize)]
pub struct ProfileRow {
    pub kind: String,
    /// Steps of this kind in one forward pass.
    pub steps: usize,
    pub seconds: f64,
    /// Share of the summed step times.
    pub percent: f64,
    /// Achieved rate for the kinds [`Program::flops`] counts (GEMMs, attention, convs).
    pub gflops: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ForwardBenchReport {
    /// The checkpoint folder that was benchmarked (the PyTorch script loads the same one).
    pub model_dir: PathBuf,
    pub class_name: String,
    pub batch: usize,
    pub height: usize,
    pub width: usize,
    pub text_len: usize,
    pub image_tokens: usize,
    pub threads: usize,
    /// Where it ran (the GPU, its storage type and memory).
    pub device: String,
    pub parameters: usize,
    pub steps: usize,
    /// Floating-point operations of one forward pass ([`Program::flops`]).
    pub flops: f64,
    /// Seconds spent generating and writing the weights (0 when a cached folder was reused).
    pub generate_s: f64,
    pub compile_s: f64,
    pub load_s: f64,
    pub warmup: usize,
    pub iters: usize,
    /// Wall time of each timed run.
    pub times_s: Vec<f64>,
    pub median_s: f64,
    pub min_s: f64,
    /// `flops / median_s`.
    pub gflops: f64,
    /// Slowest kinds first.
    pub profile: Vec<ProfileRow>,
    /// The `sample` output of the last timed run.
    #[serde(skip)]
    pub output: HostTensor,
}

impl std::fmt::Display for ForwardBenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} batch {} latent {}x{} ({} image tokens) text {} | {:.0}M params, {} steps, {:.1} GFLOP/forward, {} threads",
            self.class_name,
            self.batch,
            self.height,
            self.width,
            self.image_tokens,
            self.text_len,
            self.parameters as f64 / 1e6,
            self.steps,
            self.flops / 1e9,
            self.threads
        )?;
        writeln!(f, "device: {}", self.device)?;
        writeln!(
            f,
            "forward: median {:.4} s, min {:.4} s over {} runs ({} warmup) = {:.1} GFLOP/s",
            self.median_s, self.min_s, self.iters, self.warmup, self.gflops
        )?;
        writeln!(
            f,
            "setup: weights {:.1} s, compile {:.2} s, load {:.2} s",
            self.generate_s, self.compile_s, self.load_s
        )?;
        writeln!(
            f,
            "{:<20} {:>6} {:>10} {:>7} {:>9}",
            "step kind", "steps", "seconds", "%", "GFLOP/s"
        )?;
        for r in &self.profile {
            let rate = r.gflops.map_or(String::new(), |g| format!("{g:.1}"));
            writeln!(
                f,
                "{:<20} {:>6} {:>10.4} {:>6.1}% {:>9}",
                r.kind, r.steps, r.seconds, r.percent, rate
            )?;
        }
        Ok(())
    }
}

/// Generates (or reuses) the random checkpoint, then times the forward pass. See the module
/// docs.
pub fn bench_forward(opts: &ForwardBenchOptions) -> Result<ForwardBenchReport, Error> {
    if opts.iters == 0 {
        return Err(Error::Input("iters must be at least 1".into()));
    }
    if opts.batch == 0 {
        return Err(Error::Input("batch must be at least 1".into()));
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.threads)
        .thread_name(|i| format!("ditto-bench-{i}"))
        .build()
        .map_err(|e| Error::Input(format!("cannot start {} threads: {e}", opts.threads)))?;
    // Everything, weight generation included, runs inside the pool so `threads` bounds
    // every parallel region (the kernels size their work by `current_num_threads`).
    pool.install(|| bench_in_pool(opts, pool.current_num_threads()))
}

/// The benchmark's checkpoint folder on disk (written unless it already holds the same
/// random weights) with its inputs, and the shapes they have.
pub struct BenchModel {
    pub dir: PathBuf,
    pub family: Box<dyn ditto_models::family::ModelFamily>,
    pub shapes: ditto_models::Shapes,
    pub inputs: Vec<(String, HostTensor)>,
    /// Seconds spent generating weights (0 when the folder was reused).
    pub generate_s: f64,
}

/// Writes (or reuses) the checkpoint folder `opts` describes.
pub fn bench_model(opts: &ForwardBenchOptions) -> Result<BenchModel, Error> {
    let (config_text, config_label) = resolve_config(&opts.config)?;
    let mut config: serde_json::Value =
        serde_json::from_str(&config_text).map_err(|e| Error::Io {
            path: config_label.clone(),
            reason: format!("invalid JSON: {e}"),
        })?;
    for (key, value) in &opts.overrides {
        let obj = config.as_object_mut().ok_or_else(|| Error::Io {
            path: config_label.clone(),
            reason: "the config is not a JSON object".into(),
        })?;
        if !obj.contains_key(key) {
            return Err(Error::Input(format!(
                "--set {key}: {config_label} has no entry `{key}`"
            )));
        }
        obj.insert(key.clone(), value.clone());
    }
    let family = ditto_models::family::from_config(&config, &config_label)?;
    let mut shapes = family.default_shapes();
    shapes.batch = opts.batch;
    shapes.text_len = opts.text_len;
    if let Some(s) = opts.latent_size {
        shapes.height = s;
        shapes.width = s;
    }
    // The graph before any pass names every checkpoint tensor the model reads, with the
    // shape it expects, and every input.
    let graph = family.build(&shapes, &BuildOptions::default())?;
    let weights = graph_weights(&graph);
    let inputs = graph_inputs(&graph)?;

    let dir = match &opts.weights_out {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!(
            "ditto-bench-{}-{:016x}",
            family.family(),
            fnv1a(format!("{config}/{}", opts.seed).as_bytes())
        )),
    };
    let t0 = Instant::now();
    let generated = write_checkpoint(&dir, &config, &weights, opts.seed)?;
    let generate_s = if generated {
        t0.elapsed().as_secs_f64()
    } else {
        0.0
    };

    let input_tensors = make_inputs(&inputs, opts.seed)?;
    let named: Vec<(String, &HostTensor)> = input_tensors
        .iter()
        .map(|(n, t)| (format!("input.{n}"), t))
        .collect();
    let refs: Vec<(&str, &HostTensor)> = named.iter().map(|(n, t)| (n.as_str(), *t)).collect();
    write_tensors(&dir.join(IO_FILE), &refs)?;

    Ok(BenchModel {
        dir,
        family,
        shapes,
        inputs: input_tensors,
        generate_s,
    })
}

fn bench_in_pool(opts: &ForwardBenchOptions, threads: usize) -> Result<ForwardBenchReport, Error> {
    if let Backend::Cuda { ordinal, .. } = opts.backend {
        // Before minutes of weight generation: is there such a GPU at all?
        CudaDevice::check_ordinal(ordinal)?;
    }
    let BenchModel {
        dir,
        family,
        shapes,
        inputs: input_tensors,
        generate_s,
    } = bench_model(opts)?;
    let model = Model::load(&dir)?;
    let t0 = Instant::now();
    let compiled = model.compile(&shapes, &CompileOptions::default())?;
    let compile_s = t0.elapsed().as_secs_f64();
    let t0 = Instant::now();
    let loaded = model.load_weights(&compiled.program)?;
    let mut load_s = t0.elapsed().as_secs_f64();
    let program = Arc::new(compiled.program);
    let t0 = Instant::now();
    let mut exec = Executor::on(opts.backend, program.clone(), loaded)?;
    // On the GPU: compiling the kernels and uploading the weights.
    load_s += t0.elapsed().as_secs_f64();

    let mut bound: Vec<&[f32]> = Vec::with_capacity(program.inputs.len());
    for b in &program.inputs {
        let t = input_tensors
            .iter()
            .find(|(n, _)| *n == b.name)
            .map(|(_, t)| t)
            .ok_or_else(|| Error::Input(format!("the program takes no input `{}`", b.name)))?;
        bound.push(&t.data);
    }

    for _ in 0..opts.warmup {
        exec.run(&bound)?;
    }
    let device = exec.describe();
    let mut times = Vec::with_capacity(opts.iters);
    let mut by_kind: Vec<(&'static str, f64)> = Vec::new();
    let mut last = Vec::new();
    for _ in 0..opts.iters {
        // Profiling costs two clock reads per step (~1k steps), far below the noise.
        let t0 = Instant::now();
        // Per step kind on the CPU backend only: GPU steps run asynchronously, timed as a
        // whole, uploads and downloads included.
        let (out, by_step_kind) = match &mut exec {
            Executor::Cpu(e) => {
                let (out, profile) = e.run_profiled(&bound)?;
                (out, profile.by_kind)
            }
            other => (other.run(&bound)?, Vec::new()),
        };
        times.push(t0.elapsed().as_secs_f64());
        for (kind, secs, _) in by_step_kind {
            match by_kind.iter_mut().find(|(k, _)| *k == kind) {
                Some(e) => e.1 += secs,
                None => by_kind.push((kind, secs)),
            }
        }
        last = out;
    }

    let sample_pos = program
        .outputs
        .iter()
        .position(|(n, _)| n == "sample")
        .unwrap_or(0);
    let sample_v = program.outputs[sample_pos].1;
    let output = HostTensor::new(
        program.values[sample_v].shape.clone(),
        last.swap_remove(sample_pos),
    );

    let iters = opts.iters as f64;
    let total: f64 = by_kind.iter().map(|(_, s)| s / iters).sum();
    let mut profile: Vec<ProfileRow> = by_kind
        .iter()
        .map(|&(kind, secs)| {
            let secs = secs / iters;
            let (steps, flops) = kind_stats(&program, kind);
            ProfileRow {
                kind: kind.to_string(),
                steps,
                seconds: secs,
                percent: if total > 0.0 {
                    100.0 * secs / total
                } else {
                    0.0
                },
                gflops: (flops > 0.0 && secs > 0.0).then(|| flops / secs / 1e9),
            }
        })
        .collect();
    profile.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));

    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median_s = median(&sorted);
    let flops = program.flops();
    let summary = family.summary(&shapes);
    Ok(ForwardBenchReport {
        model_dir: dir,
        class_name: summary.class_name,
        batch: shapes.batch,
        height: shapes.height,
        width: shapes.width,
        text_len: shapes.text_len,
        image_tokens: summary.image_tokens,
        threads,
        device,
        parameters: model.checkpoint().num_parameters(),
        steps: program.steps.len(),
        flops,
        generate_s,
        compile_s,
        load_s,
        warmup: opts.warmup,
        iters: opts.iters,
        median_s,
        min_s: sorted[0],
        gflops: flops / median_s / 1e9,
        times_s: times,
        profile,
        output,
    })
}

/// The config text and a label for errors: a file if one exists at `config`, else a preset.
fn resolve_config(config: &Path) -> Result<(String, String), Error> {
    if config.is_file() {
        let text = fs::read_to_string(config).map_err(|e| Error::Io {
            path: config.display().to_string(),
            reason: format!("cannot read: {e}"),
        })?;
        return Ok((text, config.display().to_string()));
    }
    let name = config.to_string_lossy();
    match PRESETS.iter().find(|(n, _)| *n == name) {
        Some((n, text)) => Ok((text.to_string(), format!("preset {n}"))),
        None => Err(Error::Input(format!(
            "`{name}` is neither a config.json file nor a preset (presets: {})",
            PRESETS
                .iter()
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        0.5 * (sorted[n / 2 - 1] + sorted[n / 2])
    }
}

/// Steps of `kind` in one pass and their FLOPs, counted as [`Program::flops`] does.
fn kind_stats(p: &Program, kind: &str) -> (usize, f64) {
    let mut steps = 0;
    let mut flops = 0.0;
    for s in p.steps.iter().filter(|s| s.kind() == kind) {
        steps += 1;
        flops += match s {
            Step::Linear { m, k, n, .. } => 2.0 * (m * k * n) as f64,
            Step::Attention {
                batch,
                sq,
                sk,
                heads,
                head_dim,
                head_dim_v,
                ..
            } => 2.0 * (batch * heads * sq * sk * (head_dim + head_dim_v)) as f64,
            Step::Conv2d { w, out, .. } => {
                let ws = &p.values[*w].shape;
                2.0 * (p.values[*out].numel() * ws[1] * ws[2] * ws[3]) as f64
            }
            _ => 0.0,
        };
    }
    (steps, flops)
}

/// Name and shape of every checkpoint tensor the graph reads, sorted by name.
fn graph_weights(g: &Graph) -> Vec<(String, Vec<usize>)> {
    let mut out: Vec<(String, Vec<usize>)> = g
        .nodes()
        .iter()
        .filter_map(|op| match op {
            Op::Weight(ch) => Some((
                g.name_attr(ch[0])?.to_string(),
                ch[1..]
                    .iter()
                    .map(|&c| g.int_attr(c).map(|d| d as usize))
                    .collect::<Option<Vec<_>>>()?,
            )),
            _ => None,
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Name and shape of every graph input, refusing non-f32 ones (the generator below only
/// knows how to fill float tensors and timesteps).
fn graph_inputs(g: &Graph) -> Result<Vec<(String, Vec<usize>)>, Error> {
    let mut out = Vec::new();
    for op in g.nodes() {
        if let Op::Input(ch) = op {
            let name = g
                .name_attr(ch[0])
                .map(|s| s.to_string())
                .unwrap_or_default();
            let dtype = g
                .name_attr(ch[1])
                .map(|s| s.to_string())
                .unwrap_or_default();
            if dtype != "f32" {
                return Err(Error::Input(format!(
                    "input `{name}` is {dtype}: the benchmark only generates f32 inputs"
                )));
            }
            let shape = ch[2..]
                .iter()
                .map(|&c| g.int_attr(c).unwrap_or(0) as usize)
                .collect();
            out.push((name, shape));
        }
    }
    Ok(out)
}

/// Seeded inputs: `timestep` spread over (0, 1000) like a sampler's, everything else N(0, 1)
/// (latents are unit-variance noise; T5 embeddings are of the same order).
fn make_inputs(
    inputs: &[(String, Vec<usize>)],
    seed: u64,
) -> Result<Vec<(String, HostTensor)>, Error> {
    inputs
        .iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let data = if name == "timestep" {
                (0..n)
                    .map(|i| (999 * (i + 1) / (n + 1)) as f32)
                    .collect::<Vec<_>>()
            } else {
                let mut v = vec![0.0f32; n];
                fill_normal(&mut v, seed, name, 1.0);
                v
            };
            Ok((name.clone(), HostTensor::new(shape.clone(), data)))
        })
        .collect()
}

/// Writes `config.json` and the random weights into `dir` unless the stamp says the same
/// weights are already there. Returns whether weights were generated.
fn write_checkpoint(
    dir: &Path,
    config: &serde_json::Value,
    weights: &[(String, Vec<usize>)],
    seed: u64,
) -> Result<bool, Error> {
    let io_err = |path: &Path, what: &str, e: std::io::Error| Error::Io {
        path: path.display().to_string(),
        reason: format!("{what}: {e}"),
    };
    fs::create_dir_all(dir).map_err(|e| io_err(dir, "cannot create", e))?;
    let stamp = serde_json::json!({
        "generator": GENERATOR_VERSION,
        "seed": seed,
        "std": WEIGHT_STD,
        "config": config,
        "tensors": weights.len(),
    });
    let stamp_path = dir.join(STAMP_FILE);
    let weights_path = dir.join(WEIGHTS_FILE);
    let cached = fs::read_to_string(&stamp_path)
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .is_some_and(|s| s == stamp)
        && weights_path.is_file();
    let config_path = dir.join("config.json");
    let config_text = serde_json::to_string_pretty(config).expect("a JSON value serializes");
    fs::write(&config_path, config_text).map_err(|e| io_err(&config_path, "cannot write", e))?;
    if cached {
        return Ok(false);
    }
    // Remove the stamp first: an interrupted write must not leave a stamp that vouches for a
    // half-written file.
    let _ = fs::remove_file(&stamp_path);
    let tmp = dir.join(format!("{WEIGHTS_FILE}.tmp"));
    write_random_safetensors(&tmp, weights, seed).map_err(|e| io_err(&tmp, "cannot write", e))?;
    fs::rename(&tmp, &weights_path).map_err(|e| io_err(&weights_path, "cannot rename", e))?;
    let stamp_text = serde_json::to_string_pretty(&stamp).expect("a JSON value serializes");
    fs::write(&stamp_path, stamp_text).map_err(|e| io_err(&stamp_path, "cannot write", e))?;
    Ok(true)
}

/// Streams an F32 safetensors file tensor by tensor, so a 2.4 GB checkpoint never has to be
/// in memory at once (`write_tensors` would hold it twice).
fn write_random_safetensors(
    path: &Path,
    weights: &[(String, Vec<usize>)],
    seed: u64,
) -> std::io::Result<()> {
    let mut header = serde_json::Map::new();
    header.insert(
        "__metadata__".into(),
        serde_json::json!({ "format": "pt", "generator": "ditto bench_forward" }),
    );
    let mut offset = 0usize;
    for (name, shape) in weights {
        let bytes = shape.iter().product::<usize>() * 4;
        header.insert(
            name.clone(),
            serde_json::json!({
                "dtype": "F32",
                "shape": shape,
                "data_offsets": [offset, offset + bytes],
            }),
        );
        offset += bytes;
    }
    let mut header = serde_json::to_vec(&serde_json::Value::Object(header))?;
    // The format asks for the data to start 8-byte aligned; pad the header with spaces.
    while header.len() % 8 != 0 {
        header.push(b' ');
    }
    let mut w = BufWriter::with_capacity(1 << 22, File::create(path)?);
    w.write_all(&(header.len() as u64).to_le_bytes())?;
    w.write_all(&header)?;
    let mut buf: Vec<f32> = Vec::new();
    let mut bytes: Vec<u8> = Vec::new();
    for (name, shape) in weights {
        let n: usize = shape.iter().product();
        buf.clear();
        buf.resize(n, 0.0);
        fill_normal(&mut buf, seed, name, WEIGHT_STD);
        bytes.clear();
        bytes.extend(buf.iter().flat_map(|v| v.to_le_bytes()));
        w.write_all(&bytes)?;
    }
    w.into_inner().map_err(|e| e.into_error())?.sync_all()
}

/// Fills `out` with N(0, std²) values that depend only on (`seed`, `name`, index).
fn fill_normal(out: &mut [f32], seed: u64, name: &str, std: f32) {
    let base = splitmix64(seed ^ fnv1a(name.as_bytes()));
    out.par_chunks_mut(RNG_CHUNK)
        .enumerate()
        .for_each(|(ci, chunk)| {
            let mut state = splitmix64(base ^ (ci as u64).wrapping_mul(0xA24B_AED4_963E_E407));
            for pair in chunk.chunks_mut(2) {
                // Box–Muller on two uniforms in (0, 1]: 24-bit mantissas, the log never sees 0.
                state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let r = splitmix64(state);
                let u1 = ((r >> 40) as f32 + 1.0) / (1u64 << 24) as f32;
                let u2 = ((r >> 16 & 0xFF_FFFF) as f32) / (1u64 << 24) as f32;
                let rad = (-2.0 * u1.ln()).sqrt() * std;
                let (s, c) = (std::f32::consts::TAU * u2).sin_cos();
                pair[0] = rad * c;
                if let Some(x) = pair.get_mut(1) {
                    *x = rad * s;
                }
            }
        });
}

/// SplitMix64's output function: a strong 64-bit mixer, enough for benchmark noise.
fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xCBF2_9CE4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01B3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normals_are_deterministic_and_unit() {
        let mut a = vec![0.0f32; 3 * RNG_CHUNK + 5];
        let mut b = a.clone();
        fill_normal(&mut a, 7, "w", 1.0);
        fill_normal(&mut b, 7, "w", 1.0);
        assert_eq!(a, b);
        let mut c = a.clone();
        fill_normal(&mut c, 7, "other", 1.0);
        assert_ne!(a, c);
        let n = a.len() as f64;
        let mean = a.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = a.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!(mean.abs() < 0.02, "mean {mean}");
        assert!((var - 1.0).abs() < 0.02, "var {var}");
    }

    #[test]
    fn streamed_safetensors_reads_back() {
        let dir = std::env::temp_dir().join(format!("ditto-bench-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("w.safetensors");
        let weights = vec![
            ("a.weight".to_string(), vec![3, 5]),
            ("b".to_string(), vec![7]),
        ];
        write_random_safetensors(&path, &weights, 1).unwrap();
        let back = crate::read_tensors(&path).unwrap();
        let mut want = vec![0.0f32; 15];
        fill_normal(&mut want, 1, "a.weight", WEIGHT_STD);
        assert_eq!(back["a.weight"].shape, vec![3, 5]);
        assert_eq!(back["a.weight"].data, want);
        assert_eq!(back["b"].shape, vec![7]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn presets_parse() {
        for (name, text) in PRESETS {
            let v: serde_json::Value = serde_json::from_str(text).unwrap();
            ditto_models::family::from_config(&v, name).unwrap();
        }
    }
}
