//! Anisotropic (per-axis) pooling, issue #17: `ModelConfig::pool` divides each level by its own
//! factor per axis [z, y, x]; the grid of nodes, fast modes and pruning are unchanged.

mod common;

use std::path::Path;

use burn::prelude::*;
use tract_onnx::prelude::{
    DatumType, Framework, InferenceFact, InferenceModelExt, IntoRunnable, IntoTValue, TVec, tvec,
};
use unetpp::checkpoint::{self, Meta};
use unetpp::data::{DataConfig, Normalize, Sample};
use unetpp::export::Format;
use unetpp::model::{Arch, Mode, ModelConfig, Preset, UNetPP};

use common::{Perturb, fails_with, ok, s, samples};

fn flex() -> Device {
    Device::flex()
}

/// The anisotropic plan of the brief: level 1 in-plane only, level 2 on every axis.
const ANISO: [[usize; 3]; 2] = [[1, 2, 2], [2, 2, 2]];

fn tiny(dims: usize, preset: Preset, pool: &[[usize; 3]]) -> ModelConfig {
    ModelConfig { width: 4, dims, pool: pool.to_vec(), ..ModelConfig::new(Arch::Unetpp, preset, 2) }
}

fn model<const D: usize>(cfg: &ModelConfig, d: &Device) -> UNetPP<D> {
    cfg.validate().unwrap();
    d.seed(17);
    cfg.init::<D>(d).map(&mut Perturb)
}

/// The model as training starts it (a fixed seed, nothing perturbed).
fn fresh(cfg: &ModelConfig, d: &Device) -> UNetPP<5> {
    d.seed(17);
    cfg.init::<5>(d)
}

/// A smooth, image-like input with structure at every scale the model sees.
fn input<const D: usize>(shape: [usize; D], device: &Device) -> Tensor<D> {
    let n: usize = shape.iter().product();
    let (h, w) = (shape[D - 2], shape[D - 1]);
    let v: Vec<f32> = (0..n)
        .map(|i| {
            let (y, x, z) = ((i / w) % h, i % w, i / (w * h));
            ((x as f32 * 0.37).sin() + (y as f32 * 0.23).cos() + (z as f32 * 0.71).sin()) / 3.0
        })
        .collect();
    Tensor::<1>::from_floats(v.as_slice(), device).reshape(shape)
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().iter::<f32>().collect()
}

