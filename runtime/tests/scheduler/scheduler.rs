//! Scheduler tests: timesteps against the diffusers 0.42.1 fixtures (`loop.json`, the shapes-dit
//! reference), step results against independent float64 transcriptions of the published
//! formulas (and one DPM-Solver++(2M) step worked out by hand), config errors.

use ditto_runtime::scheduler::{
    calculate_shift, flux_pipeline_sigmas, from_config_json, DpmSolverConfig,
    DpmSolverMultistepScheduler, Scheduler, SchedulerError,
};

const DIT: &str = include_str!("../data/scheduler/dit-pipeline.json");
const SHAPES_DIT: &str = include_str!("../data/scheduler/shapes-dit.json");
const PIXART: &str = include_str!("../data/scheduler/pixart-pipeline.json");
const SD3: &str = include_str!("../data/scheduler/sd3-pipeline.json");
const FLUX: &str = include_str!("../data/scheduler/flux-pipeline.json");

fn build(json: &str, steps: usize) -> Box<dyn Scheduler> {
    let mut s = from_config_json(json).unwrap();
    s.set_timesteps(steps, 64).unwrap();
    s
}

fn assert_close(got: &[f32], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g as f64 - w).abs() <= tol,
            "{what}[{i}]: got {g}, want {w} (tol {tol})\n got: {got:?}\nwant: {want:?}"
        );
    }
}

/// Replaces `"key": <value>` in a flat config text (test helper for config variants).
fn with_field(json: &str, key: &str, value: &str) -> String {
    // Python's bare -Infinity is not JSON; the scheduler also reads it as the string.
    let mut v: serde_json::Value =
        serde_json::from_str(&json.replace("-Infinity", "\"-Infinity\"")).unwrap();
    v[key] = serde_json::from_str(value).unwrap();
    v.to_string()
}

/// Deterministic pseudo-random values in [-1.5, 1.5).
fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f64 / (1u64 << 24) as f64 * 3.0 - 1.5) as f32
        })
        .collect()
}

/// alphas_cumprod in float64 from the linear beta schedule (reference for the step checks).
fn alphas_cumprod_f64(beta_start: f64, beta_end: f64, t: usize) -> Vec<f64> {
    let mut acc = 1.0;
    (0..t)
        .map(|i| {
            let beta = beta_start + (beta_end - beta_start) * i as f64 / (t - 1) as f64;
            acc *= 1.0 - beta;
            acc
        })
        .collect()
}

// ----------------------------------------------------------------------------- timesteps

#[test]
fn dit_fixture_timesteps() {
    let s = build(DIT, 6);
    assert_eq!(s.name(), "DDIMScheduler");
    assert_close(
        s.timesteps(),
        &[830., 664., 498., 332., 166., 0.],
        1e-4,
        "dit",
    );
    assert_eq!(s.init_noise_sigma(), 1.0);
}

#[test]
fn shapes_dit_reference_timesteps() {
    let s = build(SHAPES_DIT, 20);
    let want: Vec<f64> = (0..20).rev().map(|i| i as f64 * 50.0).collect();
    assert_close(s.timesteps(), &want, 1e-4, "shapes-dit");
}

#[test]
fn pixart_fixture_timesteps() {
    // The config holds `"lambda_min_clipped": -Infinity` (Python's JSON), which must parse.
    let s = build(PIXART, 6);
    assert_eq!(s.name(), "DPMSolverMultistepScheduler");
    assert_close(
        s.timesteps(),
        &[999., 832., 666., 500., 333., 166.],
        1e-4,
        "pixart",
    );
}

#[test]
fn sd3_fixture_timesteps() {
    let s = build(SD3, 6);
    assert_eq!(s.name(), "FlowMatchEulerDiscreteScheduler");
    let want = [
        1000.0,
        923.342529296875,
        818.92333984375,
        668.32666015625,
        432.2250671386719,
        8.928571701049805,
    ];
    // Bit-exact: the float32/float64 path of diffusers is reproduced.
    assert_close(s.timesteps(), &want, 0.0, "sd3");
}

#[test]
fn flux_fixture_timesteps() {
    // The fixture's loop set 4 steps without custom sigmas.
    let s = build(FLUX, 4);
    assert_close(s.timesteps(), &[1000., 667., 334., 1.], 0.0, "flux");
}

