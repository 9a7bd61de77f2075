//! Text/class-to-image pipelines over diffusers pipeline folders: the denoising loop of
//! diffusers' DiTPipeline, PixArtSigmaPipeline, StableDiffusion3Pipeline and FluxPipeline,
//! with the transformer (and VAE) compiled to ditto Programs.
//!
//! ```no_run
//! use ditto::{GenerateRequest, Noise, Pipeline};
//! // The built-in shapes model: class 0 (circle), seed 0, its default 20 DDIM steps.
//! let mut pipe = Pipeline::builtin()?;
//! let out = pipe.generate(&GenerateRequest::classes(vec![0]).with_noise(Noise::Seed(0)))?;
//! println!("{:?}", out.image.shape); // [1, 3, 32, 32]
//! // A diffusers folder with prompt embeddings from a file:
//! let mut pipe = Pipeline::load("tests/fixtures/sd3-pipeline")?;
//! let prompt = ditto::PromptEmbeds::read("tests/fixtures/sd3-pipeline/prompt.safetensors".as_ref())?;
//! let out = pipe.generate(&GenerateRequest::prompt(prompt).with_steps(6).with_guidance(5.0))?;
//! # Ok::<(), ditto::Error>(())
//! ```
//!
//! The loop, as in diffusers:
//! 1. Initial latents from `Noise` (PyTorch's `randn` for a seed, see [`noise`]), packed 2x2
//!    for Flux, times the scheduler's `init_noise_sigma`.
//! 2. Timesteps from the scheduler (`scheduler/scheduler_config.json`); Flux by default gets
//!    FluxPipeline's sigmas `linspace(1, 1/n, n)` (see [`TimestepSchedule`]).
//! 3. Per step: the transformer on [negative; positive] (CFG when guidance > 1; DiT's negative
//!    is the null class `num_embeds_ada_norm`), `uncond + g (cond - uncond)`, the epsilon half
//!    of learned-sigma outputs, one scheduler step. Flux embeds the guidance instead and takes
//!    `t / 1000`. One compiled program serves all steps (and later calls of the same size).
//! 4. With a VAE: unpack (Flux), `latents / scaling_factor + shift_factor`, decode. Without
//!    one (pixel-space models), the final latents are the image.

mod builtin;
pub mod cache;
mod conditioning;
mod folder;
mod guidance;
mod image;
pub mod noise;
mod packing;
pub mod pipefusion;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use ditto_models::vae::AutoencoderKLConfig;
use ditto_models::Shapes;
use ditto_runtime::scheduler::{self, Scheduler, SchedulerError};

use crate::parallel::{RankOptions, RankStats, Ranks};
use crate::{CompileOptions, HostTensor, Model, Parallel};
use conditioning::{BatchInputs, Condition, FamilyConfig};
use guidance::Guidance;

pub use cache::{CachePolicy, CacheReport, TeaCacheRescale};
pub use image::{grid, to_u8, write_png, RgbImage};
pub use noise::torch_randn;
pub use pipefusion::{PipeFusion, PipeFusionReport};

/// Errors of loading a pipeline and generating with it; each names its cause.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// A missing or malformed file of the pipeline folder.
    #[error("{}: {reason}", .path.display())]
    Folder { path: PathBuf, reason: String },
    /// A scheduler config we cannot use.
    #[error("{}: {error}", .path.display())]
    Scheduler {
        path: PathBuf,
        error: SchedulerError,
    },
    /// A request that does not fit the pipeline (steps, sizes, labels, latents).
    #[error("{0}")]
    Request(String),
    /// Prompt embeddings that do not fit the transformer.
    #[error("prompt embeddings: {0}")]
    Embeddings(String),
    /// Loading, compiling or running a component.
    #[error("{component}: {error}")]
    Model {
        component: String,
        // Boxed: crate::Error is large and this enum is returned everywhere.
        error: Box<crate::Error>,
    },
    #[error("{}: {reason}", .path.display())]
    Io { path: PathBuf, reason: String },
    #[error("internal error: {0}")]
    Internal(String),
}

impl PipelineError {
    /// [`PipelineError::Model`]: `component` failed with `error`.
    pub fn model(component: impl Into<String>, error: impl Into<crate::Error>) -> Self {
        PipelineError::Model {
            component: component.into(),
            error: Box::new(error.into()),
        }
    }
}

/// Where the initial latents come from.
#[derive(Clone, Debug, PartialEq)]
pub enum Noise {
    /// One generator for the whole batch: `torch.randn((B, ...), generator=
    /// torch.Generator().manual_seed(seed))`, as diffusers with `generator=` one generator.
    Seed(u64),
    /// One generator per sample (diffusers with a list of generators); sets the batch size.
    Seeds(Vec<u64>),
    /// Given latents in the transformer's layout ([B, C, h, w]; Flux: packed [B, h*w/4, 4C]).
    Latents(HostTensor),
}

