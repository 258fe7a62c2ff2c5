//! nnU-Net-grade inference: mirroring test-time augmentation, ensembles of checkpoints, and the
//! options that steer them (the sliding-window maths are checked in src/infer/window.rs against
//! scripts/window_refs.py). Models are freshly initialised (width 4, depth 2): what is checked is
//! how predictions are combined, which needs no training.

mod common;

use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleMapper, Param};
use burn::prelude::*;
use common::{fails, fails_with, ok, s, samples};
use unetpp::checkpoint::{self, Meta};
use unetpp::data::{DataConfig, Normalize, Sample};
use unetpp::infer::{self, Sliding};
use unetpp::model::{Arch, Mode, ModelConfig, Preset, UNetPP};

fn config(dims: usize, classes: usize) -> ModelConfig {
    ModelConfig { width: 4, dims, classes, ..ModelConfig::new(Arch::Unetpp, Preset::Modern, 2) }
}

fn model<const D: usize>(classes: usize, seed: u64) -> UNetPP<D> {
    let device = Device::flex();
    device.seed(seed);
    config(D - 2, classes).init::<D>(&device)
}

/// A freshly initialised checkpoint (seeded) at `path`.
fn checkpoint_at<const D: usize>(path: &Path, classes: usize, seed: u64) -> PathBuf {
    let normalize = if D == 5 { Normalize::Window { low: -1000.0, high: 400.0 } } else { Normalize::ZScore };
    let data = DataConfig::new(1, classes, normalize);
    let meta = Meta { model: config(D - 2, classes), data, epoch: 0, val_iou: None };
    checkpoint::save(&model::<D>(classes, seed), &meta, path).unwrap();
    path.to_path_buf()
}

/// Every weight made symmetric under mirroring of its spatial axes (the mean of its mirrored
/// copies): with pooling aligned (sizes divisible by 2^depth) such a network is mirror-equivariant.
struct Symmetrise;

impl ModuleMapper for Symmetrise {
    fn map_float<const K: usize>(&mut self, param: Param<Tensor<K>>) -> Param<Tensor<K>> {
        if K < 3 {
            return param;
        }
        param.map(|w| {
            let sets: Vec<Vec<usize>> = (0..1usize << (K - 2))
                .map(|m| (0..K - 2).filter(|a| m >> a & 1 == 1).map(|a| a + 2).collect())
                .collect();
            let n = sets.len() as f64;
            sets.iter()
                .map(|axes| axes.iter().fold(w.clone(), |t, &a| t.flip([a])))
                .reduce(|a, b| a + b)
                .unwrap()
                .div_scalar(n)
        })
    }
}

fn sample(shape: [usize; 3], seed: usize) -> Sample {
    let n = shape.iter().product::<usize>();
    Sample {
        name: "synthetic".into(),
        image: (0..n).map(|i| (((i + seed) * 2654435761usize % 1000) as f32 / 500.0) - 1.0).collect(),
        mask: vec![],
        channels: 1,
        shape,
        source: PathBuf::from("synthetic.nii.gz"),
        geometry: None,
    }
}