#[test]
fn flux_pipeline_sigmas_timesteps() {
    // FluxPipeline passes sigmas = np.linspace(1, 1/n, n); shift 1, no dynamic shifting.
    let mut s = from_config_json(FLUX).unwrap();
    let sig = flux_pipeline_sigmas(4);
    assert_eq!(sig, vec![1.0, 0.75, 0.5, 0.25]);
    s.set_timesteps_with_sigmas(&sig, 64).unwrap();
    assert_close(
        s.timesteps(),
        &[1000., 750., 500., 250.],
        1e-4,
        "flux pipeline",
    );
}

#[test]
fn flux_dynamic_shift_timesteps() {
    // A Flux-dev style config: dynamic shifting, mu from the image token count.
    let cfg = with_field(FLUX, "use_dynamic_shifting", "true");
    let mut s = from_config_json(&cfg).unwrap();
    let n = 8;
    let seq = 1024;
    let mu = calculate_shift(seq, 256, 4096, 0.5, 1.15);
    assert!((mu - (0.5 + 0.65 * 768.0 / 3840.0)).abs() < 1e-12);
    let sig = flux_pipeline_sigmas(n);
    s.set_timesteps_with_sigmas(&sig, seq).unwrap();
    let want: Vec<f64> = sig
        .iter()
        .map(|&x| 1000.0 * mu.exp() / (mu.exp() + 1.0 / x - 1.0))
        .collect();
    assert_close(s.timesteps(), &want, 1e-3, "flux dynamic (pipeline sigmas)");

    // Without custom sigmas: linspace over the unshifted training range [1, 1/1000].
    s.set_timesteps(n, seq).unwrap();
    let want: Vec<f64> = (0..n)
        .map(|i| {
            let x = (1000.0 + (1.0 - 1000.0) * i as f64 / (n - 1) as f64) / 1000.0;
            1000.0 * mu.exp() / (mu.exp() + 1.0 / x - 1.0)
        })
        .collect();
    assert_close(s.timesteps(), &want, 1e-3, "flux dynamic (default)");

    // Linear time shift.
    let cfg = with_field(&cfg, "time_shift_type", "\"linear\"");
    let mut s = from_config_json(&cfg).unwrap();
    s.set_timesteps_with_sigmas(&sig, seq).unwrap();
    let want: Vec<f64> = sig
        .iter()
        .map(|&x| 1000.0 * mu / (mu + 1.0 / x - 1.0))
        .collect();
    assert_close(s.timesteps(), &want, 1e-3, "flux linear shift");
}

#[test]
fn ddim_spacings() {
    let lin = with_field(DIT, "timestep_spacing", "\"linspace\"");
    assert_close(
        build(&lin, 6).timesteps(),
        &[999., 799., 599., 400., 200., 0.],
        0.0,
        "linspace",
    );
    let trail = with_field(DIT, "timestep_spacing", "\"trailing\"");
    assert_close(
        build(&trail, 6).timesteps(),
        &[999., 832., 666., 499., 332., 166.],
        0.0,
        "trailing",
    );
    // Stable Diffusion style: leading with steps_offset 1 -> 981, 961, ..., 1 for 50 steps.
    let sd = with_field(DIT, "steps_offset", "1");
    let s = build(&sd, 50);
    assert_eq!(s.timesteps()[0], 981.0);
    assert_eq!(s.timesteps()[49], 1.0);
}

#[test]
fn dpm_spacings() {
    let lead = with_field(PIXART, "timestep_spacing", "\"leading\"");
    assert_close(
        build(&lead, 6).timesteps(),
        &[852., 710., 568., 426., 284., 142.],
        0.0,
        "leading",
    );
    let trail = with_field(PIXART, "timestep_spacing", "\"trailing\"");
    assert_close(
        build(&trail, 6).timesteps(),
        &[999., 832., 666., 499., 332., 166.],
        0.0,
        "trailing",
    );
}

// ----------------------------------------------------------------------------- steps

/// DDIM eta=0 step (Song et al. eq. 12), float64.
fn ddim_ref(x: f64, m: f64, a_t: f64, a_prev: f64, pred: &str) -> f64 {
    let (x0, eps) = match pred {
        "epsilon" => ((x - (1.0 - a_t).sqrt() * m) / a_t.sqrt(), m),
        "v_prediction" => (
            a_t.sqrt() * x - (1.0 - a_t).sqrt() * m,
            a_t.sqrt() * m + (1.0 - a_t).sqrt() * x,
        ),
        _ => (m, (x - a_t.sqrt() * m) / (1.0 - a_t).sqrt()),
    };
    a_prev.sqrt() * x0 + (1.0 - a_prev).sqrt() * eps
}

