//! nnU-Net's raw data set layout, read as it is: `DatasetXXX_Name/dataset.json`,
//! `imagesTr/CASE_0000.nii.gz, CASE_0001...` (one file per channel), `labelsTr/CASE.nii.gz`,
//! `imagesTs/` and, for `eval`, `labelsTs/` (not part of nnU-Net's format, which keeps test
//! labels elsewhere: eval needs ground truth, so it reads them from there). The other layouts
//! (`images/` + `masks/`, and `train/`, `val/`, `test/`) are in [`super`].
//!
//! A split is named by its images folder (`DatasetX/imagesTr`), so [`super::Splits`] holds the
//! same kind of path for every layout.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail, ensure};
use serde::{Deserialize, Serialize};

use super::dataset_json::DatasetJson;
use super::intensity::{self, ChannelNorm};
use super::volume::orient::Frame;
use super::{DataConfig, Pair, Sample, Splits, io};

pub const DATASET_JSON: &str = "dataset.json";

/// What a run trained on an nnU-Net data set keeps of it (in `config.toml` and checkpoints).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NnunetInput {
    pub channel_names: Vec<String>,
    /// Per-channel normalisation from the channel names and the training fingerprint; empty
    /// when `--normalize` was given, which then applies to every channel.
    #[serde(default)]
    pub norms: Vec<ChannelNorm>,
    /// Label names by value (0 = background).
    pub labels: Vec<String>,
}

/// Whether `root` is an nnU-Net raw data set: a `dataset.json` beside `imagesTr/` or `imagesTs/`.
pub fn is_nnunet(root: &Path) -> bool {
    root.join(DATASET_JSON).is_file() && (root.join("imagesTr").is_dir() || root.join("imagesTs").is_dir())
}

/// Train on `imagesTr`, evaluate on `imagesTs` (with `labelsTs`).
pub fn splits(root: &Path) -> Splits {
    let sub = |n: &str| Some(root.join(n)).filter(|p| p.is_dir());
    Splits { train: sub("imagesTr"), val: None, test: sub("imagesTs") }
}

/// One split of an nnU-Net data set.
pub struct Split {
    pub images: PathBuf,
    pub labels: PathBuf,
    pub json: DatasetJson,
    pub json_path: PathBuf,
}

/// The split whose images folder is `dir` (`DatasetX/imagesTr` or `imagesTs`), if it is one.
pub fn split(dir: &Path) -> anyhow::Result<Option<Split>> {
    let labels = match dir.file_name().and_then(|n| n.to_str()) {
        Some("imagesTr") => "labelsTr",
        Some("imagesTs") => "labelsTs",
        _ => return Ok(None),
    };
    let Some(root) = dir.parent().filter(|r| r.join(DATASET_JSON).is_file()) else { return Ok(None) };
    let json_path = root.join(DATASET_JSON);
    let json = DatasetJson::read(&json_path)?;
    Ok(Some(Split { images: dir.to_path_buf(), labels: root.join(labels), json, json_path }))
}

/// A case: its identifier and one file per channel, in channel order.
#[derive(Clone, Debug)]
pub struct Case {
    pub name: String,
    pub files: Vec<PathBuf>,
}

/// The non-hidden files of `dir` ending in `ending`, by name without it.
fn files_ending(dir: &Path, ending: &str) -> anyhow::Result<BTreeMap<String, PathBuf>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot read folder {}", dir.display()))? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()).map(str::to_string) else {
            bail!("{}: nnU-Net file names must be UTF-8", path.display());
        };
        if name.starts_with('.') || !path.is_file() {
            continue;
        }
        match name.strip_suffix(ending) {
            Some(stem) => {
                out.insert(stem.to_string(), path);
            }
            None if io::is_supported(&path) => {
                bail!("{} does not end in {ending}, the file_ending dataset.json gives", path.display())
            }
            None => {}
        }
    }
    Ok(out)
}

