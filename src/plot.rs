//! Loss and validation IoU curves from `metrics.csv`.

use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;

/// Registers a system TrueType font for labels; without one the chart is drawn without text.
fn font() -> bool {
    static FONT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FONT.get_or_init(|| {
        ["/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "/usr/share/fonts/TTF/DejaVuSans.ttf"]
            .iter()
            .filter_map(|p| std::fs::read(p).ok())
            .next()
            .map(|bytes| {
                plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(bytes.into_boxed_slice()))
                    .is_ok()
            })
            .unwrap_or(false)
    })
}

pub fn curves(csv: &Path, png: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(csv).with_context(|| format!("cannot read {}", csv.display()))?;
    let mut rows: Vec<Vec<f64>> = vec![];
    for (i, line) in text.lines().enumerate().skip(1) {
        let row: Vec<f64> = line.split(',').map(|v| v.parse().unwrap_or(f64::NAN)).collect();
        anyhow::ensure!(
            row.len() >= 4,
            "{} line {}: {} columns, expected epoch,step,train_loss,val_iou,...",
            csv.display(),
            i + 1,
            row.len()
        );
        // plotters loops forever on an infinite axis range.
        anyhow::ensure!(row[0].is_finite(), "{} line {}: the epoch is not a number", csv.display(), i + 1);
        rows.push(row);
    }
    if rows.is_empty() {
        return Ok(());
    }
    crate::fsio::write_with(png, |tmp| draw_curves(&rows, tmp))
        .with_context(|| format!("cannot plot {}", csv.display()))
}

fn draw_curves(rows: &[Vec<f64>], png: &Path) -> anyhow::Result<()> {
    let labels = font();
    let root = BitMapBackend::new(png, (960, 400)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let panels = root.split_evenly((1, 2));
    let last = rows.last().unwrap()[0];
    for (panel, (col, name, color)) in panels.iter().zip([(2, "train loss", RED), (3, "validation IoU", BLUE)]) {
        let pts: Vec<(f64, f64)> = rows.iter().map(|r| (r[0], r[col])).filter(|p| p.1.is_finite()).collect();
        if pts.is_empty() {
            continue;
        }
        let (lo, hi) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
        // Wide enough to stay a range at these magnitudes, and finite: plotters loops forever
        // on an infinite or empty one.
        let pad = ((hi - lo) * 0.1).max(1e-3).max(hi.abs().max(lo.abs()) * 1e-3);
        anyhow::ensure!(((hi + pad) - (lo - pad)).is_finite(), "{name} values span more than a chart can show");
        let mut builder = ChartBuilder::on(panel);
        builder.margin(15);
        if labels {
            builder.caption(name, ("sans-serif", 20)).x_label_area_size(30).y_label_area_size(50);
        }
        let mut chart = builder
            .build_cartesian_2d(1.0..last.max(2.0), (lo - pad)..(hi + pad))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut mesh = chart.configure_mesh();
        if labels {
            mesh.x_desc("epoch");
        } else {
            mesh.disable_x_axis().disable_y_axis();
        }
        mesh.draw().map_err(|e| anyhow::anyhow!("{e}"))?;
        chart.draw_series(LineSeries::new(pts.clone(), color.stroke_width(2))).map_err(|e| anyhow::anyhow!("{e}"))?;
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    root.present().map_err(|e| anyhow::anyhow!("cannot write {}: {e}", png.display()))?;
    Ok(())
}

/// The pruning trade-off: test IoU against inference time, one labelled point per level.
pub fn pruning(points: &[(String, f64, f64)], png: &Path) -> anyhow::Result<()> {
    if points.is_empty() {
        return Ok(());
    }
    crate::fsio::write_with(png, |tmp| draw_pruning(points, tmp))
}

fn draw_pruning(points: &[(String, f64, f64)], png: &Path) -> anyhow::Result<()> {
    let labels = font();
    let root = BitMapBackend::new(png, (640, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let (x_hi, (y_lo, y_hi)) =
        points.iter().fold((0f64, (f64::MAX, f64::MIN)), |(x, (a, b)), p| (x.max(p.1), (a.min(p.2), b.max(p.2))));
    let pad = ((y_hi - y_lo) * 0.15).max(0.01);
    let mut builder = ChartBuilder::on(&root);
    builder.margin(20);
    if labels {
        builder
            .caption("UNet++ pruned: accuracy vs speed", ("sans-serif", 20))
            .x_label_area_size(35)
            .y_label_area_size(55);
    }
    let mut chart =
        builder.build_cartesian_2d(0.0..x_hi * 1.15, (y_lo - pad)..(y_hi + pad)).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut mesh = chart.configure_mesh();
    if labels {
        mesh.x_desc("ms per 512x512 image").y_desc("test IoU");
    } else {
        mesh.disable_x_axis().disable_y_axis();
    }
    mesh.draw().map_err(|e| anyhow::anyhow!("{e}"))?;
    let pts: Vec<(f64, f64)> = points.iter().map(|p| (p.1, p.2)).collect();
    chart.draw_series(LineSeries::new(pts.clone(), BLUE.stroke_width(2))).map_err(|e| anyhow::anyhow!("{e}"))?;
    chart.draw_series(pts.iter().map(|&p| Circle::new(p, 5, BLUE.filled()))).map_err(|e| anyhow::anyhow!("{e}"))?;
    if labels {
        chart
            .draw_series(points.iter().map(|(l, x, y)| Text::new(l.clone(), (*x, *y), ("sans-serif", 16))))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    root.present().map_err(|e| anyhow::anyhow!("cannot write {}: {e}", png.display()))?;
    Ok(())
}
