//! `DDIMScheduler` (Song et al., arXiv:2010.02502) with `eta = 0`, as diffusers 0.42.
//!
//! Numerics: `alphas_cumprod` is float32 (see [`super::alphas_cumprod`]); the inference
//! timesteps are integers from numpy; the step uses 0-dim float32 tensors for the
//! coefficients (`alpha_prod_t ** 0.5` is a correctly rounded f32 sqrt in torch) and
//! elementwise float32 tensor ops, reproduced here operation by operation without fusing.

use serde_json::{Map, Value};

use super::{
    alphas_cumprod, check_step_args, np_arange, np_linspace, np_round, BetaSchedule, ConfigReader,
    PredictionType, Scheduler, SchedulerError, TimestepSpacing,
};

const CLASS: &str = "DDIMScheduler";

/// The supported fields of a `DDIMScheduler` config, with diffusers' defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct DdimConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub clip_sample: bool,
    pub clip_sample_range: f64,
    pub set_alpha_to_one: bool,
    pub steps_offset: i64,
    pub prediction_type: PredictionType,
    pub timestep_spacing: TimestepSpacing,
}

impl Default for DdimConfig {
    fn default() -> Self {
        DdimConfig {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            clip_sample: true,
            clip_sample_range: 1.0,
            set_alpha_to_one: true,
            steps_offset: 0,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: TimestepSpacing::Leading,
        }
    }
}

impl DdimConfig {
    /// Reads the fields of a parsed `scheduler_config.json`; unknown fields are ignored.
    pub fn from_map(map: &Map<String, Value>) -> Result<Self, SchedulerError> {
        let r = ConfigReader::new(CLASS, map);
        let d = DdimConfig::default();
        // Dynamic thresholding (a per-sample quantile clamp for pixel-space models) is not
        // implemented; rescaled zero-terminal-SNR betas neither.
        r.require_false("thresholding")?;
        r.require_false("rescale_betas_zero_snr")?;
        Ok(DdimConfig {
            num_train_timesteps: r.count_or("num_train_timesteps", d.num_train_timesteps)?,
            beta_start: r.f64_or("beta_start", d.beta_start)?,
            beta_end: r.f64_or("beta_end", d.beta_end)?,
            beta_schedule: BetaSchedule::read(&r)?,
            clip_sample: r.bool_or("clip_sample", d.clip_sample)?,
            clip_sample_range: r.f64_or("clip_sample_range", d.clip_sample_range)?,
            set_alpha_to_one: r.bool_or("set_alpha_to_one", d.set_alpha_to_one)?,
            steps_offset: r.i64_or("steps_offset", d.steps_offset)?,
            prediction_type: PredictionType::read(&r)?,
            timestep_spacing: TimestepSpacing::read(&r, "leading")?,
        })
    }
}

/// diffusers' `DDIMScheduler`, deterministic (`eta = 0`, no noise).
#[derive(Debug, Clone)]
pub struct DdimScheduler {
    cfg: DdimConfig,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    /// Integer timesteps (diffusers keeps them as int64).
    timesteps_int: Vec<i64>,
    timesteps: Vec<f32>,
}

impl DdimScheduler {
    pub fn new(cfg: DdimConfig) -> Result<Self, SchedulerError> {
        if let BetaSchedule::Trained(b) = &cfg.beta_schedule {
            if b.len() != cfg.num_train_timesteps {
                return Err(SchedulerError::Invalid {
                    class: CLASS,
                    what: format!(
                        "`trained_betas` has {} entries but num_train_timesteps is {}",
                        b.len(),
                        cfg.num_train_timesteps
                    ),
                });
            }
        }
        let alphas_cumprod = alphas_cumprod(
            &cfg.beta_schedule,
            cfg.beta_start,
            cfg.beta_end,
            cfg.num_train_timesteps,
        );
        let final_alpha_cumprod = if cfg.set_alpha_to_one {
            1.0
        } else {
            alphas_cumprod[0]
        };
        Ok(DdimScheduler {
            cfg,
            alphas_cumprod,
            final_alpha_cumprod,
            timesteps_int: Vec::new(),
            timesteps: Vec::new(),
        })
    }

    pub fn config(&self) -> &DdimConfig {
        &self.cfg
    }

