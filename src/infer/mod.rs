//! Whole-image inference: pad to a multiple of 2^depth, or slide overlapping windows over large
//! inputs and average their probabilities; then labels and evaluation scores. Nothing here
//! writes files: [`writer`] turns the results into prediction files, overlays and score tables.

pub mod by_label;
pub mod shard;
pub mod writer;

use std::path::Path;

use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::data::io::{self, fmt_shape};
use crate::data::patch::{crop, images_tensor};
use crate::data::volume::spacing::{Spacing, on_input_grid};
use crate::data::{DataConfig, Sample};
use crate::metrics::{self, LabelScore, Overlap};
use crate::model::{Mode, UNetPP};

/// Window origins along one axis of length `len` for windows of `win`, half overlapping.
fn origins(len: usize, win: usize) -> Vec<isize> {
    if len <= win {
        return vec![0];
    }
    let stride = (win / 2).max(1);
    let mut v: Vec<isize> = (0..=(len - win)).step_by(stride).map(|o| o as isize).collect();
    if *v.last().unwrap() != (len - win) as isize {
        v.push((len - win) as isize);
    }
    v
}

/// Class probabilities, `classes` planes of the sample's voxels (1 plane for binary).
pub fn probabilities<const D: usize>(
    model: &UNetPP<D>,
    s: &Sample,
    mode: Mode,
    tile: [usize; 3],
    device: &Device,
) -> anyhow::Result<Vec<f32>> {
    Ok(probabilities_modes(model, s, &[mode], tile, device)?.remove(0))
}

