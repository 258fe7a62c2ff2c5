//! `export --format onnx`: the exported graph, run in tract (a pure-Rust ONNX runtime), gives
//! our own `predict` probabilities for every arch, preset, encoder, mode and dimensionality, at
//! more than one input size from one file; bad requests are refused before anything is written.
//! (scripts/onnx_check.py runs the same files in ONNX Runtime.)

use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleMapper, Param};
use burn::prelude::*;
use burn::tensor::Distribution;
use tract_onnx::prelude::{
    DatumType, Framework, InferenceFact, InferenceModelExt, IntoRunnable, IntoTValue, TVec, tvec,
};
use unetpp::checkpoint::{self, Meta};
use unetpp::data::{DataConfig, Normalize};
use unetpp::export::Format;
use unetpp::model::{Arch, Encoder, Mode, ModelConfig, Preset, UNetPP};

use common::Perturb;

mod common;

fn tiny(arch: Arch, preset: Preset, dims: usize, classes: usize) -> ModelConfig {
    ModelConfig { width: 4, dims, classes, ..ModelConfig::new(arch, preset, 2) }
}

/// A tiny ResNet-encoder UNet++ with deep supervision (heads on X^0,1 and X^0,2).
fn tiny_resnet(encoder: Encoder, classes: usize) -> ModelConfig {
    ModelConfig { classes, ..ModelConfig::new(Arch::Unetpp, Preset::Modern, 2).with_encoder(encoder, true) }
}

/// The model, saved as a checkpoint in `dir`.
fn saved<const D: usize>(cfg: &ModelConfig, dir: &Path) -> (UNetPP<D>, PathBuf) {
    let model = cfg.init::<D>(&Device::flex()).map(&mut Perturb);
    let data = DataConfig::new(cfg.in_channels, cfg.classes, Normalize::ZScore);
    let ck = dir.join("model.unetpp");
    checkpoint::save(&model, &Meta { model: cfg.clone(), data, epoch: 1, val_iou: None }, &ck).unwrap();
    (model, ck)
}

fn export(ck: &Path, mode: Mode) -> PathBuf {
    let out = ck.with_file_name(format!("model-{mode}.onnx"));
    unetpp::app::export(ck, &out, Format::Onnx, Some(mode), Default::default()).unwrap();
    out
}

type Runnable = std::sync::Arc<tract_onnx::prelude::TypedRunnableModel>;

/// The file as tract loads it for inputs of `shape`. The file's batch and spatial sizes are
/// symbolic; tract is given concrete ones because it cannot prove 2 * (h / 2) == h for a
/// symbolic h (the concatenation after each up-sampling); ONNX Runtime runs the symbolic graph
/// as it is (scripts/onnx_check.py).
fn load(path: &Path, shape: &[usize]) -> Runnable {
    let fact = InferenceFact::dt_shape(DatumType::F32, shape.to_vec());
    let model = tract_onnx::onnx().model_for_path(path).unwrap().with_input_fact(0, fact).unwrap();
    model.into_optimized().unwrap().into_runnable().unwrap()
}

/// Runs `model` on `x` and returns the largest difference from `expected`.
fn max_diff<const D: usize>(model: &Runnable, x: &Tensor<D>, expected: Tensor<D>) -> f32 {
    let input =
        tract_onnx::prelude::Tensor::from_shape(&x.dims(), &x.to_data().iter::<f32>().collect::<Vec<_>>()).unwrap();
    let out: TVec<_> = model.run(tvec!(input.into_tvalue())).unwrap();
    let got = out[0].to_plain_array_view::<f32>().unwrap();
    assert_eq!(got.shape(), &expected.dims()[..], "output shape");
    let want = expected.to_data().iter::<f32>().collect::<Vec<f32>>();
    // A saturated or dead network (constant output) would match anything.
    let spread = want.iter().fold(f32::MIN, |a, &b| a.max(b)) - want.iter().fold(f32::MAX, |a, &b| a.min(b));
    assert!(spread > 1e-3, "predict's probabilities are constant (spread {spread})");
    got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max)
}

