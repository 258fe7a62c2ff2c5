//! Scores of hard predictions against ground truth, per label: Dice, IoU, the 95th-percentile
//! Hausdorff distance and the normalised surface Dice (NSD) in physical units ([`distance`]).
//!
//! A label absent from both the reference and the prediction scores 1 (Dice, IoU, NSD) and
//! HD95 0 by default ([`Empty::One`]), or NaN, left out of every mean, as nnU-Net does
//! ([`Empty::Nan`]). A label present on one side only scores Dice, IoU and NSD 0 and HD95 the
//! image's diagonal (the largest distance inside it), where MONAI would give NaN or infinity.

pub mod distance;
pub mod edt;

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Overlap {
    pub iou: f64,
    pub dice: f64,
}

/// Overlap of two binary masks.
pub fn binary(pred: &[bool], truth: &[bool]) -> Overlap {
    assert_eq!(pred.len(), truth.len());
    let (mut inter, mut p, mut t) = (0usize, 0usize, 0usize);
    for (&a, &b) in pred.iter().zip(truth) {
        inter += (a && b) as usize;
        p += a as usize;
        t += b as usize;
    }
    if p + t == 0 {
        return Overlap { iou: 1.0, dice: 1.0 };
    }
    let union = p + t - inter;
    Overlap { iou: inter as f64 / union as f64, dice: 2.0 * inter as f64 / (p + t) as f64 }
}

/// Per-class overlap of label maps for classes 1..classes (background excluded), and their mean.
pub fn per_class(pred: &[u8], truth: &[u8], classes: usize) -> (Vec<Overlap>, Overlap) {
    let per: Vec<Overlap> = (1..classes.max(2))
        .map(|c| {
            let c = c as u8;
            let p: Vec<bool> = pred.iter().map(|&v| v == c).collect();
            let t: Vec<bool> = truth.iter().map(|&v| v == c).collect();
            binary(&p, &t)
        })
        .collect();
    let n = per.len() as f64;
    let mean =
        Overlap { iou: per.iter().map(|o| o.iou).sum::<f64>() / n, dice: per.iter().map(|o| o.dice).sum::<f64>() / n };
    (per, mean)
}

/// What a label empty in both the reference and the prediction scores.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Empty {
    /// Dice, IoU and NSD 1, HD95 0.
    #[default]
    One,
    /// Every score NaN and left out of the means (nnU-Net).
    Nan,
}

impl Empty {
    pub const VALUES: &[Empty] = &[Empty::One, Empty::Nan];

    pub fn name(self) -> &'static str {
        match self {
            Empty::One => "one",
            Empty::Nan => "nan",
        }
    }
}

crate::names::by_name!(Empty, "--empty");

/// How `eval` scores: the NSD tolerance (mm, or pixels for 2D images) and the empty convention.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub nsd_tolerance: f64,
    pub empty: Empty,
}

impl Default for Settings {
    fn default() -> Self {
        Settings { nsd_tolerance: 1.0, empty: Empty::One }
    }
}

impl Settings {
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.nsd_tolerance.is_finite() && self.nsd_tolerance >= 0.0,
            "--nsd-tolerance {}: must be a finite distance >= 0 (mm for volumes, pixels for 2D images)",
            self.nsd_tolerance
        );
        Ok(())
    }
}

/// One label's scores in one case.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct LabelScore {
    pub label: u8,
    pub dice: f64,
    pub iou: f64,
    pub hd95: f64,
    pub nsd: f64,
}

/// Scores of label `label` given its masks; `spacing` is `[z, y, x]` and a grid of one slice is a
/// 2D image.
pub fn score_label(
    label: u8,
    pred: &[bool],
    truth: &[bool],
    shape: [usize; 3],
    spacing: [f64; 3],
    settings: &Settings,
) -> LabelScore {
    let o = binary(pred, truth);
    let (p, t) = (pred.iter().any(|&v| v), truth.iter().any(|&v| v));
    let (hd95, nsd) = match (p, t) {
        (false, false) => return empty_score(label, settings.empty),
        (true, true) => {
            let d = distance::surface_distances(pred, truth, shape, spacing, shape[0] == 1);
            (d.hd95(), d.nsd(settings.nsd_tolerance))
        }
        _ => ((0..3).map(|k| ((shape[k] - 1) as f64 * spacing[k]).powi(2)).sum::<f64>().sqrt(), 0.0),
    };
    LabelScore { label, dice: o.dice, iou: o.iou, hd95, nsd }
}

fn empty_score(label: u8, empty: Empty) -> LabelScore {
    match empty {
        Empty::One => LabelScore { label, dice: 1.0, iou: 1.0, hd95: 0.0, nsd: 1.0 },
        Empty::Nan => LabelScore { label, dice: f64::NAN, iou: f64::NAN, hd95: f64::NAN, nsd: f64::NAN },
    }
}

