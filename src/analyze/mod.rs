//! `ditto analyze`: how much the transformer's internals change from one denoising step to
//! the next (DiTCacheAnalysis), the evidence step caching rests on.
//!
//! Generations run with taps ([`Pipeline::with_taps`]) on every attention layer's K, V (image
//! and text tokens apart) and output, every block's modulated input and output, and the model
//! output. Per run (condition x seed x step count), layer, tensor and step t >= 1 we record
//! `l1 = mean|x_t - x_{t-1}|` and `rel_l1 = l1 / mean|x_{t-1}|`. Low values mark redundant
//! steps: what a cache could reuse. The summary says how stable those curves are across
//! prompts and seeds (coefficient of variation at each step, averaged over steps) and, when
//! several step counts are given, whether the curve's *shape* over the progress of the
//! schedule stays the same (each curve divided by its mean, resampled to a common grid): the
//! claim that lets a cache policy be tuned once per model.
//!
//! `--fit-teacache` fits TeaCache's rescaling polynomial to the recorded pairs (block 0's
//! modulated-input change, model-output change), see [`fit_teacache`].

pub mod fit;
mod plot;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::pipeline::cache::rel_l1;
use crate::{GenerateRequest, HostTensor, Noise, Pipeline, Progress, PromptEmbeds};
use crate::{PipelineError, TeaCacheRescale, TimestepSchedule};

pub use plot::{write_plots, PlotError};

/// What one run is conditioned on.
#[derive(Clone, Debug)]
pub enum Condition {
    /// A class of a class-conditional model, with its name for the outputs.
    Class { label: usize, name: String },
    /// Prompt embeddings (all rows of the file in one batch), named after their file.
    Prompt { name: String, embeds: PromptEmbeds },
}

impl Condition {
    pub fn name(&self) -> String {
        match self {
            Condition::Class { label, name } if name.is_empty() => format!("class {label}"),
            Condition::Class { label, name } => format!("class {label} {name}"),
            Condition::Prompt { name, .. } => name.clone(),
        }
    }
}

/// The generations to record: every condition x seed x step count.
#[derive(Clone, Debug)]
pub struct AnalyzeOptions {
    pub conditions: Vec<Condition>,
    pub seeds: Vec<u64>,
    /// Step counts (several: stability across step counts).
    pub steps: Vec<usize>,
    pub guidance: Option<f32>,
    pub height: Option<usize>,
    pub width: Option<usize>,
    pub timesteps: TimestepSchedule,
}

/// One recorded generation.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct RunInfo {
    pub condition: String,
    pub seed: u64,
    pub steps: usize,
}

/// One recorded value: a tensor of a layer (`model` / `sample` for the model output).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct Series {
    pub layer: String,
    pub tensor: String,
}

impl Series {
    /// Splits a tap name at its last dot: `transformer_blocks.3.attn1.k_img` is tensor
    /// `k_img` of layer `transformer_blocks.3.attn1`; the model output `sample` is tensor
    /// `sample` of layer `model`.
    pub fn from_output(name: &str) -> Series {
        match name.rsplit_once('.') {
            Some((layer, tensor)) => Series {
                layer: layer.into(),
                tensor: tensor.into(),
            },
            None => Series {
                layer: "model".into(),
                tensor: name.into(),
            },
        }
    }
}

/// The change of one tensor between two consecutive steps.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Change {
    /// mean |x_t - x_{t-1}|
    pub l1: f64,
    /// mean |x_t - x_{t-1}| / mean |x_{t-1}|
    pub rel_l1: f64,
}

impl Change {
    /// The change from `prev` to `x` (same length), in f64.
    pub fn between(prev: &[f32], x: &[f32]) -> Change {
        let n = prev.len().min(x.len()).max(1) as f64;
        let diff: f64 = x
            .iter()
            .zip(prev)
            .map(|(&a, &b)| (a as f64 - b as f64).abs())
            .sum();
        Change {
            l1: diff / n,
            rel_l1: rel_l1(x, prev),
        }
    }
}

