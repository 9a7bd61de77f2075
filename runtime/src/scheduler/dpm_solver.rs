//! `DPMSolverMultistepScheduler` with `algorithm_type = "dpmsolver++"` (Lu et al.,
//! arXiv:2211.01095), solver order 1 or 2, as diffusers 0.42.
//!
//! Numerics: the training sigmas `((1 - ac) / ac) ** 0.5` are float32 torch ops on float32
//! `alphas_cumprod`; `np.interp` at the integer timesteps picks them exactly and they are
//! stored as float32. The step works on 0-dim float32 tensors for every coefficient
//! (`alpha_t = 1 / (sigma**2 + 1) ** 0.5`, `lambda = log(alpha) - log(sigma)`, `exp(-h)`) and
//! float32 elementwise tensor ops; the same operations in the same order are done here.
//! One known source of ulp-level differences: torch evaluates `log`/`exp` of those 0-dim
//! tensors with its vectorized math (SLEEF or MKL, within 1 ulp) while Rust's `f32::ln`/
//! `f32::exp` use the C library; `h` and `exp(-h)` may then differ by an ulp, which moves a
//! step's result by about 1e-7 relative.

use serde_json::{Map, Value};

use super::{
    alphas_cumprod, check_step_args, np_arange, np_linspace, np_round, BetaSchedule, ConfigReader,
    PredictionType, Scheduler, SchedulerError, TimestepSpacing,
};

const CLASS: &str = "DPMSolverMultistepScheduler";

/// Second-order update rule of DPM-Solver++(2M).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SolverType {
    Midpoint,
    Heun,
}

/// Final sigma of the schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinalSigmas {
    Zero,
    SigmaMin,
}

/// The supported fields of a `DPMSolverMultistepScheduler` config, with diffusers' defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct DpmSolverConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    /// 1 or 2.
    pub solver_order: usize,
    pub prediction_type: PredictionType,
    pub solver_type: SolverType,
    pub lower_order_final: bool,
    pub euler_at_final: bool,
    pub final_sigmas_type: FinalSigmas,
    pub lambda_min_clipped: f64,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: i64,
}

impl Default for DpmSolverConfig {
    fn default() -> Self {
        DpmSolverConfig {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            solver_order: 2,
            prediction_type: PredictionType::Epsilon,
            solver_type: SolverType::Midpoint,
            lower_order_final: true,
            euler_at_final: false,
            final_sigmas_type: FinalSigmas::Zero,
            lambda_min_clipped: f64::NEG_INFINITY,
            timestep_spacing: TimestepSpacing::Linspace,
            steps_offset: 0,
        }
    }
}

impl DpmSolverConfig {
    /// Reads the fields of a parsed `scheduler_config.json`; unknown fields are ignored.
    pub fn from_map(map: &Map<String, Value>) -> Result<Self, SchedulerError> {
        let r = ConfigReader::new(CLASS, map);
        let d = DpmSolverConfig::default();
        // diffusers maps "deis" to dpmsolver++ (configs shared with DEIS load that way).
        match r.str_or("algorithm_type", "dpmsolver++")? {
            "dpmsolver++" | "deis" => {}
            other => {
                return Err(r.unsupported(
                    "algorithm_type",
                    format!("{other:?}"),
                    "\"dpmsolver++\"",
                ))
            }
        }
        let solver_order = r.i64_or("solver_order", 2)?;
        if !(1..=2).contains(&solver_order) {
            return Err(r.unsupported("solver_order", solver_order, "1, 2"));
        }
        // diffusers maps the UniPC solver types to midpoint.
        let solver_type = match r.str_or("solver_type", "midpoint")? {
            "midpoint" | "logrho" | "bh1" | "bh2" => SolverType::Midpoint,
            "heun" => SolverType::Heun,
            other => {
                return Err(r.unsupported(
                    "solver_type",
                    format!("{other:?}"),
                    "\"midpoint\", \"heun\"",
                ))
            }
        };
        let final_sigmas_type = match r.str_or("final_sigmas_type", "zero")? {
            "zero" => FinalSigmas::Zero,
            "sigma_min" => FinalSigmas::SigmaMin,
            other => {
                return Err(r.unsupported(
                    "final_sigmas_type",
                    format!("{other:?}"),
                    "\"zero\", \"sigma_min\"",
                ))
            }
        };
        // A learned variance would be sliced off with a hard-coded `[:, :3]` by diffusers;
        // pipelines here pass only the epsilon channels, so the config must not ask for it.
        if let Some(v) = r.opt_str("variance_type")? {
            return Err(r.unsupported(
                "variance_type",
                format!("{v:?}"),
                "null (pass only the epsilon channels)",
            ));
        }
        for field in [
            "thresholding",
            "use_karras_sigmas",
            "use_exponential_sigmas",
            "use_beta_sigmas",
            "use_lu_lambdas",
            "use_flow_sigmas",
            "use_dynamic_shifting",
            "rescale_betas_zero_snr",
        ] {
            r.require_false(field)?;
        }
        Ok(DpmSolverConfig {
            num_train_timesteps: r.count_or("num_train_timesteps", d.num_train_timesteps)?,
            beta_start: r.f64_or("beta_start", d.beta_start)?,
            beta_end: r.f64_or("beta_end", d.beta_end)?,
            beta_schedule: BetaSchedule::read(&r)?,
            solver_order: solver_order as usize,
            prediction_type: PredictionType::read(&r)?,
            solver_type,
            lower_order_final: r.bool_or("lower_order_final", d.lower_order_final)?,
            euler_at_final: r.bool_or("euler_at_final", d.euler_at_final)?,
            final_sigmas_type,
            lambda_min_clipped: r.f64_or("lambda_min_clipped", d.lambda_min_clipped)?,
            timestep_spacing: TimestepSpacing::read(&r, "linspace")?,
            steps_offset: r.i64_or("steps_offset", d.steps_offset)?,
        })
    }
}

