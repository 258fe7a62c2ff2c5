//! Which compiled-in burn backend runs the model. Flex (pure Rust CPU) is always there;
//! `vulkan` (GPU through wgpu) and `tch` (libtorch) come with the cargo features of those names.

use burn::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    #[default]
    Flex,
    #[cfg(feature = "vulkan")]
    Vulkan,
    #[cfg(feature = "tch")]
    Tch,
    #[cfg(feature = "tch")]
    TchCuda,
}

impl Backend {
    pub fn device(self) -> Device {
        match self {
            Backend::Flex => Device::flex(),
            #[cfg(feature = "vulkan")]
            Backend::Vulkan => Device::vulkan(burn::tensor::DeviceKind::DefaultDevice),
            #[cfg(feature = "tch")]
            #[allow(deprecated)]
            Backend::Tch => Device::libtorch(),
            #[cfg(feature = "tch")]
            #[allow(deprecated)]
            Backend::TchCuda => Device::libtorch_cuda(0),
        }
    }
}

/// Tensors are allocated and freed by the hundred per step, most of them megabytes large. glibc
/// serves such sizes with fresh mmap pages (page faults, zeroed by the kernel on first touch) and
/// hands the top of its heap back after frees, so every step pays for the same memory again.
/// Keeping freed memory in the process instead (as PyTorch's caching allocator does) made the
/// forward pass 15-19% faster and training ~5% faster, peak memory unchanged (537 vs 541 MB).
/// The binary calls this once at start; a program embedding the library decides for itself.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; it is called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
    }
}

/// Makes the calling thread one of rayon's workers (the pool keeps its size: RAYON_NUM_THREADS
/// or one thread per CPU). Outside the pool, a thread hands every parallel section to the
/// workers and sleeps until they finish, so each kernel call woke two sleeping threads and put
/// the caller to sleep; at batch 1 of 96² those wake-ups were 12% of a forward pass (kernel
/// time in futex wake-ups), and joining the pool made the pass ~10% faster. PyTorch's and ONNX
/// Runtime's pools likewise count the calling thread. The binary calls this once at start, on
/// the thread that runs the model; it fails if rayon's global pool already exists.
pub fn join_thread_pool() -> Result<(), rayon::ThreadPoolBuildError> {
    rayon::ThreadPoolBuilder::new().use_current_thread().build_global()
}
