//! A data set's fingerprint (nnU-Net's `DatasetFingerprintExtractor`): every training case read
//! once for its shape and spacing (of the LPS-aligned array the network sees), the voxel count of
//! each label value, and per channel the intensity statistics of the foreground voxels (label > 0)
//! over all cases, gathered as the CT normalisation gathers them ([`Foreground`]), so that a plan's
//! CT window is the one `train` would compute.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, ensure};
use serde::{Deserialize, Serialize};

use crate::data::intensity::{ChannelNorm, Foreground};
use crate::data::volume::orient::Frame;
use crate::data::{self, Splits, io, layout};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Case {
    pub name: String,
    /// The image file (the first channel's for nnU-Net data).
    pub image: PathBuf,
    /// Of the array the network sees: volumes LPS-aligned, `[1, h, w]` for 2D images.
    pub shape_zyx: [usize; 3],
    /// mm between voxel centres of that array, as `--spacing` takes it; absent for 2D images.
    pub spacing_xyz: Option<[f64; 3]>,
    /// Voxels per label value in the label file (values as stored: 255 for a binary PNG mask).
    pub label_voxels: BTreeMap<u32, u64>,
}

/// One channel's foreground intensities over every case, in the file's own units.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChannelStats {
    pub name: String,
    pub foreground_voxels: u64,
    pub mean: f64,
    /// Population standard deviation.
    pub std: f64,
    /// numpy's (linear) percentiles of a strided sample of up to [`Foreground::PER_CASE`] voxels a case.
    pub percentile_00_5: f64,
    pub percentile_99_5: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Fingerprint {
    pub data: PathBuf,
    /// 3 for volumes of more than one slice, else 2.
    pub dims: usize,
    /// nnU-Net's `channel_names`; `0`, `1`, ... for other layouts.
    pub channel_names: Vec<String>,
    /// nnU-Net's label names by value; empty for other layouts.
    pub label_names: Vec<String>,
    pub cases: Vec<Case>,
    /// Per channel; `None` where no case has a foreground voxel.
    pub foreground: Vec<Option<ChannelStats>>,
}

impl Fingerprint {
    /// Reads every case of `root`'s training data (and `val/` where there is one) once.
    pub fn collect(root: &Path) -> anyhow::Result<Fingerprint> {
        let splits = Splits::find(root)?;
        let dirs: Vec<PathBuf> = [splits.train, splits.val].into_iter().flatten().collect();
        ensure!(!dirs.is_empty(), "{} has no training data (train/ or images/) to plan from", root.display());
        let dims = crate::app::detect_dims(root)?;
        let nnunet = layout::split(&dirs[0])?;
        let mut channel_names = nnunet.as_ref().map(|s| s.json.channels.clone()).unwrap_or_default();
        let label_names = nnunet.as_ref().map(|s| s.json.labels.clone()).unwrap_or_default();
        let (mut cases, mut fg) = (vec![], vec![]);
        for dir in &dirs {
            for pair in data::pairs(dir, true)? {
                let (case, voxels) = read_case(&pair)?;
                if channel_names.is_empty() {
                    channel_names = (0..voxels.len()).map(|c| c.to_string()).collect();
                }
                ensure!(
                    voxels.len() == channel_names.len(),
                    "{} has {} channel(s) but the data set's first case has {}",
                    pair.image.display(),
                    voxels.len(),
                    channel_names.len()
                );
                fg.resize_with(voxels.len(), || (0u64, Foreground::default()));
                for (c, v) in voxels.iter().enumerate() {
                    fg[c].0 += v.len() as u64;
                    fg[c].1.add_case(v);
                }
                cases.push(case);
            }
        }
        let foreground = fg
            .into_iter()
            .zip(&channel_names)
            .map(|((n, f), name)| match f.stats() {
                Some(ChannelNorm::Ct { low, high, mean, std }) => Some(ChannelStats {
                    name: name.clone(),
                    foreground_voxels: n,
                    mean,
                    std,
                    percentile_00_5: low,
                    percentile_99_5: high,
                }),
                _ => None,
            })
            .collect();
        Ok(Fingerprint { data: root.to_path_buf(), dims, channel_names, label_names, cases, foreground })
    }
}

/// A case's fingerprint and, per channel, its foreground voxels in file order (the order the CT
/// normalisation reads them in).
fn read_case(pair: &data::Pair) -> anyhow::Result<(Case, Vec<Vec<f32>>)> {
    let files = if pair.channels.is_empty() { vec![pair.image.clone()] } else { pair.channels.clone() };
    let mask = pair.mask.as_ref().context("a case without a label file")?;
    let label = io::read_raw(mask)?;
    // Grey masks saved as RGB are read as grey, as training reads them; any channel set is foreground.
    let n = label.shape.iter().product::<usize>();
    let values: Vec<f32> = match label.channels {
        1 => label.data,
        3 if !io::is_volume(mask) => {
            (0..n).map(|i| label.data[i].max(label.data[n + i]).max(label.data[2 * n + i])).collect()
        }
        c => anyhow::bail!("label file {} has {c} channels; labels must be single-channel", mask.display()),
    };
    let mut label_voxels = BTreeMap::new();
    for &v in &values {
        ensure!(
            v.is_finite() && v >= 0.0 && v.fract() == 0.0 && v <= u16::MAX as f32,
            "label file {} has the value {v}; labels are whole numbers 0..65535",
            mask.display()
        );
        *label_voxels.entry(v as u32).or_insert(0) += 1;
    }
    let mut voxels = vec![];
    let mut frame = None;
    for f in &files {
        let raw = io::read_raw(f)?;
        ensure!(
            raw.shape == label.shape,
            "size mismatch: {} is {} but its label file {} is {}",
            f.display(),
            io::fmt_shape(raw.shape),
            mask.display(),
            io::fmt_shape(label.shape)
        );
        if let Some(i) = raw.data.iter().position(|v| !v.is_finite()) {
            anyhow::bail!("{} has a non-finite value at voxel {i}", f.display());
        }
        if frame.is_none() {
            frame = raw.geometry.map(|g| Frame::canonical(g, raw.shape));
        }
        for ch in raw.data.chunks(n) {
            voxels.push(ch.iter().zip(&values).filter(|(_, l)| **l > 0.0).map(|(v, _)| *v).collect());
        }
    }
    let (shape_zyx, spacing_xyz) = match &frame {
        Some(f) => (f.orientation.shape(label.shape), Some(f.geometry().spacing)),
        None => (label.shape, None),
    };
    let case = Case { name: pair.name.clone(), image: pair.image.clone(), shape_zyx, spacing_xyz, label_voxels };
    Ok((case, voxels))
}
