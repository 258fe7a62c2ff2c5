//! Training-mode BatchNorm (batch statistics) with the ReLU that follows it, on contiguous
//! N C (D) H W f32 data. burn's generic version records a dozen full-tensor passes (two of them
//! transposing copies) plus the ReLU's own; here the statistics are one pass, the normalisation
//! with ReLU one, and the backward two (the ReLU mask is recomputed from the input, so the
//! normalised activation is never stored).

use super::cpu;
use rayon::prelude::*;

/// The layout: `n` images of `c` channel planes of `p` values.
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    pub n: usize,
    pub c: usize,
    pub p: usize,
}

impl Layout {
    /// The planes of channel `ch`, one per image.
    fn planes<'a>(&self, x: &'a [f32], ch: usize) -> impl Iterator<Item = &'a [f32]> + 'a {
        let (c, p) = (self.c, self.p);
        (0..self.n).map(move |i| &x[(i * c + ch) * p..][..p])
    }

    fn count(&self) -> f64 {
        (self.n * self.p) as f64
    }
}

/// Sums of K values per element pair (a[i], b[i]) in f64, vectorised: 16 f32 lanes per value
/// over runs of 1024 elements (64 terms per lane), the runs added in f64. A plain f32 fold is a
/// chain of dependent adds, one per 4 cycles, and does not vectorise (no reassociation).
pub(crate) fn lane_sums<const K: usize>(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> [f32; K]) -> [f64; K] {
    assert_eq!(a.len(), b.len());
    let mut total = [0.0f64; K];
    for (a, b) in a.chunks(1024).zip(b.chunks(1024)) {
        let mut acc = [[0.0f32; 16]; K];
        let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
        let (ra, rb) = (ca.remainder(), cb.remainder());
        for (a, b) in ca.zip(cb) {
            for j in 0..16 {
                let v = f(a[j], b[j]);
                for k in 0..K {
                    acc[k][j] += v[k];
                }
            }
        }
        for (&a, &b) in ra.iter().zip(rb) {
            let v = f(a, b);
            for k in 0..K {
                acc[k][0] += v[k];
            }
        }
        for k in 0..K {
            total[k] += acc[k].iter().map(|&v| v as f64).sum::<f64>();
        }
    }
    total
}

/// Per channel: the mean and the biased variance (what burn's `batch_norm_train` returns).
/// Sums run in f64 (`lane_sums`), so E[x²] - E[x]² does not cancel at f32 precision.
pub fn stats(l: Layout, x: &[f32]) -> (Vec<f32>, Vec<f32>) {
    assert_eq!(x.len(), l.n * l.c * l.p);
    let sums: Vec<(f64, f64)> = (0..l.c)
        .into_par_iter()
        .map(|ch| {
            l.planes(x, ch).fold((0.0, 0.0), |(s, q), plane| {
                let [a, b] = lane_sums(plane, plane, |v, _| [v, v * v]);
                (s + a, q + b)
            })
        })
        .collect();
    let m = l.count();
    sums.iter()
        .map(|&(s, q)| {
            let mean = s / m;
            (mean as f32, (q / m - mean * mean).max(0.0) as f32)
        })
        .unzip()
}

/// One BatchNorm's affine parameters and batch statistics (per channel), and whether ReLU follows.
pub struct Norm<'a> {
    pub gamma: &'a [f32],
    pub beta: &'a [f32],
    pub mean: &'a [f32],
    pub var: &'a [f32],
    pub eps: f64,
    pub relu: bool,
}

impl Norm<'_> {
    /// Per channel scale and shift of the normalisation (y = a·x + b), and the output's floor
    /// (0 with ReLU).
    fn affine(&self) -> (Vec<f32>, Vec<f32>, f32) {
        let (a, b) = (0..self.gamma.len())
            .map(|ch| {
                let a = self.gamma[ch] as f64 / (self.var[ch] as f64 + self.eps).sqrt();
                (a as f32, (self.beta[ch] as f64 - self.mean[ch] as f64 * a) as f32)
            })
            .unzip();
        (a, b, if self.relu { 0.0 } else { f32::NEG_INFINITY })
    }
}

/// The gradient the ReLU passes back: dy where its input a·x + b was above the floor.
fn gate(a: f32, b: f32, lo: f32, x: f32, dy: f32) -> f32 {
    if a * x + b > lo { dy } else { 0.0 }
}

/// gamma · (x - mean) / sqrt(var + eps) + beta, then max(0, .) when `relu`.
pub fn forward(l: Layout, x: &[f32], norm: &Norm) -> Vec<f32> {
    let (a, b, lo) = norm.affine();
    // SAFETY: each chunk is one plane, written whole.
    unsafe {
        cpu::par_written(x.len(), l.p, |plane, y| {
            let (a, b) = (a[plane % l.c], b[plane % l.c]);
            for (y, &x) in y.iter_mut().zip(&x[plane * l.p..][..l.p]) {
                y.write((a * x + b).max(lo));
            }
        })
    }
}