/// The largest difference, after checking that `want` is not constant (a dead network would
/// match anything).
fn max_diff(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let spread = want.iter().fold(f32::MIN, |a, &b| a.max(b)) - want.iter().fold(f32::MAX, |a, &b| a.min(b));
    assert!(spread > 1e-3, "constant output (spread {spread})");
    got.iter().zip(want).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Every head's logits in the model's inference form (BatchNorm folded: the fused path in 2D).
fn heads<const D: usize>(m: &UNetPP<D>, x: Tensor<D>) -> Vec<Vec<f32>> {
    m.clone().fold_batchnorm().forward(x).into_iter().map(values).collect()
}

/// The same weights read with an explicit all-2 pool give the same bits as with the empty one:
/// the explicit form takes the same path (fused, in 2D) everywhere.
fn bit_identical<const D: usize>(dims: usize, explicit: [usize; 3], shape: [usize; D]) {
    let d = flex();
    for preset in [Preset::Modern, Preset::Paper] {
        let m = model::<D>(&tiny(dims, preset, &[]), &d);
        let cfg = ModelConfig { pool: vec![explicit; 2], ..m.config.clone() };
        cfg.validate().unwrap();
        assert!(cfg.isotropic() && cfg.scale(2) == m.config.scale(2));
        let same = UNetPP { config: cfg, ..m.clone() };
        let x = input(shape, &d);
        let (a, b) = (heads(&m, x.clone()), heads(&same, x));
        assert_eq!(a.len(), 2);
        assert!(a == b, "{dims}D {preset:?}: an explicit all-2 pool changed the output");
    }
}

#[test]
fn empty_and_explicit_all_two_pool_are_bit_identical() {
    bit_identical::<4>(2, [1, 2, 2], [2, 1, 32, 32]);
    bit_identical::<5>(3, [2, 2, 2], [1, 1, 8, 16, 16]);
}

/// `cfg` on `x`, our kernels against burn's ops only (the composed reference path), every head
/// and the mean probabilities; returns the heads' shapes.
fn kernels_match_burn<const D: usize>(cfg: &ModelConfig, x: Tensor<D>) -> Vec<[usize; D]> {
    let d = flex();
    let m = model::<D>(cfg, &d);
    let ours = m.clone().fold_batchnorm().forward(x.clone());
    let shapes = ours.iter().map(|t| t.dims()).collect();
    let ours: Vec<Vec<f32>> = ours.into_iter().map(values).collect();
    let p = values(m.predict(x.clone(), Mode::Accurate).unwrap());
    unetpp::kernel::set_enabled(false);
    let theirs = heads(&m, x.clone());
    let q = values(m.predict(x, Mode::Accurate).unwrap());
    unetpp::kernel::set_enabled(true);
    for (h, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        let diff = max_diff(a, b);
        assert!(diff <= 1e-4, "{cfg:?} head {h}: kernels differ from burn by {diff}");
    }
    assert!(max_diff(&p, &q) <= 1e-5, "{cfg:?}: predict differs from burn's");
    shapes
}

#[test]
fn anisotropic_3d_forward_has_the_input_shape_and_matches_burn() {
    let x = || input([1, 1, 8, 32, 32], &flex());
    for (preset, nearest) in [(Preset::Modern, false), (Preset::Modern, true), (Preset::Paper, false)] {
        let cfg = ModelConfig { nearest, ..tiny(3, preset, &ANISO) };
        assert_eq!(kernels_match_burn(&cfg, x()), vec![[1, 1, 8, 32, 32]; 2], "{preset:?} nearest {nearest}");
    }
    // The paper preset's transposed convolutions take their level's factor as kernel and stride.
    let m = tiny(3, Preset::Paper, &ANISO).init::<5>(&flex());
    let up = |i: usize, j: usize| m.grid[i][j].as_ref().unwrap().up.as_ref().unwrap().weight.dims();
    assert_eq!((up(0, 1), up(1, 1), up(0, 2)), ([8, 4, 1, 2, 2], [16, 8, 2, 2, 2], [8, 4, 1, 2, 2]));
    // z pooled once only: 6 slices (a multiple of 2, not of 4) go through.
    let cfg = tiny(3, Preset::Modern, &ANISO);
    assert_eq!(kernels_match_burn(&cfg, input([1, 1, 6, 16, 16], &flex())), vec![[1, 1, 6, 16, 16]; 2]);
}

/// In 2D a level that pools one axis only leaves the fused kernel for the composed layer; the
/// other level stays fused. Both match burn's ops.
#[test]
fn anisotropic_2d_forward_matches_burn() {
    let cfg = tiny(2, Preset::Modern, &[[1, 2, 1], [1, 2, 2]]);
    assert_eq!(cfg.scale(2), [1, 4, 2]);
    assert_eq!(kernels_match_burn(&cfg, input([2, 1, 32, 16], &flex())), vec![[2, 1, 32, 16]; 2]);
    let cfg = tiny(2, Preset::Paper, &[[1, 1, 2], [1, 2, 2]]);
    assert_eq!(kernels_match_burn(&cfg, input([1, 1, 16, 32], &flex())), vec![[1, 1, 16, 32]; 2]);
}

/// Training steps on a tiny problem (foreground where the input is high) lower the
/// deep-supervision loss; the first step's loss is the same on our kernels and burn's ops.
#[test]
fn training_lowers_the_loss() {
    let d = flex().autodiff();
    let cfg = tiny(3, Preset::Modern, &ANISO);
    let shape = [2, 1, 8, 32, 32];
    let x = input(shape, &d);
    let y = x.clone().greater_elem(0.3).float();
    // One model for both sides: the seeded generator is shared with tests running alongside.
    let m0 = fresh(&cfg, &d);
    let first = |kernels: bool| {
        unetpp::kernel::set_enabled(kernels);
        let mut optim = unetpp::optim::adam(1e-8);
        let (_, loss) = unetpp::train::step(m0.clone(), &mut optim, 1e-2, x.clone(), y.clone());
        unetpp::kernel::set_enabled(true);
        loss
    };
    let (ours, theirs) = (first(true), first(false));
    assert!((ours - theirs).abs() <= 1e-4, "first loss {ours} on our kernels, {theirs} on burn's");
    let mut m = m0;
    let mut optim = unetpp::optim::adam(1e-8);
    let mut losses = vec![];
    for _ in 0..8 {
        let (next, loss) = unetpp::train::step(m, &mut optim, 1e-2, x.clone(), y.clone());
        assert!(loss.is_finite());
        losses.push(loss);
        m = next;
    }
    assert!(losses[7] < losses[0] - 0.05, "the loss did not fall: {losses:?}");
}

/// fast:1 evaluates the three nodes of L1 and equals the pruned L1, which keeps level 1's
/// factor only and so takes any number of slices.
#[test]
fn prune_and_fast_modes_keep_the_levels_factors() {
    let d = flex();
    let m = model::<5>(&tiny(3, Preset::Modern, &ANISO), &d);
    let x = input([1, 1, 8, 16, 16], &d);
    assert_eq!(m.forward_level(x.clone(), 1).nodes_evaluated, 3);
    let fast = values(m.predict(x.clone(), Mode::Fast(1)).unwrap());
    let pruned = m.clone().prune(1).unwrap();
    assert_eq!(pruned.config.pool, vec![[1, 2, 2]]);
    pruned.config.validate().unwrap();
    pruned.config.check_size([3, 16, 16], "--tile").unwrap();
    let p = values(pruned.predict(x, Mode::Accurate).unwrap());
    assert!(max_diff(&p, &fast) <= 1e-6);
    let odd = input([1, 1, 3, 16, 16], &d);
    assert_eq!(pruned.predict(odd, Mode::Accurate).unwrap().dims(), [1, 1, 3, 16, 16]);
}

/// The checkpoint carries `pool` (in its metadata) and gives back the same model; ONNX
/// export writes the per-axis factors and tract runs the file to `predict`'s probabilities.
#[test]
fn checkpoint_and_onnx_carry_the_pool() {
    let dir = tempfile::tempdir().unwrap();
    let d = flex();
    for preset in [Preset::Modern, Preset::Paper] {
        let cfg = tiny(3, preset, &ANISO);
        let m = model::<5>(&cfg, &d);
        let ck = dir.path().join(format!("{preset:?}.unetpp"));
        let data = DataConfig::new(1, 1, Normalize::ZScore);
        checkpoint::save(&m, &Meta { model: cfg.clone(), data, epoch: 1, val_iou: None }, &ck).unwrap();
        assert_eq!(checkpoint::read_meta(&ck).unwrap().model.pool, ANISO.to_vec());
        let (back, _) = checkpoint::load::<5>(&ck, &d).unwrap();
        assert_eq!(back.config, cfg);
        let x = input([1, 1, 8, 32, 32], &d);
        for mode in [Mode::Accurate, Mode::Fast(1)] {
            let want = m.predict(x.clone(), mode).unwrap();
            assert!(values(back.predict(x.clone(), mode).unwrap()) == values(want.clone()), "{preset:?} {mode}");
            let onnx = dir.path().join(format!("{preset:?}-{mode}.onnx"));
            unetpp::app::export(&ck, &onnx, Format::Onnx, Some(mode), Default::default()).unwrap();
            let diff = onnx_diff(&onnx, &x, want);
            assert!(diff <= 1e-4, "{preset:?} {mode}: tract differs from predict by {diff}");
        }
    }
}

/// tract's output for `x` from the ONNX file, against `expected`.
fn onnx_diff(path: &Path, x: &Tensor<5>, expected: Tensor<5>) -> f32 {
    let fact = InferenceFact::dt_shape(DatumType::F32, x.dims().to_vec());
    let model = tract_onnx::onnx().model_for_path(path).unwrap().with_input_fact(0, fact).unwrap();
    let model = model.into_optimized().unwrap().into_runnable().unwrap();
    let input = tract_onnx::prelude::Tensor::from_shape(&x.dims(), &values(x.clone())).unwrap();
    let out: TVec<_> = model.run(tvec!(input.into_tvalue())).unwrap();
    let got = out[0].to_plain_array_view::<f32>().unwrap();
    assert_eq!(got.shape(), &expected.dims()[..]);
    max_diff(&got.iter().copied().collect::<Vec<_>>(), &values(expected))
}

#[test]
fn sizes_are_checked_per_axis() {
    let cfg = tiny(3, Preset::Modern, &ANISO);
    assert_eq!(cfg.scale(2), [2, 4, 4]);
    cfg.check_size([6, 32, 32], "--patch").unwrap();
    let e = cfg.check_size([6, 30, 32], "--patch").unwrap_err().to_string();
    assert!(e.contains("divisible by 2,4,4 per axis (--depth 2, --pool 1,2,2:2,2,2)"), "{e}");
    assert!(e.contains("e.g. --patch 6,32,32"), "{e}");
    // The isotropic message is as before.
    let e = tiny(3, Preset::Modern, &[]).check_size([6, 32, 32], "--tile").unwrap_err().to_string();
    assert!(e.contains("divisible by 2^depth = 4 (--depth 2)") && e.contains("--tile 8,32,32"), "{e}");
    // Memory per level follows the factors: level 2 holds 1/32 of the voxels, not 1/64.
    let iso = tiny(3, Preset::Modern, &[]);
    assert_eq!((cfg.reduction(1), cfg.reduction(2), iso.reduction(2)), (4.0, 32.0, 64.0));
    assert!(cfg.inference_bytes(8 * 32 * 32) > iso.inference_bytes(8 * 32 * 32));
}

/// Whole-volume inference rounds the window per axis: 6 slices (a multiple of 2, the model's
/// z down-sampling) are not padded to 8, so the result is the model's own output on them.
#[test]
fn inference_windows_round_per_axis() {
    let d = flex();
    let m = model::<5>(&tiny(3, Preset::Modern, &ANISO), &d);
    let shape = [6, 32, 32];
    let x = input([1, 1, 6, 32, 32], &d);
    let s = Sample {
        name: "v".into(),
        image: values(x.clone()),
        mask: vec![],
        channels: 1,
        shape,
        source: "v.nii.gz".into(),
        geometry: None,
    };
    let sliding = unetpp::infer::Sliding::new([64, 128, 128]);
    let probs =
        unetpp::infer::probabilities(std::slice::from_ref(&m), &s, &[Mode::Accurate], &sliding, &d).unwrap().remove(0);
    let direct = values(m.predict(x, Mode::Accurate).unwrap());
    assert!(max_diff(&probs, &direct) <= 1e-6, "the window was padded or cut");
}

/// `train --pool` on volumes: the run's config.toml and checkpoint carry it, a 6-slice patch
/// is accepted, `predict` takes a 6-slice volume and returns it whole, `eval --mode fast:1`
/// works; bad `--pool` values are refused by name.
#[test]
fn train_and_predict_with_pool_from_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let lesions = samples("lesions");
    let train = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = ["train", "--data", s(&lesions), "--width", "2", "--depth", "2"]
            .iter()
            .chain(["--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "1", "--tile", "16,32,32"].iter())
            .map(|v| v.to_string())
            .collect();
        a.extend(extra.iter().map(|v| v.to_string()));
        a
    };
    let args = train(&["--out", s(&run), "--pool", "1,2,2:2,2,2", "--patch", "6,32,32"]);
    ok(&args);
    let config = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(config.contains("pool = [[1, 2, 2], [2, 2, 2]]"), "{config}");
    let best = run.join("checkpoints/best.unetpp");
    assert_eq!(checkpoint::read_meta(&best).unwrap().model.pool, ANISO.to_vec());
    // A 6-slice crop of a test volume, written with its header.
    use nifti::NiftiObject;
    let obj = nifti::ReaderOptions::new().read_file(lesions.join("test/images/lung1.nii.gz")).unwrap();
    let header = obj.header().clone();
    let vol = nifti::IntoNdArray::into_ndarray::<f32>(obj.into_volume()).unwrap();
    let crop = vol.slice(ndarray::s![.., .., 0..6]).to_owned();
    let input = tmp.path().join("in/six.nii.gz");
    std::fs::create_dir_all(input.parent().unwrap()).unwrap();
    nifti::writer::WriterOptions::new(&input).reference_header(&header).write_nifti(&crop).unwrap();
    let pred = tmp.path().join("pred");
    ok(&["predict", "--checkpoint", s(&best), "--input", s(&input), "--out", s(&pred)]);
    let out = nifti::ReaderOptions::new().read_file(pred.join("six.nii.gz")).unwrap();
    assert_eq!(&out.header().dim[1..4], &[64, 64, 6]);
    let ev = tmp.path().join("ev");
    let stdout = ok(&["eval", "--checkpoint", s(&best), "--data", s(&lesions), "--out", s(&ev), "--mode", "fast:1"]);
    assert!(stdout.contains("1 images"), "{stdout}");
    // Refused before anything is written, naming the option.
    let bad = tmp.path().join("bad");
    for (pool, code, needle) in [
        ("2,2,2", 1, "--pool needs one z,y,x per level (2 for --depth 2), got 1"),
        ("1,3,2:2,2,2", 1, "--pool factors must be 1 or 2"),
        ("1,2,x:2,2,2", 2, "`x` in `1,2,x:2,2,2` is not a number"),
    ] {
        let args = train(&["--out", s(&bad), "--pool", pool, "--patch", "8,32,32"]);
        fails_with(&args, code, &[needle]);
        assert!(!bad.exists(), "{pool}: the run directory was created");
    }
    let args = train(&["--out", s(&bad), "--pool", "1,2,2:2,2,2", "--patch", "6,30,32"]);
    fails_with(&args, 1, &["divisible by 2,4,4 per axis"]);
    let info = ok(&["info", "--dims", "3", "--depth", "2", "--pool", "1,2,2:2,2,2"]);
    assert!(info.contains("pooling z,y,x per level 1,2,2:2,2,2: level 2 is the input / [2, 4, 4]"), "{info}");
}
