//! Project-owned CPU kernels, hooked into burn through its backend-extension mechanism: they run
//! when a tensor lives on Flex (with or without autodiff), and every other backend keeps burn's
//! own ops. Replaced are the stride-1 convolutions (node blocks, heads), the 2x linear
//! up-sampling, training BatchNorm + ReLU, 2^n max pooling and the inference sigmoid; see `conv`,
//! `winograd`, `direct`, `gemm`, `upsample`, `norm`, `pool` and `sigmoid` for why.
//!
//! The files form layers, each importing only from the layers below it (never in a circle):
//! - `ops`: the public operations on `Tensor`s, through `Dispatch` to `ext`'s trait;
//! - `autodiff` (with the backward types), then `flex`: the traits' implementations (the fused
//!   inference op is Flex's alone); `cache`, the inference weight cache; `tensors`, Flex tensors
//!   as slices; `ext`, the traits;
//! - `conv`: picks a convolution path per shape and CPU, and prepares its weights;
//! - the kernels on slices: `winograd`, `direct`, `gemm`, `upsample`, `pool`, `norm`, `sigmoid`;
//! - `cpu`: the AVX-512 check, geometry, aligned pooled buffers and parallel writes that all of
//!   them share.
//!
//! Every safe function that runs AVX-512 code asserts the CPU has it (`cpu::assert_avx512`, or
//! a branch on `cpu::avx512`); the `unsafe fn`s below it say what their callers guarantee.

mod autodiff;
mod cache;
mod conv;
mod cpu;
mod direct;
mod ext;
mod flex;
mod gemm;
mod norm;
mod ops;
mod pool;
mod sigmoid;
mod tensors;
mod upsample;
#[cfg(target_arch = "x86_64")]
mod winograd;
#[cfg(not(target_arch = "x86_64"))]
#[path = "winograd_none.rs"]
mod winograd;
#[cfg(target_arch = "x86_64")]
mod winograd3d;

#[cfg(test)]
mod testing;
#[cfg(test)]
mod tests;
#[cfg(all(test, target_arch = "x86_64"))]
mod winograd3d_tests;

pub use ext::KernelBackend;
pub use ops::{
    Out, Sink, batch_norm, conv_relu_fused, fuses, max_pool2x, same_conv, set_enabled, sigmoid, supported, upsample2x,
};
