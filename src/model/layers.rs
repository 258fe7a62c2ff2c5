//! Rank-generic building blocks: one definition serves 2D (`Tensor<4>`, NCHW) and 3D
//! (`Tensor<5>`, NCDHW). burn ships separate 2D/3D functions, so each op reshapes to the
//! concrete rank (free for contiguous tensors) and dispatches on `D`.

use burn::module::{Module, Param};
use burn::nn::{BatchNorm, BatchNormConfig, Dropout, DropoutConfig, Initializer};
use burn::prelude::*;
use burn::tensor::activation::relu;
use burn::tensor::module::{conv_transpose2d, conv_transpose3d, conv2d, conv3d, interpolate, max_pool2d};
use burn::tensor::ops::{ConvOptions, ConvTransposeOptions, InterpolateMode, InterpolateOptions, MaxPoolOptions};

use crate::kernel;
pub use crate::kernel::Out;

/// Reinterprets a shape array of one rank as another of the same length (checked).
fn same<const A: usize, const B: usize>(d: [usize; A]) -> [usize; B] {
    d[..].try_into().expect("rank mismatch")
}

/// Views a tensor at another rank with the same dimensions (`Tensor<D>` <-> `Tensor<4|5>`).
fn rank<const A: usize, const B: usize>(x: Tensor<A>) -> Tensor<B> {
    let d = x.dims();
    x.reshape(same::<A, B>(d))
}

fn spatial(d: usize) -> usize {
    assert!(d == 4 || d == 5, "only 2D (rank 4) and 3D (rank 5) tensors are supported");
    d - 2
}

/// PyTorch's default init (Kaiming uniform with a = sqrt(5)), so training behaves like the peers.
fn torch_init() -> Initializer {
    Initializer::KaimingUniform { gain: 1.0 / 3.0f64.sqrt(), fan_out_only: false }
}

/// A k^n convolution ("same" padding for odd k), optionally strided and without bias (the
/// convolutions of ResNets and of smp's decoder, where BatchNorm follows, have none).
#[derive(Module, Debug)]
pub struct Conv<const D: usize> {
    pub weight: Param<Tensor<D>>,
    pub bias: Option<Param<Tensor<1>>>,
    pub stride: usize,
}

impl<const D: usize> Conv<D> {
    pub fn new(c_in: usize, c_out: usize, kernel: usize, device: &Device) -> Self {
        let mut shape = [kernel; D];
        shape[0] = c_out;
        shape[1] = c_in;
        let fan_in = c_in * kernel.pow(spatial(D) as u32);
        let init = torch_init();
        Self {
            weight: init.init_with(shape, Some(fan_in), None, device),
            bias: Some(init.init_with([c_out], Some(fan_in), None, device)),
            stride: 1,
        }
    }

    pub fn without_bias(self) -> Self {
        Self { bias: None, ..self }
    }

    pub fn with_stride(self, stride: usize) -> Self {
        Self { stride, ..self }
    }

    pub fn forward(&self, x: Tensor<D>) -> Tensor<D> {
        self.forward_parts(vec![x])
    }

    /// The convolution of the channel concatenation of `xs` (UNet++'s dense skip inputs): our
    /// kernel reads the parts in place, other backends get them concatenated.
    pub fn forward_parts(&self, xs: Vec<Tensor<D>>) -> Tensor<D> {
        self.forward_act(xs, false)
    }

    /// relu(conv(cat(xs))), the ReLU fused into our kernel's stores where it runs.
    pub fn forward_relu(&self, xs: Vec<Tensor<D>>) -> Tensor<D> {
        self.forward_act(xs, true)
    }

    /// Whether our kernel computes this convolution of `x` (and of the parts beside it).
    fn in_kernel(&self, x: &Tensor<D>) -> bool {
        self.stride == 1 && self.weight.dims()[2] % 2 == 1 && crate::kernel::supported(x)
    }

    pub fn bias_val(&self) -> Tensor<1> {
        let c_out = self.weight.dims()[0];
        self.bias.as_ref().map(|b| b.val()).unwrap_or_else(|| Tensor::zeros([c_out], &self.weight.device()))
    }

    fn forward_act(&self, mut xs: Vec<Tensor<D>>, act: bool) -> Tensor<D> {
        if self.in_kernel(&xs[0]) {
            return crate::kernel::same_conv(xs, self.weight.val(), self.bias_val(), act);
        }
        let x = if xs.len() == 1 { xs.remove(0) } else { Tensor::cat(xs, 1) };
        let y = self.forward_burn(x);
        if act { relu(y) } else { y }
    }

