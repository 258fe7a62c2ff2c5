//! nnU-Net's planning rules (nnunetv2 `experiment_planning/experiment_planners/default_experiment_planner.py`
//! and `get_network_topology.py`), as pure functions of the fingerprint: the target spacing, the
//! pooling per level and axis, and the patch that fits a memory budget. Axes are `[z, y, x]`
//! throughout, spacings in mm (1 for 2D pixels).

use crate::model::ModelConfig;

/// A volume is anisotropic when its coarse axis is this many times its finest (nnU-Net's
/// `ANISO_THRESHOLD`).
pub const ANISO_THRESHOLD: f64 = 3.0;

/// A patch is not shrunk to fit memory below this many levels (fewer where the data is that small):
/// a shallower model sees too little context to be worth training.
pub const MIN_DEPTH: usize = 2;

/// No level is pooled below this many voxels on an axis (nnU-Net's `min_feature_map_size`).
pub const MIN_FEATURE_MAP: usize = 4;

/// `np.percentile(v, p)`: linear interpolation between the nearest ranks.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let pos = p / 100.0 * (s.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    s[lo] + (s[hi] - s[lo]) * (pos - lo as f64)
}

/// Per-axis median of `rows`.
pub fn median(rows: &[[f64; 3]]) -> [f64; 3] {
    std::array::from_fn(|a| percentile(&rows.iter().map(|r| r[a]).collect::<Vec<_>>(), 50.0))
}

/// The spacing every case is resampled to: the median per axis, except that when the coarsest
/// axis is both more than [`ANISO_THRESHOLD`] times coarser than the others and has that many
/// times fewer voxels, it takes the 10th percentile of the cases' spacings on that axis (never
/// finer than the other axes), so that the few thin-sliced cases are not thrown away and the
/// thick-sliced ones are not interpolated into slices that never existed. Returns the reason
/// when the anisotropic rule applied.
pub fn target_spacing(spacings: &[[f64; 3]], shapes: &[[f64; 3]]) -> ([f64; 3], Option<String>) {
    let mut target = median(spacings);
    let size = median(shapes);
    let worst = (0..3).max_by(|&a, &b| target[a].total_cmp(&target[b])).unwrap();
    let others: Vec<usize> = (0..3).filter(|&a| a != worst).collect();
    let other_spacing = others.iter().map(|&a| target[a]);
    let (min_other, max_other) = other_spacing.fold((f64::INFINITY, 0f64), |(lo, hi), s| (lo.min(s), hi.max(s)));
    let min_other_size = others.iter().map(|&a| size[a]).fold(f64::INFINITY, f64::min);
    let aniso_spacing = target[worst] > ANISO_THRESHOLD * min_other;
    let aniso_voxels = size[worst] * ANISO_THRESHOLD < min_other_size;
    if !(aniso_spacing && aniso_voxels) {
        return (target, None);
    }
    let p10 = percentile(&spacings.iter().map(|s| s[worst]).collect::<Vec<_>>(), 10.0);
    let chosen = if p10 < max_other { max_other + 1e-5 } else { p10 };
    let axis = ["z", "y", "x"][worst];
    let why = format!(
        "anisotropic: median spacing {:.3} mm on {axis} is over {ANISO_THRESHOLD}x the finest ({min_other:.3} mm) \
         with over {ANISO_THRESHOLD}x fewer voxels, so {axis} takes the 10th percentile of the cases' {axis} \
         spacings ({chosen:.3} mm) instead of the median",
        target[worst]
    );
    target[worst] = chosen;
    (target, Some(why))
}

/// Pooling factors per level and axis for a `patch` at `spacing` (nnU-Net's
/// `get_pool_and_conv_props`): at each level, an axis is pooled (factor 2) when it still has at
/// least 2 x [`MIN_FEATURE_MAP`] voxels and its spacing is less than twice the finest spacing of
/// the axes that may still be pooled; a lone such axis needs 3 x [`MIN_FEATURE_MAP`] voxels.
/// Stops after `max_levels` levels or when no axis can be pooled. In 2D (`dims` 2) `z` is never
/// pooled.
pub fn pooling(spacing: [f64; 3], patch: [usize; 3], dims: usize, max_levels: usize) -> Vec<[usize; 3]> {
    let (mut spacing, mut size) = (spacing, patch);
    let mut pools = vec![];
    while pools.len() < max_levels {
        let mut valid: Vec<usize> = (3 - dims..3).filter(|&a| size[a] >= 2 * MIN_FEATURE_MAP).collect();
        let Some(finest) = valid.iter().map(|&a| spacing[a]).min_by(f64::total_cmp) else { break };
        valid.retain(|&a| spacing[a] / finest < 2.0);
        if valid.len() == 1 && size[valid[0]] < 3 * MIN_FEATURE_MAP {
            break;
        }
        let mut level = [1; 3];
        for &a in &valid {
            level[a] = 2;
            spacing[a] *= 2.0;
            size[a] = size[a].div_ceil(2);
        }
        pools.push(level);
    }
    pools
}

