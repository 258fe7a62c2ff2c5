//! Which compiled-in burn backend runs the model. Flex (pure Rust CPU) is always there;
//! `vulkan` (GPU through wgpu) and `tch` (libtorch) come with the cargo features of those names.

use burn::prelude::*;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
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
    /// The backends compiled in.
    pub const VALUES: &[Backend] = &[
        Backend::Flex,
        #[cfg(feature = "vulkan")]
        Backend::Vulkan,
        #[cfg(feature = "tch")]
        Backend::Tch,
        #[cfg(feature = "tch")]
        Backend::TchCuda,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Backend::Flex => "flex",
            #[cfg(feature = "vulkan")]
            Backend::Vulkan => "vulkan",
            #[cfg(feature = "tch")]
            Backend::Tch => "tch",
            #[cfg(feature = "tch")]
            Backend::TchCuda => "tch-cuda",
        }
    }

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

    /// The device a model trains on: this backend's with autodiff. On Flex, burn's balanced
    /// gradient checkpointing too: only compute-bound results (convolutions) are kept for the
    /// backward; memory-bound ones (BatchNorm + ReLU, up-sampling, pooling) are recomputed from
    /// them when the backward reaches them (`kernel::autodiff` says which are which). Per
    /// layer that keeps one activation instead of two, and no up-sampled decoder input.
    pub fn training_device(self) -> Device {
        let device = self.device().autodiff();
        match self {
            Backend::Flex => device.gradient_checkpointing(),
            #[allow(unreachable_patterns)]
            _ => device,
        }
    }
}

crate::names::by_name!(Backend, "--backend");

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

/// While the returned guard lives, rayon's other workers poll for work instead of going to
/// sleep between parallel sections. A model pass is dozens of kernel calls with burn's
/// bookkeeping in between; an idle worker sleeps after ~50 µs, and waking it (a futex call,
/// then a halted virtual CPU brought back) left the calling thread to start each section
/// alone: the other worker was asleep for 15% of a fast:1 pass. With the guard the pass was
/// 7-10% faster at fast:1 and batch 4, ~7% in accurate mode at batch 1 (OpenMP's and ONNX
/// Runtime's pools spin the same way). Only where the caller is one of the pool's threads
/// (see [`join_thread_pool`]); elsewhere it does nothing. The pollers spin on a CPU each, so the
/// guard covers model passes, not I/O.
pub fn busy_workers() -> BusyWorkers {
    let Some(me) = rayon::current_thread_index() else {
        return BusyWorkers(None);
    };
    let done = Arc::new(AtomicBool::new(false));
    for _ in 1..rayon::current_num_threads() {
        let done = done.clone();
        rayon::spawn(move || {
            // The caller may take a poller back from its own queue while it waits for a
            // section: it must not spin there (it is the thread that ends the polling).
            if rayon::current_thread_index() == Some(me) {
                return;
            }
            while !done.load(Ordering::Acquire) {
                if rayon::yield_now() != Some(rayon::Yield::Executed) {
                    std::hint::spin_loop();
                }
            }
        });
    }
    BusyWorkers(Some(done))
}

/// See [`busy_workers`]; dropping it lets the workers sleep again.
pub struct BusyWorkers(Option<Arc<AtomicBool>>);

impl Drop for BusyWorkers {
    fn drop(&mut self) {
        if let Some(done) = &self.0 {
            done.store(true, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use rayon::prelude::*;

    /// Sections under the guard see every worker, the caller taking a poller back from its own
    /// queue does not spin, and the pollers end with the guard (else `install` and the pool's
    /// drop would hang).
    #[test]
    fn busy_workers_end_with_the_guard() {
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let sums: Vec<u64> = pool.install(|| {
                (0..20)
                    .map(|_| {
                        let busy = super::busy_workers();
                        assert!(busy.0.is_some(), "inside a pool the guard polls");
                        (0..100_000u64).into_par_iter().map(|i| i % 7).sum()
                    })
                    .collect()
            });
            let want: u64 = (0..100_000u64).map(|i| i % 7).sum();
            assert!(sums.iter().all(|&s| s == want), "{threads} threads");
            assert!(super::busy_workers().0.is_none(), "outside a pool the guard does nothing");
        }
    }
}