fn check_ddim_loop(json: &str, steps: usize, pred: &str) {
    let mut s = build(json, steps);
    let ac = alphas_cumprod_f64(1e-4, 0.02, 1000);
    let n = 97;
    let mut x = noise(n, 1);
    for i in 0..steps {
        let m = noise(n, 100 + i as u64);
        let t = s.timesteps()[i] as i64;
        let prev = t - (1000 / steps) as i64;
        let a_prev = if prev >= 0 { ac[prev as usize] } else { 1.0 };
        let want: Vec<f64> = x
            .iter()
            .zip(&m)
            .map(|(&x, &m)| ddim_ref(x as f64, m as f64, ac[t as usize], a_prev, pred))
            .collect();
        s.step(&m, i, &mut x).unwrap();
        let scale = want.iter().fold(1.0f64, |a, w| a.max(w.abs()));
        assert_close(&x, &want, 2e-5 * scale, &format!("ddim {pred} step {i}"));
    }
}

#[test]
fn ddim_steps_match_closed_form() {
    check_ddim_loop(SHAPES_DIT, 20, "epsilon");
    check_ddim_loop(DIT, 6, "epsilon");
    let v = with_field(DIT, "prediction_type", "\"v_prediction\"");
    check_ddim_loop(&v, 6, "v_prediction");
    let smp = with_field(DIT, "prediction_type", "\"sample\"");
    check_ddim_loop(&smp, 6, "sample");
}

#[test]
fn ddim_clip_sample_clamps_x0() {
    let cfg = with_field(DIT, "clip_sample", "true");
    let mut s = build(&cfg, 6);
    let ac = alphas_cumprod_f64(1e-4, 0.02, 1000);
    // At t = 830 a large sample gives |x0| > 1, clamped to 1 before the update.
    let mut x = vec![5.0f32, -5.0];
    let m = vec![0.1f32, -0.1];
    s.step(&m, 0, &mut x).unwrap();
    let a_prev = ac[664];
    let want = [
        a_prev.sqrt() + (1.0 - a_prev).sqrt() * 0.1,
        -a_prev.sqrt() - (1.0 - a_prev).sqrt() * 0.1,
    ];
    assert_close(&x, &want, 1e-5, "clip");
}

/// DPM-Solver++(2M) in the form of the paper (arXiv:2211.01095, Algorithm 2), float64, with
/// alpha = sqrt(ac), sigma = sqrt(1 - ac), lambda = log(alpha / sigma).
struct DpmRef {
    alpha: Vec<f64>,
    sigma: Vec<f64>,
    prev_x0: Option<Vec<f64>>,
}

impl DpmRef {
    fn lambda(&self, k: usize) -> f64 {
        (self.alpha[k] / self.sigma[k]).ln()
    }
    /// Step k: from level k to k + 1, `x0` the data prediction at level k.
    fn step(&mut self, x: &[f64], x0: Vec<f64>, k: usize, first_order: bool) -> Vec<f64> {
        let h = self.lambda(k + 1) - self.lambda(k);
        let ratio = self.sigma[k + 1] / self.sigma[k];
        let coeff = self.alpha[k + 1] * ((-h).exp() - 1.0);
        let d: Vec<f64> = match (&self.prev_x0, first_order) {
            (Some(prev), false) => {
                let r = (self.lambda(k) - self.lambda(k - 1)) / h;
                x0.iter()
                    .zip(prev)
                    .map(|(a, b)| (1.0 + 0.5 / r) * a - 0.5 / r * b)
                    .collect()
            }
            _ => x0.clone(),
        };
        self.prev_x0 = Some(x0);
        x.iter()
            .zip(&d)
            .map(|(x, d)| ratio * x - coeff * d)
            .collect()
    }
}

