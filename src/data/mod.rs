//! Data sets on disk: `images/` + `masks/` (or `labels/`) paired by file stem, 2D images
//! (PNG, TIFF, JPEG, BMP; 8/16-bit; grey or RGB) or 3D volumes (NIfTI, NRRD, MetaImage, or a
//! sub-folder holding a DICOM series, a case named after the folder). Every pair is read and
//! checked before training starts, so a bad file is reported by name up front.

pub mod cache;
pub mod dataset_json;
pub mod intensity;
pub mod io;
pub mod layout;
pub mod patch;
pub mod volume;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// An image (channels x depth x height x width, depth = 1 in 2D) with its label map.
#[derive(Clone, Debug)]
pub struct Sample {
    pub name: String,
    pub image: Vec<f32>,
    /// Label per voxel: 0 background, 1.. classes. Empty when there is no ground truth.
    pub mask: Vec<u8>,
    pub channels: usize,
    /// [depth, height, width]
    pub shape: [usize; 3],
    pub source: PathBuf,
    /// A volume's grid: `image`/`mask` are LPS-aligned, this puts them back on the file's grid
    /// (see [`volume::orient`]). `None` for 2D images.
    pub geometry: Option<volume::orient::Frame>,
}

impl Sample {
    pub fn voxels(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Per-image intensity normalisation. Every kind works on intensities in the file's own units
/// (8-bit 0..255, 16-bit 0..65535, floating-point TIFF and NIfTI as stored, NIfTI after
/// scl_slope/scl_inter), so a setting means the same on every format.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Normalize {
    /// Percentiles (in %) mapped to [0, 1], clipped.
    Percentile { low: f32, high: f32 },
    /// Zero mean, unit variance.
    ZScore,
    /// A fixed intensity window in the file's units (e.g. CT Hounsfield units, or 0..4095 of a
    /// 12-bit image stored in 16 bits) mapped to [0, 1], clipped.
    Window { low: f32, high: f32 },
    /// What ImageNet-pretrained encoders (torchvision, smp) expect, as albumentations'
    /// `Normalize()`: divided by the sample type's full scale (its `max_pixel_value`: 255 for
    /// 8-bit, 65535 for 16-bit, 1 for floating-point data), then the ImageNet mean/std per RGB
    /// channel (their average for grey).
    Imagenet,
}

impl std::str::FromStr for Normalize {
    type Err = String;
    /// `percentile`, `percentile:1:99`, `zscore`, `imagenet`, `window:-1000:400`.
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        let nums = |i: usize, j: usize| -> Result<(f32, f32), String> {
            let p = |k: usize| parts[k].parse::<f32>().map_err(|e| format!("`{s}`: {e}"));
            Ok((p(i)?, p(j)?))
        };
        let checked = |n: Normalize| n.check().map(|()| n);
        match parts.as_slice() {
            ["percentile"] => Ok(Normalize::Percentile { low: 0.5, high: 99.5 }),
            ["percentile", _, _] => nums(1, 2).map(|(low, high)| Normalize::Percentile { low, high }).and_then(checked),
            ["zscore"] => Ok(Normalize::ZScore),
            ["imagenet"] => Ok(Normalize::Imagenet),
            ["window", _, _] => nums(1, 2).map(|(low, high)| Normalize::Window { low, high }).and_then(checked),
            _ => Err(format!(
                "normalisation must be percentile[:LOW:HIGH], zscore, imagenet or window:LOW:HIGH, got `{s}`"
            )),
        }
    }
}

impl Normalize {
    /// The bounds must leave a range to map onto [0, 1]: an empty or inverted one would map
    /// every voxel to 0 and train on a blank input without a word.
    pub fn check(&self) -> Result<(), String> {
        match *self {
            Normalize::Percentile { low, high } => {
                if !(low.is_finite() && high.is_finite() && 0.0 <= low && low < high && high <= 100.0) {
                    return Err(format!(
                        "--normalize percentile:{low}:{high}: needs 0 <= LOW < HIGH <= 100 (percentiles), e.g. percentile:0.5:99.5"
                    ));
                }
            }
            Normalize::Window { low, high } => {
                if !(low.is_finite() && high.is_finite() && low < high) {
                    return Err(format!(
                        "--normalize window:{low}:{high}: needs finite LOW < HIGH (intensities), e.g. window:-1000:400"
                    ));
                }
            }
            Normalize::ZScore | Normalize::Imagenet => {}
        }
        Ok(())
    }

