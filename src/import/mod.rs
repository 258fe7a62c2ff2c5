//! PyTorch UNet++ checkpoints in and out: the `NestedUNet` (and `UNet`) layout of
//! pytorch-nested-unet — nodes `conv{i}_{j}` made of `conv1/bn1/conv2/bn2`, heads `final` or
//! `final1..L`, bilinear up-sampling with align_corners=True — from `.pth`/`.pt` state dicts or
//! `.safetensors`, with a report of every tensor mapped, missing or unexpected — and
//! segmentation_models.pytorch's `UnetPlusPlus` on ResNet encoders ([`smp`]).

pub mod smp;

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use anyhow::{Context, bail, ensure};
use burn::prelude::*;
use burn::store::{
    BurnToPyTorchAdapter, KeyRemapper, ModuleSnapshot, PyTorchToBurnAdapter, PytorchStore, SafetensorsStore,
};

use crate::model::{Arch, ModelConfig, Preset, UNetPP};

/// Float tensors by name: shape and values (converted to f32).
pub type Tensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// What an import did with each tensor.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub mapped: Vec<String>,
    /// Model parameters the checkpoint did not provide.
    pub missing: Vec<String>,
    /// Checkpoint tensors the model has no place for (BatchNorm's `num_batches_tracked` is expected).
    pub unexpected: Vec<String>,
    /// Checkpoint tensors knowingly left out (smp's encoder stages beyond its encoder depth,
    /// which smp builds but never runs).
    pub ignored: Vec<String>,
    pub errors: Vec<String>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} tensors mapped, {} missing, {} unexpected, {} ignored",
            self.mapped.len(),
            self.missing.len(),
            self.unexpected.len(),
            self.ignored.len()
        )?;
        if !self.ignored.is_empty() {
            writeln!(f, "  ignored: {} tensors of encoder stages the model never runs", self.ignored.len())?;
        }
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
        let sizes: Vec<(&String, usize)> = reader.tensors().iter().map(|(k, t)| (k, t.byte_len())).collect();
        check_declared(path, &sizes)?;
        reader.tensors().iter().map(|(k, t)| (k.clone(), t.shape().to_vec())).collect()
    };
    let re = regex::Regex::new(PREFIX).unwrap();
    Ok(raw.into_iter().map(|(k, s)| (re.replace(&k, "").into_owned(), s)).collect())
}

/// A `.pth` view can declare far more elements than its storage holds (`expand` shares one
/// storage at stride 0), and reading it materialises them all: a 2 KB file can ask for
/// gigabytes. `torch.save` stores tensors uncompressed, so real tensors fit in the file; refuse
/// any tensor, or all of them together, declaring more bytes than the file has.
fn check_declared(path: &Path, sizes: &[(&String, usize)]) -> anyhow::Result<()> {
    let file = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?.len() as usize;
    let advice = "its tensors share or expand storage (torch `expand`); save real copies (`.contiguous().clone()`)";
    if let Some((k, b)) = sizes.iter().find(|(_, b)| *b > file) {
        bail!("{}: tensor `{k}` declares {b} bytes but the whole file is {file} bytes: {advice}", path.display());
    }
    let total = sizes.iter().fold(0usize, |a, (_, b)| a.saturating_add(*b));
    ensure!(
        total <= file,
        "{}: its tensors declare {total} bytes in all but the file is {file} bytes: {advice}",
        path.display()
    );
    Ok(())
}

/// The shape of a convolution weight `key`, which must be 4D [out, in, kh, kw] with every extent
/// at least 1; `expected` describes it for the message.
pub(crate) fn conv_shape(
    path: &Path,
    shapes: &BTreeMap<String, Vec<usize>>,
    key: &str,
    expected: &str,
) -> anyhow::Result<[usize; 4]> {
    let p = path.display();
    let s = shapes.get(key).with_context(|| format!("{p}: no tensor `{key}` (expected shape {expected})"))?;
    match s[..] {
        [o, i, h, w] if o > 0 && i > 0 && h > 0 && w > 0 => Ok([o, i, h, w]),
        _ => bail!("{p}: tensor `{key}` has shape {s:?}, expected {expected}"),
    }
}

/// Every expected convolution weight is present with the shape the architecture gives it, so
/// that building the model (which allocates all of them) cannot be driven by a crafted shape.
fn check_node_shapes(path: &Path, shapes: &BTreeMap<String, Vec<usize>>, cfg: &ModelConfig) -> anyhow::Result<()> {
    for (i, j) in cfg.nodes() {
        let (w, cin) = (cfg.node_width(i, j), cfg.node_inputs(i, j));
        for (conv, want) in [(1, [w, cin, 3, 3]), (2, [w, w, 3, 3])] {
            let key = format!("conv{i}_{j}.conv{conv}.weight");
            let got = conv_shape(path, shapes, &key, &format!("{want:?}"))?;
            ensure!(got == want, "{}: tensor `{key}` has shape {got:?}, expected {want:?}", path.display());
        }
    }
    Ok(())
}