#[test]
fn dpm_steps_match_paper_form() {
    for pred in ["epsilon", "v_prediction"] {
        let cfg = with_field(PIXART, "prediction_type", &format!("\"{pred}\""));
        let steps = 6;
        let mut s = build(&cfg, steps);
        let ac = alphas_cumprod_f64(1e-4, 0.02, 1000);
        let levels: Vec<usize> = s.timesteps().iter().map(|&t| t as usize).collect();
        let mut alpha: Vec<f64> = levels.iter().map(|&t| ac[t].sqrt()).collect();
        let mut sigma: Vec<f64> = levels.iter().map(|&t| (1.0 - ac[t]).sqrt()).collect();
        // final_sigmas_type "zero": alpha 1, sigma 0.
        alpha.push(1.0);
        sigma.push(0.0);
        let mut r = DpmRef {
            alpha,
            sigma,
            prev_x0: None,
        };
        let n = 101;
        let mut x = noise(n, 7);
        for k in 0..steps {
            let m = noise(n, 200 + k as u64);
            let (a, sg) = (r.alpha[k], r.sigma[k]);
            let x0: Vec<f64> = x
                .iter()
                .zip(&m)
                .map(|(&x, &m)| match pred {
                    "epsilon" => (x as f64 - sg * m as f64) / a,
                    _ => a * x as f64 - sg * m as f64,
                })
                .collect();
            let xf: Vec<f64> = x.iter().map(|&v| v as f64).collect();
            // First step and (lower_order_final, < 15 steps) last step are first order.
            let want = r.step(&xf, x0, k, k == 0 || k == steps - 1);
            s.step(&m, k, &mut x).unwrap();
            let scale = want.iter().fold(1.0f64, |a, w| a.max(w.abs()));
            assert_close(&x, &want, 2e-5 * scale, &format!("dpm++ {pred} step {k}"));
        }
    }
}

/// A 4-timestep schedule built from `trained_betas` so that diffusers' sigmas
/// (sqrt((1 - ac) / ac)) are 0.5, 1, 2, 4 at t = 0..3: ac = 1 / (1 + sigma^2).
fn toy_dpm(pred: &str, solver_type: &str) -> Box<dyn Scheduler> {
    let ac = [0.8f64, 0.5, 0.2, 1.0 / 17.0];
    let mut betas = vec![1.0 - ac[0]];
    betas.extend((1..4).map(|i| 1.0 - ac[i] / ac[i - 1]));
    let cfg = serde_json::json!({
        "_class_name": "DPMSolverMultistepScheduler",
        "num_train_timesteps": 4,
        "trained_betas": betas,
        "prediction_type": pred,
        "solver_type": solver_type,
    });
    let mut s = from_config_json(&cfg.to_string()).unwrap();
    // linspace(0, 3, 4).round()[::-1][:-1] = [3, 2, 1] -> sigmas 4, 2, 1, then 0.
    s.set_timesteps(3, 0).unwrap();
    assert_eq!(s.timesteps(), &[3.0, 2.0, 1.0]);
    s
}

#[test]
fn dpm_second_order_step_by_hand() {
    // sigma 4 -> 2 -> 1 -> 0, so every h = log 2 (exp(-h) = 1/2) and r0 = 1. With
    // prediction_type "sample" the model outputs are the x0 predictions: 0.5, 0.8, 0.9.
    // alpha_t = 1/sqrt(1 + sigma^2), sigma_t = sigma * alpha_t.
    let (s17, s5, s2) = (17f64.sqrt(), 5f64.sqrt(), 2f64.sqrt());
    // Step 0 (first order): x1 = (sigma_t/sigma_s) x - alpha_t (1/2 - 1) x0
    //   = (2/sqrt5)/(4/sqrt17) * 1 + 0.5 * 0.5 / sqrt5.
    let x1 = (s17 / 2.0 + 0.25) / s5;
    // Step 1 (2M midpoint): D0 = 0.8, D1 = (0.8 - 0.5) / r0 = 0.3,
    //   x2 = (1/sqrt2)/(2/sqrt5) x1 + 0.5 D0 / sqrt2 + 0.5 * 0.5 D1 / sqrt2.
    let x2 = s5 / (2.0 * s2) * x1 + 0.4 / s2 + 0.075 / s2;
    // Step 1 with heun: + alpha_t ((exp(-h) - 1)/h + 1) D1 = (1 - 0.5 / ln 2) 0.3 / sqrt2.
    let x2_heun = s5 / (2.0 * s2) * x1 + 0.4 / s2 + (1.0 - 0.5 / 2f64.ln()) * 0.3 / s2;
    // Step 2 (final, first order to sigma 0): x3 = x0 = 0.9.
    assert!((x1 - 1.033_757_844_604_278).abs() < 1e-12);
    assert!((x2 - 1.153_133_055_567_591).abs() < 1e-12);
    for (solver, x2) in [("midpoint", x2), ("heun", x2_heun)] {
        let mut s = toy_dpm("sample", solver);
        let mut x = vec![1.0f32];
        s.step(&[0.5], 0, &mut x).unwrap();
        assert_close(&x, &[x1], 2e-6, "toy step 0");
        s.step(&[0.8], 1, &mut x).unwrap();
        assert_close(&x, &[x2], 2e-6, &format!("toy step 1 {solver}"));
        s.step(&[0.9], 2, &mut x).unwrap();
        assert_close(&x, &[0.9], 1e-7, "toy step 2");
    }
}