/// Gradients of `forward` with the batch statistics as functions of `x`: (dx, dgamma, dbeta).
/// With g = dy masked by the ReLU and x̂ the normalised input,
/// dx = gamma / sqrt(var + eps) · (g - mean(g) - x̂ · mean(g · x̂)), dgamma = Σ g · x̂, dbeta = Σ g.
pub fn backward(l: Layout, x: &[f32], dy: &[f32], norm: &Norm) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    assert!(x.len() == dy.len() && x.len() == l.n * l.c * l.p);
    let (a, b, lo) = norm.affine();
    let inv_std: Vec<f32> = norm.var.iter().map(|&v| (1.0 / (v as f64 + norm.eps).sqrt()) as f32).collect();
    let sums: Vec<(f64, f64)> = (0..l.c)
        .into_par_iter()
        .map(|ch| {
            let (m, r, a, b) = (norm.mean[ch], inv_std[ch], a[ch], b[ch]);
            l.planes(x, ch).zip(l.planes(dy, ch)).fold((0.0, 0.0), |(s, q), (x, dy)| {
                let [gs, gx] = lane_sums(x, dy, |x, dy| {
                    let g = gate(a, b, lo, x, dy);
                    [g, g * (x - m) * r]
                });
                (s + gs, q + gx)
            })
        })
        .collect();
    let m = l.count();
    let dbeta: Vec<f32> = sums.iter().map(|s| s.0 as f32).collect();
    let dgamma: Vec<f32> = sums.iter().map(|s| s.1 as f32).collect();
    // SAFETY: each chunk is one plane, written whole.
    let dx = unsafe {
        cpu::par_written(x.len(), l.p, |plane, dx| {
            let ch = plane % l.c;
            let (x, dy) = (&x[plane * l.p..][..l.p], &dy[plane * l.p..][..l.p]);
            let (mu, r, a, b) = (norm.mean[ch], inv_std[ch], a[ch], b[ch]);
            let (mg, mgx) = ((sums[ch].0 / m) as f32, (sums[ch].1 / m) as f32);
            let k = norm.gamma[ch] * r;
            for ((dx, &x), &dy) in dx.iter_mut().zip(x).zip(dy) {
                dx.write(k * (gate(a, b, lo, x, dy) - mg - (x - mu) * r * mgx));
            }
        })
    };
    (dx, dgamma, dbeta)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hand-computed: one channel of [1, 2, 3, 6] has mean 3 and biased variance 3.5; with
    /// gamma 2, beta -1 and eps 0 the output is 2·(x - 3)/sqrt(3.5) - 1, ReLU'd.
    #[test]
    fn forward_matches_hand_computed_values() {
        let l = Layout { n: 2, c: 1, p: 2 };
        let x = [1.0, 2.0, 3.0, 6.0];
        let (mean, var) = stats(l, &x);
        assert_eq!((mean[0], var[0]), (3.0, 3.5));
        let y = forward(l, &x, &Norm { gamma: &[2.0], beta: &[-1.0], mean: &mean, var: &var, eps: 0.0, relu: true });
        let s = 3.5f32.sqrt();
        let want = [0.0, 0.0, 0.0, 2.0 * 3.0 / s - 1.0];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{y:?}");
        }
    }

    /// The backward against central differences of the loss sum(r · forward(x)), statistics
    /// recomputed from x each time, in f64 arithmetic on a small case.
    #[test]
    fn backward_matches_finite_differences() {
        let l = Layout { n: 2, c: 3, p: 5 };
        let len = l.n * l.c * l.p;
        let x: Vec<f32> = (0..len).map(|i| ((i * 37 % 29) as f32 / 7.0) - 2.0).collect();
        let r: Vec<f32> = (0..len).map(|i| ((i * 53 % 31) as f32 / 15.0) - 1.0).collect();
        let (gamma, beta) = ([1.5f32, -0.7, 0.9], [0.3f32, 0.1, -0.2]);
        let eps = 1e-5;
        for relu in [false, true] {
            let loss = |x: &[f32], gamma: &[f32], beta: &[f32]| -> f64 {
                let (mean, var) = stats(l, x);
                let y = forward(l, x, &Norm { gamma, beta, mean: &mean, var: &var, eps, relu });
                y.iter().zip(&r).map(|(&a, &b)| a as f64 * b as f64).sum()
            };
            let (mean, var) = stats(l, &x);
            let norm = Norm { gamma: &gamma, beta: &beta, mean: &mean, var: &var, eps, relu };
            let (dx, dgamma, dbeta) = backward(l, &x, &r, &norm);
            let h = 1e-2f32;
            let numeric = |f: &dyn Fn(f32) -> f64| (f(h) - f(-h)) / (2.0 * h as f64);
            for i in 0..len {
                let d = numeric(&|e| {
                    let mut x = x.clone();
                    x[i] += e;
                    loss(&x, &gamma, &beta)
                });
                assert!((d - dx[i] as f64).abs() < 2e-2 * d.abs().max(0.1), "dx[{i}] {d} vs {} relu {relu}", dx[i]);
            }
            for ch in 0..l.c {
                let dg = numeric(&|e| {
                    let mut g = gamma;
                    g[ch] += e;
                    loss(&x, &g, &beta)
                });
                let db = numeric(&|e| {
                    let mut b = beta;
                    b[ch] += e;
                    loss(&x, &gamma, &b)
                });
                assert!((dg - dgamma[ch] as f64).abs() < 2e-2 * dg.abs().max(0.1), "dgamma {dg} vs {}", dgamma[ch]);
                assert!((db - dbeta[ch] as f64).abs() < 2e-2 * db.abs().max(0.1), "dbeta {db} vs {}", dbeta[ch]);
            }
        }
    }
}
