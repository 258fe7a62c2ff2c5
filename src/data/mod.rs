//! Data sets on disk: `images/` + `masks/` (or `labels/`) paired by file stem, 2D images
//! (PNG, TIFF, JPEG, BMP; 8/16-bit; grey or RGB) or 3D NIfTI volumes. Every pair is read and
//! checked before training starts, so a bad file is reported by name up front.

pub mod io;
pub mod patch;

use std::collections::BTreeMap;
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
}

impl Sample {
    pub fn voxels(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Per-image intensity normalisation.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Normalize {
    /// Percentiles (in %) mapped to [0, 1], clipped.
    Percentile { low: f32, high: f32 },
    /// Zero mean, unit variance.
    ZScore,
    /// A fixed intensity window (e.g. CT Hounsfield units) mapped to [0, 1], clipped.
    Window { low: f32, high: f32 },
    /// What ImageNet-pretrained encoders (torchvision, smp) expect: [0, 1] by the bit depth,
    /// then the ImageNet mean/std per RGB channel (their average for grey).
    Imagenet,
}

impl std::str::FromStr for Normalize {
    type Err = String;
    /// `percentile`, `percentile:1:99`, `zscore`, `window:-1000:400`.
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

    /// Normalises each channel of an image in place.
    pub fn apply(&self, data: &mut [f32], channels: usize) {
        let n = data.len() / channels;
        // 8-bit unless a value says otherwise.
        let depth = if data.iter().any(|&x| x > 255.0) { 65535.0 } else { 255.0 };
        for (c, ch) in data.chunks_mut(n).enumerate() {
            let (a, b) = match *self {
                Normalize::Imagenet => {
                    let (mean, sd) = if channels == 3 {
                        ([0.485, 0.456, 0.406][c], [0.229, 0.224, 0.225][c])
                    } else {
                        (0.449, 0.226)
                    };
                    ch.iter_mut().for_each(|x| *x = (*x / depth - mean) / sd);
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

fn percentile(v: &mut [f32], p: f32) -> f32 {
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
}

/// The image/mask file pairs of one split.
#[derive(Clone, Debug)]
pub struct Pair {
    pub name: String,
    pub image: PathBuf,
    pub mask: Option<PathBuf>,
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

pub fn stem(path: &Path) -> String {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    for ext in [".nii.gz", ".nii"] {
        if let Some(s) = name.strip_suffix(ext) {
            return s.to_string();
        }
    }
    path.file_stem().unwrap_or_default().to_string_lossy().into_owned()
}

fn list(dir: &Path) -> anyhow::Result<BTreeMap<String, PathBuf>> {
    let mut files = BTreeMap::new();
    let entries = std::fs::read_dir(dir).map_err(|e| anyhow::anyhow!("cannot read folder {}: {e}", dir.display()))?;
    for entry in entries {
        let path = entry?.path();
        let hidden = path.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if path.is_file()
            && !hidden
            && io::is_supported(&path)
            && let Some(prev) = files.insert(stem(&path), path.clone())
        {
            anyhow::bail!("{} and {} have the same stem", prev.display(), path.display());
        }
    }
    Ok(files)
}

/// Pairs `DIR/images/*` with `DIR/masks/*` (or `DIR/labels/*`) by stem. With `need_masks`, an
/// image without a mask is an error, as is a mask without an image in any case.
pub fn pairs(dir: &Path, need_masks: bool) -> anyhow::Result<Vec<Pair>> {
    let images = list(&dir.join("images"))?;
    anyhow::ensure!(!images.is_empty(), "no images found in {}", dir.join("images").display());
    let mask_dir = ["masks", "labels"].iter().map(|m| dir.join(m)).find(|p| p.is_dir());
    let masks = match &mask_dir {
        Some(d) => list(d)?,
        None if need_masks => anyhow::bail!("{} has no masks/ or labels/ folder", dir.display()),
        None => BTreeMap::new(),
    };
    if let Some((name, path)) = masks.iter().find(|(n, _)| !images.contains_key(*n)) {
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
            Ok(Pair { name, image, mask })
        })
        .collect()
}

/// Reads and checks every pair of a folder. With `skip_bad`, bad pairs are reported on stderr
/// and left out; otherwise the first one is the error.
pub fn load(dir: &Path, cfg: &DataConfig, need_masks: bool, skip_bad: bool) -> anyhow::Result<Vec<Sample>> {
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
        Normalize::Percentile { low: 10.0, high: 90.0 }.apply(&mut v, 1);
        assert_eq!(v[10], 0.0);
        assert_eq!(v[50], 0.5);
        assert_eq!(v[90], 1.0);
        assert_eq!(v[100], 1.0);
    }

    #[test]
    fn zscore_and_window() {
        let mut v = vec![1.0, 3.0];
        Normalize::ZScore.apply(&mut v, 1);
        assert_eq!(v, vec![-1.0, 1.0]);
        let mut v = vec![-1000.0, -300.0, 400.0, 1000.0];
        "window:-1000:400".parse::<Normalize>().unwrap().apply(&mut v, 1);
        assert_eq!(v, vec![0.0, 0.5, 1.0, 1.0]);
    }

    #[test]
    fn imagenet_per_channel() {
        // One pixel per channel, RGB at 8 bits: (x/255 - mean) / std.
        let mut v = vec![0.0, 255.0, 102.0];
        "imagenet".parse::<Normalize>().unwrap().apply(&mut v, 3);
        let want = [-0.485 / 0.229, (1.0 - 0.456) / 0.224, (0.4 - 0.406) / 0.225];
        for (a, b) in v.iter().zip(want) {
            assert!((a - b).abs() < 1e-5, "{v:?}");
        }
    }
}
