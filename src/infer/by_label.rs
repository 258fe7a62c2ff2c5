//! Evaluation reports by label: `scores.csv` with a Dice and an IoU column per class, and the
//! per-class means for `summary.json` and the printed summary, named from the data set's
//! `dataset.json` labels (nnU-Net layout) or `class1..` otherwise.

use crate::data::DataConfig;
use crate::infer::{ImageScore, Summary};
use crate::metrics::Overlap;

/// Names of the scored classes (background excluded); empty for a binary model, which has one.
pub fn class_names(cfg: &DataConfig) -> Vec<String> {
    if cfg.classes < 2 {
        return vec![];
    }
    match &cfg.nnunet {
        Some(n) if n.labels.len() == cfg.classes => n.labels[1..].to_vec(),
        _ => (1..cfg.classes).map(|c| format!("class{c}")).collect(),
    }
}

/// Mean overlap per class over the images where it is defined (`--empty nan` leaves a label
/// absent on both sides undefined), in label order.
pub fn class_means(scores: &[ImageScore], names: &[String]) -> Vec<(String, Overlap)> {
    let mean =
        |f: &dyn Fn(&ImageScore) -> f64| crate::metrics::nan_mean_std(&scores.iter().map(f).collect::<Vec<_>>()).0;
    names
        .iter()
        .enumerate()
        .map(|(c, name)| {
            (name.clone(), Overlap { dice: mean(&|s| s.per_class[c].dice), iou: mean(&|s| s.per_class[c].iou) })
        })
        .collect()
}

/// `summary` with its per-class means and its surface scores' labels named by `names`.
pub fn named(scores: &[ImageScore], summary: Summary, names: &[String]) -> Summary {
    let mut surface = summary.surface;
    for (l, n) in surface.iter_mut().flat_map(|s| s.per_label.iter_mut()).zip(names) {
        l.name = Some(n.clone());
    }
    Summary { per_class: class_means(scores, names), surface, ..summary }
}

/// `{"liver": {"label": 1, "dice": .., "iou": .., "hd95": .., "nsd": ..}, ...}` for summary.json:
/// every score of a label under its name (HD95 and NSD where surface scores were taken).
pub fn classes_json(summary: &Summary) -> serde_json::Value {
    let surface = summary.surface.as_ref().map_or(&[][..], |s| &s.per_label[..]);
    let each = summary.per_class.iter().enumerate();
    each.map(|(i, (n, o))| {
        let mut v = serde_json::json!({ "dice": o.dice, "iou": o.iou });
        if let Some(l) = surface.get(i) {
            v["label"] = l.label.into();
            v["hd95"] = l.mean_hd95.into();
            v["nsd"] = l.mean_nsd.into();
        }
        (n.clone(), v)
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_means_are_named_by_label_and_leave_undefined_cases_out() {
        let l = |label: u8, d: f64| crate::metrics::LabelScore { label, dice: d, iou: d / 2.0, hd95: 0.0, nsd: 1.0 };
        let score = |a, b| ImageScore {
            name: "x".into(),
            dice: 0.5,
            iou: 0.25,
            hd95: 0.0,
            nsd: 1.0,
            per_class: vec![l(1, a), l(2, b)],
        };
        let names = vec!["right lung".to_string(), "a,b".to_string()];
        let means = class_means(&[score(1.0, f64::NAN), score(0.5, 1.0)], &names);
        let o = |d: f64| Overlap { dice: d, iou: d / 2.0 };
        assert_eq!(means, vec![("right lung".to_string(), o(0.75)), ("a,b".to_string(), o(1.0))]);
    }
}
