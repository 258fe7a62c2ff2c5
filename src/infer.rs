//! Whole-image inference: pad to a multiple of 2^depth, or slide overlapping windows over large
//! inputs and average their probabilities; then evaluation and prediction files.

use std::path::Path;

use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::data::io::{self, fmt_shape};
use crate::data::patch::{crop, images_tensor};
use crate::data::{DataConfig, Sample};
use crate::metrics::{self, Overlap};
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
    pub per_class: Vec<Overlap>,
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
}

/// Scores every sample; optionally writes overlays into `overlay_dir` (3D: three slices per volume).
pub fn evaluate<const D: usize>(
    model: &UNetPP<D>,
    samples: &[Sample],
    mode: Mode,
    tile: [usize; 3],
    device: &Device,
    overlay_dir: Option<&Path>,
) -> anyhow::Result<(Vec<ImageScore>, Summary)> {
    Ok(evaluate_modes(model, samples, &[mode], tile, device, overlay_dir)?.remove(0))
}

/// [`evaluate`] in several modes from one pass per window (overlays for the first mode).
/// `seconds` is the wall time of the whole pass.
pub fn evaluate_modes<const D: usize>(
    model: &UNetPP<D>,
    samples: &[Sample],
    modes: &[Mode],
    tile: [usize; 3],
    device: &Device,
    overlay_dir: Option<&Path>,
) -> anyhow::Result<Vec<(Vec<ImageScore>, Summary)>> {
    let start = std::time::Instant::now();
    let classes = model.config().classes;
    let mut scores = vec![vec![]; modes.len()];
    for s in samples {
        anyhow::ensure!(!s.mask.is_empty(), "{} has no ground-truth mask to evaluate against", s.source.display());
        let all = probabilities_modes(model, s, modes, tile, device)?;
        for (m, probs) in all.iter().enumerate() {
            let pred = labels(probs, classes);
            let (o, per_class) = overlap(&pred, &s.mask, classes);
            match overlay_dir.filter(|_| m == 0) {
                Some(dir) if s.shape[0] == 1 => write_overlay(dir, s, &pred)?,
                Some(dir) => crate::report::volume::write_slices(dir, s, &pred, &display_grey(s))?,
                None => {}
            }
            scores[m].push(ImageScore { name: s.name.clone(), iou: o.iou, dice: o.dice, per_class });
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(modes
        .iter()
        .zip(scores)
        .map(|(mode, scores)| {
            let (mean_dice, std_dice) = metrics::mean_std(&scores.iter().map(|s| s.dice).collect::<Vec<_>>());
            let (mean_iou, std_iou) = metrics::mean_std(&scores.iter().map(|s| s.iou).collect::<Vec<_>>());
            let summary = Summary {
                mode: mode.to_string(),
                images: scores.len(),
                mean_dice,
                std_dice,
                mean_iou,
                std_iou,
                seconds,
            };
            (scores, summary)
        })
        .collect())
}

/// The sample's image as 8-bit grey for display: the channel mean with its 0.5th..99.5th
/// percentiles stretched to 0..255, whatever the normalisation left (zscore and imagenet are
/// not in [0, 1]).
fn display_grey(s: &Sample) -> Vec<u8> {
    let n = s.voxels();
    let mean: Vec<f32> =
        (0..n).map(|i| (0..s.channels).map(|c| s.image[c * n + i]).sum::<f32>() / s.channels as f32).collect();
    let mut v = mean.clone();
    let (lo, hi) = (crate::data::percentile(&mut v, 0.5), crate::data::percentile(&mut v, 99.5));
    let scale = if hi > lo { 255.0 / (hi - lo) } else { 0.0 };
    mean.iter().map(|&x| ((x - lo) * scale).clamp(0.0, 255.0).round() as u8).collect()
}

/// Grey image with true positives green, false positives red, false negatives blue, written as
/// `dir/STEM.png` (the input's OS name, so names that are not UTF-8 stay apart).
fn write_overlay(dir: &Path, s: &Sample, pred: &[u8]) -> anyhow::Result<()> {
    let [_, h, w] = s.shape;
    let n = h * w;
    let grey = display_grey(s);
    let mut rgb = Vec::with_capacity(3 * n);
    for ((&p, &t), &g) in pred.iter().zip(&s.mask).zip(&grey).take(n) {
        rgb.extend(match (p > 0, t > 0) {
            (true, true) => [g / 2, 255, g / 2],
            (true, false) => [255, g / 2, g / 2],
            (false, true) => [g / 2, g / 2, 255],
            _ => [g, g, g],
        });
    }
    let bytes = io::encode_png(&rgb, w, h, true)?;
    crate::fsio::write_atomic(&crate::output::named(dir, &s.source, ".png"), &bytes)
}

/// Writes the mask (and optionally the probability maps) for one input, to the paths
/// [`crate::output::prediction_paths`] names; returns them.
pub fn write_prediction(
    out_dir: &Path,
    s: &Sample,
    probs: &[f32],
    classes: usize,
    with_probs: bool,
) -> anyhow::Result<Vec<std::path::PathBuf>> {
    let pred = labels(probs, classes);
    let n = s.voxels();
    let paths = crate::output::prediction_paths(out_dir, &s.source, classes, with_probs);
    let volume = io::is_volume(&s.source);
    let scale = if classes == 1 { 255 } else { 1 };
    for (i, path) in paths.iter().enumerate() {
        match (volume, i) {
            (true, 0) => io::write_nifti(path, &pred, s.shape, &s.source)?,
            (true, _) => io::write_nifti(path, &probs[(i - 1) * n..i * n], s.shape, &s.source)?,
            (false, 0) => io::write_png(path, &pred.iter().map(|&v| v * scale).collect::<Vec<_>>(), s.shape)?,
            (false, _) => {
                let px: Vec<u8> = probs[(i - 1) * n..i * n].iter().map(|p| (p * 255.0).round() as u8).collect();
                io::write_png(path, &px, s.shape)?
            }
        }
    }
    Ok(paths)
}

/// Reads an input without a mask for prediction.
pub fn read_unlabelled(path: &Path, cfg: &DataConfig) -> anyhow::Result<Sample> {
    let (image, shape) = io::read_input(path, cfg)?;
    Ok(Sample {
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
    fn overlays_show_the_image_whatever_the_normalisation() {
        // A zscore-normalised ramp: half of it is negative, which clamping to [0, 1] showed black.
        let image: Vec<f32> = (0..64).map(|i| (i as f32 - 31.5) / 18.5).collect();
        let s = Sample {
            name: "ramp".into(),
            image,
            mask: vec![0; 64],
            channels: 1,
            shape: [1, 8, 8],
            source: "ramp.png".into(),
        };
        let grey = display_grey(&s);
        assert_eq!((grey[0], grey[63]), (0, 255));
        assert!(grey.windows(2).all(|w| w[0] <= w[1]) && grey[16] > 0 && grey[31] > 64, "{grey:?}");
    }

    #[test]
    fn argmax_and_threshold() {
        assert_eq!(labels(&[0.2, 0.6], 1), vec![0, 1]);
        assert_eq!(labels(&[0.7, 0.1, 0.3, 0.9], 2), vec![0, 1]);
    }
}
