//! The SVG plots of `ditto analyze`, drawn with plotters' SVG backend only.
//!
//! No font file is read: without plotters' `ttf`/`ab_glyph` features it sizes text with its
//! built-in approximate metrics and writes plain SVG `<text>` elements, which the viewer
//! renders with its own fonts. So titles, axis labels and legends work on machines with no
//! system fonts (CI).

use std::path::{Path, PathBuf};

use plotters::prelude::*;

use super::Analysis;

/// A plot that could not be drawn or written.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct PlotError {
    pub path: String,
    pub reason: String,
}

fn plot_err(path: &Path, e: impl std::fmt::Display) -> PlotError {
    PlotError {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// File-name-safe form of a tensor name.
fn slug(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// Per step count and tensor kind: `curves_<tensor>_<n>steps.svg` (per-layer curves of the
/// mean rel_l1 over steps) and `heatmap_<tensor>_<n>steps.svg` (layer x step). Returns the
/// files written.
pub fn write_plots(a: &Analysis, dir: &Path) -> Result<Vec<PathBuf>, PlotError> {
    let mut written = Vec::new();
    for &steps in &a.step_counts() {
        let curves = a.mean_curves(steps, true);
        for tensor in a.tensors() {
            let rows: Vec<(String, Vec<f64>)> = (0..a.series.len())
                .filter(|&i| a.series[i].tensor == tensor)
                .map(|i| (a.series[i].layer.clone(), curves[i].clone()))
                .collect();
            let title = format!("{tensor}: rel. L1 change per step ({steps} steps)");
            let path = dir.join(format!("curves_{}_{steps}steps.svg", slug(&tensor)));
            curves_svg(&path, &title, &rows).map_err(|e| plot_err(&path, e))?;
            written.push(path);
            let path = dir.join(format!("heatmap_{}_{steps}steps.svg", slug(&tensor)));
            heatmap_svg(&path, &title, &rows).map_err(|e| plot_err(&path, e))?;
            written.push(path);
        }
    }
    Ok(written)
}

type DrawResult = Result<(), Box<dyn std::error::Error>>;

/// Colour of layer `i` of `n`: blue (shallow) to red (deep).
fn depth_colour(i: usize, n: usize) -> RGBColor {
    let f = if n > 1 {
        i as f64 / (n - 1) as f64
    } else {
        0.0
    };
    let lerp = |a: f64, b: f64| (a + (b - a) * f).round() as u8;
    RGBColor(lerp(40.0, 220.0), lerp(90.0, 50.0), lerp(220.0, 40.0))
}

/// Viridis-like ramp for the heatmap, `f` in [0, 1].
fn heat_colour(f: f64) -> RGBColor {
    const STOPS: [(f64, f64, f64); 5] = [
        (68.0, 1.0, 84.0),
        (59.0, 82.0, 139.0),
        (33.0, 145.0, 140.0),
        (94.0, 201.0, 98.0),
        (253.0, 231.0, 37.0),
    ];
    let f = if f.is_finite() {
        f.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let pos = f * (STOPS.len() - 1) as f64;
    let i = (pos.floor() as usize).min(STOPS.len() - 2);
    let w = pos - i as f64;
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    let mix = |x: f64, y: f64| (x + (y - x) * w).round() as u8;
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

fn finite_max(rows: &[(String, Vec<f64>)]) -> f64 {
    rows.iter()
        .flat_map(|(_, c)| c.iter().copied())
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max)
}

fn curves_svg(path: &Path, title: &str, rows: &[(String, Vec<f64>)]) -> DrawResult {
    let steps = rows.iter().map(|(_, c)| c.len()).max().unwrap_or(0);
    let ymax = finite_max(rows).max(1e-12) * 1.05;
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.5f64..(steps as f64 + 0.5), 0f64..ymax)?;
    chart
        .configure_mesh()
        .x_label_formatter(&|x| format!("{}", x.round() as i64))
        .x_desc("step t (change from t-1)")
        .y_desc("mean |x_t - x_(t-1)| / mean |x_(t-1)|")
        .draw()?;
    let n = rows.len();
    for (i, (layer, c)) in rows.iter().enumerate() {
        let colour = depth_colour(i, n);
        let points = c
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_finite())
            .map(|(t, &v)| (t as f64 + 1.0, v));
        let series = chart.draw_series(LineSeries::new(points, colour.stroke_width(2)))?;
        // A legend only where it stays readable; otherwise colour encodes depth.
        if n <= 16 {
            series
                .label(layer.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], colour));
        }
    }
    if n <= 16 {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()?;
    } else {
        root.draw(&Text::new(
            format!("{n} layers: blue = shallow ... red = deep"),
            (90, 40),
            ("sans-serif", 14),
        ))?;
    }
    root.present()?;
    Ok(())
}