    /// `alphas_cumprod` (float32, per training timestep).
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    fn alpha_at(&self, t: i64) -> Result<f32, SchedulerError> {
        usize::try_from(t)
            .ok()
            .and_then(|t| self.alphas_cumprod.get(t).copied())
            .ok_or_else(|| SchedulerError::Invalid {
                class: CLASS,
                what: format!(
                    "timestep {t} is outside 0..{} (check steps_offset)",
                    self.cfg.num_train_timesteps
                ),
            })
    }
}

impl Scheduler for DdimScheduler {
    fn name(&self) -> &'static str {
        CLASS
    }

    fn set_timesteps(
        &mut self,
        num_steps: usize,
        _image_seq_len: usize,
    ) -> Result<(), SchedulerError> {
        let train = self.cfg.num_train_timesteps;
        if num_steps == 0 {
            return Err(SchedulerError::ZeroSteps);
        }
        if num_steps > train {
            return Err(SchedulerError::TooManySteps {
                class: CLASS,
                steps: num_steps,
                train,
            });
        }
        let ts: Vec<i64> = match self.cfg.timestep_spacing {
            // np.linspace(0, T - 1, n).round()[::-1]
            TimestepSpacing::Linspace => np_linspace(0.0, (train - 1) as f64, num_steps)
                .into_iter()
                .rev()
                .map(|t| np_round(t) as i64)
                .collect(),
            // (np.arange(0, n) * (T // n)).round()[::-1] + steps_offset
            TimestepSpacing::Leading => {
                let ratio = (train / num_steps) as i64;
                (0..num_steps as i64)
                    .rev()
                    .map(|i| i * ratio + self.cfg.steps_offset)
                    .collect()
            }
            // np.round(np.arange(T, 0, -T / n)) - 1
            TimestepSpacing::Trailing => {
                let ratio = train as f64 / num_steps as f64;
                np_arange(train as f64, 0.0, -ratio)
                    .into_iter()
                    .map(|t| np_round(t) as i64 - 1)
                    .collect()
            }
        };
        for &t in &ts {
            self.alpha_at(t)?;
        }
        self.timesteps = ts.iter().map(|&t| t as f32).collect();
        self.timesteps_int = ts;
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
        let n = self.timesteps_int.len();
        check_step_args(CLASS, n, step_index, model_output, sample, offset, full_len)?;
        let t = self.timesteps_int[step_index];
        // diffusers steps back by T // n whatever the spacing (so for "linspace"/"trailing"
        // the previous alpha is not that of the next timestep); reproduced as is.
        let prev_t = t - (self.cfg.num_train_timesteps / n) as i64;
        let alpha_prod_t = self.alpha_at(t)?;
        let alpha_prod_t_prev = if prev_t >= 0 {
            self.alpha_at(prev_t)?
        } else {
            self.final_alpha_cumprod
        };
        let beta_prod_t = 1.0 - alpha_prod_t;
        let sqrt_alpha_t = alpha_prod_t.sqrt();
        let sqrt_beta_t = beta_prod_t.sqrt();
        let sqrt_alpha_prev = alpha_prod_t_prev.sqrt();
        // (1 - alpha_prod_t_prev - std_dev_t**2) ** 0.5 with std_dev_t = eta * ... = 0.
        let dir_coeff = (1.0 - alpha_prod_t_prev - 0.0f32).sqrt();
        let clip = self
            .cfg
            .clip_sample
            .then_some(self.cfg.clip_sample_range as f32);
        let pred = self.cfg.prediction_type;
        for (x, &m) in sample.iter_mut().zip(model_output) {
            let s = *x;
            let (mut x0, eps) = match pred {
                PredictionType::Epsilon => ((s - sqrt_beta_t * m) / sqrt_alpha_t, m),
                PredictionType::Sample => (m, (s - sqrt_alpha_t * m) / sqrt_beta_t),
                PredictionType::VPrediction => (
                    sqrt_alpha_t * s - sqrt_beta_t * m,
                    sqrt_alpha_t * m + sqrt_beta_t * s,
                ),
            };
            if let Some(r) = clip {
                // torch.clamp(min=-r, max=r); NaN stays NaN like torch.
                if x0 < -r {
                    x0 = -r;
                } else if x0 > r {
                    x0 = r;
                }
            }
            *x = sqrt_alpha_prev * x0 + dir_coeff * eps;
        }
        Ok(())
    }
}
