//! Step caching (TeaCache, First-Block-Cache) and tapped transformer runs (for
//! `ditto analyze`): what runs the transformer for one denoising step when the plain
//! whole-forward program is not enough.
//!
//! Consecutive denoising steps feed the transformer inputs that differ little, and in many
//! steps the block stack changes its input by about the same amount as in the step before.
//! Both policies skip the stack in such steps and add the change it made last time (the
//! cached residual, output minus input of the skipped blocks) instead:
//!
//! - **TeaCache** looks at block 0's timestep-modulated input (cheap: the head and one
//!   modulation) and accumulates its relative L1 change between steps, rescaled by a per-model
//!   polynomial that maps it to the expected change of the model output. While the sum stays
//!   under the threshold the whole stack is skipped; otherwise the stack runs, its residual is
//!   stored and the sum restarts. The first and last steps always run.
//! - **First-Block-Cache** always runs block 0 and compares its residual with the one of the
//!   last computed step; under the threshold the remaining blocks are skipped.
//!
//! The model is cut at its block boundaries ([`ditto_ir::cut`]) into parts compiled with the
//! pipeline's [`Parallel`] layout: head (+ block 0's modulated input) / stack / tail for
//! TeaCache, block 0 (+ its input) / blocks 1.. / tail for First-Block-Cache. The parts'
//! outputs are gathered, so in a parallel run every rank holds the same tensors and takes the
//! same decision without any extra collective. The chained parts compute bit for bit what the
//! whole forward does, so a run where nothing is skipped (threshold 0) equals the uncached one.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use ditto_ir::cut::{carry_name, Span};
use ditto_ir::Graph;
use ditto_models::Shapes;

use super::{builtin, Pipeline, PipelineError, Progress, SessionCache};
use crate::parallel::{RankOptions, Ranks};
use crate::{CompileOptions, HostTensor, Model, Parallel};

/// Which steps may skip the transformer's block stack.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum CachePolicy {
    /// Every step runs the whole transformer.
    #[default]
    None,
    /// TeaCache with this threshold on the accumulated rescaled change of block 0's
    /// modulated input (0 computes every step; Flux uses 0.25 to 0.8).
    TeaCache { threshold: f64 },
    /// First-Block-Cache with this threshold on the relative change of block 0's residual
    /// (0 computes every step; ParaAttention's Flux default is 0.08).
    FirstBlock { threshold: f64 },
}

/// Why a cache policy could not be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct CachePolicyError(String);

impl CachePolicy {
    /// Checks the threshold: a finite number >= 0.
    pub fn validate(&self) -> Result<(), CachePolicyError> {
        match self {
            CachePolicy::None => Ok(()),
            CachePolicy::TeaCache { threshold } | CachePolicy::FirstBlock { threshold } => {
                if threshold.is_finite() && *threshold >= 0.0 {
                    Ok(())
                } else {
                    Err(CachePolicyError(format!(
                        "the {} threshold must be a non-negative number, got {threshold}",
                        self.name()
                    )))
                }
            }
        }
    }

    /// `none`, `teacache` or `fbcache`.
    pub fn name(&self) -> &'static str {
        match self {
            CachePolicy::None => "none",
            CachePolicy::TeaCache { .. } => "teacache",
            CachePolicy::FirstBlock { .. } => "fbcache",
        }
    }

    pub fn is_none(&self) -> bool {
        matches!(self, CachePolicy::None)
    }
}

impl fmt::Display for CachePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CachePolicy::None => f.write_str("none"),
            CachePolicy::TeaCache { threshold } | CachePolicy::FirstBlock { threshold } => {
                write!(f, "{}:{threshold}", self.name())
            }
        }
    }
}

impl FromStr for CachePolicy {
    type Err = CachePolicyError;

    /// `none`, `teacache:THRESH` or `fbcache:THRESH` (also `first-block:THRESH`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (name, value) = match s.split_once(':') {
            Some((n, v)) => (n.trim(), Some(v.trim())),
            None => (s, None),
        };
        let make: fn(f64) -> CachePolicy = match name.to_ascii_lowercase().as_str() {
            "none" | "off" => {
                return match value {
                    None => Ok(CachePolicy::None),
                    Some(_) => Err(CachePolicyError(format!(
                        "cache policy `{s}`: `none` takes no threshold"
                    ))),
                }
            }
            "teacache" => |threshold| CachePolicy::TeaCache { threshold },
            "fbcache" | "first-block" | "first-block-cache" => {
                |threshold| CachePolicy::FirstBlock { threshold }
            }
            _ => {
                return Err(CachePolicyError(format!(
                    "unknown cache policy `{s}` (teacache:THRESH, fbcache:THRESH or none)"
                )))
            }
        };
        let Some(value) = value.filter(|v| !v.is_empty()) else {
            return Err(CachePolicyError(format!(
                "cache policy `{s}` needs a threshold: {name}:THRESH (e.g. {name}:0.1)"
            )));
        };
        let threshold: f64 = value.parse().map_err(|_| {
            CachePolicyError(format!(
                "cache policy `{s}`: the threshold `{value}` is not a number"
            ))
        })?;
        let policy = make(threshold);
        policy.validate()?;
        Ok(policy)
    }
}

