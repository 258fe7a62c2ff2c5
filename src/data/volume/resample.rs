//! Resampling volumes to a target spacing the way nnU-Net (v2, `default_resampling.py`) does, and
//! predictions back onto the original grid.
//!
//! All shapes and spacings here are in array order `[z, y, x]` (as [`super::Volume::shape`]);
//! [`super::Geometry`] keeps ITK's `x, y, z`, and [`resample_volume`] converts.
//!
//! nnU-Net's choices, reproduced exactly (tests/resample.rs compares against scipy/skimage):
//! - the new shape is `round(old_spacing / new_spacing * old_shape)` per axis, rounding half to
//!   even as Python's `round` does;
//! - voxel centres are aligned (skimage `resize`, scipy `zoom(grid_mode=True)`): output index `j`
//!   samples the input at `(j + 0.5) * n_in / n_out - 0.5`, values beyond the edge repeat it;
//! - images: cubic B-spline interpolation (order 3) with scipy's spline prefilter, so the result
//!   interpolates the samples; then clipped to the input's range as skimage's `clip=True` does;
//! - labels: each class's one-hot mask linearly interpolated (order 1), then the arg-max, ties to
//!   the higher label (nnU-Net assigns a class where its mask reaches 0.5, later classes
//!   overwriting earlier ones: the same wherever one class reaches 0.5; where none does, i.e.
//!   three or more classes meet, nnU-Net writes 0 and this writes the most likely class);
//! - probabilities: linear, so each voxel's probabilities still sum to 1;
//! - an anisotropic volume (largest spacing more than [`ANISO_THRESHOLD`] times the smallest, in
//!   the old spacing or else the new one, with a single coarsest axis) is interpolated as above
//!   within each slice across the coarse axis, and with nearest neighbour (order 0) along it, so
//!   distant slices are never blended.
//!
//! Every 1D interpolation is a linear map, built once per axis as sparse rows of weights
//! ([`AxisOp`]) and applied as separable passes, in parallel over lines or rows.

use anyhow::{bail, ensure};
use rayon::prelude::*;

/// nnU-Net's `ANISO_THRESHOLD`: a spacing ratio above which the coarse axis is kept apart.
pub const ANISO_THRESHOLD: f64 = 3.0;

/// The interpolation along one axis, as scipy's spline `order`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interp {
    Nearest,
    Linear,
    Cubic,
}

/// What the values are, which decides how they are interpolated (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Image,
    Labels,
    Probabilities,
}

/// One resampling from a grid to another: shapes and the axis kept apart, if any.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    pub from: [usize; 3],
    pub to: [usize; 3],
    /// The coarse axis interpolated with nearest neighbour, when the spacing is anisotropic.
    pub separate: Option<usize>,
}

/// Checks a spacing (array order) is finite and positive; `what` names it in the error.
pub fn check_spacing(spacing: [f64; 3], what: &str) -> anyhow::Result<()> {
    ensure!(
        spacing.iter().all(|s| s.is_finite() && *s > 0.0),
        "{what} {spacing:?} mm: every spacing must be a finite number greater than 0"
    );
    Ok(())
}

/// nnU-Net's `compute_new_shape`: `round(old_spacing / new_spacing * old_shape)` per axis.
pub fn new_shape(shape: [usize; 3], spacing: [f64; 3], target: [f64; 3], what: &str) -> anyhow::Result<[usize; 3]> {
    ensure!(shape.iter().all(|&n| n > 0), "{what}: shape {shape:?} is empty; there is nothing to resample");
    check_spacing(spacing, &format!("{what}: spacing"))?;
    check_spacing(target, "target spacing (--spacing)")?;
    let mut out = [0; 3];
    for a in 0..3 {
        let n = (spacing[a] / target[a] * shape[a] as f64).round_ties_even();
        ensure!(
            n >= 1.0,
            "{what}: {} voxels at {} mm along {} would become {n} at the target spacing {} mm; \
             choose a finer target spacing",
            shape[a],
            ["z", "y", "x"][a],
            spacing[a],
            target[a]
        );
        ensure!(
            n < 1e9,
            "{what}: target spacing {target:?} mm (z, y, x) would make {n} voxels along {}",
            ["z", "y", "x"][a]
        );
        out[a] = n as usize;
    }
    Ok(out)
}

