//! nnU-Net's `dataset.json`: channel names (which pick each channel's normalisation), label
//! names and values, the file ending and the number of training cases.
//!
//! nnU-Net v2 (documentation/dataset_format.md) writes `channel_names` {"0": "CT", ...} and
//! `labels` {"background": 0, "liver": 1, ...}; v1 wrote `modality` and `labels` the other way
//! round ({"0": "background", ...}). Both are read. Region-based labels (a list of values per
//! name) and an `ignore` label are refused: this model trains one softmax over label values.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, bail, ensure};
use serde_json::Value;

/// The parts of a `dataset.json` that unetpp uses.
#[derive(Clone, Debug, PartialEq)]
pub struct DatasetJson {
    /// Channel names in channel order (`_0000` first).
    pub channels: Vec<String>,
    /// Label names by value: `labels[v]` names label value `v`; values are 0..labels.len().
    pub labels: Vec<String>,
    /// `.nii.gz`, `.png`, ...; with the leading dot.
    pub file_ending: String,
    pub num_training: Option<usize>,
}

impl DatasetJson {
    pub fn read(path: &Path) -> anyhow::Result<DatasetJson> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let json: Value =
            serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
        Self::parse(&json).with_context(|| format!("{}", path.display()))
    }

    pub fn parse(json: &Value) -> anyhow::Result<DatasetJson> {
        let obj = json.as_object().context("dataset.json must hold a JSON object")?;
        let (channels, v1) = match (obj.get("channel_names"), obj.get("modality")) {
            (Some(c), _) => (c, false),
            (None, Some(m)) => (m, true),
            (None, None) => bail!("neither `channel_names` (nnU-Net v2) nor `modality` (v1) is given"),
        };
        let key = if v1 { "modality" } else { "channel_names" };
        let channels = indexed(channels, key)?;
        let labels = obj.get("labels").context("`labels` is missing")?;
        let labels = if v1 { indexed(labels, "labels")? } else { labels_v2(labels)? };
        ensure!(labels.len() >= 2, "`labels` must name background (0) and at least one class, got {labels:?}");
        let file_ending = match obj.get("file_ending") {
            Some(Value::String(s)) if s.starts_with('.') && s.len() > 1 => s.clone(),
            Some(other) => bail!("`file_ending` must be a string such as \".nii.gz\", got {other}"),
            // v1 data sets are NIfTI throughout.
            None if v1 => ".nii.gz".into(),
            None => bail!("`file_ending` is missing (e.g. \".nii.gz\")"),
        };
        let num_training = match obj.get("numTraining") {
            None => None,
            Some(v) => {
                Some(v.as_u64().with_context(|| format!("`numTraining` must be a whole number, got {v}"))? as usize)
            }
        };
        Ok(DatasetJson { channels, labels, file_ending, num_training })
    }
}

/// {"0": name, "1": name, ...} with the indices 0..n each given once.
fn indexed(v: &Value, key: &str) -> anyhow::Result<Vec<String>> {
    let obj = v.as_object().with_context(|| format!("`{key}` must map indices to names, got {v}"))?;
    let mut by_index = BTreeMap::new();
    for (k, name) in obj {
        let i: usize = k.trim().parse().with_context(|| format!("`{key}`: key `{k}` is not a whole number"))?;
        let name = name.as_str().with_context(|| format!("`{key}`: the name of {i} must be a string, got {name}"))?;
        by_index.insert(i, name.to_string());
    }
    ensure!(!by_index.is_empty(), "`{key}` is empty");
    consecutive(by_index, key)
}

/// v2 labels: {name: value}; a list of values is a region, which is refused.
fn labels_v2(v: &Value) -> anyhow::Result<Vec<String>> {
    let obj = v.as_object().with_context(|| format!("`labels` must map names to values, got {v}"))?;
    let mut by_value = BTreeMap::new();
    for (name, value) in obj {
        ensure!(
            !value.is_array(),
            "`labels`: `{name}` is a region ({value}); region-based labels are not supported, only one value per label"
        );
        ensure!(
            name != "ignore",
            "`labels`: an `ignore` label ({value}) is not supported; remove it or relabel those voxels"
        );
        let n = value.as_u64().with_context(|| format!("`labels`: `{name}` must be a whole number, got {value}"))?;
        ensure!(n <= u16::MAX as u64, "`labels`: `{name}` is {n}; label values go up to 65535");
        if let Some(prev) = by_value.insert(n as usize, name.clone()) {
            bail!("`labels`: `{prev}` and `{name}` both have the value {n}");
        }
    }
    consecutive(by_value, "labels")
}

fn consecutive(map: BTreeMap<usize, String>, key: &str) -> anyhow::Result<Vec<String>> {
    let given: Vec<usize> = map.keys().copied().collect();
    if let Some(missing) = (0..given.len()).find(|i| !map.contains_key(i)) {
        bail!("`{key}` must be consecutive from 0 (nnU-Net requires it), but {missing} is missing from {given:?}");
    }
    Ok(map.into_values().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn v2_and_v1_give_the_same_names() {
        let v2 = json!({"channel_names": {"1": "T2", "0": "CT"}, "labels": {"tumour": 2, "background": 0, "liver": 1},
                        "numTraining": 4, "file_ending": ".nii.gz"});
        let want = DatasetJson {
            channels: vec!["CT".into(), "T2".into()],
            labels: vec!["background".into(), "liver".into(), "tumour".into()],
            file_ending: ".nii.gz".into(),
            num_training: Some(4),
        };
        assert_eq!(DatasetJson::parse(&v2).unwrap(), want);
        let v1 = json!({"modality": {"0": "CT", "1": "T2"}, "labels": {"0": "background", "2": "tumour", "1": "liver"},
                        "numTraining": 4});
        assert_eq!(DatasetJson::parse(&v1).unwrap(), want);
    }

    #[test]
    fn bad_files_are_refused_with_the_key_and_value() {
        let base = |labels: Value| json!({"channel_names": {"0": "CT"}, "labels": labels, "file_ending": ".nii.gz"});
        let cases = [
            (base(json!({"background": 0, "a": 2})), "1 is missing from [0, 2]"),
            (base(json!({"background": 0, "a": [1, 2], "b": 2})), "`a` is a region"),
            (base(json!({"background": 0, "a": 1, "ignore": 2})), "`ignore` label"),
            (base(json!({"background": 0, "a": 1, "b": 1})), "both have the value 1"),
            (base(json!({"background": 0, "a": "x"})), "`a` must be a whole number"),
            (base(json!({"background": 0})), "at least one class"),
            (
                json!({"channel_names": {"1": "CT"}, "labels": {"background": 0, "a": 1}, "file_ending": ".nii.gz"}),
                "`channel_names` must be consecutive from 0",
            ),
            (json!({"labels": {"background": 0, "a": 1}, "file_ending": ".nii.gz"}), "neither `channel_names`"),
            (json!({"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1}}), "`file_ending` is missing"),
        ];
        for (j, needle) in cases {
            let e = format!("{:#}", DatasetJson::parse(&j).unwrap_err());
            assert!(e.contains(needle), "{j}: {e}");
        }
    }
}
