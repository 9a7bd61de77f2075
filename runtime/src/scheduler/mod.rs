//! Denoising schedulers, read from diffusers' `scheduler_config.json`.
//!
//! Three schedulers are implemented, each matching diffusers 0.42 numerically, including the
//! dtype path: diffusers builds `betas`/`alphas_cumprod` with float32 torch ops, the inference
//! timesteps with float64 numpy, and steps the sample with float32 tensor arithmetic. Every
//! intermediate here is rounded where diffusers rounds it, in the same order and without
//! fused multiply-adds, so results should agree with diffusers on CPU to an ulp or so (the
//! flow-matching timesteps of the fixtures are reproduced bit for bit; see the notes in each
//! module for the places where a library-dependent rounding can differ by an ulp).
//!
//! - [`DdimScheduler`] (`DDIMScheduler`), deterministic (`eta = 0`).
//! - [`DpmSolverMultistepScheduler`] (`DPMSolverMultistepScheduler`), `dpmsolver++`, order 1 or 2.
//! - [`FlowMatchEulerScheduler`] (`FlowMatchEulerDiscreteScheduler`), with static shift or the
//!   resolution-dependent dynamic shift of Flux.
//!
//! Usage: `let mut s = from_config_json(text)?; s.set_timesteps(n, image_seq_len)?;` then for
//! `i in 0..n`: run the model at `s.timesteps()[i]`, combine guidance, `s.step(&out, i, &mut x)?`.
//! The initial noise is multiplied by `init_noise_sigma()` (1 for all three).

mod ddim;
mod dpm_solver;
mod flow_match;

pub use ddim::{DdimConfig, DdimScheduler};
pub use dpm_solver::{DpmSolverConfig, DpmSolverMultistepScheduler, FinalSigmas, SolverType};
pub use flow_match::{FlowMatchConfig, FlowMatchEulerScheduler, TimeShiftType};

use serde_json::{Map, Value};

/// Errors of scheduler construction and stepping.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error("scheduler config is not valid JSON: {0}")]
    Json(String),
    #[error("scheduler config must be a JSON object with a `_class_name`")]
    MissingClassName,
    #[error(
        "unsupported scheduler class `{0}` (supported: DDIMScheduler, \
         DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler)"
    )]
    UnknownClass(String),
    #[error("{class}: unsupported value {value} for `{field}` (supported: {supported})")]
    Unsupported {
        class: &'static str,
        field: &'static str,
        value: String,
        supported: &'static str,
    },
    #[error("{class}: `{field}` must be {expected}, got {value}")]
    InvalidField {
        class: &'static str,
        field: &'static str,
        expected: &'static str,
        value: String,
    },
    #[error("number of inference steps must be at least 1, got 0")]
    ZeroSteps,
    #[error("{class}: {steps} inference steps exceed num_train_timesteps = {train}")]
    TooManySteps {
        class: &'static str,
        steps: usize,
        train: usize,
    },
    #[error("{class}: custom sigmas are not supported by this scheduler")]
    CustomSigmasUnsupported { class: &'static str },
    #[error("{class}: custom sigmas must be finite and in (0, 1], got {value}")]
    InvalidSigma { class: &'static str, value: f64 },
    #[error("{class}: set_timesteps must be called before step")]
    NotInitialized { class: &'static str },
    #[error("{class}: step index {index} out of range ({len} timesteps)")]
    StepOutOfRange {
        class: &'static str,
        index: usize,
        len: usize,
    },
    #[error(
        "{class}: step {index} needs the model output of step {prev}, which was not run \
         (multistep solvers must step in order 0, 1, 2, ...)"
    )]
    OutOfOrder {
        class: &'static str,
        index: usize,
        prev: usize,
    },
    #[error(
        "{class}: bad step arguments: model_output has {model_output} elements, sample \
         {sample}, offset {offset}, full length {full_len}"
    )]
    LengthMismatch {
        class: &'static str,
        model_output: usize,
        sample: usize,
        offset: usize,
        full_len: usize,
    },
    #[error("{class}: {what}")]
    Invalid { class: &'static str, what: String },
}

