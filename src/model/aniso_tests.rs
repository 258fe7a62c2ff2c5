//! Per-axis pooling and up-sampling (`layers::max_pool_by`, `layers::upsample_by`) against
//! PyTorch's `max_pool2d/3d` and `F.interpolate` at per-axis factors
//! (`scripts/aniso_refs.py` -> `tests/data/aniso/refs.json`), on our kernels and on burn's ops.

use burn::prelude::*;
use serde::Deserialize;

use super::layers::{max_pool_by, upsample_by};

#[derive(Deserialize)]
struct Case {
    op: String,
    shape: Vec<usize>,
    factor: [usize; 3],
    out: Vec<f32>,
}

#[derive(Deserialize)]
struct Refs {
    cases: Vec<Case>,
}

/// The script's input: ((i * 37) % 101) / 50 - 1, in f64 then rounded to f32 as torch.tensor does.
fn ramp<const D: usize>(shape: &[usize]) -> Tensor<D> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|i| (((i * 37) % 101) as f64 / 50.0 - 1.0) as f32).collect();
    let shape: [usize; D] = shape.try_into().unwrap();
    Tensor::<1>::from_floats(v.as_slice(), &Device::flex()).reshape(shape)
}

fn run<const D: usize>(c: &Case) -> Vec<f32> {
    let x = ramp::<D>(&c.shape);
    let y = match c.op.as_str() {
        "max_pool" => max_pool_by(x, c.factor),
        "nearest" => upsample_by(x, true, false, c.factor),
        _ => upsample_by(x, false, false, c.factor),
    };
    let want: Vec<usize> = c.shape.iter().enumerate().map(|(a, &s)| per_axis(c, a, s)).collect();
    assert_eq!(y.dims().to_vec(), want, "{} {:?}", c.op, c.factor);
    y.into_data().iter::<f32>().collect()
}

/// The output size of axis `a` (N, C untouched).
fn per_axis(c: &Case, a: usize, s: usize) -> usize {
    if a < 2 {
        return s;
    }
    let f = c.factor[a + 3 - c.shape.len()];
    if c.op == "max_pool" { s / f } else { s * f }
}

#[test]
fn per_axis_pooling_and_upsampling_match_pytorch() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/aniso/refs.json");
    let refs: Refs = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(refs.cases.len(), 24);
    for kernels in [true, false] {
        crate::kernel::set_enabled(kernels);
        for c in &refs.cases {
            let got = if c.shape.len() == 5 { run::<5>(c) } else { run::<4>(c) };
            assert_eq!(got.len(), c.out.len());
            // Maxima and nearest copies are exact; linear weights 0.25/0.75 round once or twice.
            let tol = if c.op == "max_pool" || c.op == "nearest" { 0.0 } else { 1e-6 };
            for (i, (a, b)) in got.iter().zip(&c.out).enumerate() {
                assert!((a - b).abs() <= tol, "{} {:?} kernels {kernels}: [{i}] {a} vs torch {b}", c.op, c.factor);
            }
        }
    }
    crate::kernel::set_enabled(true);
}