/// What a patch must be a multiple of on each axis: the product of its pooling factors.
pub fn divisors(pool: &[[usize; 3]]) -> [usize; 3] {
    std::array::from_fn(|a| pool.iter().map(|p| p[a]).product())
}

/// 2 on every spatial axis at each of `levels` levels (`z` 1 in 2D): what the model does without
/// per-axis pooling.
pub fn isotropic(levels: usize, dims: usize) -> Vec<[usize; 3]> {
    vec![if dims == 3 { [2; 3] } else { [1, 2, 2] }; levels]
}

/// A patch with its pooling, fitted to memory.
#[derive(Clone, Debug, PartialEq)]
pub struct Fit {
    pub patch: [usize; 3],
    pub pool: Vec<[usize; 3]>,
    /// Estimated bytes of one training step at batch 2.
    pub bytes: f64,
}

/// The largest patch, starting from nnU-Net's initial one (a cube of 256^3 voxels in 3D, 2048^2
/// in 2D, stretched by the inverse spacing, clipped to the median shape), whose training step at
/// batch 2 fits in `budget` bytes by [`ModelConfig::training_bytes`] of `model` at the patch's
/// depth. While it does not fit, the axis that is largest relative to the median shape loses one
/// multiple of its divisor, and the pooling is recomputed (nnU-Net's loop). `isotropic` pools 2 on
/// every axis at as many levels as the rule gives, for models without per-axis pooling.
pub fn fit_patch(
    model: &ModelConfig,
    spacing: [f64; 3],
    median_shape: [f64; 3],
    max_levels: usize,
    budget: f64,
    isotropic_only: bool,
) -> anyhow::Result<Fit> {
    let dims = model.dims;
    let axes = 3 - dims..3;
    let inv: Vec<f64> = axes.clone().map(|a| 1.0 / spacing[a]).collect();
    let side = if dims == 3 { 256f64 } else { 2048f64 };
    let scale = (side.powi(dims as i32) / inv.iter().product::<f64>()).powf(1.0 / dims as f64);
    let mut patch = [1usize; 3];
    for (k, a) in axes.clone().enumerate() {
        patch[a] = ((inv[k] * scale).round() as usize).min(median_shape[a].round().max(1.0) as usize).max(1);
    }
    let mut min_levels = None;
    // An axis loses a divisor's worth each round, and a divisor grows at most to 2^max_levels, so
    // this ends; the bound only makes that plain.
    for _ in 0..1_000_000 {
        let rule = pooling(spacing, patch, dims, max_levels);
        anyhow::ensure!(
            !rule.is_empty(),
            "a patch of {} voxels cannot be pooled even once (every axis needs at least {})",
            crate::model::fmt_size(patch, dims),
            2 * MIN_FEATURE_MAP
        );
        let floor = *min_levels.get_or_insert(rule.len().min(MIN_DEPTH));
        if rule.len() < floor {
            anyhow::bail!(
                "only a patch of {} voxels (a model of depth {}) fits in the {:.2} GiB memory budget at --width {}; \
                 give more --memory or a smaller --width",
                crate::model::fmt_size(patch, dims),
                rule.len(),
                budget / GIB,
                model.width
            );
        }
        let pool = if isotropic_only { isotropic(rule.len(), dims) } else { rule };
        let div = divisors(&pool);
        let padded: [usize; 3] = std::array::from_fn(|a| patch[a].div_ceil(div[a]) * div[a]);
        // The step of the model as it will pool: fewer pooled axes keep larger maps at depth.
        let m = ModelConfig { depth: pool.len(), pool: pool.clone(), ..model.clone() };
        let voxels: usize = padded.iter().product();
        let bytes = m.training_bytes(voxels, 2);
        if bytes <= budget {
            return Ok(Fit { patch: padded, pool, bytes });
        }
        let shrinkable = axes.clone().filter(|&a| padded[a] > div[a].max(2 * MIN_FEATURE_MAP));
        let Some(axis) = shrinkable.max_by(|&a, &b| {
            (padded[a] as f64 / median_shape[a]).total_cmp(&(padded[b] as f64 / median_shape[b])).then(a.cmp(&b))
        }) else {
            anyhow::bail!(
                "even a patch of {} voxels (--width {}) needs about {:.2} GiB per training step at batch 2, more \
                 than the {:.2} GiB memory budget; give more --memory or a smaller --width",
                crate::model::fmt_size(padded, dims),
                model.width,
                bytes / GIB,
                budget / GIB
            );
        };
        patch = padded;
        patch[axis] -= div[axis];
    }
    anyhow::bail!("no patch found for a median shape of {median_shape:?}")
}

