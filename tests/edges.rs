//! The CLI only maps flags: what it writes is what the library computes from the same options,
//! every command goes through `app` (and takes `--backend` where it runs a model), and bad
//! options the library used to trust are refused with a message.
mod common;
use common::*;

use std::path::{Path, PathBuf};

use burn::prelude::*;
use unetpp::app;
use unetpp::checkpoint::{self, Meta};
use unetpp::data::{DataConfig, Normalize};
use unetpp::model::{Arch, ModelConfig, Preset};
use unetpp::train::{ModelOptions, TrainConfig, TrainOptions};

fn nuclei() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("samples").join("nuclei")
}

fn tiny() -> ModelConfig {
    ModelConfig { width: 4, ..ModelConfig::new(Arch::Unetpp, Preset::Modern, 2) }
}

fn tiny_checkpoint(path: &Path) -> ModelConfig {
    let cfg = tiny();
    let data = DataConfig::new(1, 1, Normalize::ZScore);
    checkpoint::save(
        &cfg.init::<4>(&Device::flex()),
        &Meta { model: cfg.clone(), data, epoch: 1, val_iou: None },
        path,
    )
    .unwrap();
    cfg
}

#[test]
fn train_writes_the_config_the_library_builds_from_the_same_options() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let data = nuclei();
    let flags = ["--width", "4", "--depth", "2", "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "2"];
    let size = ["--patch", "32", "--tile", "64", "--lr", "0.001"];
    let mut args = vec!["train", "--data", s(&data), "--out", s(&run)];
    args.extend(flags.iter().chain(&size));
    ok(&args);
    let written: TrainConfig = toml::from_str(&std::fs::read_to_string(run.join("config.toml")).unwrap()).unwrap();
    let o = TrainOptions {
        data: Some(data),
        model: ModelOptions { width: Some(4), depth: Some(2), ..Default::default() },
        epochs: Some(1),
        steps_per_epoch: Some(1),
        batch_size: Some(2),
        patch: Some([32; 3]),
        tile: Some([64; 3]),
        lr: Some(0.001),
        ..Default::default()
    };
    let expected = TrainConfig::from_options(&o).unwrap();
    assert_eq!(toml::to_string(&written).unwrap(), toml::to_string(&expected).unwrap());
    // The defaults the CLI left to the library, spelled out.
    assert_eq!((written.val_crop, written.foreground, written.patience, written.seed), ([1, 384, 384], 0.33, 5, 42));
    assert_eq!(written.input.normalize, Normalize::Percentile { low: 0.5, high: 99.5 });
}

#[test]
fn info_prints_what_the_library_describes() {
    let stdout = ok(&["info", "--width", "4", "--depth", "2"]);
    let expected = app::info_of(None, &ModelOptions { width: Some(4), depth: Some(2), ..Default::default() }).unwrap();
    assert_eq!(stdout, expected);
    assert_eq!(expected, app::info(&tiny()).unwrap());
    let p = unetpp::dispatch::num_params(&tiny(), None).unwrap();
    assert!(stdout.contains(&format!("parameters: {p} ")), "{stdout}");
    let stdout = ok(&["info", "--width", "4", "--depth", "2", "--dims", "3"]);
    let p3 = unetpp::dispatch::num_params(&ModelConfig { dims: 3, ..tiny() }, None).unwrap();
    assert!(stdout.contains("3D") && stdout.contains(&format!("parameters: {p3} ")), "{stdout}");
}

#[test]
fn commands_that_load_a_model_take_backend_and_the_others_refuse_it() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("m.unetpp");
    let cfg = tiny_checkpoint(&ck);
    let pruned = tmp.path().join("l1.unetpp");
    let stdout = ok(&["prune", "--checkpoint", s(&ck), "--level", "1", "--out", s(&pruned), "--backend", "flex"]);
    let (before, after) =
        (unetpp::dispatch::num_params(&cfg, None).unwrap(), unetpp::dispatch::num_params(&cfg, Some(1)).unwrap());
    assert!(stdout.contains(&format!("{after} parameters (from {before})")), "{stdout}");
    assert_eq!(checkpoint::read_meta(&pruned).unwrap().model.depth, 1);
    let exported = tmp.path().join("m.safetensors");
    ok(&["export", "--checkpoint", s(&ck), "--out", s(&exported), "--backend", "flex"]);
    let imported = tmp.path().join("back.unetpp");
    ok(&["import", "--from", s(&exported), "--out", s(&imported), "--backend", "flex"]);
    // PyTorch's bilinear up-sampling (what the import targets) aligns corners; ours does not.
    let back = checkpoint::read_meta(&imported).unwrap().model;
    assert_eq!(ModelConfig { align_corners: false, ..back }, cfg);
    fails_with(
        &["prune", "--checkpoint", s(&ck), "--level", "1", "--out", s(&pruned), "--backend", "cuda"],
        2,
        &["invalid value 'cuda' for '--backend", "flex"],
    );
    // Info builds no model on a device; clap names the option it does not take.
    fails_with(&["info", "--backend", "flex"], 2, &["unexpected argument '--backend'"]);
}

#[test]
fn bench_refuses_dims_it_has_no_model_for() {
    // Before: an index underflow panic (4D) or a 3D model with 2D sizes (1).
    for d in ["1", "4"] {
        fails_with(&["bench", "--dims", d, "--reps", "1"], 1, &["--dims must be 2 or 3", &format!("got {d}")]);
    }
}

#[test]
fn sizes_are_checked_where_they_are_parsed() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let data = nuclei();
    fails_with(
        &["train", "--data", s(&data), "--out", s(&out), "--patch", "32,32,32,32"],
        2,
        &["--patch", "must be N, H,W or D,H,W"],
    );
    fails_with(&["train", "--data", s(&data), "--out", s(&out), "--tile", "big"], 2, &["--tile", "bad size `big`"]);
    assert!(!out.exists());
}
