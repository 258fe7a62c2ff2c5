//! 3D volumes with their physical geometry: NIfTI-1 ([`nifti`]), NRRD ([`nrrd`]), MetaImage
//! ([`metaimage`]) and DICOM series (a folder, [`dicom`]). Each format has one entry point,
//! `read(path) -> anyhow::Result<Volume>`; [`read`] picks it by file name or folder ([`Format`]).
//! Train/eval/predict give volumes to the network LPS-aligned ([`orient`]) and write predictions
//! back on the input's grid ([`write`]).
//!
//! Every reader returns voxels channels-first as `[c][z][y][x]` (x fastest, as stored on disk by
//! all three file formats and DICOM) in the file's own units (integers as stored, no rescaling;
//! DICOM's rescale slope/intercept applied, as SimpleITK does), plus a
//! [`Geometry`] in ONE world convention: ITK/SimpleITK's LPS (x grows to the patient's Left,
//! y to Posterior, z to Superior), which is what nnU-Net and SimpleITK report. NIfTI's and
//! RAS-space NRRD's RAS coordinates are converted by negating their first two components.
//!
//! What every reader refuses, with an error naming the file and the field (never a panic):
//! a header that is not valid for its format, a size that overflows, decodes to more than
//! `io::max_decoded_bytes` or asks for more voxels than the data present holds (or data left
//! over), an unknown element type or encoding, a
//! spatial dimension other than 3, and a geometry that is not a rotation times a positive scale.

pub mod dicom;
pub mod geometry;
pub mod metaimage;
pub mod nifti;
pub mod nrrd;
pub mod orient;
pub mod resample;
pub mod spacing;
pub mod write;

use std::io::Read;
use std::path::Path;

use anyhow::{Context, bail, ensure};

pub use geometry::Geometry;

/// A volume in the file's own units with its geometry.
#[derive(Clone, Debug, PartialEq)]
pub struct Volume {
    /// Channels-first voxels, `[c][z][y][x]`.
    pub data: Vec<f32>,
    pub channels: usize,
    /// `[z, y, x]`; note [`Geometry`]'s arrays are in ITK's `x, y, z` order.
    pub shape: [usize; 3],
    pub geometry: Geometry,
    /// The full scale of the stored sample type (255 for 8-bit, the type's maximum for other
    /// integers, 1 for floating-point or rescaled data), which `--normalize imagenet` divides by.
    pub full_scale: f32,
}

/// The 3D formats by file name: NIfTI (`.nii`, `.nii.gz`), NRRD (`.nrrd`, `.nhdr`) and
/// MetaImage (`.mha`, `.mhd`), case-insensitive. A detached header's data file (`.raw`,
/// `.raw.gz`, `.zraw`) is none of them: it is read through its header. A folder is a DICOM
/// series when it holds a DICOM file ([`dicom::is_series_dir`]), whatever its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Nifti,
    Nrrd,
    MetaImage,
    Dicom,
}

impl Format {
    pub fn of(path: &Path) -> Option<Format> {
        if path.is_dir() {
            return dicom::is_series_dir(path).then_some(Format::Dicom);
        }
        let n = path.file_name()?.to_string_lossy().to_lowercase();
        let ends = |exts: &[&str]| exts.iter().any(|e| n.ends_with(e));
        if ends(&[".nii", ".nii.gz"]) {
            Some(Format::Nifti)
        } else if ends(&[".nrrd", ".nhdr"]) {
            Some(Format::Nrrd)
        } else if ends(&[".mha", ".mhd"]) {
            Some(Format::MetaImage)
        } else {
            None
        }
    }
}

/// Reads a volume in any of the [`Format`]s, in its file's own layout.
pub fn read(path: &Path) -> anyhow::Result<Volume> {
    match Format::of(path) {
        Some(Format::Nifti) => nifti::read(path),
        Some(Format::Nrrd) => nrrd::read(path),
        Some(Format::MetaImage) => metaimage::read(path),
        Some(Format::Dicom) => dicom::read(path),
        None => bail!(
            "{}: not a volume (.nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd, or a folder of DICOM files)",
            path.display()
        ),
    }
}