/// Exports `cfg` in each mode and checks tract's probabilities against `predict`'s on an input
/// of `shape`.
fn check<const D: usize>(cfg: &ModelConfig, modes: &[Mode], shape: [usize; D]) {
    let dir = tempfile::tempdir().unwrap();
    let (model, ck) = saved::<D>(cfg, dir.path());
    let x = Tensor::<D>::random(shape, Distribution::Normal(0.0, 1.0), &Device::flex());
    for &mode in modes {
        let expected = model.predict(x.clone(), mode).unwrap();
        let diff = max_diff(&load(&export(&ck, mode), &x.dims()), &x, expected);
        assert!(diff <= 1e-4, "{cfg:?} {mode}: tract differs from predict by {diff}");
    }
}

const BOTH: [Mode; 2] = [Mode::Accurate, Mode::Fast(1)];

#[test]
fn unetpp_2d_matches_predict() {
    for preset in [Preset::Paper, Preset::Modern] {
        check::<4>(&tiny(Arch::Unetpp, preset, 2, 1), &BOTH, [1, 1, 32, 32]);
    }
    // Softmax over classes, and three input channels.
    let cfg = ModelConfig { in_channels: 3, ..tiny(Arch::Unetpp, Preset::Modern, 2, 3) };
    check::<4>(&cfg, &BOTH, [2, 3, 32, 32]);
}

#[test]
fn unetpp_3d_matches_predict() {
    for preset in [Preset::Paper, Preset::Modern] {
        check::<5>(&tiny(Arch::Unetpp, preset, 3, 1), &BOTH, [1, 1, 8, 16, 16]);
    }
    check::<5>(&tiny(Arch::Unetpp, Preset::Modern, 3, 2), &[Mode::Accurate], [1, 1, 8, 8, 8]);
}

#[test]
fn unet_wide_unet_and_upsampling_variants_match_predict() {
    for arch in [Arch::Unet, Arch::WideUnet] {
        for preset in [Preset::Paper, Preset::Modern] {
            check::<4>(&tiny(arch, preset, 2, 1), &[Mode::Accurate], [1, 1, 32, 32]);
        }
    }
    // Nearest (smp's default) and align_corners bilinear (imported models).
    let nearest = ModelConfig { nearest: true, ..tiny(Arch::Unetpp, Preset::Modern, 2, 1) };
    check::<4>(&nearest, &BOTH, [1, 1, 32, 32]);
    let corners = ModelConfig { align_corners: true, ..tiny(Arch::Unetpp, Preset::Modern, 2, 1) };
    check::<4>(&corners, &BOTH, [1, 1, 32, 32]);
    check::<5>(&ModelConfig { nearest: true, ..tiny(Arch::Unetpp, Preset::Modern, 3, 1) }, &BOTH, [1, 1, 8, 8, 8]);
}

#[test]
fn resnet_encoders_match_predict() {
    check::<4>(&tiny_resnet(Encoder::Resnet18, 1), &BOTH, [1, 1, 32, 32]);
    // Bottleneck blocks, softmax.
    check::<4>(&tiny_resnet(Encoder::Resnet50, 2), &BOTH, [1, 1, 32, 32]);
}

/// One exported file takes other batch and spatial sizes.
#[test]
fn one_file_takes_any_batch_and_size() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny(Arch::Unetpp, Preset::Modern, 2, 1);
    let (model, ck) = saved::<4>(&cfg, dir.path());
    let onnx = export(&ck, Mode::Accurate);
    for shape in [[1, 1, 32, 32], [3, 1, 48, 64]] {
        let onnx = load(&onnx, &shape);
        let x = Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &Device::flex());
        let diff = max_diff(&onnx, &x, model.predict(x.clone(), Mode::Accurate).unwrap());
        assert!(diff <= 1e-4, "{shape:?}: tract differs from predict by {diff}");
    }
}