    /// burn's own convolution: every backend, any stride (and the reference for our kernel).
    pub fn forward_burn(&self, x: Tensor<D>) -> Tensor<D> {
        let [_, _, k, ..] = self.weight.dims()[..] else { unreachable!() };
        let (p, s) = (k / 2, self.stride);
        let (w, b) = (self.weight.val(), self.bias.as_ref().map(|b| b.val()));
        let y: Tensor<D> = match D {
            4 => {
                let y = conv2d(rank::<D, 4>(x), rank::<D, 4>(w), b, ConvOptions::new([s; 2], [p; 2], [1; 2], 1));
                rank::<4, D>(y)
            }
            _ => {
                let y = conv3d(rank::<D, 5>(x), rank::<D, 5>(w), b, ConvOptions::new([s; 3], [p; 3], [1; 3], 1));
                rank::<5, D>(y)
            }
        };
        y
    }
}

/// Transposed convolution with kernel = stride = the level's factor per axis (2^n in the
/// paper): the Keras code's learned up-sampling.
#[derive(Module, Debug)]
pub struct UpConv<const D: usize> {
    pub weight: Param<Tensor<D>>,
    pub bias: Param<Tensor<1>>,
}

impl<const D: usize> UpConv<D> {
    /// Up-sampling by `factor` (`[z, y, x]`, z unused in 2D).
    pub fn new(c_in: usize, c_out: usize, factor: [usize; 3], device: &Device) -> Self {
        let mut shape = [0; D];
        shape[2..].copy_from_slice(&factor[5 - D..]);
        let fan_in = c_out * shape[2..].iter().product::<usize>();
        shape[0] = c_in;
        shape[1] = c_out;
        let init = torch_init();
        Self {
            weight: init.init_with(shape, Some(fan_in), None, device),
            bias: init.init_with([c_out], Some(fan_in), None, device),
        }
    }

    pub fn forward(&self, x: Tensor<D>) -> Tensor<D> {
        let (w, b) = (self.weight.val(), Some(self.bias.val()));
        let k = w.dims();
        match D {
            4 => {
                let s = [k[2], k[3]];
                let o = ConvTransposeOptions::new(s, [0; 2], [0; 2], [1; 2], 1);
                let y = conv_transpose2d(rank::<D, 4>(x), rank::<D, 4>(w), b, o);
                rank::<4, D>(y)
            }
            _ => {
                let s = [k[2], k[3], k[4]];
                let o = ConvTransposeOptions::new(s, [0; 3], [0; 3], [1; 3], 1);
                let y = conv_transpose3d(rank::<D, 5>(x), rank::<D, 5>(w), b, o);
                rank::<5, D>(y)
            }
        }
    }
}

/// Whether `factor` doubles (or halves) every spatial axis of a rank-`D` tensor.
fn doubles<const D: usize>(factor: [usize; 3]) -> bool {
    factor[5 - D..].iter().all(|&f| f == 2)
}

/// A 3D tensor viewed as 2D planes (N, C·Z, H, W), for in-plane-only factors `[1, 2, 2]`,
/// which our 2D kernels then take; `None` for any other case.
fn planes<const D: usize>(x: &Tensor<D>, factor: [usize; 3]) -> Option<Tensor<4>> {
    let d = x.dims();
    (D == 5 && factor == [1, 2, 2]).then(|| x.clone().reshape([d[0], d[1] * d[2], d[3], d[4]]))
}

/// 2^n max pooling with stride 2 (see [`max_pool_by`]).
pub fn max_pool<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    max_pool_by(x, [2; 3])
}

/// Max pooling with kernel = stride = `factor` per axis `[z, y, x]` (z unused in 2D; an odd
/// remainder is dropped, as PyTorch does). Our kernel where it applies (2 on every axis, or
/// in-plane only on 3D as 2D planes); otherwise burn's 2D pool, with the depth pairs of 3D
/// volumes folded into a trailing axis and reduced by `max_dim` (burn has no 3D max pool).
pub fn max_pool_by<const D: usize>(x: Tensor<D>, factor: [usize; 3]) -> Tensor<D> {
    let d = x.dims();
    if crate::kernel::supported(&x) {
        if doubles::<D>(factor) {
            return crate::kernel::max_pool2x(x);
        }
        if let Some(p) = planes(&x, factor) {
            let y = crate::kernel::max_pool2x(p);
            return y.reshape(same::<5, D>([d[0], d[1], d[2], d[3] / 2, d[4] / 2]));
        }
    }
    let [fz, fy, fx] = factor;
    let opts = MaxPoolOptions::new([fy, fx]);
    match D {
        4 => {
            let y = max_pool2d(rank::<D, 4>(x), opts);
            rank::<4, D>(y)
        }
        _ => {
            let (n, c, z, h, w) = (d[0], d[1], d[2], d[3], d[4]);
            let y = max_pool2d(x.reshape([n, c * z, h, w]), opts);
            let (h2, w2) = (h / fy, w / fx);
            if fz == 1 {
                return y.reshape(same::<5, D>([n, c, z, h2, w2]));
            }
            let y = y.reshape([n * c * (z / 2), 2, h2 * w2]).max_dim(1);
            y.reshape(same::<5, D>([n, c, z / 2, h2, w2]))
        }
    }
}

