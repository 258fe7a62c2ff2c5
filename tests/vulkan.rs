//! The `vulkan` backend (burn's CubeCL/wgpu runtime) against Flex, the reference CPU backend:
//! the same model with the same weights must give the same outputs, the same training step and
//! the same predictions from the CLI. CI runs these on SwiftShader, a CPU Vulkan driver (Mesa's
//! lavapipe crashes on invalid SPIR-V from cubecl); see docs/vulkan.md for what ran where.
#![cfg(feature = "vulkan")]

use std::path::{Path, PathBuf};
use std::process::Command;

use burn::module::{Module, ModuleVisitor, Param, RunningState};
use burn::prelude::*;
use burn::tensor::{Distribution, TensorData};
use unetpp::backend::Backend;
use unetpp::model::{Arch, Mode, ModelConfig, Preset, UNetPP};

fn flex() -> Device {
    Backend::Flex.device()
}

fn vulkan() -> Device {
    Backend::Vulkan.device()
}

/// The CLI tests' tiny model: the real architecture at width 4, depth 2.
fn tiny(dims: usize, classes: usize) -> ModelConfig {
    ModelConfig { width: 4, dims, classes, ..ModelConfig::new(Arch::Unetpp, Preset::Modern, 2) }
}

/// A model with seeded weights and non-trivial BatchNorm statistics (so eval mode and folding
/// have something to do), built on `d` (Flex, with or without autodiff).
fn seeded<const D: usize>(cfg: &ModelConfig, seed: u64, d: &Device) -> UNetPP<D> {
    d.seed(seed);
    let m = cfg.init::<D>(d);
    let grid = m
        .grid
        .into_iter()
        .map(|row| {
            row.into_iter()
                .map(|n| {
                    n.map(|mut n| {
                        for bn in [&mut n.block.norm1, &mut n.block.norm2].into_iter().flatten() {
                            let c = bn.gamma.dims()[0];
                            bn.running_mean =
                                RunningState::new(Tensor::random([c], Distribution::Uniform(-0.5, 0.5), d));
                            bn.running_var = RunningState::new(Tensor::random([c], Distribution::Uniform(0.5, 1.5), d));
                            bn.gamma = Param::from_tensor(Tensor::random([c], Distribution::Uniform(0.5, 1.5), d));
                            bn.beta = Param::from_tensor(Tensor::random([c], Distribution::Uniform(0.0, 0.5), d));
                        }
                        n
                    })
                })
                .collect()
        })
        .collect();
    let m = UNetPP { grid, ..m };
    // burn initialises a parameter lazily, on first read, from the RNG of the device it is on
    // then: read every one here, on `d`, in a fixed order, so that a model forked to another
    // device carries these values instead of drawing its own there.
    params(&m);
    m
}

/// A smooth, image-like input with structure at every scale the model sees.
fn input<const D: usize>(shape: [usize; D], device: &Device) -> Tensor<D> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|i| ((i as f32 * 0.37).sin() + (i as f32 * 0.011).cos()) * 0.8).collect();
    Tensor::<1>::from_data(TensorData::new(v, [n]), device).reshape(shape)
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec::<f32>().unwrap()
}

/// Largest absolute difference, after checking shapes agree and every value is finite.
fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    assert!(a.iter().chain(b).all(|v| v.is_finite()), "non-finite output");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn max_abs(a: &[f32]) -> f32 {
    a.iter().map(|v| v.abs()).fold(0.0, f32::max)
}

/// Probabilities agree to 1e-5 absolute (f32 sums in another order on another device);
/// logits to 1e-5 of their scale.
const PROB_TOL: f32 = 1e-5;
const LOGIT_REL_TOL: f32 = 1e-5;

fn outputs_match<const D: usize>(cfg: ModelConfig, shape: [usize; D]) {
    let (f, v) = (flex(), vulkan());
    let m = seeded::<D>(&cfg, 7, &f).valid();
    // Built again rather than cloned: `to_device` moves a BatchNorm's running statistics in
    // place, and a clone shares them (burn-core 0.22.1 `RunningState`), so moving a clone would
    // move the Flex model's statistics too.
    let on_vulkan = seeded::<D>(&cfg, 7, &f).valid().to_device(&v);
    // Every head's logits through the unfolded model (BatchNorm in eval mode).
    for (h, (a, b)) in m.forward(input(shape, &f)).into_iter().zip(on_vulkan.forward(input(shape, &v))).enumerate() {
        let (a, b) = (values(a), values(b));
        let scale = max_abs(&a).max(1e-3);
        eprintln!("{}D head {h}: max |vulkan - flex| = {:e}, scale {scale}", cfg.dims, max_diff(&a, &b));
        assert!(
            max_diff(&a, &b) <= LOGIT_REL_TOL * scale,
            "head {h}: logits differ by {} (scale {scale})",
            max_diff(&a, &b)
        );
    }
    // The inference path: BatchNorm folded, probabilities in every mode.
    let (m, on_vulkan) = (m.fold_batchnorm(), on_vulkan.fold_batchnorm());
    for mode in [Mode::Accurate, Mode::Fast(1), Mode::Fast(2)] {
        let a = values(m.predict(input(shape, &f), mode).unwrap());
        let b = values(on_vulkan.predict(input(shape, &v), mode).unwrap());
        let d = max_diff(&a, &b);
        assert!(d <= PROB_TOL, "{mode}: probabilities differ by {d}");
        eprintln!("{}D {mode}: max |vulkan - flex| = {d:e}", cfg.dims);
    }
}

