//! Predictions of a volume written back onto its input's grid, as NIfTI.
//!
//! The sample's array (LPS-aligned, see [`super::orient`]) is first put back into the input
//! file's own voxel order, so the prediction opened over its input lines up voxel for voxel.
//! A NIfTI input's own header is kept (sform and qform as they were); for NRRD and MetaImage
//! inputs the header is built from the input's geometry: the sform (code 1, scanner) holds the
//! same voxel-to-world matrix converted from LPS to NIfTI's RAS, and the qform is left unset
//! (code 0), which ITK, nibabel and FSL all read as "use the sform".

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
    let mut pixdim = [1.0f32; 8];
    (0..3).for_each(|a| pixdim[a + 1] = g.spacing[a] as f32);
    NiftiHeader {
        pixdim,
        sform_code: 1,
        qform_code: 0,
        srow_x: row(0),
        srow_y: row(1),
        srow_z: row(2),
        xyzt_units: 2, // millimetres
        ..NiftiHeader::default()
    }
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
