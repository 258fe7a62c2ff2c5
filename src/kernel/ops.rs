//! The kernels' public operations on `Tensor`s, which the model calls: each goes through
//! `Dispatch` to the `KernelBackend` implementations where the tensor lives on Flex, and
//! `supported` tells the model when that is; `fuses` tells when `conv_relu_fused` runs.

use super::ext::{self, Fused, FusedBackend, KernelBackend, PARTS};
use super::sigmoid as logistic;
use super::{conv, tensors::geom};
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
/// ReLU when `relu` is set. (`conv_relu_fused` adds up-sampling, pooling and a head to it.)
pub fn same_conv<const D: usize>(xs: Vec<Tensor<D>>, weight: Tensor<D>, bias: Tensor<1>, relu: bool) -> Tensor<D> {
    let [a, b, c, d, e, f] = six(xs);
    let (w, bias) = (weight.into_dispatch(), bias.into_dispatch());
    Tensor::from_dispatch(<Dispatch as KernelBackend>::same_conv(a, b, c, d, e, f, w, bias, relu))
}

/// Where a convolution + ReLU layer's output goes: stored, stored and 2x max-pooled, or only
/// into a 1x1 convolution (a head: weight, bias) that is all that reads it.
// A `Tensor` is 256 bytes; these are moved once per layer, so boxing would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Sink<const D: usize> {
    Store,
    Pool,
    Head(Tensor<D>, Tensor<1>),
}

/// A layer's output as its `Sink` takes it: the output, the output and its pooling, or the
/// head's output.
#[allow(clippy::large_enum_variant)]
pub enum Out<const D: usize> {
    Stored(Tensor<D>),
    Pooled(Tensor<D>, Tensor<D>),
    Head(Tensor<D>),
}

impl<const D: usize> Out<D> {
    /// The output (or the head's), without the pooling.
    pub fn into_tensor(self) -> Tensor<D> {
        match self {
            Out::Stored(y) | Out::Pooled(y, _) | Out::Head(y) => y,
        }
    }
}

/// Whether `conv_relu_fused` runs for the stride-1 convolution `weight` of the parts `xs` (the
/// last at half size if `half`) into a head of weight `head`: on Flex without autodiff, f32, a
/// 1x1 head, at most six parts, and a geometry the 2D Winograd kernel takes (`conv::fuses`).
pub fn fuses<const D: usize>(xs: &[&Tensor<D>], half: bool, weight: &Tensor<D>, head: Option<&Tensor<D>>) -> bool {
    let Some(&last) = xs.last() else { return false };
    let pointwise = head.is_none_or(|w| w.dims()[2..].iter().all(|&k| k == 1));
    if !supported(last) || last.is_autodiff() || !pointwise || xs.len() > PARTS {
        return false;
    }
    let mut shape = last.dims();
    if half {
        shape[2..].iter_mut().for_each(|s| *s *= 2);
    }
    shape[1] = xs.iter().map(|x| x.dims()[1]).sum();
    conv::fuses(&geom(&shape, &weight.dims()), D - 2)
}

/// relu(conv(cat(xs)) + bias) into `sink` in one pass of the Winograd kernel, the last part at
/// half size and entering as its 2x linear up-sampling (align_corners = false) if `half`: that
/// part is up-sampled as it is read, and the output pooled or summed into the head as it is
/// stored. Only where `fuses` holds.
pub fn conv_relu_fused<const D: usize>(
    xs: Vec<Tensor<D>>,
    half: bool,
    weight: Tensor<D>,
    bias: Tensor<1>,
    sink: Sink<D>,
) -> Out<D> {
    let [a, b, c, d, e, f] = six(xs);
    let (w, bias) = (weight.into_dispatch(), bias.into_dispatch());
    let head = matches!(sink, Sink::Head(..));
    let sink = match sink {
        Sink::Store => ext::Sink::Store,
        Sink::Pool => ext::Sink::Pool,
        Sink::Head(w, b) => ext::Sink::Head { weight: w.into_dispatch(), bias: b.into_dispatch() },
    };
    match <Dispatch as FusedBackend>::conv_relu_fused(a, b, c, d, e, f, w, bias, half, sink) {
        Fused::One(y) if head => Out::Head(Tensor::from_dispatch(y)),
        Fused::One(y) => Out::Stored(Tensor::from_dispatch(y)),
        Fused::Pooled(y, pooled) => Out::Pooled(Tensor::from_dispatch(y), Tensor::from_dispatch(pooled)),
    }
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
