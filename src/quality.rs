//! How far an approximate run (stale activations, step caching) is from the exact one:
//! PSNR of images and relative errors of latents against the serial, uncached run of the
//! same seed.

/// The distance of one tensor from its reference.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Distance {
    /// Peak signal-to-noise ratio in dB for data in [-1, 1] (peak-to-peak 2; both sides
    /// clamped to that range first, as an 8-bit image would be). Infinite when equal.
    pub psnr_db: f64,
    /// max |x - ref| / max |ref|.
    pub max_rel_err: f64,
    /// ||x - ref||_2 / ||ref||_2.
    pub rel_l2: f64,
}

/// Compares `x` with `reference` (same length; a length mismatch compares the common
/// prefix only, so callers check shapes first).
pub fn distance(reference: &[f32], x: &[f32]) -> Distance {
    let n = reference.len().min(x.len());
    let (mut se, mut diff2, mut ref2, mut max_diff, mut max_ref) = (0.0, 0.0, 0.0, 0.0f64, 0.0f64);
    for (&r, &v) in reference[..n].iter().zip(&x[..n]) {
        let (r, v) = (r as f64, v as f64);
        let c = r.clamp(-1.0, 1.0) - v.clamp(-1.0, 1.0);
        se += c * c;
        let d = v - r;
        diff2 += d * d;
        ref2 += r * r;
        max_diff = max_diff.max(d.abs());
        max_ref = max_ref.max(r.abs());
    }
    let mse = se / n.max(1) as f64;
    Distance {
        psnr_db: psnr_from_mse(mse),
        max_rel_err: if max_ref > 0.0 {
            max_diff / max_ref
        } else {
            max_diff
        },
        rel_l2: if ref2 > 0.0 {
            (diff2 / ref2).sqrt()
        } else {
            diff2.sqrt()
        },
    }
}

/// Per-sample PSNR (dB) of `samples` equal slices of a batch (images of one generation,
/// each against the exact image of the same seed), and their mean and worst: the mean is
/// what papers report, the worst what a user may meet.
pub fn per_sample(reference: &[f32], x: &[f32], samples: usize) -> SamplePsnr {
    let n = reference.len().min(x.len());
    let per = n / samples.max(1);
    let psnr: Vec<f64> = (0..samples.max(1))
        .map(|i| {
            let r = i * per..(i + 1) * per;
            distance(&reference[r.clone()], &x[r]).psnr_db
        })
        .collect();
    // The mean of finite values; identical samples (infinite PSNR) count as 100 dB.
    let capped: Vec<f64> = psnr.iter().map(|p| p.min(100.0)).collect();
    SamplePsnr {
        mean_db: capped.iter().sum::<f64>() / capped.len() as f64,
        worst_db: psnr.iter().copied().fold(f64::INFINITY, f64::min),
        per_sample_db: psnr,
    }
}

/// [`per_sample`]'s result.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplePsnr {
    pub per_sample_db: Vec<f64>,
    /// Mean over samples (an identical sample counts as 100 dB).
    pub mean_db: f64,
    pub worst_db: f64,
}

/// PSNR in dB of data in [-1, 1] with mean squared error `mse`.
pub fn psnr_from_mse(mse: f64) -> f64 {
    if mse <= 0.0 {
        f64::INFINITY
    } else {
        10.0 * (4.0 / mse).log10()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_tensors_are_infinitely_close() {
        let a = [0.5f32, -0.25, 1.0];
        let d = distance(&a, &a);
        assert!(d.psnr_db.is_infinite());
        assert_eq!(d.max_rel_err, 0.0);
        assert_eq!(d.rel_l2, 0.0);
    }

    #[test]
    fn per_sample_psnr_is_per_slice() {
        // Sample 0 off by 0.02 (40 dB), sample 1 by 0.2 (20 dB).
        let r = vec![0.1f32; 8];
        let mut x = r.clone();
        x[..4].iter_mut().for_each(|v| *v += 0.02);
        x[4..].iter_mut().for_each(|v| *v += 0.2);
        let s = per_sample(&r, &x, 2);
        assert!((s.per_sample_db[0] - 40.0).abs() < 1e-3);
        assert!((s.per_sample_db[1] - 20.0).abs() < 1e-3);
        assert!((s.mean_db - 30.0).abs() < 1e-3);
        assert!((s.worst_db - 20.0).abs() < 1e-3);
    }

    #[test]
    fn psnr_of_a_constant_offset() {
        // Every value off by 0.02: MSE 4e-4, PSNR = 10 log10(4 / 4e-4) = 40 dB.
        let r = vec![0.1f32; 64];
        let x: Vec<f32> = r.iter().map(|v| v + 0.02).collect();
        let d = distance(&r, &x);
        assert!((d.psnr_db - 40.0).abs() < 1e-3, "{}", d.psnr_db);
        assert!((d.max_rel_err - 0.2).abs() < 1e-5);
        assert!((d.rel_l2 - 0.2).abs() < 1e-5);
    }

    #[test]
    fn values_beyond_the_range_are_clamped_for_psnr_only() {
        let d = distance(&[1.0, -1.0], &[3.0, -1.0]);
        assert!(d.psnr_db.is_infinite());
        assert!((d.max_rel_err - 2.0).abs() < 1e-12);
    }
}
