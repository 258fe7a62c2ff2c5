//! UNet++ (Zhou et al., DLMIA 2018 / TMI 2019) for 2D and 3D medical image segmentation.
pub mod app;
pub mod backend;
pub mod bench;
pub mod checkpoint;
pub mod data;
pub mod experiment;
pub mod fsio;
pub mod import;
pub mod infer;
pub mod kernel;
pub mod loss;
pub mod metrics;
pub mod model;
pub mod optim;
pub mod output;
pub mod plot;
pub mod train;
