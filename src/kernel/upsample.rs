//! 2x (bi/tri)linear up-sampling with PyTorch's `align_corners=False`, and its adjoint, on
//! contiguous N C (D) H W f32 data. The interpolation is separable and at scale 2 every output
//! is 0.75·(nearest input) + 0.25·(next input on that side, edge-clamped), so each axis is one
//! streaming pass; burn Flex computes general source coordinates per element instead.

use super::cpu;
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Splits a contiguous shape at `axis` into (outer, len, inner).
fn split(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    (shape[..axis].iter().product(), shape[axis], shape[axis + 1..].iter().product())
}

/// The two outputs around input `c`: 0.75 of it plus 0.25 of its low / high neighbour.
fn lerp(c: f32, n: f32) -> f32 {
    0.75 * c + 0.25 * n
}

/// `lerp` over slices: even[j], odd[j] from c[j] and its neighbours l[j], h[j].
fn blend(c: &[f32], l: &[f32], h: &[f32], even: &mut [MaybeUninit<f32>], odd: &mut [MaybeUninit<f32>]) {
    let n = c.len();
    let (l, h, even, odd) = (&l[..n], &h[..n], &mut even[..n], &mut odd[..n]);
    for j in 0..n {
        even[j].write(lerp(c[j], l[j]));
        odd[j].write(lerp(c[j], h[j]));
    }
}

/// Doubles `axis` of `x` (shape `shape`).
fn along(x: &[f32], shape: &[usize], axis: usize) -> Vec<f32> {
    let (_, len, inner) = split(shape, axis);
    // SAFETY: chunk k (input slab k) writes its 2·len·inner outputs, every row pair once.
    unsafe {
        cpu::par_written(x.len() * 2, 2 * len * inner, |k, y| {
            let x = &x[k * len * inner..][..len * inner];
            for i in 0..len {
                let (lo, hi) = (i.saturating_sub(1), (i + 1).min(len - 1));
                let (c, l, h) = (&x[i * inner..][..inner], &x[lo * inner..][..inner], &x[hi * inner..][..inner]);
                let (even, odd) = y[2 * i * inner..][..2 * inner].split_at_mut(inner);
                blend(c, l, h, even, odd);
            }
        })
    }
}

/// The adjoint of `along`: `dy` has `axis` doubled relative to `shape`.
fn along_adjoint(dy: &[f32], shape: &[usize], axis: usize) -> Vec<f32> {
    let (outer, len, inner) = split(shape, axis);
    let mut dx = vec![0.0; dy.len() / 2];
    dx.par_chunks_mut(len * inner)
        .zip(dy.par_chunks(2 * len * inner))
        .with_min_len(outer.div_ceil(64).max(1))
        .for_each(|(dx, dy)| {
            for i in 0..len {
                let (lo, hi) = (i.saturating_sub(1), (i + 1).min(len - 1));
                let (even, odd) = dy[2 * i * inner..][..2 * inner].split_at(inner);
                for j in 0..inner {
                    dx[i * inner + j] += 0.75 * (even[j] + odd[j]);
                    dx[lo * inner + j] += 0.25 * even[j];
                    dx[hi * inner + j] += 0.25 * odd[j];
                }
            }
        });
    dx
}

/// One 2D plane (h x w) to (2h x 2w): each input row is widened once into a scratch row, and
/// output rows blend two widened rows, so the whole plane is one pass over memory.
fn plane2d(x: &[f32], h: usize, w: usize, y: &mut [MaybeUninit<f32>]) {
    plane_rows(x, h, w, (0, 2 * h), &mut Vec::new(), y);
}

/// Rows r0..r1 of the up-sampling of one 2D plane (h x w to 2h x 2w) into `y` ((r1 - r0) x 2w):
/// the input rows they draw on are widened once into `wide` (scratch, reused across calls), and
/// each output row blends two of them. The Winograd kernel calls it for the rows one unit of
/// work transforms, so that an up-sampled input is never stored whole.
pub fn plane_rows(
    x: &[f32],
    h: usize,
    w: usize,
    rows: (usize, usize),
    wide: &mut Vec<f32>,
    y: &mut [MaybeUninit<f32>],
) {
    #[cfg(target_arch = "x86_64")]
    if cpu::avx512() {
        // SAFETY: AVX-512F is present (checked above).
        return unsafe { plane_rows_avx512(x, h, w, rows, wide, y) };
    }
    plane_rows_any(x, h, w, rows, wide, y)
}