/// Everything recorded.
#[derive(Clone, Debug)]
pub struct Analysis {
    /// The pipeline's source (folder or built-in name).
    pub model: String,
    pub runs: Vec<RunInfo>,
    /// In depth order (the model's tap order; block outputs after their block's taps; the
    /// model output last).
    pub series: Vec<Series>,
    /// `changes[run][series][t - 1]`: the change from step t - 1 to step t (t = 1..steps).
    pub changes: Vec<Vec<Vec<Change>>>,
}

/// One CSV row.
#[derive(Clone, Debug, PartialEq)]
pub struct Row<'a> {
    pub run: &'a RunInfo,
    pub series: &'a Series,
    pub step: usize,
    pub change: Change,
}

impl Analysis {
    /// Every recorded value, run by run, series by series, step by step.
    pub fn rows(&self) -> impl Iterator<Item = Row<'_>> {
        self.runs.iter().enumerate().flat_map(move |(r, run)| {
            self.series.iter().enumerate().flat_map(move |(s, series)| {
                self.changes[r][s]
                    .iter()
                    .enumerate()
                    .map(move |(i, &change)| Row {
                        run,
                        series,
                        step: i + 1,
                        change,
                    })
            })
        })
    }

    /// `redundancy.csv`: model, condition, seed, steps, layer, tensor, step, l1, rel_l1.
    pub fn csv(&self) -> String {
        let mut out = String::from("model,condition,seed,steps,layer,tensor,step,l1,rel_l1\n");
        for row in self.rows() {
            let _ = writeln!(
                out,
                "{},{},{},{},{},{},{},{:e},{:e}",
                csv_field(&self.model),
                csv_field(&row.run.condition),
                row.run.seed,
                row.run.steps,
                csv_field(&row.series.layer),
                csv_field(&row.series.tensor),
                row.step,
                row.change.l1,
                row.change.rel_l1
            );
        }
        out
    }

    /// The distinct step counts, in the order given.
    pub fn step_counts(&self) -> Vec<usize> {
        let mut out: Vec<usize> = Vec::new();
        for r in &self.runs {
            if !out.contains(&r.steps) {
                out.push(r.steps);
            }
        }
        out
    }

    /// Tensor kinds in first-seen order (`k_img`, `v_img`, ..., `sample`).
    pub fn tensors(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for s in &self.series {
            if !out.contains(&s.tensor) {
                out.push(s.tensor.clone());
            }
        }
        out
    }

    /// The mean curve over the runs with `steps` steps, per series index: `[series][t - 1]`
    /// of `rel_l1` (or `l1`).
    pub fn mean_curves(&self, steps: usize, relative: bool) -> Vec<Vec<f64>> {
        let runs: Vec<usize> = (0..self.runs.len())
            .filter(|&r| self.runs[r].steps == steps)
            .collect();
        (0..self.series.len())
            .map(|s| {
                (0..steps.saturating_sub(1))
                    .map(|i| {
                        let sum: f64 = runs
                            .iter()
                            .map(|&r| pick(self.changes[r][s][i], relative))
                            .sum();
                        sum / runs.len().max(1) as f64
                    })
                    .collect()
            })
            .collect()
    }

    /// The stability summary (see the module doc).
    pub fn summary(&self) -> Summary {
        let mut across_runs = Vec::new();
        for &steps in &self.step_counts() {
            let runs: Vec<usize> = (0..self.runs.len())
                .filter(|&r| self.runs[r].steps == steps)
                .collect();
            let means = self.mean_curves(steps, true);
            for (s, series) in self.series.iter().enumerate() {
                let curve = &means[s];
                let cv = (runs.len() > 1).then(|| {
                    let per_step: Vec<f64> = (0..steps - 1)
                        .map(|i| {
                            let v: Vec<f64> =
                                runs.iter().map(|&r| self.changes[r][s][i].l1).collect();
                            coefficient_of_variation(&v)
                        })
                        .collect();
                    mean(&per_step)
                });
                across_runs.push(SeriesStats {
                    steps,
                    series: series.clone(),
                    runs: runs.len(),
                    mean_rel_l1: mean(curve),
                    thirds: thirds(curve),
                    cv_across_runs: cv,
                });
            }
        }
        let mut across_steps = Vec::new();
        let counts = self.step_counts();
        if counts.len() > 1 {
            let grid = counts
                .iter()
                .min()
                .copied()
                .unwrap_or(2)
                .saturating_sub(1)
                .max(2);
            let curves: Vec<Vec<Vec<f64>>> =
                counts.iter().map(|&n| self.mean_curves(n, true)).collect();
            for (s, series) in self.series.iter().enumerate() {
                let shapes: Vec<Vec<f64>> = curves
                    .iter()
                    .map(|c| resample(&normalized(&c[s]), grid))
                    .collect();
                let per_point: Vec<f64> = (0..grid)
                    .map(|k| {
                        let v: Vec<f64> = shapes.iter().map(|c| c[k]).collect();
                        coefficient_of_variation(&v)
                    })
                    .collect();
                across_steps.push(ShapeStats {
                    series: series.clone(),
                    step_counts: counts.clone(),
                    shape_cv: mean(&per_point),
                });
            }
        }
        Summary {
            model: self.model.clone(),
            runs: self.runs.clone(),
            across_runs,
            across_steps,
        }
    }
}

