//! A target voxel spacing (`--spacing X,Y,Z`, mm) and the resampling of volumes onto it and of
//! predictions back onto each input's own grid, with [`super::resample`].

use serde::{Deserialize, Serialize};

use super::Geometry;
use super::resample::{Kind, Plan, check_spacing, resample, resample_labels};
use crate::data::Sample;

/// A voxel spacing in mm, in ITK's axis order `x, y, z` as [`Geometry::spacing`].
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Spacing(pub [f64; 3]);

impl std::str::FromStr for Spacing {
    type Err = String;
    /// `X,Y,Z` in mm, or one number for an isotropic spacing.
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(',').map(str::trim).collect();
        let nums: Result<Vec<f64>, _> = parts.iter().map(|p| p.parse::<f64>()).collect();
        let v = match (nums, parts.len()) {
            (Ok(v), 1) => [v[0]; 3],
            (Ok(v), 3) => [v[0], v[1], v[2]],
            _ => return Err(format!("--spacing `{s}`: must be X,Y,Z in mm (e.g. 0.8,0.8,2.5) or one number")),
        };
        let spacing = Spacing(v);
        spacing.check()?;
        Ok(spacing)
    }
}

impl std::fmt::Display for Spacing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{},{},{}", self.0[0], self.0[1], self.0[2])
    }
}

impl Spacing {
    pub fn check(&self) -> Result<(), String> {
        check_spacing(self.0, "--spacing").map_err(|e| e.to_string())
    }

    /// In array order `[z, y, x]`, as [`Plan`] takes it.
    pub fn zyx(&self) -> [f64; 3] {
        [self.0[2], self.0[1], self.0[0]]
    }
}

/// The resampling of a `shape` (`[z, y, x]`) volume on `geometry` to `target`; `what` names it.
pub fn plan(shape: [usize; 3], geometry: &Geometry, target: Spacing, what: &str) -> anyhow::Result<Plan> {
    Plan::to_spacing(shape, Spacing(geometry.spacing).zyx(), target.zyx(), what)
}

/// The geometry of the grid `plan` makes from `g`: voxel centres stay aligned with the old
/// grid's (nnU-Net's and skimage's convention), so the first voxel's centre moves by half the
/// difference of the spacings, and the spacing is the extent over the new count (the target
/// up to rounding of the shape).
pub fn resampled_geometry(g: &Geometry, plan: &Plan) -> Geometry {
    // Geometry axes are x, y, z; plan axes z, y, x.
    let scale: [f64; 3] = std::array::from_fn(|a| plan.from[2 - a] as f64 / plan.to[2 - a] as f64);
    Geometry {
        spacing: std::array::from_fn(|a| g.spacing[a] * scale[a]),
        origin: g.index_to_world(scale.map(|s| 0.5 * s - 0.5)),
        direction: g.direction,
    }
}

/// Probabilities (`classes` planes) predicted on `plan`'s target grid, put back onto the input's
/// grid; the arg-max is taken after this, on the user's grid, as nnU-Net exports predictions.
pub fn probabilities_back(probs: &[f32], classes: usize, plan: &Plan) -> anyhow::Result<Vec<f32>> {
    resample(probs, classes, &plan.inverse(), Kind::Probabilities)
}

/// `s`, a volume with voxel spacing `spacing` (mm, x, y, z), resampled to `target`: its image
/// with cubic splines, its mask (if any) by the arg-max of its classes; with the plan that
/// brings predictions back. `s` is returned as it is when the grid would not change.
pub fn resample_sample(s: &Sample, spacing: [f64; 3], target: Spacing) -> anyhow::Result<(Sample, Plan)> {
    let plan = Plan::to_spacing(s.shape, Spacing(spacing).zyx(), target.zyx(), &s.source.display().to_string())?;
    let image = resample(&s.image, s.channels, &plan, Kind::Image)?;
    let mask = if s.mask.is_empty() { vec![] } else { resample_labels(&s.mask, &plan)? };
    // The resampled array is on no file's grid: predictions go back through `plan.inverse()` to
    // `s`, whose frame then writes them.
    let (name, channels, source) = (s.name.clone(), s.channels, s.source.clone());
    let r = Sample { name, image, mask, channels, shape: plan.to, source, geometry: None };
    Ok((r, plan))
}

/// The voxel spacing (mm, x, y, z) of a sample's (LPS-aligned) array; `None` for a 2D image.
pub fn spacing_of(s: &Sample) -> Option<[f64; 3]> {
    s.geometry.as_ref().map(|f| f.geometry().spacing)
}

/// The spacing of a volume sample that is to be resampled to `target`; a 2D image is an error.
fn volume_spacing(s: &Sample, target: Spacing) -> anyhow::Result<[f64; 3]> {
    spacing_of(s).ok_or_else(|| {
        anyhow::anyhow!(
            "--spacing {target}: {} is a 2D image; a target spacing applies to 3D volumes only",
            s.source.display()
        )
    })
}

/// Training samples resampled to `target` (their masks by arg-max); as they are without one.
pub fn to_target(samples: Vec<Sample>, target: Option<Spacing>) -> anyhow::Result<Vec<Sample>> {
    let Some(target) = target else { return Ok(samples) };
    samples.iter().map(|s| Ok(resample_sample(s, volume_spacing(s, target)?, target)?.0)).collect()
}