/// Scores of every foreground label of label maps: `pred > 0` against `truth > 0` when
/// `classes == 1`, else each class 1..classes.
pub fn score_labels(
    pred: &[u8],
    truth: &[u8],
    shape: [usize; 3],
    spacing: [f64; 3],
    classes: usize,
    settings: &Settings,
) -> Vec<LabelScore> {
    assert_eq!(pred.len(), truth.len());
    let labels: Vec<u8> = if classes == 1 { vec![1] } else { (1..classes as u8).collect() };
    labels
        .into_iter()
        .map(|c| {
            let is = |v: u8| if classes == 1 { v > 0 } else { v == c };
            let p: Vec<bool> = pred.iter().map(|&v| is(v)).collect();
            let t: Vec<bool> = truth.iter().map(|&v| is(v)).collect();
            score_label(c, &p, &t, shape, spacing, settings)
        })
        .collect()
}

/// The voxel spacing `[z, y, x]` of a sample's (LPS-aligned) array in mm; 1 (pixels) for 2D
/// images and for arrays on no file's grid.
pub fn voxel_spacing(s: &crate::data::Sample) -> [f64; 3] {
    s.geometry.as_ref().map_or([1.0; 3], |f| {
        let g = f.geometry().spacing;
        [g[2], g[1], g[0]]
    })
}

/// One label's means over the cases where it is defined (not NaN).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LabelSummary {
    pub label: u8,
    /// The data set's name for the label (`dataset.json`), where it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Cases whose Dice is defined for this label.
    pub cases: usize,
    pub mean_dice: f64,
    pub mean_iou: f64,
    pub mean_hd95: f64,
    pub mean_nsd: f64,
}

/// The surface scores of an evaluation: per-case HD95 and NSD (each case's mean over its labels)
/// averaged over cases, each label's means, and the settings they were computed with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SurfaceSummary {
    pub nsd_tolerance: f64,
    pub empty: Empty,
    pub mean_hd95: f64,
    pub std_hd95: f64,
    pub mean_nsd: f64,
    pub std_nsd: f64,
    pub per_label: Vec<LabelSummary>,
}

/// The mean of each score over a case's labels, NaN left out: (Dice, IoU, HD95, NSD).
pub fn case_means(labels: &[LabelScore]) -> [f64; 4] {
    let m = |f: fn(&LabelScore) -> f64| nan_mean_std(&labels.iter().map(f).collect::<Vec<_>>()).0;
    [m(|l| l.dice), m(|l| l.iou), m(|l| l.hd95), m(|l| l.nsd)]
}

/// Summarises cases scored by [`score_labels`] with `settings`.
pub fn summarize(cases: &[&[LabelScore]], settings: &Settings) -> SurfaceSummary {
    let means: Vec<[f64; 4]> = cases.iter().map(|c| case_means(c)).collect();
    let (mean_hd95, std_hd95) = nan_mean_std(&means.iter().map(|m| m[2]).collect::<Vec<_>>());
    let (mean_nsd, std_nsd) = nan_mean_std(&means.iter().map(|m| m[3]).collect::<Vec<_>>());
    let labels = cases.first().map_or(0, |c| c.len());
    let per_label = (0..labels)
        .map(|i| {
            let col = |f: fn(&LabelScore) -> f64| cases.iter().map(|c| f(&c[i])).collect::<Vec<_>>();
            let dice = col(|l| l.dice);
            LabelSummary {
                label: cases[0][i].label,
                name: None,
                cases: dice.iter().filter(|d| !d.is_nan()).count(),
                mean_dice: nan_mean_std(&dice).0,
                mean_iou: nan_mean_std(&col(|l| l.iou)).0,
                mean_hd95: nan_mean_std(&col(|l| l.hd95)).0,
                mean_nsd: nan_mean_std(&col(|l| l.nsd)).0,
            }
        })
        .collect();
    SurfaceSummary {
        nsd_tolerance: settings.nsd_tolerance,
        empty: settings.empty,
        mean_hd95,
        std_hd95,
        mean_nsd,
        std_nsd,
        per_label,
    }
}