/// A denoising scheduler. Object safe: pipelines hold a `Box<dyn Scheduler>`.
pub trait Scheduler: Send {
    /// The diffusers class name (`_class_name`).
    fn name(&self) -> &'static str;

    /// Prepares `num_steps` steps, as `scheduler.set_timesteps(num_steps, mu=...)` with no
    /// custom sigmas (what SD3Pipeline, PixArt and DiT do). `image_seq_len` is the number of
    /// image tokens; only flow matching with `use_dynamic_shifting` uses it (through
    /// [`calculate_shift`] with the config's base/max sequence lengths and shifts). Resets the
    /// multistep history.
    fn set_timesteps(
        &mut self,
        num_steps: usize,
        image_seq_len: usize,
    ) -> Result<(), SchedulerError>;

    /// Prepares one step per given sigma, as `set_timesteps(sigmas=..., mu=...)`. The sigmas
    /// are float64 as a pipeline builds them with numpy; diffusers casts them to float32 first.
    /// FluxPipeline passes [`flux_pipeline_sigmas`]. Only flow matching supports this.
    fn set_timesteps_with_sigmas(
        &mut self,
        sigmas: &[f64],
        image_seq_len: usize,
    ) -> Result<(), SchedulerError> {
        let _ = (sigmas, image_seq_len);
        Err(SchedulerError::CustomSigmasUnsupported { class: self.name() })
    }

    /// The timesteps as diffusers reports them (`scheduler.timesteps`), as f32. Entry `i` is
    /// the `timestep` the pipeline feeds the transformer at step `i` (Flux then divides it by
    /// 1000 itself; the scheduler reports the unscaled value like diffusers).
    fn timesteps(&self) -> &[f32];

    /// Number of steps prepared by the last `set_timesteps*` call.
    fn num_steps(&self) -> usize {
        self.timesteps().len()
    }

    /// Advances step `step_index`: updates `sample` (the flattened f32 latents) in place from
    /// `model_output` (same length). Steps must run in order `0..num_steps()`.
    fn step(
        &mut self,
        model_output: &[f32],
        step_index: usize,
        sample: &mut [f32],
    ) -> Result<(), SchedulerError> {
        let full_len = sample.len();
        self.step_slice(model_output, step_index, sample, 0, full_len)
    }

    /// Like [`Scheduler::step`] on the part `offset..offset + sample.len()` of a latent of
    /// `full_len` elements, for patch-wise stepping (PipeFusion). The update is elementwise,
    /// so stepping all parts of a step (in any order, each once) equals one full `step`;
    /// multistep solvers keep full-size history. All parts of step `i` must be done before
    /// any part of step `i + 1`.
    fn step_slice(
        &mut self,
        model_output: &[f32],
        step_index: usize,
        sample: &mut [f32],
        offset: usize,
        full_len: usize,
    ) -> Result<(), SchedulerError>;

    /// Standard deviation of the initial noise (`scheduler.init_noise_sigma`).
    fn init_noise_sigma(&self) -> f32 {
        1.0
    }
}

/// Builds a scheduler from the text of a diffusers `scheduler_config.json`; `_class_name`
/// chooses the type. Unknown fields are ignored (diffusers ignores them too); unsupported
/// values of known fields are an error naming the field. Python's non-standard `NaN`,
/// `Infinity` and `-Infinity` (e.g. `"lambda_min_clipped": -Infinity`) are accepted.
pub fn from_config_json(json: &str) -> Result<Box<dyn Scheduler>, SchedulerError> {
    let value: Value = serde_json::from_str(&quote_non_finite(json))
        .map_err(|e| SchedulerError::Json(e.to_string()))?;
    let map = value.as_object().ok_or(SchedulerError::MissingClassName)?;
    let class = map
        .get("_class_name")
        .and_then(Value::as_str)
        .ok_or(SchedulerError::MissingClassName)?;
    match class {
        "DDIMScheduler" => {
            let cfg = DdimConfig::from_map(map)?;
            Ok(Box::new(DdimScheduler::new(cfg)?))
        }
        "DPMSolverMultistepScheduler" => {
            let cfg = DpmSolverConfig::from_map(map)?;
            Ok(Box::new(DpmSolverMultistepScheduler::new(cfg)?))
        }
        "FlowMatchEulerDiscreteScheduler" => {
            let cfg = FlowMatchConfig::from_map(map)?;
            Ok(Box::new(FlowMatchEulerScheduler::new(cfg)?))
        }
        other => Err(SchedulerError::UnknownClass(other.to_string())),
    }
}

