//! PyTorch NestedUNet checkpoints (made by scripts/torch_refs.py) load into our model and give
//! PyTorch's outputs; export and re-import round-trips; bad checkpoints are refused clearly.

use std::path::{Path, PathBuf};

use burn::prelude::*;
use unetpp::import;

use common::Tiny;

mod common;

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/torch").join(name)
}

fn tensor(st: &safetensors::SafeTensors, name: &str, device: &Device) -> Tensor<4> {
    let v = st.tensor(name).unwrap();
    let floats: Vec<f32> = v.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    let s = v.shape();
    Tensor::<1>::from_floats(floats.as_slice(), device).reshape([s[0], s[1], s[2], s[3]])
}

fn max_abs(a: Tensor<4>, b: Tensor<4>) -> f32 {
    (a - b).abs().max().into_data().iter::<f32>().next().unwrap()
}

/// Max abs error of every head against PyTorch's reference outputs.
fn check(model: &unetpp::model::UNetPP<4>, case: &str) -> f32 {
    let device = Device::flex();
    let bytes = std::fs::read(data(&format!("{case}.io.safetensors"))).unwrap();
    let io = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let heads = model.forward(tensor(&io, "input", &device));
    assert_eq!(heads.len(), io.names().len() - 1, "{case}: number of heads");
    let mut worst = 0f32;
    for (i, h) in heads.into_iter().enumerate() {
        let reference = tensor(&io, &format!("head{i}"), &device);
        // A dead network (constant output) would match anything; the references must vary.
        let spread = reference.clone().var(0).mean().into_data().iter::<f32>().next().unwrap();
        assert!(spread > 1e-6, "{case}: reference head {i} is constant");
        worst = worst.max(max_abs(h, reference));
    }
    worst
}

const CASES: [&str; 4] = ["nested_c1_k1_ds", "nested_c3_k3_ds", "nested_c1_k3", "nested_c3_k1"];

/// Imports `case.ext`, checks the report is complete and the outputs match PyTorch's.
fn import_matches(case: &str, ext: &str) -> unetpp::model::UNetPP<4> {
    let (model, report) = import::import(&data(&format!("{case}.{ext}")), &Device::flex()).unwrap();
    assert!(report.missing.is_empty() && report.unexpected.is_empty(), "{report}");
    let err = check(&model, case);
    eprintln!("{case}.{ext}: {} tensors, max abs error {err:.2e}", report.mapped.len());
    assert!(err <= 1e-4, "{case}.{ext}: max abs error {err}");
    model
}

#[test]
fn nested_unet_matches_pytorch() {
    for case in CASES {
        for ext in ["pth", "safetensors"] {
            import_matches(case, ext);
        }
    }
}

#[test]
fn export_round_trips_with_pytorch_names() {
    let device = Device::flex();
    let tmp = tempfile::tempdir().unwrap();
    for case in ["nested_c3_k3_ds", "nested_c1_k3"] {
        let src = data(&format!("{case}.safetensors"));
        let (model, _) = import::import(&src, &device).unwrap();
        let out = tmp.path().join(format!("{case}.safetensors"));
        import::export(&model, &out).unwrap();
        let names = |p: &Path| import::shapes(p).unwrap();
        assert_eq!(names(&out), names(&src), "same tensor names and shapes as PyTorch's state dict");
        let (again, _) = import::import(&out, &device).unwrap();
        assert!(check(&again, case) <= 1e-4);
    }
}

#[test]
fn mismatched_checkpoints_are_refused() {
    let device = Device::flex();
    let tmp = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(data("nested_c3_k1.safetensors")).unwrap();

    let truncated = tmp.path().join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).unwrap();
    let e = import::import(&truncated, &device).unwrap_err().to_string();
    assert!(e.contains("truncated.safetensors"), "{e}");

    let truncated = tmp.path().join("truncated.pth");
    let pth = std::fs::read(data("nested_c3_k1.pth")).unwrap();
    std::fs::write(&truncated, &pth[..pth.len() / 3]).unwrap();
    let e = import::import(&truncated, &device).unwrap_err().to_string();
    assert!(e.contains("truncated.pth"), "{e}");

    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let wrong = [0u8; 4 * 7];
    let mut views = st.tensors();
    let i = views.iter().position(|(k, _)| k == "conv1_1.conv1.weight").unwrap();
    views[i].1 = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![7], &wrong).unwrap();
    let bad = tmp.path().join("bad_shape.safetensors");
    std::fs::write(&bad, safetensors::serialize(views, None).unwrap()).unwrap();
    let e = format!("{:#}", import::import(&bad, &device).unwrap_err());
    assert!(e.contains("bad_shape.safetensors") && e.contains("conv1_1") || e.contains("grid.1.1"), "{e}");

    let other = tmp.path().join("resnet.safetensors");
    let views = vec![(
        "fc.weight".to_string(),
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![7], &wrong).unwrap(),
    )];
    std::fs::write(&other, safetensors::serialize(views, None).unwrap()).unwrap();
    let e = import::import(&other, &device).unwrap_err().to_string();
    assert!(e.contains("neither a NestedUNet/UNet checkpoint"), "{e}");
}

const SMP: [(&str, &str, unetpp::model::Encoder); 3] = [
    ("smp_resnet18", "pth", unetpp::model::Encoder::Resnet18),
    ("smp_resnet34", "safetensors", unetpp::model::Encoder::Resnet34),
    ("smp_resnet50", "safetensors", unetpp::model::Encoder::Resnet50),
];

