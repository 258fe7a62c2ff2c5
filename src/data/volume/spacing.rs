//! A target voxel spacing (`--spacing X,Y,Z`, mm) and the resampling of volumes onto it and of
//! predictions back onto each input's own grid, with [`super::resample`].

use serde::{Deserialize, Serialize};

use super::Geometry;
use super::resample::{Kind, Plan, check_spacing, resample};

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
}