fn heatmap_svg(path: &Path, title: &str, rows: &[(String, Vec<f64>)]) -> DrawResult {
    let steps = rows.iter().map(|(_, c)| c.len()).max().unwrap_or(0);
    let n = rows.len();
    let max = finite_max(rows);
    let height = (120 + 22 * n).clamp(300, 1600) as u32;
    let root = SVGBackend::new(path, (960, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let (main, bar) = root.split_horizontally(860);
    // Rows as segments, so that every layer's name sits at its row's centre.
    let mut chart = ChartBuilder::on(&main)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(260)
        .build_cartesian_2d(0.5f64..(steps as f64 + 0.5), (0..n as i32).into_segmented())?;
    let labels: Vec<String> = rows.iter().map(|(l, _)| l.clone()).collect();
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc("step t")
        .x_labels(steps.min(25))
        .x_label_formatter(&|x| format!("{}", x.round() as i64))
        .y_labels(n)
        .y_label_formatter(&|y| match y {
            // Shallow layers at the top: segment k holds row n - 1 - k.
            SegmentValue::CenterOf(k) | SegmentValue::Exact(k) if (0..n as i32).contains(k) => {
                labels[(n as i32 - 1 - k) as usize].clone()
            }
            SegmentValue::CenterOf(_) | SegmentValue::Exact(_) => String::new(),
            SegmentValue::Last => String::new(),
        })
        .draw()?;
    chart.draw_series(rows.iter().enumerate().flat_map(|(i, (_, c))| {
        let y = (n - i - 1) as i32;
        c.iter().enumerate().map(move |(t, &v)| {
            let f = if max > 0.0 { v / max } else { 0.0 };
            Rectangle::new(
                [
                    (t as f64 + 0.5, SegmentValue::Exact(y)),
                    (t as f64 + 1.5, SegmentValue::Exact(y + 1)),
                ],
                heat_colour(f).filled(),
            )
        })
    }))?;
    // Colour bar.
    let (bw, bh) = bar.dim_in_pixel();
    let top = 50i32;
    let bottom = bh as i32 - 50;
    let x0 = 20i32;
    let x1 = (bw as i32 - 60).max(x0 + 10).min(x0 + 24);
    let levels = 64;
    for k in 0..levels {
        let f0 = k as f64 / levels as f64;
        let y_hi = bottom - ((bottom - top) as f64 * (f0 + 1.0 / levels as f64)) as i32;
        let y_lo = bottom - ((bottom - top) as f64 * f0) as i32;
        bar.draw(&Rectangle::new(
            [(x0, y_hi), (x1, y_lo)],
            heat_colour(f0 + 0.5 / levels as f64).filled(),
        ))?;
    }
    bar.draw(&Text::new(
        format!("{max:.2e}"),
        (x0, top - 18),
        ("sans-serif", 12),
    ))?;
    bar.draw(&Text::new("0", (x0, bottom + 6), ("sans-serif", 12)))?;
    root.present()?;
    Ok(())
}
