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

/// Rows of `epoch,step,train_loss,val_iou,...`: the header, blank lines and junk (a row cut short
/// by hand editing, text where a number belongs) are skipped, never a panic.
fn parse_rows(text: &str) -> Vec<Vec<f64>> {
    text.lines()
        .map(|l| l.split(',').map(|v| v.trim().parse().unwrap_or(f64::NAN)).collect::<Vec<f64>>())
        .filter(|r| r.len() >= 4 && r[0].is_finite() && r[0] >= 0.0)
        .collect()
}

/// Draws into an RGB buffer and writes it with one atomic write: plotters' own file output goes
/// through `image`'s unflushed save, which can leave a truncated PNG on a full disk.
fn write_png(
    png: &Path,
    size: (u32, u32),
    draw: impl FnOnce(&mut [u8], (u32, u32)) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    crate::fsio::write_atomic(png, &encode(size, draw)?)
}

fn encode(size: (u32, u32), draw: impl FnOnce(&mut [u8], (u32, u32)) -> anyhow::Result<()>) -> anyhow::Result<Vec<u8>> {
    let mut buf = vec![0u8; 3 * size.0 as usize * size.1 as usize];
    draw(&mut buf, size)?;
    crate::data::io::encode_png(&buf, size.0 as usize, size.1 as usize, true)
}

pub fn curves(csv: &Path, png: &Path) -> anyhow::Result<()> {
    match curves_png(csv)? {
        Some(bytes) => crate::fsio::write_atomic(png, &bytes),
        None => Ok(()),
    }
}

/// The curves of [`curves`] as PNG bytes; None when `metrics.csv` has no row to draw.
pub fn curves_png(csv: &Path) -> anyhow::Result<Option<Vec<u8>>> {
    let text = std::fs::read_to_string(csv).with_context(|| format!("cannot read {}", csv.display()))?;
    let rows = parse_rows(&text);
    if rows.is_empty() {
        return Ok(None);
    }
    encode((960, 400), |buf, size| draw_curves(&rows, buf, size)).map(Some)
}

fn draw_curves(rows: &[Vec<f64>], buf: &mut [u8], size: (u32, u32)) -> anyhow::Result<()> {
    let labels = font();
    let root = BitMapBackend::with_buffer(buf, size).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let panels = root.split_evenly((1, 2));
    let last = rows.iter().fold(1f64, |m, r| m.max(r[0]));
    for (panel, (col, name, color)) in panels.iter().zip([(2, "train loss", RED), (3, "validation IoU", BLUE)]) {
        let pts: Vec<(f64, f64)> = rows.iter().map(|r| (r[0], r[col])).filter(|p| p.1.is_finite()).collect();
        if pts.is_empty() {
            continue;
        }
        let (lo, hi) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
        // Wide enough to stay a range at these magnitudes, and finite: plotters loops forever
        // on an infinite or empty one.
        let pad = ((hi - lo) * 0.1).max(1e-3).max(hi.abs().max(lo.abs()) * 1e-3);
        if !((hi + pad) - (lo - pad)).is_finite() {
            // The plot ends a training run: a panel it cannot show is left blank, not an error.
            continue;
        }
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
    root.present().map_err(|e| anyhow::anyhow!("cannot draw the plot: {e}"))?;
    Ok(())
}

/// The pruning trade-off: test IoU against inference time, one labelled point per level.
pub fn pruning(points: &[(String, f64, f64)], png: &Path) -> anyhow::Result<()> {
    if points.is_empty() {
        return Ok(());
    }
    write_png(png, (640, 420), |buf, size| draw_pruning(points, buf, size))
}

fn draw_pruning(points: &[(String, f64, f64)], buf: &mut [u8], size: (u32, u32)) -> anyhow::Result<()> {
    let labels = font();
    let root = BitMapBackend::with_buffer(buf, size).into_drawing_area();
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
    root.present().map_err(|e| anyhow::anyhow!("cannot draw the plot: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn junk_in_metrics_csv_is_skipped() {
        let text = "epoch,step,train_loss,val_iou,val_dice,seconds\n1,2,0.5,0.1,0.2,1.0\n\n\
                    2,4,0.4\n3,6,x,0.3,0.4,2.0\nhello\n,,,,\n4,8,0.3,0.35,0.45,3.0";
        let rows = parse_rows(text);
        // A cut-short row and rows without an epoch go; a row with one bad value keeps the rest.
        assert_eq!(rows.len(), 3, "{rows:?}");
        assert_eq!(rows[0][..4], [1.0, 2.0, 0.5, 0.1]);
        assert!(rows[1][0] == 3.0 && rows[1][2].is_nan() && rows[1][3] == 0.3, "{rows:?}");
        assert_eq!(rows[2][..4], [4.0, 8.0, 0.3, 0.35]);
    }

    #[test]
    fn curves_tolerate_blank_lines_and_a_missing_final_newline() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("metrics.csv");
        let png = dir.path().join("curves.png");
        std::fs::write(
            &csv,
            "epoch,step,train_loss,val_iou,val_dice,seconds\n1,2,0.5,NaN,NaN,1.0\n\n2,4,0.4,0.2,0.3,2",
        )
        .unwrap();
        curves(&csv, &png).unwrap();
        assert!(png.exists());
        std::fs::write(&csv, "\n\njunk\n").unwrap();
        std::fs::remove_file(&png).unwrap();
        curves(&csv, &png).unwrap();
        assert!(!png.exists(), "nothing to draw, nothing written");
    }
}
