//! The per-head losses, from logits (no activation lives in the model), averaged over the
//! deep-supervision heads. `paper` is eq. 2: 0.5 * BCE - soft Dice (smooth 1, per image, averaged
//! over the batch); multi-class: 0.5 * softmax cross-entropy minus the mean over classes of the
//! soft Dice. `nnunet` is nnU-Net's `DC_and_CE_loss` with its defaults: cross-entropy minus the
//! soft Dice of the foreground classes only (background left out), each class's Dice summed over
//! the whole batch (`batch_dice`), smooth 1e-5. Over the batch, a patch without foreground does
//! not score a Dice of its own, which per image pushes every voxel of it towards background.

use burn::prelude::*;
use burn::tensor::activation::{log_softmax, sigmoid, softmax};
use serde::{Deserialize, Serialize};

const SMOOTH: f64 = 1.0;
const NNUNET_SMOOTH: f64 = 1e-5;

/// Which loss training minimises (`--loss`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    #[default]
    Paper,
    Nnunet,
}

impl Objective {
    pub const VALUES: &[Objective] = &[Objective::Paper, Objective::Nnunet];

    pub fn name(self) -> &'static str {
        match self {
            Objective::Paper => "paper",
            Objective::Nnunet => "nnunet",
        }
    }
}

crate::names::by_name!(Objective, "--loss");

/// Per-voxel cross-entropy [N, 1, V], probabilities and targets [N, C, V].
fn parts<const D: usize>(logits: Tensor<D>, target: Tensor<D>) -> (Tensor<3>, Tensor<3>, Tensor<3>) {
    let [n, c, ..] = logits.dims()[..] else { unreachable!() };
    let flat = |t: Tensor<D>| -> Tensor<3> { t.reshape([n as i32, c as i32, -1]) };
    let (z, y) = (flat(logits), flat(target));
    if c == 1 {
        // max(z, 0) - z*y + log(1 + e^-|z|): exact BCE of sigmoid(z) without overflow.
        let ce = z.clone().clamp_min(0.0) - z.clone() * y.clone() + z.clone().abs().neg().exp().log1p();
        (ce, sigmoid(z), y)
    } else {
        let ce = (log_softmax(z.clone(), 1) * y.clone()).sum_dim(1).neg();
        (ce, softmax(z, 1), y)
    }
}

/// The paper's per-image loss, shape [N]. `target` is {0,1} for binary (1 channel) or one-hot [N, C, ...].
pub fn per_image<const D: usize>(logits: Tensor<D>, target: Tensor<D>) -> Tensor<1> {
    let n = logits.dims()[0];
    let (ce, p, y) = parts(logits, target);
    let ce = ce.mean_dim(2).mean_dim(1).reshape([n]);
    let inter = (p.clone() * y.clone()).sum_dim(2);
    let dice = (inter.mul_scalar(2.0).add_scalar(SMOOTH)) / (y.sum_dim(2) + p.sum_dim(2)).add_scalar(SMOOTH);
    let dice = dice.mean_dim(1).reshape([n]);
    ce.mul_scalar(0.5) - dice
}

/// nnU-Net's loss of one head over the batch, shape [1].
pub fn nnunet<const D: usize>(logits: Tensor<D>, target: Tensor<D>) -> Tensor<1> {
    let c = logits.dims()[1];
    let (ce, p, y) = parts(logits, target);
    // One sigmoid channel is the foreground; with softmax, channel 0 is the background.
    let (p, y) = if c == 1 { (p, y) } else { (p.narrow(1, 1, c - 1), y.narrow(1, 1, c - 1)) };
    let sum = |t: Tensor<3>| t.sum_dim(2).sum_dim(0);
    let inter = sum(p.clone() * y.clone());
    let dice = inter.mul_scalar(2.0).add_scalar(NNUNET_SMOOTH) / (sum(y) + sum(p)).add_scalar(NNUNET_SMOOTH);
    ce.mean() - dice.mean()
}