/// How the timesteps are chosen.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum TimestepSchedule {
    /// What the family's diffusers pipeline does: FluxPipeline passes sigmas
    /// `linspace(1, 1/n, n)`; the others call the scheduler's `set_timesteps(n)`.
    #[default]
    Pipeline,
    /// The scheduler's own `set_timesteps(n)` spacing for every family. The flux fixture was
    /// made this way (timesteps [1000, 667, 334, 1] for 4 steps, not FluxPipeline's
    /// [1000, 750, 500, 250]).
    Scheduler,
    /// Explicit sigmas (flow-matching schedulers only); their count is the step count.
    Sigmas(Vec<f64>),
}

/// Text-encoder outputs, named as in the fixtures' `prompt.safetensors`.
#[derive(Clone, Debug, PartialEq)]
pub struct PromptEmbeds {
    /// [B, tokens, width]
    pub prompt_embeds: HostTensor,
    pub negative_prompt_embeds: Option<HostTensor>,
    /// [B, width] (SD3, Flux)
    pub pooled_prompt_embeds: Option<HostTensor>,
    pub negative_pooled_prompt_embeds: Option<HostTensor>,
}

impl PromptEmbeds {
    /// Reads `prompt_embeds` (required), `negative_prompt_embeds`, `pooled_prompt_embeds` and
    /// `negative_pooled_prompt_embeds` from a safetensors file.
    pub fn read(path: &Path) -> Result<PromptEmbeds, PipelineError> {
        let mut all = crate::read_tensors(path).map_err(|e| PipelineError::Io {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        // PixArt's captions come with attention masks; the transformer attends to all
        // tokens, so only masks that keep every token are acceptable.
        for mask in ["prompt_attention_mask", "negative_prompt_attention_mask"] {
            if let Some(m) = all.remove(mask) {
                if m.data.iter().any(|&v| v != 1.0) {
                    return Err(PipelineError::Embeddings(format!(
                        "{}: `{mask}` masks out tokens, which is not supported; pass the embeddings of the unpadded tokens only",
                        path.display()
                    )));
                }
            }
        }
        let prompt_embeds = all.remove("prompt_embeds").ok_or_else(|| {
            let names: Vec<&str> = all.keys().map(String::as_str).collect();
            PipelineError::Embeddings(format!(
                "{}: no tensor `prompt_embeds` (found: {})",
                path.display(),
                if names.is_empty() {
                    "nothing".to_string()
                } else {
                    names.join(", ")
                }
            ))
        })?;
        Ok(PromptEmbeds {
            prompt_embeds,
            negative_prompt_embeds: all.remove("negative_prompt_embeds"),
            pooled_prompt_embeds: all.remove("pooled_prompt_embeds"),
            negative_pooled_prompt_embeds: all.remove("negative_pooled_prompt_embeds"),
        })
    }
}

/// What to generate. Start from [`GenerateRequest::classes`] or [`GenerateRequest::prompt`];
/// unset options take the pipeline's defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateRequest {
    /// Class-conditional models (DiT): one label per sample, or one for all.
    pub class_labels: Vec<usize>,
    /// Text-conditioned models: batch 1 (shared by all samples) or one row per sample.
    pub prompt: Option<PromptEmbeds>,
    pub noise: Noise,
    /// Denoising steps (default: the pipeline's).
    pub steps: Option<usize>,
    /// CFG scale (DiT, PixArt, SD3; none when <= 1), or Flux's embedded guidance.
    pub guidance: Option<f32>,
    /// Image size in pixels (default: the model's sample size; taken from `Noise::Latents`
    /// when given there).
    pub height: Option<usize>,
    pub width: Option<usize>,
    pub timesteps: TimestepSchedule,
    /// Step caching for this request (default: the pipeline's, see [`Pipeline::with_cache`]).
    pub cache: Option<CachePolicy>,
}

impl GenerateRequest {
    fn empty() -> Self {
        GenerateRequest {
            class_labels: Vec::new(),
            prompt: None,
            noise: Noise::Seed(0),
            steps: None,
            guidance: None,
            height: None,
            width: None,
            timesteps: TimestepSchedule::Pipeline,
            cache: None,
        }
    }
    /// Class-conditional generation, seed 0.
    pub fn classes(labels: Vec<usize>) -> Self {
        GenerateRequest {
            class_labels: labels,
            ..Self::empty()
        }
    }
    /// Text-conditioned generation, seed 0.
    pub fn prompt(embeds: PromptEmbeds) -> Self {
        GenerateRequest {
            prompt: Some(embeds),
            ..Self::empty()
        }
    }
    pub fn with_noise(mut self, noise: Noise) -> Self {
        self.noise = noise;
        self
    }
    pub fn with_steps(mut self, steps: usize) -> Self {
        self.steps = Some(steps);
        self
    }
    pub fn with_guidance(mut self, guidance: f32) -> Self {
        self.guidance = Some(guidance);
        self
    }
    pub fn with_size(mut self, height: usize, width: usize) -> Self {
        self.height = Some(height);
        self.width = Some(width);
        self
    }
    pub fn with_timesteps(mut self, schedule: TimestepSchedule) -> Self {
        self.timesteps = schedule;
        self
    }
    pub fn with_cache(mut self, policy: CachePolicy) -> Self {
        self.cache = Some(policy);
        self
    }
}

/// The result of [`Pipeline::generate`].
#[derive(Clone, Debug)]
pub struct Generation {
    /// Final latents in the transformer's layout (packed for Flux).
    pub latents: HostTensor,
    /// [B, C, H, W]: the VAE decoder's output in about [-1, 1] (before 8-bit conversion), or
    /// the final latents of a pixel-space model.
    pub image: HostTensor,
    pub timesteps: Vec<f32>,
    /// Whether classifier-free guidance ran (a 2B batch).
    pub cfg: bool,
    /// Compiling the transformer for this size (0 when a cached program was reused).
    pub compile_seconds: f64,
    pub step_seconds: Vec<f64>,
    pub decode_seconds: f64,
}

/// What [`Pipeline::generate_with`] reports while it works.
pub enum Progress<'a> {
    /// The transformer program is ready; `num_steps` steps follow.
    Compiled { seconds: f64, num_steps: usize },
    /// Step `step` (0-based) is done; `latents` are the latents after it.
    Step {
        step: usize,
        num_steps: usize,
        timestep: f32,
        latents: &'a HostTensor,
        seconds: f64,
    },
    /// The transformer's outputs of step `step`, before guidance and the scheduler:
    /// `sample`, and the values asked for with [`Pipeline::with_taps`]. `computed` is false
    /// when a step cache skipped (part of) the block stack.
    Forward {
        step: usize,
        outputs: &'a BTreeMap<String, HostTensor>,
        computed: bool,
    },
    /// The VAE decoded the final latents (not sent for pixel-space models).
    Decoded { seconds: f64 },
}