/// `plane_rows` compiled for AVX-512: the crate's baseline (SSE2) ran its loops 4 floats wide.
///
/// # Safety
/// The CPU runs AVX-512F (the rest is `plane_rows_any`'s, checked there).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn plane_rows_avx512(
    x: &[f32],
    h: usize,
    w: usize,
    rows: (usize, usize),
    wide: &mut Vec<f32>,
    y: &mut [MaybeUninit<f32>],
) {
    plane_rows_any(x, h, w, rows, wide, y)
}

#[inline(always)]
fn plane_rows_any(
    x: &[f32],
    h: usize,
    w: usize,
    (r0, r1): (usize, usize),
    wide: &mut Vec<f32>,
    y: &mut [MaybeUninit<f32>],
) {
    assert!(r0 < r1 && r1 <= 2 * h && y.len() == (r1 - r0) * 2 * w && x.len() == h * w);
    // The edge columns clamp; the interior runs over windows of three (vectorised; clamping
    // every index kept this loop scalar). A function, not a closure, so that it is inlined into
    // (and compiled for) the AVX-512 caller.
    #[inline(always)]
    fn widen(r: &[f32], out: &mut [f32]) {
        let w = r.len();
        let edge = |i: usize, out: &mut [f32]| {
            let (l, c, hi) = (r[i.saturating_sub(1)], r[i], r[(i + 1).min(w - 1)]);
            out[2 * i] = lerp(c, l);
            out[2 * i + 1] = lerp(c, hi);
        };
        edge(0, out);
        for (o, win) in out[2..].chunks_exact_mut(2).zip(r.windows(3)) {
            o[0] = lerp(win[1], win[0]);
            o[1] = lerp(win[1], win[2]);
        }
        edge(w - 1, out);
    }
    // Output row r draws on input rows r / 2 and its neighbour (below for even r, above for odd).
    let (lo, hi) = ((r0 / 2).saturating_sub(1), ((r1 - 1) / 2 + 2).min(h));
    wide.resize(2 * w * (hi - lo), 0.0);
    for (r, out) in x[lo * w..hi * w].chunks(w).zip(wide.chunks_mut(2 * w)) {
        widen(r, out);
    }
    let row = |i: usize| &wide[(i - lo) * 2 * w..][..2 * w];
    for (k, out) in y.chunks_mut(2 * w).enumerate() {
        let (r, i) = (r0 + k, (r0 + k) / 2);
        let near = if r % 2 == 0 { i.saturating_sub(1) } else { (i + 1).min(h - 1) };
        for ((o, &c), &n) in out.iter_mut().zip(row(i)).zip(row(near)) {
            o.write(lerp(c, n));
        }
    }
}

/// The adjoint of `plane2d`: `dy` is (2h x 2w), `dx` (h x w). Input row i collects output rows
/// 2i and 2i+1 (0.75 each) and its neighbours' near rows (0.25), edge-clamped; each collected
/// row is narrowed the same way along the width. One pass over `dy`, no scatter.
fn plane2d_adjoint(dy: &[f32], h: usize, w: usize, dx: &mut [MaybeUninit<f32>]) {
    #[cfg(target_arch = "x86_64")]
    if cpu::avx512() {
        // SAFETY: AVX-512F is present (checked above).
        return unsafe { plane2d_adjoint_avx512(dy, h, w, dx) };
    }
    plane2d_adjoint_any(dy, h, w, dx)
}

/// `plane2d_adjoint` compiled for AVX-512 (as `plane_rows_avx512`).
///
/// # Safety
/// The CPU runs AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn plane2d_adjoint_avx512(dy: &[f32], h: usize, w: usize, dx: &mut [MaybeUninit<f32>]) {
    plane2d_adjoint_any(dy, h, w, dx)
}

