//! A checkpoint is one file: a magic tag, the JSON metadata needed to rebuild and feed the model
//! (architecture, channels, normalisation), then burn's burnpack weights. It is written to a
//! temporary file and renamed, so a crash never leaves a half-written checkpoint behind.

use std::path::Path;

use anyhow::{Context, bail, ensure};
use burn::module::Module;
use burn::prelude::*;
use burn::store::ModuleRecord;
use serde::{Deserialize, Serialize};

use crate::data::DataConfig;
use crate::model::{ModelConfig, UNetPP};

const MAGIC: &[u8; 8] = b"UNETPP01";

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Meta {
    pub model: ModelConfig,
    pub data: DataConfig,
    /// Epochs trained when written.
    pub epoch: usize,
    /// Validation IoU at that epoch, if measured.
    pub val_iou: Option<f64>,
}

pub fn save<const D: usize>(model: &UNetPP<D>, meta: &Meta, path: &Path) -> anyhow::Result<()> {
    let json = serde_json::to_vec(meta)?;
    let weights =
        model.clone().into_record().into_bytes().map_err(|e| anyhow::anyhow!("cannot serialise weights: {e:?}"))?;
    let mut out = Vec::with_capacity(16 + json.len() + weights.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(&weights);
    crate::fsio::write_atomic(path, &out)
}

fn split(path: &Path) -> anyhow::Result<(Meta, Vec<u8>)> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read checkpoint {}", path.display()))?;
    ensure!(bytes.len() >= 16 && &bytes[..8] == MAGIC, "{} is not a unetpp checkpoint", path.display());
    let n = u64::from_le_bytes(bytes[8..16].try_into().unwrap());
    // Compared in u64: a corrupt length near 2^64 must not wrap around.
    ensure!(
        n <= bytes.len() as u64 - 16,
        "checkpoint {} is truncated: its metadata is declared as {n} bytes but only {} follow",
        path.display(),
        bytes.len() - 16
    );
    let end = 16 + n as usize;
    let meta: Meta = serde_json::from_slice(&bytes[16..end])
        .with_context(|| format!("checkpoint {} has corrupt metadata", path.display()))?;
    Ok((meta, bytes[end..].to_vec()))
}

pub fn read_meta(path: &Path) -> anyhow::Result<Meta> {
    Ok(split(path)?.0)
}

pub fn load<const D: usize>(path: &Path, device: &Device) -> anyhow::Result<(UNetPP<D>, Meta)> {
    let (meta, weights) = split(path)?;
    meta.model.validate().with_context(|| format!("checkpoint {} has invalid metadata", path.display()))?;
    if meta.model.dims + 2 != D {
        bail!("checkpoint {} holds a {}D model", path.display(), meta.model.dims);
    }
    // `init` is lazy (no weights allocated yet): the metadata may declare any width, so the
    // parameter count it implies is checked against the weights actually in the file (at least
    // 2 bytes each) before anything of that size is allocated.
    let model = meta.model.init::<D>(device);
    let params = model.num_params();
    ensure!(
        params.saturating_mul(2) <= weights.len(),
        "checkpoint {} declares a model of {params} parameters but holds only {} bytes of weights",
        path.display(),
        weights.len()
    );
    let record = ModuleRecord::from_bytes(burn::tensor::Bytes::from_bytes_vec(weights))
        .map_err(|e| anyhow::anyhow!("checkpoint {} has corrupt weights: {e:?}", path.display()))?;
    let model = model
        .try_load_record(record)
        .map_err(|e| anyhow::anyhow!("checkpoint {} does not match its architecture: {e:?}", path.display()))?;
    Ok((model, meta))
}
