//! Reading and writing images (via `image`) and volumes (via `nifti`).

use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, bail, ensure};
use image::{DynamicImage, GenericImageView, ImageDecoder};
use ndarray::{Array3, ShapeBuilder};
use nifti::{IntoNdArray, NiftiHeader, NiftiType};

use super::{DataConfig, Pair, Sample};

const IMAGE_EXTS: [&str; 6] = ["png", "tif", "tiff", "jpg", "jpeg", "bmp"];

pub fn is_volume(path: &Path) -> bool {
    let n = path.to_string_lossy().to_lowercase();
    n.ends_with(".nii") || n.ends_with(".nii.gz")
}

pub fn is_supported(path: &Path) -> bool {
    let ext = path.extension().map(|e| e.to_string_lossy().to_lowercase()).unwrap_or_default();
    is_volume(path) || IMAGE_EXTS.contains(&ext.as_str())
}

/// Raw channels-first voxels plus [depth, height, width].
pub struct Raw {
    pub data: Vec<f32>,
    pub channels: usize,
    pub shape: [usize; 3],
}

static MAX_DECODED_BYTES: AtomicU64 = AtomicU64::new(4 << 30);

/// The most bytes one image or volume may decode to (as f32 voxels, and for NIfTI also the
/// decompressed file). Headers declare sizes; without this bound a corrupt or hostile header
/// (a NIfTI of 65535^3 voxels, a PNG of 2^31 x 2^31 pixels) would make us allocate whatever it
/// says and abort. 4 GiB by default: 1 Gi voxels, e.g. a 1024^3 volume or a 32k x 32k image.
pub fn max_decoded_bytes() -> u64 {
    MAX_DECODED_BYTES.load(Ordering::Relaxed)
}

/// Changes [`max_decoded_bytes`] for the whole process (tests lower it; a user with larger
/// inputs would raise it).
pub fn set_max_decoded_bytes(bytes: u64) {
    MAX_DECODED_BYTES.store(bytes, Ordering::Relaxed);
}

fn too_big(path: &Path, what: &str, bytes: u128) -> anyhow::Error {
    anyhow::anyhow!(
        "{} declares {what}: {:.1} MiB, more than the {:.1} MiB an input may decode to",
        path.display(),
        bytes as f64 / (1u64 << 20) as f64,
        max_decoded_bytes() as f64 / (1u64 << 20) as f64
    )
}

fn decode(path: &Path, what: &str) -> anyhow::Result<DynamicImage> {
    let max = max_decoded_bytes();
    let bytes = std::fs::read(path).with_context(|| format!("cannot open {}", path.display()))?;
    check_tiff(path, &bytes)?;
    let mut reader = image::ImageReader::new(std::io::Cursor::new(&bytes[..]));
    if let Ok(format) = image::ImageFormat::from_path(path) {
        reader.set_format(format);
    }
    let mut reader = reader.with_guessed_format().with_context(|| format!("cannot read {}", path.display()))?;
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(max);
    reader.limits(limits);
    let decoder = reader.into_decoder().with_context(|| format!("cannot decode {what} {}", path.display()))?;
    // The decoder's own limit covers its buffer; we then convert to f32 (up to 3 planes).
    let (w, h) = decoder.dimensions();
    let planes = decoder.color_type().channel_count().min(3) as u128;
    let f32_bytes = w as u128 * h as u128 * planes * 4;
    if f32_bytes > max as u128 {
        return Err(too_big(path, &format!("a {w}x{h} {what}"), f32_bytes));
    }
    DynamicImage::from_decoder(decoder).with_context(|| format!("cannot decode {what} {}", path.display()))
}