/// The sample types the NRRD and MetaImage readers decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Elem {
    I8,
    U8,
    I16,
    U16,
    I32,
    U32,
    I64,
    U64,
    F32,
    F64,
}

impl Elem {
    pub(crate) fn size(self) -> usize {
        match self {
            Elem::I8 | Elem::U8 => 1,
            Elem::I16 | Elem::U16 => 2,
            Elem::I32 | Elem::U32 | Elem::F32 => 4,
            Elem::I64 | Elem::U64 | Elem::F64 => 8,
        }
    }

    pub(crate) fn full_scale(self) -> f32 {
        match self {
            Elem::I8 => i8::MAX as f32,
            Elem::U8 => u8::MAX as f32,
            Elem::I16 => i16::MAX as f32,
            Elem::U16 => u16::MAX as f32,
            Elem::I32 => i32::MAX as f32,
            Elem::U32 => u32::MAX as f32,
            Elem::I64 => i64::MAX as f32,
            Elem::U64 => u64::MAX as f32,
            Elem::F32 | Elem::F64 => 1.0,
        }
    }
}

/// Decodes `bytes` (exactly a whole number of samples) to f32. 64-bit integers and doubles are
/// rounded to the nearest f32, as everywhere else in unetpp.
pub(crate) fn decode(bytes: &[u8], elem: Elem, big_endian: bool) -> Vec<f32> {
    macro_rules! conv {
        ($t:ty, $n:expr) => {
            bytes
                .chunks_exact($n)
                .map(|c| {
                    let a: [u8; $n] = c.try_into().unwrap();
                    (if big_endian { <$t>::from_be_bytes(a) } else { <$t>::from_le_bytes(a) }) as f32
                })
                .collect()
        };
    }
    match elem {
        Elem::I8 => bytes.iter().map(|&b| b as i8 as f32).collect(),
        Elem::U8 => bytes.iter().map(|&b| b as f32).collect(),
        Elem::I16 => conv!(i16, 2),
        Elem::U16 => conv!(u16, 2),
        Elem::I32 => conv!(i32, 4),
        Elem::U32 => conv!(u32, 4),
        Elem::I64 => conv!(i64, 8),
        Elem::U64 => conv!(u64, 8),
        Elem::F32 => conv!(f32, 4),
        Elem::F64 => conv!(f64, 8),
    }
}

/// How the voxel bytes are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Compression {
    None,
    Gzip,
    Zlib,
}

/// The number of bytes `sizes` samples of `elem` take, refusing overflow and more than
/// [`crate::data::io::max_decoded_bytes`] once decoded (as stored or as f32, whichever is
/// larger): a header may not make us decompress or allocate what it likes.
pub(crate) fn byte_count(path: &Path, field: &str, sizes: &[usize], elem: Elem) -> anyhow::Result<usize> {
    let total = sizes
        .iter()
        .chain([&elem.size()])
        .try_fold(1usize, |acc, &s| acc.checked_mul(s))
        .with_context(|| format!("{}: `{field}` {sizes:?} overflows the address space", path.display()))?;
    let decoded = (total / elem.size()) as u128 * elem.size().max(4) as u128;
    let max = crate::data::io::max_decoded_bytes();
    ensure!(
        decoded <= max as u128,
        "{}: `{field}` {sizes:?} declares {:.1} MiB of voxels, more than the {:.1} MiB an input may decode to",
        path.display(),
        decoded as f64 / (1u64 << 20) as f64,
        max as f64 / (1u64 << 20) as f64
    );
    Ok(total)
}