    /// Normalises each channel of an image in place. `data` is in the file's own units and
    /// `full_scale` its sample type's full scale (see [`io::read_scaled`]), which only
    /// `Imagenet` uses.
    pub fn apply(&self, data: &mut [f32], channels: usize, full_scale: f32) {
        let n = data.len() / channels;
        for (c, ch) in data.chunks_mut(n).enumerate() {
            let (a, b) = match *self {
                Normalize::Imagenet => {
                    let (mean, sd) = if channels == 3 {
                        ([0.485, 0.456, 0.406][c], [0.229, 0.224, 0.225][c])
                    } else {
                        (0.449, 0.226)
                    };
                    ch.iter_mut().for_each(|x| *x = (*x / full_scale - mean) / sd);
                    continue;
                }
                Normalize::Window { low, high } => (low, high),
                Normalize::Percentile { low, high } => {
                    let mut v = ch.to_vec();
                    (percentile(&mut v, low), percentile(&mut v, high))
                }
                Normalize::ZScore => {
                    let m = ch.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
                    let var = ch.iter().map(|&x| (x as f64 - m).powi(2)).sum::<f64>() / n as f64;
                    let sd = var.sqrt().max(1e-8);
                    ch.iter_mut().for_each(|x| *x = ((*x as f64 - m) / sd) as f32);
                    continue;
                }
            };
            let scale = if b > a { 1.0 / (b - a) } else { 0.0 };
            ch.iter_mut().for_each(|x| *x = ((*x - a) * scale).clamp(0.0, 1.0));
        }
    }
}

/// The `p`-th percentile (nearest rank) of `v`, which it reorders.
pub(crate) fn percentile(v: &mut [f32], p: f32) -> f32 {
    let k = ((p / 100.0) * (v.len() - 1) as f32).round() as usize;
    *v.select_nth_unstable_by(k.min(v.len() - 1), |a, b| a.total_cmp(b)).1
}

/// How to read a data set: channels, number of classes, normalisation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DataConfig {
    /// 1 (grey) or 3 (RGB); images are converted to this.
    pub channels: usize,
    /// 1 = binary (mask > 0 is foreground), n >= 2 = label ids 0..n.
    pub classes: usize,
    pub normalize: Normalize,
    /// Channel and label names and per-channel normalisation of an nnU-Net data set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nnunet: Option<layout::NnunetInput>,
    /// Voxel spacing (mm, x, y, z) volumes are resampled to before the network sees them, and
    /// predictions resampled back from ([`volume::spacing`]); `None` keeps each volume's grid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spacing: Option<volume::spacing::Spacing>,
}

impl DataConfig {
    /// Channels, classes and normalisation; every optional part (nnU-Net names, resampling) off.
    pub fn new(channels: usize, classes: usize, normalize: Normalize) -> Self {
        Self { channels, classes, normalize, nnunet: None, spacing: None }
    }
}

/// The image/mask file pairs of one split.
#[derive(Clone, Debug)]
pub struct Pair {
    pub name: String,
    pub image: PathBuf,
    pub mask: Option<PathBuf>,
    /// nnU-Net: one file per channel (`image` is the first); empty when `image` holds them all.
    pub channels: Vec<PathBuf>,
}

/// A data set root (`train/`, `val/`, `test/`) or a single folder with `images/`.
#[derive(Clone, Debug)]
pub struct Splits {
    pub train: Option<PathBuf>,
    pub val: Option<PathBuf>,
    pub test: Option<PathBuf>,
}

impl Splits {
    pub fn find(root: &Path) -> anyhow::Result<Splits> {
        anyhow::ensure!(root.is_dir(), "data folder {} does not exist", root.display());
        if layout::is_nnunet(root) {
            return Ok(layout::splits(root));
        }
        if root.join("images").is_dir() {
            let p = Some(root.to_path_buf());
            return Ok(Splits { train: p.clone(), val: None, test: p });
        }
        let sub = |n: &str| Some(root.join(n)).filter(|p| p.join("images").is_dir());
        let s = Splits { train: sub("train"), val: sub("val"), test: sub("test") };
        anyhow::ensure!(
            s.train.is_some() || s.test.is_some(),
            "{} holds neither images/ nor train/images, val/images, test/images",
            root.display()
        );
        Ok(s)
    }
}

