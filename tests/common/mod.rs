//! Helpers every integration test file shares: running the binary and checking how it ended.
#![allow(dead_code)] // each test binary uses its own subset

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use burn::module::{ModuleMapper, Param};
use burn::prelude::Tensor;
use burn::tensor::Distribution;

pub fn unetpp<S: AsRef<OsStr>>(args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_unetpp")).args(args).output().expect("binary runs")
}

/// stdout then stderr, for messages.
pub fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Runs a command that must succeed; returns its stdout.
pub fn ok<S: AsRef<OsStr> + std::fmt::Debug>(args: &[S]) -> String {
    ok_both(args).0
}

/// [`ok`], returning stdout and stderr together.
pub fn ok_text<S: AsRef<OsStr> + std::fmt::Debug>(args: &[S]) -> String {
    let (o, e) = ok_both(args);
    o + &e
}

/// [`ok`], returning stdout and stderr apart.
pub fn ok_both<S: AsRef<OsStr> + std::fmt::Debug>(args: &[S]) -> (String, String) {
    let out = unetpp(args);
    assert!(out.status.success(), "unetpp {args:?} failed:\n{}", text(&out));
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Runs a command that must fail cleanly (exit 1, ours, not a panic) with every needle in its
/// message; returns stderr.
pub fn fails<S: AsRef<OsStr> + std::fmt::Debug>(args: &[S], needles: &[&str]) -> String {
    fails_with(args, 1, needles)
}

/// [`fails`] with exit `code` (1: ours, 2: clap's).
pub fn fails_with<S: AsRef<OsStr> + std::fmt::Debug>(args: &[S], code: i32, needles: &[&str]) -> String {
    let out = unetpp(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "unetpp {args:?} should fail with exit {code}:\n{}", text(&out));
    assert!(!err.contains("panicked"), "panic instead of an error:\n{err}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks `{n}`:\n{err}");
    }
    err
}

/// A folder of the bundled samples.
pub fn samples(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("samples").join(name)
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A randomly initialised tiny UNet++ (width 4, depth 2, binary, z-scored input) in `dims`
/// dimensions, saved at `path`; enough wherever only the plumbing around a model is tested.
pub fn tiny_checkpoint(path: &Path, dims: usize) -> unetpp::model::ModelConfig {
    use unetpp::model::{Arch, ModelConfig, Preset};
    let cfg = ModelConfig { width: 4, dims, ..ModelConfig::new(Arch::Unetpp, Preset::Modern, 2) };
    let data = unetpp::data::DataConfig::new(1, 1, unetpp::data::Normalize::ZScore);
    let meta = unetpp::checkpoint::Meta { model: cfg.clone(), data, epoch: 1, val_iou: None };
    let device = burn::prelude::Device::flex();
    match dims {
        2 => unetpp::checkpoint::save(&cfg.init::<4>(&device), &meta, path),
        _ => unetpp::checkpoint::save(&cfg.init::<5>(&device), &meta, path),
    }
    .unwrap();
    cfg
}

/// `unetpp` with `env` set and none of the test hooks (`UNETPP_FAILPOINT`, `UNETPP_MEMORY_GB`)
/// inherited from the test's own environment.
pub fn unetpp_env<S: AsRef<OsStr>>(args: &[S], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_unetpp"));
    c.args(args).env_remove("UNETPP_FAILPOINT").env_remove("UNETPP_MEMORY_GB");
    c.envs(env.iter().copied()).output().expect("binary runs")
}

/// `unetpp` killed at `failpoint` (`NAME:N`, the `UNETPP_FAILPOINT` hook of src/fsio.rs).
pub fn unetpp_cut<S: AsRef<OsStr>>(args: &[S], failpoint: &str) -> Output {
    unetpp_env(args, &[("UNETPP_FAILPOINT", failpoint)])
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Training flags small enough for a test: the real architecture at width 4 (unless changed),
/// depth 2, `epochs` epochs of `steps` steps of `batch` patches of `patch`, validated in windows
/// of `tile`. Change a field with `Tiny { epochs: "3", ..Tiny::D2 }`.
#[derive(Clone, Copy, Debug)]
pub struct Tiny {
    pub width: &'static str,
    pub epochs: &'static str,
    pub steps: &'static str,
    pub batch: &'static str,
    pub patch: &'static str,
    pub tile: &'static str,
}

impl Tiny {
    /// 2D: two epochs of two steps of two 32x32 patches, 64x64 windows.
    pub const D2: Tiny = Tiny { width: "4", epochs: "2", steps: "2", batch: "2", patch: "32", tile: "64" };
    /// 3D (the lesion samples' volumes take it): one step of one 16x32x32 patch, 16x32x32 windows.
    pub const D3: Tiny = Tiny { width: "4", epochs: "1", steps: "1", batch: "1", patch: "16,32,32", tile: "16,32,32" };

    /// Every flag: the model's, then [`Tiny::schedule`].
    pub fn flags(self) -> Vec<&'static str> {
        let mut f = vec!["--width", self.width, "--depth", "2"];
        f.extend(self.schedule());
        f
    }

    /// The training schedule's flags only, for a model given otherwise (`--weights`, a plan).
    pub fn schedule(self) -> Vec<&'static str> {
        let Tiny { epochs, steps, batch, patch, tile, .. } = self;
        vec!["--epochs", epochs, "--steps-per-epoch", steps, "--batch-size", batch, "--patch", patch, "--tile", tile]
    }
}