/// nnU-Net's `get_do_separate_z` + `get_lowres_axis`: the single coarsest axis of the first of
/// `spacings` that is anisotropic, if any.
pub fn separate_axis(spacings: [[f64; 3]; 2]) -> Option<usize> {
    for s in spacings {
        let (max, min) = (s.iter().copied().fold(f64::MIN, f64::max), s.iter().copied().fold(f64::MAX, f64::min));
        if max / min > ANISO_THRESHOLD {
            let coarse: Vec<usize> = (0..3).filter(|&a| s[a] == max).collect();
            // Two equally coarse axes (e.g. 0.24, 1.25, 1.25 mm): nnU-Net resamples in 3D.
            return (coarse.len() == 1).then(|| coarse[0]);
        }
    }
    None
}

impl Plan {
    /// Resampling a `shape` volume at `spacing` to `target` spacing (mm, array order); `what`
    /// (a file name) prefixes errors. Refuses zero, negative or non-finite spacings, an empty
    /// shape, and a result that would not fit in memory (`crate::limits`).
    pub fn to_spacing(shape: [usize; 3], spacing: [f64; 3], target: [f64; 3], what: &str) -> anyhow::Result<Plan> {
        let to = new_shape(shape, spacing, target, what)?;
        let plan = Plan { from: shape, to, separate: separate_axis([spacing, target]) };
        let voxels: f64 = (0..3).map(|a| shape[a].max(to[a]) as f64).product();
        // The result plus two intermediate passes, in f32.
        crate::limits::ensure_memory(voxels * 4.0 * 3.0, || {
            format!(
                "resampling {what} from {shape:?} voxels at {spacing:?} mm to {to:?} at the target spacing {target:?} mm"
            )
        })?;
        Ok(plan)
    }

    /// The way back: from the grid [`Plan::to_spacing`] made (at `target`) onto the original
    /// (`spacing`), as nnU-Net's `resample_data_or_seg_to_shape` for predictions.
    pub fn inverse(&self) -> Plan {
        Plan { from: self.to, to: self.from, separate: self.separate }
    }

    pub fn is_identity(&self) -> bool {
        self.from == self.to
    }

    /// The interpolation along each axis for `kind`.
    fn interp(&self, kind: Kind) -> [Interp; 3] {
        let main = if kind == Kind::Image { Interp::Cubic } else { Interp::Linear };
        std::array::from_fn(|a| if self.separate == Some(a) { Interp::Nearest } else { main })
    }
}

/// Resamples `channels` planar volumes (`[c][z][y][x]`, `plan.from`) of images or
/// probabilities; labels go through [`resample_labels`].
pub fn resample(data: &[f32], channels: usize, plan: &Plan, kind: Kind) -> anyhow::Result<Vec<f32>> {
    let n: usize = plan.from.iter().product();
    ensure!(
        channels > 0 && data.len() == n * channels,
        "resample: {} values for {channels} x {:?}",
        data.len(),
        plan.from
    );
    if kind == Kind::Labels {
        bail!("resample: labels are resampled by resample_labels");
    }
    if plan.is_identity() {
        return Ok(data.to_vec());
    }
    let interp = plan.interp(kind);
    Ok(data.chunks(n).flat_map(|ch| resample_channel(ch, plan, interp, kind == Kind::Image)).collect())
}

/// One channel: the in-plane (or all) axes, clipped to the input's range as skimage does (per
/// slice when an axis is kept apart, since nnU-Net resizes each slice alone), then nearest
/// neighbour along the separate axis.
fn resample_channel(ch: &[f32], plan: &Plan, interp: [Interp; 3], clip: bool) -> Vec<f32> {
    let mut shape = plan.from;
    let mut v = ch.to_vec();
    let ranges = clip.then(|| match plan.separate {
        Some(a) => slice_ranges(ch, plan.from, a),
        None => vec![range(ch)],
    });
    // x first: its lines are contiguous; then y and z as whole rows.
    for a in [2, 1, 0].into_iter().filter(|&a| plan.separate != Some(a) && plan.from[a] != plan.to[a]) {
        v = pass(&v, &mut shape, a, plan.to[a], interp[a]);
    }
    if let Some(ranges) = ranges {
        let per_slice = plan.separate.map(|a| (a, shape));
        clip_to(&mut v, &ranges, per_slice);
    }
    if let Some(a) = plan.separate.filter(|&a| plan.from[a] != plan.to[a]) {
        v = pass(&v, &mut shape, a, plan.to[a], Interp::Nearest);
    }
    v
}