/// The training objective: mean over heads of the batch's loss (same target for every head).
pub fn deep_supervision<const D: usize>(heads: Vec<Tensor<D>>, target: Tensor<D>, objective: Objective) -> Tensor<1> {
    let h = heads.len() as f64;
    heads
        .into_iter()
        .map(|z| match objective {
            Objective::Paper => per_image(z, target.clone()).mean(),
            Objective::Nnunet => nnunet(z, target.clone()),
        })
        .reduce(|a, b| a + b)
        .expect("at least one head")
        .div_scalar(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f32], shape: [usize; 4]) -> Tensor<4> {
        Tensor::<1>::from_floats(v, &Device::flex()).reshape(shape)
    }

    #[test]
    fn binary_matches_hand_computation() {
        // logits 0 and ln 3 -> p = 0.5, 0.75; y = 1, 0.
        let z = t(&[0.0, 3f32.ln()], [1, 1, 1, 2]);
        let y = t(&[1.0, 0.0], [1, 1, 1, 2]);
        let bce = (2f64.ln() + 4f64.ln()) / 2.0;
        let dice = (2.0 * 0.5 + 1.0) / (1.0 + 1.25 + 1.0);
        let got = per_image(z, y).into_data().iter::<f64>().next().unwrap();
        assert!((got - (0.5 * bce - dice)).abs() < 1e-6, "{got}");
    }

    #[test]
    fn stable_for_huge_logits() {
        let z = t(&[1000.0, -1000.0], [1, 1, 1, 2]);
        let y = t(&[0.0, 1.0], [1, 1, 1, 2]);
        let got = per_image(z, y).into_data().iter::<f64>().next().unwrap();
        // BCE = (1000 + 1000) / 2; Dice = 1 / (1 + 1 + 1).
        assert!((got - (500.0 - 1.0 / 3.0)).abs() < 1e-3, "{got}");
    }

    #[test]
    fn multiclass_matches_hand_computation() {
        // Two classes, one pixel, logits equal -> p = (0.5, 0.5); target class 1.
        let z = t(&[0.0, 0.0], [1, 2, 1, 1]);
        let y = t(&[0.0, 1.0], [1, 2, 1, 1]);
        let dice0 = 1.0 / (0.5 + 1.0);
        let dice1 = (2.0 * 0.5 + 1.0) / (1.0 + 0.5 + 1.0);
        let expected = 0.5 * 2f64.ln() - (dice0 + dice1) / 2.0;
        let got = per_image(z, y).into_data().iter::<f64>().next().unwrap();
        assert!((got - expected).abs() < 1e-6, "{got} vs {expected}");
    }

    #[test]
    fn heads_are_averaged() {
        let y = t(&[1.0, 0.0], [1, 1, 1, 2]);
        let a = t(&[2.0, -1.0], [1, 1, 1, 2]);
        let b = t(&[-3.0, 0.5], [1, 1, 1, 2]);
        let la = per_image(a.clone(), y.clone()).into_data().iter::<f64>().next().unwrap();
        let lb = per_image(b.clone(), y.clone()).into_data().iter::<f64>().next().unwrap();
        let got = deep_supervision(vec![a, b], y, Objective::Paper).into_data().iter::<f64>().next().unwrap();
        assert!((got - (la + lb) / 2.0).abs() < 1e-6);
    }

    fn scalar(t: Tensor<1>) -> f64 {
        t.into_data().iter::<f64>().next().unwrap()
    }

    #[test]
    fn nnunet_binary_matches_hand_computation() {
        // Two one-pixel images, logits 0 and ln 3 -> p = 0.5, 0.75; y = 1, 0. The Dice is the
        // batch's: (2 * 0.5) / (1 + 1.25), not the mean of the images' (the second has none).
        let z = t(&[0.0, 3f32.ln()], [2, 1, 1, 1]);
        let y = t(&[1.0, 0.0], [2, 1, 1, 1]);
        let ce = (2f64.ln() + 4f64.ln()) / 2.0;
        let dice = (1.0 + NNUNET_SMOOTH) / (2.25 + NNUNET_SMOOTH);
        let got = scalar(nnunet(z, y));
        assert!((got - (ce - dice)).abs() < 1e-6, "{got} vs {}", ce - dice);
    }

    #[test]
    fn nnunet_leaves_the_background_out_of_the_dice() {
        // Three classes, two pixels. Pixel 0: logits (0, ln 2, 0) -> p = (0.25, 0.5, 0.25), class 1.
        // Pixel 1: logits (0, 0, 0) -> p = 1/3 each, class 0 (background).
        let z = t(&[0.0, 0.0, 2f32.ln(), 0.0, 0.0, 0.0], [1, 3, 1, 2]);
        let y = t(&[0.0, 1.0, 1.0, 0.0, 0.0, 0.0], [1, 3, 1, 2]);
        let ce = (2f64.ln() + 3f64.ln()) / 2.0;
        let s = NNUNET_SMOOTH;
        let dice1 = (2.0 * 0.5 + s) / (1.0 + 0.5 + 1.0 / 3.0 + s);
        let dice2 = s / (0.25 + 1.0 / 3.0 + s);
        let expected = ce - (dice1 + dice2) / 2.0;
        let got = scalar(nnunet(z, y));
        assert!((got - expected).abs() < 1e-6, "{got} vs {expected}");
    }

    #[test]
    fn the_objective_picks_the_loss() {
        let y = t(&[1.0, 0.0], [2, 1, 1, 1]);
        let z = t(&[2.0, -1.0], [2, 1, 1, 1]);
        let paper = scalar(per_image(z.clone(), y.clone()).mean());
        let nn = scalar(nnunet(z.clone(), y.clone()));
        assert!((paper - nn).abs() > 0.1, "{paper} {nn}");
        assert!((scalar(deep_supervision(vec![z.clone()], y.clone(), Objective::Paper)) - paper).abs() < 1e-6);
        assert!((scalar(deep_supervision(vec![z], y, Objective::Nnunet)) - nn).abs() < 1e-6);
    }
}
