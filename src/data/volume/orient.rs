//! The one voxel layout every volume is given to the network in, and the way back.
//!
//! Canonical means LPS-aligned: voxel x grows towards the patient's Left, y towards Posterior,
//! z towards Superior (whichever voxel axis is closest to each), so the canonical direction is
//! the identity up to the obliqueness of the scan. This is SimpleITK's
//! `DICOMOrient(image, "LPS")` and the layout of nnU-Net's SimpleITK arrays for DICOM-like data;
//! it only permutes and flips voxel axes (never resamples), so it is exactly invertible.
//!
//! Which voxel axis goes where: the largest remaining |direction| entry picks a (world axis,
//! voxel axis) pair, repeated three times (nibabel's `io_orientation`). Where every column has
//! a distinct largest entry this is ITK's own per-column choice; on an exact 45-degree tie the
//! first axis in x, y, z order wins.

use super::{Geometry, Volume};

/// A permutation with flips of the three voxel axes (ITK order x, y, z): canonical axis `a` is
/// the file's axis `perm[a]`, reversed where `flip[a]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Orientation {
    pub perm: [usize; 3],
    pub flip: [bool; 3],
}

impl Orientation {
    pub const IDENTITY: Orientation = Orientation { perm: [0, 1, 2], flip: [false; 3] };

    /// The orientation that brings a grid with direction `d` to LPS-aligned (module doc).
    pub fn to_canonical(d: &[[f64; 3]; 3]) -> Orientation {
        let mut perm = [0; 3];
        let mut flip = [false; 3];
        let (mut rows, mut cols) = ([true; 3], [true; 3]);
        for _ in 0..3 {
            let mut best = (0, 0, -1.0);
            for r in (0..3).filter(|&r| rows[r]) {
                for c in (0..3).filter(|&c| cols[c]) {
                    if d[r][c].abs() > best.2 {
                        best = (r, c, d[r][c].abs());
                    }
                }
            }
            let (r, c, _) = best;
            (rows[r], cols[c]) = (false, false);
            perm[r] = c;
            flip[r] = d[r][c] < 0.0;
        }
        Orientation { perm, flip }
    }

    /// The shape `[z, y, x]` of the reoriented array of a file of shape `file` (`[z, y, x]`).
    pub fn shape(&self, file: [usize; 3]) -> [usize; 3] {
        let n = xyz(file);
        [n[self.perm[2]], n[self.perm[1]], n[self.perm[0]]]
    }

    /// The geometry of the reoriented grid: the same world points, voxel axes reordered.
    pub fn geometry(&self, g: &Geometry, file: [usize; 3]) -> Geometry {
        let n = xyz(file);
        let mut start = [0.0; 3];
        for a in 0..3 {
            if self.flip[a] {
                start[self.perm[a]] = (n[self.perm[a]] - 1) as f64;
            }
        }
        let sign = |a: usize| if self.flip[a] { -1.0 } else { 1.0 };
        Geometry {
            spacing: std::array::from_fn(|a| g.spacing[self.perm[a]]),
            origin: g.index_to_world(start),
            direction: std::array::from_fn(|r| std::array::from_fn(|a| sign(a) * g.direction[r][self.perm[a]])),
        }
    }

    /// For each reoriented voxel (in its `[z][y][x]` order), the offset of the same voxel in the
    /// file's array.
    fn file_offsets(&self, file: [usize; 3]) -> Vec<usize> {
        let n = xyz(file);
        let stride = [1, n[0], n[0] * n[1]];
        let m: [usize; 3] = std::array::from_fn(|a| n[self.perm[a]]);
        let step: [isize; 3] = std::array::from_fn(|a| {
            let s = stride[self.perm[a]] as isize;
            if self.flip[a] { -s } else { s }
        });
        let base: isize = (0..3).filter(|&a| self.flip[a]).map(|a| ((m[a] - 1) * stride[self.perm[a]]) as isize).sum();
        let mut out = Vec::with_capacity(m.iter().product());
        for k in 0..m[2] as isize {
            for j in 0..m[1] as isize {
                let row = base + k * step[2] + j * step[1];
                out.extend((0..m[0] as isize).map(|i| (row + i * step[0]) as usize));
            }
        }
        out
    }