/// TeaCache's rescaling polynomial: maps the relative L1 change of block 0's modulated input
/// to the expected relative change of the model output (fitted per model by
/// `ditto analyze --fit-teacache`, since the ratio of the two differs between models).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TeaCacheRescale {
    /// Highest degree first, as `numpy.poly1d` and TeaCache's published tables
    /// (Flux: [498.651651, -283.781631, 55.8554382, -3.82021401, 0.264230861]).
    pub coefficients: Vec<f64>,
    /// Where it came from (a file, the built-in model's, or "identity").
    #[serde(default)]
    pub source: String,
    /// How the fit went (pairs, R², step counts), when fitted by `ditto analyze`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fit: Option<serde_json::Value>,
}

/// The file name `ditto generate` looks for next to a model's transformer config.
pub const TEACACHE_FILE: &str = "teacache.json";

/// The built-in model's polynomial, fitted with `ditto analyze --fit-teacache` (DDIM 20 and
/// 50 steps, guidance 3, classes 0..3, seeds 0..3) and compiled in.
const BUILTIN_TEACACHE: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/assets/shapes-dit/transformer/teacache.json"
));

impl TeaCacheRescale {
    /// f(x) = x: the indicator taken as the output change itself (no fitted polynomial).
    pub fn identity() -> Self {
        TeaCacheRescale {
            coefficients: vec![1.0, 0.0],
            source:
                "identity (no fitted polynomial for this model; run `ditto analyze --fit-teacache`)"
                    .into(),
            fit: None,
        }
    }

    /// The polynomial at `x` (Horner), clamped at 0: an output change is never negative, and
    /// a fit that dips below 0 near x = 0 must not let the accumulator shrink (which would
    /// skip steps even at threshold 0).
    pub fn eval(&self, x: f64) -> f64 {
        self.coefficients
            .iter()
            .fold(0.0, |acc, c| acc * x + c)
            .max(0.0)
    }

