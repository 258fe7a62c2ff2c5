//! NIfTI-1 (`.nii`, `.nii.gz`) voxels (via the `nifti` crate) with geometry chosen as ITK 5's
//! `NiftiImageIO` (what SimpleITK and nnU-Net use) chooses it, converted from RAS to LPS.
//!
//! The rule ([`nifti_geometry`]):
//! - `qform_code` and `sform_code` both 0 (no transform, e.g. Analyze-style files): origin 0 and
//!   the identity direction in LPS (not RAS: this is what ITK reports), spacing from `pixdim`.
//! - Otherwise the sform (`srow_x/y/z`) is used when `sform_code > 0`, its 3x3 part with columns
//!   normalised is orthonormal within 1e-4 and any of: `qform_code` is 0; `sform_code` is 1
//!   (scanner anatomical); or it matches the qform (same normalised axes and column lengths
//!   within 1e-4, same offset within 1e-4). An sform equal to the qform element by element is
//!   also used.
//! - Else the qform (`quatern_b/c/d`, `qoffset_x/y/z`, `pixdim[0]` as qfac) when
//!   `qform_code > 0`, computed as `nifti_quatern_to_mat44` does.
//! - Else (only a sheared or degenerate sform) an error, as in ITK.
//!
//! Spacing is always `|pixdim[1..=3]|`, as in ITK, even where the sform's column lengths differ
//! (ITK warns of "unexpected scales"); a zero or non-finite pixdim is an error. Direction is the
//! chosen matrix's normalised columns with the x and y rows negated, origin its offset column
//! likewise. Supported voxels: 3D, or 4D with the 4th axis read as channels; `scl_slope` and
//! `scl_inter` are applied (the `nifti` crate does so). Other dimensions are errors.

use std::path::Path;

use anyhow::{Context, bail, ensure};
use nifti::{IntoNdArray, NiftiHeader};

use super::{Geometry, Volume};

const WHERE: &str = "NIfTI header";

fn mat(rows: [[f32; 4]; 3]) -> ([[f64; 3]; 3], [f64; 3]) {
    let m = std::array::from_fn(|r| std::array::from_fn(|c| rows[r][c] as f64));
    (m, std::array::from_fn(|r| rows[r][3] as f64))
}

/// The qform's voxel-to-RAS matrix and offset, as `nifti_quatern_to_mat44`.
fn qform(h: &NiftiHeader) -> ([[f64; 3]; 3], [f64; 3]) {
    let (mut b, mut c, mut d) = (h.quatern_b as f64, h.quatern_c as f64, h.quatern_d as f64);
    let mut a = 1.0 - (b * b + c * c + d * d);
    if a < 1e-7 {
        // Not a unit quaternion: normalise (b, c, d) and take a 180-degree rotation.
        let n = 1.0 / (b * b + c * c + d * d).sqrt();
        (b, c, d, a) = (b * n, c * n, d * n, 0.0);
    } else {
        a = a.sqrt();
    }
    let pos = |v: f32| if v > 0.0 { v as f64 } else { 1.0 };
    let (xd, yd) = (pos(h.pixdim[1]), pos(h.pixdim[2]));
    let zd = if h.pixdim[0] < 0.0 { -pos(h.pixdim[3]) } else { pos(h.pixdim[3]) };
    let r = [
        [a * a + b * b - c * c - d * d, 2.0 * (b * c - a * d), 2.0 * (b * d + a * c)],
        [2.0 * (b * c + a * d), a * a + c * c - b * b - d * d, 2.0 * (c * d - a * b)],
        [2.0 * (b * d - a * c), 2.0 * (c * d + a * b), a * a + d * d - c * c - b * b],
    ];
    let m = std::array::from_fn(|i| [r[i][0] * xd, r[i][1] * yd, r[i][2] * zd]);
    (m, [h.quatern_x as f64, h.quatern_y as f64, h.quatern_z as f64])
}

fn col_norms(m: &[[f64; 3]; 3]) -> [f64; 3] {
    std::array::from_fn(|c| (0..3).map(|r| m[r][c] * m[r][c]).sum::<f64>().sqrt())
}

fn normalised(m: &[[f64; 3]; 3]) -> [[f64; 3]; 3] {
    let n = col_norms(m);
    std::array::from_fn(|r| std::array::from_fn(|c| m[r][c] / n[c]))
}

fn orthonormal(m: &[[f64; 3]; 3]) -> bool {
    let n = col_norms(m);
    if n.iter().any(|v| !(v.is_finite() && *v > 0.0)) {
        return false;
    }
    let u = normalised(m);
    (0..3).all(|a| {
        (0..3).all(|b| {
            let dot: f64 = (0..3).map(|k| u[a][k] * u[b][k]).sum();
            (dot - if a == b { 1.0 } else { 0.0 }).abs() <= 1e-4
        })
    })
}

