//! The cross-validation score of a `train --folds` run and the post-processing decided on it, as
//! nnU-Net's `find_best_configuration` / `determine_postprocessing` do: each fold's best
//! checkpoint predicts its own validation cases (whole images, as `eval`), so every case is
//! predicted once by the one model that did not train on it. The predictions go to
//! `RUN/crossval/predictions/` (`CASE.png`, or `CASE.nii.gz` for volumes); their scores, all cases
//! together, are `RUN/crossval/scores.csv` and `summary.json`. Then [`crate::postprocess::decide`]
//! picks, on those predictions against their labels, whether keeping the largest component
//! raises the Dice; the decision goes to `RUN/postprocess.json` and beside every fold's best
//! checkpoint (`best.postprocess.json`), where `predict` and `eval` apply it.

use std::path::{Path, PathBuf};

use anyhow::{Context, ensure};

use crate::app::InferOptions;
use crate::checkpoint;
use crate::data::{Sample, io};
use crate::infer::{self, ImageScore, Scoring, Summary, by_label, writer};
use crate::metrics;
use crate::postprocess::{self, Case, Connectivity, Decision};
use crate::train::folds;

pub const DIR: &str = "crossval";
pub const DECISION: &str = "postprocess.json";

/// What [`run`] computed.
pub struct CrossVal {
    /// All cases together, as predicted.
    pub summary: Summary,
    /// The same cases after the decided post-processing.
    pub postprocessed: Summary,
    pub decision: Decision,
    /// The folds' best checkpoints, in fold order.
    pub checkpoints: Vec<PathBuf>,
}

/// A case's prediction kept for the post-processing decision, with its voxel spacing.
struct Predicted {
    case: Case,
    spacing: [f64; 3],
}

/// Cross-validates the run in `run` on its data (or on `data`, the same cases elsewhere).
pub fn run(
    run: &Path,
    data: Option<&Path>,
    opts: &InferOptions,
    connectivity: Option<Connectivity>,
    skip_bad: bool,
) -> anyhow::Result<CrossVal> {
    let splits = folds::read_splits(run)?;
    let checkpoints = folds::checkpoints(run)?;
    let (cfg, _) = folds::config(run)?;
    let data = data.map(Path::to_path_buf).unwrap_or(cfg.data);
    let meta = checkpoint::read_meta(&checkpoints[0])?;
    for ck in &checkpoints[1..] {
        let m = checkpoint::read_meta(ck)?;
        ensure!(
            m.model == meta.model && m.data == meta.data,
            "{} and {} hold different models or input settings; a cross-validation's folds share one configuration",
            checkpoints[0].display(),
            ck.display()
        );
    }
    meta.model.validate().with_context(|| format!("checkpoint {}", checkpoints[0].display()))?;
    opts.validate(&meta.model)?;
    folds::check_splits(&splits, &folds::case_names(&data)?, &run.join(folds::SPLITS))?;
    let out = run.join(DIR);
    crate::output::check_eval_out(&data, &out)?;
    let mut all = folds::load_cases(&data, &meta.data, skip_bad)?;
    let predictions = out.join("predictions");
    std::fs::create_dir_all(&predictions).with_context(|| format!("cannot create {}", predictions.display()))?;
    let mut scores: Vec<(usize, ImageScore)> = vec![];
    let mut predicted = vec![];
    let start = std::time::Instant::now();
    for (i, (split, ck)) in splits.iter().zip(&checkpoints).enumerate() {
        let what = format!("fold {i} of {}", run.display());
        let samples = folds::take(&mut all, &split.val, skip_bad, &what, |s| &s.name)?;
        eprintln!("fold {i}: {} validation case(s) with {}", samples.len(), ck.display());
        let s = crate::for_rank!(meta.model.dims, predict_fold(ck, &samples, opts, &predictions, &mut predicted))?;
        scores.extend(s.into_iter().map(|s| (i, s)));
    }
    let seconds = start.elapsed().as_secs_f64();
    let classes = meta.model.classes;
    let names = by_label::class_names(&meta.data);
    let settings = opts.metrics();
    let only: Vec<ImageScore> = scores.iter().map(|(_, s)| s.clone()).collect();
    let summary = summarize(&only, &opts.mode().to_string(), seconds, &settings, &names);
    // By name, as `unetpp postprocess` reads them from the predictions folder.
    predicted.sort_by(|a, b| a.case.name.cmp(&b.case.name));
    let (cases, spacings): (Vec<Case>, Vec<[f64; 3]>) = predicted.into_iter().map(|p| (p.case, p.spacing)).unzip();
    let decision = save_decision(run, &cases, classes, connectivity.unwrap_or_default(), &checkpoints)?;
    let after: Vec<ImageScore> = cases
        .iter()
        .zip(spacings)
        .map(|(c, spacing)| {
            let mut pred = c.pred.clone();
            decision.apply(&mut pred, c.shape);
            score(&c.name, &pred, &c.truth, c.shape, spacing, classes, &settings)
        })
        .collect();
    let postprocessed = summarize(&after, &opts.mode().to_string(), seconds, &settings, &names);
    write_scores(run, &out, &scores, &summary, &postprocessed, &splits, &checkpoints)?;
    Ok(CrossVal { summary, postprocessed, decision, checkpoints })
}

