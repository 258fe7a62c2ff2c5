//! Overlays of a 3D prediction: the axial, coronal and sagittal slices through the lesion, i.e.
//! through the centroid of the largest connected foreground component of the ground truth (of
//! the prediction when the truth is empty, the volume's centre when both are).

use std::collections::VecDeque;
use std::path::Path;

use crate::data::Sample;

/// The three planes in the order they are written and shown.
pub const PLANES: [&str; 3] = ["axial", "coronal", "sagittal"];

/// Voxel labels of the 6-connected components of `mask > 0` and the size of each (label k is
/// `sizes[k - 1]`; 0 is background).
fn components(mask: &[u8], [d, h, w]: [usize; 3]) -> (Vec<u32>, Vec<usize>) {
    let mut label = vec![0u32; mask.len()];
    let mut sizes = vec![];
    let mut queue = VecDeque::new();
    for start in 0..mask.len() {
        if mask[start] == 0 || label[start] != 0 {
            continue;
        }
        sizes.push(0);
        let k = sizes.len() as u32;
        label[start] = k;
        queue.push_back(start);
        while let Some(i) = queue.pop_front() {
            sizes[k as usize - 1] += 1;
            let (z, y, x) = (i / (h * w), i / w % h, i % w);
            let mut visit = |j: usize| {
                if mask[j] != 0 && label[j] == 0 {
                    label[j] = k;
                    queue.push_back(j);
                }
            };
            if x > 0 {
                visit(i - 1);
            }
            if x + 1 < w {
                visit(i + 1);
            }
            if y > 0 {
                visit(i - w);
            }
            if y + 1 < h {
                visit(i + w);
            }
            if z > 0 {
                visit(i - h * w);
            }
            if z + 1 < d {
                visit(i + h * w);
            }
        }
    }
    (label, sizes)
}

/// The voxel nearest the centroid of the largest component of `mask > 0`, as [z, y, x]; None
/// for an empty mask. Ties in size go to the component met first in voxel order.
pub fn lesion_centre(mask: &[u8], shape: [usize; 3]) -> Option<[usize; 3]> {
    let (label, sizes) = components(mask, shape);
    let best = sizes.iter().enumerate().fold(None, |b: Option<(usize, usize)>, (k, &n)| match b {
        Some((_, m)) if m >= n => b,
        _ => Some((k, n)),
    })?;
    let k = best.0 as u32 + 1;
    let [_, h, w] = shape;
    let mut sum = [0f64; 3];
    for (i, _) in label.iter().enumerate().filter(|(_, l)| **l == k) {
        sum[0] += (i / (h * w)) as f64;
        sum[1] += (i / w % h) as f64;
        sum[2] += (i % w) as f64;
    }
    Some(std::array::from_fn(|a| (sum[a] / best.1 as f64).round() as usize))
}

/// Voxel spacing [z, y, x] from a NIfTI header (1 where it is missing or not positive), so the
/// coronal and sagittal slices of thick-slice scans are not squashed.
fn spacing(source: &Path) -> [f64; 3] {
    let pix = crate::data::io::read_header(source).map(|h| h.pixdim).unwrap_or([1.0; 8]);
    let ok = |v: f32| if v.is_finite() && v > 0.0 { v as f64 } else { 1.0 };
    [ok(pix[3]), ok(pix[2]), ok(pix[1])]
}

/// One plane through `c` as (rows, cols, voxel index per pixel). Coronal and sagittal show z
/// upwards (NIfTI's +z is superior) and repeat rows to the in-plane spacing, at most 8 times.
fn plane(p: usize, c: [usize; 3], [d, h, w]: [usize; 3], sp: [f64; 3]) -> (usize, usize, Vec<usize>) {
    if p == 0 {
        return (h, w, (0..h * w).map(|i| c[0] * h * w + i).collect());
    }
    let (cols, in_plane) = if p == 1 { (w, sp[2]) } else { (h, sp[1]) };
    let rep = (sp[0] / in_plane).round().clamp(1.0, 8.0) as usize;
    let mut idx = Vec::with_capacity(d * rep * cols);
    for z in (0..d).rev() {
        for _ in 0..rep {
            for u in 0..cols {
                idx.push(if p == 1 { (z * h + c[1]) * w + u } else { (z * h + u) * w + c[2] });
            }
        }
    }
    (d * rep, cols, idx)
}

/// Writes `dir/STEM_{axial,coronal,sagittal}.png`: true positives green, false positives red,
/// misses blue, as the 2D overlays.
pub fn write_slices(dir: &Path, s: &Sample, pred: &[u8], grey: &[u8]) -> anyhow::Result<()> {
    let centre = lesion_centre(&s.mask, s.shape)
        .or_else(|| lesion_centre(pred, s.shape))
        .unwrap_or(std::array::from_fn(|a| s.shape[a] / 2));
    let sp = spacing(&s.source);
    for (p, name) in PLANES.iter().enumerate() {
        let (rows, cols, idx) = plane(p, centre, s.shape, sp);
        let rgb: Vec<u8> = idx.iter().flat_map(|&i| colour(pred[i] > 0, s.mask[i] > 0, grey[i])).collect();
        let bytes = crate::data::io::encode_png(&rgb, cols, rows, true)?;
        crate::fsio::write_atomic(&crate::output::named(dir, &s.source, &format!("_{name}.png")), &bytes)?;
    }
    Ok(())
}

fn colour(pred: bool, truth: bool, g: u8) -> [u8; 3] {
    match (pred, truth) {
        (true, true) => [g / 2, 255, g / 2],
        (true, false) => [255, g / 2, g / 2],
        (false, true) => [g / 2, g / 2, 255],
        _ => [g, g, g],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_centre_is_that_of_the_largest_component() {
        let shape = [4, 5, 6];
        let at = |z: usize, y: usize, x: usize| (z * 5 + y) * 6 + x;
        let mut m = vec![0u8; 120];
        // A 2-voxel blob, then a 4-voxel one (z 1..=2, y 3, x 4..=5) whose centroid (1.5, 3, 4.5)
        // rounds away from zero to (2, 3, 5); diagonal neighbours are not connected.
        m[at(0, 0, 0)] = 1;
        m[at(0, 0, 1)] = 1;
        m[at(1, 1, 1)] = 1;
        for (z, x) in [(1, 4), (1, 5), (2, 4), (2, 5)] {
            m[at(z, 3, x)] = 2;
        }
        assert_eq!(components(&m, shape).1, vec![2, 1, 4]);
        assert_eq!(lesion_centre(&m, shape), Some([2, 3, 5]));
        assert_eq!(lesion_centre(&[0; 120], shape), None);
    }

    #[test]
    fn coronal_and_sagittal_show_z_upwards_at_the_slice_spacing() {
        let (rows, cols, idx) = plane(1, [0, 2, 0], [2, 3, 4], [2.0, 1.0, 1.0]);
        assert_eq!((rows, cols), (4, 4));
        // Top rows are z = 1 (twice), at y = 2.
        assert_eq!(&idx[..4], &[20, 21, 22, 23]);
        assert_eq!(&idx[4..8], &[20, 21, 22, 23]);
        assert_eq!(&idx[12..], &[8, 9, 10, 11]);
        let (rows, cols, idx) = plane(2, [0, 0, 3], [2, 3, 4], [1.0, 1.0, 1.0]);
        assert_eq!((rows, cols, idx), (2, 3, vec![15, 19, 23, 3, 7, 11]));
    }
}
