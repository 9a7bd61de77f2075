//! `FlowMatchEulerDiscreteScheduler` (rectified flow, SD3 / Flux), as diffusers 0.42.
//!
//! The schedule is `sigma` from 1 towards 0 with one Euler step per entry:
//! `x <- x + (sigma_next - sigma) * v` and a final sigma of 0. Timesteps are `sigma * 1000`.
//!
//! Two ways to build the sigmas, as the pipelines do:
//! - [`Scheduler::set_timesteps`] (SD3Pipeline, or any caller passing no `sigmas`): timesteps
//!   `np.linspace(sigma_max * T, sigma_min * T, n)` in float64, where `sigma_max`/`sigma_min`
//!   are the (already shifted) float32 ends of the training schedule, divided by `T` and
//!   shifted again in float64, then cast to float32. For shift 3.0 and 6 steps this gives
//!   `[1000, 923.3425, 818.9233, 668.3267, 432.2251, 8.9286]`.
//! - [`Scheduler::set_timesteps_with_sigmas`] (FluxPipeline passes
//!   [`super::flux_pipeline_sigmas`] = `np.linspace(1, 1/n, n)`): the sigmas are cast to
//!   float32 first and shifted in float32 numpy arithmetic.
//!
//! Shifting is either static (`shift`: `s * sigma / (1 + (s - 1) * sigma)`) or, with
//! `use_dynamic_shifting`, resolution dependent with `mu = calculate_shift(image_seq_len, ...)`
//! from the config's `base_image_seq_len`, `max_image_seq_len`, `base_shift`, `max_shift`:
//! `exp(mu) / (exp(mu) + (1/sigma - 1))` (`time_shift_type = "exponential"`) or
//! `mu / (mu + (1/sigma - 1))` (`"linear"`).

use serde_json::{Map, Value};

use super::{
    calculate_shift, check_step_args, np_linspace, ConfigReader, Scheduler, SchedulerError,
};

const CLASS: &str = "FlowMatchEulerDiscreteScheduler";

/// Form of the resolution-dependent shift.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeShiftType {
    Exponential,
    Linear,
}

/// The supported fields of a `FlowMatchEulerDiscreteScheduler` config, with diffusers'
/// defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct FlowMatchConfig {
    pub num_train_timesteps: usize,
    pub shift: f64,
    pub use_dynamic_shifting: bool,
    pub base_shift: f64,
    pub max_shift: f64,
    pub base_image_seq_len: usize,
    pub max_image_seq_len: usize,
    pub time_shift_type: TimeShiftType,
}

impl Default for FlowMatchConfig {
    fn default() -> Self {
        FlowMatchConfig {
            num_train_timesteps: 1000,
            shift: 1.0,
            use_dynamic_shifting: false,
            base_shift: 0.5,
            max_shift: 1.15,
            base_image_seq_len: 256,
            max_image_seq_len: 4096,
            time_shift_type: TimeShiftType::Exponential,
        }
    }
}

impl FlowMatchConfig {
    /// Reads the fields of a parsed `scheduler_config.json`; unknown fields are ignored.
    /// `null` for the Optional dynamic-shift fields means diffusers' default.
    pub fn from_map(map: &Map<String, Value>) -> Result<Self, SchedulerError> {
        let r = ConfigReader::new(CLASS, map);
        let d = FlowMatchConfig::default();
        for field in [
            "invert_sigmas",
            "use_karras_sigmas",
            "use_exponential_sigmas",
            "use_beta_sigmas",
            "stochastic_sampling",
        ] {
            r.require_false(field)?;
        }
        // diffusers applies it only when truthy (`if self.config.shift_terminal:`).
        if let Some(t) = r.opt_f64("shift_terminal")? {
            if t != 0.0 {
                return Err(r.unsupported("shift_terminal", t, "null"));
            }
        }
        let time_shift_type = match r.str_or("time_shift_type", "exponential")? {
            "exponential" => TimeShiftType::Exponential,
            "linear" => TimeShiftType::Linear,
            other => {
                return Err(r.unsupported(
                    "time_shift_type",
                    format!("{other:?}"),
                    "\"exponential\", \"linear\"",
                ))
            }
        };
        let cfg = FlowMatchConfig {
            num_train_timesteps: r.count_or("num_train_timesteps", d.num_train_timesteps)?,
            shift: r.f64_or("shift", d.shift)?,
            use_dynamic_shifting: r.bool_or("use_dynamic_shifting", d.use_dynamic_shifting)?,
            base_shift: r.f64_or("base_shift", d.base_shift)?,
            max_shift: r.f64_or("max_shift", d.max_shift)?,
            base_image_seq_len: r.count_or("base_image_seq_len", d.base_image_seq_len)?,
            max_image_seq_len: r.count_or("max_image_seq_len", d.max_image_seq_len)?,
            time_shift_type,
        };
        if cfg.use_dynamic_shifting && cfg.base_image_seq_len == cfg.max_image_seq_len {
            return Err(r.unsupported(
                "max_image_seq_len",
                cfg.max_image_seq_len,
                "a value different from base_image_seq_len",
            ));
        }
        Ok(cfg)
    }
}

/// diffusers' `FlowMatchEulerDiscreteScheduler` (deterministic Euler).
#[derive(Debug, Clone)]
pub struct FlowMatchEulerScheduler {
    cfg: FlowMatchConfig,
    /// Ends of the training schedule (float32 values, read back as Python floats).
    sigma_max: f64,
    sigma_min: f64,
    timesteps: Vec<f32>,
    /// One sigma per step plus the final 0.
    sigmas: Vec<f32>,
}

