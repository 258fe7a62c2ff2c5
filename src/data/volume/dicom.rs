//! DICOM series: a folder of single-frame DICOM slices read as one volume, as SimpleITK's
//! `ImageSeriesReader` (GDCM) reads it, through the `dicom` crates (native, RLE, deflate and JPEG
//! transfer syntaxes, all pure Rust).
//!
//! A folder is a series when one of its files has the DICOM preamble ("DICM" at byte 128).
//! Files without it (README, ...), DICOMDIR indexes and objects without pixel data are skipped,
//! each with its reason on stderr. The slices must be one SeriesInstanceUID (several are an
//! error listing each), each one frame of one sample (enhanced multi-frame objects are refused),
//! all of one size, orientation and pixel spacing.
//!
//! Geometry, in LPS like every reader here: voxel axis x along a row (IOP's first vector,
//! spacing PixelSpacing[1], the column spacing), y down the columns (IOP's second vector,
//! PixelSpacing[0]), z along their cross product, the slice normal. Slices are sorted by their
//! position along the normal (never by InstanceNumber or file name), the origin is the first
//! one's ImagePositionPatient, the z spacing the mean gap. Refused, naming the files and
//! positions: two slices at one position, a gap that differs from the median gap by more than
//! [`GAP_TOLERANCE`] (a missing slice, or uneven spacing), and slices shifted in-plane from one
//! to the next (gantry tilt), which no rotation-and-spacing geometry can hold.
//!
//! Voxels are RescaleSlope * stored + RescaleIntercept of each slice (Hounsfield units for CT),
//! as f32.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail, ensure};
use dicom_dictionary_std::{tags, uids};
use dicom_object::{DefaultDicomObject, OpenFileOptions};
use dicom_pixeldata::{ConvertOptions, ModalityLutOption, PixelDecoder};

use super::{Elem, Geometry, Volume};

/// How far a slice gap may differ from the median gap (relative), and at least by how many mm: the
/// positions scanners write are rounded to a few micrometres.
pub const GAP_TOLERANCE: (f64, f64) = (0.01, 1e-3);

/// Whether `path` has the DICOM file preamble: 128 bytes, then "DICM".
pub fn has_preamble(path: &Path) -> bool {
    let mut head = [0u8; 132];
    std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut head)).is_ok() && &head[128..] == b"DICM"
}

/// Whether `dir` is a folder holding at least one DICOM file (hidden files left out).
pub fn is_series_dir(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else { return false };
    entries.flatten().any(|e| {
        let p = e.path();
        !hidden(&p) && p.is_file() && has_preamble(&p)
    })
}

fn hidden(p: &Path) -> bool {
    p.file_name().is_some_and(|n| n.as_encoded_bytes().starts_with(b"."))
}

/// What the stacking needs of one slice.
#[derive(Clone, Debug, PartialEq)]
pub struct SliceGeometry {
    pub file: PathBuf,
    /// ImageOrientationPatient: the row direction, then the column direction.
    pub iop: [f64; 6],
    /// ImagePositionPatient: the LPS centre of the first pixel.
    pub ipp: [f64; 3],
}

/// One image object of the folder, its pixel data not yet decoded.
struct Slice {
    geometry: SliceGeometry,
    series: String,
    description: String,
    modality: String,
    rows: u32,
    columns: u32,
    pixel_spacing: [f64; 2],
    obj: DefaultDicomObject,
}

