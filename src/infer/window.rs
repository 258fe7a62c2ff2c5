//! Sliding-window maths, as nnU-Net's `sliding_window_prediction.py`: where the windows go
//! (evenly spread steps of at most `(1 - overlap)` of a window) and how their predictions are
//! stitched (weighted by a Gaussian importance map, so that a voxel's value comes mostly from the
//! windows that see it near their centre, where the network has the most context). Nothing here
//! runs a model: [`stitch`] takes a closure that predicts a batch of windows.

/// nnU-Net's default: each window overlaps its neighbour by half.
pub const DEFAULT_OVERLAP: f64 = 0.5;

/// Windows predicted in one batch at most when `--window-batch` is not given: beyond a few,
/// a CPU batch only adds memory (the convolutions are already parallel within a window).
pub const MAX_AUTO_BATCH: usize = 4;

/// How inference covers an input: window size, overlap, mirroring, windows per batch.
#[derive(Clone, Debug, PartialEq)]
pub struct Sliding {
    /// Window size [depth, height, width] (depth 1 in 2D); shrunk to inputs smaller than it.
    pub tile: [usize; 3],
    /// Share of a window its neighbour overlaps, in [0, 1).
    pub overlap: f64,
    /// Average the predictions of every mirrored copy of each window ([`super::tta`]).
    pub tta: bool,
    /// Windows per model pass; `None`: as many as fit in memory, at most [`MAX_AUTO_BATCH`].
    pub batch: Option<usize>,
}

impl Sliding {
    /// Half-overlapping windows of `tile`, no mirroring, batch size from the memory available.
    pub fn new(tile: [usize; 3]) -> Sliding {
        Sliding { tile, overlap: DEFAULT_OVERLAP, tta: false, batch: None }
    }
}

/// Windows per batch when not asked for: as many as half the memory available holds at
/// `bytes_per_window` each ([`crate::model::ModelConfig::inference_bytes`]), at most
/// [`MAX_AUTO_BATCH`] and the number of `windows`; at least one.
pub fn auto_batch(bytes_per_window: f64, windows: usize) -> usize {
    let fit = match crate::limits::memory_limit() {
        Ok(Some((limit, _))) => (limit / 2.0 / bytes_per_window.max(1.0)) as usize,
        _ => 1,
    };
    fit.min(MAX_AUTO_BATCH).min(windows).max(1)
}

/// Refuses an overlap outside [0, 1), naming the option.
pub fn check_overlap(overlap: f64) -> anyhow::Result<()> {
    anyhow::ensure!(
        (0.0..1.0).contains(&overlap),
        "--overlap {overlap}: must be at least 0 and below 1 (the share of a window its neighbour overlaps; \
         default {DEFAULT_OVERLAP}, as nnU-Net)"
    );
    Ok(())
}

/// Window origins along an axis of `len` voxels for windows of `win`: nnU-Net's
/// `compute_steps_for_sliding_window` with `tile_step_size = 1 - overlap` (the fewest steps of at
/// most that share of a window, spread evenly, rounded half to even as numpy does). A step is at
/// least one voxel, so that an overlap near 1 cannot ask for more windows than positions.
pub fn steps(len: usize, win: usize, overlap: f64) -> Vec<usize> {
    if len <= win {
        return vec![0];
    }
    let target = ((1.0 - overlap) * win as f64).max(1.0);
    let n = ((len - win) as f64 / target).ceil() as usize + 1;
    let actual = (len - win) as f64 / (n - 1) as f64;
    (0..n).map(|i| (actual * i as f64).round_ties_even() as usize).collect()
}

/// The window for an input of `shape`: `tile` rounded down to a multiple of `multiple` per axis
/// (the model's down-sampling, 2^depth with the default pooling) and shrunk to the input padded
/// up to one; one slice in 2D (`dims` 2).
pub fn window(shape: [usize; 3], tile: [usize; 3], multiple: [usize; 3], dims: usize) -> [usize; 3] {
    std::array::from_fn(|a| {
        let m = multiple[a].max(1);
        if a == 0 && dims == 2 {
            1
        } else {
            let padded = shape[a].div_ceil(m) * m;
            padded.min(tile[a].max(m) / m * m)
        }
    })
}