/// The `tiff` crate (0.11) reserves what an IFD entry's count declares, up to 256 MiB, before
/// checking that the file holds that many values, and `image`'s limits reach it only after the
/// first IFD is read: so a 40 KB TIFF could make us allocate 256 MiB. Every entry of every IFD
/// is checked against the file's size first; anything else malformed is left to `tiff`.
fn check_tiff(path: &Path, b: &[u8]) -> anyhow::Result<()> {
    let le = match b.get(..2) {
        Some(b"II") => true,
        Some(b"MM") => false,
        _ => return Ok(()),
    };
    let uint = |at: u64, n: usize| -> Option<u64> {
        let s = b.get(usize::try_from(at).ok()?..)?.get(..n)?;
        let mut v = [0u8; 8];
        if le {
            v[..n].copy_from_slice(s);
            Some(u64::from_le_bytes(v))
        } else {
            v[8 - n..].copy_from_slice(s);
            Some(u64::from_be_bytes(v))
        }
    };
    let big = match uint(2, 2) {
        Some(42) => false,
        Some(43) => true,
        _ => return Ok(()),
    };
    let (count_len, entry_len, offset_len) = if big { (8, 20, 8) } else { (2, 12, 4) };
    let mut ifd = uint(if big { 8 } else { 4 }, offset_len).unwrap_or(0);
    // A cycle of IFDs is `tiff`'s to report; a few hundred pages are more than we read.
    for _ in 0..256 {
        let Some(n) = uint(ifd, count_len) else { break };
        for e in 0..n.min(b.len() as u64 / entry_len) {
            let at = ifd + count_len as u64 + e * entry_len; // e < len / entry_len: no overflow
            let (Some(tag), Some(kind), Some(count)) = (uint(at, 2), uint(at + 2, 2), uint(at + 4, offset_len)) else {
                break;
            };
            let size = match kind {
                3 | 8 => 2,
                4 | 9 | 11 | 13 => 4,
                5 | 10 | 12 | 16..=18 => 8,
                _ => 1,
            };
            ensure!(
                count.saturating_mul(size) <= b.len() as u64,
                "{}: TIFF tag {tag} declares {count} values, more than the file's {} bytes hold",
                path.display(),
                b.len()
            );
        }
        match uint((ifd + count_len as u64).saturating_add(n.saturating_mul(entry_len)), offset_len) {
            Some(next) if next != 0 => ifd = next,
            _ => break,
        }
    }
    Ok(())
}

fn read_image(path: &Path) -> anyhow::Result<Raw> {
    let img = decode(path, "image")?;
    let (w, h) = img.dimensions();
    let (w, h) = (w as usize, h as usize);
    let channels = img.color().channel_count() as usize;
    let (data, channels) = match (&img, channels) {
        (
            DynamicImage::ImageLuma8(_)
            | DynamicImage::ImageLuma16(_)
            | DynamicImage::ImageLumaA8(_)
            | DynamicImage::ImageLumaA16(_),
            _,
        ) => (img.to_luma32f().into_raw(), 1),
        (DynamicImage::ImageRgb32F(_) | DynamicImage::ImageRgba32F(_), _) | (_, 3 | 4) => {
            let rgb = img.to_rgb32f().into_raw();
            let planar = (0..3).flat_map(|c| rgb.iter().skip(c).step_by(3).copied().collect::<Vec<_>>()).collect();
            (planar, 3)
        }
        _ => (img.to_luma32f().into_raw(), 1),
    };
    Ok(Raw { data, channels, shape: [1, h, w] })
}

/// The whole NIfTI file (decompressed if gzipped) and its checked header. Read by us rather
/// than by `nifti::ReaderOptions`, which trusts the header: it reserves what `dim` and an
/// extension's `esize` declare, and reads the voxels right after the extensions whatever
/// `vox_offset` says.
fn read_nifti(path: &Path) -> anyhow::Result<(Vec<u8>, NiftiHeader)> {
    let p = path.display();
    let max = max_decoded_bytes();
    let mut file = std::fs::File::open(path).with_context(|| format!("cannot open NIfTI {p}"))?;
    let mut magic = [0u8; 2];
    let n = file.read(&mut magic).with_context(|| format!("cannot read NIfTI {p}"))?;
    let file = std::io::Read::chain(&magic[..n], file);
    let mut bytes = vec![];
    let read = if magic == [0x1f, 0x8b] {
        flate2::read::MultiGzDecoder::new(file).take(max + 1).read_to_end(&mut bytes)
    } else {
        file.take(max + 1).read_to_end(&mut bytes)
    };
    read.with_context(|| format!("cannot read NIfTI {p}"))?;
    if bytes.len() as u64 > max {
        return Err(too_big(path, "a NIfTI file larger than the limit", bytes.len() as u128));
    }
    let header = NiftiHeader::from_reader(&bytes[..]).with_context(|| format!("{p} is not a NIfTI-1 file"))?;
    check_header(path, &header, &bytes)?;
    Ok((bytes, header))
}