/// ResNet's stem pooling: 3x3 max pool, stride 2, padding 1 (2D only).
pub fn max_pool_3x3<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    assert_eq!(D, 4, "ResNet encoders are 2D");
    let y = max_pool2d(rank::<D, 4>(x), MaxPoolOptions::new([3, 3]).with_stride([2, 2]).with_padding([1, 1]));
    rank::<4, D>(y)
}

/// x2 up-sampling (see [`upsample_by`]).
pub fn upsample<const D: usize>(x: Tensor<D>, nearest: bool, align_corners: bool) -> Tensor<D> {
    upsample_by(x, nearest, align_corners, [2; 3])
}

/// Up-sampling by `factor` (1 or 2) per axis `[z, y, x]` (z unused in 2D): (bi/tri)linear, or
/// nearest (smp's default). Our kernel where it applies (linear, align_corners = false, 2 on
/// every axis or in-plane only on 3D as 2D planes); linear otherwise one axis at a time
/// ([`linear2x_along`]); nearest or align_corners through burn's 2D interpolation of each (H, W)
/// plane, the depth axis of 3D volumes (nearest only) by repeating slices.
pub fn upsample_by<const D: usize>(x: Tensor<D>, nearest: bool, align_corners: bool, factor: [usize; 3]) -> Tensor<D> {
    let d = x.dims();
    if !nearest && !align_corners {
        if crate::kernel::supported(&x) {
            if doubles::<D>(factor) {
                return crate::kernel::upsample2x(x);
            }
            if let Some(p) = planes(&x, factor) {
                let y = crate::kernel::upsample2x(p);
                return y.reshape(same::<5, D>([d[0], d[1], d[2], 2 * d[3], 2 * d[4]]));
            }
        }
        if factor.iter().all(|&f| f <= 2) {
            let axes = (5 - D..3).zip(2..D);
            return axes.fold(x, |y, (f, axis)| if factor[f] == 2 { linear2x_along(y, axis) } else { y });
        }
    }
    let [fz, fy, fx] = factor;
    let interp = |x: Tensor<4>, h: usize, w: usize| {
        if (fy, fx) == (1, 1) {
            return x;
        }
        let mode = if nearest { InterpolateMode::Nearest } else { InterpolateMode::Bilinear };
        let opts = InterpolateOptions::new(mode).with_align_corners(align_corners).with_output_size([fy * h, fx * w]);
        interpolate(x, opts)
    };
    match D {
        4 => {
            let y = interp(rank::<D, 4>(x), d[2], d[3]);
            rank::<4, D>(y)
        }
        _ => {
            let (n, c, z, h, w) = (d[0], d[1], d[2], d[3], d[4]);
            let (h, w) = (fy * h, fx * w);
            let y: Tensor<5> = interp(x.reshape([n, c * z, d[3], d[4]]), d[3], d[4]).reshape([n, c, z, h, w]);
            if fz == 1 {
                return y.reshape(same::<5, D>([n, c, z, h, w]));
            }
            assert!(nearest, "linear depth up-sampling is done above");
            let y: Tensor<6> = Tensor::stack(vec![y.clone(), y], 3);
            y.reshape(same::<5, D>([n, c, 2 * z, h, w]))
        }
    }
}

