//! Predictions of a volume written back onto its input's grid, as NIfTI.
//!
//! The sample's array (LPS-aligned, see [`super::orient`]) is first put back into the input
//! file's own voxel order, so the prediction opened over its input lines up voxel for voxel.
//! A NIfTI input's own header is kept (sform and qform as they were); for NRRD and MetaImage
//! inputs the header is built from the input's geometry: sform and qform (both code 1, scanner)
//! hold the same voxel-to-world matrix converted from LPS to NIfTI's RAS, so tools that read
//! either (ITK and nibabel prefer the sform, some viewers read only the qform) agree.

use std::path::Path;

use anyhow::bail;
use nifti::NiftiHeader;

use super::Format;
use super::orient::Frame;
use crate::data::Sample;

/// A NIfTI header whose sform places voxels where `frame`'s file grid does.
pub fn header_for(frame: &Frame) -> NiftiHeader {
    let g = &frame.file;
    let sign = [-1.0, -1.0, 1.0]; // LPS to RAS
    let row = |r: usize| -> [f32; 4] {
        let m = |c: usize| (sign[r] * g.direction[r][c] * g.spacing[c]) as f32;
        [m(0), m(1), m(2), (sign[r] * g.origin[r]) as f32]
    };
    let ras: [[f64; 3]; 3] = std::array::from_fn(|r| std::array::from_fn(|c| sign[r] * g.direction[r][c]));
    let (qfac, [b, c, d]) = quaternion(ras);
    let mut pixdim = [1.0f32; 8];
    pixdim[0] = qfac;
    (0..3).for_each(|a| pixdim[a + 1] = g.spacing[a] as f32);
    NiftiHeader {
        pixdim,
        sform_code: 1,
        qform_code: 1,
        srow_x: row(0),
        srow_y: row(1),
        srow_z: row(2),
        quatern_b: b,
        quatern_c: c,
        quatern_d: d,
        quatern_x: row(0)[3],
        quatern_y: row(1)[3],
        quatern_z: row(2)[3],
        xyzt_units: 2, // millimetres
        ..NiftiHeader::default()
    }
}

/// The qform of an orthonormal RAS direction: `qfac` (pixdim[0], -1 for a left-handed one,
/// whose third axis the quaternion then sees negated) and quaternion `b, c, d`, as
/// `nifti_mat44_to_quatern` computes them.
fn quaternion(mut r: [[f64; 3]; 3]) -> (f32, [f32; 3]) {
    let det = r[0][0] * (r[1][1] * r[2][2] - r[1][2] * r[2][1]) - r[0][1] * (r[1][0] * r[2][2] - r[1][2] * r[2][0])
        + r[0][2] * (r[1][0] * r[2][1] - r[1][1] * r[2][0]);
    let qfac = if det < 0.0 { -1.0 } else { 1.0 };
    (0..3).for_each(|i| r[i][2] *= qfac);
    let trace = r[0][0] + r[1][1] + r[2][2] + 1.0;
    let (a, mut b, mut c, mut d);
    if trace > 0.5 {
        a = 0.5 * trace.sqrt();
        b = 0.25 * (r[2][1] - r[1][2]) / a;
        c = 0.25 * (r[0][2] - r[2][0]) / a;
        d = 0.25 * (r[1][0] - r[0][1]) / a;
    } else {
        let xd = 1.0 + r[0][0] - (r[1][1] + r[2][2]);
        let yd = 1.0 + r[1][1] - (r[0][0] + r[2][2]);
        let zd = 1.0 + r[2][2] - (r[0][0] + r[1][1]);
        if xd > 1.0 {
            b = 0.5 * xd.sqrt();
            c = 0.25 * (r[0][1] + r[1][0]) / b;
            d = 0.25 * (r[0][2] + r[2][0]) / b;
            a = 0.25 * (r[2][1] - r[1][2]) / b;
        } else if yd > 1.0 {
            c = 0.5 * yd.sqrt();
            b = 0.25 * (r[0][1] + r[1][0]) / c;
            d = 0.25 * (r[1][2] + r[2][1]) / c;
            a = 0.25 * (r[0][2] - r[2][0]) / c;
        } else {
            d = 0.5 * zd.sqrt();
            b = 0.25 * (r[0][2] + r[2][0]) / d;
            c = 0.25 * (r[1][2] + r[2][1]) / d;
            a = 0.25 * (r[1][0] - r[0][1]) / d;
        }
        if a < 0.0 {
            (b, c, d) = (-b, -c, -d);
        }
    }
    (qfac as f32, [b as f32, c as f32, d as f32])
}

/// Writes one plane of `s`'s voxels (`s.shape`, the sample's layout) to `path` as NIfTI on the
/// grid of `s.source` (module doc).
pub fn prediction<T: nifti::DataElement + bytemuck::Pod + Default>(
    path: &Path,
    voxels: &[T],
    s: &Sample,
) -> anyhow::Result<()> {
    let Some(frame) = &s.geometry else {
        // A volume sample built without its frame is in the file's layout.
        if Format::of(&s.source) == Some(Format::Nifti) {
            return crate::data::io::write_nifti(path, voxels, s.shape, &s.source);
        }
        bail!("{}: no geometry to write a prediction for {} with", path.display(), s.source.display());
    };
    let file = frame.orientation.undo(voxels, 1, frame.file_shape);
    match Format::of(&s.source) {
        Some(Format::Nifti) => crate::data::io::write_nifti(path, &file, frame.file_shape, &s.source),
        _ => crate::data::io::write_nifti_header(path, &file, frame.file_shape, header_for(frame)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::volume::Geometry;
    use crate::data::volume::nifti::nifti_geometry;
    use crate::data::volume::orient::Orientation;

    fn assert_close(a: &Geometry, b: &Geometry, what: &str) {
        let all = |g: &Geometry| [g.spacing.to_vec(), g.origin.to_vec(), g.direction.as_flattened().to_vec()].concat();
        assert!(all(a).iter().zip(all(b)).all(|(x, y)| (x - y).abs() < 1e-5), "{what}: {a:?} vs {b:?}");
    }

    /// The header's sform and qform each give back the input's geometry, for an oblique
    /// left-handed grid, axis permutations with flips, and a rotation of 180 degrees (the
    /// quaternion's small-trace branches).
    #[test]
    fn sform_and_qform_both_hold_the_input_geometry() {
        let (c, s) = (0.3f64.cos(), 0.3f64.sin());
        let mut dirs =
            vec![[[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, -1.0]], [[-1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, 1.0]]];
        for perm in [[1, 0, 2], [2, 0, 1], [0, 2, 1]] {
            for flip in [[false, true, false], [true, true, true], [false; 3]] {
                let o = Orientation { perm, flip };
                let mut d = [[0.0; 3]; 3];
                (0..3).for_each(|a| d[a][o.perm[a]] = if o.flip[a] { -1.0 } else { 1.0 });
                dirs.push(d);
            }
        }
        for direction in dirs {
            let file = Geometry { spacing: [0.7, 1.3, 2.5], origin: [-12.5, 30.25, 7.0], direction };
            let frame = Frame { file, file_shape: [4, 5, 6], orientation: Orientation::IDENTITY };
            let h = header_for(&frame);
            assert_close(&nifti_geometry(&h).unwrap(), &file, "sform");
            let qform_only = NiftiHeader { sform_code: 0, ..h.clone() };
            assert_close(&nifti_geometry(&qform_only).unwrap(), &file, "qform");
        }
    }
}
