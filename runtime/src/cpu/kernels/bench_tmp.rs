use super::test_util::Rng;
use super::*;
use std::time::Instant;

fn time<F: FnMut()>(name: &str, flops: f64, mut f: F) {
    f();
    let mut dt = f64::MAX;
    for _ in 0..7 { let t = Instant::now(); f(); dt = dt.min(t.elapsed().as_secs_f64()); }
    println!("{name:40} {:9.3} ms  {:7.1} GFLOP/s", dt * 1e3, flops / dt / 1e9);
}

#[test]
#[ignore]
fn bench() {
    let mut rng = Rng::new(1);
    let (m, k, n) = (512, 1152, 4608);
    let x = rng.vec(m * k); let w = rng.vec(n * k); let b = rng.vec(n);
    let mut out = vec![0.0; m * n];
    time("linear 512x1152x4608", 2.0 * (m * k * n) as f64, || gemm::linear(&x, m, k, &w, n, Some(&b), &mut out));
    let (m, k, n) = (512, 1152, 1152);
    time("linear 512x1152x1152", 2.0 * (m * k * n) as f64, || gemm::linear(&x, m, k, &w, n, Some(&b), &mut out));
    let (m, k, n) = (512, 4608, 1152);
    let x2 = rng.vec(m*k);
    time("linear 512x4608x1152", 2.0 * (m * k * n) as f64, || gemm::linear(&x2, m, k, &w, n, Some(&b), &mut out));

    let (bt, s, h, d) = (2, 256, 16, 72);
    let q = rng.vec(bt * s * h * d); let kk = rng.vec(bt * s * h * d); let v = rng.vec(bt * s * h * d);
    let mut o = vec![0.0; q.len()];
    let fl = 4.0 * (bt * h * s * s * d) as f64;
    time("attention 2x16x256x72", fl, || attention::attention(&q, &kk, &v, bt, s, s, h, d, 0.1, &mut o));
    let kt = rng.vec(bt * 120 * h * d);
    time("xattn 2x16x256x120x72", 4.0 * (bt*h*s*120*d) as f64, || attention::attention(&q, &kt, &kt, bt, s, 120, h, d, 0.1, &mut o));
    let s4 = 4096;
    let q4 = rng.vec(bt * s4 * h * d); let mut o4 = vec![0.0; q4.len()];
    time("attention 2x16x4096x72", 4.0 * (bt*h*s4*s4*d) as f64, || attention::attention(&q4, &q4, &q4, bt, s4, s4, h, d, 0.1, &mut o4));

    let xx = rng.vec(512 * 1152); let mut oo = vec![0.0; xx.len()];
    time("layer_norm 512x1152", (512*1152) as f64, || norm::layer_norm(&xx, 512, 1152, 1e-6, &mut oo));
    time("softmax 512x1152", (512*1152) as f64, || norm::softmax(&xx, 512, 1152, &mut oo));
    time("permute bshd->bhsd", (512*1152) as f64, || layout::permute(&xx, &[2, 256, 16, 72], &[0, 2, 1, 3], &mut oo));
    time("permute transpose 512x1152", (512*1152) as f64, || layout::permute(&xx, &[512, 1152], &[1, 0], &mut oo));
    let lat = rng.vec(2 * 4 * 64 * 64); let cw = rng.vec(1152 * 4 * 4); let mut co = vec![0.0; 2 * 1152 * 32 * 32];
    time("conv patchify 2x4x64x64 -> 1152", 2.0 * (2*1152*1024*16) as f64, || conv::conv2d(&lat, 2, 4, 64, 64, &cw, 1152, 2, 2, Some(&b[..1152]), 2, 0, &mut co));
    let img = rng.vec(1 * 128 * 128 * 128); let cw3 = rng.vec(128*128*9); let mut co3 = vec![0.0; 128*128*128];
    time("conv3x3 128->128 @128x128", 2.0 * (128usize*128*9*128*128) as f64, || conv::conv2d(&img, 1, 128, 128, 128, &cw3, 128, 3, 3, None, 1, 1, &mut co3));
}

#[test]
#[ignore]
fn bench_vmath() {
    let mut rng = Rng::new(1);
    let x = rng.vec(1 << 20);
    let mut o = vec![0.0; x.len()];
    time("softmax_row 1M (1 thread)", (1 << 20) as f64, || super::vmath::softmax_row(&x, &mut o));
    time("exp loop generic", (1 << 20) as f64, || { for (a, &b) in o.iter_mut().zip(&x) { *a = super::vmath::exp_f32(b); } });
    time("max", (1 << 20) as f64, || { std::hint::black_box(super::vmath::max(&x)); });
    time("sum", (1 << 20) as f64, || { std::hint::black_box(super::vmath::sum(&x)); });
    let mut y = x.clone();
    time("softmax_exp_inplace", (1 << 20) as f64, || { y.copy_from_slice(&x); std::hint::black_box(super::vmath::softmax_exp_inplace(&mut y)); });
}

#[test]
#[ignore]
fn bench_attn() {
    let mut rng = Rng::new(1);
    let (bt, h, d) = (2, 16, 72);
    for s in [256usize, 1024, 4096] {
        let q = rng.vec(bt * s * h * d); let mut o = vec![0.0; q.len()];
        time(&format!("attention 2x16x{s}x72"), 4.0 * (bt*h*s*s*d) as f64, || attention::attention(&q, &q, &q, bt, s, s, h, d, 0.1, &mut o));
    }
}

#[test]
#[ignore]
fn bench_attn1() {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    pool.install(|| {
    let mut rng = Rng::new(1);
    let (bt, h, d) = (1, 4, 72);
    for s in [256usize, 1024, 4096] {
        let q = rng.vec(bt * s * h * d); let mut o = vec![0.0; q.len()];
        time(&format!("1T attention 1x4x{s}x72"), 4.0 * (bt*h*s*s*d) as f64, || attention::attention(&q, &q, &q, bt, s, s, h, d, 0.1, &mut o));
        let mut sc = vec![0.0f32; 256 * s];
        let rows = 256.min(s);
        time(&format!("1T qk gemm {rows}x{s}x72"), 2.0 * (rows*s*d) as f64, || unsafe { gemm::gemm_raw(rows, s, d, sc.as_mut_ptr(), s, false, q.as_ptr(), h*d, 1, q.as_ptr(), 1, h*d, 0.1, ::gemm::Parallelism::None) });
        time(&format!("1T pv gemm {rows}x72x{s}"), 2.0 * (rows*s*d) as f64, || unsafe { gemm::gemm_raw(rows, d, s, o.as_mut_ptr(), h*d, false, sc.as_ptr(), s, 1, q.as_ptr(), h*d, 1, 1.0, ::gemm::Parallelism::None) });
        time(&format!("1T softmax {rows}x{s}"), (rows*s) as f64, || { for r in sc[..rows*s].chunks_exact_mut(s) { std::hint::black_box(super::vmath::softmax_exp_inplace(r)); } });
    }
    });
}
