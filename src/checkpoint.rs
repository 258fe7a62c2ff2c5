//! A checkpoint is one file: a magic tag, the JSON metadata needed to rebuild and feed the model
//! (architecture, channels, normalisation), then burn's burnpack weights. It is written to a
//! temporary file and renamed, so a crash never leaves a half-written checkpoint behind.

use std::path::Path;

use anyhow::{Context, bail, ensure};
use burn::module::{Module, ModuleVisitor, Param};
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

/// Whether every weight and BatchNorm statistic is finite. A diverged model (NaN or infinite
/// values) is never written, and never loaded: it would predict garbage without a word.
pub fn all_finite<const D: usize>(model: &UNetPP<D>) -> bool {
    struct Finite(bool);
    impl ModuleVisitor for Finite {
        fn visit_float<const K: usize>(&mut self, param: &Param<Tensor<K>>) {
            self.0 = self.0 && param.val().into_data().iter::<f64>().all(f64::is_finite);
        }
    }
    let mut v = Finite(true);
    model.visit(&mut v);
    v.0
}

/// Writes `model` atomically; refuses (leaving `path` as it was) when its weights are not finite.
pub fn save<const D: usize>(model: &UNetPP<D>, meta: &Meta, path: &Path) -> anyhow::Result<()> {
    ensure!(
        all_finite(model),
        "refusing to write {}: the model's weights hold NaN or infinite values (training diverged)",
        path.display()
    );
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
    ensure!(
        all_finite(&model),
        "checkpoint {} holds NaN or infinite weights (written by a diverged training?); it cannot be used",
        path.display()
    );
    Ok((model, meta))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Arch, Preset};
    use burn::module::ModuleMapper;

    /// Multiplies every weight by `f` (f = NaN or infinity poisons the model).
    struct Scale(f64);
    impl ModuleMapper for Scale {
        fn map_float<const K: usize>(&mut self, param: Param<Tensor<K>>) -> Param<Tensor<K>> {
            let f = self.0;
            param.map(|t| t.mul_scalar(f))
        }
    }

    fn tiny() -> (UNetPP<4>, Meta) {
        let cfg = ModelConfig { width: 4, ..ModelConfig::new(Arch::Unetpp, Preset::Modern, 2) };
        let data = DataConfig::new(1, 1, crate::data::Normalize::ZScore);
        let model = cfg.init::<4>(&Device::flex());
        (model, Meta { model: cfg, data, epoch: 1, val_iou: None })
    }

    #[test]
    fn non_finite_weights_are_never_written() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.unetpp");
        let (model, meta) = tiny();
        save(&model, &meta, &p).unwrap();
        let before = std::fs::read(&p).unwrap();
        for bad in [f64::NAN, f64::INFINITY] {
            let poisoned = model.clone().map(&mut Scale(bad));
            assert!(!all_finite(&poisoned));
            let err = format!("{:#}", save(&poisoned, &meta, &p).unwrap_err());
            assert!(err.contains("m.unetpp") && err.contains("NaN or infinite"), "{err}");
            assert_eq!(std::fs::read(&p).unwrap(), before, "the finite checkpoint was replaced");
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "temporary left behind");
        assert!(load::<4>(&p, &Device::flex()).is_ok());
    }

    /// A checkpoint with NaN weights (written by an older unetpp, or edited) is refused at load,
    /// so eval and predict never use it.
    #[test]
    fn non_finite_checkpoint_is_refused_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("nan.unetpp");
        let (model, meta) = tiny();
        let poisoned = model.map(&mut Scale(f64::NAN));
        let json = serde_json::to_vec(&meta).unwrap();
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&(json.len() as u64).to_le_bytes());
        out.extend_from_slice(&json);
        out.extend_from_slice(&poisoned.into_record().into_bytes().unwrap());
        std::fs::write(&p, out).unwrap();
        let err = format!("{:#}", load::<4>(&p, &Device::flex()).err().unwrap());
        assert!(err.contains("nan.unetpp") && err.contains("NaN or infinite"), "{err}");
    }
}