#[test]
fn outputs_2d_match_flex() {
    outputs_match::<4>(tiny(2, 1), [2, 1, 32, 32]);
}

#[test]
fn outputs_3d_match_flex() {
    outputs_match::<5>(tiny(3, 2), [1, 1, 16, 16, 16]);
}

/// Every float parameter's values in visiting order, or with gradients given, the gradient of
/// every parameter that has one.
struct Params<'a>(Option<&'a burn::tensor::Gradients>, Vec<Vec<f32>>);

impl ModuleVisitor for Params<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        match self.0 {
            None => self.1.push(values(param.val())),
            Some(grads) => self.1.extend(param.val().grad(grads).map(values)),
        }
    }
}

fn params<const D: usize>(m: &UNetPP<D>) -> Vec<Vec<f32>> {
    let mut p = Params(None, vec![]);
    m.visit(&mut p);
    p.1
}

fn gradients<const D: usize>(m: &UNetPP<D>, grads: &burn::tensor::Gradients) -> Vec<Vec<f32>> {
    let mut p = Params(Some(grads), vec![]);
    m.visit(&mut p);
    p.1
}

/// One step of `unetpp train` from the same weights on the same batch: the deep-supervision
/// loss agrees to 1e-5 relative, every parameter's gradient to 1e-4 of its scale, and the step
/// itself (`train::step`: the loss, backward, Adam with epsilon 1e-8) moves the weights alike.
/// Adam's first step moves each weight by about lr times the sign of its gradient, so gradient
/// elements that are zero up to rounding (the biases of convolutions followed by BatchNorm, and
/// sums that cancel) may move the other way on the other device: the updated weights are
/// compared through the gradients, and only bounded by 2 lr themselves.
#[test]
#[ignore = "fails on SwiftShader: the loss agrees but some gradients do not (docs/vulkan.md)"]
fn training_step_matches_flex() {
    const LR: f64 = 1e-3;
    let cfg = tiny(2, 1);
    let shape = [2, 1, 32, 32];
    let target = |d: &Device| input(shape, d).greater_elem(0.3).float();
    let before = params(&seeded::<4>(&cfg, 11, &flex().autodiff()));
    let (mut losses, mut grads, mut stepped) = (vec![], vec![], vec![]);
    for device in [flex().autodiff(), vulkan().autodiff()] {
        // Built afresh for each run: a clone would share its parameters with the first run.
        let m = seeded::<4>(&cfg, 11, &flex().autodiff()).fork(&device);
        let heads = m.forward(input(shape, &device));
        let loss = unetpp::loss::deep_supervision(heads, target(&device), unetpp::loss::Objective::Paper);
        grads.push(gradients(&m, &loss.backward()));
        let mut optim = unetpp::optim::adam(1e-8);
        let (m, loss) = unetpp::train::step(m, &mut optim, LR, input(shape, &device), target(&device));
        losses.push(loss);
        stepped.push(params(&m));
    }
    let (loss_f, loss_v) = (losses[0], losses[1]);
    assert!(loss_f.is_finite() && (loss_f - loss_v).abs() <= 1e-5 * loss_f.abs().max(1.0), "loss {loss_f} vs {loss_v}");
    let (gf, gv) = (&grads[0], &grads[1]);
    assert!(!gf.is_empty() && gf.len() == gv.len(), "{} vs {} gradients", gf.len(), gv.len());
    let global = gf.iter().map(|g| max_abs(g)).fold(0.0, f32::max);
    let rel: Vec<f32> = gf.iter().zip(gv).map(|(a, b)| max_diff(a, b) / max_abs(a).max(1e-3 * global)).collect();
    let worst_rel = rel.iter().copied().fold(0.0, f32::max);
    let off: Vec<(usize, f32)> = rel.iter().copied().enumerate().filter(|(_, r)| *r > 1e-4).collect();
    assert!(off.is_empty(), "gradients (index, difference / scale) off by more than 1e-4: {off:?}");
    let (pf, pv) = (stepped[0].concat(), stepped[1].concat());
    let worst = max_diff(&pf, &pv);
    eprintln!(
        "loss flex {loss_f} vulkan {loss_v}; gradients within {worst_rel:e} of their scale; updated weights within {worst:e}"
    );
    assert!(worst <= 2.0 * LR as f32 * 1.01, "updated weights differ by {worst}, more than Adam's 2 lr");
    // The step did something to compare: most weights moved by about lr on Flex (not all: the
    // biases of convolutions followed by BatchNorm have no gradient).
    let w0 = before.concat();
    let moved = pf.iter().zip(&w0).filter(|(a, b)| (*a - *b).abs() > LR as f32 / 2.0).count();
    assert!(moved * 10 >= pf.len() * 9, "only {moved} of {} weights moved on Flex", pf.len());
}