/// One fold's checkpoint on its validation samples: writes each prediction into `dir` and keeps
/// it in `kept` for the post-processing decision; returns the scores.
fn predict_fold<const D: usize>(
    ck: &Path,
    samples: &[Sample],
    opts: &InferOptions,
    dir: &Path,
    kept: &mut Vec<Predicted>,
) -> anyhow::Result<Vec<ImageScore>> {
    let device = opts.backend.device();
    let (model, meta) = checkpoint::load::<D>(ck, &device)?;
    let model = model.fold_batchnorm();
    let classes = meta.model.classes;
    let scoring = Scoring { metrics: opts.metrics(), postprocess: None, spacing: meta.data.spacing };
    let each = |s: &Sample, pred: &[u8]| {
        let ending = if io::is_volume(&s.source) { ".nii.gz" } else { ".png" };
        writer::prediction_to(&[dir.join(format!("{}{ending}", s.name))], s, pred, &[], classes)?;
        let case = Case { name: s.name.clone(), pred: pred.to_vec(), truth: s.mask.clone(), shape: s.shape };
        kept.push(Predicted { case, spacing: metrics::voxel_spacing(s) });
        Ok(())
    };
    let tile = opts.tile(&meta.model);
    let models = std::slice::from_ref(&model);
    Ok(infer::evaluate(models, samples, &[opts.mode()], &infer::Sliding::new(tile), &device, each, &scoring)?
        .remove(0)
        .0)
}

/// A case's scores, as `eval` takes them.
fn score(
    name: &str,
    pred: &[u8],
    truth: &[u8],
    shape: [usize; 3],
    spacing: [f64; 3],
    classes: usize,
    settings: &metrics::Settings,
) -> ImageScore {
    let per_class = metrics::score_labels(pred, truth, shape, spacing, classes, settings);
    let [dice, iou, hd95, nsd] = metrics::case_means(&per_class);
    ImageScore { name: name.to_string(), iou, dice, hd95, nsd, per_class }
}

/// The summary `eval` gives for these scores.
fn summarize(
    scores: &[ImageScore],
    mode: &str,
    seconds: f64,
    settings: &metrics::Settings,
    names: &[String],
) -> Summary {
    Summary { per_class: by_label::class_means(scores, names), ..Summary::of(scores, mode, seconds, settings) }
}

/// nnU-Net's post-processing decided on the cross-validation predictions `cases`, written to
/// `RUN/postprocess.json` and beside each of `checkpoints`.
pub fn save_decision(
    run: &Path,
    cases: &[Case],
    classes: usize,
    connectivity: Connectivity,
    checkpoints: &[PathBuf],
) -> anyhow::Result<Decision> {
    let decision = postprocess::decide(cases, classes, connectivity);
    let bytes = serde_json::to_string_pretty(&decision)?;
    crate::fsio::write_atomic(&run.join(DECISION), bytes.as_bytes())?;
    for ck in checkpoints {
        crate::fsio::write_atomic(&postprocess::beside(ck), bytes.as_bytes())?;
    }
    Ok(decision)
}