#[test]
fn dpm_first_order_equals_ddim_update() {
    // DPM-Solver++(1) is DDIM: x_t = alpha_t x0 + sigma_t eps_hat, eps_hat = (x - alpha_s x0)/sigma_s.
    let cfg = with_field(PIXART, "solver_order", "1");
    let mut s = build(&cfg, 6);
    let ac = alphas_cumprod_f64(1e-4, 0.02, 1000);
    let ts: Vec<usize> = s.timesteps().iter().map(|&t| t as usize).collect();
    let n = 33;
    let mut x = noise(n, 3);
    for k in 0..5 {
        let m = noise(n, 300 + k as u64);
        let (a_s, a_t) = (ac[ts[k]], ac[ts[k + 1]]);
        let want: Vec<f64> = x
            .iter()
            .zip(&m)
            .map(|(&x, &e)| {
                let x0 = (x as f64 - (1.0 - a_s).sqrt() * e as f64) / a_s.sqrt();
                a_t.sqrt() * x0 + (1.0 - a_t).sqrt() * e as f64
            })
            .collect();
        s.step(&m, k, &mut x).unwrap();
        let scale = want.iter().fold(1.0f64, |a, w| a.max(w.abs()));
        assert_close(&x, &want, 2e-5 * scale, &format!("dpm1 step {k}"));
    }
}

#[test]
fn dpm_patchwise_steps_equal_full_steps() {
    let n = 64;
    let mut full = build(PIXART, 6);
    let mut parts = build(PIXART, 6);
    let mut x_full = noise(n, 11);
    let mut x_parts = x_full.clone();
    for k in 0..6 {
        let m = noise(n, 400 + k as u64);
        full.step(&m, k, &mut x_full).unwrap();
        // Patches in a scrambled order.
        for (a, b) in [(40, 64), (0, 17), (17, 40)] {
            parts
                .step_slice(&m[a..b], k, &mut x_parts[a..b], a, n)
                .unwrap();
        }
        assert_eq!(x_full, x_parts, "step {k}");
    }
}

#[test]
fn flow_euler_step() {
    let mut s = build(SD3, 6);
    let t = s.timesteps().to_vec();
    let n = 50;
    let mut x = noise(n, 5);
    for k in 0..6 {
        let v = noise(n, 500 + k as u64);
        let sigma = t[k] as f64 / 1000.0;
        let next = if k + 1 < 6 {
            t[k + 1] as f64 / 1000.0
        } else {
            0.0
        };
        let want: Vec<f64> = x
            .iter()
            .zip(&v)
            .map(|(&x, &v)| x as f64 + (next - sigma) * v as f64)
            .collect();
        s.step(&v, k, &mut x).unwrap();
        assert_close(&x, &want, 1e-5, &format!("flow step {k}"));
    }
}

#[test]
fn flow_straight_line_is_exact() {
    // x_sigma = (1 - sigma) x0 + sigma noise has velocity v = noise - x0: Euler is exact.
    let mut s = build(FLUX, 4);
    let (x0, nz) = (0.3f32, -1.2f32);
    let mut x = vec![nz]; // sigma = 1
    for k in 0..4 {
        s.step(&[nz - x0], k, &mut x).unwrap();
    }
    assert!((x[0] - x0).abs() < 1e-6, "{}", x[0]);
}

// ----------------------------------------------------------------------------- errors