struct Vae {
    model: Model,
    config: AutoencoderKLConfig,
}

/// Compiled programs kept per input shape. Each holds its buffers, so only a few are kept.
struct SessionCache {
    entries: Vec<(Shapes, Ranks)>,
}

const CACHED_SESSIONS: usize = 2;

impl SessionCache {
    fn get_or_compile(
        &mut self,
        shapes: &Shapes,
        compile: impl FnOnce() -> Result<Ranks, PipelineError>,
    ) -> Result<(&mut Ranks, bool), PipelineError> {
        let compiled = match self.entries.iter().position(|(s, _)| s == shapes) {
            Some(i) => {
                let e = self.entries.remove(i);
                self.entries.push(e);
                false
            }
            None => {
                let session = compile()?;
                if self.entries.len() >= CACHED_SESSIONS {
                    self.entries.remove(0);
                }
                self.entries.push((*shapes, session));
                true
            }
        };
        let last = self
            .entries
            .last_mut()
            .ok_or_else(|| PipelineError::Internal("empty session cache".into()))?;
        Ok((&mut last.1, compiled))
    }
}

/// A loaded pipeline: transformer, scheduler config, optional VAE.
pub struct Pipeline {
    source: String,
    pipeline_class: String,
    family: FamilyConfig,
    /// From a checkpoint folder, or the built-in model's bytes in memory.
    transformer: Model,
    scheduler_config: String,
    scheduler_path: PathBuf,
    scheduler_class: &'static str,
    vae: Option<Vae>,
    labels: BTreeMap<usize, String>,
    default_steps: usize,
    default_guidance: f32,
    /// How the transformer is split across ranks (the VAE runs on one).
    parallel: Parallel,
    /// How the transformer's ranks run: threads of this process, or (with a communicator)
    /// only this process's rank of a multi-process run.
    rank_options: RankOptions,
    transformer_sessions: SessionCache,
    vae_sessions: SessionCache,
    /// Step caching, taps, and the part programs they run (see [`cache`]).
    steps: cache::StepOptions,
    /// Run the transformer as PipeFusion stages instead (see [`pipefusion`]).
    pipefusion: Option<PipeFusion>,
    pipefusion_stages: Option<pipefusion::Stages>,
    pipefusion_report: Option<PipeFusionReport>,
}

fn parse_scheduler(text: &str, path: &Path) -> Result<Box<dyn Scheduler>, PipelineError> {
    scheduler::from_config_json(text).map_err(|error| PipelineError::Scheduler {
        path: path.to_path_buf(),
        error,
    })
}