/// Every header field the reader relies on, checked against the bytes actually there.
fn check_header(path: &Path, h: &NiftiHeader, bytes: &[u8]) -> anyhow::Result<()> {
    let p = path.display();
    ensure!(&h.magic == b"n+1\0", "{p}: NIfTI magic {:?} (only single-file `n+1` NIfTI-1 is supported)", h.magic);
    let rank = h.dim[0] as usize;
    ensure!((1..=7).contains(&rank), "{p}: NIfTI dim[0] is {} (the number of axes must be 1..=7)", h.dim[0]);
    let dims = &h.dim[1..=rank];
    ensure!(dims.iter().all(|&d| d > 0), "{p}: NIfTI dim {dims:?} has an empty axis");
    use NiftiType::*;
    let datatype = h
        .data_type()
        .ok()
        .filter(|t| matches!(t, Uint8 | Int8 | Uint16 | Int16 | Uint32 | Int32 | Uint64 | Int64 | Float32 | Float64));
    let Some(datatype) = datatype else {
        bail!("{p}: NIfTI datatype {} is not supported (integer or float voxels only)", h.datatype);
    };
    let size = datatype.size_of();
    ensure!(
        h.bitpix as i64 == 8 * size as i64,
        "{p}: NIfTI bitpix {} does not match datatype {datatype:?} ({} bits)",
        h.bitpix,
        8 * size
    );
    let voxels = dims.iter().map(|&d| d as u128).product::<u128>();
    if voxels * 4 > max_decoded_bytes() as u128 {
        return Err(too_big(path, &format!("{voxels} voxels ({dims:?})"), voxels * 4));
    }
    let offset = h.vox_offset;
    ensure!(
        offset.is_finite() && offset >= 352.0 && offset <= bytes.len() as f32 && offset.fract() == 0.0,
        "{p}: NIfTI vox_offset {offset} is not a byte offset between 352 and the file's end ({})",
        bytes.len()
    );
    let need = offset as u128 + voxels * size as u128;
    ensure!(
        bytes.len() as u128 >= need,
        "{p} is truncated: its header declares {dims:?} {datatype:?} voxels from byte {offset}, {need} bytes, \
         but it has {}",
        bytes.len()
    );
    Ok(())
}

fn read_volume(path: &Path) -> anyhow::Result<(Raw, nifti::NiftiHeader)> {
    let (bytes, header) = read_nifti(path)?;
    let volume = nifti::InMemNiftiVolume::from_reader(&bytes[header.vox_offset as usize..], &header)
        .with_context(|| format!("cannot read NIfTI voxels of {}", path.display()))?;
    drop(bytes);
    let arr =
        volume.into_ndarray::<f32>().with_context(|| format!("cannot decode NIfTI voxels of {}", path.display()))?;
    let dims = arr.shape().to_vec();
    let channels = if dims.len() == 4 { dims[3] } else { 1 };
    ensure!(dims.len() == 3 || dims.len() == 4, "{}: expected a 3D volume, got shape {:?}", path.display(), dims);
    let (x, y, z) = (dims[0], dims[1], dims[2]);
    // NIfTI is indexed [x, y, z]; we store [c][z][y][x].
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
    Ok((Raw { data, channels, shape: [z, y, x] }, header))
}

pub fn read_raw(path: &Path) -> anyhow::Result<Raw> {
    if is_volume(path) { Ok(read_volume(path)?.0) } else { read_image(path) }
}

pub fn read_header(path: &Path) -> anyhow::Result<nifti::NiftiHeader> {
    Ok(read_nifti(path)?.1)
}