/// [`probabilities`] in several modes from one pass per window.
pub fn probabilities_modes<const D: usize>(
    model: &UNetPP<D>,
    s: &Sample,
    modes: &[Mode],
    tile: [usize; 3],
    device: &Device,
) -> anyhow::Result<Vec<Vec<f32>>> {
    let cfg = model.config();
    let m = 1usize << cfg.depth;
    let win: [usize; 3] = std::array::from_fn(|a| {
        if a == 0 && cfg.dims == 2 {
            1
        } else {
            let padded = s.shape[a].div_ceil(m) * m;
            padded.min(tile[a].max(m) / m * m)
        }
    });
    let n = s.voxels();
    let k = cfg.classes;
    let mut sums = vec![vec![0f32; k * n]; modes.len()];
    let mut count = vec![0u16; n];
    let wn = win.iter().product::<usize>();
    // rayon's workers poll for work through the windows' model passes instead of sleeping.
    let _busy = crate::backend::busy_workers();
    for &oz in &origins(s.shape[0], win[0]) {
        for &oy in &origins(s.shape[1], win[1]) {
            for &ox in &origins(s.shape[2], win[2]) {
                let patch = crop(s, [oz, oy, ox], win);
                let all = model.predict_modes(images_tensor::<D>(&[&patch], device), modes)?;
                for (m, probs) in all.into_iter().enumerate() {
                    let probs: Vec<f32> = probs.into_data().iter::<f32>().collect();
                    let sum = &mut sums[m];
                    for z in 0..win[0].min(s.shape[0]) {
                        for y in 0..win[1].min(s.shape[1] - oy as usize) {
                            for x in 0..win[2].min(s.shape[2] - ox as usize) {
                                let dst =
                                    ((oz as usize + z) * s.shape[1] + oy as usize + y) * s.shape[2] + ox as usize + x;
                                let src = (z * win[1] + y) * win[2] + x;
                                if m == 0 {
                                    count[dst] += 1;
                                }
                                for c in 0..k {
                                    sum[c * n + dst] += probs[c * wn + src];
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    for sum in &mut sums {
        for c in 0..k {
            for i in 0..n {
                sum[c * n + i] /= count[i].max(1) as f32;
            }
        }
    }
    Ok(sums)
}

/// Hard labels from probabilities: threshold 0.5 (binary) or arg-max.
pub fn labels(probs: &[f32], classes: usize) -> Vec<u8> {
    if classes == 1 {
        return probs.iter().map(|&p| (p > 0.5) as u8).collect();
    }
    let n = probs.len() / classes;
    (0..n).map(|i| (0..classes).max_by(|&a, &b| probs[a * n + i].total_cmp(&probs[b * n + i])).unwrap() as u8).collect()
}

pub fn overlap(pred: &[u8], truth: &[u8], classes: usize) -> (Overlap, Vec<Overlap>) {
    if classes == 1 {
        let p: Vec<bool> = pred.iter().map(|&v| v > 0).collect();
        let t: Vec<bool> = truth.iter().map(|&v| v > 0).collect();
        let o = metrics::binary(&p, &t);
        (o, vec![o])
    } else {
        let (per, mean) = metrics::per_class(pred, truth, classes);
        (mean, per)
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct ImageScore {
    pub name: String,
    pub iou: f64,
    pub dice: f64,
    /// Mean over the labels; NaN where no label has one (see [`crate::metrics`]).
    pub hd95: f64,
    pub nsd: f64,
    pub per_class: Vec<LabelScore>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Summary {
    pub mode: String,
    pub images: usize,
    pub mean_dice: f64,
    pub std_dice: f64,
    pub mean_iou: f64,
    pub std_iou: f64,
    pub seconds: f64,
    /// Mean Dice and IoU per class (multi-class), named by label.
    #[serde(skip)]
    pub per_class: Vec<(String, Overlap)>,
    /// HD95, NSD and per-label means; absent for scores made without them (Otsu rows).
    #[serde(default)]
    pub surface: Option<metrics::SurfaceSummary>,
}

/// How `eval` scores and post-processes its predictions.
#[derive(Clone, Debug, Default)]
pub struct Scoring {
    pub metrics: metrics::Settings,
    /// Applied to each hard prediction before it is scored (and drawn).
    pub postprocess: Option<crate::postprocess::Decision>,
    /// The spacing the network works at (the checkpoint's `--spacing`); scores are taken on each
    /// sample's own grid.
    pub spacing: Option<Spacing>,
}

/// Scores every sample; hands each sample's predicted labels to `each` (e.g.
/// [`writer::overlay`]) as they are made, so that nothing holds all of them.
pub fn evaluate<const D: usize>(
    model: &UNetPP<D>,
    samples: &[Sample],
    mode: Mode,
    tile: [usize; 3],
    device: &Device,
    spacing: Option<Spacing>,
    each: impl FnMut(&Sample, &[u8]) -> anyhow::Result<()>,
) -> anyhow::Result<(Vec<ImageScore>, Summary)> {
    Ok(evaluate_modes(model, samples, &[mode], tile, device, spacing, each)?.remove(0))
}

/// [`evaluate`] in several modes from one pass per window (`each` sees the first mode's labels).
/// `seconds` is the wall time of the whole pass. With a target `spacing` the network sees each
/// sample resampled to it and the scores are taken on the sample's own grid.
pub fn evaluate_modes<const D: usize>(
    model: &UNetPP<D>,
    samples: &[Sample],
    modes: &[Mode],
    tile: [usize; 3],
    device: &Device,
    spacing: Option<Spacing>,
    each: impl FnMut(&Sample, &[u8]) -> anyhow::Result<()>,
) -> anyhow::Result<Vec<(Vec<ImageScore>, Summary)>> {
    evaluate_scored(model, samples, modes, tile, device, each, &Scoring { spacing, ..Default::default() })
}

/// [`evaluate_modes`] with the scoring settings and post-processing of `scoring`.
pub fn evaluate_scored<const D: usize>(
    model: &UNetPP<D>,
    samples: &[Sample],
    modes: &[Mode],
    tile: [usize; 3],
    device: &Device,
    mut each: impl FnMut(&Sample, &[u8]) -> anyhow::Result<()>,
    scoring: &Scoring,
) -> anyhow::Result<Vec<(Vec<ImageScore>, Summary)>> {
    let start = std::time::Instant::now();
    let classes = model.config().classes;
    let mut scores = vec![vec![]; modes.len()];
    for s in samples {
        anyhow::ensure!(!s.mask.is_empty(), "{} has no ground-truth mask to evaluate against", s.source.display());
        let all = on_input_grid(s, scoring.spacing, |r| probabilities_modes(model, r, modes, tile, device))?;
        let voxel = metrics::voxel_spacing(s);
        for (m, probs) in all.iter().enumerate() {
            let mut pred = labels(probs, classes);
            if let Some(pp) = &scoring.postprocess {
                pp.apply(&mut pred, s.shape);
            }
            let per_class = metrics::score_labels(&pred, &s.mask, s.shape, voxel, classes, &scoring.metrics);
            if m == 0 {
                each(s, &pred)?;
            }
            let [dice, iou, hd95, nsd] = metrics::case_means(&per_class);
            scores[m].push(ImageScore { name: s.name.clone(), iou, dice, hd95, nsd, per_class });
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(modes
        .iter()
        .zip(scores)
        .map(|(mode, scores)| {
            let (mean_dice, std_dice) = metrics::nan_mean_std(&scores.iter().map(|s| s.dice).collect::<Vec<_>>());
            let (mean_iou, std_iou) = metrics::nan_mean_std(&scores.iter().map(|s| s.iou).collect::<Vec<_>>());
            let labels: Vec<&[LabelScore]> = scores.iter().map(|s| s.per_class.as_slice()).collect();
            let surface = Some(metrics::summarize(&labels, &scoring.metrics));
            let summary = Summary {
                mode: mode.to_string(),
                images: scores.len(),
                mean_dice,
                std_dice,
                mean_iou,
                std_iou,
                seconds,
                per_class: vec![],
                surface,
            };
            (scores, summary)
        })
        .collect())
}

/// Reads an input without a mask for prediction.
pub fn read_unlabelled(path: &Path, cfg: &DataConfig) -> anyhow::Result<Sample> {
    let (image, shape, geometry) = io::read_input_framed(path, cfg)?;
    Ok(Sample {
        geometry,
        name: crate::data::stem(path),
        image,
        mask: vec![],
        channels: cfg.channels,
        shape,
        source: path.to_path_buf(),
    })
}

pub fn describe(s: &Sample) -> String {
    format!("{} ({})", s.name, fmt_shape(s.shape))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_cover_the_axis_with_overlap() {
        assert_eq!(origins(10, 16), vec![0]);
        assert_eq!(origins(20, 8), vec![0, 4, 8, 12]);
        assert_eq!(origins(21, 8), vec![0, 4, 8, 12, 13]);
    }

    #[test]
    fn argmax_and_threshold() {
        assert_eq!(labels(&[0.2, 0.6], 1), vec![0, 1]);
        assert_eq!(labels(&[0.7, 0.1, 0.3, 0.9], 2), vec![0, 1]);
    }
}
