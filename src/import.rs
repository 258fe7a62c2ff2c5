//! PyTorch UNet++ checkpoints in and out: the `NestedUNet` (and `UNet`) layout of
//! pytorch-nested-unet — nodes `conv{i}_{j}` made of `conv1/bn1/conv2/bn2`, heads `final` or
//! `final1..L`, bilinear up-sampling with align_corners=True — from `.pth`/`.pt` state dicts or
//! `.safetensors`, with a report of every tensor mapped, missing or unexpected.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use anyhow::{Context, bail, ensure};
use burn::prelude::*;
use burn::store::{
    BurnToPyTorchAdapter, KeyRemapper, ModuleSnapshot, PyTorchToBurnAdapter, PytorchStore, SafetensorsStore,
};

use crate::model::{Arch, ModelConfig, Preset, UNetPP};

/// What an import did with each tensor.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub mapped: Vec<String>,
    /// Model parameters the checkpoint did not provide.
    pub missing: Vec<String>,
    /// Checkpoint tensors the model has no place for (BatchNorm's `num_batches_tracked` is expected).
    pub unexpected: Vec<String>,
    pub errors: Vec<String>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} tensors mapped, {} missing, {} unexpected",
            self.mapped.len(),
            self.missing.len(),
            self.unexpected.len()
        )?;
        for m in &self.missing {
            writeln!(f, "  missing: {m}")?;
        }
        for u in &self.unexpected {
            writeln!(f, "  unexpected: {u}")?;
        }
        for e in &self.errors {
            writeln!(f, "  error: {e}")?;
        }
        Ok(())
    }
}

fn is_safetensors(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "safetensors")
}

/// Prefixes that wrap a state dict in the wild: `{'state_dict': ...}`, DataParallel's `module.`.
const PREFIX: &str = r"^(?:state_dict\.|model_state_dict\.|model\.)?(?:module\.)?";

/// Tensor names and shapes of a checkpoint, wrapping prefixes removed.
pub fn shapes(path: &Path) -> anyhow::Result<BTreeMap<String, Vec<usize>>> {
    let raw: Vec<(String, Vec<usize>)> = if is_safetensors(path) {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| anyhow::anyhow!("{} is not a valid safetensors file: {e}", path.display()))?;
        st.tensors().into_iter().map(|(k, v)| (k, v.shape().to_vec())).collect()
    } else {
        let reader = burn::store::pytorch_reader::PytorchReader::new(path)
            .map_err(|e| anyhow::anyhow!("{} is not a readable PyTorch checkpoint: {e}", path.display()))?;
        reader.tensors().iter().map(|(k, t)| (k.clone(), t.shape().to_vec())).collect()
    };
    let re = regex::Regex::new(PREFIX).unwrap();
    Ok(raw.into_iter().map(|(k, s)| (re.replace(&k, "").into_owned(), s)).collect())
}

/// The architecture a NestedUNet/UNet state dict describes.
pub fn infer_config(path: &Path, shapes: &BTreeMap<String, Vec<usize>>) -> anyhow::Result<ModelConfig> {
    let shape = |k: &str| shapes.get(k).cloned();
    let Some(first) = shape("conv0_0.conv1.weight") else {
        bail!("{} is not a NestedUNet/UNet checkpoint: it has no `conv0_0.conv1.weight`", path.display());
    };
    ensure!(first.len() == 4, "{}: conv0_0.conv1.weight has shape {first:?}; only 2D models import", path.display());
    let depth = (1..=5).take_while(|i| shapes.contains_key(&format!("conv{i}_0.conv1.weight"))).count();
    ensure!(depth >= 1, "{}: no encoder node conv1_0", path.display());
    let arch = if shapes.contains_key("conv0_1.conv1.weight") || depth == 1 { Arch::Unetpp } else { Arch::Unet };
    let deep_supervision = shapes.contains_key("final1.weight");
    let head = if deep_supervision { "final1.weight" } else { "final.weight" };
    let classes = shape(head).with_context(|| format!("{}: no head `{head}`", path.display()))?[0];
    let cfg = ModelConfig {
        width: first[0],
        in_channels: first[1],
        classes,
        dims: 2,
        deep_supervision,
        align_corners: true,
        ..ModelConfig::new(arch, Preset::Modern, depth)
    };
    for i in 0..=depth {
        let w = shape(&format!("conv{i}_0.conv1.weight")).unwrap();
        ensure!(
            w[0] == cfg.filters(i),
            "{}: conv{i}_0 has {} filters, expected {} (width x 2^i)",
            path.display(),
            w[0],
            cfg.filters(i)
        );
    }
    Ok(cfg)
}

