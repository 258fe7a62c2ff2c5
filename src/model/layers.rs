//! Rank-generic building blocks: one definition serves 2D (`Tensor<4>`, NCHW) and 3D
//! (`Tensor<5>`, NCDHW). burn ships separate 2D/3D functions, so each op reshapes to the
//! concrete rank (free for contiguous tensors) and dispatches on `D`.

use burn::module::{Module, Param};
use burn::nn::{BatchNorm, BatchNormConfig, Dropout, DropoutConfig, Initializer};
use burn::prelude::*;
use burn::tensor::activation::relu;
use burn::tensor::module::{conv_transpose2d, conv_transpose3d, conv2d, conv3d, interpolate, max_pool2d};
use burn::tensor::ops::{ConvOptions, ConvTransposeOptions, InterpolateMode, InterpolateOptions, MaxPoolOptions};

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

    /// relu(conv(cat(xs))) where the last part enters as its 2x linear up-sampling
    /// (align_corners = false): our kernel, where it runs, reads that part at half resolution.
    pub fn forward_relu_up(&self, mut xs: Vec<Tensor<D>>) -> Tensor<D> {
        if xs.len() <= 6 && self.in_kernel(&xs[0]) {
            return crate::kernel::same_conv_up(xs, self.weight.val(), self.bias_val(), true);
        }
        let low = xs.pop().expect("an up-sampled part");
        xs.push(upsample(low, false, false));
        self.forward_relu(xs)
    }

    /// relu(conv(cat(xs))) and its 2x max pooling, pooled as our kernel stores where it runs.
    pub fn forward_relu_pool(&self, xs: Vec<Tensor<D>>) -> (Tensor<D>, Tensor<D>) {
        if self.in_kernel(&xs[0]) {
            return crate::kernel::same_conv_pool(xs, self.weight.val(), self.bias_val(), true);
        }
        let y = self.forward_relu(xs);
        (y.clone(), max_pool(y))
    }

    /// head(relu(conv(cat(xs)))): where our kernel runs and `head` is 1x1, the ReLU output is
    /// summed into the head as it is computed instead of being stored (a node only its head
    /// reads).
    pub fn forward_relu_head(&self, xs: Vec<Tensor<D>>, head: &Conv<D>) -> Tensor<D> {
        let pointwise = head.stride == 1 && head.weight.dims()[2..].iter().all(|&k| k == 1);
        if pointwise && self.in_kernel(&xs[0]) {
            let (conv, head) = ((self.weight.val(), self.bias_val()), (head.weight.val(), head.bias_val()));
            return crate::kernel::same_conv_head(xs, conv, true, head);
        }
        head.forward(self.forward_relu(xs))
    }

    /// Whether our kernel computes this convolution of `x` (and of the parts beside it).
    fn in_kernel(&self, x: &Tensor<D>) -> bool {
        self.stride == 1 && self.weight.dims()[2] % 2 == 1 && crate::kernel::supported(x)
    }

    fn bias_val(&self) -> Tensor<1> {
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

/// 2^n transposed convolution with stride 2: the Keras code's learned up-sampling.
#[derive(Module, Debug)]
pub struct UpConv<const D: usize> {
    pub weight: Param<Tensor<D>>,
    pub bias: Param<Tensor<1>>,
}

impl<const D: usize> UpConv<D> {
    pub fn new(c_in: usize, c_out: usize, device: &Device) -> Self {
        let mut shape = [2; D];
        shape[0] = c_in;
        shape[1] = c_out;
        let fan_in = c_out * 2usize.pow(spatial(D) as u32);
        let init = torch_init();
        Self {
            weight: init.init_with(shape, Some(fan_in), None, device),
            bias: init.init_with([c_out], Some(fan_in), None, device),
        }
    }

    pub fn forward(&self, x: Tensor<D>) -> Tensor<D> {
        let (w, b) = (self.weight.val(), Some(self.bias.val()));
        match D {
            4 => {
                let o = ConvTransposeOptions::new([2; 2], [0; 2], [0; 2], [1; 2], 1);
                let y = conv_transpose2d(rank::<D, 4>(x), rank::<D, 4>(w), b, o);
                rank::<4, D>(y)
            }
            _ => {
                let o = ConvTransposeOptions::new([2; 3], [0; 3], [0; 3], [1; 3], 1);
                let y = conv_transpose3d(rank::<D, 5>(x), rank::<D, 5>(w), b, o);
                rank::<5, D>(y)
            }
        }
    }
}

/// 2^n max pooling with stride 2. burn has no 3D max pool, so depth pairs are folded into a
/// trailing axis and reduced with `max_dim` after a 2D pool over (H, W).
pub fn max_pool<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if crate::kernel::supported(&x) {
        return crate::kernel::max_pool2x(x);
    }
    let d = x.dims();
    let opts = MaxPoolOptions::new([2, 2]);
    match D {
        4 => {
            let y = max_pool2d(rank::<D, 4>(x), opts);
            rank::<4, D>(y)
        }
        _ => {
            let (n, c, z, h, w) = (d[0], d[1], d[2], d[3], d[4]);
            let y = max_pool2d(x.reshape([n, c * z, h, w]), opts);
            let (h2, w2) = (h / 2, w / 2);
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

/// x2 up-sampling: (bi/tri)linear, or nearest (smp's default). 2D uses burn's kernels; the depth
/// axis of 3D volumes is up-sampled here, with the fixed 0.25/0.75 weights that
/// align_corners=false gives at scale 2 (linear) or by repeating slices (nearest).
pub fn upsample<const D: usize>(x: Tensor<D>, nearest: bool, align_corners: bool) -> Tensor<D> {
    if !nearest && !align_corners && crate::kernel::supported(&x) {
        return crate::kernel::upsample2x(x);
    }
    let d = x.dims();
    let opts = |h: usize, w: usize| {
        let mode = if nearest { InterpolateMode::Nearest } else { InterpolateMode::Bilinear };
        InterpolateOptions::new(mode).with_align_corners(align_corners).with_output_size([2 * h, 2 * w])
    };
    match D {
        4 => {
            let y = interpolate(rank::<D, 4>(x), opts(d[2], d[3]));
            rank::<4, D>(y)
        }
        _ => {
            let (n, c, z, h, w) = (d[0], d[1], d[2], d[3], d[4]);
            let y = interpolate(x.reshape([n, c * z, h, w]), opts(h, w));
            let y: Tensor<5> = y.reshape([n, c, z, 2 * h, 2 * w]);
            if nearest {
                let y: Tensor<6> = Tensor::stack(vec![y.clone(), y], 3);
                return y.reshape(same::<5, D>([n, c, 2 * z, 2 * h, 2 * w]));
            }
            // Neighbours along depth, edge-clamped.
            let (prev, next) = if z == 1 {
                (y.clone(), y.clone())
            } else {
                (
                    Tensor::cat(vec![y.clone().narrow(2, 0, 1), y.clone().narrow(2, 0, z - 1)], 2),
                    Tensor::cat(vec![y.clone().narrow(2, 1, z - 1), y.clone().narrow(2, z - 1, 1)], 2),
                )
            };
            let even = y.clone().mul_scalar(0.75) + prev.mul_scalar(0.25);
            let odd = y.mul_scalar(0.75) + next.mul_scalar(0.25);
            let y: Tensor<6> = Tensor::stack(vec![even, odd], 3);
            y.reshape(same::<5, D>([n, c, 2 * z, 2 * h, 2 * w]))
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

    fn layer(&self, xs: Vec<Tensor<D>>, conv: &Conv<D>, norm: &Option<BatchNorm>) -> Tensor<D> {
        // Without BatchNorm (or with it folded, at inference) ReLU follows the convolution
        // directly and goes into its kernel.
        let y = match norm {
            None => conv.forward_relu(xs),
            Some(norm) => norm_relu(norm, conv.forward_parts(xs)),
        };
        match &self.dropout {
            Some(dropout) => dropout.forward(y),
            None => y,
        }
    }

    pub fn forward(&self, x: Tensor<D>) -> Tensor<D> {
        self.forward_parts(vec![x], false)
    }

    /// The block on the channel concatenation of `xs`, without copying them together first
    /// where the convolution kernel can read them in place. With `half`, the last part is at
    /// half resolution and enters as its 2x linear up-sampling (align_corners = false).
    pub fn forward_parts(&self, xs: Vec<Tensor<D>>, half: bool) -> Tensor<D> {
        let y = self.first(xs, half);
        self.layer(vec![y], &self.conv2, &self.norm2)
    }

    /// The first layer (see `forward_parts`): where the ReLU follows its convolution directly,
    /// the kernel up-samples the half-resolution part as it reads it, and the up-sampled tensor
    /// (a nested node's largest input) is never made.
    fn first(&self, mut xs: Vec<Tensor<D>>, half: bool) -> Tensor<D> {
        if half && self.norm1.is_none() && self.dropout.is_none() {
            return self.conv1.forward_relu_up(xs);
        }
        if half {
            let low = xs.pop().expect("an up-sampled part");
            xs.push(upsample(low, false, false));
        }
        self.layer(xs, &self.conv1, &self.norm1)
    }

    /// `forward_parts` and the 2x max pooling of its output (an encoder node's output and the
    /// input of the node below it): pooled as the last convolution stores, where the ReLU
    /// follows that convolution directly (BatchNorm folded or absent, no dropout).
    pub fn forward_parts_pooled(&self, xs: Vec<Tensor<D>>) -> (Tensor<D>, Tensor<D>) {
        let y = self.first(xs, false);
        if self.norm2.is_none() && self.dropout.is_none() {
            return self.conv2.forward_relu_pool(vec![y]);
        }
        let y = self.layer(vec![y], &self.conv2, &self.norm2);
        (y.clone(), max_pool(y))
    }

    /// head(forward_parts(xs, half)) for a node that nothing but its head reads: its output is never
    /// stored where the head can be summed as the last convolution computes it (as for
    /// `forward_parts_pooled`).
    pub fn forward_parts_head(&self, xs: Vec<Tensor<D>>, half: bool, head: &Conv<D>) -> Tensor<D> {
        let y = self.first(xs, half);
        if self.norm2.is_none() && self.dropout.is_none() {
            return self.conv2.forward_relu_head(vec![y], head);
        }
        head.forward(self.layer(vec![y], &self.conv2, &self.norm2))
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
