//! Evaluation reports by label: `scores.csv` with a Dice and an IoU column per class, and the
//! per-class means for `summary.json` and the printed summary, named from the data set's
//! `dataset.json` labels (nnU-Net layout) or `class1..` otherwise.

use std::fmt::Write as _;

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

/// Mean overlap per class over the images, in label order.
pub fn class_means(scores: &[ImageScore], names: &[String]) -> Vec<(String, Overlap)> {
    let n = scores.len().max(1) as f64;
    names
        .iter()
        .enumerate()
        .map(|(c, name)| {
            let (dice, iou) =
                scores.iter().fold((0.0, 0.0), |(d, i), s| (d + s.per_class[c].dice, i + s.per_class[c].iou));
            (name.clone(), Overlap { dice: dice / n, iou: iou / n })
        })
        .collect()
}

fn quoted(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// One row per image: its name, mean Dice and IoU, then `dice_NAME,iou_NAME` per class.
pub fn scores_csv(scores: &[ImageScore], names: &[String]) -> String {
    let mut csv = String::from("image,dice,iou");
    // Label names are free text: quoted only where CSV needs it, so plain names read as written.
    let field = |s: String| if s.contains([',', '"', '\n', '\r']) { quoted(&s) } else { s };
    for n in names {
        write!(csv, ",{},{}", field(format!("dice_{n}")), field(format!("iou_{n}"))).unwrap();
    }
    csv.push('\n');
    for s in scores {
        write!(csv, "{},{:.6},{:.6}", quoted(&s.name), s.dice, s.iou).unwrap();
        for o in s.per_class.iter().take(names.len()) {
            write!(csv, ",{:.6},{:.6}", o.dice, o.iou).unwrap();
        }
        csv.push('\n');
    }
    csv
}

/// `{"liver": {"dice": .., "iou": ..}, ...}` for summary.json.
pub fn classes_json(summary: &Summary) -> serde_json::Value {
    summary.per_class.iter().map(|(n, o)| (n.clone(), serde_json::json!({ "dice": o.dice, "iou": o.iou }))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_named_by_label_and_quoted_only_when_needed() {
        let o = |d: f64| Overlap { dice: d, iou: d / 2.0 };
        let score =
            |name: &str, a, b| ImageScore { name: name.into(), dice: 0.5, iou: 0.25, per_class: vec![o(a), o(b)] };
        let names = vec!["right lung".to_string(), "a,b".to_string()];
        let csv = scores_csv(&[score("x", 1.0, 0.0), score("y", 0.5, 1.0)], &names);
        let mut lines = csv.lines();
        assert_eq!(lines.next(), Some("image,dice,iou,dice_right lung,iou_right lung,\"dice_a,b\",\"iou_a,b\""));
        assert_eq!(lines.next(), Some("\"x\",0.500000,0.250000,1.000000,0.500000,0.000000,0.000000"));
        let means = class_means(&[score("x", 1.0, 0.0), score("y", 0.5, 1.0)], &names);
        assert_eq!(means, vec![("right lung".to_string(), o(0.75)), ("a,b".to_string(), o(0.5))]);
    }
}