/// diffusers' `calculate_shift` (FluxPipeline, SD3Pipeline): `mu` of the resolution-dependent
/// shift, linear in the image token count, computed in float64 like Python.
pub fn calculate_shift(
    image_seq_len: usize,
    base_seq_len: usize,
    max_seq_len: usize,
    base_shift: f64,
    max_shift: f64,
) -> f64 {
    let m = (max_shift - base_shift) / (max_seq_len as f64 - base_seq_len as f64);
    let b = base_shift - m * base_seq_len as f64;
    image_seq_len as f64 * m + b
}

/// The sigmas FluxPipeline passes to `retrieve_timesteps`:
/// `np.linspace(1.0, 1 / num_steps, num_steps)` (float64). SD3Pipeline passes none, i.e. uses
/// [`Scheduler::set_timesteps`]. Note: the flux fixture's loop (timesteps
/// `[1000, 667, 334, 1]`) was made without them; FluxPipeline itself gives
/// `[1000, 750, 500, 250]` for 4 steps.
pub fn flux_pipeline_sigmas(num_steps: usize) -> Vec<f64> {
    np_linspace(1.0, 1.0 / num_steps as f64, num_steps)
}

// ---------------------------------------------------------------------------------------------
// Config access. Fields are read from the JSON object by name; a missing field (or `null` where
// diffusers' default is used for `None`) takes diffusers' `__init__` default.

pub(crate) struct ConfigReader<'a> {
    pub class: &'static str,
    map: &'a Map<String, Value>,
}

impl<'a> ConfigReader<'a> {
    pub fn new(class: &'static str, map: &'a Map<String, Value>) -> Self {
        ConfigReader { class, map }
    }

    fn get(&self, field: &str) -> Option<&'a Value> {
        self.map.get(field).filter(|v| !v.is_null())
    }

    fn invalid(&self, field: &'static str, expected: &'static str, v: &Value) -> SchedulerError {
        SchedulerError::InvalidField {
            class: self.class,
            field,
            expected,
            value: v.to_string(),
        }
    }

    pub fn unsupported(
        &self,
        field: &'static str,
        value: impl std::fmt::Display,
        supported: &'static str,
    ) -> SchedulerError {
        SchedulerError::Unsupported {
            class: self.class,
            field,
            value: value.to_string(),
            supported,
        }
    }

    pub fn opt_f64(&self, field: &'static str) -> Result<Option<f64>, SchedulerError> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => number(v)
                .map(Some)
                .ok_or_else(|| self.invalid(field, "a number", v)),
        }
    }

    pub fn f64_or(&self, field: &'static str, default: f64) -> Result<f64, SchedulerError> {
        Ok(self.opt_f64(field)?.unwrap_or(default))
    }

    pub fn i64_or(&self, field: &'static str, default: i64) -> Result<i64, SchedulerError> {
        match self.get(field) {
            None => Ok(default),
            // Python configs sometimes carry integral floats (e.g. `1000.0`); accept those.
            Some(v) => match v.as_i64() {
                Some(i) => Ok(i),
                None => match v.as_f64() {
                    Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Ok(f as i64),
                    _ => Err(self.invalid(field, "an integer", v)),
                },
            },
        }
    }

    /// A count that must be at least 1.
    pub fn count_or(&self, field: &'static str, default: usize) -> Result<usize, SchedulerError> {
        let v = self.i64_or(field, default as i64)?;
        if v < 1 {
            return Err(SchedulerError::InvalidField {
                class: self.class,
                field,
                expected: "a positive integer",
                value: v.to_string(),
            });
        }
        Ok(v as usize)
    }

    pub fn bool_or(&self, field: &'static str, default: bool) -> Result<bool, SchedulerError> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.invalid(field, "a boolean", v)),
        }
    }

    pub fn opt_str(&self, field: &'static str) -> Result<Option<&'a str>, SchedulerError> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.invalid(field, "a string", v)),
        }
    }

    pub fn str_or(&self, field: &'static str, default: &'a str) -> Result<&'a str, SchedulerError> {
        Ok(self.opt_str(field)?.unwrap_or(default))
    }

    pub fn opt_f64_list(&self, field: &'static str) -> Result<Option<Vec<f64>>, SchedulerError> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => {
                let arr = v
                    .as_array()
                    .ok_or_else(|| self.invalid(field, "a list of numbers", v))?;
                arr.iter()
                    .map(|x| number(x).ok_or_else(|| self.invalid(field, "a list of numbers", v)))
                    .collect::<Result<Vec<_>, _>>()
                    .map(Some)
            }
        }
    }

    /// A boolean option this implementation supports only at its default `false`.
    pub fn require_false(&self, field: &'static str) -> Result<(), SchedulerError> {
        if self.bool_or(field, false)? {
            return Err(self.unsupported(field, "true", "false"));
        }
        Ok(())
    }
}