fn pick(c: Change, relative: bool) -> f64 {
    if relative {
        c.rel_l1
    } else {
        c.l1
    }
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// Population standard deviation over the mean; 0 for all-zero values (a constant tensor,
/// e.g. PixArt's caption K/V, is perfectly stable).
pub fn coefficient_of_variation(v: &[f64]) -> f64 {
    let m = mean(v);
    if m == 0.0 {
        return 0.0;
    }
    let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / v.len() as f64;
    var.sqrt() / m.abs()
}

/// Means of the first, middle and last third of a curve.
fn thirds(c: &[f64]) -> [f64; 3] {
    let n = c.len();
    let cut = |k: usize| k * n / 3;
    [
        mean(&c[..cut(1)]),
        mean(&c[cut(1)..cut(2)]),
        mean(&c[cut(2)..]),
    ]
}

fn normalized(c: &[f64]) -> Vec<f64> {
    let m = mean(c);
    if m == 0.0 {
        c.to_vec()
    } else {
        c.iter().map(|v| v / m).collect()
    }
}

/// The curve (points at fractions (i + 1) / (n + 1) of the schedule, i = 0..n) linearly
/// interpolated at `k` evenly spaced fractions.
fn resample(c: &[f64], k: usize) -> Vec<f64> {
    let n = c.len();
    if n == 0 {
        return vec![0.0; k];
    }
    if n == 1 {
        return vec![c[0]; k];
    }
    (0..k)
        .map(|j| {
            // Position in the curve's own index space.
            let f = (j as f64 + 1.0) / (k as f64 + 1.0);
            let pos = (f * (n as f64 + 1.0) - 1.0).clamp(0.0, (n - 1) as f64);
            let i = (pos.floor() as usize).min(n - 2);
            let w = pos - i as f64;
            c[i] * (1.0 - w) + c[i + 1] * w
        })
        .collect()
}

/// Stability of one series over the runs of one step count.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SeriesStats {
    pub steps: usize,
    pub series: Series,
    pub runs: usize,
    /// Mean over steps of the mean (over runs) rel_l1.
    pub mean_rel_l1: f64,
    /// The same over the first, middle and last third of the steps.
    pub thirds: [f64; 3],
    /// Mean over steps of the coefficient of variation of l1 across runs (prompts and
    /// seeds); `None` with a single run.
    pub cv_across_runs: Option<f64>,
}

/// Whether a series keeps its shape over the schedule across step counts.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ShapeStats {
    pub series: Series,
    pub step_counts: Vec<usize>,
    /// Mean coefficient of variation, across step counts, of the mean-normalized curves
    /// resampled to a common grid.
    pub shape_cv: f64,
}

