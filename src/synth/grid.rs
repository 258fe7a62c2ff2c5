//! A case's 64³ window at the target spacing, cut from a source volume: which source voxels it
//! resamples (with [`crate::data::volume::resample`]), and where each of its voxels lies.
//!
//! Coordinates here are "array millimetres": a source voxel index `[z, y, x]` times its spacing,
//! so that shapes are drawn in mm without the source's direction matrix.

use anyhow::ensure;

use crate::data::volume::Geometry;
use crate::data::volume::resample::{Kind, Plan, new_shape, resample, resample_labels};

/// Voxels per side of a case (the paper's LIDC crops are 64³).
pub const WINDOW: usize = 64;
/// Source voxels resampled beyond the window on each side, so that the cubic spline's support
/// and the window's placement are never cut short.
const MARGIN: usize = 2;

/// A window of [`WINDOW`]³ voxels in a source volume of `shape` at `spacing` (`[z, y, x]`).
#[derive(Clone, Debug)]
pub struct Grid {
    spacing: [f64; 3],
    /// First source voxel of the region resampled, and its size.
    r0: [usize; 3],
    n: [usize; 3],
    /// The region's size at the target spacing, and the window's first voxel in it.
    m: [usize; 3],
    w0: [usize; 3],
}

impl Grid {
    /// The window at `target` spacing whose centre is nearest `centre` (array mm) while it stays
    /// inside the volume. `what` names the volume in errors.
    pub fn around(
        shape: [usize; 3],
        spacing: [f64; 3],
        centre: [f64; 3],
        target: [f64; 3],
        what: &str,
    ) -> anyhow::Result<Grid> {
        let mut g = Grid { spacing, r0: [0; 3], n: [0; 3], m: [0; 3], w0: [0; 3] };
        for a in 0..3 {
            let n = (WINDOW as f64 * target[a] / spacing[a]).ceil() as usize + 2 * MARGIN;
            ensure!(
                n <= shape[a],
                "{what}: {} voxels of {} mm along {} are fewer than a {WINDOW}-voxel window at {} mm needs ({n})",
                shape[a],
                spacing[a],
                ["z", "y", "x"][a],
                target[a]
            );
            let c = centre[a] / spacing[a];
            g.r0[a] = ((c - n as f64 / 2.0).round().max(0.0) as usize).min(shape[a] - n);
            g.n[a] = n;
        }
        g.m = new_shape(g.n, spacing, target, what)?;
        for a in 0..3 {
            let c = centre[a] / spacing[a];
            let jc = (c - g.r0[a] as f64 + 0.5) * g.m[a] as f64 / g.n[a] as f64 - 0.5;
            g.w0[a] = ((jc - (WINDOW as f64 - 1.0) / 2.0).round().max(0.0) as usize).min(g.m[a] - WINDOW);
        }
        Ok(g)
    }

    /// The resampling of the region: cubic (images) or linear (labels) along every axis, also
    /// across thick slices, unlike nnU-Net's nearest neighbour there (docs/nodules.md says why).
    fn plan(&self) -> Plan {
        Plan { from: self.n, to: self.m, separate: None }
    }

    /// The source voxel index (continuous) of window voxel `j` along axis `a`.
    fn source_index(&self, a: usize, j: f64) -> f64 {
        self.r0[a] as f64 + (self.w0[a] as f64 + j + 0.5) * self.n[a] as f64 / self.m[a] as f64 - 0.5
    }

    /// The array-mm position of window voxel `j` (fractional allowed) along axis `a`.
    pub fn position(&self, a: usize, j: f64) -> f64 {
        self.source_index(a, j) * self.spacing[a]
    }

    /// The window's voxel spacing (mm, `[z, y, x]`): the target's up to the rounding of the
    /// region's new shape.
    pub fn voxel_mm(&self) -> [f64; 3] {
        std::array::from_fn(|a| self.spacing[a] * self.n[a] as f64 / self.m[a] as f64)
    }

    /// The region of the source this window resamples: first voxel and size.
    pub fn region(&self) -> ([usize; 3], [usize; 3]) {
        (self.r0, self.n)
    }