/// `train --data DATA --out OUT`, `tiny`'s flags, then `extra`.
pub fn train_args<'a>(data: &'a Path, out: &'a Path, tiny: Tiny, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec!["train", "--data", s(data), "--out", s(out)];
    a.extend(tiny.flags());
    a.extend_from_slice(extra);
    a
}

/// A checkpoint's header and metadata, then each tensor's name, type, shape and bytes: all of it
/// but the random ids burn gives BatchNorm statistics (which nothing reads back, and which differ
/// between any two runs).
pub fn weights(bytes: &[u8]) -> Vec<u8> {
    use burn::store::burn_pack::Reader;
    use burn::tensor::Bytes;
    let n = 16 + u64::from_le_bytes(bytes[8..16].try_into().unwrap()) as usize;
    let mut out = bytes[..n].to_vec();
    let reader = Reader::from_bytes(Bytes::from_bytes_vec(bytes[n..].to_vec())).unwrap();
    for t in reader.into_tensors().unwrap() {
        let (name, dtype, shape, _, data) = t.into_parts().unwrap();
        out.extend_from_slice(format!("{name} {dtype:?} {shape:?}").as_bytes());
        out.extend_from_slice(&data);
    }
    out
}

/// An experiment spec (`unetpp experiment --spec`): `head` (title, seeds, models), then tiny
/// training on the 2D `data` (one epoch of two steps at width 4, depth 2, percentile
/// normalisation).
pub fn tiny_experiment(head: &str, data: &Path) -> String {
    format!(
        r#"{head}
[train]
data = "{}"
epochs = 1
steps_per_epoch = 2
batch_size = 2
lr = 0.001
patch = [1, 32, 32]
foreground = 0.5
patience = 2
seed = 0
val_fraction = 0.2
tile = [1, 64, 64]
val_crop = [1, 64, 64]
skip_bad = false

[train.model]
arch = "unetpp"
preset = "modern"
depth = 2
width = 4
in_channels = 1
classes = 1
dims = 2
deep_supervision = true

[train.input]
channels = 1
classes = 1

[train.input.normalize]
kind = "percentile"
low = 0.5
high = 99.5
"#,
        data.display()
    )
}

/// Shifts every 1-D parameter (biases, BatchNorm's gamma, beta and running statistics) upwards by
/// 0 to 0.3, so that folding BatchNorm is exercised with statistics that are not the identity and
/// the ReLUs of a width-4 network stay alive (a constant output would match anything).
pub struct Perturb;

impl ModuleMapper for Perturb {
    fn map_float<const K: usize>(&mut self, param: Param<Tensor<K>>) -> Param<Tensor<K>> {
        if K != 1 {
            return param;
        }
        param.map(|t| {
            let noise = Tensor::random(t.shape(), Distribution::Uniform(0.0, 0.3), &t.device());
            t + noise
        })
    }
}