/// `summary.json` (and the numbers of `summary.txt`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Summary {
    pub model: String,
    pub runs: Vec<RunInfo>,
    pub across_runs: Vec<SeriesStats>,
    pub across_steps: Vec<ShapeStats>,
}

impl Summary {
    /// Per tensor kind and step count: (mean, max) of the across-runs CV over layers.
    fn cv_by_tensor(&self) -> Vec<(usize, String, f64, f64, String)> {
        let mut keys: Vec<(usize, String)> = Vec::new();
        for s in &self.across_runs {
            let k = (s.steps, s.series.tensor.clone());
            if !keys.contains(&k) {
                keys.push(k);
            }
        }
        keys.into_iter()
            .filter_map(|(steps, tensor)| {
                let of: Vec<&SeriesStats> = self
                    .across_runs
                    .iter()
                    .filter(|s| s.steps == steps && s.series.tensor == tensor)
                    .collect();
                let cvs: Vec<(f64, &str)> = of
                    .iter()
                    .filter_map(|s| s.cv_across_runs.map(|c| (c, s.series.layer.as_str())))
                    .collect();
                if cvs.is_empty() {
                    return None;
                }
                let m = mean(&cvs.iter().map(|c| c.0).collect::<Vec<_>>());
                let worst = cvs.iter().max_by(|a, b| a.0.total_cmp(&b.0))?;
                Some((steps, tensor, m, worst.0, worst.1.to_string()))
            })
            .collect()
    }
}

/// The recorder of one run: the previous step's outputs and the changes so far.
struct Recorder<'a> {
    index: &'a BTreeMap<String, usize>,
    prev: Option<BTreeMap<String, HostTensor>>,
    changes: Vec<Vec<Change>>,
    error: Option<String>,
}

impl Recorder<'_> {
    fn observe(&mut self, outputs: &BTreeMap<String, HostTensor>) {
        if let Some(prev) = &self.prev {
            for (name, &s) in self.index {
                match (prev.get(name), outputs.get(name)) {
                    (Some(a), Some(b)) if a.shape == b.shape => {
                        self.changes[s].push(Change::between(&a.data, &b.data));
                    }
                    _ => {
                        self.error
                            .get_or_insert(format!("the transformer gave no `{name}` in a step"));
                    }
                }
            }
        }
        let kept = self
            .index
            .keys()
            .filter_map(|k| outputs.get(k).map(|v| (k.clone(), v.clone())))
            .collect();
        self.prev = Some(kept);
    }
}

