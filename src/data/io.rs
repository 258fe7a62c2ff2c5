//! Reading and writing images (via `image`) and volumes (via `nifti`).

use std::path::Path;

use anyhow::{Context, bail, ensure};
use image::{DynamicImage, GenericImageView};
use ndarray::{Array3, ShapeBuilder};
use nifti::{IntoNdArray, NiftiObject, ReaderOptions};

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

fn decode(path: &Path, what: &str) -> anyhow::Result<DynamicImage> {
    image::ImageReader::open(path)
        .with_context(|| format!("cannot open {}", path.display()))?
        .with_guessed_format()?
        .decode()
        .with_context(|| format!("cannot decode {what} {}", path.display()))
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

fn read_volume(path: &Path) -> anyhow::Result<(Raw, nifti::NiftiHeader)> {
    let obj = ReaderOptions::new().read_file(path).with_context(|| format!("cannot read NIfTI {}", path.display()))?;
    let header = obj.header().clone();
    let arr = obj
        .into_volume()
        .into_ndarray::<f32>()
        .with_context(|| format!("cannot decode NIfTI voxels of {}", path.display()))?;
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
    Ok(read_volume(path)?.1)
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
    let mut header = read_header(reference)?;
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