/// Linear x2 up-sampling of one axis with align_corners = false, the weights PyTorch uses at
/// scale 2: output 2i is 0.75 x[i] + 0.25 x[i-1], output 2i+1 is 0.75 x[i] + 0.25 x[i+1],
/// neighbours clamped at the edges. Made of differentiable tensor ops because burn-cubecl has no
/// backward for bilinear interpolation (cubek-interpolate 0.3.1: nearest only), so the GPU
/// backend could not train through burn's `interpolate`.
fn linear2x_along<const D: usize>(y: Tensor<D>, axis: usize) -> Tensor<D> {
    let d = y.dims();
    let n = d[axis];
    let (prev, next) = if n == 1 {
        (y.clone(), y.clone())
    } else {
        (
            Tensor::cat(vec![y.clone().narrow(axis, 0, 1), y.clone().narrow(axis, 0, n - 1)], axis),
            Tensor::cat(vec![y.clone().narrow(axis, 1, n - 1), y.clone().narrow(axis, n - 1, 1)], axis),
        )
    };
    let even = y.clone().mul_scalar(0.75) + prev.mul_scalar(0.25);
    let odd = y.mul_scalar(0.75) + next.mul_scalar(0.25);
    // Interleaved along `axis`: [outer, n, 1, inner] side by side on the unit axis.
    let (outer, inner) = (d[..axis].iter().product::<usize>(), d[axis + 1..].iter().product::<usize>());
    let pair = |t: Tensor<D>| t.reshape([outer, n, 1, inner]);
    let mut out = d;
    out[axis] *= 2;
    Tensor::cat(vec![pair(even), pair(odd)], 2).reshape(out)
}

/// An input of a layer, concatenated with the others along channels: at the output's size, or
/// at that size divided by a factor per axis `[z, y, x]` (the level's pooling: 2 on every axis
/// in the paper) and entering as its linear up-sampling (align_corners = false), which the
/// kernel may do as it reads it: eq. 1's U(x^{i+1,j-1}), the tensor from below taken at its own
/// size as MONAI's `UpCat` takes it.
pub enum Part<const D: usize> {
    Same(Tensor<D>),
    Half(Tensor<D>, [usize; 3]),
}

impl<const D: usize> Part<D> {
    fn tensor(&self) -> &Tensor<D> {
        match self {
            Part::Same(x) | Part::Half(x, _) => x,
        }
    }

    fn into_tensor(self) -> Tensor<D> {
        match self {
            Part::Same(x) | Part::Half(x, _) => x,
        }
    }

    /// The part at the output's size.
    fn full(self) -> Tensor<D> {
        match self {
            Part::Same(x) => x,
            Part::Half(x, factor) => upsample_by(x, false, false, factor),
        }
    }
}

/// Where a layer's output goes: stored; stored and max-pooled by the next level's factor per
/// axis (an encoder node's output, and D of it for the node below); or only into a head, when
/// nothing else reads it.
pub enum Sink<'a, const D: usize> {
    Store,
    Pool([usize; 3]),
    Head(&'a Conv<D>),
}

impl<const D: usize> Sink<'_, D> {
    fn head(&self) -> Option<&Conv<D>> {
        match self {
            Sink::Head(head) => Some(head),
            _ => None,
        }
    }

    /// The composed form: `y` into the sink.
    fn take(self, y: Tensor<D>) -> Out<D> {
        match self {
            Sink::Store => Out::Stored(y),
            Sink::Pool(factor) => Out::Pooled(y.clone(), max_pool_by(y, factor)),
            Sink::Head(head) => Out::Head(head.forward(y)),
        }
    }

    fn for_kernel(self) -> kernel::Sink<D> {
        match self {
            Sink::Store => kernel::Sink::Store,
            Sink::Pool(_) => kernel::Sink::Pool,
            Sink::Head(head) => kernel::Sink::Head(head.weight.val(), head.bias_val()),
        }
    }
}

/// H in eq. 1: two (conv -> [BatchNorm] -> ReLU -> [dropout]) layers.
#[derive(Module, Debug)]
pub struct Block<const D: usize> {
    pub conv1: Conv<D>,
    pub norm1: Option<BatchNorm>,
    pub conv2: Conv<D>,
    pub norm2: Option<BatchNorm>,
    pub dropout: Option<Dropout>,
}

impl<const D: usize> Block<D> {
    /// `bias: false` drops the conv biases (smp's decoder: BatchNorm makes them redundant).
    pub fn new(c_in: usize, c_out: usize, batch_norm: bool, bias: bool, dropout: f64, device: &Device) -> Self {
        let norm = || batch_norm.then(|| BatchNormConfig::new(c_out).init(device));
        let conv = |c_in| {
            let c = Conv::new(c_in, c_out, 3, device);
            if bias { c } else { c.without_bias() }
        };
        Self {
            conv1: conv(c_in),
            norm1: norm(),
            conv2: conv(c_out),
            norm2: norm(),
            dropout: (dropout > 0.0).then(|| DropoutConfig::new(dropout).init()),
        }
    }

    /// H on the channel concatenation of `parts`, its output going to `sink`.
    pub fn forward(&self, parts: Vec<Part<D>>, sink: Sink<'_, D>) -> Out<D> {
        let y = self.layer(&self.conv1, &self.norm1, parts, Sink::Store).into_tensor();
        self.layer(&self.conv2, &self.norm2, vec![Part::Same(y)], sink)
    }

