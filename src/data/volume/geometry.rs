//! Where voxels lie in the patient: ITK/SimpleITK's image geometry in LPS world coordinates (mm).
//!
//! All arrays are in ITK's axis order `x, y, z` (x the fastest-varying voxel axis on disk), while
//! [`super::Volume::shape`] is `[z, y, x]`. The world point of a (continuous) voxel index
//! `[i, j, k]` (along x, y, z) is `origin + direction * (spacing ∘ [i, j, k])`, exactly
//! SimpleITK's `TransformContinuousIndexToPhysicalPoint`; `direction[r][c]` is the LPS component
//! `r` of voxel axis `c` (SimpleITK's `GetDirection()` read row by row).

use std::path::Path;

use anyhow::ensure;

/// Voxel spacing, origin and axis directions in LPS (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Geometry {
    /// mm between voxel centres along x, y, z; always positive.
    pub spacing: [f64; 3],
    /// LPS world point of voxel `[0, 0, 0]`'s centre.
    pub origin: [f64; 3],
    /// Unit direction of each voxel axis as a column: `direction[r][c]`, orthonormal (a rotation,
    /// possibly with a flip).
    pub direction: [[f64; 3]; 3],
}

/// How far from orthonormal a direction may be: ITK's own tolerance for NIfTI sforms, loose
/// enough for directions stored in single precision.
pub const ORTHONORMAL_TOLERANCE: f64 = 1e-4;

impl Default for Geometry {
    fn default() -> Self {
        Geometry { spacing: [1.0; 3], origin: [0.0; 3], direction: IDENTITY }
    }
}

pub(crate) const IDENTITY: [[f64; 3]; 3] = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];

impl Geometry {
    /// The geometry of the voxel-to-world matrix `m` (columns = voxel axes, spacing included)
    /// and `origin`: spacing is the column lengths, direction the normalised columns. `path` and
    /// `field` name where they came from in errors.
    pub fn from_axes(m: [[f64; 3]; 3], origin: [f64; 3], path: &Path, field: &str) -> anyhow::Result<Geometry> {
        let mut spacing = [0.0; 3];
        let mut direction = [[0.0; 3]; 3];
        for c in 0..3 {
            let len = (0..3).map(|r| m[r][c] * m[r][c]).sum::<f64>().sqrt();
            ensure!(
                len.is_finite() && len > 0.0,
                "{}: `{field}`: voxel axis {} has length {len} (must be finite and positive)",
                path.display(),
                ["x", "y", "z"][c]
            );
            spacing[c] = len;
            (0..3).for_each(|r| direction[r][c] = m[r][c] / len);
        }
        Geometry::new(spacing, origin, direction, path, field)
    }

    /// Checks spacing (finite, positive), origin (finite) and direction (orthonormal within
    /// [`ORTHONORMAL_TOLERANCE`]).
    pub fn new(
        spacing: [f64; 3],
        origin: [f64; 3],
        direction: [[f64; 3]; 3],
        path: &Path,
        field: &str,
    ) -> anyhow::Result<Geometry> {
        ensure!(
            spacing.iter().all(|s| s.is_finite() && *s > 0.0),
            "{}: `{field}`: spacing {spacing:?} must be finite and positive",
            path.display()
        );
        ensure!(origin.iter().all(|o| o.is_finite()), "{}: `{field}`: origin {origin:?} is not finite", path.display());
        for a in 0..3 {
            for b in 0..3 {
                let dot: f64 = (0..3).map(|r| direction[r][a] * direction[r][b]).sum();
                let want = if a == b { 1.0 } else { 0.0 };
                ensure!(
                    (dot - want).abs() <= ORTHONORMAL_TOLERANCE,
                    "{}: `{field}`: the voxel axes are not orthonormal (sheared or degenerate: axis {a} . axis {b} \
                     = {dot:.6}); only a rotation (with flips) times a positive spacing is supported",
                    path.display()
                );
            }
        }
        Ok(Geometry { spacing, origin, direction })
    }

    /// The LPS world point (mm) of voxel index `[i, j, k]` along x, y, z (fractional allowed).
    pub fn index_to_world(&self, index: [f64; 3]) -> [f64; 3] {
        let mut w = self.origin;
        for (r, wr) in w.iter_mut().enumerate() {
            *wr += (0..3).map(|c| self.direction[r][c] * self.spacing[c] * index[c]).sum::<f64>();
        }
        w
    }

    /// The continuous voxel index `[i, j, k]` of an LPS world point; the inverse of
    /// [`Geometry::index_to_world`].
    pub fn world_to_index(&self, world: [f64; 3]) -> [f64; 3] {
        let d: [f64; 3] = std::array::from_fn(|r| world[r] - self.origin[r]);
        // An orthonormal direction's inverse is its transpose.
        std::array::from_fn(|c| (0..3).map(|r| self.direction[r][c] * d[r]).sum::<f64>() / self.spacing[c])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn world_and_index_round_trip_on_an_oblique_flipped_grid() {
        let (c, s) = (0.6f64.cos(), 0.6f64.sin());
        let dir = [[c, s, 0.0], [s, -c, 0.0], [0.0, 0.0, 1.0]];
        let g = Geometry::new([0.5, 2.0, 3.0], [10.0, -5.0, 2.0], dir, Path::new("x"), "t").unwrap();
        assert_eq!(g.index_to_world([0.0; 3]), [10.0, -5.0, 2.0]);
        let w = g.index_to_world([1.0, 0.0, 0.0]);
        assert!((w[0] - (10.0 + 0.5 * c)).abs() < 1e-12 && (w[1] - (-5.0 + 0.5 * s)).abs() < 1e-12, "{w:?}");
        for idx in [[1.0, 2.0, 3.0], [-4.5, 0.25, 7.0]] {
            let back = g.world_to_index(g.index_to_world(idx));
            assert!(back.iter().zip(idx).all(|(a, b)| (a - b).abs() < 1e-9), "{back:?} vs {idx:?}");
        }
    }

    #[test]
    fn sheared_zero_or_non_finite_geometry_is_refused_by_name() {
        let p = Path::new("scan.nrrd");
        let e =
            Geometry::from_axes([[1.0, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], [0.0; 3], p, "space directions")
                .unwrap_err()
                .to_string();
        assert!(e.contains("scan.nrrd") && e.contains("space directions") && e.contains("orthonormal"), "{e}");
        let e = Geometry::from_axes([[0.0; 3]; 3], [0.0; 3], p, "sizes").unwrap_err().to_string();
        assert!(e.contains("axis x") && e.contains("positive"), "{e}");
        assert!(Geometry::new([1.0; 3], [f64::NAN, 0.0, 0.0], IDENTITY, p, "o").is_err());
        assert!(Geometry::new([1.0, -1.0, 1.0], [0.0; 3], IDENTITY, p, "s").is_err());
    }
}
