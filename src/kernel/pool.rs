//! 2^n max pooling, stride 2 (floor: an odd last row, column or slice is dropped), on contiguous
//! N C (D) H W f32 data, and its gradient. burn Flex pools 3D as 2D plus a reduction and keeps
//! int64 argmax indices for the backward; here the backward finds each window's maximum again
//! in the input (which the convolution after the pool keeps anyway).

use super::cpu;
use std::mem::MaybeUninit;

/// The pooled volume: (depth pairs or 1, rows, columns) of one plane, and whether depth pools.
#[derive(Clone, Copy)]
struct Plane {
    d: usize,
    h: usize,
    w: usize,
    deep: bool,
}

impl Plane {
    fn of(shape: &[usize]) -> (usize, Self) {
        let planes = shape[0] * shape[1];
        let deep = shape.len() == 5;
        let d = if deep { shape[2] } else { 1 };
        let (h, w) = (shape[shape.len() - 2], shape[shape.len() - 1]);
        (planes, Self { d, h, w, deep })
    }

    fn len(&self) -> usize {
        self.d * self.h * self.w
    }

    fn out(&self) -> (usize, usize, usize) {
        (if self.deep { self.d / 2 } else { 1 }, self.h / 2, self.w / 2)
    }

    /// Where the input rows of output row (k, i) start, in PyTorch's scan order (depth, then
    /// row; columns 2j, 2j+1 within each), so that ties resolve to the first maximum as there.
    fn rows(&self, k: usize, i: usize) -> ([usize; 4], usize) {
        let at = |z: usize, r: usize| (z * self.h + r) * self.w;
        if self.deep {
            ([at(2 * k, 2 * i), at(2 * k, 2 * i + 1), at(2 * k + 1, 2 * i), at(2 * k + 1, 2 * i + 1)], 4)
        } else {
            ([at(0, 2 * i), at(0, 2 * i + 1), 0, 0], 2)
        }
    }
}

/// The output shape of `forward`.
pub fn pooled_shape(shape: &[usize]) -> Vec<usize> {
    shape.iter().enumerate().map(|(i, &s)| if i >= 2 { s / 2 } else { s }).collect()
}

pub fn forward(x: &[f32], shape: &[usize]) -> Vec<f32> {
    let (planes, pl) = Plane::of(shape);
    assert_eq!(x.len(), planes * pl.len());
    let (od, oh, ow) = pl.out();
    // SAFETY: every output row of every plane is written whole.
    unsafe {
        cpu::par_written(planes * od * oh * ow, od * oh * ow, |n, y| {
            let x = &x[n * pl.len()..][..pl.len()];
            for k in 0..od {
                for i in 0..oh {
                    let (starts, count) = pl.rows(k, i);
                    let out = &mut y[(k * oh + i) * ow..][..ow];
                    // The rows' element-wise maximum, then of column pairs: both vectorise (a
                    // window at a time was scalar code, 5% of a fast:1 forward pass).
                    for (j0, out) in (0..ow).step_by(64).zip(out.chunks_mut(64)) {
                        let mut m = [f32::NEG_INFINITY; 128];
                        let m = &mut m[..2 * out.len()];
                        for &s in &starts[..count] {
                            m.iter_mut().zip(&x[s + 2 * j0..]).for_each(|(a, &b)| *a = a.max(b));
                        }
                        for (o, pair) in out.iter_mut().zip(m.chunks_exact(2)) {
                            o.write(pair[0].max(pair[1]));
                        }
                    }
                }
            }
        })
    }
}

/// dL/dx: each output's gradient goes to the first maximum of its window, 0 elsewhere.
pub fn backward(x: &[f32], dy: &[f32], shape: &[usize]) -> Vec<f32> {
    let (planes, pl) = Plane::of(shape);
    let (od, oh, ow) = pl.out();
    assert!(x.len() == planes * pl.len() && dy.len() == planes * od * oh * ow);
    // SAFETY: each plane is zeroed whole, then window maxima are set.
    unsafe {
        cpu::par_written(x.len(), pl.len(), |n, dx: &mut [MaybeUninit<f32>]| {
            dx.fill(MaybeUninit::new(0.0));
            let (x, dy) = (&x[n * pl.len()..][..pl.len()], &dy[n * od * oh * ow..][..od * oh * ow]);
            for k in 0..od {
                for i in 0..oh {
                    let (starts, count) = pl.rows(k, i);
                    for j in 0..ow {
                        let mut best = starts[0] + 2 * j;
                        for &s in &starts[..count] {
                            for q in [s + 2 * j, s + 2 * j + 1] {
                                if x[q] > x[best] {
                                    best = q;
                                }
                            }
                        }
                        dx[best] = MaybeUninit::new(dy[(k * oh + i) * ow + j]);
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_2d_and_3d_by_hand() {
        // One 2x4 plane (a trailing odd column would be dropped): maxima 6 and 8.
        let x = [1.0, 6.0, 3.0, 2.0, 5.0, 4.0, 8.0, 7.0];
        assert_eq!(forward(&x, &[1, 1, 2, 4]), [6.0, 8.0]);
        let dx = backward(&x, &[10.0, 20.0], &[1, 1, 2, 4]);
        assert_eq!(dx, [0.0, 10.0, 0.0, 0.0, 0.0, 0.0, 20.0, 0.0]);
        // 2x2x2 volume: the maximum is in the second slice; a 3x3 plane drops its last row/column.
        let v: Vec<f32> = (0..8).map(|i| [3.0, 1.0, 2.0, 0.0, 4.0, 9.0, 5.0, 6.0][i]).collect();
        assert_eq!(forward(&v, &[1, 1, 2, 2, 2]), [9.0]);
        assert_eq!(backward(&v, &[1.0], &[1, 1, 2, 2, 2]), [0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0]);
        let odd: Vec<f32> = (0..9).map(|i| i as f32).collect();
        assert_eq!(forward(&odd, &[1, 1, 3, 3]), [4.0]);
        // Rows longer than the 64-output chunks, and an odd width: against the window maxima.
        let (h, w) = (4, 261);
        let x: Vec<f32> = (0..2 * h * w).map(|i| ((i * 7919) % 1013) as f32).collect();
        let want: Vec<f32> = (0..2 * (h / 2) * (w / 2))
            .map(|o| {
                let (p, i, j) = (o / ((h / 2) * (w / 2)), o / (w / 2) % (h / 2), o % (w / 2));
                let at = |r: usize, c: usize| x[p * h * w + (2 * i + r) * w + 2 * j + c];
                at(0, 0).max(at(0, 1)).max(at(1, 0)).max(at(1, 1))
            })
            .collect();
        assert_eq!(forward(&x, &[1, 2, h, w]), want);
        // Ties go to the first maximum in scan order.
        assert_eq!(backward(&[2.0, 2.0, 2.0, 2.0], &[1.0], &[1, 1, 2, 2]), [1.0, 0.0, 0.0, 0.0]);
    }
}
