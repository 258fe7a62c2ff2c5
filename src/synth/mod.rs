//! Synthetic benchmarks made from real images: lung nodules placed in CT volumes
//! ([`nodules`], `unetpp synth nodules`; docs/nodules.md).
pub mod grid;
pub mod lung;
pub mod nodules;
pub mod shape;