impl Pipeline {
    /// Opens a diffusers pipeline folder; checks its layout, the transformer's and VAE's
    /// configs and the scheduler config (weights are mapped, read when compiled).
    pub fn load(dir: impl AsRef<Path>) -> Result<Pipeline, PipelineError> {
        let dir = dir.as_ref();
        let f = folder::Folder::open(dir)?;
        let config_path = f.transformer.join("config.json");
        let family = FamilyConfig::parse(&folder::read_text(&config_path)?, &config_path)?;
        // The checkpoint errors name the folder themselves.
        let transformer = Model::load(&f.transformer)
            .map_err(|error| PipelineError::model("loading the transformer", error))?;
        let scheduler_config = folder::read_text(&f.scheduler_config)?;
        let scheduler_class = parse_scheduler(&scheduler_config, &f.scheduler_config)?.name();
        let vae = match &f.vae {
            Some(d) => Some(load_vae(d, &family)?),
            None => None,
        };
        let (default_steps, default_guidance) = family.pipeline_defaults();
        Ok(Pipeline {
            source: dir.display().to_string(),
            pipeline_class: f.pipeline_class,
            family,
            transformer,
            scheduler_config,
            scheduler_path: f.scheduler_config,
            scheduler_class,
            vae,
            labels: f.labels,
            default_steps,
            default_guidance,
            parallel: Parallel::default(),
            rank_options: RankOptions::default(),
            transformer_sessions: SessionCache {
                entries: Vec::new(),
            },
            vae_sessions: SessionCache {
                entries: Vec::new(),
            },
            steps: Default::default(),
            pipefusion: None,
            pipefusion_stages: None,
            pipefusion_report: None,
        })
    }

    /// The built-in shapes-dit model (embedded in the binary): a class-conditional DiT in
    /// pixel space, 32x32 RGB, classes circle, square, triangle, ring. Defaults: 20 DDIM
    /// steps, guidance 3.0, as its reference samples were made.
    pub fn builtin() -> Result<Pipeline, PipelineError> {
        let path = Path::new(builtin::NAME);
        let index = folder::parse_index(builtin::MODEL_INDEX, &path.join("model_index.json"))?;
        let family = FamilyConfig::parse(
            builtin::TRANSFORMER_CONFIG,
            &path.join("transformer/config.json"),
        )?;
        let scheduler_path = path.join("scheduler/scheduler_config.json");
        let scheduler_class = parse_scheduler(builtin::SCHEDULER_CONFIG, &scheduler_path)?.name();
        let reference = builtin::reference()?;
        Ok(Pipeline {
            source: builtin::NAME.to_string(),
            pipeline_class: index.class_name,
            family,
            transformer: builtin::transformer()?,
            scheduler_config: builtin::SCHEDULER_CONFIG.to_string(),
            scheduler_path,
            scheduler_class,
            vae: None,
            labels: reference.classes.into_iter().enumerate().collect(),
            default_steps: reference.steps,
            default_guidance: reference.guidance_scale,
            parallel: Parallel::default(),
            rank_options: RankOptions::default(),
            transformer_sessions: SessionCache {
                entries: Vec::new(),
            },
            vae_sessions: SessionCache {
                entries: Vec::new(),
            },
            steps: Default::default(),
            pipefusion: None,
            pipefusion_stages: None,
            pipefusion_report: None,
        })
    }

    /// The transformer.
    pub fn transformer_model(&self) -> &Model {
        &self.transformer
    }

    /// Splits the transformer across ranks (in-process) for later generations.
    pub fn with_parallel(mut self, parallel: Parallel) -> Pipeline {
        self.parallel = parallel;
        self.transformer_sessions.entries.clear();
        self.steps.clear_compiled();
        self
    }

    /// Runs the transformer as PipeFusion stages (the image in row patches flowing through
    /// stages of blocks, attending to one-step-stale K/V of the other patches) for later
    /// generations; `None` goes back to [`with_parallel`](Self::with_parallel)'s layout.
    pub fn with_pipefusion(mut self, layout: Option<PipeFusion>) -> Pipeline {
        self.pipefusion = layout;
        self.pipefusion_stages = None;
        self
    }

    /// What the last PipeFusion generation did per stage (weights, K/V buffers, traffic).
    pub fn pipefusion_report(&self) -> Option<&PipeFusionReport> {
        self.pipefusion_report.as_ref()
    }

    /// How the transformer's ranks run for later generations: the collective timeout, and a
    /// communicator when this process is one rank of a multi-process run (then each step
    /// runs the transformer on this rank only; the scheduler and VAE, cheap next to it, run
    /// on every process alike, so every process ends with the same image).
    pub fn with_rank_options(mut self, opts: RankOptions) -> Pipeline {
        self.rank_options = opts;
        self.transformer_sessions.entries.clear();
        self.steps.clear_compiled();
        self
    }

    /// The transformer's program for the last generation's shapes, and what its ranks sent
    /// over all generations so far.
    pub fn transformer_ranks(&self) -> Option<(&ditto_codegen::Program, &RankStats)> {
        self.transformer_sessions
            .entries
            .last()
            .map(|(_, r)| (r.program(), r.total_stats()))
    }