    /// Reads a `teacache.json`.
    pub fn read(path: &Path) -> Result<TeaCacheRescale, PipelineError> {
        let text = std::fs::read_to_string(path).map_err(|e| PipelineError::Io {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let mut r = Self::parse(&text, path)?;
        if r.source.is_empty() {
            r.source = path.display().to_string();
        } else {
            r.source = format!("{} ({})", path.display(), r.source);
        }
        Ok(r)
    }

    fn parse(text: &str, path: &Path) -> Result<TeaCacheRescale, PipelineError> {
        let r: TeaCacheRescale = serde_json::from_str(text).map_err(|e| PipelineError::Folder {
            path: path.to_path_buf(),
            reason: format!("not a TeaCache polynomial: {e}"),
        })?;
        if r.coefficients.is_empty() || r.coefficients.iter().any(|c| !c.is_finite()) {
            return Err(PipelineError::Folder {
                path: path.to_path_buf(),
                reason: "`coefficients` must be a non-empty list of finite numbers".into(),
            });
        }
        Ok(r)
    }

    /// Writes it as JSON.
    pub fn write(&self, path: &Path) -> Result<(), PipelineError> {
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| PipelineError::Internal(e.to_string()))?;
        std::fs::write(path, text + "\n").map_err(|e| PipelineError::Io {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
    }

    /// The built-in model's compiled-in polynomial.
    pub fn builtin() -> Result<TeaCacheRescale, PipelineError> {
        let mut r = Self::parse(
            BUILTIN_TEACACHE,
            Path::new("assets/shapes-dit/transformer/teacache.json"),
        )?;
        r.source = "built-in shapes-dit (compiled in)".into();
        Ok(r)
    }
}

/// What a step cache did in one generation (see [`Pipeline::cache_report`]).
#[derive(Clone, Debug, PartialEq)]
pub struct CacheReport {
    pub policy: CachePolicy,
    /// Per step: whether the block stack ran (false: a cached residual stood in for it).
    pub computed: Vec<bool>,
    /// Per step: the number compared with the threshold (TeaCache: the accumulated rescaled
    /// indicator; First-Block-Cache: the relative change of block 0's residual); `None`
    /// where the step ran without a comparison (first step, TeaCache's last step).
    pub indicator: Vec<Option<f64>>,
    /// TeaCache: where the rescaling polynomial came from.
    pub rescale: Option<String>,
    /// PipeFusion: per step, per patch, whether the patch went through the block stack
    /// (patches decide apart); empty otherwise. `computed` is then true where every patch
    /// was computed, and `indicator` the largest of the patches' numbers.
    pub patches: Vec<Vec<bool>>,
}

impl CacheReport {
    /// The report of a PipeFusion generation from its per-step, per-patch decisions.
    pub fn from_patches(
        policy: CachePolicy,
        log: &[Vec<(bool, Option<f64>)>],
        rescale: Option<String>,
    ) -> CacheReport {
        CacheReport {
            policy,
            computed: log.iter().map(|p| p.iter().all(|x| x.0)).collect(),
            indicator: log
                .iter()
                .map(|p| p.iter().filter_map(|x| x.1).reduce(f64::max))
                .collect(),
            rescale,
            patches: log
                .iter()
                .map(|p| p.iter().map(|x| x.0).collect())
                .collect(),
        }
    }

    /// Patches (of every step) that went through the block stack, and all of them.
    pub fn computed_patches(&self) -> (usize, usize) {
        let all = self.patches.iter().map(Vec::len).sum();
        let done = self.patches.iter().flatten().filter(|&&c| c).count();
        (done, all)
    }

    pub fn computed_steps(&self) -> usize {
        self.computed.iter().filter(|&&c| c).count()
    }
    pub fn skipped_steps(&self) -> Vec<usize> {
        (0..self.computed.len())
            .filter(|&i| !self.computed[i])
            .collect()
    }
}

/// The pipeline's step-caching and tap settings, and the part programs compiled for them.
#[derive(Default)]
pub(super) struct StepOptions {
    pub(super) policy: CachePolicy,
    taps: Vec<String>,
    rescale: Option<TeaCacheRescale>,
    compiled: Vec<(Shapes, PartsKey, Vec<Ranks>)>,
    last_report: Option<CacheReport>,
}

impl StepOptions {
    /// Forgets compiled parts (the layout or rank options changed).
    pub(super) fn clear_compiled(&mut self) {
        self.compiled.clear();
    }

    /// What a generation that ran outside the [`Stepper`] (PipeFusion) did.
    pub(super) fn set_report(&mut self, report: CacheReport) {
        self.last_report = Some(report);
    }

    /// The values asked for with [`Pipeline::with_taps`].
    pub(super) fn taps(&self) -> &[String] {
        &self.taps
    }
}

const CACHED_PART_SETS: usize = 2;

#[derive(Clone, Debug, PartialEq)]
enum PartsKey {
    Tapped(Vec<String>),
    TeaCache,
    FirstBlock,
}

/// Suffix of a block's tapped output stream: `<block prefix>.block_out` (one stream) or
/// `.block_out<j>` (stream j of several, in the family's boundary order).
const BLOCK_OUT: &str = "block_out";
pub(super) const MODULATED_INPUT: &str = "modulated_input";
/// Extra outputs of First-Block-Cache's first part: block 0's input streams (taps added for
/// them; the head's own `carry.*` are boundary 0 already for TeaCache).
pub(super) const FIRST_IN: &str = "cache.first_in.";

/// Block `i`'s name: the prefix of its `modulated_input` tap (every family taps one per
/// block), or `block.<i>` when the model marked them differently.
fn block_prefixes(g: &Graph) -> Vec<String> {
    let n = g.num_blocks();
    let found: Vec<String> = g
        .taps
        .iter()
        .filter_map(|(name, _)| name.strip_suffix(&format!(".{MODULATED_INPUT}")))
        .map(str::to_string)
        .collect();
    if found.len() == n {
        found
    } else {
        (0..n).map(|i| format!("block.{i}")).collect()
    }
}

/// Every value a tapped run can output, in depth order: the model's taps, each block's
/// output streams after its taps (`<block prefix>.block_out[j]`, boundary b = block + 1).
fn tappable(g: &Graph) -> Vec<(String, ditto_ir::Id)> {
    let prefixes = block_prefixes(g);
    let mut out: Vec<(String, ditto_ir::Id)> = Vec::new();
    let block_outs = |i: usize| -> Vec<(String, ditto_ir::Id)> {
        let streams = &g.boundaries[i + 1];
        streams
            .iter()
            .enumerate()
            .map(|(j, &id)| {
                let name = if streams.len() == 1 {
                    format!("{}.{BLOCK_OUT}", prefixes[i])
                } else {
                    format!("{}.{BLOCK_OUT}{j}", prefixes[i])
                };
                (name, id)
            })
            .collect()
    };
    let mut block = 0;
    for (name, id) in &g.taps {
        // Taps of a later block: the blocks before it are done.
        while block + 1 < prefixes.len() && name.starts_with(&format!("{}.", prefixes[block + 1])) {
            out.extend(block_outs(block));
            block += 1;
        }
        out.push((name.clone(), *id));
    }
    for i in block..prefixes.len() {
        out.extend(block_outs(i));
    }
    out
}

impl Pipeline {
    /// Step caching for later generations (a request's [`GenerateRequest::cache`] overrides
    /// it). Checked when a generation starts.
    ///
    /// [`GenerateRequest::cache`]: super::GenerateRequest::cache
    pub fn with_cache(mut self, policy: CachePolicy) -> Pipeline {
        self.steps.policy = policy;
        self
    }

    /// The TeaCache polynomial to use instead of the one found with the model
    /// (`transformer/teacache.json`, or the built-in model's).
    pub fn with_teacache_rescale(mut self, rescale: TeaCacheRescale) -> Pipeline {
        self.steps.rescale = Some(rescale);
        self
    }

    /// Also output these values of the transformer every step (names from
    /// [`Pipeline::tap_names`]), handed to the progress callback as [`Progress::Forward`].
    /// Runs uncached (the values of skipped blocks would not exist). Empty: no taps.
    pub fn with_taps(mut self, taps: Vec<String>) -> Pipeline {
        self.set_taps(taps);
        self
    }

    /// [`with_taps`](Self::with_taps) in place.
    pub fn set_taps(&mut self, taps: Vec<String>) {
        self.steps.taps = taps;
    }

    /// Replaces the scheduler's class (`_class_name` of its config), keeping the rest of the
    /// config (betas, timestep spacing): e.g. DPMSolverMultistepScheduler for a DDIM
    /// pipeline, to see whether an analysis holds across schedulers.
    pub fn with_scheduler(mut self, class_name: &str) -> Result<Pipeline, PipelineError> {
        let mut config: serde_json::Value =
            serde_json::from_str(&self.scheduler_config).map_err(|e| PipelineError::Folder {
                path: self.scheduler_path.clone(),
                reason: e.to_string(),
            })?;
        if let Some(map) = config.as_object_mut() {
            map.insert("_class_name".into(), class_name.into());
        }
        let text = config.to_string();
        self.scheduler_class = super::parse_scheduler(&text, &self.scheduler_path)?.name();
        self.scheduler_config = text;
        Ok(self)
    }

    /// The values [`Pipeline::with_taps`] can output, in depth order: per attention layer
    /// `<prefix>.k_img`, `.v_img`, `.k_txt`, `.v_txt`, `.out_img`, `.out_txt` (where the layer
    /// has them), per block `<prefix>.modulated_input` and `<prefix>.block_out` (or
    /// `.block_out0`, `.block_out1`, ... for blocks that carry several streams, in the
    /// family's order: SD3 image, text; Flux double blocks text, image).
    pub fn tap_names(&self) -> Result<Vec<String>, PipelineError> {
        let g = self
            .transformer
            .graph(&self.transformer.family().default_shapes(), false)
            .map_err(|e| PipelineError::model(format!("transformer of {}", self.source), e))?;
        Ok(tappable(&g).into_iter().map(|(n, _)| n).collect())
    }

    /// What the step cache did in the last generation (every step computed for
    /// [`CachePolicy::None`]); `None` before the first.
    pub fn cache_report(&self) -> Option<&CacheReport> {
        self.steps.last_report.as_ref()
    }

    /// The TeaCache polynomial generations use: the one given with
    /// [`with_teacache_rescale`](Self::with_teacache_rescale), else `teacache.json` next to
    /// the transformer's config, else the built-in model's, else the identity.
    pub fn teacache_rescale(&self) -> Result<TeaCacheRescale, PipelineError> {
        if let Some(r) = &self.steps.rescale {
            return Ok(r.clone());
        }
        if self.source == builtin::NAME {
            return TeaCacheRescale::builtin();
        }
        let path = self.teacache_path();
        if path.is_file() {
            return TeaCacheRescale::read(&path);
        }
        Ok(TeaCacheRescale::identity())
    }

    /// Where `ditto analyze --fit-teacache` stores a fitted polynomial for this pipeline and
    /// generations find it: `<pipeline>/transformer/teacache.json`. (The built-in model's
    /// is compiled in; a new fit of it is passed with `--teacache-rescale FILE`.)
    pub fn teacache_path(&self) -> PathBuf {
        self.transformer.dir().join(TEACACHE_FILE)
    }

    /// Whether this is the built-in model (its files are compiled in, not on disk).
    pub fn is_builtin(&self) -> bool {
        self.source == builtin::NAME
    }
}

/// What one step of the denoising loop runs.
pub(super) struct Stepper<'a> {
    kind: Kind<'a>,
    report: CacheReport,
    num_steps: usize,
    component: String,
    last_report: &'a mut Option<CacheReport>,
}

enum Kind<'a> {
    /// The whole forward (with taps, or the plain program).
    Whole(&'a mut Ranks),
    TeaCache {
        parts: &'a mut [Ranks],
        threshold: f64,
        rescale: TeaCacheRescale,
        modulated_name: String,
        previous: Option<Vec<f32>>,
        accumulated: f64,
        /// Stack output minus stack input, per output stream.
        residual: Option<Vec<HostTensor>>,
    },
    FirstBlock {
        parts: &'a mut [Ranks],
        threshold: f64,
        /// Block 0's residual at the last computed step.
        first_residual: Option<Vec<HostTensor>>,
        /// Output of the last block minus block 0's output, at the last computed step.
        rest_residual: Option<Vec<HostTensor>>,
    },
}

/// Everything [`Stepper::new`] needs from the pipeline (disjoint borrows of its fields).
pub(super) struct StepContext<'a> {
    pub model: &'a Model,
    pub source: &'a str,
    pub parallel: &'a Parallel,
    pub rank_options: &'a RankOptions,
    /// Resolved before the fields are borrowed apart (it needs the whole pipeline).
    pub rescale: Option<TeaCacheRescale>,
}

impl<'a> Stepper<'a> {
    /// Compiles (or reuses) what the steps of a generation of `shapes` run under `policy`;
    /// the flag says whether anything was compiled.
    pub(super) fn new(
        opts: &'a mut StepOptions,
        sessions: &'a mut SessionCache,
        cx: StepContext<'_>,
        shapes: &Shapes,
        policy: CachePolicy,
        num_steps: usize,
    ) -> Result<(Stepper<'a>, bool), PipelineError> {
        policy
            .validate()
            .map_err(|e| PipelineError::Request(e.to_string()))?;
        let component = format!("transformer of {}", cx.source);
        let model_err = |e: crate::Error| PipelineError::model(component.clone(), e);
        if cx.parallel.stale.is_some() && !policy.is_none() {
            // Displaced attention keeps K/V from the previous run of each program, one run
            // per step; a skipped stack would leave its stores a step (or more) behind.
            return Err(PipelineError::Request(format!(
                "step caching (`{policy}`) does not combine with displaced attention (DistriFusion, PCPP) yet"
            )));
        }
        if !opts.taps.is_empty() && !policy.is_none() {
            return Err(PipelineError::Request(format!(
                "tapped runs (analysis) compute every step: they cannot use the step cache `{policy}`"
            )));
        }
        let key = match &policy {
            CachePolicy::None if opts.taps.is_empty() => None,
            CachePolicy::None => Some(PartsKey::Tapped(opts.taps.clone())),
            CachePolicy::TeaCache { .. } => Some(PartsKey::TeaCache),
            CachePolicy::FirstBlock { .. } => Some(PartsKey::FirstBlock),
        };
        let report = CacheReport {
            policy: policy.clone(),
            computed: Vec::with_capacity(num_steps),
            indicator: Vec::with_capacity(num_steps),
            rescale: None,
            patches: Vec::new(),
        };
        let StepOptions {
            compiled,
            last_report,
            ..
        } = opts;
        let Some(key) = key else {
            let (ranks, fresh) = sessions.get_or_compile(shapes, || {
                let copts = CompileOptions {
                    parallel: cx.parallel.clone(),
                    ..Default::default()
                };
                cx.model
                    .ranks(shapes, &copts, cx.rank_options.clone())
                    .map_err(model_err)
            })?;
            let stepper = Stepper {
                kind: Kind::Whole(ranks),
                report,
                num_steps,
                component,
                last_report,
            };
            return Ok((stepper, fresh));
        };

        let fresh = match compiled
            .iter()
            .position(|(s, k, _)| s == shapes && *k == key)
        {
            Some(i) => {
                let e = compiled.remove(i);
                compiled.push(e);
                false
            }
            None => {
                let parts = compile_parts(cx.model, shapes, &key, cx.parallel, cx.rank_options)
                    .map_err(|e| match e {
                        PartError::Model(e) => model_err(e),
                        PartError::Pipeline(e) => e,
                    })?;
                if compiled.len() >= CACHED_PART_SETS {
                    compiled.remove(0);
                }
                compiled.push((*shapes, key.clone(), parts));
                true
            }
        };
        let parts = &mut compiled
            .last_mut()
            .ok_or_else(|| PipelineError::Internal("no compiled parts".into()))?
            .2;
        // A new generation: no K/V of the last one in displaced attention (a no-op
        // otherwise), as the pipeline does for its whole-forward sessions.
        parts.iter_mut().for_each(Ranks::begin_generation);
        let mut report = report;
        let kind = match (&policy, key) {
            (_, PartsKey::Tapped(_)) => Kind::Whole(&mut parts[0]),
            (CachePolicy::TeaCache { threshold }, _) => {
                let rescale = cx.rescale.unwrap_or_else(TeaCacheRescale::identity);
                report.rescale = Some(rescale.source.clone());
                let modulated_name = first_modulated_input(parts[0].program())?;
                Kind::TeaCache {
                    parts: parts.as_mut_slice(),
                    threshold: *threshold,
                    rescale,
                    modulated_name,
                    previous: None,
                    accumulated: 0.0,
                    residual: None,
                }
            }
            (CachePolicy::FirstBlock { threshold }, _) => Kind::FirstBlock {
                parts: parts.as_mut_slice(),
                threshold: *threshold,
                first_residual: None,
                rest_residual: None,
            },
            (CachePolicy::None, _) => {
                return Err(PipelineError::Internal(
                    "cache parts without a policy".into(),
                ))
            }
        };
        Ok((
            Stepper {
                kind,
                report,
                num_steps,
                component,
                last_report,
            },
            fresh,
        ))
    }

