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