fn to_burn() -> KeyRemapper {
    let mut pairs = vec![
        (format!(r"{PREFIX}conv(\d)_(\d)\.conv(\d)\."), "grid.$1.$2.block.conv$3.".to_string()),
        (format!(r"{PREFIX}conv(\d)_(\d)\.bn(\d)\."), "grid.$1.$2.block.norm$3.".to_string()),
        (format!(r"{PREFIX}final\."), "heads.0.".to_string()),
    ];
    for k in 1..=5 {
        pairs.push((format!(r"{PREFIX}final{k}\."), format!("heads.{}.", k - 1)));
    }
    KeyRemapper::from_patterns(pairs).expect("valid patterns")
}

fn to_torch(cfg: &ModelConfig) -> KeyRemapper {
    let mut pairs = vec![
        (r"^grid\.(\d)\.(\d)\.block\.conv(\d)\.".to_string(), "conv${1}_${2}.conv$3.".to_string()),
        (r"^grid\.(\d)\.(\d)\.block\.norm(\d)\.".to_string(), "conv${1}_${2}.bn$3.".to_string()),
    ];
    let columns = cfg.head_columns();
    for (h, j) in columns.iter().enumerate() {
        let name = if cfg.deep_supervision { format!("final{j}.") } else { "final.".to_string() };
        pairs.push((format!(r"^heads\.{h}\."), name));
    }
    KeyRemapper::from_patterns(pairs).expect("valid patterns")
}

/// Loads a NestedUNet/UNet checkpoint. Fails, listing them, if any parameter is missing or
/// any tensor other than `num_batches_tracked` has no place in the model.
pub fn import(path: &Path, device: &Device) -> anyhow::Result<(UNetPP<4>, Report)> {
    let cfg = infer_config(path, &shapes(path)?)?;
    let mut model = cfg.init::<4>(device);
    let result = if is_safetensors(path) {
        let mut store = SafetensorsStore::from_file(path)
            .with_from_adapter(PyTorchToBurnAdapter)
            .remap(to_burn())
            .map_indices_contiguous(false)
            .allow_partial(true);
        model.load_from(&mut store).map_err(|e| anyhow::anyhow!("cannot load {}: {e}", path.display()))?
    } else {
        let mut store =
            PytorchStore::from_file(path).remap(to_burn()).map_indices_contiguous(false).allow_partial(true);
        model.load_from(&mut store).map_err(|e| anyhow::anyhow!("cannot load {}: {e}", path.display()))?
    };
    let report = Report {
        mapped: result.applied.clone(),
        missing: result.missing.iter().map(|(p, _)| p.clone()).collect(),
        unexpected: result.unused.iter().filter(|u| !u.ends_with("num_batches_tracked")).cloned().collect(),
        errors: result.errors.iter().map(|e| e.to_string()).collect(),
    };
    ensure!(
        report.missing.is_empty() && report.unexpected.is_empty() && report.errors.is_empty(),
        "{} does not match the architecture it describes ({:?}, depth {}, width {}):\n{report}",
        path.display(),
        cfg.arch,
        cfg.depth,
        cfg.width
    );
    Ok((model, report))
}

/// Writes a 2D `modern` model as `.safetensors` with NestedUNet names (BatchNorm `weight/bias`,
/// `num_batches_tracked` included), loadable with PyTorch's `load_state_dict(strict=True)`.
pub fn export(model: &UNetPP<4>, path: &Path) -> anyhow::Result<()> {
    let cfg = model.config();
    ensure!(
        cfg.preset == Preset::Modern,
        "only the `modern` preset (BatchNorm, no transposed convs) has a NestedUNet layout"
    );
    let mut store = SafetensorsStore::from_bytes(None).with_to_adapter(BurnToPyTorchAdapter).remap(to_torch(cfg));
    model.save_into(&mut store).map_err(|e| anyhow::anyhow!("cannot serialise: {e}"))?;
    let bytes = store.get_bytes().map_err(|e| anyhow::anyhow!("cannot serialise: {e}"))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)?;
    let zero = 0i64.to_le_bytes();
    let mut views: Vec<(String, safetensors::tensor::TensorView)> = st.tensors();
    let counters: Vec<String> = views
        .iter()
        .filter_map(|(k, _)| k.strip_suffix(".running_mean").map(|p| format!("{p}.num_batches_tracked")))
        .collect();
    for c in counters {
        views.push((c, safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![], &zero)?));
    }
    let out = safetensors::serialize(views, None)?;
    crate::checkpoint::write_atomic(path, &out)
}