/// A file's name without its extension (`.nii.gz` counts as one), as text for messages and tables.
pub fn stem(path: &Path) -> String {
    crate::output::os_stem(path).to_string_lossy().into_owned()
}

/// The supported, non-hidden files of a folder by their OS stem (so an image and a mask pair
/// only when their names are byte for byte the same, not when a lossy UTF-8 copy is).
fn list(dir: &Path) -> anyhow::Result<BTreeMap<OsString, PathBuf>> {
    let mut files = BTreeMap::new();
    let mut names: BTreeMap<String, PathBuf> = BTreeMap::new();
    let entries = std::fs::read_dir(dir).map_err(|e| anyhow::anyhow!("cannot read folder {}: {e}", dir.display()))?;
    for entry in entries {
        let path = entry?.path();
        let hidden = path.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'));
        // A sub-folder is a case when it is a DICOM series, named after the folder.
        let supported = if path.is_dir() { io::is_volume(&path) } else { path.is_file() && io::is_supported(&path) };
        if supported && !hidden {
            if let Some(prev) = files.insert(crate::output::os_stem(&path), path.clone()) {
                anyhow::bail!("{} and {} have the same stem", prev.display(), path.display());
            }
            // Results and overlays are named by the text form; two names that only differ in
            // bytes that are not UTF-8 would share one.
            if let Some(prev) = names.insert(stem(&path), path.clone()) {
                anyhow::bail!(
                    "{} and {} have names that differ only in bytes that are not UTF-8; rename one",
                    prev.display(),
                    path.display()
                );
            }
        }
    }
    Ok(files)
}

/// Pairs `DIR/images/*` with `DIR/masks/*` (or `DIR/labels/*`) by stem. With `need_masks`, an
/// image without a mask is an error, as is a mask without an image in any case.
pub fn pairs(dir: &Path, need_masks: bool) -> anyhow::Result<Vec<Pair>> {
    if let Some(split) = layout::split(dir)? {
        return layout::pairs(&split, need_masks);
    }
    let images = list(&dir.join("images"))?;
    anyhow::ensure!(!images.is_empty(), "no images found in {}", dir.join("images").display());
    let mask_dir = ["masks", "labels"].iter().map(|m| dir.join(m)).find(|p| p.is_dir());
    let masks = match &mask_dir {
        Some(d) => list(d)?,
        None if need_masks => anyhow::bail!("{} has no masks/ or labels/ folder", dir.display()),
        None => BTreeMap::new(),
    };
    if let Some((name, path)) = masks.iter().find(|(n, _)| !images.contains_key(*n)) {
        let name = name.to_string_lossy();
        anyhow::bail!("mask {} has no image named `{name}` in {}", path.display(), dir.join("images").display());
    }
    images
        .into_iter()
        .map(|(name, image)| {
            let mask = masks.get(&name).cloned();
            anyhow::ensure!(
                mask.is_some() || !need_masks,
                "image {} has no mask with the same name in {}",
                image.display(),
                mask_dir.as_ref().unwrap().display()
            );
            Ok(Pair { name: name.to_string_lossy().into_owned(), image, mask, channels: vec![] })
        })
        .collect()
}

/// Reads and checks every pair of a folder. With `skip_bad`, bad pairs are reported on stderr
/// and left out; otherwise the first one is the error.
pub fn load(dir: &Path, cfg: &DataConfig, need_masks: bool, skip_bad: bool) -> anyhow::Result<Vec<Sample>> {
    if let Some(split) = layout::split(dir)? {
        layout::check_config(&split, cfg)?;
    }
    let pairs = pairs(dir, need_masks)?;
    let mut out = vec![];
    let loaded: Vec<_> = {
        use rayon::prelude::*;
        pairs.par_iter().map(|p| (p, io::read_pair(p, cfg))).collect()
    };
    for (pair, res) in loaded {
        match res {
            Ok(s) => out.push(s),
            Err(e) if skip_bad => eprintln!("skipping {}: {e:#}", pair.image.display()),
            Err(e) => return Err(e),
        }
    }
    anyhow::ensure!(!out.is_empty(), "no usable image/mask pairs in {}", dir.display());
    Ok(out)
}