/// Reads an image, converts it to `cfg.channels`, checks its values and normalises it.
pub fn read_input(path: &Path, cfg: &DataConfig) -> anyhow::Result<(Vec<f32>, [usize; 3])> {
    let raw = read_raw(path)?;
    let n = raw.shape.iter().product::<usize>();
    if let Some(i) = raw.data.iter().position(|v| !v.is_finite()) {
        bail!("{} has a non-finite value at voxel {i}", path.display());
    }
    let data = match (raw.channels, cfg.channels) {
        (a, b) if a == b => raw.data,
        (1, 3) => raw.data.repeat(3),
        (3, 1) if raw.data[..n] == raw.data[n..2 * n] && raw.data[..n] == raw.data[2 * n..] => raw.data[..n].to_vec(),
        (a, b) => bail!("{} has {a} channel(s) but the model takes {b} (set --channels {a})", path.display()),
    };
    let mut data = data;
    cfg.normalize.apply(&mut data, cfg.channels);
    Ok((data, raw.shape))
}

/// Reads a mask as label ids: `> 0` for binary, the value itself for multi-class.
pub fn read_mask(path: &Path, classes: usize) -> anyhow::Result<(Vec<u8>, [usize; 3])> {
    let raw = if is_volume(path) {
        read_volume(path)?.0
    } else {
        let img = decode(path, "mask")?;
        let (w, h) = img.dimensions();
        let data = img.to_luma16().into_raw().into_iter().map(|v| v as f32).collect();
        Raw { data, channels: 1, shape: [1, h as usize, w as usize] }
    };
    ensure!(raw.channels == 1, "mask {} has {} channels; masks must be single-channel", path.display(), raw.channels);
    let mut labels = Vec::with_capacity(raw.data.len());
    for v in raw.data {
        ensure!(v.is_finite() && v >= 0.0, "mask {} has an invalid label value {v}", path.display());
        let id = if classes == 1 { (v > 0.0) as u8 } else { v.round() as usize as u8 };
        ensure!(
            classes == 1 || (id as usize) < classes,
            "mask {} has label {v} but --classes is {classes} (labels 0..{})",
            path.display(),
            classes - 1
        );
        labels.push(id);
    }
    Ok((labels, raw.shape))
}

pub fn read_pair(pair: &Pair, cfg: &DataConfig) -> anyhow::Result<Sample> {
    let (image, shape) = read_input(&pair.image, cfg)?;
    let mask = match &pair.mask {
        Some(m) => {
            let (mask, mshape) = read_mask(m, cfg.classes)?;
            ensure!(
                mshape == shape,
                "size mismatch: image {} is {} but mask {} is {}",
                pair.image.display(),
                fmt_shape(shape),
                m.display(),
                fmt_shape(mshape)
            );
            mask
        }
        None => vec![],
    };
    Ok(Sample { name: pair.name.clone(), image, mask, channels: cfg.channels, shape, source: pair.image.clone() })
}

pub fn fmt_shape(s: [usize; 3]) -> String {
    if s[0] == 1 { format!("{}x{}", s[2], s[1]) } else { format!("{}x{}x{}", s[2], s[1], s[0]) }
}

/// Writes a label map or a 0..255 probability map as an 8-bit PNG.
pub fn write_png(path: &Path, pixels: &[u8], shape: [usize; 3]) -> anyhow::Result<()> {
    let img = image::GrayImage::from_raw(shape[2] as u32, shape[1] as u32, pixels.to_vec()).context("buffer size")?;
    crate::fsio::write_with(path, |tmp| Ok(img.save(tmp)?))
}

/// Writes a volume with the reference image's header (affine, spacing) as NIfTI.
pub fn write_nifti<T: nifti::DataElement + bytemuck::Pod>(
    path: &Path,
    voxels: &[T],
    shape: [usize; 3],
    reference: &Path,
) -> anyhow::Result<()> {
    let mut header = read_header(reference)?;
    header.scl_slope = 1.0;
    header.scl_inter = 0.0;
    let [z, y, x] = shape;
    // Our buffer is [z][y][x], i.e. Fortran order for an (x, y, z) array.
    let arr = Array3::from_shape_vec((x, y, z).f(), voxels.to_vec())?;
    crate::fsio::write_with(path, |tmp| {
        Ok(nifti::writer::WriterOptions::new(tmp).reference_header(&header).write_nifti(&arr)?)
    })
}