/// diffusers' `_sigma_to_alpha_sigma_t` on a 0-dim f32 tensor.
fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// `torch.log(alpha_t) - torch.log(sigma_t)` (infinite when sigma is 0, as in torch).
fn lambda(alpha: f32, sigma: f32) -> f32 {
    alpha.ln() - sigma.ln()
}

/// diffusers' `DPMSolverMultistepScheduler` restricted to DPM-Solver++ of order 1 or 2.
#[derive(Debug, Clone)]
pub struct DpmSolverMultistepScheduler {
    cfg: DpmSolverConfig,
    alphas_cumprod: Vec<f32>,
    /// `((1 - ac) / ac) ** 0.5` per training timestep (f32).
    train_sigmas: Vec<f32>,
    timesteps_int: Vec<i64>,
    timesteps: Vec<f32>,
    /// One sigma per step plus the final one.
    sigmas: Vec<f32>,
    /// Data predictions (x0) of the last two steps, full latent size, double-buffered by step
    /// parity so patch-wise stepping can read step i-1 while writing step i.
    x0_history: [Vec<f32>; 2],
    /// Which step each history buffer holds.
    history_step: [Option<usize>; 2],
}

impl DpmSolverMultistepScheduler {
    pub fn new(cfg: DpmSolverConfig) -> Result<Self, SchedulerError> {
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
        if cfg.solver_order == 0 || cfg.solver_order > 2 {
            return Err(SchedulerError::Unsupported {
                class: CLASS,
                field: "solver_order",
                value: cfg.solver_order.to_string(),
                supported: "1, 2",
            });
        }
        let alphas_cumprod = alphas_cumprod(
            &cfg.beta_schedule,
            cfg.beta_start,
            cfg.beta_end,
            cfg.num_train_timesteps,
        );
        let train_sigmas = alphas_cumprod
            .iter()
            .map(|&ac| ((1.0 - ac) / ac).sqrt())
            .collect();
        Ok(DpmSolverMultistepScheduler {
            cfg,
            alphas_cumprod,
            train_sigmas,
            timesteps_int: Vec::new(),
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            x0_history: [Vec::new(), Vec::new()],
            history_step: [None, None],
        })
    }

    pub fn config(&self) -> &DpmSolverConfig {
        &self.cfg
    }

    /// The sigmas of the prepared schedule (`scheduler.sigmas`: one per step plus the final).
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// `alphas_cumprod` (float32, per training timestep).
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    /// The last timestep before lambda drops below `lambda_min_clipped`:
    /// `T - searchsorted(flip(lambda_t), lambda_min_clipped)`.
    fn last_timestep(&self) -> usize {
        let min = self.cfg.lambda_min_clipped;
        let train = self.cfg.num_train_timesteps;
        if min == f64::NEG_INFINITY {
            return train;
        }
        // lambda_t = log(sqrt(ac)) - log(sqrt(1 - ac)), f32 torch ops; decreasing in t, so the
        // left insertion point in the flipped (increasing) array counts values below `min`.
        let clipped = self
            .alphas_cumprod
            .iter()
            .filter(|&&ac| {
                let l = ac.sqrt().ln() - (1.0 - ac).sqrt().ln();
                (l as f64) < min
            })
            .count();
        train - clipped
    }
}