/// Reads the DICOM series in `dir` (see the module doc).
pub fn read(dir: &Path) -> anyhow::Result<Volume> {
    let slices = series(dir, true)?;
    let first = &slices[0];
    let (order, geometry) = stack(dir, &slices.iter().map(|s| s.geometry.clone()).collect::<Vec<_>>(), |z| {
        let g = |t| first.obj.get(t).and_then(|e| e.to_float64().ok()).filter(|v| v.is_finite() && *v > 0.0);
        g(tags::SPACING_BETWEEN_SLICES).or_else(|| g(tags::SLICE_THICKNESS)).unwrap_or(z)
    })?;
    let (rows, columns) = (first.rows as usize, first.columns as usize);
    let geometry = Geometry::new(
        [first.pixel_spacing[1], first.pixel_spacing[0], geometry.spacing[2]],
        geometry.origin,
        geometry.direction,
        dir,
        "PixelSpacing / ImageOrientationPatient",
    )?;
    super::byte_count(dir, "Rows x Columns x slices", &[rows, columns, slices.len()], Elem::F32)?;
    let mut data = Vec::with_capacity(rows * columns * slices.len());
    let mut rescaled = false;
    let mut full_scale = 1.0f32;
    for &i in &order {
        let s = &slices[i];
        let f = &s.geometry.file;
        let (stored, bits, representation) = guarded(f, "decoding its pixel data", || {
            let decoded =
                s.obj.decode_pixel_data().with_context(|| format!("{}: cannot decode the pixel data", f.display()))?;
            let stored: Vec<f64> = decoded
                .to_vec_with_options(&ConvertOptions::new().with_modality_lut(ModalityLutOption::None))
                .with_context(|| format!("{}: cannot convert the pixel data", f.display()))?;
            Ok((stored, decoded.bits_allocated(), decoded.pixel_representation()))
        })?;
        ensure!(
            stored.len() == rows * columns,
            "{}: {} pixel values where Rows x Columns is {rows} x {columns}",
            f.display(),
            stored.len()
        );
        let number = |t, default: f64| -> anyhow::Result<f64> {
            match s.obj.get(t) {
                None => Ok(default),
                Some(e) => e
                    .to_float64()
                    .ok()
                    .filter(|v| v.is_finite())
                    .with_context(|| format!("{}: `{}` is not a number", f.display(), name(t))),
            }
        };
        let (slope, intercept) = (number(tags::RESCALE_SLOPE, 1.0)?, number(tags::RESCALE_INTERCEPT, 0.0)?);
        rescaled |= slope != 1.0 || intercept != 0.0;
        full_scale = full_scale.max(sample_full_scale(bits, representation));
        data.extend(stored.iter().map(|&v| (v * slope + intercept) as f32));
    }
    let full_scale = if rescaled { 1.0 } else { full_scale };
    Ok(Volume { data, channels: 1, shape: [slices.len(), rows, columns], geometry, full_scale })
}

/// The number of slices of the series in `dir`, quietly, from the headers alone (objects without
/// pixel data are counted too: this only tells a volume from a slice).
pub fn depth(dir: &Path) -> anyhow::Result<usize> {
    Ok(series(dir, false)?.len())
}

/// Runs `work` on the file `f`, turning a panic inside the `dicom` crates (their RLE decoder
/// panics on some damaged data) into an error naming the file.
fn guarded<T>(f: &Path, what: &str, work: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)).unwrap_or_else(|_| {
        bail!("{}: not a readable DICOM file: the DICOM decoder failed while {what} (damaged data?)", f.display())
    })
}

fn sample_full_scale(bits: u16, representation: dicom_pixeldata::PixelRepresentation) -> f32 {
    let signed = representation == dicom_pixeldata::PixelRepresentation::Signed;
    match (bits, signed) {
        (8, false) => Elem::U8,
        (8, true) => Elem::I8,
        (16, true) => Elem::I16,
        (32, true) => Elem::I32,
        (32, false) => Elem::U32,
        _ => Elem::U16,
    }
    .full_scale()
}

fn name(t: dicom_object::Tag) -> &'static str {
    use dicom_core::dictionary::DataDictionary;
    dicom_dictionary_std::StandardDataDictionary.by_tag(t).map_or("?", |e| e.alias)
}