    /// Whether `lo..hi` (array mm, per axis) lies inside the window, `margin` mm in.
    pub fn holds(&self, lo: [f64; 3], hi: [f64; 3], margin: f64) -> bool {
        let e = self.voxel_mm();
        (0..3).all(|a| {
            lo[a] - margin >= self.position(a, 0.0) - e[a] / 2.0
                && hi[a] + margin <= self.position(a, WINDOW as f64 - 1.0) + e[a] / 2.0
        })
    }

    /// The window's geometry in the source's world, for its NIfTI header.
    pub fn geometry(&self, source: &Geometry) -> Geometry {
        let first = [self.source_index(2, 0.0), self.source_index(1, 0.0), self.source_index(0, 0.0)];
        let e = self.voxel_mm();
        Geometry { spacing: [e[2], e[1], e[0]], origin: source.index_to_world(first), direction: source.direction }
    }

    /// Copies the region out of a source volume (`shape`, `[z][y][x]`).
    pub fn cut<T: Copy>(&self, data: &[T], shape: [usize; 3]) -> Vec<T> {
        let mut out = Vec::with_capacity(self.n.iter().product());
        for z in self.r0[0]..self.r0[0] + self.n[0] {
            for y in self.r0[1]..self.r0[1] + self.n[1] {
                let row = (z * shape[1] + y) * shape[2] + self.r0[2];
                out.extend_from_slice(&data[row..row + self.n[2]]);
            }
        }
        out
    }

    /// The window of a resampled region (`self.m`).
    fn window<T: Copy>(&self, data: &[T]) -> Vec<T> {
        let [_, my, mx] = self.m;
        let mut out = Vec::with_capacity(WINDOW.pow(3));
        for z in self.w0[0]..self.w0[0] + WINDOW {
            for y in self.w0[1]..self.w0[1] + WINDOW {
                let row = (z * my + y) * mx + self.w0[2];
                out.extend_from_slice(&data[row..row + WINDOW]);
            }
        }
        out
    }

    /// A region of CT values (from [`Grid::cut`]) resampled onto the window.
    pub fn resample_image(&self, region: &[f32]) -> anyhow::Result<Vec<f32>> {
        Ok(self.window(&resample(region, 1, &self.plan(), Kind::Image)?))
    }

    /// A region of labels resampled onto the window.
    pub fn resample_labels(&self, region: &[u8]) -> anyhow::Result<Vec<u8>> {
        Ok(self.window(&resample_labels(region, &self.plan())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A linear ramp along each axis resamples to the ramp evaluated at the window's positions
    /// (cubic interpolation reproduces linear functions), so [`Grid::position`] says where each
    /// window voxel is.
    #[test]
    fn positions_match_the_resampled_values() {
        let (shape, spacing) = ([30, 90, 80], [5.0, 0.75, 0.9]);
        let g = Grid::around(shape, spacing, [70.0, 40.0, 35.0], [1.0; 3], "ramp").unwrap();
        let (r0, n) = g.region();
        for a in 0..3 {
            let ramp: Vec<f32> = (0..shape.iter().product::<usize>())
                .map(|i| {
                    let idx = [i / (shape[1] * shape[2]), i / shape[2] % shape[1], i % shape[2]];
                    (idx[a] as f64 * spacing[a]) as f32
                })
                .collect();
            let w = g.resample_image(&g.cut(&ramp, shape)).unwrap();
            assert_eq!(n.iter().product::<usize>(), g.cut(&ramp, shape).len());
            for j in [3usize, 31, 60] {
                let i = [j * WINDOW * WINDOW + 5 * WINDOW + 7, 9 * WINDOW * WINDOW + j * WINDOW + 2, j];
                let want = g.position(a, j as f64);
                assert!((w[i[a]] as f64 - want).abs() < 1e-3 * want.max(1.0), "axis {a}, {j}: {} vs {want}", w[i[a]]);
            }
            assert!(r0[a] + n[a] <= shape[a]);
        }
        assert!(g.voxel_mm().iter().all(|e| (e - 1.0).abs() < 0.01), "{:?}", g.voxel_mm());
    }
}
