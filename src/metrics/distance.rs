//! Surface distances between two binary masks, as MONAI computes them
//! (`monai.metrics.compute_hausdorff_distance(percentile=95)` and
//! `monai.metrics.compute_surface_dice`, both with `use_subvoxels=False`):
//!
//! - the surface of a mask is its voxels that a face neighbour (4 in 2D, 6 in 3D) leaves, i.e.
//!   `mask ^ binary_erosion(mask)` with the image surrounded by background;
//! - each surface voxel's distance is the exact Euclidean distance, in physical units, from its
//!   centre to the nearest surface voxel centre of the other mask (via [`super::edt`]);
//! - HD95 is the larger of the two directed 95th percentiles (linear interpolation, as
//!   `torch.quantile`); NSD is the fraction of both surfaces' voxels within the tolerance.
//!
//! DeepMind's `surface-distance` weighs surface elements by their area instead; on the same masks
//! its numbers differ slightly (docs/metrics.md).

use super::edt;

/// The surface distances of prediction to reference and reference to prediction.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SurfaceDistances {
    pub pred_to_ref: Vec<f64>,
    pub ref_to_pred: Vec<f64>,
}

/// The smallest `[z, y, x]` box holding every true voxel of `a` or `b`, as (start, shape).
fn bounding_box(a: &[bool], b: &[bool], shape: [usize; 3]) -> Option<([usize; 3], [usize; 3])> {
    let (mut lo, mut hi) = ([usize::MAX; 3], [0usize; 3]);
    let nx = shape[2];
    for (r, (ra, rb)) in a.chunks_exact(nx).zip(b.chunks_exact(nx)).enumerate() {
        let first = ra.iter().position(|&v| v).into_iter().chain(rb.iter().position(|&v| v)).min();
        let Some(first) = first else { continue };
        let last = ra.iter().rposition(|&v| v).into_iter().chain(rb.iter().rposition(|&v| v)).max().unwrap();
        let (z, y) = (r / shape[1], r % shape[1]);
        for (k, (l, h)) in [(z, z), (y, y), (first, last)].into_iter().enumerate() {
            lo[k] = lo[k].min(l);
            hi[k] = hi[k].max(h);
        }
    }
    (lo[0] != usize::MAX).then(|| (lo, std::array::from_fn(|k| hi[k] - lo[k] + 1)))
}

fn crop(m: &[bool], shape: [usize; 3], start: [usize; 3], size: [usize; 3]) -> Vec<bool> {
    let mut out = Vec::with_capacity(size.iter().product());
    for z in start[0]..start[0] + size[0] {
        for y in start[1]..start[1] + size[1] {
            let row = (z * shape[1] + y) * shape[2];
            out.extend_from_slice(&m[row + start[2]..row + start[2] + size[2]]);
        }
    }
    out
}

/// The surface voxels of `m` (see the module doc). `planar`: a 2D image, whose single slice has
/// no neighbours across z.
pub fn surface(m: &[bool], shape: [usize; 3], planar: bool) -> Vec<bool> {
    let [nz, ny, nx] = shape;
    let plane = ny * nx;
    let mut out = vec![false; m.len()];
    let none = vec![false; nx];
    let all = vec![true; nx];
    for z in 0..nz {
        for y in 0..ny {
            let at = |z: usize, y: usize| &m[(z * ny + y) * nx..(z * ny + y + 1) * nx];
            let row = at(z, y);
            if !row.iter().any(|&v| v) {
                continue;
            }
            // Neighbour rows; outside the image is background, and a 2D image has no z neighbours.
            let up = if y > 0 { at(z, y - 1) } else { &none };
            let down = if y + 1 < ny { at(z, y + 1) } else { &none };
            let (front, back) = if planar {
                (&all[..], &all[..])
            } else {
                (if z > 0 { at(z - 1, y) } else { &none[..] }, if z + 1 < nz { at(z + 1, y) } else { &none[..] })
            };
            let o = &mut out[z * plane + y * nx..z * plane + (y + 1) * nx];
            for x in 0..nx {
                let left = x > 0 && row[x - 1];
                let right = x + 1 < nx && row[x + 1];
                o[x] = row[x] && !(left && right && up[x] && down[x] && front[x] && back[x]);
            }
        }
    }
    out
}

/// Surface distances between `pred` and `truth` on a `[z, y, x]` grid with `spacing` (same order).
/// `planar`: a 2D image (see [`surface`]). Empty when both masks are; a side is empty when its
/// mask is.
pub fn surface_distances(
    pred: &[bool],
    truth: &[bool],
    shape: [usize; 3],
    spacing: [f64; 3],
    planar: bool,
) -> SurfaceDistances {
    assert_eq!(pred.len(), truth.len());
    // Everything outside the box is background for both masks, so cropping changes no surface and
    // no nearest-voxel search.
    let Some((start, size)) = bounding_box(pred, truth, shape) else { return SurfaceDistances::default() };
    let (sp, st) = if size == shape {
        (surface(pred, size, planar), surface(truth, size, planar))
    } else {
        let (p, t) = (crop(pred, shape, start, size), crop(truth, shape, start, size));
        (surface(&p, size, planar), surface(&t, size, planar))
    };
    let directed = |from: &[bool], to: &[bool]| -> Vec<f64> {
        if !to.iter().any(|&v| v) {
            return from.iter().filter(|&&v| v).map(|_| f64::INFINITY).collect();
        }
        let d2 = edt::squared_at(to, size, spacing, Some(from));
        from.iter().zip(&d2).filter(|(f, _)| **f).map(|(_, d)| d.sqrt()).collect()
    };
    SurfaceDistances { pred_to_ref: directed(&sp, &st), ref_to_pred: directed(&st, &sp) }
}

