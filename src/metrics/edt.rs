//! Exact squared Euclidean distance transform with anisotropic spacing (Felzenszwalb &
//! Huttenlocher, *Distance Transforms of Sampled Functions*, 2012): one 1D lower-envelope pass per
//! axis, each exact, so the result equals a brute-force search (and scipy's
//! `distance_transform_edt(~features, sampling=spacing) ** 2`).

use rayon::prelude::*;

/// Squared distance in physical units from every voxel of a `[z, y, x]` grid to the nearest voxel
/// where `feature` is true (0 on features); `f64::INFINITY` everywhere when there is none.
pub fn squared(feature: &[bool], shape: [usize; 3], spacing: [f64; 3]) -> Vec<f64> {
    squared_at(feature, shape, spacing, None)
}

/// [`squared`], exact only where `needed` is true (elsewhere any value): the last pass skips
/// the rows that hold no needed voxel.
pub fn squared_at(feature: &[bool], shape: [usize; 3], spacing: [f64; 3], needed: Option<&[bool]>) -> Vec<f64> {
    assert_eq!(feature.len(), shape.iter().product::<usize>());
    let [_, ny, nx] = shape;
    let plane = ny * nx;
    let mut d = along_z(feature, shape, spacing[0]);
    // y: per slice, columns gathered in blocks so that every cache line read is used.
    if ny > 1 {
        d.par_chunks_mut(plane).for_each(|slice| {
            const B: usize = 16;
            let mut scratch = Scratch::new(ny);
            let mut block = vec![0.0; B * ny];
            let mut out = vec![0.0; ny];
            for x0 in (0..nx).step_by(B) {
                let w = B.min(nx - x0);
                for y in 0..ny {
                    for b in 0..w {
                        block[b * ny + y] = slice[y * nx + x0 + b];
                    }
                }
                for b in 0..w {
                    let line = &block[b * ny..(b + 1) * ny];
                    if line.iter().all(|v| v.is_infinite()) {
                        continue;
                    }
                    scratch.transform(line, spacing[1], &mut out);
                    for y in 0..ny {
                        slice[y * nx + x0 + b] = out[y];
                    }
                }
            }
        });
    }
    // x: rows are contiguous.
    d.par_chunks_mut(nx).enumerate().for_each_init(
        || (Scratch::new(nx), vec![0.0; nx]),
        |(scratch, line), (r, row)| {
            if needed.is_some_and(|n| !n[r * nx..(r + 1) * nx].iter().any(|&v| v)) {
                return;
            }
            line.copy_from_slice(row);
            scratch.transform(line, spacing[2], row);
        },
    );
    d
}

/// The first pass, on the binary grid: the distance along z to the nearest feature in the same
/// (y, x) column, found by one sweep down and one up over whole slices (contiguous memory).
fn along_z(feature: &[bool], shape: [usize; 3], s: f64) -> Vec<f64> {
    let [nz, ny, nx] = shape;
    let plane = ny * nx;
    let mut d = vec![f64::INFINITY; feature.len()];
    let mut last = vec![usize::MAX; plane];
    for z in 0..nz {
        let (f, o) = (&feature[z * plane..(z + 1) * plane], &mut d[z * plane..(z + 1) * plane]);
        for i in 0..plane {
            if f[i] {
                last[i] = z;
            }
            if last[i] != usize::MAX {
                let t = (z - last[i]) as f64 * s;
                o[i] = t * t;
            }
        }
    }
    last.fill(usize::MAX);
    for z in (0..nz).rev() {
        let (f, o) = (&feature[z * plane..(z + 1) * plane], &mut d[z * plane..(z + 1) * plane]);
        for i in 0..plane {
            if f[i] {
                last[i] = z;
            }
            if last[i] != usize::MAX {
                let t = (last[i] - z) as f64 * s;
                o[i] = o[i].min(t * t);
            }
        }
    }
    d
}