/// Every window origin [z, y, x] over `shape`, z slowest.
pub fn origins(shape: [usize; 3], win: [usize; 3], overlap: f64) -> Vec<[usize; 3]> {
    let [zs, ys, xs]: [Vec<usize>; 3] = std::array::from_fn(|a| steps(shape[a], win[a], overlap));
    let (ys, xs) = (&ys, &xs);
    zs.iter().flat_map(|&z| ys.iter().flat_map(move |&y| xs.iter().map(move |&x| [z, y, x]))).collect()
}

/// nnU-Net's importance map over a window: a unit impulse at the centre (index `size / 2`)
/// blurred by a Gaussian of sigma 1/8 of the window per axis (scipy's `gaussian_filter`, kernels
/// truncated at 4 sigma and normalised), scaled to a maximum of 1, its zeros replaced by its
/// smallest non-zero value (a zero weight would leave a voxel only zero-weighted windows cover
/// undefined). Axes of length 1 (2D's depth) weigh 1.
pub fn gaussian(win: [usize; 3]) -> Vec<f32> {
    let axis = |len: usize| -> Vec<f64> {
        let sigma = len as f64 / 8.0;
        let radius = (4.0 * sigma + 0.5) as isize;
        let centre = (len / 2) as isize;
        (0..len as isize)
            .map(|i| {
                let d = i - centre;
                // scipy normalises the truncated kernel; scaling to a maximum of 1 undoes that,
                // leaving exp(-d^2 / 2 sigma^2) inside the radius.
                if d.abs() > radius { 0.0 } else { (-0.5 * (d * d) as f64 / (sigma * sigma)).exp() }
            })
            .collect()
    };
    let [gz, gy, gx] = win.map(axis);
    let (gy, gx) = (&gy, &gx);
    let mut map: Vec<f32> =
        gz.iter().flat_map(|&z| gy.iter().flat_map(move |&y| gx.iter().map(move |&x| (z * y * x) as f32))).collect();
    let min = map.iter().copied().filter(|&v| v > 0.0).fold(f32::INFINITY, f32::min);
    for v in &mut map {
        if *v == 0.0 {
            *v = min;
        }
    }
    map
}

/// Probabilities over an input of `shape` from windows of `win`: `predict` gets a batch of at
/// most `batch` window origins and returns, per mode, the batch's `classes` planes per window
/// (window after window). One window (the input fits it) is copied as it comes; several are
/// averaged with [`gaussian`] weights. Returns, per mode, `classes` planes of the input's voxels.
pub fn stitch(
    shape: [usize; 3],
    win: [usize; 3],
    overlap: f64,
    classes: usize,
    batch: usize,
    mut predict: impl FnMut(&[[usize; 3]]) -> anyhow::Result<Vec<Vec<f32>>>,
) -> anyhow::Result<Vec<Vec<f32>>> {
    let all = origins(shape, win, overlap);
    let n = shape.iter().product::<usize>();
    let wn = win.iter().product::<usize>();
    let single = all.len() == 1;
    let weights = if single { vec![1.0; wn] } else { gaussian(win) };
    let mut sums: Vec<Vec<f32>> = vec![];
    let mut total = vec![0f32; if single { 0 } else { n }];
    for chunk in all.chunks(batch.max(1)) {
        let out = predict(chunk)?;
        if sums.is_empty() {
            sums = vec![vec![0f32; classes * n]; out.len()];
        }
        for (sum, probs) in sums.iter_mut().zip(&out) {
            anyhow::ensure!(probs.len() == chunk.len() * classes * wn, "a window batch came back the wrong size");
            for (w, o) in chunk.iter().enumerate() {
                add(sum, &probs[w * classes * wn..(w + 1) * classes * wn], *o, shape, win, classes, &weights, single);
            }
        }
        if !single {
            for o in chunk {
                add(&mut total, &weights, *o, shape, win, 1, &weights, true);
            }
        }
    }
    if !single {
        for sum in &mut sums {
            for plane in sum.chunks_mut(n) {
                plane.iter_mut().zip(&total).for_each(|(v, t)| *v /= t);
            }
        }
    }
    Ok(sums)
}