impl FlowMatchEulerScheduler {
    pub fn new(cfg: FlowMatchConfig) -> Result<Self, SchedulerError> {
        if !(cfg.shift.is_finite() && cfg.shift > 0.0) {
            return Err(SchedulerError::Unsupported {
                class: CLASS,
                field: "shift",
                value: cfg.shift.to_string(),
                supported: "a positive number",
            });
        }
        // __init__: timesteps = np.linspace(1, T, T, dtype=float32)[::-1]; sigmas = t / T
        // (f32 tensor op), shifted in f32 unless shifting is dynamic.
        let t = cfg.num_train_timesteps;
        let t32 = t as f32;
        let shift = cfg.shift as f32;
        let shift_m1 = (cfg.shift - 1.0) as f32;
        let train_sigma = |ts: f64| {
            let s = ts as f32 / t32;
            if cfg.use_dynamic_shifting {
                s
            } else {
                shift * s / (1.0 + shift_m1 * s)
            }
        };
        let ends = np_linspace(1.0, t as f64, t);
        let sigma_max = train_sigma(ends[t - 1]) as f64;
        let sigma_min = train_sigma(ends[0]) as f64;
        Ok(FlowMatchEulerScheduler {
            cfg,
            sigma_max,
            sigma_min,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
        })
    }

    pub fn config(&self) -> &FlowMatchConfig {
        &self.cfg
    }

    /// The sigmas of the prepared schedule (`scheduler.sigmas`: one per step plus the final 0).
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    fn mu(&self, image_seq_len: usize) -> f64 {
        calculate_shift(
            image_seq_len,
            self.cfg.base_image_seq_len,
            self.cfg.max_image_seq_len,
            self.cfg.base_shift,
            self.cfg.max_shift,
        )
    }

    /// Stores float32 sigmas: timesteps `sigma * T` (f32 tensor op) and a final 0 sigma.
    fn finish(&mut self, sigmas: Vec<f32>) {
        let t = self.cfg.num_train_timesteps as f32;
        self.timesteps = sigmas.iter().map(|&s| s * t).collect();
        self.sigmas = sigmas;
        self.sigmas.push(0.0);
    }
}

impl Scheduler for FlowMatchEulerScheduler {
    fn name(&self) -> &'static str {
        CLASS
    }

    fn set_timesteps(
        &mut self,
        num_steps: usize,
        image_seq_len: usize,
    ) -> Result<(), SchedulerError> {
        if num_steps == 0 {
            return Err(SchedulerError::ZeroSteps);
        }
        let t = self.cfg.num_train_timesteps as f64;
        // All float64 (numpy) until the cast to float32.
        let ts = np_linspace(self.sigma_max * t, self.sigma_min * t, num_steps);
        let sigmas: Vec<f32> = if self.cfg.use_dynamic_shifting {
            let mu = self.mu(image_seq_len);
            let emu = mu.exp();
            ts.iter()
                .map(|&x| {
                    let s = x / t;
                    let r = 1.0 / s - 1.0;
                    (match self.cfg.time_shift_type {
                        TimeShiftType::Exponential => emu / (emu + r),
                        TimeShiftType::Linear => mu / (mu + r),
                    }) as f32
                })
                .collect()
        } else {
            let shift = self.cfg.shift;
            ts.iter()
                .map(|&x| {
                    let s = x / t;
                    (shift * s / (1.0 + (shift - 1.0) * s)) as f32
                })
                .collect()
        };
        self.finish(sigmas);
        Ok(())
    }

    fn set_timesteps_with_sigmas(
        &mut self,
        sigmas: &[f64],
        image_seq_len: usize,
    ) -> Result<(), SchedulerError> {
        if sigmas.is_empty() {
            return Err(SchedulerError::ZeroSteps);
        }
        if let Some(&bad) = sigmas
            .iter()
            .find(|s| !(s.is_finite() && **s > 0.0 && **s <= 1.0))
        {
            return Err(SchedulerError::InvalidSigma {
                class: CLASS,
                value: bad,
            });
        }
        // np.array(sigmas).astype(np.float32), then numpy float32 arithmetic: Python scalars
        // (exp(mu), mu, shift, shift - 1) are cast to float32 in mixed operations.
        let s32 = sigmas.iter().map(|&s| s as f32);
        let shifted: Vec<f32> = if self.cfg.use_dynamic_shifting {
            let mu = self.mu(image_seq_len);
            let num = match self.cfg.time_shift_type {
                TimeShiftType::Exponential => mu.exp() as f32,
                TimeShiftType::Linear => mu as f32,
            };
            s32.map(|s| num / (num + (1.0 / s - 1.0))).collect()
        } else {
            let shift = self.cfg.shift as f32;
            let shift_m1 = (self.cfg.shift - 1.0) as f32;
            s32.map(|s| shift * s / (1.0 + shift_m1 * s)).collect()
        };
        self.finish(shifted);
        Ok(())
    }

    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    fn step_slice(
        &mut self,
        model_output: &[f32],
        step_index: usize,
        sample: &mut [f32],
        offset: usize,
        full_len: usize,
    ) -> Result<(), SchedulerError> {
        let n = self.timesteps.len();
        check_step_args(CLASS, n, step_index, model_output, sample, offset, full_len)?;
        // dt = sigma_next - sigma (0-dim f32); prev = sample + dt * model_output (f32).
        let dt = self.sigmas[step_index + 1] - self.sigmas[step_index];
        for (x, &v) in sample.iter_mut().zip(model_output) {
            *x += dt * v;
        }
        Ok(())
    }
}