    /// Runs the transformer (or the parts the cache does not skip) for step `step`; reports
    /// the outputs as [`Progress::Forward`] and returns them (`sample` among them).
    pub(super) fn run(
        &mut self,
        step: usize,
        inputs: &BTreeMap<String, HostTensor>,
        on_progress: &mut dyn FnMut(Progress),
    ) -> Result<BTreeMap<String, HostTensor>, PipelineError> {
        let component = self.component.clone();
        let err = |e: crate::Error| PipelineError::model(component.clone(), e);
        let last = step + 1 == self.num_steps;
        let (out, computed, indicator) = match &mut self.kind {
            Kind::Whole(ranks) => (ranks.run(inputs).map_err(err)?.0, true, None),
            Kind::TeaCache {
                parts,
                threshold,
                rescale,
                modulated_name,
                previous,
                accumulated,
                residual,
            } => {
                let mut head = run_part(&mut parts[0], inputs, &BTreeMap::new()).map_err(err)?;
                let modulated = head.remove(modulated_name.as_str()).ok_or_else(|| {
                    PipelineError::Internal(format!("the head gave no `{modulated_name}`"))
                })?;
                // TeaCache's rule: the first and last steps always run; otherwise add the
                // rescaled relative change and skip while the sum stays under the threshold.
                let (compute, indicator) = match (previous.as_deref(), residual.is_some()) {
                    (Some(prev), true) if step > 0 && !last => {
                        *accumulated += rescale.eval(rel_l1(&modulated.data, prev));
                        let a = *accumulated;
                        if a < *threshold {
                            (false, Some(a))
                        } else {
                            *accumulated = 0.0;
                            (true, Some(a))
                        }
                    }
                    _ => {
                        *accumulated = 0.0;
                        (true, None)
                    }
                };
                *previous = Some(modulated.data);
                let stack_in = carried(&head);
                let stack_out = if compute {
                    let out = run_part(&mut parts[1], inputs, &head).map_err(err)?;
                    let out_streams = carried(&out);
                    let base = continued(&stack_in, &out_streams)?;
                    *residual = Some(sub_all(&out_streams, &base));
                    out
                } else {
                    let cached = residual.as_ref().ok_or_else(|| {
                        PipelineError::Internal("TeaCache skipped a step with no residual".into())
                    })?;
                    let base = continued(&stack_in, cached)?;
                    as_carry(add_all(&base, cached))
                };
                let out = run_part(&mut parts[2], inputs, &stack_out).map_err(err)?;
                (out, compute, indicator)
            }
            Kind::FirstBlock {
                parts,
                threshold,
                first_residual,
                rest_residual,
            } => {
                let first = run_part(&mut parts[0], inputs, &BTreeMap::new()).map_err(err)?;
                let first_in = prefixed(&first, FIRST_IN);
                let first_out = carried(&first);
                let r1 = sub_all(&first_out, &continued(&first_in, &first_out)?);
                let diff = match (first_residual.as_ref(), rest_residual.is_some()) {
                    (Some(prev), true) => Some(rel_l1_all(&r1, prev)),
                    _ => None,
                };
                let compute = !diff.is_some_and(|d| d < *threshold);
                let rest_out = if compute {
                    let out = run_part(&mut parts[1], inputs, &first).map_err(err)?;
                    let out_streams = carried(&out);
                    let base = continued(&first_out, &out_streams)?;
                    *rest_residual = Some(sub_all(&out_streams, &base));
                    *first_residual = Some(r1);
                    out
                } else {
                    let cached = rest_residual.as_ref().ok_or_else(|| {
                        PipelineError::Internal("First-Block-Cache skipped with no residual".into())
                    })?;
                    let base = continued(&first_out, cached)?;
                    as_carry(add_all(&base, cached))
                };
                let out = run_part(&mut parts[2], inputs, &rest_out).map_err(err)?;
                (out, compute, diff)
            }
        };
        self.report.computed.push(computed);
        self.report.indicator.push(indicator);
        on_progress(Progress::Forward {
            step,
            outputs: &out,
            computed,
        });
        Ok(out)
    }

