//! IoU and Dice on hard predictions. An empty prediction on an empty mask scores 1.

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
    fn mean_and_std() {
        let (m, s) = mean_std(&[1.0, 3.0]);
        assert_eq!((m, s), (2.0, 1.0));
    }
}
