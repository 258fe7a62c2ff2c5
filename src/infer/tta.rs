//! Test-time augmentation by mirroring, as nnU-Net's `_internal_maybe_mirror_and_predict`: the
//! network sees every mirrored copy of a batch (2^dims: 4 in 2D, 8 in 3D), each prediction is
//! mirrored back, and their mean is the answer. nnU-Net averages logits; we average
//! probabilities, as accurate mode already does over the heads.

use burn::prelude::*;

use crate::model::{Mode, UNetPP};

/// The sets of spatial axes (tensor axes 2.. of a rank-`D` batch) mirrored in each pass: all
/// 2^(D-2) subsets, the unmirrored pass first.
pub fn mirror_sets<const D: usize>() -> Vec<Vec<usize>> {
    let axes = D - 2;
    (0..1usize << axes).map(|m| (0..axes).filter(|a| m >> a & 1 == 1).map(|a| a + 2).collect()).collect()
}

fn mirror<const D: usize>(mut t: Tensor<D>, axes: &[usize]) -> Tensor<D> {
    for &a in axes {
        t = t.flip([a]);
    }
    t
}

/// [`UNetPP::predict_modes`] on `x`, with `tta` the mean over its mirrored copies (each
/// prediction mirrored back first). Without `tta` exactly `predict_modes`.
pub fn predict<const D: usize>(
    model: &UNetPP<D>,
    x: Tensor<D>,
    modes: &[Mode],
    tta: bool,
) -> anyhow::Result<Vec<Tensor<D>>> {
    if !tta {
        return model.predict_modes(x, modes);
    }
    let sets = mirror_sets::<D>();
    let mut sums: Vec<Tensor<D>> = vec![];
    for axes in &sets {
        let out = model.predict_modes(mirror(x.clone(), axes), modes)?;
        let out = out.into_iter().map(|t| mirror(t, axes));
        sums = if sums.is_empty() { out.collect() } else { sums.into_iter().zip(out).map(|(s, t)| s + t).collect() };
    }
    Ok(sums.into_iter().map(|s| s.div_scalar(sets.len() as f64)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_combination_of_spatial_axes_once() {
        assert_eq!(mirror_sets::<4>(), vec![vec![], vec![2], vec![3], vec![2, 3]]);
        let sets = mirror_sets::<5>();
        assert_eq!(sets.len(), 8);
        assert_eq!((sets[0].clone(), sets[7].clone()), (vec![], vec![2, 3, 4]));
        let mut unique = sets.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), 8);
    }
}