/// Slices of an input: 1 for a 2D image or a single-slice NIfTI; `None` where the header
/// cannot be read (the reader reports that file by name later).
pub fn depth_of(path: &Path) -> Option<usize> {
    if !io::is_volume(path) {
        return Some(1);
    }
    if volume::Format::of(path) == Some(volume::Format::Dicom) {
        return volume::dicom::depth(path).ok();
    }
    if volume::Format::of(path) != Some(volume::Format::Nifti) {
        return volume::read(path).ok().map(|v| v.shape[0]);
    }
    let h = nifti::NiftiHeader::from_file(path).ok()?;
    Some(if h.dim[0] >= 3 { h.dim[3].max(1) as usize } else { 1 })
}

/// Refuses the first input whose dimensionality is not the model's: a 2D image through a 3D
/// model (or a volume through a 2D one) would run and score nonsense without an error.
pub fn ensure_dims(files: &[PathBuf], dims: usize, model: &str) -> anyhow::Result<()> {
    for f in files {
        match depth_of(f) {
            Some(1) if dims == 3 => anyhow::bail!("{} is a 2D image but {model} is a 3D model", f.display()),
            Some(d) if d > 1 && dims == 2 => {
                anyhow::bail!("{} is a 3D volume ({d} slices) but {model} is a 2D model", f.display())
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stems_handle_double_extensions_and_spaces() {
        assert_eq!(stem(Path::new("a/b c.d-e.nii.gz")), "b c.d-e");
        assert_eq!(stem(Path::new("x/img 1.tif")), "img 1");
    }

    #[test]
    fn percentile_normalisation_maps_to_unit_range() {
        let mut v: Vec<f32> = (0..=100).map(|x| x as f32).collect();
        Normalize::Percentile { low: 10.0, high: 90.0 }.apply(&mut v, 1, 255.0);
        assert_eq!(v[10], 0.0);
        assert_eq!(v[50], 0.5);
        assert_eq!(v[90], 1.0);
        assert_eq!(v[100], 1.0);
    }

    #[test]
    fn zscore_and_window() {
        let mut v = vec![1.0, 3.0];
        Normalize::ZScore.apply(&mut v, 1, 255.0);
        assert_eq!(v, vec![-1.0, 1.0]);
        let mut v = vec![-1000.0, -300.0, 400.0, 1000.0];
        "window:-1000:400".parse::<Normalize>().unwrap().apply(&mut v, 1, 1.0);
        assert_eq!(v, vec![0.0, 0.5, 1.0, 1.0]);
    }

    #[test]
    fn imagenet_divides_by_the_full_scale_given_not_a_guess() {
        // One pixel per channel, RGB at 8 bits: (x/255 - mean) / std, albumentations' Normalize().
        let want = [-0.485 / 0.229, (1.0 - 0.456) / 0.224, (0.4 - 0.406) / 0.225];
        for (v, full) in [([0.0, 255.0, 102.0], 255.0), ([0.0, 65535.0, 26214.0], 65535.0), ([0.0, 1.0, 0.4], 1.0)] {
            let mut v = v.to_vec();
            "imagenet".parse::<Normalize>().unwrap().apply(&mut v, 3, full);
            for (a, b) in v.iter().zip(want) {
                assert!((a - b).abs() < 1e-5, "full scale {full}: {v:?}");
            }
        }
        // A dark 16-bit image (no value above 255) is still 16-bit.
        let mut v = vec![255.0];
        Normalize::Imagenet.apply(&mut v, 1, 65535.0);
        assert!((v[0] - (255.0 / 65535.0 - 0.449) / 0.226).abs() < 1e-5, "{v:?}");
    }

    #[test]
    fn percentile_and_zscore_do_not_depend_on_the_units() {
        let grey: Vec<f32> = (0..200).map(|i| ((i * 37) % 256) as f32).collect();
        for norm in [
            Normalize::Percentile { low: 0.5, high: 99.5 },
            Normalize::Percentile { low: 5.0, high: 60.0 },
            Normalize::ZScore,
        ] {
            let (mut file, mut unit) = (grey.clone(), grey.iter().map(|x| x / 255.0).collect::<Vec<_>>());
            norm.apply(&mut file, 1, 255.0);
            norm.apply(&mut unit, 1, 255.0);
            for (a, b) in file.iter().zip(&unit) {
                assert!((a - b).abs() < 1e-5, "{norm:?}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn empty_ranges_are_refused() {
        for bad in ["window:400:-1000", "window:5:5", "percentile:99:1", "percentile:-1:50", "percentile:1:101"] {
            let e = bad.parse::<Normalize>().unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
        assert_eq!("window:-1000:400".parse::<Normalize>(), Ok(Normalize::Window { low: -1000.0, high: 400.0 }));
    }
}
