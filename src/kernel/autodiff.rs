//! `KernelBackend` for Autodiff<Flex>: each operation runs Flex's forward and records its
//! backward (the types here), which the kernels compute too; training weights are never cached.
//! There is no fused form here: with gradients a layer is composed of these operations.
//!
//! The convolution is compute-bound: its output is kept for the backward. BatchNorm (+ ReLU),
//! up-sampling and pooling are memory-bound: under burn's balanced checkpointing
//! (`Backend::training_device`) their outputs are not kept but recomputed by the `Retro*`
//! types below when the backward needs them (as inputs of a convolution's weight gradient, or
//! of pooling's); without checkpointing they are kept, as every output was before.

use super::conv;
use super::ext::{KernelBackend, PARTS};
use super::flex::conv_flex;
use super::tensors::{contiguous, data, geom, layout, tensor};
use super::{norm, pool, upsample};
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::retro_forward::RetroForward;
use burn::backend::autodiff::checkpoint::state::BackwardStates;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::{Autodiff, NodeId};
use burn::backend::flex::FlexTensor;
use burn::backend::ops::ActivationOps;
use burn::backend::tensor::FloatTensor;
use burn::backend::{AutodiffBackend, Flex, TensorMetadata};

/// The backward of `max_pool2x`: the windows' maxima are found again in the checkpointed input.
#[derive(Debug)]
struct MaxPoolGrad;

impl Backward<Flex, 1> for MaxPoolGrad {
    type State = NodeId;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
        let [node] = ops.parents;
        let dy = contiguous(&grads.consume::<Flex>(&ops.node));
        if let Some(node) = node {
            let x = contiguous(&checkpointer.retrieve_node_output::<FlexTensor>(ops.state));
            let shape = x.shape().to_vec();
            grads.register::<Flex>(node.id, tensor(pool::backward(data(&x), data(&dy), &shape), shape));
        }
    }
}

/// The backward of `batch_norm` (parents: x, gamma, beta).
#[derive(Debug)]
struct BatchNormGrad;

impl Backward<Flex, 3> for BatchNormGrad {
    /// x's checkpoint; gamma, beta and the statistics (per channel, small); epsilon; ReLU.
    type State = (NodeId, [FlexTensor; 3], f64, bool);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
        let dy = contiguous(&grads.consume::<Flex>(&ops.node));
        let x = contiguous(&checkpointer.retrieve_node_output::<FlexTensor>(ops.state.0));
        let [gamma, beta, stats] = ops.state.1.each_ref().map(contiguous);
        let (mean, var) = data(&stats).split_at(gamma.shape()[0]);
        let (epsilon, relu) = (ops.state.2, ops.state.3);
        let l = layout(x.shape().as_slice());
        let (dx, dgamma, dbeta) = norm::backward(
            l,
            data(&x),
            data(&dy),
            &norm::Norm { gamma: data(&gamma), beta: data(&beta), mean, var, eps: epsilon, relu },
        );
        let [node_x, node_gamma, node_beta] = ops.parents;
        for (node, (v, shape)) in [node_x, node_gamma, node_beta].into_iter().zip([
            (dx, x.shape().to_vec()),
            (dgamma, vec![l.c]),
            (dbeta, vec![l.c]),
        ]) {
            if let Some(node) = node {
                grads.register::<Flex>(node.id, tensor(v, shape));
            }
        }
    }
}

#[derive(Debug)]
struct UpsampleGrad;

impl Backward<Flex, 1> for UpsampleGrad {
    type State = Vec<usize>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node] = ops.parents;
        let dy = contiguous(&grads.consume::<Flex>(&ops.node));
        if let Some(node) = node {
            grads.register::<Flex>(node.id, tensor(upsample::backward(data(&dy), &ops.state), ops.state));
        }
    }
}

/// The backward of `same_conv` (parents: the six parts, weight, bias).
#[derive(Debug)]
struct SameConvGrad;

const N: usize = PARTS + 2;

impl Backward<Flex, N> for SameConvGrad {
    /// Checkpoints of the parts that have channels, of the weight, and which parts have them.
    type State = (Vec<NodeId>, NodeId, [bool; PARTS]);

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
        let dy = contiguous(&grads.consume::<Flex>(&ops.node));
        let xs: Vec<FlexTensor> =
            ops.state.0.iter().map(|&id| contiguous(&checkpointer.retrieve_node_output::<FlexTensor>(id))).collect();
        let w = contiguous(&checkpointer.retrieve_node_output::<FlexTensor>(ops.state.1));
        let ws = w.shape().to_vec();
        let mut xs_shape = xs[0].shape().to_vec();
        let widths: Vec<usize> = xs.iter().map(|x| x.shape()[1]).collect();
        xs_shape[1] = widths.iter().sum();
        let g = geom(&xs_shape, &ws);
        let (node_w, node_b) = (&ops.parents[N - 2], &ops.parents[N - 1]);
        // Each part's input gradient is its own (flipped) convolution with its slice of the
        // weight's input channels, so the gradient is never split by copying.
        let mut c0 = 0;
        let mut wanted = vec![];
        let parents = ops.parents[..PARTS].iter().zip(&ops.state.2).filter(|(_, used)| **used).map(|(p, _)| p);
        for ((node, x), &c) in parents.zip(&xs).zip(&widths) {
            if let Some(node) = node {
                wanted.push((node.id, x.shape().to_vec(), (c0, c)));
            }
            c0 += c;
        }
        let ranges: Vec<(usize, usize)> = wanted.iter().map(|w| w.2).collect();
        let dxs = conv::backward_x_parts(&g, data(&dy), data(&w), &ranges);
        for ((id, shape, _), dx) in wanted.into_iter().zip(dxs) {
            grads.register::<Flex>(id, tensor(dx, shape));
        }
        if node_w.is_some() || node_b.is_some() {
            let parts: Vec<&[f32]> = xs.iter().map(data).collect();
            let (dw, db) = conv::backward_w_parts(&g, &parts, data(&dy));
            if let Some(node) = node_w {
                grads.register::<Flex>(node.id, tensor(dw, ws));
            }
            if let Some(node) = node_b {
                grads.register::<Flex>(node.id, tensor(db, vec![g.c_out]));
            }
        }
    }
}