impl Scheduler for DpmSolverMultistepScheduler {
    fn name(&self) -> &'static str {
        CLASS
    }

    fn set_timesteps(
        &mut self,
        num_steps: usize,
        _image_seq_len: usize,
    ) -> Result<(), SchedulerError> {
        if num_steps == 0 {
            return Err(SchedulerError::ZeroSteps);
        }
        let last = self.last_timestep();
        let ts: Vec<i64> = match self.cfg.timestep_spacing {
            // np.linspace(0, last - 1, n + 1).round()[::-1][:-1]
            TimestepSpacing::Linspace => np_linspace(0.0, last as f64 - 1.0, num_steps + 1)
                .into_iter()
                .rev()
                .take(num_steps)
                .map(|t| np_round(t) as i64)
                .collect(),
            // (np.arange(0, n + 1) * (last // (n + 1))).round()[::-1][:-1] + steps_offset
            TimestepSpacing::Leading => {
                let ratio = (last / (num_steps + 1)) as i64;
                (1..=num_steps as i64)
                    .rev()
                    .map(|i| i * ratio + self.cfg.steps_offset)
                    .collect()
            }
            // np.arange(last, 0, -T / n).round() - 1
            TimestepSpacing::Trailing => {
                let ratio = self.cfg.num_train_timesteps as f64 / num_steps as f64;
                np_arange(last as f64, 0.0, -ratio)
                    .into_iter()
                    .map(|t| np_round(t) as i64 - 1)
                    .collect()
            }
        };
        // np.interp(timesteps, arange(T), sigmas): exact at integer points, clamped outside.
        let top = self.train_sigmas.len() - 1;
        let mut sigmas: Vec<f32> = ts
            .iter()
            .map(|&t| self.train_sigmas[t.clamp(0, top as i64) as usize])
            .collect();
        sigmas.push(match self.cfg.final_sigmas_type {
            FinalSigmas::Zero => 0.0,
            FinalSigmas::SigmaMin => self.train_sigmas[0],
        });
        self.timesteps = ts.iter().map(|&t| t as f32).collect();
        self.timesteps_int = ts;
        self.sigmas = sigmas;
        self.history_step = [None, None];
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
        let i = step_index;
        let cfg = &self.cfg;

        // "Improve numerical stability for small number of steps": first order at the end.
        let lower_order_final = i == n - 1
            && (cfg.euler_at_final
                || (cfg.lower_order_final && n < 15)
                || cfg.final_sigmas_type == FinalSigmas::Zero);
        // diffusers' `lower_order_nums` counts steps taken since set_timesteps: the first step
        // is always first order.
        let second_order = cfg.solver_order == 2 && i >= 1 && !lower_order_final;
        if second_order && self.history_step[(i - 1) % 2] != Some(i - 1) {
            return Err(SchedulerError::OutOfOrder {
                class: CLASS,
                index: i,
                prev: i - 1,
            });
        }

        // alpha/sigma of the VP process at the current (s0) and next (t) noise levels.
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[i]);
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let h = lambda_t - lambda_s0;
        let sigma_ratio = sigma_t / sigma_s0;
        let phi = alpha_t * ((-h).exp() - 1.0);

        let range = offset..offset + sample.len();
        let cur = i % 2;
        if self.x0_history[cur].len() != full_len {
            self.x0_history[cur] = vec![0.0; full_len];
        }
        // convert_model_output: the data prediction x0 at s0.
        let pred = cfg.prediction_type;
        let x0_of = |s: f32, m: f32| -> f32 {
            match pred {
                PredictionType::Epsilon => (s - sigma_s0 * m) / alpha_s0,
                PredictionType::Sample => m,
                PredictionType::VPrediction => alpha_s0 * s - sigma_s0 * m,
            }
        };

        if !second_order {
            // dpm_solver_first_order_update (dpmsolver++):
            // x_t = (sigma_t / sigma_s) * x - (alpha_t * (exp(-h) - 1)) * x0
            let hist = &mut self.x0_history[cur][range];
            for ((x, &m), hx) in sample.iter_mut().zip(model_output).zip(hist.iter_mut()) {
                let x0 = x0_of(*x, m);
                *hx = x0;
                *x = sigma_ratio * *x - phi * x0;
            }
        } else {
            // multistep_dpm_solver_second_order_update (dpmsolver++).
            let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[i - 1]);
            let lambda_s1 = lambda(alpha_s1, sigma_s1);
            let h_0 = lambda_s0 - lambda_s1;
            let r0 = h_0 / h;
            // `1.0 / r0` on a tensor is `reciprocal(r0) * 1.0`.
            let inv_r0 = 1.0 / r0;
            let half_phi = 0.5 * phi;
            let heun_coeff = alpha_t * (((-h).exp() - 1.0) / h + 1.0);
            let solver = cfg.solver_type;
            let [h0, h1] = &mut self.x0_history;
            let (cur_hist, prev_hist) = if cur == 0 { (h0, &*h1) } else { (h1, &*h0) };
            if prev_hist.len() != full_len {
                return Err(SchedulerError::LengthMismatch {
                    class: CLASS,
                    model_output: model_output.len(),
                    sample: sample.len(),
                    offset,
                    full_len,
                });
            }
            let cur_hist = &mut cur_hist[range.clone()];
            let prev_hist = &prev_hist[range];
            for (((x, &m), hx), &m1) in sample
                .iter_mut()
                .zip(model_output)
                .zip(cur_hist.iter_mut())
                .zip(prev_hist)
            {
                let m0 = x0_of(*x, m);
                *hx = m0;
                let d1 = inv_r0 * (m0 - m1);
                let base = sigma_ratio * *x - phi * m0;
                *x = match solver {
                    // x_t = (sigma_t/sigma_s0) x - phi D0 - 0.5 phi D1
                    SolverType::Midpoint => base - half_phi * d1,
                    // x_t = (sigma_t/sigma_s0) x - phi D0 + alpha_t ((exp(-h)-1)/h + 1) D1
                    SolverType::Heun => base + heun_coeff * d1,
                };
            }
        }
        self.history_step[cur] = Some(i);
        Ok(())
    }
}