fn probs<const D: usize>(model: &UNetPP<D>, s: &Sample, modes: &[Mode], sliding: &Sliding) -> Vec<Vec<f32>> {
    infer::probabilities(std::slice::from_ref(model), s, modes, sliding, &Device::flex()).unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// `index` of voxel (z, y, x) with the axes in `flip` mirrored.
fn mirrored(shape: [usize; 3], i: usize, flip: [bool; 3]) -> usize {
    let (z, y, x) = (i / (shape[1] * shape[2]), i / shape[2] % shape[1], i % shape[2]);
    let m = |v: usize, a: usize| if flip[a] { shape[a] - 1 - v } else { v };
    (m(z, 0) * shape[1] + m(y, 1)) * shape[2] + m(x, 2)
}

fn tta_changes_nothing_on_a_symmetric_model<const D: usize>(shape: [usize; 3]) {
    let tile = [16, 32, 32];
    let (plain, tta) = (Sliding::new(tile), Sliding { tta: true, ..Sliding::new(tile) });
    let s = sample(shape, 3);
    let modes = [Mode::Accurate, Mode::Fast(1)];
    let symmetric = model::<D>(2, 7).map(&mut Symmetrise);
    for (a, b) in probs(&symmetric, &s, &modes, &plain).iter().zip(probs(&symmetric, &s, &modes, &tta)) {
        assert!(max_diff(a, &b) <= 1e-5, "{}D: TTA moved a mirror-equivariant model by {}", D - 2, max_diff(a, &b));
    }
    // The same check can fail: an ordinary model is not mirror-equivariant.
    let ordinary = model::<D>(2, 7);
    let moved = max_diff(&probs(&ordinary, &s, &modes, &plain)[0], &probs(&ordinary, &s, &modes, &tta)[0]);
    assert!(moved > 1e-4, "{}D: TTA left an ordinary model unchanged ({moved})", D - 2);
}

#[test]
fn tta_leaves_a_mirror_equivariant_model_unchanged() {
    tta_changes_nothing_on_a_symmetric_model::<5>([8, 16, 12]);
    tta_changes_nothing_on_a_symmetric_model::<4>([1, 16, 20]);
}

/// TTA equals, by hand, the mean of the 8 passes over the mirrored volume, each mirrored back;
/// in accurate and fast:1 modes from one call.
#[test]
fn tta_is_the_mean_of_the_mirrored_passes() {
    let shape = [8, 12, 16];
    let s = sample(shape, 11);
    let m = model::<5>(1, 5);
    let modes = [Mode::Accurate, Mode::Fast(1)];
    let tile = [16, 32, 32];
    let tta = probs(&m, &s, &modes, &Sliding { tta: true, ..Sliding::new(tile) });
    let n = s.voxels();
    let mut mean = vec![vec![0f32; n]; modes.len()];
    for f in 0..8 {
        let flip = [f & 1 == 1, f & 2 == 2, f & 4 == 4];
        let mut flipped = s.clone();
        flipped.image = (0..n).map(|i| s.image[mirrored(shape, i, flip)]).collect();
        for (sum, p) in mean.iter_mut().zip(probs(&m, &flipped, &modes, &Sliding::new(tile))) {
            sum.iter_mut().enumerate().for_each(|(i, v)| *v += p[mirrored(shape, i, flip)]);
        }
    }
    for (mode, (got, sum)) in modes.iter().zip(tta.iter().zip(&mean)) {
        let want: Vec<f32> = sum.iter().map(|v| v / 8.0).collect();
        assert!(max_diff(got, &want) <= 1e-6, "{mode}: off by {}", max_diff(got, &want));
    }
    assert!(max_diff(&tta[0], &probs(&m, &s, &modes, &Sliding::new(tile))[0]) > 1e-4, "the mean is not one pass");
}

/// Windows predicted in batches give what they give one at a time, with and without TTA.
#[test]
fn window_batches_change_nothing() {
    let s = sample([12, 40, 36], 5);
    let m = model::<5>(2, 9);
    let modes = [Mode::Accurate];
    for tta in [false, true] {
        let one = Sliding { tile: [8, 16, 16], batch: Some(1), tta, ..Sliding::new([0; 3]) };
        assert!(infer::window::origins(s.shape, [8, 16, 16], 0.5).len() > 10);
        let batched = probs(&m, &s, &modes, &Sliding { batch: Some(4), ..one.clone() });
        let d = max_diff(&probs(&m, &s, &modes, &one)[0], &batched[0]);
        assert!(d <= 1e-5, "batches of 4 (tta {tta}) moved the result by {d}");
    }
}

fn read(dir: &Path, name: &str) -> Vec<u8> {
    std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{}: {e}", dir.join(name).display()))
}

fn npy(dir: &Path, name: &str) -> Vec<f32> {
    unetpp::probabilities::read_npy(&dir.join(name)).unwrap().1
}

/// 3D: two identical checkpoints give the one's files bit for bit (comma list or repeated flag),
/// TTA is on by default, and two different checkpoints give the mean of their probabilities.
#[test]
fn ensembles_average_their_members_3d() {
    let tmp = tempfile::tempdir().unwrap();
    let a = checkpoint_at::<5>(&tmp.path().join("a.unetpp"), 1, 1);
    let b = checkpoint_at::<5>(&tmp.path().join("b.unetpp"), 1, 2);
    let input = samples("lesions").join("test/images/lung1.nii.gz");
    let predict = |out: &str, extra: &[&str]| {
        let dir = tmp.path().join(out);
        let mut args = vec!["predict", "--input", s(&input), "--out", s(&dir), "--probabilities", "npy"];
        args.extend(extra);
        ok(&args);
        dir
    };
    let one = predict("one", &["--checkpoint", s(&a)]);
    let comma = format!("{},{}", s(&a), s(&a));
    let twice = predict("twice", &["--checkpoint", &comma]);
    let repeated = predict("repeated", &["--checkpoint", s(&a), "--checkpoint", s(&a), "--tta"]);
    for f in ["lung1.nii.gz", "lung1_prob0.npy"] {
        assert_eq!(read(&one, f), read(&twice, f), "{f}: a,a differs from a");
        assert_eq!(read(&one, f), read(&repeated, f), "{f}: --tta (the 3D default) or a repeated flag differs");
    }
    let no_tta = predict("no-tta", &["--checkpoint", s(&a), "--no-tta"]);
    assert!(max_diff(&npy(&one, "lung1_prob0.npy"), &npy(&no_tta, "lung1_prob0.npy")) > 1e-4, "TTA on by default");

    let pb = npy(&predict("b", &["--checkpoint", s(&b), "--no-tta"]), "lung1_prob0.npy");
    let pab = npy(&predict("ab", &["--checkpoint", &format!("{},{}", s(&a), s(&b)), "--no-tta"]), "lung1_prob0.npy");
    let pa = npy(&no_tta, "lung1_prob0.npy");
    assert!(max_diff(&pa, &pb) > 1e-3, "the two members differ");
    let mean: Vec<f32> = pa.iter().zip(&pb).map(|(x, y)| (x + y) / 2.0).collect();
    assert!(max_diff(&pab, &mean) <= 1e-6, "ensemble off the mean by {}", max_diff(&pab, &mean));

    // eval: the same ensemble scores as its single member, and summary.json names both.
    let eval = |out: &str, cks: &str| {
        let dir = tmp.path().join(out);
        ok(&["eval", "--checkpoint", cks, "--data", s(&samples("lesions")), "--out", s(&dir), "--overlap", "0.25"]);
        let json: serde_json::Value = serde_json::from_slice(&read(&dir, "summary.json")).unwrap();
        json
    };
    let (single, pair) = (eval("ev1", s(&a)), eval("ev2", &comma));
    assert_eq!(single["summary"]["mean_dice"], pair["summary"]["mean_dice"]);
    assert_eq!(pair["checkpoints"].as_array().map(Vec::len), Some(2));
}

/// 2D: mirroring is off by default (and 2D outputs stay as they were), on with --tta.
#[test]
fn tta_is_off_by_default_in_2d() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = checkpoint_at::<4>(&tmp.path().join("a.unetpp"), 1, 3);
    let input = samples("nuclei").join("test/images/2023-05-31_misc_MCC13_rfpcyto_w1cDAPI_s43.tif");
    let predict = |out: &str, extra: &[&str]| {
        let dir = tmp.path().join(out);
        let mut args = vec!["predict", "--checkpoint", s(&ck), "--input", s(&input), "--out", s(&dir)];
        args.extend(["--probabilities", "npy"]);
        args.extend(extra);
        ok(&args);
        npy(&dir, "2023-05-31_misc_MCC13_rfpcyto_w1cDAPI_s43_prob0.npy")
    };
    let default = predict("default", &[]);
    assert_eq!(default, predict("off", &["--no-tta"]));
    assert!(max_diff(&default, &predict("on", &["--tta"])) > 1e-4);
    // Through the library, without windows: the single pass of the one-checkpoint path.
    let (model, meta) = checkpoint::load::<4>(&ck, &Device::flex()).unwrap();
    let s = infer::read_unlabelled(&input, &meta.data).unwrap();
    let p = probs(&model.fold_batchnorm(), &s, &[Mode::Accurate], &Sliding::new([1, 1024, 1024]));
    assert_eq!(p[0], default);
}