/// Recomputes a one-input operation's output (`upsample2x`, `max_pool2x`) from its input.
#[derive(Debug)]
struct RetroUnary(NodeId, fn(FlexTensor) -> FlexTensor);

impl RetroForward for RetroUnary {
    fn forward(&self, states: &mut BackwardStates, out: NodeId) {
        let x = states.get_state::<FlexTensor>(&self.0);
        states.save(out, (self.1)(x));
    }
}

/// Recomputes `batch_norm`'s output from x and the step's own gamma, beta and batch statistics
/// (per channel, kept here; the optimiser replaces the parameters only after the backward).
#[derive(Debug)]
struct RetroBatchNorm {
    x: NodeId,
    gamma: FlexTensor,
    beta: FlexTensor,
    stats: FlexTensor,
    epsilon: f64,
    relu: bool,
}

impl RetroForward for RetroBatchNorm {
    fn forward(&self, states: &mut BackwardStates, out: NodeId) {
        let x = states.get_state::<FlexTensor>(&self.x);
        let (g, b, s) = (self.gamma.clone(), self.beta.clone(), self.stats.clone());
        states.save(out, Flex::batch_norm(x, g, b, s, self.epsilon, self.relu));
    }
}

impl<C: CheckpointStrategy> KernelBackend for Autodiff<Flex, C> {
    fn same_conv(
        x0: FloatTensor<Self>,
        x1: FloatTensor<Self>,
        x2: FloatTensor<Self>,
        x3: FloatTensor<Self>,
        x4: FloatTensor<Self>,
        x5: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        relu: bool,
    ) -> FloatTensor<Self> {
        let xs = [x0, x1, x2, x3, x4, x5];
        let inner = |t: &FloatTensor<Self>| <Self as AutodiffBackend>::inner(t.clone());
        // Training weights change every step: prepared on every call, never kept.
        let forward = || conv_flex(xs.each_ref().map(inner), inner(&weight), inner(&bias), false, false);
        let all: Vec<&FloatTensor<Self>> = xs.iter().chain([&weight, &bias]).collect();
        let nodes = std::array::from_fn(|i| all[i].node());
        let y = match SameConvGrad.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(mut prep) => {
                let used = xs.each_ref().map(|x| x.shape()[1] > 0);
                let parts = xs.iter().zip(used).filter(|(_, u)| *u).map(|(x, _)| prep.checkpoint(x)).collect();
                let state = (parts, prep.checkpoint(&weight), used);
                let y = forward();
                prep.finish(state, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(forward()),
        };
        // With gradients the activation stays burn's own op (and its backward).
        if relu { <Self as ActivationOps<Self>>::relu(y) } else { y }
    }

    fn upsample2x(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let y = Flex::upsample2x(<Self as AutodiffBackend>::inner(x.clone()));
        let prep =
            UpsampleGrad.prepare::<C>([x.node()]).memory_bound().retro_forward(RetroUnary(x.id(), Flex::upsample2x));
        match prep.parents([&x]).stateful() {
            OpsKind::Tracked(prep) => prep.finish(x.shape().to_vec(), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    fn max_pool2x(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let inner = <Self as AutodiffBackend>::inner(x.clone());
        let prep =
            MaxPoolGrad.prepare::<C>([x.node()]).memory_bound().retro_forward(RetroUnary(x.id(), Flex::max_pool2x));
        match prep.parents([&x]).stateful() {
            OpsKind::Tracked(mut prep) => {
                let state = prep.checkpoint(&x);
                prep.finish(state, Flex::max_pool2x(inner))
            }
            OpsKind::UnTracked(prep) => prep.finish(Flex::max_pool2x(inner)),
        }
    }

    fn batch_stats(x: FloatTensor<Self>) -> FloatTensor<Self> {
        <Self as AutodiffBackend>::from_inner(Flex::batch_stats(<Self as AutodiffBackend>::inner(x)))
    }

    fn batch_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        stats: FloatTensor<Self>,
        epsilon: f64,
        relu: bool,
    ) -> FloatTensor<Self> {
        let inner = |t: &FloatTensor<Self>| <Self as AutodiffBackend>::inner(t.clone());
        let (g, b, s) = (inner(&gamma), inner(&beta), inner(&stats));
        let forward = || Flex::batch_norm(inner(&x), g.clone(), b.clone(), s.clone(), epsilon, relu);
        let retro = RetroBatchNorm { x: x.id(), gamma: g.clone(), beta: b.clone(), stats: s.clone(), epsilon, relu };
        let prep =
            BatchNormGrad.prepare::<C>([x.node(), gamma.node(), beta.node()]).memory_bound().retro_forward(retro);
        // burn's checkpointer wants every parent of a recomputed node kept, read or not.
        match prep.parents([&x, &gamma, &beta]).stateful() {
            OpsKind::Tracked(mut prep) => {
                let state = (prep.checkpoint(&x), [g.clone(), b.clone(), s.clone()], epsilon, relu);
                let y = forward();
                prep.finish(state, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(forward()),
        }
    }
}
