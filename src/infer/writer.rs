//! What inference leaves on disk: prediction files (PNG for 2D images, NIfTI for volumes, with
//! the input's geometry), overlays of a prediction on its image, and evaluation's `scores.csv`
//! and `summary.json`. Every file is written atomically.

use std::path::{Path, PathBuf};

use super::{ImageScore, Summary};
use crate::data::Sample;
use crate::data::io;

/// What made an evaluation's predictions, as `summary.json` records it.
pub struct Provenance<'a> {
    /// Every member of the ensemble (one for a single checkpoint).
    pub checkpoints: &'a [PathBuf],
    /// The post-processing decision applied, if any.
    pub postprocess: Option<&'a Path>,
    pub sliding: &'a super::Sliding,
}

/// Writes `scores.csv` (one row per image, [`crate::metrics::scores_csv`], label columns named
/// as `summary.per_class`) and `summary.json` (the summary, per-label means keyed by name, the
/// rows, the checkpoint they came from (`checkpoint`: the first of an ensemble, `checkpoints`:
/// all), the post-processing decision applied and how windows slid (`inference`)) into `out`.
pub fn scores(out: &Path, scores: &[ImageScore], summary: &Summary, made: &Provenance) -> anyhow::Result<()> {
    let Provenance { checkpoints, postprocess, sliding } = made;
    let checkpoint = super::ensemble::first(checkpoints);
    let names: Vec<String> = summary.per_class.iter().map(|(n, _)| n.clone()).collect();
    let rows = scores.iter().map(|s| (s.name.as_str(), s.per_class.as_slice()));
    crate::fsio::write_atomic(&out.join("scores.csv"), crate::metrics::scores_csv(rows, &names).as_bytes())?;
    let classes = crate::infer::by_label::classes_json(summary);
    let inference = serde_json::json!({
        "tile": sliding.tile, "overlap": sliding.overlap, "tta": sliding.tta, "window_batch": sliding.batch
    });
    let json = serde_json::json!({
        "summary": summary, "classes": classes, "images": scores, "checkpoint": checkpoint, "checkpoints": checkpoints,
        "postprocess": postprocess, "inference": inference
    });
    crate::fsio::write_atomic(&out.join("summary.json"), serde_json::to_string_pretty(&json)?.as_bytes())
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
/// `dir/STEM.png` (the input's OS name, so names that are not UTF-8 stay apart). Volumes get
/// three planes through the lesion instead (`report::volume`).
pub fn overlay(dir: &Path, s: &Sample, pred: &[u8]) -> anyhow::Result<()> {
    let [d, h, w] = s.shape;
    if d != 1 {
        return crate::report::volume::write_slices(dir, s, pred, &display_grey(s));
    }
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

/// Writes the labels `pred` (and with `with_probs` the probability maps `probs`, in that format)
/// for one input, to the paths [`crate::output::prediction_paths`] names; returns them.
pub fn prediction(
    out_dir: &Path,
    s: &Sample,
    pred: &[u8],
    probs: &[f32],
    classes: usize,
    with_probs: Option<crate::probabilities::Format>,
) -> anyhow::Result<Vec<PathBuf>> {
    let paths = crate::output::prediction_paths(out_dir, &s.source, classes, with_probs);
    prediction_to(&paths, s, pred, probs, classes)?;
    Ok(paths)
}

/// Writes the labels, then one probability map per further path, to `paths` (an nnU-Net case
/// is written as CASE.nii.gz, not under its first channel file's name).
pub fn prediction_to(paths: &[PathBuf], s: &Sample, pred: &[u8], probs: &[f32], classes: usize) -> anyhow::Result<()> {
    let n = s.voxels();
    let volume = io::is_volume(&s.source);
    let scale = if classes == 1 { 255 } else { 1 };
    for (i, path) in paths.iter().enumerate() {
        match (volume, i) {
            (true, 0) => crate::data::volume::write::prediction(path, pred, s)?,
            (false, 0) => io::write_png(path, &pred.iter().map(|&v| v * scale).collect::<Vec<_>>(), s.shape)?,
            _ if path.to_string_lossy().ends_with(".nii.gz") => {
                crate::data::volume::write::prediction(path, &probs[(i - 1) * n..i * n], s)?
            }
            _ => {
                // A volume's `.npy` is on its file's grid, as its NIfTI is.
                let plane = &probs[(i - 1) * n..i * n];
                let (data, shape) = match &s.geometry {
                    Some(f) => (f.orientation.undo(plane, 1, f.file_shape), f.file_shape),
                    None => (plane.to_vec(), s.shape),
                };
                let bytes = crate::probabilities::encode(path, &data, shape)?;
                crate::fsio::write_atomic(path, &bytes)?
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
            geometry: None,
        };
        let grey = display_grey(&s);
        assert_eq!((grey[0], grey[63]), (0, 255));
        assert!(grey.windows(2).all(|w| w[0] <= w[1]) && grey[16] > 0 && grey[31] > 64, "{grey:?}");
    }

    #[test]
    fn scores_quote_names_and_keep_six_decimals() {
        let dir = tempfile::tempdir().unwrap();
        let row = |name: &str, dice: f64| {
            let l = crate::metrics::LabelScore { label: 1, dice, iou: dice / (2.0 - dice), hd95: 2.0, nsd: 0.5 };
            ImageScore { name: name.into(), iou: l.iou, dice, hd95: 2.0, nsd: 0.5, per_class: vec![l] }
        };
        let rows = [row("a", 0.5), row("say \"b\", c", 1.0)];
        let summary = Summary {
            mode: "accurate".into(),
            images: 2,
            mean_dice: 0.75,
            std_dice: 0.25,
            mean_iou: 2.0 / 3.0,
            std_iou: 1.0 / 3.0,
            seconds: 1.0,
            per_class: vec![],
            surface: None,
        };
        let cks = [PathBuf::from("m.unetpp"), PathBuf::from("n.unetpp")];
        let sliding = crate::infer::Sliding { tta: true, ..crate::infer::Sliding::new([1, 64, 64]) };
        let made =
            Provenance { checkpoints: &cks, postprocess: Some(Path::new("m.postprocess.json")), sliding: &sliding };
        scores(dir.path(), &rows, &summary, &made).unwrap();
        let csv = std::fs::read_to_string(dir.path().join("scores.csv")).unwrap();
        assert_eq!(
            csv,
            "image,dice,iou,hd95,nsd\n\"a\",0.500000,0.333333,2.000000,0.500000\n\
             \"say \"\"b\"\", c\",1.000000,1.000000,2.000000,0.500000\n"
        );
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("summary.json")).unwrap()).unwrap();
        assert_eq!((json["summary"]["images"].as_u64(), json["checkpoint"].as_str()), (Some(2), Some("m.unetpp")));
        assert_eq!(json["checkpoints"][1].as_str(), Some("n.unetpp"));
        assert_eq!(json["postprocess"].as_str(), Some("m.postprocess.json"));
        let inference = serde_json::json!({"tile": [1, 64, 64], "overlap": 0.5, "tta": true, "window_batch": null});
        assert_eq!(json["inference"], inference);
        assert_eq!(json["images"][1]["name"].as_str(), Some("say \"b\", c"));
    }
}
