//! Balanced gradient checkpointing (the training device's, issue #19) recomputes BatchNorm +
//! ReLU, up-sampling and pooling in the backward instead of keeping them. This test lives in a
//! binary of its own because it seeds Flex's process-wide random generator twice and needs both
//! runs to draw the same numbers (weights, data, the Paper preset's dropout masks): a test
//! running alongside in the same process would draw from it in between.

use burn::module::{Module, ModuleVisitor, Param};
use burn::prelude::*;
use burn::tensor::{Distribution, Gradients};
use unetpp::backend::Backend;
use unetpp::loss::{Objective, deep_supervision};
use unetpp::model::{Arch, ModelConfig, Preset};

/// Each parameter's gradient, None where it has none.
struct Grads<'a>(&'a Gradients, Vec<Option<Vec<f32>>>);
impl ModuleVisitor for Grads<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.1.push(param.val().grad(self.0).map(|g| g.into_data().try_to_vec::<f32>().unwrap()));
    }
}

fn run<const D: usize>(cfg: &ModelConfig, x_dims: [usize; D], d: &Device) -> (f32, Vec<Option<Vec<f32>>>) {
    d.seed(5);
    let m = cfg.init::<D>(d);
    let x = Tensor::<D>::random(x_dims, Distribution::Default, d);
    let y = Tensor::<D>::random(x_dims, Distribution::Bernoulli(0.3), d);
    let loss = deep_supervision(m.forward(x), y, Objective::Paper);
    let value = loss.clone().into_scalar::<f32>();
    let mut grads = Grads(&loss.backward(), vec![]);
    m.visit(&mut grads);
    (value, grads.1)
}

fn check<const D: usize>(cfg: ModelConfig, x_dims: [usize; D]) {
    let kept = Device::flex().autodiff();
    let recomputed = Backend::Flex.training_device();
    assert_eq!(
        recomputed.gradient_checkpointing_strategy(),
        Some(burn::tensor::GradientCheckpointingStrategy::Balanced)
    );
    let (a, b) = (run(&cfg, x_dims, &kept), run(&cfg, x_dims, &recomputed));
    assert!(a.0.is_finite() && a.0 == b.0, "loss {} vs {} ({cfg:?})", a.0, b.0);
    assert_eq!(a.1.len(), b.1.len());
    let with = a.1.iter().flatten().count();
    assert!(with * 2 > a.1.len(), "{with} of {} parameters have gradients ({cfg:?})", a.1.len());
    assert!(a.1.iter().flatten().flatten().any(|g| *g != 0.0), "gradients are all zero ({cfg:?})");
    for (i, (ga, gb)) in a.1.iter().zip(&b.1).enumerate() {
        assert!(ga == gb, "gradient of parameter {i} differs ({cfg:?})");
    }
}

/// The loss and every parameter's gradient are exactly those of a run that kept every
/// activation: with BatchNorm (Modern) and with dropout instead (Paper), 2D, 3D and 3D with
/// in-plane-only pooling. One test function, so nothing else in this process draws numbers.
#[test]
fn checkpointed_training_equals_kept_activations() {
    let cfg = |dims, preset| ModelConfig { dims, width: 4, ..ModelConfig::new(Arch::Unetpp, preset, 3) };
    check::<4>(cfg(2, Preset::Modern), [2, 1, 16, 16]);
    check::<4>(cfg(2, Preset::Paper), [2, 1, 16, 16]);
    check::<5>(cfg(3, Preset::Modern), [1, 1, 8, 16, 16]);
    let aniso = ModelConfig { pool: vec![[1, 2, 2], [2, 2, 2], [2, 2, 2]], ..cfg(3, Preset::Modern) };
    check::<5>(aniso, [1, 1, 8, 16, 16]);
}