/// Groups `CASE_XXXX{ending}` files into cases of `channels` files each; a missing or extra
/// channel file is an error naming the case and the file.
pub fn cases(dir: &Path, ending: &str, channel_names: &[String]) -> anyhow::Result<Vec<Case>> {
    let mut by_case: BTreeMap<String, BTreeMap<usize, PathBuf>> = BTreeMap::new();
    for (stem, path) in files_ending(dir, ending)? {
        let channel = stem.rsplit_once('_').filter(|(_, c)| c.len() == 4 && c.bytes().all(|b| b.is_ascii_digit()));
        let Some((case, c)) = channel else {
            bail!("{} is not named CASE_XXXX{ending} (XXXX: the 4-digit channel number)", path.display());
        };
        by_case.entry(case.to_string()).or_default().insert(c.parse().unwrap(), path);
    }
    ensure!(!by_case.is_empty(), "no images ending in {ending} in {}", dir.display());
    let n = channel_names.len();
    by_case
        .into_iter()
        .map(|(name, files)| {
            if let Some((&c, path)) = files.iter().find(|(c, _)| **c >= n) {
                bail!(
                    "case `{name}` has a file for channel {c:04} ({}) but dataset.json names {n} channel(s) ({})",
                    path.display(),
                    channel_names.join(", ")
                );
            }
            if let Some(c) = (0..n).find(|c| !files.contains_key(c)) {
                bail!(
                    "case `{name}` lacks channel {c:04} (`{}`): {} is missing",
                    channel_names[c],
                    dir.join(format!("{name}_{c:04}{ending}")).display()
                );
            }
            Ok(Case { name, files: files.into_values().collect() })
        })
        .collect()
}

/// The cases of a split paired with their label files (`labelsTr/CASE{ending}`).
pub fn pairs(s: &Split, need_masks: bool) -> anyhow::Result<Vec<Pair>> {
    let ending = &s.json.file_ending;
    let cases = cases(&s.images, ending, &s.json.channels)?;
    if s.images.ends_with("imagesTr")
        && let Some(n) = s.json.num_training
    {
        ensure!(
            n == cases.len(),
            "{} gives numTraining {n} but {} holds {} case(s)",
            s.json_path.display(),
            s.images.display(),
            cases.len()
        );
    }
    let labels = match s.labels.is_dir() {
        true => files_ending(&s.labels, ending)?,
        false if need_masks => bail!(
            "{} has no {} folder: evaluation needs the cases' labels there as CASE{ending} (nnU-Net's own format \
             has no labelsTs; put the test labels there, or evaluate a data set with labels)",
            s.images.parent().unwrap_or(Path::new(".")).display(),
            s.labels.file_name().unwrap_or_default().to_string_lossy()
        ),
        false => BTreeMap::new(),
    };
    if let Some((name, path)) = labels.iter().find(|(n, _)| !cases.iter().any(|c| &c.name == *n)) {
        bail!("label {} has no case `{name}` in {}", path.display(), s.images.display());
    }
    cases
        .into_iter()
        .map(|c| {
            let mask = labels.get(&c.name).cloned();
            ensure!(
                mask.is_some() || !need_masks,
                "case `{}` has no label file {}",
                c.name,
                s.labels.join(format!("{}{ending}", c.name)).display()
            );
            Ok(Pair { name: c.name, image: c.files[0].clone(), mask, channels: c.files })
        })
        .collect()
}

/// Refuses a model whose channels or classes are not the data set's.
pub fn check_config(s: &Split, cfg: &DataConfig) -> anyhow::Result<()> {
    let (c, l) = (s.json.channels.len(), s.json.labels.len());
    ensure!(
        cfg.channels == c,
        "{} names {c} channel(s) ({}) but the model takes {} (leave --channels out to use the data set's)",
        s.json_path.display(),
        s.json.channels.join(", "),
        cfg.channels
    );
    ensure!(
        cfg.classes == l,
        "{} names {l} labels ({}) but the model has {} classes (leave --classes out to use the data set's)",
        s.json_path.display(),
        s.json.labels.join(", "),
        cfg.classes
    );
    Ok(())
}