#[test]
fn bad_ensembles_and_options_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let a = checkpoint_at::<5>(&tmp.path().join("a.unetpp"), 1, 1);
    let two = checkpoint_at::<5>(&tmp.path().join("two-classes.unetpp"), 2, 1);
    let flat = checkpoint_at::<4>(&tmp.path().join("flat.unetpp"), 1, 1);
    let input = samples("lesions").join("test/images/lung1.nii.gz");
    let out = tmp.path().join("out");
    let predict = |cks: &str, extra: &[&str], needles: &[&str]| {
        let mut args = vec!["predict", "--checkpoint", cks, "--input", s(&input), "--out", s(&out)];
        args.extend(extra);
        fails(&args, needles);
    };
    let pair = format!("{},{}", s(&a), s(&two));
    predict(&pair, &[], &["a.unetpp", "two-classes.unetpp", "classes (1 vs 2)"]);
    predict(&format!("{},{}", s(&a), s(&flat)), &[], &["flat.unetpp", "dims (3 vs 2)"]);
    let missing = tmp.path().join("missing.unetpp");
    predict(&format!("{},{}", s(&a), s(&missing)), &[], &["missing.unetpp"]);
    predict(s(&a), &["--overlap", "1"], &["--overlap 1", "below 1"]);
    predict(s(&a), &["--overlap=-0.5"], &["--overlap -0.5"]);
    predict(s(&a), &["--window-batch", "0"], &["--window-batch 0"]);
    predict(s(&a), &["--mode", "fast:7"], &["fast:7"]);
    assert!(!out.exists(), "nothing written before the checks");
    let both = ["predict", "--checkpoint", s(&a), "--input", s(&input), "--out", s(&out), "--tta", "--no-tta"];
    fails_with(&both, 2, &["--no-tta"]);
    let help = ok(&["predict", "--help"]);
    assert!(help.contains("8x") && help.contains("--overlap") && help.contains("--window-batch"), "{help}");
}