    /// `channels` planes of a file's voxels (`[c][z][y][x]`, shape `file`) in this orientation.
    pub fn apply<T: Copy>(&self, data: &[T], channels: usize, file: [usize; 3]) -> Vec<T> {
        if *self == Self::IDENTITY {
            return data.to_vec();
        }
        let map = self.file_offsets(file);
        let n = map.len();
        (0..channels).flat_map(|c| map.iter().map(move |&o| data[c * n + o])).collect()
    }

    /// The inverse of [`Orientation::apply`]: reoriented planes back to the file's layout.
    pub fn undo<T: Copy + Default>(&self, data: &[T], channels: usize, file: [usize; 3]) -> Vec<T> {
        if *self == Self::IDENTITY {
            return data.to_vec();
        }
        let map = self.file_offsets(file);
        let n = map.len();
        let mut out = vec![T::default(); data.len()];
        for c in 0..channels {
            for (i, &o) in map.iter().enumerate() {
                out[c * n + o] = data[c * n + i];
            }
        }
        out
    }
}

/// `[z, y, x]` to ITK's `[x, y, z]`.
fn xyz(s: [usize; 3]) -> [usize; 3] {
    [s[2], s[1], s[0]]
}

/// Where a sample's array came from: the file's grid, and how it was reoriented from it.
#[derive(Clone, Debug, PartialEq)]
pub struct Frame {
    /// The file's own geometry.
    pub file: Geometry,
    /// The file's shape `[z, y, x]`.
    pub file_shape: [usize; 3],
    pub orientation: Orientation,
}

impl Frame {
    /// The frame that brings a volume of more than one slice with geometry `file` and shape
    /// `file_shape` to LPS-aligned. A single slice keeps its layout: a 2D model reads it as an
    /// image, and its slice axis must stay first.
    pub fn canonical(file: Geometry, file_shape: [usize; 3]) -> Frame {
        let orientation =
            if file_shape[0] > 1 { Orientation::to_canonical(&file.direction) } else { Orientation::IDENTITY };
        Frame { file, file_shape, orientation }
    }

    /// The geometry of the sample's (reoriented) array.
    pub fn geometry(&self) -> Geometry {
        self.orientation.geometry(&self.file, self.file_shape)
    }

    /// `channels` planes in the file's layout, reoriented; with their shape `[z, y, x]`.
    pub fn apply<T: Copy>(&self, data: &[T], channels: usize) -> (Vec<T>, [usize; 3]) {
        (self.orientation.apply(data, channels, self.file_shape), self.orientation.shape(self.file_shape))
    }
}

/// A volume reoriented by [`Frame::canonical`] (its geometry the reoriented grid's), and the
/// frame that undoes it.
pub fn canonical(v: Volume) -> (Volume, Frame) {
    let frame = Frame::canonical(v.geometry, v.shape);
    let (data, shape) = frame.apply(&v.data, v.channels);
    (Volume { data, shape, geometry: frame.geometry(), ..v }, frame)
}

/// How far apart (in voxels of the finest spacing) two voxel centres may lie and still be the
/// same voxel: headers written by different tools differ by float rounding, never by this much.
pub const SAME_GRID_VOXELS: f64 = 0.1;