/// Reads and normalises a case's channel files (each single-channel, all the same size) into one
/// channels-first image.
/// A case's channel files as one LPS-aligned, normalised array, with the frame of its first file.
pub fn read_channels(
    name: &str,
    files: &[PathBuf],
    cfg: &DataConfig,
) -> anyhow::Result<(Vec<f32>, [usize; 3], Option<Frame>)> {
    ensure!(
        files.len() == cfg.channels,
        "case `{name}` has {} channel file(s) but the model takes {} channel(s)",
        files.len(),
        cfg.channels
    );
    let mut data = vec![];
    let (mut shape, mut full, mut geometry) = (None, 1.0, None);
    for f in files {
        let (raw, scale) = io::read_scaled(f)?;
        if geometry.is_none() {
            geometry = raw.geometry;
        }
        ensure!(
            raw.channels == 1,
            "{} has {} channels; nnU-Net stores one channel per file",
            f.display(),
            raw.channels
        );
        if let Some(i) = raw.data.iter().position(|v| !v.is_finite()) {
            bail!("{} has a non-finite value at voxel {i}", f.display());
        }
        match shape {
            None => shape = Some(raw.shape),
            Some(s) => ensure!(
                s == raw.shape,
                "case `{name}`: {} is {} but {} is {}",
                f.display(),
                io::fmt_shape(raw.shape),
                files[0].display(),
                io::fmt_shape(s)
            ),
        }
        full = scale;
        data.extend(raw.data);
    }
    let norms = cfg.nnunet.as_ref().map(|n| n.norms.as_slice()).unwrap_or_default();
    intensity::normalize(&mut data, cfg.channels, norms, cfg.normalize, full);
    Ok(io::oriented(data, cfg.channels, geometry, shape.unwrap()))
}

/// Reads a label file in its own values; a value that is not one of the labels is an error
/// naming the file, the value and the labels there are.
pub fn read_labels(path: &Path, cfg: &DataConfig) -> anyhow::Result<(Vec<u8>, [usize; 3], Option<Frame>)> {
    let raw = io::read_raw(path)?;
    ensure!(
        raw.channels == 1,
        "label file {} has {} channels; labels must be single-channel",
        path.display(),
        raw.channels
    );
    let names = cfg.nnunet.as_ref().map(|n| n.labels.clone()).unwrap_or_default();
    let allowed = || {
        let named = names.iter().enumerate().map(|(v, n)| format!("{v} {n}")).collect::<Vec<_>>().join(", ");
        if named.is_empty() { format!("0..{}", cfg.classes - 1) } else { named }
    };
    let mut out = Vec::with_capacity(raw.data.len());
    for v in raw.data {
        ensure!(
            v.is_finite() && v >= 0.0 && v.fract() == 0.0 && (v as usize) < cfg.classes.min(256),
            "label file {} has the value {v}, which is not one of the data set's labels ({})",
            path.display(),
            allowed()
        );
        out.push(v as u8);
    }
    Ok(io::oriented(out, 1, raw.geometry, raw.shape))
}

/// A case as a [`Sample`] (with its labels when `pair.mask` is given).
pub fn read_case(pair: &Pair, cfg: &DataConfig) -> anyhow::Result<Sample> {
    let (image, shape, geometry) = read_channels(&pair.name, &pair.channels, cfg)?;
    let mask = match &pair.mask {
        Some(m) => {
            let (mask, mshape, mframe) = read_labels(m, cfg)?;
            if let (Some(a), Some(b)) = (&geometry, &mframe)
                && (mshape == shape || a.file_shape == b.file_shape)
            {
                crate::data::volume::orient::ensure_same_grid(&pair.image, a, m, b)?;
            }
            ensure!(
                mshape == shape,
                "size mismatch: case `{}` is {} but its label file {} is {}",
                pair.name,
                io::fmt_shape(shape),
                m.display(),
                io::fmt_shape(mshape)
            );
            mask
        }
        None => vec![],
    };
    let (name, channels, source) = (pair.name.clone(), cfg.channels, pair.image.clone());
    Ok(Sample { name, image, mask, channels, shape, source, geometry })
}

/// What an nnU-Net data set gives a new run: channel and label names, and (unless `--normalize`
/// was given) each channel's normalisation, with CT statistics over the foreground voxels of
/// every case in `imagesTr`. `None` for other layouts.
pub fn defaults(root: &Path, explicit_normalize: bool) -> anyhow::Result<Option<NnunetInput>> {
    if !is_nnunet(root) {
        return Ok(None);
    }
    let s = split(&root.join("imagesTr"))?
        .with_context(|| format!("{} is an nnU-Net data set without imagesTr/ to train on", root.display()))?;
    let classes = s.json.labels.len();
    ensure!(classes <= 256, "{} names {classes} labels; unetpp trains at most 256 classes", s.json_path.display());
    let mut norms = vec![];
    if !explicit_normalize {
        let ct: Vec<usize> = (0..s.json.channels.len()).filter(|&c| intensity::is_ct(&s.json.channels[c])).collect();
        let mut fg = vec![intensity::Foreground::default(); s.json.channels.len()];
        if !ct.is_empty() {
            for p in pairs(&s, true)? {
                let label = io::read_raw(p.mask.as_ref().unwrap())?;
                for &c in &ct {
                    let img = io::read_raw(&p.channels[c])?;
                    ensure!(
                        img.data.len() == label.data.len(),
                        "size mismatch: {} and its label file {}",
                        p.channels[c].display(),
                        p.mask.as_ref().unwrap().display()
                    );
                    let voxels: Vec<f32> =
                        img.data.iter().zip(&label.data).filter(|(_, l)| **l > 0.0).map(|(v, _)| *v).collect();
                    fg[c].add_case(&voxels);
                }
            }
        }
        for (c, name) in s.json.channels.iter().enumerate() {
            let voxels = std::mem::take(&mut fg[c]);
            norms.push(intensity::scheme(name, Some(voxels)).with_context(|| s.json_path.display().to_string())?);
        }
    }
    Ok(Some(NnunetInput { channel_names: s.json.channels.clone(), norms, labels: s.json.labels.clone() }))
}