/// Adds one window's `classes` planes into `sum` at `origin`, weighted by `weights` unless
/// `plain` (the window's part inside the input only: windows padded past the input's end drop
/// their padding).
#[allow(clippy::too_many_arguments)]
fn add(
    sum: &mut [f32],
    probs: &[f32],
    origin: [usize; 3],
    shape: [usize; 3],
    win: [usize; 3],
    classes: usize,
    weights: &[f32],
    plain: bool,
) {
    let (n, wn) = (shape.iter().product::<usize>(), win.iter().product::<usize>());
    let [oz, oy, ox] = origin;
    let xs = win[2].min(shape[2] - ox);
    for z in 0..win[0].min(shape[0] - oz) {
        for y in 0..win[1].min(shape[1] - oy) {
            let dst = ((oz + z) * shape[1] + oy + y) * shape[2] + ox;
            let src = (z * win[1] + y) * win[2];
            for c in 0..classes {
                let (d, s) = (&mut sum[c * n + dst..c * n + dst + xs], &probs[c * wn + src..c * wn + src + xs]);
                if plain {
                    d.iter_mut().zip(s).for_each(|(d, s)| *d += s);
                } else {
                    d.iter_mut().zip(s).zip(&weights[src..src + xs]).for_each(|((d, s), w)| *d += s * w);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_spread_evenly_within_the_overlap() {
        // nnU-Net's own example: 110 voxels, windows of 64, step 0.5 -> 0, 23, 46.
        assert_eq!(steps(110, 64, 0.5), vec![0, 23, 46]);
        assert_eq!(steps(10, 16, 0.5), vec![0]);
        assert_eq!(steps(64, 64, 0.5), vec![0]);
        assert_eq!(steps(128, 64, 0.0), vec![0, 64]);
        // Steps of at least one voxel: an overlap near 1 asks for no more windows than positions.
        assert_eq!(steps(68, 64, 0.999), vec![0, 1, 2, 3, 4]);
        assert!(check_overlap(1.0).is_err() && check_overlap(-0.1).is_err() && check_overlap(f64::NAN).is_err());
        let err = check_overlap(1.5).unwrap_err().to_string();
        assert!(err.contains("--overlap 1.5") && err.contains("below 1"), "{err}");
    }

    #[test]
    fn windows_shrink_to_small_inputs_and_keep_the_multiple() {
        assert_eq!(window([1, 100, 300], [1, 64, 64], [1, 16, 16], 2), [1, 64, 64]);
        assert_eq!(window([1, 20, 30], [1, 1024, 1024], [1, 16, 16], 2), [1, 32, 32]);
        assert_eq!(window([16, 64, 64], [64, 128, 128], [4, 4, 4], 3), [16, 64, 64]);
        assert_eq!(window([70, 64, 64], [50, 128, 128], [16, 16, 16], 3), [48, 64, 64]);
        // Per-axis pooling: 6 slices of a model that halves z once are not padded to 8.
        assert_eq!(window([6, 64, 64], [64, 128, 128], [2, 4, 4], 3), [6, 64, 64]);
    }

    fn refs() -> serde_json::Value {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/window_refs.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    /// scripts/window_refs.py: nnU-Net's compute_steps_for_sliding_window.
    #[test]
    fn steps_match_nnunet() {
        let refs = refs();
        let cases = refs["steps"].as_array().unwrap();
        assert!(cases.len() >= 10);
        for c in cases {
            let (len, tile, overlap) = (c["len"].as_u64().unwrap(), c["tile"].as_u64().unwrap(), c["overlap"].as_f64());
            let want: Vec<usize> = serde_json::from_value(c["steps"].clone()).unwrap();
            assert_eq!(steps(len as usize, tile as usize, overlap.unwrap()), want, "{c}");
        }
    }

    /// scripts/window_refs.py: nnU-Net's compute_gaussian (scipy's gaussian_filter).
    #[test]
    fn gaussian_matches_nnunet() {
        let refs = refs();
        for g in refs["gaussians"].as_array().unwrap() {
            let tile: [usize; 3] = serde_json::from_value(g["tile"].clone()).unwrap();
            let want: Vec<f64> = serde_json::from_value(g["map"].clone()).unwrap();
            let got = gaussian(tile);
            assert_eq!(got.len(), want.len());
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!((*a as f64 - b).abs() <= 1e-6 * b.max(1e-3), "{tile:?} voxel {i}: {a} vs {b}");
            }
        }
    }

    /// A pointwise "model" (each voxel's output depends on its own input only): stitching must
    /// give the same function whatever the windows, so any misplaced or mis-weighted window shows.
    fn pointwise(image: &[f32], shape: [usize; 3], win: [usize; 3], overlap: f64, batch: usize) -> Vec<f32> {
        let wn = win.iter().product::<usize>();
        let out = stitch(shape, win, overlap, 2, batch, |origins| {
            let mut probs = vec![];
            for o in origins {
                let mut planes = vec![9.0f32; 2 * wn]; // padding past the input's end must be dropped
                for z in 0..win[0] {
                    for y in 0..win[1] {
                        for x in 0..win[2] {
                            let (sz, sy, sx) = (o[0] + z, o[1] + y, o[2] + x);
                            if sz < shape[0] && sy < shape[1] && sx < shape[2] {
                                let v = image[(sz * shape[1] + sy) * shape[2] + sx];
                                let i = (z * win[1] + y) * win[2] + x;
                                (planes[i], planes[wn + i]) = (v, 1.0 - v * v);
                            }
                        }
                    }
                }
                probs.extend(planes);
            }
            Ok(vec![probs])
        });
        out.unwrap().remove(0)
    }

    #[test]
    fn stitching_a_pointwise_model_does_not_depend_on_the_windows() {
        let shape = [19, 45, 37];
        let n = shape.iter().product::<usize>();
        let image: Vec<f32> = (0..n).map(|i| ((i * 7919 % 1000) as f32 / 1000.0).sin()).collect();
        let whole = pointwise(&image, shape, [32, 48, 48], 0.5, 1);
        let expect: Vec<f32> = image.iter().copied().chain(image.iter().map(|&v| 1.0 - v * v)).collect();
        assert_eq!(whole, expect, "one window is copied as it comes");
        for (win, overlap, batch) in [([8, 16, 16], 0.5, 3), ([16, 32, 24], 0.25, 1), ([4, 8, 8], 0.0, 4)] {
            assert!(origins(shape, win, overlap).len() > 4);
            let tiled = pointwise(&image, shape, win, overlap, batch);
            let worst = tiled.iter().zip(&expect).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            assert!(worst <= 1e-5, "{win:?} overlap {overlap}: off by {worst}");
        }
        assert_eq!(pointwise(&image, shape, [8, 16, 16], 0.5, 1), pointwise(&image, shape, [8, 16, 16], 0.5, 5));
    }

    #[test]
    fn overlapping_windows_are_weighted_by_the_gaussian() {
        // Windows of 8 at 0 and 4 over 12 voxels, predicting 1 and 0 everywhere: where both
        // overlap, voxel x gets g(x) / (g(x) + g(x - 4)) with g(i) = exp(-(i - 4)^2 / 2), sigma 1.
        let out = stitch([1, 1, 12], [1, 1, 8], 0.5, 1, 2, |origins| {
            Ok(vec![origins.iter().flat_map(|o| [if o[2] == 0 { 1.0 } else { 0.0 }; 8]).collect()])
        })
        .unwrap()
        .remove(0);
        let g = |i: f64| (-(i - 4.0) * (i - 4.0) / 2.0).exp();
        for (x, &got) in out.iter().enumerate() {
            let want = match x {
                0..4 => 1.0,
                4..8 => g(x as f64) / (g(x as f64) + g(x as f64 - 4.0)),
                _ => 0.0,
            };
            assert!((got as f64 - want).abs() < 1e-6, "voxel {x}: {got} vs {want}");
        }
        assert!(out[5] > 0.98 && out[7] < 0.02 && (out[6] - 0.5).abs() < 1e-6);
    }

    #[test]
    fn a_uniform_model_gives_a_uniform_output() {
        let out = stitch([10, 30, 50], [8, 16, 16], 0.5, 1, 3, |o| Ok(vec![vec![0.3; o.len() * 8 * 16 * 16]])).unwrap();
        assert!(out[0].iter().all(|v| (v - 0.3).abs() < 1e-6));
    }

    #[test]
    fn gaussian_peaks_at_the_centre_and_has_no_zeros() {
        let g = gaussian([1, 8, 6]);
        assert_eq!(g[4 * 6 + 3], 1.0);
        assert!(g.iter().all(|&v| v > 0.0 && v <= 1.0));
        // sigma 1 along y: one step off centre weighs exp(-1/2).
        assert!((g[5 * 6 + 3] - (-0.5f32).exp()).abs() < 1e-7);
    }
}