/// Resamples a label map (`plan.from`) by the arg-max of its classes' linearly interpolated
/// one-hot masks; no label absent from the input can appear.
pub fn resample_labels(mask: &[u8], plan: &Plan) -> anyhow::Result<Vec<u8>> {
    let n: usize = plan.from.iter().product();
    ensure!(mask.len() == n, "resample_labels: {} labels for a {:?} volume", mask.len(), plan.from);
    if plan.is_identity() {
        return Ok(mask.to_vec());
    }
    let mut present = [false; 256];
    mask.iter().for_each(|&l| present[l as usize] = true);
    let interp = plan.interp(Kind::Labels);
    let m: usize = plan.to.iter().product();
    let (mut best, mut out) = (vec![f32::NEG_INFINITY; m], vec![0u8; m]);
    for class in (0..=255u8).filter(|&c| present[c as usize]) {
        let onehot: Vec<f32> = mask.iter().map(|&l| (l == class) as u8 as f32).collect();
        let p = resample_channel(&onehot, plan, interp, false);
        out.par_iter_mut().zip(best.par_iter_mut()).zip(p.par_iter()).for_each(|((o, b), &p)| {
            // `>=`: ties go to the higher label, as nnU-Net's later classes overwrite earlier ones.
            if p >= *b {
                *b = p;
                *o = class;
            }
        });
    }
    Ok(out)
}

fn range(v: &[f32]) -> (f32, f32) {
    v.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &x| (lo.min(x), hi.max(x)))
}

/// The value range of each slice across `axis`.
fn slice_ranges(v: &[f32], shape: [usize; 3], axis: usize) -> Vec<(f32, f32)> {
    let mut r = vec![(f32::INFINITY, f32::NEG_INFINITY); shape[axis]];
    for (i, &x) in v.iter().enumerate() {
        let idx = [i / (shape[1] * shape[2]), i / shape[2] % shape[1], i % shape[2]][axis];
        r[idx] = (r[idx].0.min(x), r[idx].1.max(x));
    }
    r
}

/// Clips to one range, or to each slice's across the separate axis of `shape`.
fn clip_to(v: &mut [f32], ranges: &[(f32, f32)], per_slice: Option<(usize, [usize; 3])>) {
    match per_slice {
        None => v.par_iter_mut().for_each(|x| *x = x.clamp(ranges[0].0, ranges[0].1)),
        Some((axis, s)) => v.par_iter_mut().enumerate().for_each(|(i, x)| {
            let (lo, hi) = ranges[[i / (s[1] * s[2]), i / s[2] % s[1], i % s[2]][axis]];
            *x = x.clamp(lo, hi);
        }),
    }
}

/// One separable pass along `axis` of a `[z][y][x]` volume, to `n_out` samples; updates `shape`.
fn pass(v: &[f32], shape: &mut [usize; 3], axis: usize, n_out: usize, interp: Interp) -> Vec<f32> {
    let n_in = shape[axis];
    let op = AxisOp::new(n_in, n_out, interp);
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..].iter().product();
    let mut out = vec![0f32; outer * n_out * inner];
    if inner == 1 {
        out.par_chunks_mut(n_out).zip(v.par_chunks(n_in)).with_min_len(16).for_each(|(o, line)| {
            for (j, o) in o.iter_mut().enumerate() {
                let (start, w) = op.row(j);
                *o = w.iter().zip(&line[start..]).map(|(w, x)| w * x).sum();
            }
        });
    } else {
        out.par_chunks_mut(inner).enumerate().for_each(|(r, o)| {
            let (slab, j) = (r / n_out, r % n_out);
            let (start, w) = op.row(j);
            for (t, &w) in w.iter().enumerate() {
                let row = &v[(slab * n_in + start + t) * inner..][..inner];
                o.iter_mut().zip(row).for_each(|(o, x)| *o += w * x);
            }
        });
    }
    shape[axis] = n_out;
    out
}

/// Cubic weights smaller than this are dropped: the spline prefilter's infinite response decays
/// by 0.268 per sample, and what is cut changes results by far less than f32's precision of
/// typical intensities.
const TRIM: f64 = 1e-8;
/// Samples either side of an input sample whose cubic response is computed (0.268^37 ~ 1e-21).
const REACH: usize = 40;
/// scipy pads by 12 edge samples before the spline prefilter in `nearest` mode.
const NPAD: usize = 12;

/// A 1D resampling as sparse rows: output `j` is `sum_t weights[t] * input[start + t]`.
#[derive(Debug)]
pub struct AxisOp {
    starts: Vec<usize>,
    /// Row `j`'s weights are `weights[bounds[j]..bounds[j + 1]]`.
    bounds: Vec<usize>,
    weights: Vec<f32>,
}