/// `predict`'s inputs when they are nnU-Net cases: `input` is a data set (its `imagesTs/`), a
/// folder of one (`imagesTs/`, `imagesTr/`), or any folder when the model was trained on an
/// nnU-Net data set. Returns the folder and its cases; `None` for other inputs.
pub fn predict_cases(input: &Path, cfg: &DataConfig) -> anyhow::Result<Option<(PathBuf, Vec<Case>)>> {
    if !input.is_dir() {
        return Ok(None);
    }
    let dir = if is_nnunet(input) { input.join("imagesTs") } else { input.to_path_buf() };
    ensure!(dir.is_dir(), "{} is an nnU-Net data set without imagesTs/ to predict", input.display());
    if let Some(s) = split(&dir)? {
        check_config(&s, cfg)?;
        return Ok(Some((dir.clone(), cases(&dir, &s.json.file_ending, &s.json.channels)?)));
    }
    let Some(nn) = &cfg.nnunet else { return Ok(None) };
    // No dataset.json here: the file ending is whichever supported one the files share.
    let ending = std::fs::read_dir(&dir)?
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_lowercase))
        .filter(|n| !n.starts_with('.'))
        .find_map(|n| [".nii.gz", ".nii", ".png", ".tif", ".tiff", ".bmp"].into_iter().find(|e| n.ends_with(e)))
        .with_context(|| format!("no images found in {}", dir.display()))?;
    Ok(Some((dir.clone(), cases(&dir, ending, &nn.channel_names)?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cases_group_channel_files_and_name_what_is_missing() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        for f in ["a_0000.nii.gz", "a_0001.nii.gz", "b_c_0000.nii.gz", "b_c_0001.nii.gz", "notes.txt", ".x_0000.nii.gz"]
        {
            std::fs::write(d.join(f), b"").unwrap();
        }
        let names = ["CT".to_string(), "T2".to_string()];
        let got = cases(d, ".nii.gz", &names).unwrap();
        assert_eq!(got.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), ["a", "b_c"]);
        assert_eq!(got[1].files, [d.join("b_c_0000.nii.gz"), d.join("b_c_0001.nii.gz")]);
        std::fs::write(d.join("a_0002.nii.gz"), b"").unwrap();
        let e = cases(d, ".nii.gz", &names).unwrap_err().to_string();
        assert!(e.contains("case `a` has a file for channel 0002") && e.contains("2 channel(s) (CT, T2)"), "{e}");
        std::fs::remove_file(d.join("a_0002.nii.gz")).unwrap();
        std::fs::remove_file(d.join("b_c_0001.nii.gz")).unwrap();
        let e = cases(d, ".nii.gz", &names).unwrap_err().to_string();
        assert!(e.contains("case `b_c` lacks channel 0001 (`T2`)") && e.contains("b_c_0001.nii.gz"), "{e}");
        std::fs::write(d.join("c.nii.gz"), b"").unwrap();
        let e = cases(d, ".nii.gz", &names).unwrap_err().to_string();
        assert!(e.contains("c.nii.gz is not named CASE_XXXX.nii.gz"), "{e}");
        std::fs::remove_file(d.join("c.nii.gz")).unwrap();
        std::fs::write(d.join("c_0000.png"), b"").unwrap();
        let e = cases(d, ".nii.gz", &names).unwrap_err().to_string();
        assert!(e.contains("c_0000.png does not end in .nii.gz"), "{e}");
    }
}