pub const GIB: f64 = (1u64 << 30) as f64;

/// The largest batch (at least 2) whose step fits in `budget`, and at most the number of
/// patches that cover 5% of the data set's voxels (nnU-Net's cap: a larger batch over a small
/// data set only repeats it).
pub fn batch_size(model: &ModelConfig, patch_voxels: usize, budget: f64, dataset_voxels: f64) -> usize {
    let cap = ((0.05 * dataset_voxels / patch_voxels as f64).round() as usize).max(2);
    let mut b = 2;
    while b < cap && model.training_bytes(patch_voxels, b + 1) <= budget {
        b += 1;
    }
    b
}

/// Steps per epoch and epochs that fill `seconds` at `step_seconds` a step, with a tenth of the
/// time kept for validation and checkpoints: about ten epochs (early stopping and the choice of
/// the best checkpoint need some), at most nnU-Net's 250 steps each, at least one step.
pub fn schedule(seconds: f64, step_seconds: f64) -> (usize, usize) {
    let total = ((0.9 * seconds / step_seconds.max(1e-6)).floor() as usize).max(1);
    let steps = (total / 10).clamp(1, 250);
    (steps, (total / steps).max(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Arch, Preset};

    #[test]
    fn percentiles_as_numpy() {
        // np.percentile([5, 5, 6.5, 6.5], 10) = 5.0; np.median = 5.75; [1, 2, 3, 10] at 10 = 1.3.
        assert_eq!(percentile(&[6.5, 5.0, 6.5, 5.0], 10.0), 5.0);
        assert_eq!(percentile(&[6.5, 5.0, 6.5, 5.0], 50.0), 5.75);
        assert!((percentile(&[10.0, 1.0, 3.0, 2.0], 10.0) - 1.3).abs() < 1e-12);
    }

    #[test]
    fn target_spacing_is_the_median_unless_anisotropic() {
        let iso = [[1.0, 0.8, 0.8], [2.0, 1.0, 1.0], [3.0, 1.2, 1.2]];
        let shapes = [[100.0, 200.0, 200.0]; 3];
        assert_eq!(target_spacing(&iso, &shapes), ([2.0, 1.0, 1.0], None));
        // The shared lesions: z 5, 5, 6.5, 6.5 mm (median 5.75) over in-plane 0.57..0.78 mm, 25-61
        // slices of 256-512: z takes the 10th percentile, 5.0.
        let sp = [[5.0, 0.57, 0.57], [5.0, 0.63, 0.63], [6.5, 0.78, 0.78], [6.5, 0.78, 0.78]];
        let sh = [[48.0, 512.0, 512.0], [61.0, 512.0, 512.0], [25.0, 256.0, 256.0], [23.0, 256.0, 256.0]];
        let (t, why) = target_spacing(&sp, &sh);
        assert!(t[0] == 5.0 && (t[1] - 0.705).abs() < 1e-12 && t[1] == t[2], "{t:?}");
        assert!(why.unwrap().contains("10th percentile"));
        // Coarse spacing but as many voxels on that axis: the median stays.
        let sh = [[300.0, 512.0, 512.0]; 4];
        assert_eq!(target_spacing(&sp, &sh).0[0], 5.75);
        // The 10th percentile never goes finer than the other axes.
        let sp = [[0.5, 1.0, 1.0], [0.5, 1.0, 1.0], [4.0, 1.0, 1.0], [4.0, 1.0, 1.0], [4.0, 1.0, 1.0]];
        let sh = [[20.0, 512.0, 512.0]; 5];
        assert_eq!(target_spacing(&sp, &sh).0[0], 1.0 + 1e-5);
    }

    #[test]
    fn pooling_skips_the_coarse_axis_until_it_is_within_twice_the_finest() {
        // 5 mm slices over 0.7 mm pixels: in-plane only while 5 >= 2 x in-plane spacing
        // (0.7, 1.4 mm), then every axis (2.8 mm: 5 / 2.8 < 2).
        let p = pooling([5.0, 0.7, 0.7], [40, 320, 320], 3, 4);
        assert_eq!(p, vec![[1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2]]);
        assert_eq!(divisors(&p), [4, 16, 16]);
        // Isotropic: 2 everywhere, until an axis has fewer than 8 voxels.
        assert_eq!(pooling([1.0; 3], [32, 64, 64], 3, 5), vec![[2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]]);
        assert_eq!(pooling([1.0; 3], [8, 64, 64], 3, 5), vec![[2, 2, 2], [1, 2, 2], [1, 2, 2], [1, 2, 2]]);
        // A lone axis needs 12 voxels; 2D never pools z.
        assert_eq!(pooling([1.0; 3], [1, 8, 40], 2, 5), vec![[1, 2, 2], [1, 1, 2]]);
        assert_eq!(pooling([1.0; 3], [1, 96, 96], 2, 4), isotropic(4, 2));
        assert!(pooling([1.0; 3], [4, 4, 4], 3, 4).is_empty());
    }

    fn model3(width: usize) -> ModelConfig {
        ModelConfig { width, dims: 3, ..ModelConfig::new(Arch::Unetpp, Preset::Modern, 4) }
    }

    #[test]
    fn a_smaller_budget_gives_a_smaller_patch_that_fits() {
        let m = model3(8);
        let (sp, median) = ([5.0, 0.7, 0.7], [40.0, 350.0, 350.0]);
        let big = fit_patch(&m, sp, median, 4, 64.0 * GIB, false).unwrap();
        // Clipped to the median shape, rounded up to the divisors.
        assert_eq!((big.patch, divisors(&big.pool)), ([40, 352, 352], [4, 16, 16]));
        let small = fit_patch(&m, sp, median, 4, 2.0 * GIB, false).unwrap();
        assert!(small.bytes <= 2.0 * GIB && small.patch.iter().product::<usize>() < 40 * 352 * 352, "{small:?}");
        let div = divisors(&small.pool);
        assert!((0..3).all(|a| small.patch[a].is_multiple_of(div[a])), "{small:?}");
        let iso = fit_patch(&m, sp, median, 4, 2.0 * GIB, true).unwrap();
        assert!(
            iso.pool.iter().all(|p| *p == [2, 2, 2]) && iso.patch.iter().all(|v| v.is_multiple_of(1 << iso.pool.len()))
        );
        let e = fit_patch(&m, sp, median, 4, 1e6, false).unwrap_err().to_string();
        assert!(e.contains("memory budget") && e.contains("--width 8"), "{e}");
        // 1 MB would hold a depth-1 model on 8^3 voxels, but not the depth-2 floor.
        assert!(e.contains("a model of depth 1"), "{e}");
    }

    #[test]
    fn batch_and_schedule() {
        let m = model3(8);
        let one = m.training_bytes(32 * 32 * 32, 1);
        // The 5% cap: 2,000,000 voxels x 5% is ~3 patches of 32^3.
        assert_eq!(batch_size(&m, 32 * 32 * 32, 100.0 * one, 2e6), 3);
        let v = 32 * 32 * 32;
        let b = batch_size(&m, v, 4.5 * one, 1e12);
        assert!(b > 2 && m.training_bytes(v, b) <= 4.5 * one && m.training_bytes(v, b + 1) > 4.5 * one, "{b}");
        assert_eq!(batch_size(&m, v, one, 1e12), 2);
        // 2 h at 1.2 s a step: 5400 steps -> 250 x 21; 60 s at 10 s: 5 steps -> 1 x 5.
        assert_eq!(schedule(7200.0, 1.2), (250, 21));
        assert_eq!(schedule(60.0, 10.0), (1, 5));
        assert_eq!(schedule(1.0, 10.0), (1, 1));
    }
}