/// segmentation_models.pytorch UnetPlusPlus (float16 weights) on ResNet-18/34/50.
#[test]
fn smp_unetplusplus_matches_pytorch() {
    for (case, ext, encoder) in SMP {
        assert_eq!(import_matches(case, ext).config().encoder, encoder, "{case}");
    }
}

/// smp keeps every encoder stage in its state dict whatever its depth; those it never runs are
/// reported as ignored, while a wrong shape in a stage it does run is an error.
#[test]
fn smp_unused_stages_ignored_wrong_shapes_refused() {
    let device = Device::flex();
    let tmp = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(data("smp_resnet34.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let extra = [0u8; 2 * 9];
    let mut views = st.tensors();
    let unused: Vec<String> = (0..3).map(|b| format!("encoder.layer4.{b}.conv1.weight")).collect();
    for name in &unused {
        views.push((
            name.clone(),
            safetensors::tensor::TensorView::new(safetensors::Dtype::F16, vec![1, 1, 3, 3], &extra).unwrap(),
        ));
    }
    let full = tmp.path().join("full.safetensors");
    std::fs::write(&full, safetensors::serialize(views.clone(), None).unwrap()).unwrap();
    let (model, report) = import::import(&full, &device).unwrap();
    assert_eq!(report.ignored, unused);
    assert!(check(&model, "smp_resnet34") <= 1e-4);

    let i = views.iter().position(|(k, _)| k == "encoder.layer2.1.conv2.weight").unwrap();
    views[i].1 = safetensors::tensor::TensorView::new(safetensors::Dtype::F16, vec![1, 1, 3, 3], &extra).unwrap();
    let bad = tmp.path().join("bad.safetensors");
    std::fs::write(&bad, safetensors::serialize(views, None).unwrap()).unwrap();
    let e = format!("{:#}", import::import(&bad, &device).unwrap_err());
    assert!(e.contains("bad.safetensors") && e.contains("layers.1.1.convs.1"), "{e}");
}

/// Runs the `unetpp` binary, which must succeed; returns stdout and stderr.
fn run(args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_unetpp")).args(args).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{args:?}:\n{text}");
    text
}

/// `unetpp import`, then fine-tuning the imported model with `train --weights`, then `export`.
#[test]
fn import_fine_tune_export_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("imported.unetpp");
    let text = run(&["import", "--from", data("nested_c1_k1_ds.pth").to_str().unwrap(), "--out", ck.to_str().unwrap()]);
    assert!(text.contains("188 tensors mapped, 0 missing, 0 unexpected"), "{text}");
    let samples = Path::new(env!("CARGO_MANIFEST_DIR")).join("samples/nuclei");
    let dir = tmp.path().join("finetune");
    run(&[
        "train",
        "--data",
        samples.to_str().unwrap(),
        "--out",
        dir.to_str().unwrap(),
        "--weights",
        ck.to_str().unwrap(),
    ]
    .into_iter()
    .chain(Tiny { epochs: "1", ..Tiny::D2 }.schedule())
    .collect::<Vec<_>>());
    let tuned = dir.join("checkpoints/last.unetpp");
    let exported = tmp.path().join("tuned.safetensors");
    run(&["export", "--checkpoint", tuned.to_str().unwrap(), "--out", exported.to_str().unwrap()]);
    let names = import::shapes(&exported).unwrap();
    assert_eq!(names, import::shapes(&data("nested_c1_k1_ds.safetensors")).unwrap());
}

/// An smp model comes over, fine-tunes on grey images (converted to RGB for its 3-channel
/// stem) and predicts; a ResNet UNet++ trained here with deep supervision runs in fast mode.
#[test]
fn smp_import_fine_tune_and_encoder_training_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let path = |p: &Path| p.to_str().unwrap().to_string();
    let samples = Path::new(env!("CARGO_MANIFEST_DIR")).join("samples/nuclei");
    let ck = tmp.path().join("smp.unetpp");
    let text =
        run(&["import", "--from", &path(&data("smp_resnet18.pth")), "--out", &path(&ck), "--normalize", "imagenet"]);
    assert!(text.contains("92 tensors mapped, 0 missing, 0 unexpected"), "{text}");
    let short = ["--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "2", "--patch", "32", "--tile", "64"];
    let tuned = tmp.path().join("tuned");
    let mut args = vec!["train", "--data", samples.to_str().unwrap(), "--out", tuned.to_str().unwrap()];
    args.extend(["--weights", ck.to_str().unwrap()]);
    args.extend(short);
    run(&args);
    let config = std::fs::read_to_string(tuned.join("config.toml")).unwrap();
    assert!(config.contains("encoder = \"resnet18\"") && config.contains("imagenet"), "{config}");

    let own = tmp.path().join("own");
    let mut args = vec!["train", "--data", samples.to_str().unwrap(), "--out", own.to_str().unwrap()];
    args.extend(["--encoder", "resnet18", "--depth", "3", "--channels", "3", "--normalize", "imagenet"]);
    args.extend(short);
    run(&args);
    let best = own.join("checkpoints/best.unetpp");
    let test = samples.join("test");
    let eval = tmp.path().join("eval");
    let text =
        run(&["eval", "--checkpoint", &path(&best), "--data", &path(&test), "--mode", "fast:2", "--out", &path(&eval)]);
    assert!(text.contains("Dice"), "{text}");
}