/// A checkpoint holds every weight of its model: refuse one whose shapes describe a model
/// larger than the values it holds, before building (allocating) that model.
fn check_holds_model(path: &Path, shapes: &BTreeMap<String, Vec<usize>>, cfg: &ModelConfig) -> anyhow::Result<()> {
    let held = shapes.values().map(|s| s.iter().product::<usize>() as f64).sum::<f64>();
    let need = cfg.parameters_estimate();
    ensure!(
        need <= held,
        "{}: its shapes describe a model of at least {need:.0} weights but it holds only {held:.0} values",
        path.display()
    );
    Ok(())
}

/// Weights must be finite: a NaN or infinity makes every prediction NaN, found only later.
fn check_finite(path: &Path, tensors: &Tensors) -> anyhow::Result<()> {
    for (k, (shape, data)) in tensors {
        if let Some(i) = data.iter().position(|v| !v.is_finite()) {
            bail!(
                "{}: tensor `{k}` (shape {shape:?}) has a non-finite value ({}) at index {i}",
                path.display(),
                data[i]
            );
        }
    }
    Ok(())
}

/// The architecture a NestedUNet/UNet state dict describes.
pub fn infer_config(path: &Path, shapes: &BTreeMap<String, Vec<usize>>) -> anyhow::Result<ModelConfig> {
    let shape = |k: &str| shapes.get(k).cloned();
    let p = path.display();
    let Some(first) = shape("conv0_0.conv1.weight") else {
        bail!(
            "{} is neither a NestedUNet/UNet checkpoint (no `conv0_0.conv1.weight`) nor an smp UnetPlusPlus \
             (no `encoder.conv1.weight` and `decoder.blocks.x_*`)",
            path.display()
        );
    };
    ensure!(first.len() != 5, "{p}: conv0_0.conv1.weight has shape {first:?}; only 2D models import");
    let first = conv_shape(path, shapes, "conv0_0.conv1.weight", "[width, in_channels, 3, 3], both at least 1")?;
    let depth = (1..=5).take_while(|i| shapes.contains_key(&format!("conv{i}_0.conv1.weight"))).count();
    ensure!(depth >= 1, "{}: no encoder node conv1_0", path.display());
    let arch = if shapes.contains_key("conv0_1.conv1.weight") || depth == 1 { Arch::Unetpp } else { Arch::Unet };
    let deep_supervision = shapes.contains_key("final1.weight");
    let head = if deep_supervision { "final1.weight" } else { "final.weight" };
    let classes = conv_shape(path, shapes, head, &format!("[classes, {}, 1, 1], classes at least 1", first[0]))?[0];
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
        let key = format!("conv{i}_0.conv1.weight");
        let w = conv_shape(path, shapes, &key, &format!("[{}, in, 3, 3]", cfg.filters(i)))?;
        ensure!(
            w[0] == cfg.filters(i),
            "{p}: conv{i}_0 has {} filters, expected {} (width x 2^i)",
            w[0],
            cfg.filters(i)
        );
    }
    cfg.validate().with_context(|| format!("{p}: unsupported model"))?;
    check_node_shapes(path, shapes, &cfg)?;
    for (h, j) in cfg.head_columns().into_iter().enumerate() {
        let key = if deep_supervision { format!("final{}.weight", h + 1) } else { "final.weight".to_string() };
        let want = [classes, cfg.node_width(0, j), 1, 1];
        let got = conv_shape(path, shapes, &key, &format!("{want:?}"))?;
        ensure!(got == want, "{p}: tensor `{key}` has shape {got:?}, expected {want:?}");
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

/// Every floating-point tensor of a checkpoint as f32 (float16/bfloat16/float64 converted),
/// wrapping prefixes removed; integer tensors (BatchNorm's `num_batches_tracked`) are skipped.
pub fn read_tensors(path: &Path) -> anyhow::Result<Tensors> {
    use burn::store::pytorch_reader::DType;
    let p = path.display();
    let to_f32 = |bytes: &[u8], size: usize, f: fn(&[u8]) -> f32| bytes.chunks_exact(size).map(f).collect::<Vec<f32>>();
    let f16 = |b: &[u8]| half::f16::from_le_bytes([b[0], b[1]]).to_f32();
    let bf16 = |b: &[u8]| half::bf16::from_le_bytes([b[0], b[1]]).to_f32();
    let f32_ = |b: &[u8]| f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let f64_ = |b: &[u8]| f64::from_le_bytes(b.try_into().unwrap()) as f32;
    let mut raw = vec![];
    if is_safetensors(path) {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read {p}"))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| anyhow::anyhow!("{p} is not a valid safetensors file: {e}"))?;
        for (k, v) in st.tensors() {
            let data = match v.dtype() {
                safetensors::Dtype::F16 => to_f32(v.data(), 2, f16),
                safetensors::Dtype::BF16 => to_f32(v.data(), 2, bf16),
                safetensors::Dtype::F32 => to_f32(v.data(), 4, f32_),
                safetensors::Dtype::F64 => to_f32(v.data(), 8, f64_),
                _ => continue,
            };
            raw.push((k, v.shape().to_vec(), data));
        }
    } else {
        let reader = burn::store::pytorch_reader::PytorchReader::new(path)
            .map_err(|e| anyhow::anyhow!("{p} is not a readable PyTorch checkpoint: {e}"))?;
        for (k, t) in reader.tensors() {
            let (size, f): (usize, fn(&[u8]) -> f32) = match t.dtype() {
                DType::F16 => (2, f16),
                DType::BF16 => (2, bf16),
                DType::F32 => (4, f32_),
                DType::F64 => (8, f64_),
                _ => continue,
            };
            let bytes = t.read().with_context(|| format!("{p}: cannot read tensor `{k}`"))?;
            raw.push((k.clone(), t.shape().to_vec(), to_f32(&bytes, size, f)));
        }
    }
    let re = regex::Regex::new(PREFIX).unwrap();
    Ok(raw.into_iter().map(|(k, s, d)| (re.replace(&k, "").into_owned(), (s, d))).collect())
}

/// Tensors in PyTorch conventions as an in-memory safetensors file.
fn to_safetensors(tensors: &Tensors) -> anyhow::Result<Vec<u8>> {
    let views = tensors
        .iter()
        .map(|(k, (s, d))| {
            Ok((
                k.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), bytemuck::cast_slice(d))?,
            ))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(safetensors::serialize(views, None)?)
}

/// Options for checkpoints whose weights do not say everything.
#[derive(Clone, Copy, Debug, Default)]
pub struct ImportOptions {
    /// smp models trained with `decoder_interpolation="bilinear"` (smp's default is nearest).
    pub bilinear: bool,
}

/// Loads a NestedUNet/UNet or smp UnetPlusPlus checkpoint. Fails, listing them, if any
/// parameter is missing or any tensor other than `num_batches_tracked` has no place in the model.
pub fn import(path: &Path, device: &Device) -> anyhow::Result<(UNetPP<4>, Report)> {
    import_with(path, ImportOptions::default(), device)
}

pub fn import_with(path: &Path, opts: ImportOptions, device: &Device) -> anyhow::Result<(UNetPP<4>, Report)> {
    let shapes = shapes(path)?;
    if smp::detect(&shapes) {
        let cfg = smp::infer_config(path, &shapes, opts.bilinear)?;
        check_holds_model(path, &shapes, &cfg)?;
        let tensors = read_tensors(path)?;
        check_finite(path, &tensors)?;
        let (tensors, ignored) = smp::to_ours(path, &cfg, tensors)?;
        let mut model = cfg.init::<4>(device);
        let mut store = SafetensorsStore::from_bytes(Some(to_safetensors(&tensors)?))
            .with_from_adapter(PyTorchToBurnAdapter)
            .map_indices_contiguous(false)
            .allow_partial(true);
        let result = model.load_from(&mut store).map_err(|e| anyhow::anyhow!("cannot load {}: {e}", path.display()))?;
        return finish(path, model, result, ignored);
    }
    let cfg = infer_config(path, &shapes)?;
    check_holds_model(path, &shapes, &cfg)?;
    check_finite(path, &read_tensors(path)?)?;
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
    finish(path, model, result, vec![])
}

fn finish(
    path: &Path,
    model: UNetPP<4>,
    result: burn::store::ApplyResult,
    ignored: Vec<String>,
) -> anyhow::Result<(UNetPP<4>, Report)> {
    let report = Report {
        mapped: result.applied.clone(),
        missing: result.missing.iter().map(|(p, _)| p.clone()).collect(),
        unexpected: result.unused.iter().filter(|u| !u.ends_with("num_batches_tracked")).cloned().collect(),
        ignored,
        errors: result.errors.iter().map(|e| e.to_string()).collect(),
    };
    let cfg = model.config();
    ensure!(
        report.missing.is_empty() && report.unexpected.is_empty() && report.errors.is_empty(),
        "{} does not match the architecture it describes ({:?}, {:?} encoder, depth {}):\n{report}",
        path.display(),
        cfg.arch,
        cfg.encoder,
        cfg.depth,
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
    crate::fsio::write_atomic(path, &out)
}
