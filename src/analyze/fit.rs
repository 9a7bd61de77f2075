//! Least-squares polynomial fit (TeaCache's rescaling polynomial).

/// The degree-`deg` polynomial minimizing the squared error through the points `(x, y)`:
/// coefficients highest degree first (as `numpy.polyfit`), and R² of the fit.
///
/// Solved by Householder QR on the Vandermonde matrix of `x / max|x|` (the indicator values
/// are small, so their 4th powers alone would make the normal equations ill-conditioned),
/// then scaled back. Needs at least `deg + 1` distinct x values.
pub fn polyfit(x: &[f64], y: &[f64], deg: usize) -> Result<(Vec<f64>, f64), String> {
    if x.len() != y.len() {
        return Err(format!("{} x values but {} y values", x.len(), y.len()));
    }
    if x.iter().chain(y).any(|v| !v.is_finite()) {
        return Err("the points must be finite numbers".into());
    }
    let mut distinct: Vec<f64> = x.to_vec();
    distinct.sort_by(f64::total_cmp);
    distinct.dedup();
    if distinct.len() <= deg {
        return Err(format!(
            "a degree-{deg} polynomial needs at least {} distinct x values, got {}",
            deg + 1,
            distinct.len()
        ));
    }
    let scale = x.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let (n, m) = (x.len(), deg + 1);
    // Column-major Vandermonde matrix in u = x / scale: column k holds u^k.
    let mut a: Vec<Vec<f64>> = (0..m)
        .map(|k| x.iter().map(|&v| (v / scale).powi(k as i32)).collect())
        .collect();
    let mut b = y.to_vec();
    for k in 0..m {
        // Householder reflection zeroing column k below the diagonal.
        let norm = a[k][k..].iter().map(|v| v * v).sum::<f64>().sqrt();
        if norm == 0.0 {
            return Err("the fit is singular".into());
        }
        let alpha = if a[k][k] > 0.0 { -norm } else { norm };
        let mut v: Vec<f64> = a[k][k..].to_vec();
        v[0] -= alpha;
        let vnorm2: f64 = v.iter().map(|t| t * t).sum();
        if vnorm2 == 0.0 {
            continue;
        }
        let reflect = |col: &mut [f64]| {
            let dot: f64 = v.iter().zip(&col[k..]).map(|(p, q)| p * q).sum();
            let f = 2.0 * dot / vnorm2;
            for (c, vi) in col[k..].iter_mut().zip(&v) {
                *c -= f * vi;
            }
        };
        for col in a.iter_mut().skip(k) {
            reflect(col);
        }
        reflect(&mut b);
    }
    // Back substitution on the upper triangle R c = (Q^T b)[..m].
    let mut c = vec![0.0; m];
    for i in (0..m).rev() {
        let s: f64 = ((i + 1)..m).map(|j| a[j][i] * c[j]).sum();
        if a[i][i].abs() < 1e-300 {
            return Err("the fit is singular".into());
        }
        c[i] = (b[i] - s) / a[i][i];
    }
    // Back to x: coefficient k of u^k is c_k / scale^k.
    let mut coefficients: Vec<f64> = (0..m).map(|k| c[k] / scale.powi(k as i32)).collect();
    coefficients.reverse();
    let eval = |v: f64| coefficients.iter().fold(0.0, |acc, c| acc * v + c);
    let mean = y.iter().sum::<f64>() / n as f64;
    let ss_tot: f64 = y.iter().map(|v| (v - mean).powi(2)).sum();
    let ss_res: f64 = x.iter().zip(y).map(|(&a, &b)| (b - eval(a)).powi(2)).sum();
    let r2 = if ss_tot > 0.0 {
        1.0 - ss_res / ss_tot
    } else {
        1.0
    };
    Ok((coefficients, r2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovers_an_exact_quartic() {
        let want = [3.0, -2.0, 0.5, 0.25, 0.01];
        let x: Vec<f64> = (0..12).map(|i| 0.01 + 0.03 * i as f64).collect();
        let y: Vec<f64> = x
            .iter()
            .map(|&v| want.iter().fold(0.0, |a, c| a * v + c))
            .collect();
        let (c, r2) = polyfit(&x, &y, 4).unwrap();
        for (a, b) in c.iter().zip(&want) {
            assert!((a - b).abs() < 1e-6, "{c:?}");
        }
        assert!(r2 > 0.999_999);
    }

    #[test]
    fn least_squares_line() {
        // y = 2x + 1 with symmetric noise: the fit is the line itself.
        let x = [0.0, 1.0, 1.0, 2.0, 2.0, 3.0];
        let y = [1.0, 3.1, 2.9, 5.1, 4.9, 7.0];
        let (c, _) = polyfit(&x, &y, 1).unwrap();
        assert!(
            (c[0] - 2.0).abs() < 1e-9 && (c[1] - 1.0).abs() < 1e-9,
            "{c:?}"
        );
    }

    #[test]
    fn too_few_points_is_an_error() {
        let e = polyfit(&[0.1, 0.2, 0.2], &[1.0, 2.0, 2.0], 4).unwrap_err();
        assert!(e.contains("at least 5 distinct"), "{e}");
    }
}