impl AxisOp {
    pub fn new(n_in: usize, n_out: usize, interp: Interp) -> AxisOp {
        let scale = n_in as f64 / n_out as f64;
        // scipy's `zoom(grid_mode=True)` and nnU-Net's coordinate map, in the same operations.
        let coord = |j: usize| scale * (j as f64 + 0.5) - 0.5;
        let clamp = |c: f64| c.clamp(0.0, (n_in - 1) as f64);
        let rows: Vec<Vec<(usize, f64)>> = match interp {
            Interp::Nearest => (0..n_out).map(|j| vec![((clamp(coord(j)) + 0.5).floor() as usize, 1.0)]).collect(),
            Interp::Linear => (0..n_out)
                .map(|j| {
                    let c = clamp(coord(j));
                    let (i, t) = (c.floor() as usize, c - c.floor());
                    if i + 1 < n_in { vec![(i, 1.0 - t), (i + 1, t)] } else { vec![(i, 1.0)] }
                })
                .collect(),
            Interp::Cubic => cubic_rows(n_in, n_out, &coord),
        };
        let mut op = AxisOp { starts: Vec::with_capacity(n_out), bounds: vec![0], weights: Vec::new() };
        for row in rows {
            let keep = |&&(_, w): &&(usize, f64)| w.abs() > TRIM;
            let first = row.iter().position(|e| keep(&e)).unwrap_or(0);
            let last = row.iter().rposition(|e| keep(&e)).unwrap_or(0);
            op.starts.push(row[first].0);
            op.weights.extend(row[first..=last].iter().map(|&(_, w)| w as f32));
            op.bounds.push(op.weights.len());
        }
        op
    }

    fn row(&self, j: usize) -> (usize, &[f32]) {
        (self.starts[j], &self.weights[self.bounds[j]..self.bounds[j + 1]])
    }
}

/// The cubic-spline weights of every output on every input, as scipy computes the spline: the
/// line padded with 12 copies of each edge sample, prefiltered, then the B-spline evaluated.
/// Built from each input sample's impulse response on a window of [`REACH`] samples around it,
/// so the cost is linear in the line's length.
fn cubic_rows(n_in: usize, n_out: usize, coord: &dyn Fn(usize) -> f64) -> Vec<Vec<(usize, f64)>> {
    let mut rows = vec![Vec::new(); n_out];
    let scale = n_in as f64 / n_out as f64;
    for k in 0..n_in {
        let (lo, hi) = (k.saturating_sub(REACH), (k + REACH + 1).min(n_in));
        let pad_lo = if lo == 0 { NPAD } else { 0 };
        let pad_hi = if hi == n_in { NPAD } else { 0 };
        let mut line = vec![0.0f64; pad_lo + (hi - lo) + pad_hi];
        line[pad_lo + k - lo] = 1.0;
        if k == 0 {
            line[..pad_lo].fill(1.0);
        }
        if k + 1 == n_in {
            let len = line.len();
            line[len - pad_hi..].fill(1.0);
        }
        prefilter(&mut line);
        // Outputs whose four taps lie well inside the window; further ones get < 0.268^37.
        let near = (REACH - 3) as f64;
        let j_lo = (((k as f64 - near + 0.5) / scale - 0.5).ceil().max(0.0)) as usize;
        let j_hi = (((k as f64 + near + 0.5) / scale - 0.5).floor()).min(n_out as f64 - 1.0);
        if j_hi < 0.0 {
            continue;
        }
        for (j, row) in rows.iter_mut().enumerate().take(j_hi as usize + 1).skip(j_lo) {
            let p = coord(j) + pad_lo as f64 - lo as f64;
            let f = p.floor();
            let t = p - f;
            let w = bspline3_weights(t);
            let w = (0..4).map(|i| w[i] * line[f as usize - 1 + i]).sum::<f64>();
            row.push((k, w));
        }
    }
    rows
}

/// The cubic B-spline's weights on the taps `floor(p) - 1 ..= floor(p) + 2`, `t = p - floor(p)`.
fn bspline3_weights(t: f64) -> [f64; 4] {
    let s = 1.0 - t;
    [
        s * s * s / 6.0,
        (4.0 - 6.0 * t * t + 3.0 * t * t * t) / 6.0,
        (4.0 - 6.0 * s * s + 3.0 * s * s * s) / 6.0,
        t * t * t / 6.0,
    ]
}