/// A JSON number, or one of the strings [`quote_non_finite`] makes of Python's non-finite
/// literals.
fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => match s.as_str() {
            "NaN" => Some(f64::NAN),
            "Infinity" => Some(f64::INFINITY),
            "-Infinity" => Some(f64::NEG_INFINITY),
            _ => None,
        },
        _ => None,
    }
}

/// Python's `json.dump` writes `NaN`, `Infinity` and `-Infinity`, which are not JSON; diffusers
/// configs contain them (`"lambda_min_clipped": -Infinity`). Turns those bare tokens (outside
/// strings) into strings so serde_json parses the text; [`number`] reads them back.
fn quote_non_finite(json: &str) -> String {
    let mut out = String::with_capacity(json.len() + 16);
    let mut rest = json;
    let mut in_string = false;
    while let Some(c) = rest.chars().next() {
        if in_string {
            if c == '\\' {
                // Copy the escape and the escaped character verbatim.
                let mut it = rest.char_indices().skip(1);
                let end = it.next().map_or(rest.len(), |(i, ch)| i + ch.len_utf8());
                out.push_str(&rest[..end]);
                rest = &rest[end..];
                continue;
            }
            if c == '"' {
                in_string = false;
            }
            out.push(c);
            rest = &rest[c.len_utf8()..];
            continue;
        }
        if c == '"' {
            in_string = true;
            out.push(c);
            rest = &rest[1..];
            continue;
        }
        let token = ["-Infinity", "Infinity", "NaN"]
            .into_iter()
            .find(|t| rest.starts_with(t));
        if let Some(t) = token {
            out.push('"');
            out.push_str(t);
            out.push('"');
            rest = &rest[t.len()..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

// ---------------------------------------------------------------------------------------------
// numpy / torch numerics replicated bit for bit.

/// `np.linspace(start, stop, num)` in float64: `start + i * step` with the last value set to
/// `stop` exactly (numpy's algorithm, so rounding matches).
pub(crate) fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 0 {
        return Vec::new();
    }
    if num == 1 {
        return vec![start];
    }
    let div = (num - 1) as f64;
    let delta = stop - start;
    let step = delta / div;
    let mut y: Vec<f64> = (0..num)
        .map(|i| {
            if step == 0.0 {
                (i as f64 / div) * delta + start
            } else {
                i as f64 * step + start
            }
        })
        .collect();
    y[num - 1] = stop;
    y
}

/// `np.arange(start, stop, step)` for float64 arguments: length `ceil((stop - start) / step)`,
/// values `start + i * ((start + step) - start)` (numpy fills from the first two elements).
pub(crate) fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return Vec::new();
    }
    let len = len as usize;
    let delta = (start + step) - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => start + step,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// `np.round`: round half to even.
pub(crate) fn np_round(x: f64) -> f64 {
    x.round_ties_even()
}

/// `torch.linspace(start, end, steps, dtype=torch.float32)` on CPU: start/end rounded to f32,
/// `step = (end - start) / (steps - 1)` in f32, the first half counted up from `start`, the
/// second half down from `end` (ATen's `linspace_kernel`, which is serial, not vectorized).
pub(crate) fn torch_linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    let start = start as f32;
    let end = end as f32;
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|idx| {
            if idx < halfway {
                start + step * idx as f32
            } else {
                end - step * (steps - idx - 1) as f32
            }
        })
        .collect()
}