    /// Keeps the report for [`Pipeline::cache_report`].
    pub(super) fn finish(self) {
        *self.last_report = Some(self.report);
    }
}

pub(super) enum PartError {
    Model(crate::Error),
    Pipeline(PipelineError),
}

impl From<crate::Error> for PartError {
    fn from(e: crate::Error) -> Self {
        PartError::Model(e)
    }
}

/// The programs for `key`: the tapped whole forward, or the three cache parts.
fn compile_parts(
    model: &Model,
    shapes: &Shapes,
    key: &PartsKey,
    parallel: &Parallel,
    rank_options: &RankOptions,
) -> Result<Vec<Ranks>, PartError> {
    let opts = CompileOptions {
        parallel: parallel.clone(),
        ..Default::default()
    };
    let ranks = |g: Graph| model.ranks_for_graph(g, &opts, rank_options.clone());
    let mut full = model.graph(shapes, false)?;
    let n = full.num_blocks();
    match key {
        PartsKey::Tapped(names) => {
            let available: BTreeMap<String, ditto_ir::Id> = tappable(&full).into_iter().collect();
            for name in names {
                let Some(&id) = available.get(name) else {
                    return Err(PartError::Pipeline(PipelineError::Request(format!(
                        "the transformer exposes no value `{name}` (see Pipeline::tap_names)"
                    ))));
                };
                full.output(name, id);
            }
            Ok(vec![ranks(full)?])
        }
        PartsKey::TeaCache => {
            if n == 0 {
                return Err(no_blocks("TeaCache"));
            }
            let modulated = first_modulated_tap(&full)?;
            let head = full.part(span(None, Some(0)), &[modulated.as_str()])?;
            let stack = full.part(span(Some(0), Some(n)), &[])?;
            let tail = full.part(span(Some(n), None), &[])?;
            Ok(vec![ranks(head)?, ranks(stack)?, ranks(tail)?])
        }
        PartsKey::FirstBlock => {
            if n < 2 {
                return Err(PartError::Pipeline(PipelineError::Request(format!(
                    "First-Block-Cache needs at least 2 blocks (block 0 always runs); this transformer has {n}"
                ))));
            }
            let first_in: Vec<String> = (0..full.boundaries[0].len())
                .map(|j| format!("{FIRST_IN}{j}"))
                .collect();
            for (j, id) in full.boundaries[0].clone().into_iter().enumerate() {
                full.tap(first_in[j].clone(), id);
            }
            let names: Vec<&str> = first_in.iter().map(String::as_str).collect();
            let first = full.part(span(None, Some(1)), &names)?;
            let rest = full.part(span(Some(1), Some(n)), &[])?;
            let tail = full.part(span(Some(n), None), &[])?;
            Ok(vec![ranks(first)?, ranks(rest)?, ranks(tail)?])
        }
    }
}

impl From<ditto_ir::IrError> for PartError {
    fn from(e: ditto_ir::IrError) -> Self {
        PartError::Model(e.into())
    }
}

fn span(from: Option<usize>, to: Option<usize>) -> Span {
    Span { from, to }
}

fn no_blocks(what: &str) -> PartError {
    PartError::Pipeline(PipelineError::Request(format!(
        "{what} needs a transformer whose blocks are marked; this one has none"
    )))
}

/// Block 0's `modulated_input` tap: TeaCache's indicator.
pub(super) fn first_modulated_tap(g: &Graph) -> Result<String, PartError> {
    g.taps
        .iter()
        .map(|(n, _)| n)
        .find(|n| n.ends_with(&format!(".{MODULATED_INPUT}")))
        .cloned()
        .ok_or_else(|| {
            PartError::Pipeline(PipelineError::Request(
                "TeaCache needs block 0's modulated input, which this model does not expose".into(),
            ))
        })
}

pub(super) fn first_modulated_input(
    head: &ditto_codegen::Program,
) -> Result<String, PipelineError> {
    head.outputs
        .iter()
        .map(|(n, _)| n)
        .find(|n| n.ends_with(&format!(".{MODULATED_INPUT}")))
        .cloned()
        .ok_or_else(|| {
            PipelineError::Internal("the TeaCache head outputs no modulated input".into())
        })
}

/// Runs one part: its inputs from `carry` (the previous part's outputs) or the model's.
fn run_part(
    ranks: &mut Ranks,
    inputs: &BTreeMap<String, HostTensor>,
    carry: &BTreeMap<String, HostTensor>,
) -> Result<BTreeMap<String, HostTensor>, crate::Error> {
    let mut feed = BTreeMap::new();
    for b in &ranks.program().inputs {
        let t = carry
            .get(&b.name)
            .or_else(|| inputs.get(&b.name))
            .ok_or_else(|| crate::Error::Input(format!("a cache part needs `{}`", b.name)))?;
        feed.insert(b.name.clone(), t.clone());
    }
    Ok(ranks.run(&feed)?.0)
}

/// The `carry.<j>` outputs of a part, in stream order.
pub(super) fn carried(out: &BTreeMap<String, HostTensor>) -> Vec<HostTensor> {
    prefixed(out, "carry.")
}

/// Outputs `<prefix>0`, `<prefix>1`, ... in order.
pub(super) fn prefixed(out: &BTreeMap<String, HostTensor>, prefix: &str) -> Vec<HostTensor> {
    (0..)
        .map_while(|j| out.get(&format!("{prefix}{j}")).cloned())
        .collect()
}

pub(super) fn as_carry(streams: Vec<HostTensor>) -> BTreeMap<String, HostTensor> {
    streams
        .into_iter()
        .enumerate()
        .map(|(j, t)| (carry_name(j), t))
        .collect()
}

/// For each stream of a later boundary (`to`, by shape), the values of an earlier boundary
/// (`from`) it continues: the stream of the same index when the shapes agree (DiT, PixArt,
/// SD3, whose last block drops the text stream), else all of `from`'s streams joined along
/// the token axis (Flux: the [text; image] joint stream of the single blocks continues the
/// double blocks' text and image streams).
pub(super) fn continued(
    from: &[HostTensor],
    to: &[HostTensor],
) -> Result<Vec<HostTensor>, PipelineError> {
    to.iter()
        .enumerate()
        .map(|(j, t)| {
            if let Some(f) = from.get(j).filter(|f| f.shape == t.shape) {
                return Ok(f.clone());
            }
            let joined = concat_tokens(from);
            match joined {
                Some(c) if c.shape == t.shape => Ok(c),
                _ => Err(PipelineError::Internal(format!(
                    "cannot match block stream {j} of shape {:?} with the streams {:?} it continues",
                    t.shape,
                    from.iter().map(|f| f.shape.clone()).collect::<Vec<_>>()
                ))),
            }
        })
        .collect()
}

/// [B, n_i, D] tensors joined along axis 1.
fn concat_tokens(xs: &[HostTensor]) -> Option<HostTensor> {
    let first = xs.first()?;
    let (b, d) = match first.shape.as_slice() {
        &[b, _, d] => (b, d),
        _ => return None,
    };
    if xs
        .iter()
        .any(|x| x.shape.len() != 3 || x.shape[0] != b || x.shape[2] != d)
    {
        return None;
    }
    let n: usize = xs.iter().map(|x| x.shape[1]).sum();
    let mut data = Vec::with_capacity(b * n * d);
    for row in 0..b {
        for x in xs {
            let len = x.shape[1] * d;
            data.extend_from_slice(&x.data[row * len..(row + 1) * len]);
        }
    }
    Some(HostTensor::new(vec![b, n, d], data))
}

pub(super) fn sub_all(a: &[HostTensor], b: &[HostTensor]) -> Vec<HostTensor> {
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            HostTensor::new(
                x.shape.clone(),
                x.data.iter().zip(&y.data).map(|(p, q)| p - q).collect(),
            )
        })
        .collect()
}