/// Runs every generation of `opts` with all the taps of the pipeline's transformer and
/// records the step-to-step changes. `on_step` is called after every denoising step (for a
/// progress bar) with the steps done so far and the total.
pub fn record(
    pipe: &mut Pipeline,
    opts: &AnalyzeOptions,
    on_step: &mut dyn FnMut(usize, usize),
) -> Result<Analysis, crate::Error> {
    if opts.conditions.is_empty() || opts.seeds.is_empty() || opts.steps.is_empty() {
        return Err(crate::Error::Input(
            "nothing to analyze: give at least one condition, seed and step count".into(),
        ));
    }
    if let Some(&n) = opts.steps.iter().find(|&&n| n < 2) {
        return Err(crate::Error::Input(format!(
            "--steps {n}: the analysis compares consecutive steps, so each run needs at least 2"
        )));
    }
    let taps = pipe.tap_names()?;
    let mut series: Vec<Series> = taps.iter().map(|t| Series::from_output(t)).collect();
    series.push(Series::from_output("sample"));
    let index: BTreeMap<String, usize> = taps
        .iter()
        .cloned()
        .chain(std::iter::once("sample".to_string()))
        .enumerate()
        .map(|(i, n)| (n, i))
        .collect();
    pipe.set_taps(taps);
    let total: usize = opts.steps.iter().sum::<usize>() * opts.conditions.len() * opts.seeds.len();
    let mut done = 0;
    let mut runs = Vec::new();
    let mut changes = Vec::new();
    let result = (|| -> Result<(), crate::Error> {
        for &steps in &opts.steps {
            for cond in &opts.conditions {
                for &seed in &opts.seeds {
                    let mut req = match cond {
                        Condition::Class { label, .. } => GenerateRequest::classes(vec![*label]),
                        Condition::Prompt { embeds, .. } => GenerateRequest::prompt(embeds.clone()),
                    }
                    .with_noise(Noise::Seed(seed))
                    .with_steps(steps)
                    .with_timesteps(opts.timesteps.clone());
                    req.guidance = opts.guidance;
                    req.height = opts.height;
                    req.width = opts.width;
                    let mut rec = Recorder {
                        index: &index,
                        prev: None,
                        changes: vec![Vec::with_capacity(steps); index.len()],
                        error: None,
                    };
                    pipe.generate_with(&req, &mut |p| match p {
                        Progress::Forward { outputs, .. } => rec.observe(outputs),
                        Progress::Step { .. } => {
                            done += 1;
                            on_step(done, total);
                        }
                        _ => {}
                    })?;
                    if let Some(e) = rec.error {
                        return Err(PipelineError::Internal(e).into());
                    }
                    runs.push(RunInfo {
                        condition: cond.name(),
                        seed,
                        steps,
                    });
                    changes.push(rec.changes);
                }
            }
        }
        Ok(())
    })();
    pipe.set_taps(Vec::new());
    result?;
    Ok(Analysis {
        model: pipe.source().to_string(),
        runs,
        series,
        changes,
    })
}

/// The fewest steps per run `--fit-teacache` accepts: 5 step-to-step changes where TeaCache
/// decides (steps 1..n-2), the points a degree-4 polynomial needs.
pub const FIT_MIN_STEPS: usize = 7;

/// Fits TeaCache's degree-4 rescaling polynomial by least squares: x = relative L1 change of
/// block 0's modulated input (the indicator TeaCache computes), y = relative L1 change of
/// the model output, over the steps where TeaCache decides (1..n-2) of every run.
///
/// The last step is left out: it always runs, so its pair never informs a decision, and its
/// output change is an outlier (an epsilon-predicting model's output jumps at t = 0) that
/// would dominate the squares.
pub fn fit_teacache(a: &Analysis) -> Result<TeaCacheRescale, crate::Error> {
    if let Some(r) = a.runs.iter().find(|r| r.steps < FIT_MIN_STEPS) {
        return Err(crate::Error::Input(format!(
            "--fit-teacache needs at least {FIT_MIN_STEPS} steps per run (5 changes between the steps TeaCache decides on, for a degree-4 polynomial); a run has {}",
            r.steps
        )));
    }
    let find = |pred: &dyn Fn(&Series) -> bool, what: &str| {
        a.series.iter().position(pred).ok_or_else(|| {
            crate::Error::Input(format!("--fit-teacache: the analysis recorded no {what}"))
        })
    };
    let xi = find(
        &|s| s.tensor == "modulated_input",
        "modulated input of block 0",
    )?;
    let yi = find(
        &|s| s.layer == "model" && s.tensor == "sample",
        "model output",
    )?;
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for (info, run) in a.runs.iter().zip(&a.changes) {
        // changes[t - 1] is step t; steps 1..=n-2.
        let decided = info.steps.saturating_sub(2);
        for (cx, cy) in run[xi].iter().zip(&run[yi]).take(decided) {
            if cx.rel_l1.is_finite() && cy.rel_l1.is_finite() {
                x.push(cx.rel_l1);
                y.push(cy.rel_l1);
            }
        }
    }
    let (coefficients, r2) =
        fit::polyfit(&x, &y, 4).map_err(|e| crate::Error::Input(format!("--fit-teacache: {e}")))?;
    let xmin = x.iter().copied().fold(f64::INFINITY, f64::min);
    let xmax = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Ok(TeaCacheRescale {
        coefficients,
        source: format!("fitted by ditto analyze on {}", a.model),
        fit: Some(serde_json::json!({
            "indicator": format!("{}.{} rel_l1", a.series[xi].layer, a.series[xi].tensor),
            "target": "model output (sample) rel_l1",
            "steps_used": "1..n-2 of each run (the last step always runs)",
            "pairs": x.len(),
            "r2": r2,
            "indicator_range": [xmin, xmax],
            "runs": a.runs.len(),
            "step_counts": a.step_counts(),
        })),
    })
}

