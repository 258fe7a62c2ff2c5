//! A training step of the planned model, measured on this machine: the step `train` runs
//! ([`crate::train::step`]: forward, deep-supervision loss, backward, Adam) on random patches of
//! the planned batch and size, after one step of warm-up (allocations, kernel selection).

use std::time::Instant;

use burn::prelude::*;

use crate::backend::Backend;
use crate::model::ModelConfig;

/// Steps timed after the warm-up; their mean is the plan's step time.
pub const TIMED_STEPS: usize = 2;

/// Seconds one training step of `model` takes at `batch` patches of `patch` voxels.
pub fn step_seconds(model: &ModelConfig, batch: usize, patch: [usize; 3], backend: Backend) -> anyhow::Result<f64> {
    model.validate()?;
    let voxels: usize = patch[3 - model.dims..].iter().product();
    crate::limits::ensure_memory(model.training_bytes(voxels, batch), || {
        format!(
            "timing a training step of the plan (batch {batch}, patch {})",
            crate::model::fmt_size(patch, model.dims)
        )
    })?;
    Ok(crate::for_rank!(model.dims, time(model, batch, patch, backend)))
}

fn time<const D: usize>(cfg: &ModelConfig, batch: usize, patch: [usize; 3], backend: Backend) -> f64 {
    let device = backend.device();
    device.seed(0);
    let ad = backend.training_device();
    let dims = crate::data::patch::batch_dims::<D>(batch, cfg.in_channels, patch);
    let target = crate::data::patch::batch_dims::<D>(batch, cfg.classes, patch);
    let x = Tensor::<D>::random(dims, burn::tensor::Distribution::Default, &ad);
    let y = Tensor::<D>::random(target, burn::tensor::Distribution::Bernoulli(0.3), &ad);
    let mut model = cfg.init::<D>(&ad);
    let mut optim = crate::optim::adam(1e-8);
    let mut seconds = vec![];
    for _ in 0..=TIMED_STEPS {
        let t = Instant::now();
        model = crate::train::step(model, &mut optim, 3e-4, x.clone(), y.clone()).0;
        seconds.push(t.elapsed().as_secs_f64());
    }
    seconds[1..].iter().sum::<f64>() / TIMED_STEPS as f64
}
