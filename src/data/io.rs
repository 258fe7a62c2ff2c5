//! Reading and writing images (via `image`) and volumes (NIfTI, NRRD, MetaImage: see
//! [`super::volume`]). Volumes are given to the network LPS-aligned ([`super::volume::orient`]).

use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, bail, ensure};
use image::{DynamicImage, GenericImageView, ImageDecoder};
use ndarray::{Array3, ShapeBuilder};
use nifti::{NiftiHeader, NiftiType};

use super::volume::orient::Frame;
use super::volume::{Format, Geometry};
use super::{DataConfig, Pair, Sample};

const IMAGE_EXTS: [&str; 6] = ["png", "tif", "tiff", "jpg", "jpeg", "bmp"];

/// NIfTI, NRRD or MetaImage by name ([`Format::of`]).
pub fn is_volume(path: &Path) -> bool {
    Format::of(path).is_some()
}

pub fn is_supported(path: &Path) -> bool {
    let ext = path.extension().map(|e| e.to_string_lossy().to_lowercase()).unwrap_or_default();
    is_volume(path) || IMAGE_EXTS.contains(&ext.as_str())
}

/// Raw channels-first voxels in the file's own units (8-bit 0..255, 16-bit 0..65535, floats and
/// NIfTI as stored), plus [depth, height, width], in the file's own voxel order.
pub struct Raw {
    pub data: Vec<f32>,
    pub channels: usize,
    pub shape: [usize; 3],
    /// A volume's geometry; `None` for 2D images.
    pub geometry: Option<Geometry>,
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

/// The first `channels` samples of each `stride`-sample pixel, channel-planar.
fn planar<T: Copy + Into<f32>>(v: &[T], stride: usize, channels: usize) -> Vec<f32> {
    (0..channels).flat_map(|c| v.iter().skip(c).step_by(stride).map(|&x| x.into())).collect()
}

/// A 2D image in the file's own units (alpha dropped) and its sample type's full scale.
fn read_image(path: &Path, what: &str) -> anyhow::Result<(Raw, f32)> {
    if let Some(grey) = read_tiff_grey(path, what)? {
        return Ok(grey);
    }
    let img = decode(path, what)?;
    let (w, h) = img.dimensions();
    let shape = [1, h as usize, w as usize];
    let raw = |data, channels| Raw { data, channels, shape, geometry: None };
    Ok(match &img {
        DynamicImage::ImageLuma8(b) => (raw(planar(b.as_raw(), 1, 1), 1), 255.0),
        DynamicImage::ImageLumaA8(b) => (raw(planar(b.as_raw(), 2, 1), 1), 255.0),
        DynamicImage::ImageRgb8(b) => (raw(planar(b.as_raw(), 3, 3), 3), 255.0),
        DynamicImage::ImageRgba8(b) => (raw(planar(b.as_raw(), 4, 3), 3), 255.0),
        DynamicImage::ImageLuma16(b) => (raw(planar(b.as_raw(), 1, 1), 1), 65535.0),
        DynamicImage::ImageLumaA16(b) => (raw(planar(b.as_raw(), 2, 1), 1), 65535.0),
        DynamicImage::ImageRgb16(b) => (raw(planar(b.as_raw(), 3, 3), 3), 65535.0),
        DynamicImage::ImageRgba16(b) => (raw(planar(b.as_raw(), 4, 3), 3), 65535.0),
        DynamicImage::ImageRgb32F(b) => (raw(planar(b.as_raw(), 3, 3), 3), 1.0),
        DynamicImage::ImageRgba32F(b) => (raw(planar(b.as_raw(), 4, 3), 3), 1.0),
        other => bail!("{what} {} has an unsupported pixel type {:?}", path.display(), other.color()),
    })
}

/// Grey TIFFs the `image` crate refuses (32/64-bit, floating-point or signed samples), read with
/// the `tiff` crate; `None` for any other file, which `image` reads.
fn read_tiff_grey(path: &Path, what: &str) -> anyhow::Result<Option<(Raw, f32)>> {
    use tiff::decoder::{Decoder, DecodingResult as D};
    let guessed = image::ImageReader::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    if guessed.with_guessed_format()?.format() != Some(image::ImageFormat::Tiff) {
        return Ok(None);
    }
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    // A file the `tiff` crate cannot even open is left to `image`, which reports it.
    let Ok(mut dec) = Decoder::new(std::io::BufReader::new(file)) else { return Ok(None) };
    let Ok(tiff::ColorType::Gray(bits)) = dec.colortype() else { return Ok(None) };
    let formats = dec.find_tag_unsigned_vec::<u16>(tiff::tags::Tag::SampleFormat).ok().flatten().unwrap_or_default();
    if matches!(bits, 1 | 8 | 16) && formats.iter().all(|&f| f == 1) {
        return Ok(None);
    }
    let cannot = || format!("cannot decode {what} {}", path.display());
    let (w, h) = dec.dimensions().with_context(cannot)?;
    let conv = |v: Vec<f32>, full: f64| (v, full as f32);
    let (data, full_scale) = match dec.read_image().with_context(cannot)? {
        D::U8(v) => conv(planar(&v, 1, 1), u8::MAX.into()),
        D::U16(v) => conv(planar(&v, 1, 1), u16::MAX.into()),
        D::U32(v) => conv(v.into_iter().map(|x| x as f32).collect(), u32::MAX.into()),
        D::U64(v) => conv(v.into_iter().map(|x| x as f32).collect(), u64::MAX as f64),
        D::I8(v) => conv(planar(&v, 1, 1), i8::MAX.into()),
        D::I16(v) => conv(planar(&v, 1, 1), i16::MAX.into()),
        D::I32(v) => conv(v.into_iter().map(|x| x as f32).collect(), i32::MAX.into()),
        D::I64(v) => conv(v.into_iter().map(|x| x as f32).collect(), i64::MAX as f64),
        D::F16(v) => conv(v.into_iter().map(f32::from).collect(), 1.0),
        D::F32(v) => conv(v, 1.0),
        D::F64(v) => conv(v.into_iter().map(|x| x as f32).collect(), 1.0),
    };
    let (w, h) = (w as usize, h as usize);
    ensure!(data.len() == w * h, "{what} {}: {} samples for {w}x{h} pixels", path.display(), data.len());
    Ok(Some((Raw { data, channels: 1, shape: [1, h, w], geometry: None }, full_scale)))
}

/// The full scale of a NIfTI file's integer voxel type; 1 for floats and scaled (scl_slope)
/// data, taken as already in [0, 1].
pub(crate) fn nifti_full_scale(header: &nifti::NiftiHeader) -> f32 {
    use nifti::NiftiType as T;
    if !(header.scl_slope == 0.0 || header.scl_slope == 1.0) || header.scl_inter != 0.0 {
        return 1.0;
    }
    match header.data_type() {
        Ok(T::Uint8) => u8::MAX as f32,
        Ok(T::Int8) => i8::MAX as f32,
        Ok(T::Uint16) => u16::MAX as f32,
        Ok(T::Int16) => i16::MAX as f32,
        Ok(T::Uint32) => u32::MAX as f32,
        Ok(T::Int32) => i32::MAX as f32,
        Ok(T::Uint64) => u64::MAX as f32,
        Ok(T::Int64) => i64::MAX as f32,
        _ => 1.0,
    }
}

/// The whole NIfTI file (decompressed if gzipped) and its checked header. Read by us rather
/// than by `nifti::ReaderOptions`, which trusts the header: it reserves what `dim` and an
/// extension's `esize` declare, and reads the voxels right after the extensions whatever
/// `vox_offset` says.
pub(crate) fn read_nifti(path: &Path) -> anyhow::Result<(Vec<u8>, NiftiHeader)> {
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

fn read_volume(path: &Path) -> anyhow::Result<(Raw, f32)> {
    let v = super::volume::read(path)?;
    Ok((Raw { data: v.data, channels: v.channels, shape: v.shape, geometry: Some(v.geometry) }, v.full_scale))
}

/// Puts a volume's planes into the LPS-aligned layout; 2D images pass through.
pub(crate) fn oriented<T: Copy>(
    data: Vec<T>,
    channels: usize,
    geometry: Option<Geometry>,
    shape: [usize; 3],
) -> (Vec<T>, [usize; 3], Option<Frame>) {
    match geometry {
        Some(g) => {
            let frame = Frame::canonical(g, shape);
            let (data, shape) = frame.apply(&data, channels);
            (data, shape, Some(frame))
        }
        None => (data, shape, None),
    }
}

/// An image or volume in the file's own units.
pub fn read_raw(path: &Path) -> anyhow::Result<Raw> {
    Ok(read_scaled(path)?.0)
}

/// [`read_raw`] plus the full scale of the file's sample type (255 for 8-bit, 65535 for 16-bit,
/// the maximum of other integer types, 1 for floating-point data).
pub fn read_scaled(path: &Path) -> anyhow::Result<(Raw, f32)> {
    if is_volume(path) { read_volume(path) } else { read_image(path, "image") }
}

pub fn read_header(path: &Path) -> anyhow::Result<nifti::NiftiHeader> {
    Ok(read_nifti(path)?.1)
}

/// Reads an image, converts it to `cfg.channels`, checks its values and normalises it.
pub fn read_input(path: &Path, cfg: &DataConfig) -> anyhow::Result<(Vec<f32>, [usize; 3])> {
    read_input_framed(path, cfg).map(|(data, shape, _)| (data, shape))
}

/// [`read_input`], a volume LPS-aligned, with the frame that puts it back on its file's grid.
pub fn read_input_framed(path: &Path, cfg: &DataConfig) -> anyhow::Result<(Vec<f32>, [usize; 3], Option<Frame>)> {
    let (raw, full_scale) = read_scaled(path)?;
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
    let norms = cfg.nnunet.as_ref().map(|n| n.norms.as_slice()).unwrap_or_default();
    super::intensity::normalize(&mut data, cfg.channels, norms, cfg.normalize, full_scale);
    Ok(oriented(data, cfg.channels, raw.geometry, raw.shape))
}

/// Reads a mask as label ids in the file's own values: `> 0` is foreground for binary
/// (`classes == 1`), the value itself the class for multi-class. A value that is negative, not
/// a whole number, or (multi-class) not below `classes` and 256 is an error naming the file.
pub fn read_mask(path: &Path, classes: usize) -> anyhow::Result<(Vec<u8>, [usize; 3])> {
    read_mask_framed(path, classes).map(|(labels, shape, _)| (labels, shape))
}

/// [`read_mask`], a volume LPS-aligned by its own geometry, with its frame.
pub fn read_mask_framed(path: &Path, classes: usize) -> anyhow::Result<(Vec<u8>, [usize; 3], Option<Frame>)> {
    let raw = if is_volume(path) { read_volume(path)?.0 } else { read_image(path, "mask")?.0 };
    // Labels are stored as u8.
    let top = classes.clamp(1, 256) - 1;
    let n = raw.shape.iter().product::<usize>();
    let values = match raw.channels {
        1 => raw.data,
        // Grey masks saved as RGB are common; colour ones only say foreground or not.
        3 if !is_volume(path) => {
            let (r, gb) = raw.data.split_at(n);
            let (g, b) = gb.split_at(n);
            if r == g && g == b {
                r.to_vec()
            } else {
                ensure!(
                    classes == 1,
                    "mask {} is in colour; multi-class masks must hold the class ids (0..{top}) as grey values",
                    path.display()
                );
                (0..n).map(|i| r[i].max(g[i]).max(b[i])).collect()
            }
        }
        c => bail!("mask {} has {c} channels; masks must be single-channel", path.display()),
    };
    let allowed = if classes == 1 {
        "0 for background, any positive whole number for foreground".to_string()
    } else {
        format!("labels 0..{top}")
    };
    let mut labels = Vec::with_capacity(values.len());
    for v in values {
        ensure!(v.is_finite(), "mask {} has a non-finite value {v} ({allowed})", path.display());
        ensure!(v >= 0.0 && v.fract() == 0.0, "mask {} has an invalid label value {v} ({allowed})", path.display());
        let id = if classes == 1 {
            (v > 0.0) as u8
        } else {
            ensure!(v <= top as f32, "mask {} has label {v} but --classes is {classes} ({allowed})", path.display());
            v as u8
        };
        labels.push(id);
    }
    Ok(oriented(labels, 1, raw.geometry, raw.shape))
}

pub fn read_pair(pair: &Pair, cfg: &DataConfig) -> anyhow::Result<Sample> {
    if !pair.channels.is_empty() {
        return super::layout::read_case(pair, cfg);
    }
    let (image, shape, geometry) = read_input_framed(&pair.image, cfg)?;
    let mask = match &pair.mask {
        Some(m) => {
            let (mask, mshape, mframe) = read_mask_framed(m, cfg.classes)?;
            // Labels follow their image: both are LPS-aligned by their own headers, which must put
            // them on one grid. Sizes that differ in the files are reported as such below.
            if let (Some(a), Some(b)) = (&geometry, &mframe)
                && (mshape == shape || a.file_shape == b.file_shape)
            {
                super::volume::orient::ensure_same_grid(&pair.image, a, m, b)?;
            }
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
    Ok(Sample {
        name: pair.name.clone(),
        image,
        mask,
        channels: cfg.channels,
        shape,
        source: pair.image.clone(),
        geometry,
    })
}

pub fn fmt_shape(s: [usize; 3]) -> String {
    if s[0] == 1 { format!("{}x{}", s[2], s[1]) } else { format!("{}x{}x{}", s[2], s[1], s[0]) }
}

/// An 8-bit PNG (grey or RGB) in memory, marked as unetpp's output (see [`crate::output`]).
/// Encoding to memory first means a full disk fails the one `write_all` that `fsio` checks,
/// instead of a buffered writer's last flush that nobody checks.
pub fn encode_png(pixels: &[u8], width: usize, height: usize, rgb: bool) -> anyhow::Result<Vec<u8>> {
    let channels = if rgb { 3 } else { 1 };
    ensure!(pixels.len() == width * height * channels, "PNG buffer of {} bytes for {width}x{height}", pixels.len());
    let mut bytes = vec![];
    let mut enc = png::Encoder::new(&mut bytes, width as u32, height as u32);
    enc.set_color(if rgb { png::ColorType::Rgb } else { png::ColorType::Grayscale });
    enc.set_depth(png::BitDepth::Eight);
    enc.add_text_chunk(crate::output::PNG_KEYWORD.into(), crate::output::MARK.into())?;
    let mut w = enc.write_header()?;
    w.write_image_data(pixels)?;
    w.finish()?;
    Ok(bytes)
}

/// Writes a label map or a 0..255 probability map as an 8-bit PNG.
pub fn write_png(path: &Path, pixels: &[u8], shape: [usize; 3]) -> anyhow::Result<()> {
    let bytes = encode_png(pixels, shape[2], shape[1], false)?;
    crate::fsio::write_atomic(path, &bytes)
}

/// Writes a volume with the reference image's header (affine, spacing) as NIfTI, marked as
/// unetpp's output in `descrip`.
pub fn write_nifti<T: nifti::DataElement + bytemuck::Pod>(
    path: &Path,
    voxels: &[T],
    shape: [usize; 3],
    reference: &Path,
) -> anyhow::Result<()> {
    write_nifti_header(path, voxels, shape, read_header(reference)?)
}

/// [`write_nifti`] with `header`'s geometry (its `dim` and `datatype` follow `voxels`).
pub fn write_nifti_header<T: nifti::DataElement + bytemuck::Pod>(
    path: &Path,
    voxels: &[T],
    shape: [usize; 3],
    mut header: nifti::NiftiHeader,
) -> anyhow::Result<()> {
    header.scl_slope = 1.0;
    header.scl_inter = 0.0;
    header.set_description(crate::output::NIFTI_DESCRIP.as_bytes())?;
    let [z, y, x] = shape;
    // Our buffer is [z][y][x], i.e. Fortran order for an (x, y, z) array.
    let arr = Array3::from_shape_vec((x, y, z).f(), voxels.to_vec())?;
    let gz = path.to_string_lossy().to_lowercase().ends_with(".gz");
    crate::fsio::write_with(path, |tmp| {
        nifti::writer::WriterOptions::new(tmp).reference_header(&header).write_nifti(&arr)?;
        // The `.nii` writer drops its buffered writer without flushing it, so a full disk can
        // truncate the file silently; the `.nii.gz` one finishes (and checks) its stream.
        let want = 352 + std::mem::size_of_val(voxels) as u64;
        let got = std::fs::metadata(tmp)?.len();
        ensure!(gz || got == want, "wrote {got} of {want} bytes (is the disk full?)");
        Ok(())
    })
}