/// Writes `redundancy.csv`, `summary.txt`, `summary.json` and the SVG plots into `dir`;
/// returns the files written.
pub fn write_outputs(a: &Analysis, dir: &Path) -> Result<Vec<PathBuf>, crate::Error> {
    let io = |path: &Path, e: std::io::Error| crate::Error::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let mut written = Vec::new();
    let csv = dir.join("redundancy.csv");
    std::fs::write(&csv, a.csv()).map_err(|e| io(&csv, e))?;
    written.push(csv);
    let summary = a.summary();
    let txt = dir.join("summary.txt");
    std::fs::write(&txt, summary_text(a, &summary)).map_err(|e| io(&txt, e))?;
    written.push(txt);
    let json = dir.join("summary.json");
    let text = serde_json::to_string_pretty(&summary)
        .map_err(|e| crate::Error::Input(format!("summary.json: {e}")))?;
    std::fs::write(&json, text + "\n").map_err(|e| io(&json, e))?;
    written.push(json);
    written.extend(write_plots(a, dir).map_err(|e| crate::Error::Io {
        path: dir.display().to_string(),
        reason: e.to_string(),
    })?);
    Ok(written)
}

/// Characters from low to high change for the text heatmaps.
const RAMP: &[u8] = b" .:-=+*#%@";

/// `summary.txt`: the runs, the stability numbers ([`stability_text`]), and per step count
/// and tensor a text heatmap (layers x steps) of the mean rel_l1 with each layer's mean and
/// its early / middle / late thirds: where the model is redundant (low change) and where it
/// is not.
pub fn summary_text(a: &Analysis, s: &Summary) -> String {
    let mut out = stability_text(a, s);
    out.push_str(&heatmaps_text(a));
    out
}

/// The runs and the stability numbers across prompts/seeds and step counts.
pub fn stability_text(a: &Analysis, s: &Summary) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "redundancy analysis of {}", a.model);
    let conds: Vec<&str> = {
        let mut v: Vec<&str> = Vec::new();
        for r in &a.runs {
            if !v.contains(&r.condition.as_str()) {
                v.push(&r.condition);
            }
        }
        v
    };
    let seeds: Vec<String> = {
        let mut v: Vec<u64> = a.runs.iter().map(|r| r.seed).collect();
        v.sort_unstable();
        v.dedup();
        v.iter().map(u64::to_string).collect()
    };
    let _ = writeln!(
        out,
        "{} run(s): conditions [{}] x seeds [{}] x steps {:?}",
        a.runs.len(),
        conds.join(", "),
        seeds.join(", "),
        a.step_counts()
    );
    let _ = writeln!(
        out,
        "values: l1 = mean|x_t - x_(t-1)|, rel_l1 = l1 / mean|x_(t-1)|, per step t >= 1\n"
    );

    let _ = writeln!(
        out,
        "stability across prompts/seeds (coefficient of variation of l1 across runs, mean over steps):"
    );
    let by_tensor = s.cv_by_tensor();
    if by_tensor.is_empty() {
        let _ = writeln!(
            out,
            "  (one run per step count: give several seeds or prompts)"
        );
    }
    for (steps, tensor, m, worst, layer) in &by_tensor {
        let _ = writeln!(
            out,
            "  {steps:>3} steps  {tensor:<16} mean CV {m:.3}  (max {worst:.3} at {layer})"
        );
    }
    if !s.across_steps.is_empty() {
        let _ = writeln!(
            out,
            "\nstability across step counts {:?} (CV of the mean-normalized curve shapes on a common grid):",
            s.across_steps[0].step_counts
        );
        for tensor in a.tensors() {
            let v: Vec<f64> = s
                .across_steps
                .iter()
                .filter(|x| x.series.tensor == tensor)
                .map(|x| x.shape_cv)
                .collect();
            let worst = v.iter().copied().fold(0.0, f64::max);
            let _ = writeln!(
                out,
                "  {tensor:<16} mean shape CV {:.3}  (max {worst:.3})",
                mean(&v)
            );
        }
    }

    out
}