/// Exactly `need` payload bytes from `raw` (the bytes after the header, or a detached data
/// file's), decompressed when asked. Memory grows only with data actually present, so a header
/// claiming more than the file holds is an error, not a huge allocation.
pub(crate) fn payload(path: &Path, raw: &[u8], compression: Compression, need: usize) -> anyhow::Result<Vec<u8>> {
    let short = |got: usize| {
        anyhow::anyhow!(
            "{}: the header declares {need} bytes of voxel data but the file holds {got}{}",
            path.display(),
            if compression == Compression::None { "" } else { " after decompression" }
        )
    };
    let limit = need as u64 + 1;
    let mut out = Vec::new();
    let res = match compression {
        Compression::None => {
            ensure!(raw.len() >= need, short(raw.len()));
            ensure!(
                raw.len() == need,
                "{}: {} bytes of voxel data where the header declares {need}",
                path.display(),
                raw.len()
            );
            return Ok(raw.to_vec());
        }
        Compression::Gzip => flate2::read::MultiGzDecoder::new(raw).take(limit).read_to_end(&mut out),
        Compression::Zlib => flate2::read::ZlibDecoder::new(raw).take(limit).read_to_end(&mut out),
    };
    if let Err(e) = res {
        bail!("{}: corrupt compressed voxel data: {e}", path.display());
    }
    ensure!(out.len() >= need, short(out.len()));
    ensure!(out.len() == need, "{}: more voxel data than the header declares ({need} bytes)", path.display());
    Ok(out)
}

/// Reorders interleaved samples (`channels` per voxel, fastest) to channels-first.
pub(crate) fn planar(v: Vec<f32>, channels: usize) -> Vec<f32> {
    if channels == 1 {
        return v;
    }
    (0..channels).flat_map(|c| v.iter().skip(c).step_by(channels).copied().collect::<Vec<_>>()).collect()
}

/// Reads a whole file, naming it on failure.
pub(crate) fn read_file(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

/// Resolves a detached data file named in `header`'s header, relative to the header's folder.
pub(crate) fn detached(header: &Path, name: &str) -> std::path::PathBuf {
    let p = Path::new(name);
    if p.is_absolute() { p.to_path_buf() } else { header.parent().unwrap_or(Path::new(".")).join(p) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_respects_type_and_byte_order() {
        assert_eq!(decode(&[0x01, 0x2c], Elem::U16, true), vec![300.0]);
        assert_eq!(decode(&[0x2c, 0x01], Elem::U16, false), vec![300.0]);
        assert_eq!(decode(&[0xff, 0xff], Elem::I16, false), vec![-1.0]);
        assert_eq!(decode(&[0xff], Elem::I8, false), vec![-1.0]);
        assert_eq!(decode(&2.5f64.to_be_bytes(), Elem::F64, true), vec![2.5]);
    }

    #[test]
    fn payload_refuses_short_long_and_corrupt_data() {
        let p = Path::new("v.nrrd");
        assert!(payload(p, &[0; 8], Compression::None, 8).is_ok());
        let e = payload(p, &[0; 7], Compression::None, 8).unwrap_err().to_string();
        assert!(e.contains("v.nrrd") && e.contains("declares 8") && e.contains("holds 7"), "{e}");
        assert!(payload(p, &[0; 9], Compression::None, 8).is_err());
        let e = payload(p, b"not gzip", Compression::Gzip, 8).unwrap_err().to_string();
        assert!(e.contains("v.nrrd") && e.contains("corrupt"), "{e}");
        let e = byte_count(p, "sizes", &[usize::MAX, 2], Elem::U8).unwrap_err().to_string();
        assert!(e.contains("sizes") && e.contains("overflows"), "{e}");
        // 2^40 voxels: a few bytes of header must not make us decompress or allocate 4 TiB.
        let e = byte_count(p, "sizes", &[1 << 20, 1 << 20], Elem::U8).unwrap_err().to_string();
        assert!(e.contains("v.nrrd") && e.contains("sizes") && e.contains("MiB an input may decode to"), "{e}");
    }

    #[test]
    fn planar_reorders_interleaved_channels() {
        assert_eq!(planar(vec![1.0, 10.0, 2.0, 20.0], 2), vec![1.0, 2.0, 10.0, 20.0]);
    }
}