    /// The folder this was loaded from, or "built-in shapes-dit".
    pub fn source(&self) -> &str {
        &self.source
    }
    /// `_class_name` of `model_index.json`.
    pub fn pipeline_class(&self) -> &str {
        &self.pipeline_class
    }
    /// `dit`, `pixart`, `sd3` or `flux`.
    pub fn family(&self) -> &'static str {
        self.family.name()
    }
    pub fn scheduler_class(&self) -> &'static str {
        self.scheduler_class
    }
    pub fn default_steps(&self) -> usize {
        self.default_steps
    }
    pub fn default_guidance(&self) -> f32 {
        self.default_guidance
    }
    /// Class names of a class-conditional model (`id2label`), if known.
    pub fn labels(&self) -> &BTreeMap<usize, String> {
        &self.labels
    }
    /// Number of classes of a class-conditional model.
    pub fn num_classes(&self) -> Option<usize> {
        self.family.num_classes()
    }
    /// Whether the model works in pixel space (no VAE).
    pub fn pixel_space(&self) -> bool {
        self.vae.is_none()
    }
    /// Whether `guidance` runs classifier-free guidance (a doubled batch) with this model.
    pub fn uses_cfg(&self, guidance: f32) -> bool {
        self.family.uses_cfg(guidance)
    }
    /// Pixels per latent pixel (the VAE's downsampling; 1 in pixel space).
    pub fn vae_scale_factor(&self) -> usize {
        self.vae.as_ref().map_or(1, |v| v.config.scale_factor())
    }

    /// Runs the whole pipeline.
    pub fn generate(&mut self, req: &GenerateRequest) -> Result<Generation, PipelineError> {
        self.generate_with(req, &mut |_| {})
    }

    /// [`generate`](Self::generate), reporting compilation, each step and decoding.
    pub fn generate_with(
        &mut self,
        req: &GenerateRequest,
        on_progress: &mut dyn FnMut(Progress),
    ) -> Result<Generation, PipelineError> {
        if req.steps == Some(0) && !matches!(req.timesteps, TimestepSchedule::Sigmas(_)) {
            return Err(PipelineError::Request(
                "the number of steps must be at least 1, got 0".into(),
            ));
        }
        let guidance = req.guidance.unwrap_or(self.default_guidance);
        if !guidance.is_finite() {
            return Err(PipelineError::Request(format!(
                "guidance must be a finite number, got {guidance}"
            )));
        }
        let mut sched = parse_scheduler(&self.scheduler_config, &self.scheduler_path)?;
        let (lh, lw) = self.latent_size(req)?;
        let samples = self.num_samples(req)?;
        let condition = match (&req.prompt, req.class_labels.as_slice()) {
            (Some(_), [_, ..]) => {
                return Err(PipelineError::Request(
                    "give class labels or prompt embeddings, not both".into(),
                ))
            }
            (Some(p), []) => Condition::Text(p),
            (None, labels) => Condition::Classes(broadcast_labels(labels, samples)?),
        };
        let mut latents = self.initial_latents(&req.noise, samples, lh, lw)?;
        self.set_timesteps(sched.as_mut(), req, lh, lw)?;
        let timesteps = sched.timesteps().to_vec();
        let sigma = sched.init_noise_sigma();
        if sigma != 1.0 {
            latents.data.iter_mut().for_each(|v| *v *= sigma);
        }

        let mut batch = BatchInputs::new(&self.family, &condition, samples, (lh, lw), guidance)?;
        let keep = latents.data.len() / samples;
        let mix = Guidance {
            samples,
            cfg_scale: batch.cfg.then_some(guidance),
            keep_per_sample: keep,
            out_per_sample: if self.family.learned_sigma() {
                2 * keep
            } else {
                keep
            },
        };

        // The step cache of this request, and TeaCache's polynomial.
        let policy = req
            .cache
            .clone()
            .unwrap_or_else(|| self.steps.policy.clone());
        let rescale = match policy {
            CachePolicy::TeaCache { .. } => Some(self.teacache_rescale()?),
            _ => None,
        };

        if let Some(layout) = self.pipefusion.clone() {
            policy
                .validate()
                .map_err(|e| PipelineError::Request(e.to_string()))?;
            if self.parallel.stale.is_some() {
                return Err(PipelineError::Request(
                    "PipeFusion does not combine with DistriFusion or PCPP: give the layout inside each stage with --ulysses-degree, --ring-degree and --use-cfg-parallel".into(),
                ));
            }
            if !self.steps.taps().is_empty() {
                return Err(PipelineError::Request(
                    "tapped runs (analysis) run the whole transformer on one rank, not PipeFusion stages".into(),
                ));
            }
            pipefusion::check_latent_rows(layout.patches, &self.family, &latents.shape)?;
            let cut = pipefusion::CacheCut::of(&policy);
            let mesh = self.parallel.mesh;
            let t0 = Instant::now();
            let reuse = self
                .pipefusion_stages
                .as_ref()
                .is_some_and(|s| s.fits(&batch.shapes, &layout, mesh, cut));
            if !reuse {
                self.pipefusion_stages = None;
                self.pipefusion_stages = Some(pipefusion::compile_stages(
                    &self.transformer,
                    &batch.shapes,
                    &layout,
                    &self.parallel,
                    cut,
                )?);
            }
            let compile_seconds = if reuse {
                0.0
            } else {
                t0.elapsed().as_secs_f64()
            };
            on_progress(Progress::Compiled {
                seconds: compile_seconds,
                num_steps: timesteps.len(),
            });
            // Every rank of the last stage steps its own copy of the scheduler alike.
            let mut schedulers = vec![sched];
            for _ in 1..mesh.world_size() {
                let mut other = parse_scheduler(&self.scheduler_config, &self.scheduler_path)?;
                self.set_timesteps(other.as_mut(), req, lh, lw)?;
                schedulers.push(other);
            }
            let run = pipefusion::Run {
                family: &self.family,
                batch: &batch,
                mix,
                timesteps: &timesteps,
                latents: &latents,
                scheduler_path: &self.scheduler_path,
                schedulers: std::sync::Mutex::new(schedulers),
                cache: (!policy.is_none()).then(|| pipefusion::StageCache {
                    policy: policy.clone(),
                    rescale,
                }),
                one_process_per_rank: self.rank_options.comm.is_some(),
            };
            let stages = self.pipefusion_stages.as_ref().expect("compiled above");
            let (latents, step_seconds, report, cache_report) =
                pipefusion::denoise(stages, &run, &self.rank_options, on_progress)?;
            self.pipefusion_report = Some(report);
            let n = timesteps.len();
            self.steps.set_report(cache_report.unwrap_or(CacheReport {
                policy,
                computed: vec![true; n],
                indicator: vec![None; n],
                rescale: None,
                patches: Vec::new(),
            }));
            let timing = (compile_seconds, step_seconds);
            return self.finish(latents, (lh, lw), timesteps, batch.cfg, timing, on_progress);
        }

        // Displaced attention (DistriFusion, PCPP): every generation starts with empty K/V
        // stores and runs its warmup steps exactly (`Ranks::begin_generation`).
        for (_, ranks) in &mut self.transformer_sessions.entries {
            ranks.begin_generation();
        }
        let t0 = Instant::now();
        // The whole forward, or the parts a step cache or the taps need (see `cache`).
        let cx = cache::StepContext {
            model: &self.transformer,
            source: &self.source,
            parallel: &self.parallel,
            rank_options: &self.rank_options,
            rescale,
        };
        let (mut stepper, compiled) = cache::Stepper::new(
            &mut self.steps,
            &mut self.transformer_sessions,
            cx,
            &batch.shapes,
            policy,
            timesteps.len(),
        )?;
        let compile_seconds = if compiled {
            t0.elapsed().as_secs_f64()
        } else {
            0.0
        };
        on_progress(Progress::Compiled {
            seconds: compile_seconds,
            num_steps: timesteps.len(),
        });

        let mut step_seconds = Vec::with_capacity(timesteps.len());
        for (i, &t) in timesteps.iter().enumerate() {
            let ts = Instant::now();
            batch.set_step(&self.family, &latents, t);
            let out = stepper.run(i, &batch.inputs, on_progress)?;
            let sample = out.get("sample").ok_or_else(|| {
                PipelineError::Internal("the transformer gave no `sample`".into())
            })?;
            let eps = mix.apply(sample)?;
            sched
                .step(&eps, i, &mut latents.data)
                .map_err(|error| PipelineError::Scheduler {
                    path: self.scheduler_path.clone(),
                    error,
                })?;
            let seconds = ts.elapsed().as_secs_f64();
            step_seconds.push(seconds);
            on_progress(Progress::Step {
                step: i,
                num_steps: timesteps.len(),
                timestep: t,
                latents: &latents,
                seconds,
            });
        }
        stepper.finish();

        let timing = (compile_seconds, step_seconds);
        self.finish(latents, (lh, lw), timesteps, batch.cfg, timing, on_progress)
    }

    /// Decodes the final latents and assembles the [`Generation`].
    fn finish(
        &mut self,
        latents: HostTensor,
        (lh, lw): (usize, usize),
        timesteps: Vec<f32>,
        cfg: bool,
        (compile_seconds, step_seconds): (f64, Vec<f64>),
        on_progress: &mut dyn FnMut(Progress),
    ) -> Result<Generation, PipelineError> {
        let td = Instant::now();
        let image = self.decode(&latents, lh, lw)?;
        let decode_seconds = td.elapsed().as_secs_f64();
        if self.vae.is_some() {
            on_progress(Progress::Decoded {
                seconds: decode_seconds,
            });
        }
        Ok(Generation {
            latents,
            image,
            timesteps,
            cfg,
            compile_seconds,
            step_seconds,
            decode_seconds,
        })
    }

    /// The VAE's input for final latents: unpacked (Flux), `/ scaling_factor + shift_factor`
    /// in f32 like the pipelines' tensor ops; then the decoder's output. Without a VAE, the
    /// (unpacked) latents themselves.
    fn decode(
        &mut self,
        latents: &HostTensor,
        lh: usize,
        lw: usize,
    ) -> Result<HostTensor, PipelineError> {
        let x = match self.family {
            FamilyConfig::Flux(_) => packing::unpack(latents, lh / 2, lw / 2),
            _ => latents.clone(),
        };
        let Some(vae) = &self.vae else {
            return Ok(x);
        };
        let scale = vae.config.scaling_factor as f32;
        let shift = vae.config.shift_factor.map(|s| s as f32);
        let data = x
            .data
            .iter()
            .map(|&v| match shift {
                Some(s) => v / scale + s,
                None => v / scale,
            })
            .collect();
        let shapes = Shapes {
            batch: x.shape[0],
            height: lh,
            width: lw,
            text_len: 0,
        };
        let inputs = BTreeMap::from([("latents".to_string(), HostTensor::new(x.shape, data))]);
        let component = || format!("vae of {}", self.source);
        // The VAE runs on one rank, on the transformer's backend.
        let vae_opts = RankOptions {
            backend: self.rank_options.backend,
            ..RankOptions::default()
        };
        let (session, _) = self.vae_sessions.get_or_compile(&shapes, || {
            vae.model
                .ranks(&shapes, &CompileOptions::default(), vae_opts)
                .map_err(|error| PipelineError::model(component(), error))
        })?;
        let (mut out, _) = session
            .run(&inputs)
            .map_err(|error| PipelineError::model(component(), error))?;
        out.remove("sample")
            .ok_or_else(|| PipelineError::Internal("the VAE gave no `sample`".into()))
    }

    fn set_timesteps(
        &self,
        sched: &mut dyn Scheduler,
        req: &GenerateRequest,
        lh: usize,
        lw: usize,
    ) -> Result<(), PipelineError> {
        let seq_len = self.family.image_seq_len(lh, lw);
        let steps = req.steps.unwrap_or(self.default_steps);
        let result = match (&req.timesteps, &self.family) {
            (TimestepSchedule::Sigmas(s), _) => {
                if req.steps.is_some_and(|n| n != s.len()) {
                    return Err(PipelineError::Request(format!(
                        "{} sigmas given but {steps} steps asked for",
                        s.len()
                    )));
                }
                if s.is_empty() {
                    return Err(PipelineError::Request(
                        "the number of steps must be at least 1, got 0 sigmas".into(),
                    ));
                }
                sched.set_timesteps_with_sigmas(s, seq_len)
            }
            (TimestepSchedule::Pipeline, FamilyConfig::Flux(_)) => {
                sched.set_timesteps_with_sigmas(&scheduler::flux_pipeline_sigmas(steps), seq_len)
            }
            _ => sched.set_timesteps(steps, seq_len),
        };
        result.map_err(|error| PipelineError::Scheduler {
            path: self.scheduler_path.clone(),
            error,
        })
    }

    /// The unpacked latent grid (lh, lw) for a request.
    fn latent_size(&self, req: &GenerateRequest) -> Result<(usize, usize), PipelineError> {
        let scale = self.vae_scale_factor();
        let unit = scale * self.family.patch();
        let from_px = |px: Option<usize>, what: &str| -> Result<Option<usize>, PipelineError> {
            match px {
                None => Ok(None),
                Some(p) if p > 0 && p % unit == 0 => Ok(Some(p / scale)),
                Some(p) => Err(PipelineError::Request(format!(
                    "{what} {p} must be a positive multiple of {unit} pixels (VAE factor {scale} x {} per {} token)",
                    self.family.patch(),
                    self.family.name()
                ))),
            }
        };
        let h = from_px(req.height, "height")?;
        let w = from_px(req.width, "width")?;
        let Noise::Latents(t) = &req.noise else {
            let d = self.family.default_latent_size();
            return Ok((h.unwrap_or(d), w.unwrap_or(d)));
        };
        let c = self.family.latent_channels();
        let p = self.family.patch();
        let (lh, lw) = match (&self.family, t.shape.as_slice()) {
            (FamilyConfig::Flux(_), &[b, s, ch]) if b > 0 && s > 0 && ch == 4 * c => match (h, w) {
                (Some(h), Some(w)) => (h, w),
                (Some(h), None) if s % (h / 2) == 0 => (h, 2 * s / (h / 2)),
                (None, Some(w)) if s % (w / 2) == 0 => (2 * s / (w / 2), w),
                (None, None) => {
                    let side = (s as f64).sqrt().round() as usize;
                    if side * side != s {
                        return Err(PipelineError::Request(format!(
                                "packed latents with {s} tokens are not square: give the image height and width"
                            )));
                    }
                    (2 * side, 2 * side)
                }
                _ => (0, 0),
            },
            (FamilyConfig::Flux(_), _) => {
                return Err(PipelineError::Request(format!(
                    "latents have shape {:?}; Flux takes packed latents [B, tokens, {}]",
                    t.shape,
                    4 * c
                )))
            }
            (_, &[b, ch, lh, lw]) if b > 0 && ch == c && lh > 0 && lw > 0 => (lh, lw),
            _ => {
                return Err(PipelineError::Request(format!(
                    "latents have shape {:?}; this {} transformer takes [B, {c}, h, w]",
                    t.shape,
                    self.family.name()
                )))
            }
        };
        let tokens_ok = match self.family {
            FamilyConfig::Flux(_) => (lh / 2) * (lw / 2) == t.shape[1],
            _ => true,
        };
        if !tokens_ok
            || lh % p != 0
            || lw % p != 0
            || h.is_some_and(|h| h != lh)
            || w.is_some_and(|w| w != lw)
        {
            return Err(PipelineError::Request(format!(
                "latents of shape {:?} do not fit a {}x{} pixel image (latent grid {lh}x{lw}, which must be a multiple of {p})",
                t.shape,
                req.height.map_or(lh * scale, |v| v),
                req.width.map_or(lw * scale, |v| v),
            )));
        }
        Ok((lh, lw))
    }

    /// B: from the latents, the seeds, or the conditions.
    fn num_samples(&self, req: &GenerateRequest) -> Result<usize, PipelineError> {
        let b = match &req.noise {
            Noise::Latents(t) => t.shape.first().copied().unwrap_or(0),
            Noise::Seeds(s) => s.len(),
            Noise::Seed(_) => match &req.prompt {
                Some(p) => p.prompt_embeds.shape.first().copied().unwrap_or(0),
                None => req.class_labels.len().max(1),
            },
        };
        if b == 0 {
            return Err(PipelineError::Request(
                "nothing to generate: the batch is empty".into(),
            ));
        }
        Ok(b)
    }

    fn initial_latents(
        &self,
        noise: &Noise,
        samples: usize,
        lh: usize,
        lw: usize,
    ) -> Result<HostTensor, PipelineError> {
        let c = self.family.latent_channels();
        let per_sample = c * lh * lw;
        let data = match noise {
            Noise::Latents(t) => {
                let mut t = t.clone();
                if t.data.len() != t.numel() {
                    return Err(PipelineError::Request(format!(
                        "latents of shape {:?} hold {} values",
                        t.shape,
                        t.data.len()
                    )));
                }
                // Copy the caller's tensor unchanged; its layout was checked in latent_size.
                t.shape = self.family.latent_shape(samples, lh, lw);
                return Ok(t);
            }
            Noise::Seed(s) => torch_randn(samples * per_sample, *s),
            Noise::Seeds(seeds) => seeds
                .iter()
                .flat_map(|&s| torch_randn(per_sample, s))
                .collect(),
        };
        let unpacked = HostTensor::new(vec![samples, c, lh, lw], data);
        Ok(match self.family {
            FamilyConfig::Flux(_) => packing::pack(&unpacked),
            _ => unpacked,
        })
    }
}