/// `scores.csv`: `image,dice,iou,hd95,nsd` (each case's mean over its labels), then per label
/// of a multi-class model `dice_NAME,iou_NAME,hd95_NAME,nsd_NAME` (`names`: the labels but
/// background, empty for a binary model). Undefined scores are written `NaN`.
pub fn scores_csv<'a>(rows: impl IntoIterator<Item = (&'a str, &'a [LabelScore])>, names: &[String]) -> String {
    use std::fmt::Write as _;
    let quoted = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
    // Label names are free text: quoted only where CSV needs it, so plain names read as written.
    let field = |s: String| if s.contains([',', '"', '\n', '\r']) { quoted(&s) } else { s };
    let mut csv = String::from("image,dice,iou,hd95,nsd");
    for n in names {
        for m in ["dice", "iou", "hd95", "nsd"] {
            let _ = write!(csv, ",{}", field(format!("{m}_{n}")));
        }
    }
    csv.push('\n');
    for (name, labels) in rows {
        let [dice, iou, hd95, nsd] = case_means(labels);
        let _ = write!(csv, "{},{dice:.6},{iou:.6},{hd95:.6},{nsd:.6}", quoted(name));
        for l in labels.iter().take(names.len()) {
            let _ = write!(csv, ",{:.6},{:.6},{:.6},{:.6}", l.dice, l.iou, l.hd95, l.nsd);
        }
        csv.push('\n');
    }
    csv
}

/// The printed lines of a [`SurfaceSummary`]: HD95 and NSD means, then each label's means when
/// there are several.
pub fn describe(s: &SurfaceSummary) -> String {
    let mut out = format!(
        "mean HD95 {:.3} ± {:.3}, mean NSD@{} {:.4} ± {:.4} (mm for volumes, pixels for 2D; empty labels: {:?})",
        s.mean_hd95, s.std_hd95, s.nsd_tolerance, s.mean_nsd, s.std_nsd, s.empty
    );
    for l in s.per_label.iter().filter(|_| s.per_label.len() > 1) {
        let who = l.name.as_ref().map_or(format!("label {}", l.label), |n| format!("{n} (label {})", l.label));
        out += &format!(
            "\n  {who}: Dice {:.4}, IoU {:.4}, HD95 {:.3}, NSD {:.4} ({} cases)",
            l.mean_dice, l.mean_iou, l.mean_hd95, l.mean_nsd, l.cases
        );
    }
    out
}

/// [`mean_std`] of the values that are not NaN (NaN when none is).
pub fn nan_mean_std(v: &[f64]) -> (f64, f64) {
    mean_std(&v.iter().copied().filter(|x| !x.is_nan()).collect::<Vec<_>>())
}

/// Mean and (population) standard deviation.
pub fn mean_std(v: &[f64]) -> (f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let m = v.iter().sum::<f64>() / v.len() as f64;
    let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / v.len() as f64;
    (m, var.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_computed_overlap() {
        // pred {0,1,2}, truth {1,2,3}: inter 2, union 4.
        let p = [true, true, true, false];
        let t = [false, true, true, true];
        let o = binary(&p, &t);
        assert_eq!(o.iou, 0.5);
        assert!((o.dice - 4.0 / 6.0).abs() < 1e-12);
    }

    #[test]
    fn empty_on_empty_is_perfect_and_empty_on_full_is_zero() {
        assert_eq!(binary(&[false; 3], &[false; 3]), Overlap { iou: 1.0, dice: 1.0 });
        assert_eq!(binary(&[false; 3], &[true; 3]), Overlap { iou: 0.0, dice: 0.0 });
    }

    #[test]
    fn per_class_excludes_background() {
        let pred = [0, 1, 1, 2];
        let truth = [0, 1, 2, 2];
        let (per, mean) = per_class(&pred, &truth, 3);
        assert_eq!(per[0].iou, 0.5);
        assert_eq!(per[1].iou, 0.5);
        assert_eq!(mean.iou, 0.5);
    }

    #[test]
    fn csv_has_the_case_means_first_then_each_label() {
        let nan = Settings { empty: Empty::Nan, ..Default::default() };
        // Label 1 predicted exactly; label 2 absent on both sides (NaN, left out of the mean).
        let l = score_labels(&[1, 1, 0, 0], &[1, 1, 0, 0], [1, 2, 2], [1.0; 3], 3, &nan);
        let names = ["1".to_string(), "a,b".to_string()];
        let csv = scores_csv([("a \"b\"", l.as_slice())], &names);
        assert_eq!(
            csv,
            "image,dice,iou,hd95,nsd,dice_1,iou_1,hd95_1,nsd_1,\"dice_a,b\",\"iou_a,b\",\"hd95_a,b\",\"nsd_a,b\"\n\
             \"a \"\"b\"\"\",1.000000,1.000000,0.000000,1.000000,1.000000,1.000000,0.000000,1.000000,NaN,NaN,NaN,NaN\n"
        );
        let binary = score_labels(&[1, 0], &[1, 1], [1, 1, 2], [1.0; 3], 1, &nan);
        assert!(
            scores_csv([("x", binary.as_slice())], &[])
                .starts_with("image,dice,iou,hd95,nsd\n\"x\",0.666667,0.500000,")
        );
    }

    #[test]
    fn mean_and_std() {
        let (m, s) = mean_std(&[1.0, 3.0]);
        assert_eq!((m, s), (2.0, 1.0));
    }
}