/// Opens every file of `dir` and keeps the image objects of its one series (module doc); the
/// rest is skipped, with the reasons on stderr. Without `full`, quietly and headers only.
fn series(dir: &Path, full: bool) -> anyhow::Result<Vec<Slice>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read folder {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .with_context(|| format!("cannot read folder {}", dir.display()))?;
    files.sort();
    let mut skipped = vec![];
    let mut slices = vec![];
    for f in files.into_iter().filter(|f| !hidden(f)) {
        let why = if f.is_dir() {
            Some("a folder (series are read one folder at a time)")
        } else if !has_preamble(&f) {
            Some("not DICOM: no DICM preamble")
        } else {
            None
        };
        if let Some(why) = why {
            skipped.push(format!("{} ({why})", file_name(&f)));
            continue;
        }
        match open(&f, full)? {
            Ok(s) => slices.push(s),
            Err(why) => skipped.push(format!("{} ({why})", file_name(&f))),
        }
    }
    if slices.is_empty() {
        bail!("{}: no DICOM image in the folder (skipped: {})", dir.display(), skipped.join(", "));
    }
    if full && !skipped.is_empty() {
        eprintln!("{}: skipped {}", dir.display(), skipped.join(", "));
    }
    let mut by_series: BTreeMap<&str, Vec<&Slice>> = BTreeMap::new();
    slices.iter().for_each(|s| by_series.entry(s.series.as_str()).or_default().push(s));
    if by_series.len() > 1 {
        let list: Vec<String> = by_series
            .iter()
            .map(|(uid, s)| format!("  {uid}: \"{}\", {}, {} slice(s)", s[0].description, s[0].modality, s.len()))
            .collect();
        bail!(
            "{} holds {} DICOM series; a folder must hold one (move each series to a folder of its own, e.g. \
             by SeriesInstanceUID):\n{}",
            dir.display(),
            by_series.len(),
            list.join("\n")
        );
    }
    let first = &slices[0];
    for s in &slices[1..] {
        let f = s.geometry.file.display();
        let g = first.geometry.file.display();
        ensure!(
            (s.rows, s.columns) == (first.rows, first.columns),
            "{f} is {} x {} pixels (Rows x Columns) but {g} is {} x {}: a series' slices must be one size",
            s.rows,
            s.columns,
            first.rows,
            first.columns
        );
        ensure!(
            s.pixel_spacing.iter().zip(first.pixel_spacing).all(|(a, b)| (a - b).abs() <= 1e-4),
            "{f} has PixelSpacing {:?} but {g} has {:?}: a series' slices must share it",
            s.pixel_spacing,
            first.pixel_spacing
        );
    }
    Ok(slices)
}

fn file_name(p: &Path) -> String {
    p.file_name().unwrap_or_default().to_string_lossy().into_owned()
}

/// An image slice of `f`, or why it is not one (`Ok(Err(reason))`); a file that claims to be
/// DICOM but cannot be read is an error. Without `pixels`, the header alone.
fn open(f: &Path, pixels: bool) -> anyhow::Result<Result<Slice, String>> {
    let max = crate::data::io::max_decoded_bytes();
    let len = std::fs::metadata(f).map(|m| m.len()).unwrap_or(0);
    ensure!(len <= max, "{}: {len} bytes, more than the {max} an input may take", f.display());
    let obj = guarded(f, "parsing it", || {
        let options = OpenFileOptions::new();
        let options = if pixels { options } else { options.read_until(tags::PIXEL_DATA) };
        options.open_file(f).map_err(|e| anyhow::anyhow!("{}: not a readable DICOM file: {e}", f.display()))
    })?;
    let class = obj.meta().media_storage_sop_class_uid().to_string();
    if class == uids::MEDIA_STORAGE_DIRECTORY_STORAGE {
        return Ok(Err("a DICOMDIR, the index of a file set".into()));
    }
    if pixels && obj.get(tags::PIXEL_DATA).is_none() {
        return Ok(Err(format!("no pixel data: SOP class {class}")));
    }
    let p = f.display();
    let text = |t| obj.get(t).and_then(|e| e.to_str().ok()).map(|s| s.trim().to_string());
    let nums = |t, n: usize| -> anyhow::Result<Vec<f64>> {
        let e = obj.get(t).with_context(|| format!("{p}: `{}` is missing", name(t)))?;
        let v = e.to_multi_float64().ok().filter(|v| v.len() == n && v.iter().all(|x| x.is_finite()));
        v.with_context(|| format!("{p}: `{}` must be {n} numbers", name(t)))
    };
    let int = |t, default: u32| -> anyhow::Result<u32> {
        match obj.get(t) {
            None => Ok(default),
            Some(e) => e.to_int::<u32>().with_context(|| format!("{p}: `{}` is not a whole number", name(t))),
        }
    };
    let frames = int(tags::NUMBER_OF_FRAMES, 1)?;
    ensure!(
        frames == 1,
        "{p}: a multi-frame (enhanced) DICOM object of {frames} frames; only series of single-frame slices are \
         read (convert it to NIfTI first, e.g. with dcm2niix)"
    );
    let samples = int(tags::SAMPLES_PER_PIXEL, 1)?;
    ensure!(samples == 1, "{p}: SamplesPerPixel {samples}: only grey (1 sample per pixel) series are read");
    let series = text(tags::SERIES_INSTANCE_UID).with_context(|| format!("{p}: `SeriesInstanceUID` is missing"))?;
    let (rows, columns) = (int(tags::ROWS, 0)?, int(tags::COLUMNS, 0)?);
    ensure!(rows > 0 && columns > 0, "{p}: Rows x Columns {rows} x {columns} must be positive");
    let iop = nums(tags::IMAGE_ORIENTATION_PATIENT, 6)?;
    let ipp = nums(tags::IMAGE_POSITION_PATIENT, 3)?;
    let ps = nums(tags::PIXEL_SPACING, 2)?;
    ensure!(ps.iter().all(|s| *s > 0.0), "{p}: PixelSpacing {ps:?} must be positive");
    Ok(Ok(Slice {
        geometry: SliceGeometry { file: f.to_path_buf(), iop: iop.try_into().unwrap(), ipp: ipp.try_into().unwrap() },
        series,
        description: text(tags::SERIES_DESCRIPTION).unwrap_or_default(),
        modality: text(tags::MODALITY).unwrap_or_default(),
        rows,
        columns,
        pixel_spacing: [ps[0], ps[1]],
        obj,
    }))
}