/// scipy's cubic spline prefilter (`spline_filter1d`, order 3) with its mirror-symmetric
/// ("reflect") boundary, which `nearest` mode uses on the padded line.
fn prefilter(c: &mut [f64]) {
    let n = c.len();
    if n < 2 {
        return;
    }
    let z = 3f64.sqrt() - 2.0;
    let gain = (1.0 - z) * (1.0 - 1.0 / z);
    c.iter_mut().for_each(|v| *v *= gain);
    let zn = z.powi(n as i32);
    let c0 = c[0];
    let (mut sum, mut zi) = (c[0] + zn * c[n - 1], z);
    for i in 1..n {
        sum += zi * (c[i] + zn * c[n - 1 - i]);
        zi *= z;
    }
    c[0] = sum * z / (1.0 - zn * zn) + c0;
    for i in 1..n {
        c[i] += z * c[i - 1];
    }
    c[n - 1] *= z / (z - 1.0);
    for i in (0..n - 1).rev() {
        c[i] = z * (c[i + 1] - c[i]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply(op: &AxisOp, x: &[f32]) -> Vec<f32> {
        (0..op.starts.len()).map(|j| op.row(j).1.iter().zip(&x[op.row(j).0..]).map(|(w, x)| w * x).sum()).collect()
    }

    #[test]
    fn cubic_interpolates_its_samples_and_keeps_constants() {
        let x: Vec<f32> = (0..50).map(|i| ((i * 37 % 11) as f32) - 5.0).collect();
        let same = apply(&AxisOp::new(50, 50, Interp::Cubic), &x);
        assert!(same.iter().zip(&x).all(|(a, b)| (a - b).abs() < 1e-5), "{same:?}");
        for (n, m) in [(50, 17), (50, 123), (1, 4), (3, 1), (200, 7)] {
            let op = AxisOp::new(n, m, Interp::Cubic);
            let ones = apply(&op, &vec![1.0; n]);
            assert!(ones.iter().all(|v| (v - 1.0).abs() < 1e-6), "{n} -> {m}: {ones:?}");
            // Each output only reaches inputs near it: rows are short.
            assert!((0..m).all(|j| op.row(j).1.len() <= 36), "{n} -> {m}");
        }
    }

    #[test]
    fn nearest_and_linear_follow_pixel_centres() {
        // Downsampling by 2: centres fall between input pairs (linear averages them, nearest
        // takes the upper one as scipy's floor(c + 0.5) does).
        let x = [0.0, 2.0, 4.0, 6.0];
        assert_eq!(apply(&AxisOp::new(4, 2, Interp::Linear), &x), vec![1.0, 5.0]);
        assert_eq!(apply(&AxisOp::new(4, 2, Interp::Nearest), &x), vec![2.0, 6.0]);
        // Upsampling by 2: the outer samples repeat the edge (coordinates -0.25 and 3.25).
        assert_eq!(apply(&AxisOp::new(4, 8, Interp::Linear), &x), vec![0.0, 0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.0]);
    }

    #[test]
    fn shapes_round_half_to_even_and_anisotropy_picks_one_coarse_axis() {
        // 5 * 1 / 2 = 2.5 rounds to 2 in Python; 7 * 1 / 2 = 3.5 to 4.
        assert_eq!(new_shape([5, 7, 4], [1.0; 3], [2.0, 2.0, 1.0], "v").unwrap(), [2, 4, 4]);
        assert_eq!(separate_axis([[3.5, 1.0, 1.0], [1.0; 3]]), Some(0));
        assert_eq!(separate_axis([[1.0; 3], [1.0, 1.0, 3.1]]), Some(2));
        assert_eq!(separate_axis([[3.0, 1.0, 1.0], [1.0; 3]]), None, "a ratio of exactly 3 is not anisotropic");
        assert_eq!(separate_axis([[0.24, 1.25, 1.25], [1.0; 3]]), None, "two coarse axes: resampled in 3D");
    }

    #[test]
    fn images_are_clipped_to_their_range_per_slice_when_an_axis_is_apart() {
        // A step edge overshoots under a cubic spline; skimage clips to each slice's range.
        let shape = [2, 1, 8];
        let data: Vec<f32> = (0..16).map(|i| if i % 8 < 4 { 0.0 } else { 10.0 * (1 + i / 8) as f32 }).collect();
        let plan = Plan { from: shape, to: [2, 1, 13], separate: Some(0) };
        let out = resample(&data, 1, &plan, Kind::Image).unwrap();
        let (a, b) = out.split_at(13);
        assert!(a.iter().all(|v| (0.0..=10.0).contains(v)) && b.iter().all(|v| (0.0..=20.0).contains(v)), "{out:?}");
        assert!(b.iter().any(|&v| v > 10.0), "the second slice keeps its own range");
    }
}