/// Text heatmaps of the mean rel_l1, layers x steps, per step count and tensor.
pub fn heatmaps_text(a: &Analysis) -> String {
    let mut out = String::new();
    for &steps in &a.step_counts() {
        let curves = a.mean_curves(steps, true);
        for tensor in a.tensors() {
            let rows: Vec<usize> = (0..a.series.len())
                .filter(|&i| a.series[i].tensor == tensor)
                .collect();
            let max = rows
                .iter()
                .flat_map(|&i| curves[i].iter().copied())
                .filter(|v| v.is_finite())
                .fold(0.0, f64::max);
            let _ = writeln!(
                out,
                "\n{tensor}, {steps} steps: mean rel_l1 per layer (rows, shallow to deep) and step (columns 1..{}); ' ' = 0 .. '@' = {max:.3e}",
                steps - 1
            );
            let width = rows
                .iter()
                .map(|&i| a.series[i].layer.len())
                .max()
                .unwrap_or(5);
            let _ = writeln!(
                out,
                "  {:<width$} |{}| {:>10} {:>10} {:>10} {:>10}",
                "layer",
                "-".repeat(steps - 1),
                "mean",
                "early",
                "middle",
                "late"
            );
            for &i in &rows {
                let c = &curves[i];
                let cells: String = c
                    .iter()
                    .map(|&v| {
                        let f = if max > 0.0 && v.is_finite() {
                            v / max
                        } else {
                            0.0
                        };
                        let k =
                            ((f * (RAMP.len() - 1) as f64).round() as usize).min(RAMP.len() - 1);
                        RAMP[k] as char
                    })
                    .collect();
                let t = thirds(c);
                let _ = writeln!(
                    out,
                    "  {:<width$} |{cells}| {:>10.3e} {:>10.3e} {:>10.3e} {:>10.3e}",
                    a.series[i].layer,
                    mean(c),
                    t[0],
                    t[1],
                    t[2]
                );
            }
            // Where it is high and low.
            if rows.len() > 1 {
                let by_layer: Vec<(f64, &str)> = rows
                    .iter()
                    .map(|&i| (mean(&curves[i]), a.series[i].layer.as_str()))
                    .collect();
                let lo = by_layer.iter().min_by(|x, y| x.0.total_cmp(&y.0));
                let hi = by_layer.iter().max_by(|x, y| x.0.total_cmp(&y.0));
                if let (Some(lo), Some(hi)) = (lo, hi) {
                    let _ = writeln!(
                        out,
                        "  most redundant layer {} (mean {:.3e}); least {} (mean {:.3e})",
                        lo.1, lo.0, hi.1, hi.0
                    );
                }
            }
            let all: Vec<f64> = (0..steps - 1)
                .map(|t| mean(&rows.iter().map(|&i| curves[i][t]).collect::<Vec<_>>()))
                .collect();
            if let (Some(lo), Some(hi)) = (
                (0..all.len()).min_by(|&x, &y| all[x].total_cmp(&all[y])),
                (0..all.len()).max_by(|&x, &y| all[x].total_cmp(&all[y])),
            ) {
                let _ = writeln!(
                    out,
                    "  smallest change at step {} ({:.3e}), largest at step {} ({:.3e})",
                    lo + 1,
                    all[lo],
                    hi + 1,
                    all[hi]
                );
            }
        }
    }
    out
}