/// Probabilities of `s` on its own grid (one vector per mode, `classes` planes each), computed by
/// `predict` on `s` resampled to `target` and resampled back, so that labels, scores and
/// written masks are on the user's grid. Without a target `predict` sees `s` itself.
pub fn on_input_grid(
    s: &Sample,
    target: Option<Spacing>,
    predict: impl FnOnce(&Sample) -> anyhow::Result<Vec<Vec<f32>>>,
) -> anyhow::Result<Vec<Vec<f32>>> {
    let Some(target) = target else { return predict(s) };
    on_grid(s, volume_spacing(s, target)?, target, predict)
}

fn on_grid(
    s: &Sample,
    spacing: [f64; 3],
    target: Spacing,
    predict: impl FnOnce(&Sample) -> anyhow::Result<Vec<Vec<f32>>>,
) -> anyhow::Result<Vec<Vec<f32>>> {
    // The ground truth stays on the input's grid; only the image is resampled.
    let unlabelled = Sample { mask: vec![], ..s.clone() };
    let (r, plan) = resample_sample(&unlabelled, spacing, target)?;
    predict(&r)?.into_iter().map(|p| resample(&p, p.len() / r.voxels(), &plan.inverse(), Kind::Probabilities)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spacing_parses_three_or_one_value_and_refuses_bad_ones_by_name() {
        assert_eq!("0.8,0.8,2.5".parse::<Spacing>().unwrap(), Spacing([0.8, 0.8, 2.5]));
        assert_eq!(" 1.5 ".parse::<Spacing>().unwrap(), Spacing([1.5; 3]));
        assert_eq!(Spacing([0.8, 0.8, 2.5]).zyx(), [2.5, 0.8, 0.8]);
        for bad in ["1,2", "a,b,c", "", "1,,2"] {
            let e = bad.parse::<Spacing>().unwrap_err();
            assert!(e.contains("--spacing") && e.contains(bad) && e.contains("X,Y,Z"), "{e}");
        }
        for bad in ["0,1,1", "1,NaN,1", "-1", "1,1,inf"] {
            let e = bad.parse::<Spacing>().unwrap_err();
            assert!(e.contains("--spacing") && e.contains("greater than 0"), "{bad}: {e}");
        }
    }

    #[test]
    fn the_resampled_grid_keeps_voxel_centres_aligned_in_world_space() {
        let (c, s) = (0.3f64.cos(), 0.3f64.sin());
        let dir = [[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]];
        let g = Geometry::new([0.7, 0.7, 2.5], [5.0, -3.0, 10.0], dir, std::path::Path::new("g"), "t").unwrap();
        let p = plan([10, 20, 30], &g, Spacing([1.4, 0.35, 2.5]), "g").unwrap();
        assert_eq!(p.to, [10, 40, 15]);
        let h = resampled_geometry(&g, &p);
        assert!((h.spacing[0] - 1.4).abs() < 1e-12 && (h.spacing[1] - 0.35).abs() < 1e-12, "{:?}", h.spacing);
        // New voxel i along x lies at old continuous index (i + 0.5) * 2 - 0.5, y at (j + 0.5) / 2 - 0.5.
        let (a, b) = (h.index_to_world([3.0, 5.0, 7.0]), g.index_to_world([6.5, 2.25, 7.0]));
        assert!((0..3).all(|r| (a[r] - b[r]).abs() < 1e-9), "{a:?} vs {b:?}");
    }

    #[test]
    fn predictions_on_the_target_grid_come_back_onto_the_input_grid() {
        let shape = [6, 20, 24];
        let n: usize = shape.iter().product();
        let image: Vec<f32> = (0..n).map(|i| (i % 24) as f32 / 24.0).collect();
        let s = Sample {
            name: "v".into(),
            image,
            mask: vec![1; n],
            channels: 1,
            shape,
            source: "v.nii.gz".into(),
            geometry: None,
        };
        let mut seen = None;
        // A stand-in model: two classes from the intensity, on the grid it is given.
        let probs = on_grid(&s, [0.7, 0.7, 3.0], Spacing([1.4, 1.0, 3.0]), |r| {
            seen = Some((r.shape, r.mask.len()));
            Ok(vec![r.image.iter().map(|&x| 1.0 - x).chain(r.image.iter().copied()).collect()])
        })
        .unwrap();
        assert_eq!(seen, Some(([6, 14, 12], 0)), "the model sees the resampled image, not the mask");
        assert_eq!(probs.len(), 1);
        assert_eq!(probs[0].len(), 2 * n);
        assert!((0..n).all(|i| (probs[0][i] + probs[0][n + i] - 1.0).abs() < 1e-6));
        // The foreground probability still follows x across the input's grid.
        assert!(probs[0][n + 23] > 0.9 && probs[0][n] < 0.1, "{} {}", probs[0][n], probs[0][n + 23]);
        // No target: the model sees the sample itself.
        let same = on_input_grid(&s, None, |r| Ok(vec![r.image.clone()])).unwrap();
        assert_eq!(same[0], s.image);
        // A target for a 2D image is an error naming the option and the file.
        let flat = Sample { shape: [1, 20, 24], image: vec![0.0; 480], source: "a.png".into(), ..s.clone() };
        let e = on_input_grid(&flat, Some(Spacing([1.0; 3])), |r| Ok(vec![r.image.clone()])).unwrap_err().to_string();
        assert!(e.contains("--spacing 1,1,1") && e.contains("a.png") && e.contains("2D"), "{e}");
    }
}