/// The buffers of the lower envelope: parabola apexes `v` and the boundaries `z` between them.
struct Scratch {
    v: Vec<usize>,
    z: Vec<f64>,
}

impl Scratch {
    fn new(n: usize) -> Scratch {
        Scratch { v: vec![0; n], z: vec![0.0; n + 1] }
    }

    /// `out[p] = min_q (s (p - q))^2 + f[q]` over the finite `f[q]`.
    fn transform(&mut self, f: &[f64], s: f64, out: &mut [f64]) {
        let (v, z) = (&mut self.v, &mut self.z);
        let pos = |q: usize| q as f64 * s;
        // Where the parabolas of sites q and r (q > r) meet, in physical coordinates.
        let meet = |q: usize, r: usize| {
            let (xq, xr) = (pos(q), pos(r));
            ((f[q] + xq * xq) - (f[r] + xr * xr)) / (2.0 * (xq - xr))
        };
        let mut k: isize = -1;
        for (q, fq) in f.iter().enumerate() {
            if fq.is_infinite() {
                continue;
            }
            let mut x = f64::NEG_INFINITY;
            while k >= 0 {
                x = meet(q, v[k as usize]);
                if x <= z[k as usize] {
                    k -= 1;
                } else {
                    break;
                }
            }
            if k < 0 {
                x = f64::NEG_INFINITY;
            }
            k += 1;
            v[k as usize] = q;
            z[k as usize] = x;
            z[k as usize + 1] = f64::INFINITY;
        }
        if k < 0 {
            out.fill(f64::INFINITY);
            return;
        }
        let mut j = 0;
        for (p, o) in out.iter_mut().enumerate() {
            let x = pos(p);
            while z[j + 1] < x {
                j += 1;
            }
            let q = v[j];
            // From the integer offset, so the value does not depend on how the envelope was found.
            let d = (p as f64 - q as f64) * s;
            *o = d * d + f[q];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn brute(feature: &[bool], shape: [usize; 3], s: [f64; 3]) -> Vec<f64> {
        let idx = |i: usize| [i / (shape[1] * shape[2]), i / shape[2] % shape[1], i % shape[2]];
        (0..feature.len())
            .map(|i| {
                let a = idx(i);
                (0..feature.len())
                    .filter(|&j| feature[j])
                    .map(|j| {
                        let b = idx(j);
                        (0..3).map(|k| ((a[k] as f64 - b[k] as f64) * s[k]).powi(2)).sum::<f64>()
                    })
                    .fold(f64::INFINITY, f64::min)
            })
            .collect()
    }

    #[test]
    fn equals_brute_force_on_random_anisotropic_grids() {
        let mut seed = 12345u64;
        let mut rnd = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) as f64 / (1u64 << 31) as f64
        };
        for (shape, s, p) in [
            ([5, 7, 9], [2.5, 0.7, 1.3], 0.05),
            ([1, 13, 11], [1.0, 1.0, 0.5], 0.1),
            ([6, 1, 8], [3.0, 1.0, 1.0], 0.2),
            ([4, 6, 5], [1.0, 1.0, 1.0], 0.01),
        ] {
            let f: Vec<bool> = (0..shape.iter().product::<usize>()).map(|_| rnd() < p).collect();
            let want = brute(&f, shape, s);
            let got = squared(&f, shape, s);
            for (g, w) in got.iter().zip(&want) {
                assert!(g == w || (g - w).abs() <= 1e-9 * w, "{shape:?}: {g} vs {w}");
            }
        }
    }

    #[test]
    fn no_feature_is_infinitely_far() {
        assert!(squared(&[false; 6], [1, 2, 3], [1.0; 3]).iter().all(|v| v.is_infinite()));
    }

    #[test]
    fn a_point_in_a_line_by_hand() {
        let mut f = [false; 5];
        f[1] = true;
        assert_eq!(squared(&f, [1, 1, 5], [1.0, 1.0, 2.0]), vec![4.0, 0.0, 4.0, 16.0, 36.0]);
    }
}