#[inline(always)]
fn plane2d_adjoint_any(dy: &[f32], h: usize, w: usize, dx: &mut [MaybeUninit<f32>]) {
    let row = |i: usize| &dy[i * 2 * w..][..2 * w];
    let mut t = vec![0.0f32; 2 * w];
    for (i, out) in dx.chunks_mut(w).enumerate() {
        // Even output row 2i' draws 0.25 from input row max(i'-1, 0), odd row 2i'+1 from
        // min(i'+1, h-1): row i gets it from rows 2i+2 and 2i-1, and at the edges from its own.
        let next = if i + 1 < h { row(2 * i + 2) } else { row(2 * i + 1) };
        let prev = if i > 0 { row(2 * i - 1) } else { row(0) };
        let (even, odd) = (row(2 * i), row(2 * i + 1));
        for j in 0..2 * w {
            t[j] = 0.75 * (even[j] + odd[j]) + 0.25 * (next[j] + prev[j]);
        }
        for (j, d) in out.iter_mut().enumerate() {
            let next = if j + 1 < w { t[2 * j + 2] } else { t[2 * j + 1] };
            let prev = if j > 0 { t[2 * j - 1] } else { t[0] };
            d.write(0.75 * (t[2 * j] + t[2 * j + 1]) + 0.25 * (next + prev));
        }
    }
}

/// Up-samples every spatial axis (2 or 3 of them after N, C) by 2: (H, W) planes first, then
/// the depth axis of 3D volumes.
pub fn forward(x: &[f32], shape: &[usize]) -> Vec<f32> {
    let (h, w) = (shape[shape.len() - 2], shape[shape.len() - 1]);
    // SAFETY: `plane2d` writes every element of its (2h x 2w) plane.
    let y = unsafe { cpu::par_written(x.len() * 4, 4 * h * w, |k, y| plane2d(&x[k * h * w..][..h * w], h, w, y)) };
    if shape.len() == 4 {
        return y;
    }
    let mut wide = shape.to_vec();
    wide[3] *= 2;
    wide[4] *= 2;
    along(&y, &wide, 2)
}

/// The gradient of `forward` w.r.t. its input (shape = the input's shape): the depth axis
/// first (the adjoints commute), then each (H, W) plane.
pub fn backward(dy: &[f32], shape: &[usize]) -> Vec<f32> {
    let (h, w) = (shape[shape.len() - 2], shape[shape.len() - 1]);
    let narrowed;
    let dy = if shape.len() == 5 {
        let mut wide = shape.to_vec();
        wide[3] *= 2;
        wide[4] *= 2;
        narrowed = along_adjoint(dy, &wide, 2);
        &narrowed[..]
    } else {
        dy
    };
    // SAFETY: `plane2d_adjoint` writes every element of its (h x w) plane.
    unsafe {
        cpu::par_written(dy.len() / 4, h * w, |k, dx| plane2d_adjoint(&dy[k * 4 * h * w..][..4 * h * w], h, w, dx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_hand_computed_values() {
        // One row [1, 2, 4]: outputs at source positions -0.25, 0.25, 0.75, 1.25, 1.75, 2.25.
        // Height 1 clamps, so both output rows equal the interpolated row.
        let y = forward(&[1.0, 2.0, 4.0], &[1, 1, 1, 3]);
        let row = [1.0, 1.25, 1.75, 2.5, 3.5, 4.0];
        assert_eq!(y, [row, row].concat());
    }

    #[test]
    fn backward_is_the_adjoint() {
        adjoint(&[2, 3, 3, 4, 5]);
        adjoint(&[2, 3, 6, 5]);
        adjoint(&[1, 2, 1, 1]);
        adjoint(&[1, 1, 1, 3, 1]);
    }

    fn adjoint(shape: &[usize]) {
        let n: usize = shape.iter().product();
        let x: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
        let dy: Vec<f32> = (0..n << (shape.len() - 2)).map(|i| ((i * 53 % 97) as f32 / 48.0) - 1.0).collect();
        let y = forward(&x, shape);
        let dx = backward(&dy, shape);
        let a: f64 = y.iter().zip(&dy).map(|(&a, &b)| a as f64 * b as f64).sum();
        let b: f64 = x.iter().zip(&dx).map(|(&a, &b)| a as f64 * b as f64).sum();
        assert!((a - b).abs() < 1e-6 * a.abs().max(1.0), "{a} vs {b}");
    }
}