/// Beta schedule shared by DDIM and DPM-Solver.
#[derive(Debug, Clone, PartialEq)]
pub enum BetaSchedule {
    Linear,
    ScaledLinear,
    SquaredCosCapV2,
    /// `trained_betas` given explicitly.
    Trained(Vec<f64>),
}

impl BetaSchedule {
    pub(crate) fn read(r: &ConfigReader) -> Result<Self, SchedulerError> {
        if let Some(b) = r.opt_f64_list("trained_betas")? {
            return Ok(BetaSchedule::Trained(b));
        }
        match r.str_or("beta_schedule", "linear")? {
            "linear" => Ok(BetaSchedule::Linear),
            "scaled_linear" => Ok(BetaSchedule::ScaledLinear),
            "squaredcos_cap_v2" => Ok(BetaSchedule::SquaredCosCapV2),
            other => Err(r.unsupported(
                "beta_schedule",
                format!("{other:?}"),
                "\"linear\", \"scaled_linear\", \"squaredcos_cap_v2\"",
            )),
        }
    }
}

/// `alphas_cumprod` as diffusers builds it: betas in float32 (`torch.linspace`, or the cosine
/// schedule computed in Python float64 then cast), `alphas = 1.0 - betas` in f32, and
/// `torch.cumprod`, whose CPU kernel accumulates in double and rounds each output to f32.
pub(crate) fn alphas_cumprod(
    schedule: &BetaSchedule,
    beta_start: f64,
    beta_end: f64,
    num_train_timesteps: usize,
) -> Vec<f32> {
    let betas: Vec<f32> = match schedule {
        BetaSchedule::Linear => torch_linspace_f32(beta_start, beta_end, num_train_timesteps),
        BetaSchedule::ScaledLinear => {
            // `beta_start**0.5` is Python's pow; `** 2` on the f32 tensor is x * x.
            torch_linspace_f32(
                beta_start.powf(0.5),
                beta_end.powf(0.5),
                num_train_timesteps,
            )
            .into_iter()
            .map(|b| b * b)
            .collect()
        }
        BetaSchedule::SquaredCosCapV2 => betas_for_alpha_bar_cosine(num_train_timesteps, 0.999),
        BetaSchedule::Trained(b) => b.iter().map(|&x| x as f32).collect(),
    };
    let mut acc = 1.0f64;
    betas
        .iter()
        .map(|&b| {
            acc *= (1.0f32 - b) as f64;
            acc as f32
        })
        .collect()
}

/// diffusers' `betas_for_alpha_bar(n, max_beta, "cosine")` (Python floats, then f32 tensor).
fn betas_for_alpha_bar_cosine(n: usize, max_beta: f64) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        let c = ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos();
        c * c
    };
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(max_beta) as f32
        })
        .collect()
}

/// Timestep spacing of DDIM and DPM-Solver (Table 2 of arXiv:2305.08891).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepSpacing {
    Linspace,
    Leading,
    Trailing,
}