fn err(json: &str) -> String {
    match from_config_json(json) {
        Ok(s) => panic!("expected an error, got {}", s.name()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn unsupported_algorithm_type() {
    let e = err(&with_field(PIXART, "algorithm_type", "\"sde-dpmsolver++\""));
    assert!(e.contains("`algorithm_type`"), "{e}");
    assert!(e.contains("sde-dpmsolver++"), "{e}");
    assert!(e.contains("supported: \"dpmsolver++\""), "{e}");
}

#[test]
fn thresholding_is_rejected() {
    let e = err(&with_field(DIT, "thresholding", "true"));
    assert!(
        e.contains("DDIMScheduler") && e.contains("`thresholding`"),
        "{e}"
    );
    let e = err(&with_field(PIXART, "thresholding", "true"));
    assert!(e.contains("`thresholding`"), "{e}");
}

#[test]
fn other_unsupported_values_name_the_field() {
    for (cfg, field, value) in [
        (PIXART, "use_karras_sigmas", "true"),
        (PIXART, "solver_order", "3"),
        (PIXART, "final_sigmas_type", "\"denoise_to_zero\""),
        (PIXART, "variance_type", "\"learned_range\""),
        (DIT, "beta_schedule", "\"sigmoid\""),
        (DIT, "timestep_spacing", "\"karras\""),
        (DIT, "prediction_type", "\"flow\""),
        (SD3, "stochastic_sampling", "true"),
        (SD3, "invert_sigmas", "true"),
        (SD3, "shift_terminal", "0.02"),
        (SD3, "use_beta_sigmas", "true"),
        (SD3, "time_shift_type", "\"cubic\""),
    ] {
        let e = err(&with_field(cfg, field, value));
        assert!(e.contains(&format!("`{field}`")), "{field}: {e}");
    }
    // A wrong type is an error naming the field too.
    let e = err(&with_field(DIT, "beta_start", "\"small\""));
    assert!(e.contains("`beta_start`") && e.contains("a number"), "{e}");
}

#[test]
fn unknown_class_and_bad_json() {
    let e = err(r#"{"_class_name": "EulerDiscreteScheduler"}"#);
    assert!(
        e.contains("EulerDiscreteScheduler") && e.contains("DDIMScheduler"),
        "{e}"
    );
    assert!(matches!(
        from_config_json("{\"num_train_timesteps\": 1000}"),
        Err(SchedulerError::MissingClassName)
    ));
    assert!(matches!(
        from_config_json("{not json"),
        Err(SchedulerError::Json(_))
    ));
    // Unknown fields are ignored.
    assert!(from_config_json(&with_field(DIT, "some_future_option", "[1, 2]")).is_ok());
}

#[test]
fn zero_steps_and_misuse() {
    for cfg in [DIT, PIXART, SD3] {
        let mut s = from_config_json(cfg).unwrap();
        let e = s.set_timesteps(0, 0).unwrap_err();
        assert!(matches!(e, SchedulerError::ZeroSteps));
        assert!(e.to_string().contains("at least 1"), "{e}");
        // step before set_timesteps
        let mut x = vec![0.0f32; 4];
        assert!(matches!(
            s.step(&[0.0; 4], 0, &mut x),
            Err(SchedulerError::NotInitialized { .. })
        ));
        s.set_timesteps(3, 0).unwrap();
        assert!(matches!(
            s.step(&[0.0; 4], 3, &mut x),
            Err(SchedulerError::StepOutOfRange { .. })
        ));
        assert!(matches!(
            s.step(&[0.0; 3], 0, &mut x),
            Err(SchedulerError::LengthMismatch { .. })
        ));
    }
    let mut s = from_config_json(DIT).unwrap();
    assert!(matches!(
        s.set_timesteps(1001, 0),
        Err(SchedulerError::TooManySteps { .. })
    ));
    // DDIM/DPM do not take custom sigmas.
    assert!(matches!(
        s.set_timesteps_with_sigmas(&[1.0, 0.5], 0),
        Err(SchedulerError::CustomSigmasUnsupported { .. })
    ));
    // DPM++(2M) needs the previous step's output.
    let mut s = build(PIXART, 6);
    let mut x = vec![0.5f32; 4];
    s.step(&[0.1; 4], 0, &mut x).unwrap();
    let e = s.step(&[0.1; 4], 2, &mut x).unwrap_err();
    assert!(matches!(e, SchedulerError::OutOfOrder { .. }), "{e}");
}

#[test]
fn typed_config_constructor() {
    let cfg = DpmSolverConfig {
        solver_order: 1,
        ..DpmSolverConfig::default()
    };
    let mut s = DpmSolverMultistepScheduler::new(cfg).unwrap();
    s.set_timesteps(6, 0).unwrap();
    assert_eq!(s.timesteps(), &[999., 832., 666., 500., 333., 166.]);
    assert_eq!(s.sigmas().len(), 7);
    assert_eq!(s.sigmas()[6], 0.0);
}