/// `scores.csv` (one row per case) and `summary.json`: the summary before and after
/// post-processing, per-label means, each case's scores with the fold that validated it, and each
/// fold's checkpoint and validation cases.
fn write_scores(
    run: &Path,
    out: &Path,
    scores: &[(usize, ImageScore)],
    summary: &Summary,
    postprocessed: &Summary,
    splits: &[folds::Split],
    checkpoints: &[PathBuf],
) -> anyhow::Result<()> {
    let names: Vec<String> = summary.per_class.iter().map(|(n, _)| n.clone()).collect();
    let rows = scores.iter().map(|(_, s)| (s.name.as_str(), s.per_class.as_slice()));
    crate::fsio::write_atomic(&out.join("scores.csv"), metrics::scores_csv(rows, &names).as_bytes())?;
    let images = scores
        .iter()
        .map(|(fold, s)| {
            let mut v = serde_json::to_value(s)?;
            v["fold"] = (*fold).into();
            Ok(v)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let folds: Vec<serde_json::Value> = splits
        .iter()
        .zip(checkpoints)
        .enumerate()
        .map(|(i, (s, ck))| serde_json::json!({ "fold": i, "checkpoint": ck, "val": s.val }))
        .collect();
    let json = serde_json::json!({
        "summary": summary,
        "classes": by_label::classes_json(summary),
        "postprocessed": { "summary": postprocessed, "classes": by_label::classes_json(postprocessed) },
        "postprocess": run.join(DECISION),
        "images": images,
        "folds": folds,
    });
    crate::fsio::write_atomic(&out.join("summary.json"), serde_json::to_string_pretty(&json)?.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 16x16 case: the object as a square at (y, x) of side `side`, the prediction finding it
    /// and adding a `blob` (2x2 pixels far away) where `spurious`.
    fn case(name: &str, y: usize, x: usize, side: usize, spurious: bool, split: bool) -> Case {
        let mut truth = vec![0u8; 256];
        for yy in y..y + side {
            for xx in x..x + side {
                truth[yy * 16 + xx] = 1;
            }
        }
        if split {
            // A second true part far from the first, which the prediction also finds.
            truth[15 * 16 + 15] = 1;
            truth[15 * 16 + 14] = 1;
        }
        let mut pred = truth.clone();
        if spurious {
            pred[15 * 16] = 1;
            pred[14 * 16] = 1;
        }
        Case { name: name.into(), pred, truth, shape: [1, 16, 16] }
    }

    #[test]
    fn the_decision_is_saved_for_the_run_and_beside_every_fold_checkpoint() {
        let tmp = tempfile::tempdir().unwrap();
        let cks: Vec<PathBuf> = (0..3).map(|i| tmp.path().join(format!("fold_{i}/checkpoints/best.unetpp"))).collect();
        cks.iter().for_each(|c| std::fs::create_dir_all(c.parent().unwrap()).unwrap());
        // Helps: every case has a spurious blob and one true object.
        let helps = [case("a", 2, 2, 5, true, false), case("b", 4, 6, 4, true, false)];
        let d = save_decision(tmp.path(), &helps, 1, Connectivity::Full, &cks).unwrap();
        assert!(d.keep_largest_foreground && d.dice_after.foreground_mean > d.dice_before.foreground_mean, "{d:?}");
        let saved = std::fs::read(tmp.path().join(DECISION)).unwrap();
        for ck in &cks {
            assert_eq!(std::fs::read(postprocess::beside(ck)).unwrap(), saved);
            let beside = Decision::load_beside(ck, 1).unwrap().unwrap();
            assert!(beside.keep_largest_foreground && beside.cases == 2, "{beside:?}");
        }
        // Hurts: the objects are truly in two parts, and removing the smaller loses true voxels.
        let hurts = [case("a", 2, 2, 5, false, true), case("b", 4, 6, 4, true, true)];
        let d = save_decision(tmp.path(), &hurts, 1, Connectivity::Full, &cks).unwrap();
        assert!(!d.keep_largest_foreground && d.is_noop(), "{d:?}");
        for ck in &cks {
            let beside = Decision::load_beside(ck, 1).unwrap().unwrap();
            assert!(beside.is_noop(), "not replaced beside {}", ck.display());
        }
    }
}