fn close(a: &[[f64; 3]; 3], b: &[[f64; 3]; 3], tol: f64) -> bool {
    (0..3).all(|r| (0..3).all(|c| (a[r][c] - b[r][c]).abs() <= tol))
}

/// A NIfTI-1 header's geometry in LPS by the rule in the module doc. Errors name the field.
pub fn nifti_geometry(h: &NiftiHeader) -> anyhow::Result<Geometry> {
    let spacing: [f64; 3] = std::array::from_fn(|i| (h.pixdim[i + 1] as f64).abs());
    ensure!(
        spacing.iter().all(|s| s.is_finite() && *s > 0.0),
        "{WHERE}: `pixdim[1..=3]` = {:?}: the voxel spacing must be finite and non-zero",
        &h.pixdim[1..4]
    );
    let path = Path::new(WHERE);
    if h.qform_code <= 0 && h.sform_code <= 0 {
        return Geometry::new(spacing, [0.0; 3], super::geometry::IDENTITY, path, "pixdim");
    }
    let (sm, so) = mat([h.srow_x, h.srow_y, h.srow_z]);
    let (qm, qo) = qform(h);
    let (has_s, has_q) = (h.sform_code > 0, h.qform_code > 0);
    let identical =
        has_s && has_q && close(&sm, &qm, 1e-5) && (0..3).map(|i| (so[i] - qo[i]).abs()).sum::<f64>() <= 1e-7;
    let sform_rigid = has_s && orthonormal(&sm);
    let similar = || {
        close(&normalised(&sm), &normalised(&qm), 1e-4)
            && col_norms(&sm).iter().zip(col_norms(&qm)).all(|(a, b)| (a - b).abs() <= 1e-4)
            && (0..3).all(|i| (so[i] - qo[i]).abs() <= 1e-4)
    };
    let ((m, o), field) = if identical || (sform_rigid && (!has_q || h.sform_code == 1 || similar())) {
        ((sm, so), "srow_x/srow_y/srow_z (sform)")
    } else if has_q {
        ((qm, qo), "quatern_b/c/d (qform)")
    } else {
        bail!(
            "{WHERE}: `srow_x/srow_y/srow_z` (sform_code {}) is sheared or degenerate and there is no qform \
             (qform_code 0); only a rotation times a spacing is supported",
            h.sform_code
        );
    };
    // RAS to LPS: negate the x and y world components.
    let sign = [-1.0, -1.0, 1.0];
    let u = normalised(&m);
    let direction = std::array::from_fn(|r| std::array::from_fn(|c| sign[r] * u[r][c]));
    let origin = std::array::from_fn(|r| sign[r] * o[r]);
    Geometry::new(spacing, origin, direction, path, field)
}

/// Reads a NIfTI-1 volume (see the module doc) with its geometry.
pub fn read(path: &Path) -> anyhow::Result<Volume> {
    // The checked reader every NIfTI goes through: header fields, sizes and the decode limit
    // are verified before anything is allocated for the voxels.
    let (bytes, header) = crate::data::io::read_nifti(path)?;
    let geometry = nifti_geometry(&header).with_context(|| format!("{}", path.display()))?;
    let full_scale = crate::data::io::nifti_full_scale(&header);
    let volume = nifti::InMemNiftiVolume::from_reader(&bytes[header.vox_offset as usize..], &header)
        .with_context(|| format!("cannot read NIfTI voxels of {}", path.display()))?;
    drop(bytes);
    let (data, channels, shape) = channels_first(volume, path)?;
    Ok(Volume { data, channels, shape, geometry, full_scale })
}

/// NIfTI voxels, indexed [x, y, z(, c)], as our channels-first [c][z][y][x] with the shape
/// [z, y, x].
pub fn channels_first(volume: nifti::InMemNiftiVolume, path: &Path) -> anyhow::Result<(Vec<f32>, usize, [usize; 3])> {
    let arr =
        volume.into_ndarray::<f32>().with_context(|| format!("cannot decode NIfTI voxels of {}", path.display()))?;
    let dims = arr.shape().to_vec();
    ensure!(
        dims.len() == 3 || dims.len() == 4,
        "{}: `dim` {dims:?}: expected a 3D volume or 4D with channels last",
        path.display()
    );
    let channels = if dims.len() == 4 { dims[3] } else { 1 };
    let (x, y, z) = (dims[0], dims[1], dims[2]);
    let mut data = Vec::with_capacity(x * y * z * channels);
    for c in 0..channels {
        for k in 0..z {
            for j in 0..y {
                for i in 0..x {
                    data.push(if dims.len() == 4 { arr[[i, j, k, c]] } else { arr[[i, j, k]] });
                }
            }
        }
    }
    Ok((data, channels, [z, y, x]))
}
