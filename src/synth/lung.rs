//! A simple lung mask for CT volumes without lung labels: air-like voxels (below
//! [`AIR_HU`]) connected to each other but not to the edge of the field of view in-plane (the
//! air around the patient), the large components only (dropping bowel gas), holes filled slice by
//! slice (vessels, nodules, airway walls) and eroded by [`ERODE_MM`] (the partial-volume rim
//! against the chest wall). The trachea and main bronchi are air inside the body too and stay in.

use crate::metrics::edt;
use crate::postprocess::{Connectivity, components};

pub const AIR_HU: f32 = -400.0;
/// Components smaller than this fraction of the largest are not lung.
const MIN_FRACTION: f64 = 0.1;
pub const ERODE_MM: f64 = 1.5;

/// The lung mask of a CT volume `ct` (HU, `[z, y, x]`) at `spacing` (mm, `[z, y, x]`).
pub fn mask(ct: &[f32], shape: [usize; 3], spacing: [f64; 3]) -> Vec<bool> {
    let [nz, ny, nx] = shape;
    let air: Vec<bool> = ct.iter().map(|&v| v < AIR_HU).collect();
    let (ids, sizes) = components(&air, shape, Connectivity::Face);
    let mut outside = vec![false; sizes.len()];
    for z in 0..nz {
        for y in 0..ny {
            for x in 0..nx {
                if y == 0 || x == 0 || y == ny - 1 || x == nx - 1 {
                    outside[ids[(z * ny + y) * nx + x] as usize] = true;
                }
            }
        }
    }
    let largest = (1..sizes.len()).filter(|&c| !outside[c]).map(|c| sizes[c]).max().unwrap_or(0);
    let keep: Vec<bool> =
        (0..sizes.len()).map(|c| c > 0 && !outside[c] && sizes[c] as f64 >= MIN_FRACTION * largest as f64).collect();
    let mut lung: Vec<bool> = ids.iter().map(|&c| keep[c as usize]).collect();
    fill_holes_per_slice(&mut lung, shape);
    erode(&lung, shape, spacing, ERODE_MM)
}

/// Per axial slice, background regions that do not reach the slice's edge become foreground.
pub fn fill_holes_per_slice(mask: &mut [bool], shape: [usize; 3]) {
    let [_, ny, nx] = shape;
    for slice in mask.chunks_mut(ny * nx) {
        let background: Vec<bool> = slice.iter().map(|&m| !m).collect();
        let (ids, sizes) = components(&background, [1, ny, nx], Connectivity::Face);
        let mut edge = vec![false; sizes.len()];
        for y in 0..ny {
            for x in 0..nx {
                if y == 0 || x == 0 || y == ny - 1 || x == nx - 1 {
                    edge[ids[y * nx + x] as usize] = true;
                }
            }
        }
        for (m, &c) in slice.iter_mut().zip(&ids) {
            if c > 0 && !edge[c as usize] {
                *m = true;
            }
        }
    }
}

/// Voxels of `mask` farther than `mm` from every voxel outside it.
pub fn erode(mask: &[bool], shape: [usize; 3], spacing: [f64; 3], mm: f64) -> Vec<bool> {
    let outside: Vec<bool> = mask.iter().map(|&m| !m).collect();
    let d2 = edt::squared(&outside, shape, spacing);
    d2.iter().map(|&d| d > mm * mm).collect()
}

/// Voxels of `mask` or within `mm` of it.
pub fn dilate(mask: &[bool], shape: [usize; 3], spacing: [f64; 3], mm: f64) -> Vec<bool> {
    let d2 = edt::squared(mask, shape, spacing);
    d2.iter().map(|&d| d <= mm * mm).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body of soft tissue in air with two air-filled lungs holding a vessel: the mask is the
    /// lungs with the vessel filled in, eroded by one voxel; outside air and a small gas bubble
    /// are left out.
    #[test]
    fn finds_the_lungs_of_a_phantom() {
        let shape = [6, 40, 40];
        let mut ct = vec![-1000.0f32; 6 * 40 * 40];
        let at = |z: usize, y: usize, x: usize| (z * 40 + y) * 40 + x;
        for z in 0..6 {
            for y in 4..36 {
                for x in 4..36 {
                    ct[at(z, y, x)] = 40.0;
                }
            }
            for y in 10..30 {
                for x in (8..18).chain(22..32) {
                    ct[at(z, y, x)] = -850.0;
                }
            }
            ct[at(z, 20, 12)] = 60.0; // a vessel
            ct[at(z, 32, 20)] = -900.0; // bowel gas
        }
        let m = mask(&ct, shape, [1.0, 1.0, 1.0]);
        assert!(m[at(3, 20, 12)], "vessel filled");
        assert!(m[at(3, 15, 10)] && m[at(3, 15, 25)], "both lungs");
        assert!(!m[at(3, 10, 10)], "eroded rim");
        assert!(!m[at(3, 32, 20)] && !m[at(3, 1, 1)] && !m[at(3, 20, 20)], "gas, outside, mediastinum");
        // Lung voxels more than 1.5 voxels from the tissue in-plane: 18x8 per lung per slice; the
        // volume's own edge in z is not tissue, so nothing is eroded along z.
        let expected = 6 * 2 * 18 * 8;
        assert_eq!(m.iter().filter(|&&v| v).count(), expected);
    }
}
