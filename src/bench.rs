//! Timing of the model itself (forward, fast modes, train step) on random data, medians after
//! warm-up, for comparison with the Python peers in `bench/peer.py` run on the same machine.

use std::time::Instant;

use burn::optim::{AdamConfig, GradientsParams};
use burn::prelude::*;
use serde::Serialize;

use crate::backend::Backend;
use crate::loss;
use crate::model::{Arch, Mode, ModelConfig, Preset};

#[derive(Clone, Debug, Serialize)]
pub struct Timing {
    pub case: String,
    pub median_ms: f64,
    pub min_ms: f64,
}

fn time(case: String, reps: usize, mut f: impl FnMut()) -> Timing {
    f(); // warm-up
    let mut v: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    v.sort_by(f64::total_cmp);
    Timing { case, median_ms: v[v.len() / 2], min_ms: v[0] }
}

/// Forward (accurate and fast:1..L), and a full training step, of the `modern` UNet++ L4.
pub fn run(reps: usize, sizes: &[(usize, [usize; 3])], dims: usize, train: bool, backend: Backend) -> Vec<Timing> {
    let cfg = ModelConfig { dims, ..ModelConfig::new(Arch::Unetpp, Preset::Modern, 4) };
    let mut out: Vec<Timing> = vec![];
    for &(batch, shape) in sizes {
        let label = if dims == 2 {
            format!("{batch}x1x{}x{}", shape[1], shape[2])
        } else {
            format!("{batch}x1x{}x{}x{}", shape[0], shape[1], shape[2])
        };
        match dims {
            2 => out.extend(bench_d::<4>(&cfg, batch, shape, reps, (train, backend), &label)),
            _ => out.extend(bench_d::<5>(&cfg, batch, shape, reps, (train, backend), &label)),
        }
    }
    out
}

fn bench_d<const D: usize>(
    cfg: &ModelConfig,
    batch: usize,
    shape: [usize; 3],
    reps: usize,
    (train, backend): (bool, Backend),
    label: &str,
) -> Vec<Timing> {
    let mut out = vec![];
    let device = backend.device();
    device.seed(0);
    let dims = crate::data::patch::batch_dims::<D>(batch, 1, shape);
    let model = cfg.init::<D>(&device);
    let x = Tensor::<D>::random(dims, burn::tensor::Distribution::Default, &device);
    for mode in std::iter::once(Mode::Accurate).chain((1..=cfg.depth).rev().map(Mode::Fast)) {
        out.push(time(format!("forward {mode} {label}"), reps, || {
            let p = model.predict(x.clone(), mode).unwrap();
            let _ = p.into_data();
        }));
    }
    if train {
        let ad = device.autodiff();
        let mut model = cfg.init::<D>(&ad);
        let mut optim = AdamConfig::new().with_epsilon(1e-8).init();
        let x = Tensor::<D>::random(dims, burn::tensor::Distribution::Default, &ad);
        let y = Tensor::<D>::random(dims, burn::tensor::Distribution::Bernoulli(0.3), &ad);
        out.push(time(format!("train step {label}"), reps, || {
            let l = loss::deep_supervision(model.forward(x.clone()), y.clone());
            let grads = GradientsParams::from_grads(l.backward(), &model);
            model = optim.step(3e-4, model.clone(), grads);
        }));
    }
    out
}