fn cat<'a>(a: &[&'a str], b: &[&'a str]) -> Vec<&'a str> {
    [a, b].concat()
}

fn unetpp_bin(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_unetpp")).args(args).output().unwrap()
}

#[test]
fn bad_requests_are_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny(Arch::Unetpp, Preset::Paper, 3, 1);
    let (model, ck) = saved::<5>(&cfg, dir.path());
    let ck_s = ck.to_str().unwrap();
    let out = dir.path().join("m.onnx");
    let out_s = out.to_str().unwrap();
    let refused = |args: &[&str], needle: &str| {
        let o = unetpp_bin(args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(needle), "{args:?}: {err}");
        assert!(!out.exists(), "{args:?} wrote {out_s}");
    };
    let base = ["export", "--checkpoint", ck_s, "--out", out_s];
    refused(&cat(&base, &["--format", "onnx", "--mode", "fast:3"]), "--mode fast:3");
    refused(&cat(&base, &["--format", "onnx", "--mode", "slow"]), "fast:j");
    refused(&cat(&base, &["--format", "tflite"]), "onnx");
    refused(&cat(&base, &["--mode", "fast:1"]), "--format onnx");
    let before = std::fs::read(&ck).unwrap();
    let o = unetpp_bin(&["export", "--checkpoint", ck_s, "--out", ck_s, "--format", "onnx"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("is the input"));
    assert_eq!(std::fs::read(&ck).unwrap(), before, "the checkpoint was overwritten");

    // Non-finite weights (a model that never went through a checkpoint) are refused.
    let poisoned = model.map(&mut NanBias);
    let meta = checkpoint::read_meta(&ck).unwrap();
    let err = format!("{:#}", unetpp::export::onnx_bytes(&(poisoned, meta), Mode::Accurate).unwrap_err());
    assert!(err.contains("NaN or infinite") && err.contains("bias"), "{err}");

    // The CLI path writes a file tract loads, and only it.
    let o = unetpp_bin(&cat(&base, &["--format", "onnx", "--mode", "fast:1"]));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    load(&out, &[1, 1, 8, 8, 8]);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2, "temporary left behind");
}

/// Sets every bias to NaN.
struct NanBias;
impl ModuleMapper for NanBias {
    fn map_float<const K: usize>(&mut self, param: Param<Tensor<K>>) -> Param<Tensor<K>> {
        if K == 1 { param.map(|t| t.mul_scalar(f64::NAN)) } else { param }
    }
}

fn torch_data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/torch").join(name)
}

/// The stored input of a PyTorch reference model (scripts/torch_refs.py).
fn torch_input(case: &str) -> Tensor<4> {
    let bytes = std::fs::read(torch_data(&format!("{case}.io.safetensors"))).unwrap();
    let io = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let v = io.tensor("input").unwrap();
    let floats: Vec<f32> = v.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    let s = v.shape();
    Tensor::<1>::from_floats(floats.as_slice(), &Device::flex()).reshape([s[0], s[1], s[2], s[3]])
}

/// Models imported from PyTorch (NestedUNet: bilinear align_corners; smp on ResNet-18/34/50:
/// nearest, 3x3 heads), exported, run in tract and in ONNX Runtime: both give our `predict`.
/// The ONNX Runtime outputs are scripts/onnx_check.py's (which also checks them against
/// PyTorch's own outputs), kept in tests/data/onnx.
#[test]
fn pytorch_models_match_onnx_runtime() {
    let cases: [(&str, &str, &[&str]); 6] = [
        ("nested_c1_k1_ds", "pth", &["accurate", "fast:1", "fast:3"]),
        ("nested_c3_k3_ds", "safetensors", &["accurate", "fast:2"]),
        ("nested_c3_k1", "pth", &["accurate"]),
        ("smp_resnet18", "pth", &["accurate"]),
        ("smp_resnet34", "safetensors", &["accurate"]),
        ("smp_resnet50", "safetensors", &["accurate"]),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (case, ext, modes) in cases {
        let (model, _) = unetpp::import::import(&torch_data(&format!("{case}.{ext}")), &Device::flex()).unwrap();
        let cfg = model.config().clone();
        let data = DataConfig::new(cfg.in_channels, cfg.classes, Normalize::ZScore);
        let ck = dir.path().join(format!("{case}.unetpp"));
        checkpoint::save(&model, &Meta { model: cfg, data, epoch: 0, val_iou: None }, &ck).unwrap();
        let x = torch_input(case);
        for mode in modes {
            let mode: Mode = mode.parse().unwrap();
            let expected = model.predict(x.clone(), mode).unwrap();
            let ref_path = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/data/onnx")
                .join(format!("{case}-{}.ort.f32", mode.to_string().replace(':', "")));
            let ort: Vec<f32> = std::fs::read(&ref_path)
                .unwrap()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            let want = expected.to_data().iter::<f32>().collect::<Vec<f32>>();
            assert_eq!(ort.len(), want.len(), "{}: size", ref_path.display());
            let diff = ort.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            assert!(diff <= 1e-4, "{case} {mode}: ONNX Runtime differs from predict by {diff}");
            let diff = max_diff(&load(&export(&ck, mode), &x.dims()), &x, expected);
            assert!(diff <= 1e-4, "{case} {mode}: tract differs from predict by {diff}");
        }
    }
}