/// Refuses an image and a label map whose reoriented grids do not coincide in the world (the
/// same voxel centres within [`SAME_GRID_VOXELS`]): their voxels would pair up with the wrong
/// anatomy. Grids that only differ in storage order (one flipped or permuted with a matching
/// header) coincide once reoriented and pass.
pub fn ensure_same_grid(image: &std::path::Path, a: &Frame, label: &std::path::Path, b: &Frame) -> anyhow::Result<()> {
    let (ga, gb) = (a.geometry(), b.geometry());
    let (sa, sb) = (a.orientation.shape(a.file_shape), b.orientation.shape(b.file_shape));
    let tol = SAME_GRID_VOXELS * ga.spacing.iter().chain(&gb.spacing).fold(f64::INFINITY, |m, &s| m.min(s));
    let far = |s: [usize; 3]| [s[2] as f64 - 1.0, s[1] as f64 - 1.0, s[0] as f64 - 1.0];
    let corners = [[0.0; 3], far(sa), [far(sa)[0], 0.0, 0.0], [0.0, far(sa)[1], 0.0], [0.0, 0.0, far(sa)[2]]];
    let apart = corners.iter().map(|&i| dist(ga.index_to_world(i), gb.index_to_world(i))).fold(0.0, f64::max);
    anyhow::ensure!(
        sa == sb && apart <= tol,
        "image {} and label map {} are not on the same voxel grid (voxel centres up to {apart:.4} mm apart, \
         allowed {tol:.4} mm): image spacing {:?} origin {:?} direction {:?} size {:?}, label spacing {:?} origin \
         {:?} direction {:?} size {:?} (LPS, as LPS-aligned arrays); resample the label onto the image or give it \
         the image's header",
        image.display(),
        label.display(),
        ga.spacing,
        ga.origin,
        ga.direction,
        far(sa).map(|v| v + 1.0),
        gb.spacing,
        gb.origin,
        gb.direction,
        far(sb).map(|v| v + 1.0),
    );
    Ok(())
}

fn dist(a: [f64; 3], b: [f64; 3]) -> f64 {
    (0..3).map(|i| (a[i] - b[i]).powi(2)).sum::<f64>().sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_of(o: Orientation) -> [[f64; 3]; 3] {
        // A file whose axis perm[a] points along world a (negated where flipped).
        let mut d = [[0.0; 3]; 3];
        for a in 0..3 {
            d[a][o.perm[a]] = if o.flip[a] { -1.0 } else { 1.0 };
        }
        d
    }

    #[test]
    fn every_axis_permutation_and_flip_round_trips_and_lands_on_the_identity() {
        let file = [2, 3, 4];
        let data: Vec<u32> = (0..48).collect();
        let g = Geometry { spacing: [0.5, 1.0, 2.0], origin: [3.0, -1.0, 7.0], ..Default::default() };
        for perm in [[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]] {
            for bits in 0..8 {
                let o = Orientation { perm, flip: [bits & 1 != 0, bits & 2 != 0, bits & 4 != 0] };
                let g = Geometry { direction: dir_of(o), ..g };
                assert_eq!(Orientation::to_canonical(&g.direction), o);
                let out = o.apply(&data, 2, file);
                assert_eq!(o.undo(&out, 2, file), data, "{o:?}");
                let cg = o.geometry(&g, file);
                assert_eq!(cg.direction, crate::data::volume::geometry::IDENTITY, "{o:?}");
                // Every voxel keeps its world point: check the reoriented corner voxels.
                let cs = o.shape(file);
                for idx in [[0, 0, 0], [cs[2] - 1, 0, 0], [0, cs[1] - 1, cs[0] - 1], [1, 1, 1]] {
                    let v = out[(idx[2] * cs[1] + idx[1]) * cs[2] + idx[0]] as usize;
                    let f = [v % 4, v / 4 % 3, v / 12 % 2];
                    let (a, b) = (cg.index_to_world(idx.map(|i| i as f64)), g.index_to_world(f.map(|i| i as f64)));
                    assert!(a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-12), "{o:?} {idx:?}: {a:?} vs {b:?}");
                }
            }
        }
    }

    #[test]
    fn oblique_axes_go_to_the_nearest_world_axis() {
        let (c, s) = (0.8f64, 0.6f64);
        // x ~ -P, y ~ +L, z = +S (rotated 37 degrees about z, then a flip).
        let d = [[s, c, 0.0], [-c, s, 0.0], [0.0, 0.0, 1.0]];
        assert_eq!(Orientation::to_canonical(&d), Orientation { perm: [1, 0, 2], flip: [false, true, false] });
    }
}