fn broadcast_labels(labels: &[usize], samples: usize) -> Result<Vec<usize>, PipelineError> {
    match labels.len() {
        0 => Ok(Vec::new()),
        1 => Ok(vec![labels[0]; samples]),
        n if n == samples => Ok(labels.to_vec()),
        n => Err(PipelineError::Request(format!(
            "{n} class labels for {samples} samples: give one label, or one per sample"
        ))),
    }
}

fn load_vae(dir: &Path, family: &FamilyConfig) -> Result<Vae, PipelineError> {
    let model_err = |error: crate::Error| PipelineError::model("loading the VAE", error);
    let model = Model::load(dir).map_err(model_err)?;
    let path = dir.join("config.json");
    if model.family().family() != "vae" {
        return Err(PipelineError::Folder {
            path,
            reason: format!(
                "the vae folder holds a `{}`, expected AutoencoderKL",
                model.family().class_name()
            ),
        });
    }
    let value = ditto_models::read_config(dir).map_err(|e| model_err(e.into()))?;
    let config: AutoencoderKLConfig =
        ditto_models::parse_config(&value, &path.display().to_string())
            .map_err(|e| model_err(e.into()))?;
    if config.latent_channels != family.latent_channels() {
        return Err(PipelineError::Folder {
            path,
            reason: format!(
                "latent_channels is {} but the transformer works on {} latent channels",
                config.latent_channels,
                family.latent_channels()
            ),
        });
    }
    Ok(Vae { model, config })
}