fn dot(a: [f64; 3], b: [f64; 3]) -> f64 {
    (0..3).map(|i| a[i] * b[i]).sum()
}

fn unit(v: [f64; 3], f: &Path) -> anyhow::Result<[f64; 3]> {
    let n = dot(v, v).sqrt();
    ensure!(n > 0.5 && n < 1.5, "{}: ImageOrientationPatient holds a vector of length {n:.4}", f.display());
    Ok(v.map(|x| x / n))
}

/// The order of `slices` along their normal and the geometry of the stack (spacing x, y left at
/// 1: they are the pixel spacing's); `single` gives the z spacing of a one-slice series.
pub fn stack(
    dir: &Path,
    slices: &[SliceGeometry],
    single: impl Fn(f64) -> f64,
) -> anyhow::Result<(Vec<usize>, Geometry)> {
    let s0 = &slices[0];
    let row = unit([s0.iop[0], s0.iop[1], s0.iop[2]], &s0.file)?;
    let col = unit([s0.iop[3], s0.iop[4], s0.iop[5]], &s0.file)?;
    let normal =
        [row[1] * col[2] - row[2] * col[1], row[2] * col[0] - row[0] * col[2], row[0] * col[1] - row[1] * col[0]];
    let normal = unit(normal, &s0.file)?;
    for s in &slices[1..] {
        ensure!(
            s.iop.iter().zip(s0.iop).all(|(a, b)| (a - b).abs() <= 1e-4),
            "{} has ImageOrientationPatient {:?} but {} has {:?}: a series' slices must share one orientation",
            s.file.display(),
            s.iop,
            s0.file.display(),
            s0.iop
        );
    }
    let pos: Vec<f64> = slices.iter().map(|s| dot(normal, s.ipp)).collect();
    let mut order: Vec<usize> = (0..slices.len()).collect();
    order.sort_by(|&a, &b| pos[a].total_cmp(&pos[b]));
    let at = |k: usize| (slices[order[k]].file.display(), pos[order[k]]);
    let n = slices.len();
    let gaps: Vec<f64> = (1..n).map(|k| pos[order[k]] - pos[order[k - 1]]).collect();
    // Gaps are checked against the median, which one missing slice does not move.
    let median = {
        let mut g = gaps.clone();
        g.sort_by(f64::total_cmp);
        g.get(g.len() / 2).copied().unwrap_or(0.0)
    };
    let dz = if n == 1 { single(1.0) } else { (pos[order[n - 1]] - pos[order[0]]) / (n - 1) as f64 };
    let tol = (GAP_TOLERANCE.0 * median).max(GAP_TOLERANCE.1);
    for k in 1..n {
        let gap = gaps[k - 1];
        let ((fa, pa), (fb, pb)) = (at(k - 1), at(k));
        ensure!(
            gap > GAP_TOLERANCE.1,
            "{}: {fa} and {fb} are at the same position ({pa:.4} mm along the slice normal): duplicate slices",
            dir.display()
        );
        if (gap - median).abs() > tol {
            bail!(
                "{}: slice positions {pa:.4} ({fa}) and {pb:.4} ({fb}) mm along the slice normal are {gap:.4} mm \
                 apart but the others {median:.4} mm: {}; all positions: {}",
                dir.display(),
                if (gap / median).round() >= 2.0 { "a missing slice?" } else { "uneven slice spacing" },
                order.iter().map(|&i| format!("{:.4}", pos[i])).collect::<Vec<_>>().join(", ")
            );
        }
        // What is left of the step once its part along the normal is taken off: a gantry tilt.
        let (a, b) = (slices[order[k - 1]].ipp, slices[order[k]].ipp);
        let step: [f64; 3] = std::array::from_fn(|i| b[i] - a[i] - gap * normal[i]);
        let shift = dot(step, step).sqrt();
        ensure!(
            shift <= tol,
            "{}: {fb} is shifted {shift:.4} mm in-plane from {fa} (a gantry tilt or sheared stack); only stacks \
             along the slice normal are read (resample the series first, e.g. dcm2niix corrects gantry tilt)",
            dir.display()
        );
    }
    let direction: [[f64; 3]; 3] = std::array::from_fn(|r| [row[r], col[r], normal[r]]);
    let origin = slices[order[0]].ipp;
    let g = Geometry::new([1.0, 1.0, dz], origin, direction, dir, "ImageOrientationPatient")?;
    Ok((order, g))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slices(positions: &[[f64; 3]], iop: [f64; 6]) -> Vec<SliceGeometry> {
        positions
            .iter()
            .enumerate()
            .map(|(i, &ipp)| SliceGeometry { file: PathBuf::from(format!("IM{i}")), iop, ipp })
            .collect()
    }

    const AXIAL: [f64; 6] = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0];

    #[test]
    fn slices_are_sorted_along_the_normal_whatever_their_order() {
        let s = slices(&[[0.0, 0.0, 5.0], [0.0, 0.0, -5.0], [0.0, 0.0, 0.0]], AXIAL);
        let (order, g) = stack(Path::new("d"), &s, |z| z).unwrap();
        assert_eq!(order, vec![1, 2, 0]);
        assert_eq!((g.origin, g.spacing[2]), ([0.0, 0.0, -5.0], 5.0));
        // x to the Right: the normal points Inferior and the highest slice comes first.
        let flipped = [-1.0, 0.0, 0.0, 0.0, 1.0, 0.0];
        let (order, g) = stack(Path::new("d"), &slices(&[[0.0, 0.0, 5.0], [0.0, 0.0, -5.0]], flipped), |z| z).unwrap();
        assert_eq!((order, g.origin, g.direction[2][2]), (vec![0, 1], [0.0, 0.0, 5.0], -1.0));
    }

    #[test]
    fn gaps_duplicates_and_tilts_are_refused_by_position() {
        let d = Path::new("series");
        let e = stack(d, &slices(&[[0.0, 0.0, 0.0], [0.0, 0.0, 2.0], [0.0, 0.0, 6.0], [0.0, 0.0, 8.0]], AXIAL), |z| z)
            .unwrap_err()
            .to_string();
        assert!(e.contains("series") && e.contains("2.0000 (IM1)") && e.contains("6.0000 (IM2)"), "{e}");
        assert!(e.contains("missing slice"), "{e}");
        let e = stack(d, &slices(&[[0.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0]], AXIAL), |z| z)
            .unwrap_err()
            .to_string();
        assert!(e.contains("IM1 and IM2") && e.contains("duplicate"), "{e}");
        let e = stack(d, &slices(&[[0.0, 0.0, 0.0], [0.0, 0.5, 5.0], [0.0, 1.0, 10.0]], AXIAL), |z| z)
            .unwrap_err()
            .to_string();
        assert!(e.contains("gantry tilt") && e.contains("IM1"), "{e}");
        // Rounding of the positions within the tolerance is accepted.
        assert!(stack(d, &slices(&[[0.0, 0.0, 0.0], [0.0, 0.0, 5.0004], [0.0, 0.0, 10.0]], AXIAL), |z| z).is_ok());
        let mut s = slices(&[[0.0; 3], [0.0, 0.0, 1.0]], AXIAL);
        s[1].iop = [0.0, 1.0, 0.0, 1.0, 0.0, 0.0];
        let e = stack(d, &s, |z| z).unwrap_err().to_string();
        assert!(e.contains("IM1") && e.contains("one orientation"), "{e}");
    }

    #[test]
    fn one_slice_takes_the_given_thickness() {
        let (_, g) = stack(Path::new("d"), &slices(&[[1.0, 2.0, 3.0]], AXIAL), |_| 2.5).unwrap();
        assert_eq!((g.spacing[2], g.origin), (2.5, [1.0, 2.0, 3.0]));
    }
}
