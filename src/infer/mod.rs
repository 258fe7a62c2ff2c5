//! Whole-image inference: pad to a multiple of the model's down-sampling per axis (2^depth), or
//! slide overlapping windows over large inputs and average their probabilities ([`window`]:
//! Gaussian-weighted, [`tta`]: mirrored, [`ensemble`]: over checkpoints); then labels and
//! evaluation scores. Nothing here writes files: [`writer`] turns the results into prediction
//! files, overlays and score tables.

pub mod by_label;
pub mod ensemble;
pub mod read_ahead;
pub mod shard;
pub mod tta;
pub mod window;
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
pub use window::Sliding;

/// Class probabilities (`classes` planes of the sample's voxels, 1 plane for binary) per mode of
/// an ensemble of `models` (their mean; see [`ensemble::mean`]; one model: a one-element slice),
/// each sliding windows over the sample as `sliding` says ([`window::stitch`], mirrored with
/// [`tta`]); every mode from one pass per window. An input that fits one window goes through in
/// one pass, unweighted.
pub fn probabilities<const D: usize>(
    models: &[UNetPP<D>],
    s: &Sample,
    modes: &[Mode],
    sliding: &Sliding,
    device: &Device,
) -> anyhow::Result<Vec<Vec<f32>>> {
    let cfg = models.first().map(|m| m.config()).ok_or_else(|| anyhow::anyhow!("no model to predict with"))?;
    // Per axis, the models' total down-sampling (2^depth, or less on axes pooled fewer times);
    // powers of two, so the largest is a multiple of every other.
    let multiple: [usize; 3] =
        std::array::from_fn(|a| models.iter().map(|m| m.config().scale(m.config().depth)[a]).max().unwrap_or(1));
    let win = window::window(s.shape, sliding.tile, multiple, cfg.dims);
    let wn = win.iter().product::<usize>();
    let windows = window::origins(s.shape, win, sliding.overlap).len();
    let batch = match sliding.batch {
        Some(b) => b.clamp(1, windows),
        None => window::auto_batch(cfg.inference_bytes(wn), windows),
    };
    // rayon's workers poll for work through the windows' model passes instead of sleeping.
    let _busy = crate::backend::busy_workers();
    ensemble::mean(models.iter().map(|model| {
        window::stitch(s.shape, win, sliding.overlap, cfg.classes, batch, |origins| {
            let patches: Vec<_> = origins.iter().map(|o| crop(s, o.map(|v| v as isize), win)).collect();
            let x = images_tensor::<D>(&patches.iter().collect::<Vec<_>>(), device);
            let out = tta::predict(model, x, modes, sliding.tta)?;
            Ok(out.into_iter().map(|t| t.into_data().iter::<f32>().collect()).collect())
        })
    }))
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

impl Summary {
    /// The means (NaN cases left out) and surface metrics of `scores`; `per_class` left empty
    /// for the caller, who knows the label names.
    pub fn of(scores: &[ImageScore], mode: &str, seconds: f64, settings: &metrics::Settings) -> Summary {
        let col = |f: fn(&ImageScore) -> f64| metrics::nan_mean_std(&scores.iter().map(f).collect::<Vec<_>>());
        let ((mean_dice, std_dice), (mean_iou, std_iou)) = (col(|s| s.dice), col(|s| s.iou));
        let labels: Vec<&[LabelScore]> = scores.iter().map(|s| s.per_class.as_slice()).collect();
        Summary {
            mode: mode.to_string(),
            images: scores.len(),
            mean_dice,
            std_dice,
            mean_iou,
            std_iou,
            seconds,
            per_class: vec![],
            surface: Some(metrics::summarize(&labels, settings)),
        }
    }
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

/// Scores every sample in each mode from the [`probabilities`] of `models` (an ensemble's mean),
/// windows slid as `sliding` says, post-processed and scored as `scoring` says; hands each
/// sample's labels in the first mode to `each` (e.g. [`writer::overlay`]) as they are made, so
/// that nothing holds all of them. `seconds` is the wall time of the whole pass. With a target
/// spacing the network sees each sample resampled to it and the scores are taken on the
/// sample's own grid.
pub fn evaluate<const D: usize>(
    models: &[UNetPP<D>],
    samples: &[Sample],
    modes: &[Mode],
    sliding: &Sliding,
    device: &Device,
    mut each: impl FnMut(&Sample, &[u8]) -> anyhow::Result<()>,
    scoring: &Scoring,
) -> anyhow::Result<Vec<(Vec<ImageScore>, Summary)>> {
    let start = std::time::Instant::now();
    let classes = models.first().ok_or_else(|| anyhow::anyhow!("no model to evaluate"))?.config().classes;
    let mut scores = vec![vec![]; modes.len()];
    for s in samples {
        anyhow::ensure!(!s.mask.is_empty(), "{} has no ground-truth mask to evaluate against", s.source.display());
        let all = on_input_grid(s, scoring.spacing, |r| probabilities(models, r, modes, sliding, device))?;
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
            let summary = Summary::of(&scores, &mode.to_string(), seconds, &scoring.metrics);
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
    fn argmax_and_threshold() {
        assert_eq!(labels(&[0.2, 0.6], 1), vec![0, 1]);
        assert_eq!(labels(&[0.7, 0.1, 0.3, 0.9], 2), vec![0, 1]);
    }
}