impl TimestepSpacing {
    pub(crate) fn read(r: &ConfigReader, default: &str) -> Result<Self, SchedulerError> {
        match r.str_or("timestep_spacing", default)? {
            "linspace" => Ok(TimestepSpacing::Linspace),
            "leading" => Ok(TimestepSpacing::Leading),
            "trailing" => Ok(TimestepSpacing::Trailing),
            other => Err(r.unsupported(
                "timestep_spacing",
                format!("{other:?}"),
                "\"linspace\", \"leading\", \"trailing\"",
            )),
        }
    }
}

/// What the model predicts (DDIM and DPM-Solver).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionType {
    Epsilon,
    VPrediction,
    Sample,
}

impl PredictionType {
    pub(crate) fn read(r: &ConfigReader) -> Result<Self, SchedulerError> {
        match r.str_or("prediction_type", "epsilon")? {
            "epsilon" => Ok(PredictionType::Epsilon),
            "v_prediction" => Ok(PredictionType::VPrediction),
            "sample" => Ok(PredictionType::Sample),
            other => Err(r.unsupported(
                "prediction_type",
                format!("{other:?}"),
                "\"epsilon\", \"v_prediction\", \"sample\"",
            )),
        }
    }
}

/// Checks the arguments of `step_slice` common to all schedulers.
pub(crate) fn check_step_args(
    class: &'static str,
    num_steps: usize,
    step_index: usize,
    model_output: &[f32],
    sample: &[f32],
    offset: usize,
    full_len: usize,
) -> Result<(), SchedulerError> {
    if num_steps == 0 {
        return Err(SchedulerError::NotInitialized { class });
    }
    if step_index >= num_steps {
        return Err(SchedulerError::StepOutOfRange {
            class,
            index: step_index,
            len: num_steps,
        });
    }
    if model_output.len() != sample.len()
        || offset
            .checked_add(sample.len())
            .is_none_or(|end| end > full_len)
    {
        return Err(SchedulerError::LengthMismatch {
            class,
            model_output: model_output.len(),
            sample: sample.len(),
            offset,
            full_len,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_python_non_finite_literals_outside_strings() {
        let s = r#"{"a": -Infinity, "b": [NaN, Infinity], "c": "NaN -Infinity \" Infinity"}"#;
        let q = quote_non_finite(s);
        let v: Value = serde_json::from_str(&q).unwrap();
        assert_eq!(number(&v["a"]), Some(f64::NEG_INFINITY));
        assert!(number(&v["b"][0]).unwrap().is_nan());
        assert_eq!(number(&v["b"][1]), Some(f64::INFINITY));
        assert_eq!(v["c"], "NaN -Infinity \" Infinity");
    }

    #[test]
    fn numpy_linspace_and_arange() {
        assert_eq!(np_linspace(0.0, 999.0, 7)[1], 166.5);
        assert_eq!(np_linspace(0.0, 999.0, 7)[6], 999.0);
        assert_eq!(np_linspace(2.0, 3.0, 1), vec![2.0]);
        // np.arange(1000, 0, -1000/6) has 6 elements: 1000, 833.33.., ..., 166.66..
        let a = np_arange(1000.0, 0.0, -1000.0 / 6.0);
        assert_eq!(a.len(), 6);
        assert_eq!(a[0], 1000.0);
        assert!((a[5] - 166.666_666_666_666_7).abs() < 1e-9);
        assert_eq!(np_round(166.5), 166.0);
        assert_eq!(np_round(499.5), 500.0);
    }

    #[test]
    fn torch_linspace_hits_both_ends_exactly() {
        let b = torch_linspace_f32(1e-4, 0.02, 1000);
        assert_eq!(b[0], 1e-4f32);
        assert_eq!(b[999], 0.02f32);
        assert_eq!(b.len(), 1000);
    }

    #[test]
    fn calculate_shift_matches_flux_endpoints() {
        assert!((calculate_shift(256, 256, 4096, 0.5, 1.15) - 0.5).abs() < 1e-15);
        assert!((calculate_shift(4096, 256, 4096, 0.5, 1.15) - 1.15).abs() < 1e-12);
    }
}
