//! Adam, as burn's (same arithmetic, same state and saved record), with each parameter updated
//! in one fused pass on Flex: burn's version is a dozen tensor operations per parameter, each a
//! full pass over parameter-sized memory (9M parameters in the default model: ~10% of a
//! batch-1 training step). Other backends keep burn's.

use burn::optim::{AdamConfig, AdamState, AdaptiveMomentumState, LearningRate, ModuleOptimizer, Optimizer};
use burn::prelude::*;
use burn::tensor::{DType, TensorData};
use rayon::prelude::*;

/// Adam with burn's defaults (betas 0.9, 0.999) and the given epsilon.
pub fn adam(epsilon: f32) -> ModuleOptimizer {
    ModuleOptimizer::from(FusedAdam {
        beta_1: 0.9,
        beta_2: 0.999,
        epsilon,
        burn: AdamConfig::new().with_epsilon(epsilon).build(),
    })
}

#[derive(Clone)]
pub struct FusedAdam {
    beta_1: f32,
    beta_2: f32,
    epsilon: f32,
    /// The same optimiser as burn builds it, for tensors the fused pass does not take.
    burn: burn::optim::Adam,
}

/// A tensor's values, without a copy when it is the only owner of contiguous f32 storage.
fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_into_vec::<f32>().expect("f32 tensor")
}

impl Optimizer for FusedAdam {
    type State<const D: usize> = AdamState<D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        if !(crate::kernel::supported(&tensor) && grad.dtype() == DType::F32) {
            return self.burn.step(lr, tensor, grad, state);
        }
        let (device, shape) = (tensor.device(), tensor.shape());
        let (time, m, v) = match state {
            Some(s) => (s.momentum.time + 1, values(s.momentum.moment_1), values(s.momentum.moment_2)),
            // Zero moments give burn's first step exactly (m = (1 - b1) g, v = (1 - b2) g²).
            None => (1, vec![0.0; shape.num_elements()], vec![0.0; shape.num_elements()]),
        };
        let (mut p, g, mut m, mut v) = (values(tensor), values(grad), m, v);
        let (b1, b2) = (self.beta_1, self.beta_2);
        let bc2 = (1.0 - b2.powi(time as i32)).sqrt();
        let factor = bc2 / (1.0 - b1.powi(time as i32));
        let eps = self.epsilon * bc2;
        let lr = lr as f32;
        const CHUNK: usize = 1 << 14;
        p.par_chunks_mut(CHUNK)
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .zip(g.par_chunks(CHUNK))
            .for_each(|(((p, m), v), g)| {
                for i in 0..p.len() {
                    m[i] = m[i] * b1 + g[i] * (1.0 - b1);
                    v[i] = v[i] * b2 + g[i] * g[i] * (1.0 - b2);
                    p[i] -= lr * (m[i] * factor / (v[i].sqrt() + eps));
                }
            });
        let tensor = |x: Vec<f32>| Tensor::<D>::from_data(TensorData::new(x, shape.clone()), &device);
        let momentum = AdaptiveMomentumState::new(time, tensor(m), tensor(v));
        (tensor(p), Some(AdamState::new(momentum)))
    }

    fn to_device<const D: usize>(mut state: Self::State<D>, device: &Device) -> Self::State<D> {
        state.momentum = state.momentum.to_device(device);
        state
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Arch, ModelConfig, Preset};
    use burn::optim::GradientsParams;
    use burn::tensor::Distribution;

    /// Three steps of the fused Adam equal three of burn's on the same model and gradients.
    #[test]
    fn matches_burn_adam() {
        let d = Device::flex().autodiff();
        d.seed(5);
        let cfg = ModelConfig { width: 4, ..ModelConfig::new(Arch::Unetpp, Preset::Modern, 2) };
        let x = Tensor::<4>::random([2, 1, 16, 16], Distribution::Default, &d);
        let mut ours = cfg.init::<4>(&d);
        let mut theirs = ours.clone();
        let w = |m: &crate::model::UNetPP<4>| m.grid[0][1].as_ref().unwrap().block.conv1.weight.val();
        let w0 = w(&ours);
        let (mut a, mut b) = (adam(1e-8), AdamConfig::new().with_epsilon(1e-8).init());
        for _ in 0..3 {
            let loss = |m: &crate::model::UNetPP<4>| {
                m.forward(x.clone()).into_iter().map(|h| h.powi_scalar(2).mean()).reduce(|a, b| a + b).unwrap()
            };
            let ga = GradientsParams::from_grads(loss(&ours).backward(), &ours);
            let gb = GradientsParams::from_grads(loss(&theirs).backward(), &theirs);
            ours = a.step(1e-2, ours, ga);
            theirs = b.step(1e-2, theirs, gb);
        }
        let diff = |a: Tensor<4>, b: Tensor<4>| (a - b).abs().max().into_scalar::<f32>();
        // Three steps of lr 1e-2 move each weight by up to 3e-2; the two optimisers agree to 1e-6.
        assert!(diff(w(&ours), w0) > 1e-2, "the weights moved");
        assert!(diff(w(&ours), w(&theirs)) <= 1e-6, "{}", diff(w(&ours), w(&theirs)));
    }
}
