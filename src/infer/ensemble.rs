//! Ensembles: several checkpoints (e.g. the folds of a cross-validation) predict each input and
//! their probabilities are averaged before the arg-max, as nnU-Net's `predict_from_raw_data`
//! does with its folds (it averages logits; we average probabilities, as accurate mode does
//! over the heads).

use std::path::{Path, PathBuf};

use anyhow::Context;
use burn::prelude::*;

use crate::checkpoint::{self, Meta};
use crate::model::UNetPP;

/// The checkpoints' common metadata (the first's), once every checkpoint is readable and
/// agrees with the first on what the ensemble needs alike: dimensions, input channels, classes
/// and the input configuration (normalisation, spacing, labels). Refused otherwise, naming both
/// files and what differs.
pub fn read_meta(checkpoints: &[PathBuf]) -> anyhow::Result<Meta> {
    let first = checkpoints.first().context("--checkpoint: give at least one checkpoint")?;
    let meta = checkpoint::read_meta(first)?;
    meta.model.validate().with_context(|| format!("checkpoint {}", first.display()))?;
    for other in &checkpoints[1..] {
        let m = checkpoint::read_meta(other)?;
        m.model.validate().with_context(|| format!("checkpoint {}", other.display()))?;
        let differs = differences(&meta, &m)?;
        anyhow::ensure!(
            differs.is_empty(),
            "checkpoints {} and {} cannot be ensembled: their {} differ (an ensemble's members must take the same \
             inputs and predict the same classes)",
            first.display(),
            other.display(),
            differs.join(", ")
        );
    }
    Ok(meta)
}

/// What differs between two checkpoints' metadata that an ensemble needs alike.
fn differences(a: &Meta, b: &Meta) -> anyhow::Result<Vec<String>> {
    let mut differs = vec![];
    for (name, x, y) in [
        ("dims", a.model.dims, b.model.dims),
        ("input channels", a.model.in_channels, b.model.in_channels),
        ("classes", a.model.classes, b.model.classes),
    ] {
        if x != y {
            differs.push(format!("{name} ({x} vs {y})"));
        }
    }
    let (da, db) = (serde_json::to_value(&a.data)?, serde_json::to_value(&b.data)?);
    if let (Some(da), Some(db)) = (da.as_object(), db.as_object()) {
        let mut keys: Vec<&String> = da.keys().chain(db.keys()).collect();
        keys.sort();
        keys.dedup();
        for k in keys {
            if da.get(k) != db.get(k) {
                let show = |v: Option<&serde_json::Value>| v.map_or("absent".to_string(), |v| v.to_string());
                differs.push(format!("input setting `{k}` ({} vs {})", show(da.get(k)), show(db.get(k))));
            }
        }
    }
    Ok(differs)
}

/// Every checkpoint's model, BatchNorm folded for inference, and the first's metadata.
pub fn load<const D: usize>(checkpoints: &[PathBuf], device: &Device) -> anyhow::Result<(Vec<UNetPP<D>>, Meta)> {
    let meta = read_meta(checkpoints)?;
    let models = checkpoints
        .iter()
        .map(|ck| Ok(checkpoint::load::<D>(ck, device)?.0.fold_batchnorm()))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok((models, meta))
}

/// The element-wise mean of the members' outputs (per mode, `classes` planes each), summed in
/// member order. One member's output is returned as it is, so that a one-checkpoint ensemble is
/// that checkpoint, bit for bit.
pub fn mean(members: impl IntoIterator<Item = anyhow::Result<Vec<Vec<f32>>>>) -> anyhow::Result<Vec<Vec<f32>>> {
    let mut sum: Option<Vec<Vec<f32>>> = None;
    let mut count = 0usize;
    for out in members {
        let out = out?;
        count += 1;
        match &mut sum {
            None => sum = Some(out),
            Some(s) => {
                for (a, b) in s.iter_mut().zip(out) {
                    a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
                }
            }
        }
    }
    let mut sum = sum.context("an ensemble needs at least one model")?;
    if count > 1 {
        for v in sum.iter_mut().flatten() {
            *v /= count as f32;
        }
    }
    Ok(sum)
}

/// The first checkpoint, beside which the post-processing decision and report are looked for.
pub fn first(checkpoints: &[PathBuf]) -> &Path {
    checkpoints.first().map(PathBuf::as_path).unwrap_or(Path::new(""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_of_members_and_one_member_unchanged() {
        let a = vec![vec![0.1f32, 0.7], vec![0.3]];
        let b = vec![vec![0.3f32, 0.1], vec![0.5]];
        assert_eq!(mean([Ok(a.clone())]).unwrap(), a);
        assert_eq!(mean([Ok(a.clone()), Ok(a.clone())]).unwrap(), a);
        let m = mean([Ok(a), Ok(b)]).unwrap();
        assert!((m[0][0] - 0.2).abs() < 1e-7 && (m[0][1] - 0.4).abs() < 1e-7 && (m[1][0] - 0.4).abs() < 1e-7);
        assert!(mean(std::iter::empty()).is_err());
    }
}
