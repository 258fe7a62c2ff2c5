//! The kernels' burn backend extension: the operations the model calls through `Dispatch`,
//! which burn's `backend_extension` macro routes to the implementations for Flex (`flex`) and
//! Autodiff<Flex> (`autodiff`); other backends keep burn's own ops (`ops` never calls these for
//! them). `FusedBackend` is Flex's alone: with gradients, or where the kernel cannot fuse, a
//! layer is composed of the operations of `KernelBackend` instead (`ops::fuses` tells which).

use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend as BurnBackend, ExtensionType, backend_extension};

/// Input parts `same_conv` reads in place (UNet++ needs depth + 1 <= 6).
pub(super) const PARTS: usize = 6;

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

/// Where `conv_relu_fused` sends its output: stored as it is, stored and 2x max-pooled (an
/// encoder node's output and the input of the node below it), or only into a 1x1 convolution
/// (`weight` [classes, c_out, 1, ..], `bias`): a head on a node that nothing else reads.
#[derive(ExtensionType)]
pub enum Sink<B: BurnBackend> {
    Store,
    Pool,
    Head { weight: FloatTensor<B>, bias: FloatTensor<B> },
}

/// `conv_relu_fused`'s output: the stored output (or the head's), and with `Sink::Pool` its
/// pooling too.
#[derive(ExtensionType)]
pub enum Fused<B: BurnBackend> {
    One(FloatTensor<B>),
    Pooled(FloatTensor<B>, FloatTensor<B>),
}

#[backend_extension(Flex)]
pub trait FusedBackend: BurnBackend {
    /// relu(same_conv(x0..x5)) in one pass of the 2D Winograd kernel, only where it takes the
    /// geometry (`ops::fuses`): with `half`, the last used part is at half resolution and
    /// enters as its 2x linear up-sampling (align_corners = false), which is never stored;
    /// the output goes to `sink` as each tile row leaves the output transform.
    #[allow(clippy::too_many_arguments)]
    fn conv_relu_fused(
        x0: FloatTensor<Self>,
        x1: FloatTensor<Self>,
        x2: FloatTensor<Self>,
        x3: FloatTensor<Self>,
        x4: FloatTensor<Self>,
        x5: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        half: bool,
        #[extension_type] sink: Sink<Self>,
    ) -> Fused<Self>;
}