fn add_all(a: &[HostTensor], b: &[HostTensor]) -> Vec<HostTensor> {
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            HostTensor::new(
                x.shape.clone(),
                x.data.iter().zip(&y.data).map(|(p, q)| p + q).collect(),
            )
        })
        .collect()
}

/// mean|x - prev| / mean|prev| (in f64; the means' common 1/n cancels). 0 when both are
/// zero, infinite when only `prev` is.
pub fn rel_l1(x: &[f32], prev: &[f32]) -> f64 {
    let (num, den) = l1_sums(x, prev);
    ratio(num, den)
}

pub(super) fn l1_sums(x: &[f32], prev: &[f32]) -> (f64, f64) {
    x.iter().zip(prev).fold((0.0, 0.0), |(n, d), (&a, &b)| {
        (n + (a as f64 - b as f64).abs(), d + (b as f64).abs())
    })
}

pub(super) fn ratio(num: f64, den: f64) -> f64 {
    if den > 0.0 {
        num / den
    } else if num == 0.0 {
        0.0
    } else {
        f64::INFINITY
    }
}

/// [`rel_l1`] over several streams taken as one tensor.
fn rel_l1_all(x: &[HostTensor], prev: &[HostTensor]) -> f64 {
    let (num, den) = x.iter().zip(prev).fold((0.0, 0.0), |(n, d), (a, b)| {
        let (p, q) = l1_sums(&a.data, &b.data);
        (n + p, d + q)
    });
    ratio(num, den)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_parse_and_print() {
        assert_eq!("none".parse::<CachePolicy>().unwrap(), CachePolicy::None);
        assert_eq!(
            "teacache:0.25".parse::<CachePolicy>().unwrap(),
            CachePolicy::TeaCache { threshold: 0.25 }
        );
        assert_eq!(
            "fbcache:0".parse::<CachePolicy>().unwrap(),
            CachePolicy::FirstBlock { threshold: 0.0 }
        );
        assert_eq!(
            CachePolicy::TeaCache { threshold: 0.1 }.to_string(),
            "teacache:0.1"
        );
        for (bad, want) in [
            ("magic:0.1", "unknown cache policy"),
            ("teacache", "needs a threshold"),
            ("teacache:-0.1", "non-negative"),
            ("fbcache:abc", "not a number"),
            ("fbcache:inf", "non-negative"),
            ("none:1", "takes no threshold"),
        ] {
            let e = bad.parse::<CachePolicy>().unwrap_err().to_string();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }

    #[test]
    fn rescale_is_a_clamped_polynomial() {
        let r = TeaCacheRescale {
            coefficients: vec![2.0, -1.0, 0.5],
            source: String::new(),
            fit: None,
        };
        assert_eq!(r.eval(1.0), 1.5);
        assert_eq!(r.eval(0.0), 0.5);
        let neg = TeaCacheRescale {
            coefficients: vec![1.0, -0.1],
            source: String::new(),
            fit: None,
        };
        assert_eq!(neg.eval(0.0), 0.0);
        assert_eq!(TeaCacheRescale::identity().eval(0.3), 0.3);
        assert!(TeaCacheRescale::builtin().is_ok());
    }

    #[test]
    fn streams_continue_by_index_or_joined() {
        let t = |shape: Vec<usize>, v: f32| {
            let n = shape.iter().product();
            HostTensor::new(shape, vec![v; n])
        };
        // Flux: [text 2 tokens; image 3 tokens] -> joint 5 tokens.
        let from = [t(vec![2, 2, 4], 1.0), t(vec![2, 3, 4], 2.0)];
        let to = [t(vec![2, 5, 4], 0.0)];
        let c = continued(&from, &to).unwrap();
        assert_eq!(c[0].shape, vec![2, 5, 4]);
        // Per batch row: 8 ones then 12 twos.
        assert_eq!(&c[0].data[..8], &[1.0; 8]);
        assert_eq!(&c[0].data[8..20], &[2.0; 12]);
        assert_eq!(&c[0].data[20..28], &[1.0; 8]);
        // SD3's last boundary keeps the image stream only.
        let sd3 = continued(
            &[t(vec![1, 3, 4], 5.0), t(vec![1, 2, 4], 6.0)],
            &[t(vec![1, 3, 4], 0.0)],
        )
        .unwrap();
        assert_eq!(sd3[0].data, vec![5.0; 12]);
        assert!(continued(&from, &[t(vec![2, 7, 4], 0.0)]).is_err());
    }

    #[test]
    fn relative_l1() {
        assert_eq!(rel_l1(&[1.0, -1.0], &[2.0, -2.0]), 0.5);
        assert_eq!(rel_l1(&[0.0], &[0.0]), 0.0);
        assert!(rel_l1(&[1.0], &[0.0]).is_infinite());
    }
}