/// The `q`-th quantile (0..=1) with linear interpolation between order statistics, as
/// `torch.quantile` and `numpy.percentile`; NaN for no values.
pub fn quantile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let pos = q * (v.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
}

impl SurfaceDistances {
    /// The 95th-percentile Hausdorff distance; NaN when a side is empty.
    pub fn hd95(&self) -> f64 {
        let (a, b) = (quantile(&self.pred_to_ref, 0.95), quantile(&self.ref_to_pred, 0.95));
        if a.is_nan() || b.is_nan() { f64::NAN } else { a.max(b) }
    }

    /// The normalised surface Dice at `tolerance`; NaN when both surfaces are empty.
    pub fn nsd(&self, tolerance: f64) -> f64 {
        let total = self.pred_to_ref.len() + self.ref_to_pred.len();
        let within = self.pred_to_ref.iter().chain(&self.ref_to_pred).filter(|&&d| d <= tolerance).count();
        if total == 0 { f64::NAN } else { within as f64 / total as f64 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A box of `[z, y, x]` size `b` at `at` in a grid of `shape`.
    fn cuboid(shape: [usize; 3], at: [usize; 3], b: [usize; 3]) -> Vec<bool> {
        let mut m = vec![false; shape.iter().product()];
        for z in at[0]..at[0] + b[0] {
            for y in at[1]..at[1] + b[1] {
                for x in at[2]..at[2] + b[2] {
                    m[(z * shape[1] + y) * shape[2] + x] = true;
                }
            }
        }
        m
    }

    #[test]
    fn two_cubes_at_a_known_offset() {
        // Two 4-voxel cubes, the second shifted by 3 voxels along z at 2.5 mm: every surface voxel
        // of one has a surface voxel of the other exactly 7.5 mm away along z or closer.
        let shape = [16, 10, 10];
        let a = cuboid(shape, [2, 3, 3], [4, 4, 4]);
        let b = cuboid(shape, [5, 3, 3], [4, 4, 4]);
        let d = surface_distances(&a, &b, shape, [2.5, 0.8, 0.8], false);
        // 56 surface voxels of a 4^3 cube (64 - 2^3 interior).
        assert_eq!((d.pred_to_ref.len(), d.ref_to_pred.len()), (56, 56));
        // The far face of each cube (16 voxels) is 3 slices from the other's surface.
        let far = d.pred_to_ref.iter().filter(|&&v| (v - 7.5).abs() < 1e-12).count();
        assert_eq!(far, 16);
        assert!(d.pred_to_ref.iter().all(|&v| v <= 7.5 + 1e-12));
        assert!((d.hd95() - 7.5).abs() < 1e-12);
        // Per side: 16 voxels at 0 (the shared slice), 12 at 2.5, 12 at 5 and 16 at 7.5 mm.
        assert_eq!(d.nsd(7.5), 1.0);
        assert_eq!(d.nsd(5.0), 80.0 / 112.0);
        assert_eq!(d.nsd(0.0), 32.0 / 112.0);
    }

    #[test]
    fn identical_masks_are_at_distance_zero() {
        let shape = [1, 9, 9];
        let a = cuboid(shape, [0, 2, 2], [1, 5, 5]);
        let d = surface_distances(&a, &a, shape, [1.0; 3], true);
        // 2D: the 5x5 square's ring of 16 pixels, not all 25.
        assert_eq!(d.pred_to_ref.len(), 16);
        assert_eq!((d.hd95(), d.nsd(0.0)), (0.0, 1.0));
    }

    #[test]
    fn empty_sides() {
        let shape = [1, 4, 4];
        let a = cuboid(shape, [0, 1, 1], [1, 2, 2]);
        let none = vec![false; 16];
        let d = surface_distances(&a, &none, shape, [1.0; 3], true);
        assert_eq!((d.pred_to_ref.len(), d.ref_to_pred.len()), (4, 0));
        assert!(d.hd95().is_nan());
        assert_eq!(d.nsd(1.0), 0.0);
        assert!(surface_distances(&none, &none, shape, [1.0; 3], true).nsd(1.0).is_nan());
    }

    #[test]
    fn quantile_interpolates_like_numpy() {
        // numpy.percentile([1, 2, 3, 4, 10], 95) = 8.8
        assert!((quantile(&[10.0, 1.0, 3.0, 2.0, 4.0], 0.95) - 8.8).abs() < 1e-12);
        assert_eq!(quantile(&[3.0], 0.95), 3.0);
    }
}
