//! The paper's per-head loss, eq. 2: 0.5 * BCE - soft Dice (smooth 1, per image), averaged over
//! the batch and over the deep-supervision heads. Multi-class: 0.5 * softmax cross-entropy minus
//! the mean over classes of the soft Dice. Takes logits; no activation lives in the model.

use burn::prelude::*;
use burn::tensor::activation::{log_softmax, sigmoid, softmax};

const SMOOTH: f64 = 1.0;

/// Per-image loss, shape [N]. `target` is {0,1} for binary (1 channel) or one-hot [N, C, ...].
pub fn per_image<const D: usize>(logits: Tensor<D>, target: Tensor<D>) -> Tensor<1> {
    let [n, c, ..] = logits.dims()[..] else { unreachable!() };
    let flat = |t: Tensor<D>| -> Tensor<3> { t.reshape([n as i32, c as i32, -1]) };
    let (z, y) = (flat(logits), flat(target));
    let (ce, p): (Tensor<3>, Tensor<3>) = if c == 1 {
        // max(z, 0) - z*y + log(1 + e^-|z|): exact BCE of sigmoid(z) without overflow.
        let ce = z.clone().clamp_min(0.0) - z.clone() * y.clone() + z.clone().abs().neg().exp().log1p();
        (ce, sigmoid(z))
    } else {
        let ce = (log_softmax(z.clone(), 1) * y.clone()).sum_dim(1).neg();
        (ce, softmax(z, 1))
    };
    let ce = ce.mean_dim(2).mean_dim(1).reshape([n]);
    let inter = (p.clone() * y.clone()).sum_dim(2);
    let dice = (inter.mul_scalar(2.0).add_scalar(SMOOTH)) / (y.sum_dim(2) + p.sum_dim(2)).add_scalar(SMOOTH);
    let dice = dice.mean_dim(1).reshape([n]);
    ce.mul_scalar(0.5) - dice
}

/// The training objective: mean over heads of the batch-mean loss (same target for every head).
pub fn deep_supervision<const D: usize>(heads: Vec<Tensor<D>>, target: Tensor<D>) -> Tensor<1> {
    let h = heads.len() as f64;
    heads
        .into_iter()
        .map(|z| per_image(z, target.clone()).mean())
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
        let got = deep_supervision(vec![a, b], y).into_data().iter::<f64>().next().unwrap();
        assert!((got - (la + lb) / 2.0).abs() < 1e-6);
    }
}