    /// One layer of H, conv -> [BatchNorm] -> ReLU -> [dropout], on the concatenation of `parts`,
    /// into `sink`: the one place that decides fusion, for every backend. Where ReLU follows the
    /// convolution directly (BatchNorm folded or absent, no dropout) and the kernel takes the
    /// layer whole (`kernel::fuses`: Flex inference, 2D, the Winograd path), a half-size part is
    /// up-sampled as it is read and the output pooled or summed into the head as it is stored;
    /// everywhere else (training, 3D, other backends, and levels whose factor is not 2 on every
    /// axis, which the fused kernel assumes) the layer is composed of its operations.
    fn layer(&self, conv: &Conv<D>, norm: &Option<BatchNorm>, parts: Vec<Part<D>>, sink: Sink<'_, D>) -> Out<D> {
        let up = match parts.last() {
            Some(Part::Half(_, factor)) => Some(*factor),
            _ => None,
        };
        let half = up.is_some();
        let pool = match sink {
            Sink::Pool(factor) => Some(factor),
            _ => None,
        };
        let xs: Vec<&Tensor<D>> = parts.iter().map(Part::tensor).collect();
        let head = sink.head();
        let fused = norm.is_none()
            && self.dropout.is_none()
            && up.into_iter().chain(pool).all(doubles::<D>)
            && parts.iter().rev().skip(1).all(|p| matches!(p, Part::Same(_)))
            && conv.stride == 1
            && head.is_none_or(|h| h.stride == 1)
            && kernel::fuses(&xs, half, &conv.weight.val(), head.map(|h| h.weight.val()).as_ref());
        if fused {
            let xs = parts.into_iter().map(Part::into_tensor).collect();
            return kernel::conv_relu_fused(xs, half, conv.weight.val(), conv.bias_val(), sink.for_kernel());
        }
        let xs = parts.into_iter().map(Part::full).collect();
        let y = match norm {
            None => conv.forward_relu(xs),
            Some(norm) => norm_relu(norm, conv.forward_parts(xs)),
        };
        let y = match &self.dropout {
            Some(dropout) => dropout.forward(y),
            None => y,
        };
        sink.take(y)
    }

    /// Inference only: each BatchNorm (running statistics) folded into the convolution before
    /// it, which saves a pass over every activation. The block must not be trained afterwards.
    pub fn fold_batchnorm(self) -> Self {
        let (conv1, norm1) = fold(self.conv1, self.norm1);
        let (conv2, norm2) = fold(self.conv2, self.norm2);
        Self { conv1, norm1, conv2, norm2, ..self }
    }
}

/// relu(BatchNorm(y)). In training on Flex both run as one kernel (statistics, normalisation and
/// ReLU in two passes, two for the backward) instead of burn's generic ops; the running
/// statistics are updated exactly as burn's `BatchNorm::forward` does.
pub fn norm_relu<const D: usize>(norm: &BatchNorm, y: Tensor<D>) -> Tensor<D> {
    if !(crate::kernel::supported(&y) && y.device().is_autodiff() && norm.training.is_enabled()) {
        return relu(norm.forward(y));
    }
    let (out, mean, var) = crate::kernel::batch_norm(y, norm.gamma.val(), norm.beta.val(), norm.epsilon, true);
    let m = norm.momentum;
    let update = |state: &burn::module::RunningState<Tensor<1>>, batch: Tensor<1>| {
        let device = batch.device();
        let old = state.value_sync().to_device(&device);
        state.update(old.mul_scalar(1.0 - m).add(batch.mul_scalar(m)).detach());
    };
    update(&norm.running_mean, mean);
    update(&norm.running_var, var);
    out
}

/// conv then BN(eval) == conv with weights scaled by gamma / sqrt(var + eps) per output channel
/// and bias (b - mean) * scale + beta.
pub fn fold<const D: usize>(conv: Conv<D>, norm: Option<BatchNorm>) -> (Conv<D>, Option<BatchNorm>) {
    let Some(bn) = norm else { return (conv, None) };
    let c = conv.weight.dims()[0];
    let scale = bn.gamma.val() / bn.running_var.value().add_scalar(bn.epsilon).sqrt();
    let shift = bn.beta.val() - bn.running_mean.value() * scale.clone();
    let mut shape = [1usize; D];
    shape[0] = c;
    let weight = conv.weight.val() * scale.clone().reshape(shape);
    let bias = match &conv.bias {
        Some(b) => b.val() * scale + shift,
        None => shift,
    };
    (Conv { weight: Param::from_tensor(weight), bias: Some(Param::from_tensor(bias)), stride: conv.stride }, None)
}