fn samples(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("samples").join(name)
}

fn ok(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_unetpp")).args(args).output().expect("binary runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "unetpp {args:?} failed:\n{text}");
    text
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn gray(path: &Path) -> Vec<u8> {
    image::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).to_luma8().into_raw()
}

/// `unetpp predict --backend vulkan` writes the masks and 8-bit probability maps Flex writes
/// for a model trained by `unetpp train` on the bundled nuclei: probabilities within one grey
/// level, masks identical except where Flex's probability rounds to 127 or 128 (within 1/255 of
/// the 0.5 threshold, where a 1e-5 difference may flip the label).
#[test]
fn cli_predict_matches_flex() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let tiny = ["--width", "4", "--depth", "2", "--epochs", "2", "--steps-per-epoch", "2", "--batch-size", "2"];
    let data = samples("nuclei");
    let mut train = vec!["train", "--data", s(&data), "--out", s(&run), "--patch", "32", "--tile", "64"];
    train.extend(tiny);
    ok(&train);
    let ck = run.join("checkpoints/best.unetpp");
    let images = samples("nuclei").join("test/images");
    let mut outs = vec![];
    for backend in ["flex", "vulkan"] {
        let out = tmp.path().join(backend);
        let args = ["--checkpoint", s(&ck), "--input", s(&images), "--out", s(&out), "--backend", backend];
        let text = ok(&[&["predict", "--probabilities", "png"][..], &args[..]].concat());
        assert!(text.contains("wrote 4 file(s)"), "{text}");
        outs.push(out);
    }
    let mut names: Vec<String> =
        std::fs::read_dir(&outs[0]).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    let masks: Vec<&String> = names.iter().filter(|n| !n.contains("_prob")).collect();
    assert_eq!(masks.len(), 2, "{names:?}");
    for mask in masks {
        let prob = format!("{}_prob0.png", mask.strip_suffix(".png").unwrap());
        let (pf, pv) = (gray(&outs[0].join(&prob)), gray(&outs[1].join(&prob)));
        let (mf, mv) = (gray(&outs[0].join(mask)), gray(&outs[1].join(mask)));
        assert_eq!((pf.len(), mf.len()), (pv.len(), mv.len()), "{mask}");
        let worst = pf.iter().zip(&pv).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
        assert!(worst <= 1, "{prob}: probabilities differ by {worst} grey levels");
        let flipped = (0..mf.len()).filter(|&i| mf[i] != mv[i]).collect::<Vec<_>>();
        assert!(flipped.iter().all(|&i| pf[i] == 127 || pf[i] == 128), "{mask}: labels differ away from the threshold");
        eprintln!("{mask}: max grey-level difference {worst}, {} label(s) flipped at 0.5", flipped.len());
    }
}

/// The smallest case found of the training step's failure: the gradient of a quotient of two
/// reductions of one tensor, z.sum / (|z|.sum + 1), as the loss's Dice term has. Each op's
/// backward alone (sum_dim, abs, division of two leaves, several consumers of one tensor)
/// matches Flex on SwiftShader; this composition does not.
#[test]
#[ignore = "fails on SwiftShader (docs/vulkan.md): the minimal case of training_step_matches_flex"]
fn quotient_of_reductions_backward_matches_flex() {
    let mut grads = vec![];
    for device in [flex().autodiff(), vulkan().autodiff()] {
        let z = input([2, 1, 64], &device).require_grad();
        let (a, b) = (z.clone().sum_dim(2), z.clone().abs().sum_dim(2).add_scalar(1.0));
        let g = (a / b).sum().backward();
        grads.push(values(z.grad(&g).expect("z has a gradient")));
    }
    // By hand, per image: d(A / B)/dz_i = 1 / B - A · sign(z_i) / B², A = Σz, B = Σ|z| + 1.
    let z = values(input([2, 1, 64], &flex()));
    let by_hand: Vec<f32> = z
        .chunks(64)
        .flat_map(|zs| {
            let (a, b) = (zs.iter().sum::<f32>(), zs.iter().map(|v| v.abs()).sum::<f32>() + 1.0);
            zs.iter().map(move |v| 1.0 / b - a * v.signum() / (b * b))
        })
        .collect();
    assert!(max_diff(&grads[0], &by_hand) <= 1e-5 * max_abs(&by_hand), "Flex's dz is not the hand-computed one");
    let d = max_diff(&grads[0], &grads[1]);
    eprintln!("max |vulkan - flex| of dz = {d:e}, scale {}", max_abs(&grads[0]));
    assert!(d <= 1e-5 * max_abs(&grads[0]), "dz differs by {d}");
}
