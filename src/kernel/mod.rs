//! Project-owned CPU kernels, hooked into burn through its backend-extension mechanism: they run
//! when a tensor lives on Flex (with or without autodiff), and every other backend keeps burn's
//! own ops. Replaced are the stride-1 convolutions (node blocks, heads), the 2x linear
//! up-sampling, training BatchNorm + ReLU, 2^n max pooling and the inference sigmoid; see `conv`,
//! `winograd`, `direct`, `upsample`, `norm`, `pool` and `sigmoid` for why.

pub mod conv;
pub mod direct;
pub mod norm;
pub mod pool;
pub mod sigmoid;
pub mod upsample;
#[cfg(target_arch = "x86_64")]
pub mod winograd;

/// Winograd is AVX-512 code: elsewhere it never applies, and these keep its callers portable.
#[cfg(not(target_arch = "x86_64"))]
pub mod winograd {
    use super::conv::Geom;
    use std::mem::MaybeUninit;

    const WHY: &str = "Winograd needs x86-64 AVX-512 (`applies` is false here)";
    pub struct Weights;
    pub fn applies(_: &Geom) -> bool {
        false
    }
    pub fn prepare(_: &Geom, _: &[f32]) -> Weights {
        unreachable!("{WHY}")
    }
    pub fn prepare_with(_: &Geom, _: impl Fn(usize, usize, usize) -> f32 + Sync) -> Weights {
        unreachable!("{WHY}")
    }
    pub fn prepare_tiled(_: &Geom, _: usize, _: impl Fn(usize, usize, usize) -> f32 + Sync) -> Weights {
        unreachable!("{WHY}")
    }
    pub fn tile_side(_: &Geom) -> usize {
        2
    }
    pub enum Epilogue<'a> {
        Store,
        Pool(&'a mut [MaybeUninit<f32>]),
        Head { w: &'a [f32], b: &'a [f32], out: &'a mut [MaybeUninit<f32>] },
    }
    pub fn forward(
        _: &Geom,
        _: (&[&[f32]], bool),
        _: &Weights,
        _: &[f32],
        _: bool,
        _: &mut [&mut [MaybeUninit<f32>]],
        _: Epilogue,
    ) {
        unreachable!("{WHY}")
    }
    pub fn backward_w(_: &Geom, _: &[&[f32]], _: &[f32]) -> Vec<f32> {
        unreachable!("{WHY}")
    }
}

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::{Autodiff, NodeId};
use burn::backend::flex::FlexTensor;
use burn::backend::ops::{ActivationOps, FloatTensorOps};
use burn::backend::tensor::FloatTensor;
use burn::backend::{AutodiffBackend, Backend as BurnBackend, Dispatch, Flex, TensorMetadata, backend_extension};
use burn::prelude::*;
use burn::tensor::{DType, TensorData};

use conv::Geom;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

#[backend_extension(Flex, Autodiff)]
pub trait KernelBackend: BurnBackend {
    /// Stride-1 convolution with padding k/2 (odd k) of the channel concatenation of x0..x5
    /// (each [n, c_k, (d,) h, w]; unused ones have 0 channels), never copied together where
    /// the kernel can read them in place; weight [c_out, sum c_k, k..], bias [c_out]. burn's
    /// extension macro takes neither tensor lists nor optional tensors, hence six of them.
    /// `relu` applies max(0, .) to the result (fused into the kernel's stores where it can).
    #[allow(clippy::too_many_arguments)]
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
    ) -> FloatTensor<Self>;
    /// `same_conv` of parts whose last used one is at half resolution and enters as its 2x linear
    /// up-sampling (align_corners = false): a nested node's input, up-sampled by the kernel as
    /// it reads it where it can.
    #[allow(clippy::too_many_arguments)]
    fn same_conv_up(
        x0: FloatTensor<Self>,
        x1: FloatTensor<Self>,
        x2: FloatTensor<Self>,
        x3: FloatTensor<Self>,
        x4: FloatTensor<Self>,
        x5: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        relu: bool,
    ) -> FloatTensor<Self>;
    /// `same_conv`, and the 2x max pooling of its output (an encoder node's output and the
    /// input of the node below it): pooled as the kernel stores y, where it can.
    #[allow(clippy::too_many_arguments)]
    fn same_conv_pool(
        x0: FloatTensor<Self>,
        x1: FloatTensor<Self>,
        x2: FloatTensor<Self>,
        x3: FloatTensor<Self>,
        x4: FloatTensor<Self>,
        x5: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        relu: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
    /// A 1x1 convolution (`head_w` [classes, c_out, 1, ..], `head_b`) of `same_conv`'s output, for
    /// a node that nothing but its head reads: where the kernel can, that output is summed into
    /// the head as it is computed and never stored.
    #[allow(clippy::too_many_arguments)]
    fn same_conv_head(
        x0: FloatTensor<Self>,
        x1: FloatTensor<Self>,
        x2: FloatTensor<Self>,
        x3: FloatTensor<Self>,
        x4: FloatTensor<Self>,
        x5: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        relu: bool,
        head_w: FloatTensor<Self>,
        head_b: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
    /// 2x linear up-sampling of every spatial axis, `align_corners = false`.
    fn upsample2x(x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// 2x max pooling of every spatial axis, stride 2.
    fn max_pool2x(x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// Per-channel mean (row 0) and biased variance (row 1) of x [n, c, ...], as [2, c]. Never
    /// differentiated: `batch_norm` differentiates through the statistics itself.
    fn batch_stats(x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// Training-mode BatchNorm of x with its own batch statistics `stats` (from `batch_stats`),
    /// then ReLU when `relu` is set; the gradient treats the statistics as functions of x.
    fn batch_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        stats: FloatTensor<Self>,
        epsilon: f64,
        relu: bool,
    ) -> FloatTensor<Self>;
}

/// A vector of `len` values written in parallel, `chunk` at a time, by `fill(chunk index,
/// chunk)`, without zeroing it first (zero-filled outputs cost ~3% of a training step).
///
/// # Safety
/// `fill` must write every element of every chunk it is given.
pub(crate) unsafe fn par_written(
    len: usize,
    chunk: usize,
    fill: impl Fn(usize, &mut [std::mem::MaybeUninit<f32>]) + Sync + Send,
) -> Vec<f32> {
    use rayon::prelude::*;
    let mut v = Vec::with_capacity(len);
    v.spare_capacity_mut()[..len].par_chunks_mut(chunk.max(1)).enumerate().for_each(|(i, c)| fill(i, c));
    // SAFETY: the caller's `fill` initialised all `len` elements.
    unsafe { v.set_len(len) };
    v
}

fn geom(x: &[usize], w: &[usize]) -> Geom {
    let lift = |s: &[usize]| if s.len() == 2 { [1, s[0], s[1]] } else { [s[0], s[1], s[2]] };
    Geom { n: x[0], c_in: x[1], c_out: w[0], sp: lift(&x[2..]), k: lift(&w[2..]) }
}

fn contiguous(t: &FlexTensor) -> FlexTensor {
    t.to_contiguous()
}

fn data(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("contiguous f32 tensor")
}

fn tensor(v: Vec<f32>, shape: Vec<usize>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(v, shape))
}

impl KernelBackend for Flex {
    fn same_conv(
        x0: FlexTensor,
        x1: FlexTensor,
        x2: FlexTensor,
        x3: FlexTensor,
        x4: FlexTensor,
        x5: FlexTensor,
        weight: FlexTensor,
        bias: FlexTensor,
        relu: bool,
    ) -> FlexTensor {
        // Without autodiff the weights are a fixed model's: prepared once, kept while it lives.
        conv_flex([x0, x1, x2, x3, x4, x5], weight, bias, relu, true)
    }

    fn same_conv_up(
        x0: FlexTensor,
        x1: FlexTensor,
        x2: FlexTensor,
        x3: FlexTensor,
        x4: FlexTensor,
        x5: FlexTensor,
        weight: FlexTensor,
        bias: FlexTensor,
        relu: bool,
    ) -> FlexTensor {
        let (g, shape, parts, w, b) = conv_inputs([x0, x1, x2, x3, x4, x5], weight, bias, true);
        let parts: Vec<&[f32]> = parts.iter().map(data).collect();
        let prep = prepared(&g, &w, &b);
        let y = conv::forward_up(&g, shape.len() - 2, &parts, (data(&w), data(&b)), relu, prep.as_deref());
        tensor(y, shape)
    }

    fn same_conv_pool(
        x0: FlexTensor,
        x1: FlexTensor,
        x2: FlexTensor,
        x3: FlexTensor,
        x4: FlexTensor,
        x5: FlexTensor,
        weight: FlexTensor,
        bias: FlexTensor,
        relu: bool,
    ) -> (FlexTensor, FlexTensor) {
        let (g, shape, parts, w, b) = conv_inputs([x0, x1, x2, x3, x4, x5], weight, bias, false);
        let parts: Vec<&[f32]> = parts.iter().map(data).collect();
        let prep = prepared(&g, &w, &b);
        let (y, pooled) =
            conv::forward_pooled(&g, shape.len() - 2, &parts, (data(&w), data(&b)), relu, prep.as_deref());
        let pooled_shape = pool::pooled_shape(&shape);
        (tensor(y, shape), tensor(pooled, pooled_shape))
    }

    fn same_conv_head(
        x0: FlexTensor,
        x1: FlexTensor,
        x2: FlexTensor,
        x3: FlexTensor,
        x4: FlexTensor,
        x5: FlexTensor,
        weight: FlexTensor,
        bias: FlexTensor,
        relu: bool,
        head_w: FlexTensor,
        head_b: FlexTensor,
    ) -> FlexTensor {
        let (g, mut shape, parts, w, b) = conv_inputs([x0, x1, x2, x3, x4, x5], weight, bias, false);
        let parts: Vec<&[f32]> = parts.iter().map(data).collect();
        let (hw, hb) = (contiguous(&head_w), contiguous(&head_b));
        assert!(hw.shape()[2..].iter().all(|&k| k == 1), "the head must be a 1x1 convolution");
        let prep = prepared(&g, &w, &b);
        let y = conv::forward_head(&g, &parts, data(&w), data(&b), relu, prep.as_deref(), data(&hw), data(&hb));
        shape[1] = hb.shape()[0];
        tensor(y, shape)
    }

    fn upsample2x(x: FlexTensor) -> FlexTensor {
        let x = contiguous(&x);
        let shape = x.shape().to_vec();
        let out: Vec<usize> = shape.iter().enumerate().map(|(i, &d)| if i >= 2 { 2 * d } else { d }).collect();
        tensor(upsample::forward(data(&x), &shape), out)
    }

    fn max_pool2x(x: FlexTensor) -> FlexTensor {
        let x = contiguous(&x);
        let shape = x.shape().to_vec();
        tensor(pool::forward(data(&x), &shape), pool::pooled_shape(&shape))
    }

    fn batch_stats(x: FlexTensor) -> FlexTensor {
        let x = contiguous(&x);
        let (mean, var) = norm::stats(layout(x.shape().as_slice()), data(&x));
        let c = mean.len();
        tensor([mean, var].concat(), vec![2, c])
    }

    fn batch_norm(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        stats: FlexTensor,
        epsilon: f64,
        relu: bool,
    ) -> FlexTensor {
        let (x, gamma, beta, stats) = (contiguous(&x), contiguous(&gamma), contiguous(&beta), contiguous(&stats));
        let (mean, var) = data(&stats).split_at(gamma.shape()[0]);
        let y = norm::forward(
            layout(x.shape().as_slice()),
            data(&x),
            &norm::Norm { gamma: data(&gamma), beta: data(&beta), mean, var, eps: epsilon, relu },
        );
        tensor(y, x.shape().to_vec())
    }
}

/// The convolution's geometry, output shape, used input parts and weights, contiguous; with
/// `half_last`, the last used part is at half resolution.
fn conv_inputs(
    xs: [FlexTensor; PARTS],
    weight: FlexTensor,
    bias: FlexTensor,
    half_last: bool,
) -> (Geom, Vec<usize>, Vec<FlexTensor>, FlexTensor, FlexTensor) {
    let xs: Vec<FlexTensor> = xs.iter().filter(|x| x.shape()[1] > 0).map(contiguous).collect();
    let (w, b) = (contiguous(&weight), contiguous(&bias));
    let last = xs.last().expect("an input part").shape().to_vec();
    let mut shape: Vec<usize> =
        last.iter().enumerate().map(|(i, &d)| if i >= 2 && half_last { 2 * d } else { d }).collect();
    for x in &xs[..xs.len() - 1] {
        assert_eq!(x.shape()[2..], shape[2..], "input parts of different sizes");
    }
    shape[1] = xs.iter().map(|x| x.shape()[1]).sum();
    let g = geom(&shape, w.shape().as_slice());
    shape[1] = g.c_out;
    (g, shape, xs, w, b)
}

fn conv_flex(xs: [FlexTensor; PARTS], weight: FlexTensor, bias: FlexTensor, relu: bool, keep: bool) -> FlexTensor {
    let (g, shape, xs, w, b) = conv_inputs(xs, weight, bias, false);
    let parts: Vec<&[f32]> = xs.iter().map(data).collect();
    let y = if keep {
        conv::forward_prepared(&g, &parts, data(&w), data(&b), relu, prepared(&g, &w, &b).as_deref())
    } else {
        conv::forward_parts(&g, &parts, data(&w), data(&b), relu)
    };
    tensor(y, shape)
}

/// Prepared weights (`conv::prepare`) of inference convolutions, by weight and bias buffer
/// (and shapes): packing them on every call was 5-7% of a batch-1 forward pass. An entry holds
/// clones of both tensors, so while it exists their buffers can be neither freed (and the
/// address reused) nor changed in place (Flex only writes in place into unshared buffers):
/// a hit is the same weights. Entries whose tensors nobody else holds any more are dropped.
fn prepared(g: &Geom, w: &FlexTensor, b: &FlexTensor) -> Option<Arc<conv::Prepared>> {
    type Key = (usize, Vec<usize>, usize, usize, [usize; 3]);
    type Cache = Mutex<HashMap<Key, (FlexTensor, FlexTensor, Option<Arc<conv::Prepared>>)>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let key = (data(w).as_ptr() as usize, w.shape().to_vec(), data(b).as_ptr() as usize, data(b).len(), g.sp);
    let cache = CACHE.get_or_init(Default::default);
    if let Some(entry) = cache.lock().expect("weight cache").get(&key) {
        return entry.2.clone();
    }
    let prep = conv::prepare(g, data(w), data(b)).map(Arc::new);
    let mut cache = cache.lock().expect("weight cache");
    cache.retain(|_, (w, b, _)| !w.is_unique() && !b.is_unique());
    // One live model over many image sizes (prepared per size): a few models' worth at most.
    if cache.len() >= 256 {
        cache.clear();
    }
    cache.insert(key, (w.clone(), b.clone(), prep.clone()));
    prep
}

fn layout(shape: &[usize]) -> norm::Layout {
    norm::Layout { n: shape[0], c: shape[1], p: shape[2..].iter().product() }
}

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

    // With gradients the fused forms are their parts, each with its own backward.
    fn same_conv_up(
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
        let mut xs = [x0, x1, x2, x3, x4, x5];
        let last = xs.iter().rposition(|x| x.shape()[1] > 0).expect("an input part");
        xs[last] = Self::upsample2x(xs[last].clone());
        let [x0, x1, x2, x3, x4, x5] = xs;
        Self::same_conv(x0, x1, x2, x3, x4, x5, weight, bias, relu)
    }

    fn same_conv_pool(
        x0: FloatTensor<Self>,
        x1: FloatTensor<Self>,
        x2: FloatTensor<Self>,
        x3: FloatTensor<Self>,
        x4: FloatTensor<Self>,
        x5: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        relu: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let y = Self::same_conv(x0, x1, x2, x3, x4, x5, weight, bias, relu);
        (y.clone(), Self::max_pool2x(y))
    }

    fn same_conv_head(
        x0: FloatTensor<Self>,
        x1: FloatTensor<Self>,
        x2: FloatTensor<Self>,
        x3: FloatTensor<Self>,
        x4: FloatTensor<Self>,
        x5: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        relu: bool,
        head_w: FloatTensor<Self>,
        head_b: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let y = Self::same_conv(x0, x1, x2, x3, x4, x5, weight, bias, relu);
        let mut none = y.shape();
        none[1] = 0;
        let empty = || <Self as FloatTensorOps<Self>>::float_empty(none.clone(), &y.device(), y.dtype().into());
        Self::same_conv(y.clone(), empty(), empty(), empty(), empty(), empty(), head_w, head_b, false)
    }

    fn upsample2x(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let y = Flex::upsample2x(<Self as AutodiffBackend>::inner(x.clone()));
        match UpsampleGrad.prepare::<C>([x.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(x.shape().to_vec(), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    fn max_pool2x(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let inner = <Self as AutodiffBackend>::inner(x.clone());
        match MaxPoolGrad.prepare::<C>([x.node()]).compute_bound().stateful() {
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
        match BatchNormGrad.prepare::<C>([x.node(), gamma.node(), beta.node()]).compute_bound().stateful() {
            OpsKind::Tracked(mut prep) => {
                let state = (prep.checkpoint(&x), [g.clone(), b.clone(), s.clone()], epsilon, relu);
                let y = forward();
                prep.finish(state, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(forward()),
        }
    }
}

thread_local! {
    static ENABLED: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
}

/// Switches the project kernels off (burn's own ops everywhere) on this thread: for the
/// benchmark's before/after rows and the tests that compare both paths.
pub fn set_enabled(on: bool) {
    ENABLED.with(|e| e.set(on));
}

/// Whether `same_conv` can run for this input: f32 on Flex, with or without autodiff.
pub fn supported<const D: usize>(x: &Tensor<D>) -> bool {
    ENABLED.with(|e| e.get()) && x.dtype() == DType::F32 && x.device().inner() == Device::flex()
}

/// `upsample2x` on rank-4 (2D) or rank-5 (3D) tensors.
pub fn upsample2x<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as KernelBackend>::upsample2x(x.into_dispatch()))
}

/// sigmoid(x), the probabilities of binary logits: on Flex without autodiff (inference) by
/// `sigmoid::in_place`, elsewhere burn's op.
pub fn sigmoid<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if !supported(&x) || x.is_autodiff() {
        return burn::tensor::activation::sigmoid(x);
    }
    let shape = x.shape();
    let mut v = x.into_data().try_into_vec::<f32>().expect("an f32 tensor");
    sigmoid::in_place(&mut v);
    Tensor::from_data(TensorData::new(v, shape), &Device::flex())
}

/// `max_pool2x` on rank-4 (2D) or rank-5 (3D) tensors.
pub fn max_pool2x<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as KernelBackend>::max_pool2x(x.into_dispatch()))
}

/// Training-mode BatchNorm of x (rank 4 or 5) with its batch statistics, then ReLU when `relu`
/// is set: (output, batch mean, biased batch variance), as burn's `batch_norm_train` returns
/// them for the running statistics.
pub fn batch_norm<const D: usize>(
    x: Tensor<D>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    epsilon: f64,
    relu: bool,
) -> (Tensor<D>, Tensor<1>, Tensor<1>) {
    let c = x.dims()[1];
    let x = x.into_dispatch();
    let stats: Tensor<2> = Tensor::from_dispatch(<Dispatch as KernelBackend>::batch_stats(x.clone()));
    let y = <Dispatch as KernelBackend>::batch_norm(
        x,
        gamma.into_dispatch(),
        beta.into_dispatch(),
        stats.clone().into_dispatch(),
        epsilon,
        relu,
    );
    let row = |i: usize| stats.clone().narrow(0, i, 1).reshape([c]);
    (Tensor::from_dispatch(y), row(0), row(1))
}

/// Input parts `same_conv` reads in place (UNet++ needs depth + 1 <= 6).
const PARTS: usize = 6;

/// `same_conv` on rank-4 (2D) or rank-5 (3D) tensors: the convolution of the channel
/// concatenation of `xs` (up to six read in place, more are concatenated first), followed by
/// ReLU when `relu` is set.
pub fn same_conv<const D: usize>(xs: Vec<Tensor<D>>, weight: Tensor<D>, bias: Tensor<1>, relu: bool) -> Tensor<D> {
    let [a, b, c, d, e, f] = six(xs);
    let (w, bias) = (weight.into_dispatch(), bias.into_dispatch());
    Tensor::from_dispatch(<Dispatch as KernelBackend>::same_conv(a, b, c, d, e, f, w, bias, relu))
}

/// `same_conv` of `xs` whose last part is at half resolution and enters as its 2x linear
/// up-sampling (align_corners = false), up-sampled by the kernel as it reads it where it can.
pub fn same_conv_up<const D: usize>(xs: Vec<Tensor<D>>, weight: Tensor<D>, bias: Tensor<1>, relu: bool) -> Tensor<D> {
    assert!(xs.len() <= PARTS, "at most {PARTS} parts when the last is up-sampled");
    let [a, b, c, d, e, f] = six(xs);
    let (w, bias) = (weight.into_dispatch(), bias.into_dispatch());
    Tensor::from_dispatch(<Dispatch as KernelBackend>::same_conv_up(a, b, c, d, e, f, w, bias, relu))
}

/// `same_conv` and the 2x max pooling of its output, pooled as the kernel stores where it can.
pub fn same_conv_pool<const D: usize>(
    xs: Vec<Tensor<D>>,
    weight: Tensor<D>,
    bias: Tensor<1>,
    relu: bool,
) -> (Tensor<D>, Tensor<D>) {
    let [a, b, c, d, e, f] = six(xs);
    let (w, bias) = (weight.into_dispatch(), bias.into_dispatch());
    let (y, pooled) = <Dispatch as KernelBackend>::same_conv_pool(a, b, c, d, e, f, w, bias, relu);
    (Tensor::from_dispatch(y), Tensor::from_dispatch(pooled))
}

/// The 1x1 convolution `head_w`, `head_b` of `same_conv`'s output, which is not stored where the
/// kernel can sum it into the head as it computes it.
pub fn same_conv_head<const D: usize>(
    xs: Vec<Tensor<D>>,
    (weight, bias): (Tensor<D>, Tensor<1>),
    relu: bool,
    (head_w, head_b): (Tensor<D>, Tensor<1>),
) -> Tensor<D> {
    let [a, b, c, d, e, f] = six(xs);
    let (w, bias) = (weight.into_dispatch(), bias.into_dispatch());
    let (hw, hb) = (head_w.into_dispatch(), head_b.into_dispatch());
    Tensor::from_dispatch(<Dispatch as KernelBackend>::same_conv_head(a, b, c, d, e, f, w, bias, relu, hw, hb))
}

/// The input parts as six (up to five read in place, the rest concatenated into the sixth;
/// unused ones with 0 channels).
fn six<const D: usize>(mut xs: Vec<Tensor<D>>) -> [FloatTensor<Dispatch>; PARTS] {
    if xs.len() > PARTS {
        let rest = xs.split_off(PARTS - 1);
        xs.push(Tensor::cat(rest, 1));
    }
    let mut empty = xs[0].dims();
    empty[1] = 0;
    let device = xs[0].device();
    xs.resize_with(PARTS, || Tensor::empty(empty, &device));
    let Ok(parts) = <[Tensor<D>; PARTS]>::try_from(xs) else { unreachable!("resized to six") };
    parts.map(|x| x.into_dispatch())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::layers::Conv;
    use burn::tensor::Distribution;

    fn rel<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
        let scale = b.clone().abs().max().into_scalar::<f32>().max(1e-6);
        (a - b).abs().max().into_scalar::<f32>() / scale
    }

    /// Output and all three gradients equal burn's conv to 1e-4 relative, 2D and 3D, 3x3 and 1x1,
    /// with and without bias.
    fn check<const D: usize>(x_dims: [usize; D], c_out: usize, k: usize, bias: bool) {
        let d = Device::flex().autodiff();
        let mut conv = Conv::<D>::new(x_dims[1], c_out, k, &d);
        if !bias {
            conv = conv.without_bias();
        }
        let x = Tensor::<D>::random(x_dims, Distribution::Default, &d).require_grad();
        assert!(supported(&x), "the kernel must run on autodiff Flex");
        let y_ours = conv.forward(x.clone());
        let y_burn = conv.forward_burn(x.clone());
        let r = Tensor::<D>::random(y_burn.dims(), Distribution::Default, &d);
        assert!(rel(y_ours.clone(), y_burn.clone()) <= 1e-4, "forward {x_dims:?} k{k}");
        let g_ours = (y_ours * r.clone()).sum().backward();
        let g_burn = (y_burn * r).sum().backward();
        let gx = |g| x.grad(g).unwrap();
        assert!(rel(gx(&g_ours), gx(&g_burn)) <= 1e-4, "dx {x_dims:?} k{k}");
        let gw = |g| conv.weight.val().grad(g).unwrap();
        assert!(rel(gw(&g_ours), gw(&g_burn)) <= 1e-4, "dw {x_dims:?} k{k}");
        if let Some(b) = &conv.bias {
            assert!(rel(b.val().grad(&g_ours).unwrap(), b.val().grad(&g_burn).unwrap()) <= 1e-4);
        }
    }

    #[test]
    fn same_conv_matches_burn_with_gradients() {
        check([2, 3, 12, 10], 5, 3, true);
        check([1, 4, 9, 7], 2, 1, true);
        check([3, 2, 8, 8], 4, 3, false);
        check([1, 2, 6, 5, 4], 3, 3, true);
        check([2, 6, 7, 19], 5, 3, true);
        check([1, 3, 4, 5, 17], 2, 3, false);
    }

    /// Up-sampling equals the burn path (bilinear in 2D, bilinear + depth lerp in 3D), with gradient.
    #[test]
    fn upsample_matches_burn_with_gradients() {
        let d = Device::flex().autodiff();
        let burn_path = |x: Tensor<5>| {
            set_enabled(false);
            let y = crate::model::layers::upsample(x, false, false);
            set_enabled(true);
            y
        };
        let x = Tensor::<5>::random([2, 3, 3, 4, 5], Distribution::Default, &d).require_grad();
        assert!(supported(&x));
        let (a, b) = (crate::model::layers::upsample(x.clone(), false, false), burn_path(x.clone()));
        let r = Tensor::<5>::random(b.dims(), Distribution::Default, &d);
        assert!(rel(a.clone(), b.clone()) <= 1e-5);
        let (ga, gb) = ((a * r.clone()).sum().backward(), (b * r).sum().backward());
        assert!(rel(x.grad(&ga).unwrap(), x.grad(&gb).unwrap()) <= 1e-5);
        let x2 = Tensor::<4>::random([2, 3, 5, 7], Distribution::Default, &d).require_grad();
        set_enabled(false);
        let b2 = crate::model::layers::upsample(x2.clone(), false, false);
        set_enabled(true);
        assert!(rel(crate::model::layers::upsample(x2, false, false), b2) <= 1e-5);
    }

    /// The sigmoid equals burn's at inference, and an autodiff tensor keeps burn's op (and its
    /// graph: the kernel's copy out and back would cut it).
    #[test]
    fn sigmoid_matches_burn_and_keeps_the_graph() {
        let x = Tensor::<4>::random([2, 1, 5, 7], Distribution::Uniform(-20.0, 20.0), &Device::flex());
        let mut own = x.to_data().try_to_vec::<f32>().unwrap();
        sigmoid::in_place(&mut own);
        assert_eq!(sigmoid(x.clone()).to_data().try_to_vec::<f32>().unwrap(), own, "inference takes the kernel");
        assert!(rel(sigmoid(x.clone()), burn::tensor::activation::sigmoid(x)) <= 1e-6);
        let x = Tensor::<4>::random([2, 1, 5, 7], Distribution::Default, &Device::flex().autodiff()).require_grad();
        let g = sigmoid(x.clone()).sum().backward();
        assert!(x.grad(&g).is_some(), "the autodiff graph was cut");
    }

    /// Max pooling equals burn's path (2D pool, 3D as 2D pool + depth max), with gradient.
    #[test]
    fn max_pool_matches_burn_with_gradients() {
        fn check<const D: usize>(dims: [usize; D]) {
            let d = Device::flex().autodiff();
            let x = Tensor::<D>::random(dims, Distribution::Default, &d).require_grad();
            let ours = crate::model::layers::max_pool(x.clone());
            set_enabled(false);
            let theirs = crate::model::layers::max_pool(x.clone());
            set_enabled(true);
            assert_eq!(ours.dims(), theirs.dims());
            assert!(rel(ours.clone(), theirs.clone()) <= 1e-6, "forward {dims:?}");
            let r = Tensor::<D>::random(ours.dims(), Distribution::Default, &d);
            let (ga, gb) = ((ours * r.clone()).sum().backward(), (theirs * r).sum().backward());
            assert!(rel(x.grad(&ga).unwrap(), x.grad(&gb).unwrap()) <= 1e-6, "dx {dims:?}");
        }
        check([2, 3, 8, 6]);
        check([1, 2, 4, 6, 8]);
    }

    /// Training BatchNorm + ReLU equals burn's BatchNorm then ReLU: output, the gradients of the
    /// input, gamma and beta, and the running statistics, 2D and 3D.
    #[test]
    fn batch_norm_matches_burn_with_gradients() {
        fn check<const D: usize>(dims: [usize; D]) {
            use burn::module::Param;
            use burn::nn::{BatchNorm, BatchNormConfig};
            let d = Device::flex().autodiff();
            let c = dims[1];
            // Non-trivial affine parameters, and inputs off zero mean and unit variance.
            let gamma = Tensor::<1>::random([c], Distribution::Uniform(0.5, 1.5), &d);
            let beta = Tensor::<1>::random([c], Distribution::Uniform(-0.5, 0.5), &d);
            let norm = || BatchNorm {
                gamma: Param::from_tensor(gamma.clone()),
                beta: Param::from_tensor(beta.clone()),
                ..BatchNormConfig::new(c).init(&d)
            };
            let (a, b) = (norm(), norm());
            let x = Tensor::<D>::random(dims, Distribution::Uniform(-1.0, 3.0), &d).require_grad();
            let r = Tensor::<D>::random(dims, Distribution::Default, &d);
            assert!(supported(&x));
            let ours = crate::model::layers::norm_relu(&a, x.clone());
            let theirs = burn::tensor::activation::relu(b.forward(x.clone()));
            assert!(rel(ours.clone(), theirs.clone()) <= 1e-4, "forward {dims:?}");
            assert!(rel(a.running_mean.value_sync(), b.running_mean.value_sync()) <= 1e-5, "running mean {dims:?}");
            assert!(rel(a.running_var.value_sync(), b.running_var.value_sync()) <= 1e-5, "running var {dims:?}");
            let (ga, gb) = ((ours * r.clone()).sum().backward(), (theirs * r).sum().backward());
            assert!(rel(x.grad(&ga).unwrap(), x.grad(&gb).unwrap()) <= 1e-4, "dx {dims:?}");
            let g = |p: &Param<Tensor<1>>, grads| p.val().grad(grads).unwrap();
            assert!(rel(g(&a.gamma, &ga), g(&b.gamma, &gb)) <= 1e-4, "dgamma {dims:?}");
            assert!(rel(g(&a.beta, &ga), g(&b.beta, &gb)) <= 1e-4, "dbeta {dims:?}");
        }
        check([4, 5, 6, 7]);
        check([2, 3, 4, 5, 6]);
    }

    /// The whole model (every head, 2D and 3D) and its parameter gradients: our kernels against
    /// burn's ops, random weights and inputs, 1e-4 relative.
    #[test]
    fn whole_model_matches_the_burn_path() {
        use crate::model::{Arch, ModelConfig, Preset};
        fn run<const D: usize>(cfg: ModelConfig, x_dims: [usize; D]) {
            let d = Device::flex().autodiff();
            d.seed(3);
            let m = cfg.init::<D>(&d);
            let x = Tensor::<D>::random(x_dims, Distribution::Default, &d);
            let heads = |on: bool| {
                set_enabled(on);
                let h = m.forward(x.clone());
                set_enabled(true);
                h
            };
            let (ours, theirs) = (heads(true), heads(false));
            let loss = |h: Vec<Tensor<D>>| h.into_iter().map(|t| t.powi_scalar(2).mean()).reduce(|a, b| a + b).unwrap();
            for (a, b) in ours.iter().zip(&theirs) {
                assert!(rel(a.clone(), b.clone()) <= 1e-4, "heads differ");
            }
            let (ga, gb) = (loss(ours).backward(), loss(theirs).backward());
            let w = |g| m.grid[0][1].as_ref().unwrap().block.conv1.weight.val().grad(g).unwrap();
            assert!(rel(w(&ga), w(&gb)) <= 1e-4, "gradients differ");
        }
        let cfg = |dims, width| ModelConfig { dims, width, ..ModelConfig::new(Arch::Unetpp, Preset::Modern, 3) };
        run::<4>(cfg(2, 8), [2, 1, 32, 32]);
        run::<5>(cfg(3, 4), [1, 1, 16, 16, 16]);
    }

    /// Inference keeps prepared weights per weight tensor: fresh weights of the same shapes
    /// (allocated while older ones are dropped, so addresses get reused) and weights replaced in
    /// a module must never see another tensor's prepared copy.
    #[test]
    fn prepared_weights_follow_the_weights() {
        let d = Device::flex();
        let x = Tensor::<4>::random([1, 3, 16, 16], Distribution::Default, &d);
        for _ in 0..10 {
            let mut conv = Conv::<4>::new(3, 4, 3, &d);
            assert!(rel(conv.forward(x.clone()), conv.forward_burn(x.clone())) <= 1e-4);
            conv.weight = burn::module::Param::from_tensor(conv.weight.val().mul_scalar(-2.0));
            assert!(rel(conv.forward(x.clone()), conv.forward_burn(x.clone())) <= 1e-4);
        }
    }

    /// The fused inference ops (`same_conv_up`, `same_conv_pool`, `same_conv_head`) against
    /// their parts, with and without autodiff (where they are those parts, gradients included),
    /// at a size the Winograd kernel takes.
    #[test]
    fn fused_ops_equal_their_parts() {
        for d in [Device::flex(), Device::flex().autodiff()] {
            let grad = |t: Tensor<4>| if d.is_autodiff() { t.require_grad() } else { t };
            let x = Tensor::<4>::random([2, 16, 24, 24], Distribution::Default, &d);
            let low = grad(Tensor::<4>::random([2, 8, 12, 12], Distribution::Default, &d));
            let (c1, c2, head) =
                (Conv::<4>::new(24, 16, 3, &d), Conv::<4>::new(16, 16, 3, &d), Conv::<4>::new(16, 2, 1, &d));
            let parts = || vec![x.clone(), low.clone()];
            let up = c1.forward_relu_up(parts());
            let want = c1.forward_relu(vec![x.clone(), upsample2x(low.clone())]);
            assert!(rel(up.clone(), want.clone()) <= 1e-5, "up-sampled part");
            let y_want = c2.forward_relu(vec![want]);
            let (y, pooled) = c2.forward_relu_pool(vec![up.clone()]);
            assert!(rel(y, y_want.clone()) <= 1e-5, "pooled op's output");
            assert!(rel(pooled, max_pool2x(y_want.clone())) <= 1e-5, "pooled");
            let (h, h_want) = (c2.forward_relu_head(vec![up], &head), head.forward(y_want));
            assert!(rel(h.clone(), h_want.clone()) <= 1e-5, "head");
            if d.is_autodiff() {
                let (ga, gb) = (h.sum().backward(), h_want.sum().backward());
                assert!(rel(low.grad(&ga).unwrap(), low.grad(&gb).unwrap()) <= 1e-4, "gradient of the low part");
                let gh = |g| head.weight.val().grad(g).unwrap();
                assert!(rel(gh(&ga), gh(&gb)) <= 1e-4, "head weight gradient");
            }
        }
    }

    #[test]
    fn inference_device_runs_the_kernel_too() {
        let d = Device::flex();
        let conv = Conv::<4>::new(3, 4, 3, &d);
        let x = Tensor::<4>::random([2, 3, 8, 8], Distribution::Default, &d);
        assert!(supported(&x));
        assert!(rel(conv.forward(x.clone()), conv.forward_burn(x.clone())) <= 1e-4);
        // ReLU fused into the kernel's stores, on the direct path (16-pixel rows) and a GEMM one.
        for side in [16, 8] {
            let x = Tensor::<4>::random([2, 3, side, side], Distribution::Default, &d);
            let fused = conv.forward_relu(vec![x.clone()]);
            assert!(rel(fused, burn::tensor::activation::relu(conv.forward_burn(x))) <= 1e-4);
        }
    }
}
