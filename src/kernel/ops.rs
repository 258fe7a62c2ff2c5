//! The kernels' public operations on `Tensor`s, which the model calls: each goes through
//! `Dispatch` to the `KernelBackend` implementations where the tensor lives on Flex, and
//! `supported` tells the model when that is.

use super::ext::{KernelBackend, PARTS};
use super::sigmoid as logistic;
use burn::backend::Dispatch;
use burn::backend::tensor::FloatTensor;
use burn::prelude::*;
use burn::tensor::{DType, TensorData};

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
    logistic::in_place(&mut v);
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
