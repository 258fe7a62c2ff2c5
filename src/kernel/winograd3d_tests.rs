//! 3D Winograd F(2x2x2, 3x3x3) against the definition of convolution: the forward (parts in and
//! out, batch 2, odd channel counts, row tails, chunks of input channels), the input gradient as
//! the forward's adjoint, the weight gradient, and the whole 3D model against the burn path
//! with the 3D Winograd path taken.

use super::conv;
use super::cpu::Geom;
use super::testing::{close, naive, rand, require_avx512};
use super::winograd3d::{self, CALLS};
use std::mem::MaybeUninit;

fn geom(n: usize, c_in: usize, c_out: usize, [d, h, w]: [usize; 3]) -> Geom {
    Geom { n, c_in, c_out, sp: [d, h, w], k: [3, 3, 3] }
}

/// The channels c0..c0 + c of every image of an NCDHW tensor of `channels` channels.
fn slice(x: &[f32], n: usize, channels: usize, (c0, c): (usize, usize)) -> Vec<f32> {
    let p = x.len() / (n * channels);
    (0..n).flat_map(|b| x[(b * channels + c0) * p..][..c * p].to_vec()).collect()
}

/// `split` channel counts as consecutive (first channel, channels) ranges.
fn ranges(split: &[usize]) -> Vec<(usize, usize)> {
    split.iter().scan(0, |c0, &c| Some((std::mem::replace(c0, *c0 + c), c))).collect()
}

fn calls() -> usize {
    CALLS.with(|c| c.get())
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&a, &b)| a as f64 * b as f64).sum()
}

/// Shapes: odd channel counts, concatenated parts, batch 2, sides 4..32, rows of 2 to 17 tiles
/// (vector tails), more input channels than the tests' chunk of 8, units crossing tile planes.
fn cases() -> Vec<(Geom, Vec<usize>)> {
    vec![
        (geom(1, 3, 5, [4, 4, 4]), vec![3]),
        (geom(2, 7, 19, [6, 8, 10]), vec![3, 4]),
        (geom(1, 17, 11, [4, 6, 34]), vec![1, 16]),
        (geom(2, 4, 32, [8, 8, 8]), vec![4]),
        (geom(1, 2, 3, [32, 32, 32]), vec![2]),
        (geom(1, 9, 16, [16, 12, 16]), vec![5, 4]),
    ]
}

#[test]
fn forward_matches_the_definition() {
    require_avx512();
    for (g, split) in cases() {
        for relu in [false, true] {
            let x = rand(g.n * g.c_in * g.pixels(), 3);
            let w = rand(g.c_out * g.rows(), 5);
            let b = rand(g.c_out, 7);
            let mut want = naive(&g, &x, &w, &b);
            if relu {
                want.iter_mut().for_each(|v| *v = v.max(0.0));
            }
            let parts: Vec<Vec<f32>> = ranges(&split).into_iter().map(|r| slice(&x, g.n, g.c_in, r)).collect();
            let xs: Vec<&[f32]> = parts.iter().map(|v| v.as_slice()).collect();
            let wt = winograd3d::prepare_with(&g, |o, c, t| w[(o * g.c_in + c) * 27 + t]);
            // The output in two parts (the first channel alone, then the rest), NaN until written.
            let p = g.pixels();
            let mut y0 = vec![MaybeUninit::new(f32::NAN); g.n * p];
            let mut y1 = vec![MaybeUninit::new(f32::NAN); g.n * (g.c_out - 1) * p];
            winograd3d::forward(&g, &xs, &wt, &b, relu, &mut [&mut y0, &mut y1]);
            // SAFETY: initialised above (NaN where the kernel would have missed one).
            let init =
                |y: Vec<MaybeUninit<f32>>| -> Vec<f32> { y.into_iter().map(|v| unsafe { v.assume_init() }).collect() };
            let (y0, y1) = (init(y0), init(y1));
            close(&y0, &slice(&want, g.n, g.c_out, (0, 1)), 1e-5);
            close(&y1, &slice(&want, g.n, g.c_out, (1, g.c_out - 1)), 1e-5);
        }
    }
}

/// conv's forward, input gradient and weight gradient take the 3D Winograd path on these shapes
/// (the counter says so), and the gradients are the forward's adjoints: <conv(x), dy> =
/// <x, dx(dy)> = <w, dw(x, dy)>, per input part too.
#[test]
fn gradients_are_the_adjoints_of_forward() {
    require_avx512();
    // conv's thresholds: 4+ input channels, 128 in x out, 48 tiles (the other cases fall short).
    let taken = |g: &Geom| g.c_in >= 4 && g.c_in * g.c_out >= 128 && g.n * g.pixels() / 8 >= 48;
    let cases: Vec<_> = cases().into_iter().filter(|(g, _)| taken(g)).collect();
    assert_eq!(cases.len(), 4);
    for (g, split) in cases {
        let x = rand(g.n * g.c_in * g.pixels(), 4);
        let w = rand(g.c_out * g.rows(), 5);
        let dy = rand(g.n * g.c_out * g.pixels(), 6);
        let before = calls();
        let y = conv::forward_parts(&g, &[&x], &w, &vec![0.0; g.c_out], false);
        assert_eq!(calls(), before + 1, "forward of {g:?} not on the 3D Winograd path");
        let lhs = dot(&y, &dy);
        let parts = ranges(&split);
        let dxs = conv::backward_x_parts(&g, &dy, &w, &parts);
        // The flipped geometry (c_out input channels) must take the path too, where it applies.
        let flipped = Geom { c_in: g.c_out, c_out: g.c_in, ..g };
        assert_eq!(calls(), before + 1 + usize::from(taken(&flipped)), "input gradient of {g:?}");
        let dx: f64 = dxs.iter().zip(&parts).map(|(d, &r)| dot(d, &slice(&x, g.n, g.c_in, r))).sum();
        assert!((lhs - dx).abs() < 1e-4 * (1.0 + lhs.abs()), "dx of {g:?}: {lhs} vs {dx}");
        let (dw, _) = conv::backward_w_parts(&g, &[&x], &dy);
        assert!((lhs - dot(&w, &dw)).abs() < 1e-4 * (1.0 + lhs.abs()), "dw of {g:?}");
    }
}

/// The weight gradient against its definition, Σ dy(o, z, y, x) · x(c, z + a - 1, y + b - 1,
/// x + l - 1), from the input given in parts.
#[test]
fn weight_gradient_matches_the_definition() {
    require_avx512();
    for (g, split) in cases() {
        let [d, h, wd] = g.sp;
        let p = g.pixels();
        let x = rand(g.n * g.c_in * p, 11);
        let dy = rand(g.n * g.c_out * p, 13);
        // The sums in f64, and the sums of the terms' magnitudes: a sum over 32³ positions
        // rounds in f32 by ~1e-8 of the latter, far below one missing or wrong term.
        let (mut want, mut mag) = (vec![0.0f64; g.c_out * g.c_in * 27], vec![0.0f64; g.c_out * g.c_in * 27]);
        for (b, o, c) in (0..g.n).flat_map(|b| (0..g.c_out).flat_map(move |o| (0..g.c_in).map(move |c| (b, o, c)))) {
            let (xc, dyo) = (&x[(b * g.c_in + c) * p..][..p], &dy[(b * g.c_out + o) * p..][..p]);
            for t in 0..27 {
                let (a, r, l) = (t / 9, t / 3 % 3, t % 3);
                let (mut acc, mut abs) = (0.0f64, 0.0f64);
                for z in (1usize.saturating_sub(a))..d.min(d + 1 - a) {
                    for y in (1usize.saturating_sub(r))..h.min(h + 1 - r) {
                        for xx in (1usize.saturating_sub(l))..wd.min(wd + 1 - l) {
                            let src = ((z + a - 1) * h + y + r - 1) * wd + xx + l - 1;
                            let term = dyo[(z * h + y) * wd + xx] as f64 * xc[src] as f64;
                            acc += term;
                            abs += term.abs();
                        }
                    }
                }
                want[(o * g.c_in + c) * 27 + t] += acc;
                mag[(o * g.c_in + c) * 27 + t] += abs;
            }
        }
        let parts: Vec<Vec<f32>> = ranges(&split).into_iter().map(|r| slice(&x, g.n, g.c_in, r)).collect();
        let xs: Vec<&[f32]> = parts.iter().map(|v| v.as_slice()).collect();
        let got = winograd3d::backward_w(&g, &xs, &dy);
        for (i, ((&got, &want), &mag)) in got.iter().zip(&want).zip(&mag).enumerate() {
            let tol = 1e-6 * mag + 1e-5 * (1.0 + want.abs());
            assert!((got as f64 - want).abs() <= tol, "{g:?} element {i}: {got} vs {want} (terms' magnitude {mag})");
        }
    }
}

/// The whole 3D model and its parameter gradients: our kernels (3D Winograd taken, counted)
/// against burn's ops, random weights and inputs, 1e-4 relative.
#[test]
fn whole_3d_model_matches_the_burn_path_on_winograd() {
    use super::set_enabled;
    use crate::model::{Arch, ModelConfig, Preset};
    use burn::prelude::*;
    use burn::tensor::Distribution;
    require_avx512();
    let rel = |a: Tensor<5>, b: Tensor<5>| {
        let scale = b.clone().abs().max().into_scalar::<f32>().max(1e-6);
        (a - b).abs().max().into_scalar::<f32>() / scale
    };
    let d = Device::flex().autodiff();
    d.seed(3);
    // Width 8: at width 4 every layer of a 16³ model is below conv's thresholds.
    let cfg = ModelConfig { dims: 3, width: 8, ..ModelConfig::new(Arch::Unetpp, Preset::Modern, 3) };
    let m = cfg.init::<5>(&d);
    let x = Tensor::<5>::random([2, 1, 16, 16, 16], Distribution::Default, &d);
    let heads = |on: bool| {
        set_enabled(on);
        let h = m.forward(x.clone());
        set_enabled(true);
        h
    };
    let before = calls();
    let ours = heads(true);
    let forwards = calls() - before;
    assert!(forwards >= 6, "the 3D model's forward made {forwards} 3D Winograd calls");
    let theirs = heads(false);
    for (a, b) in ours.iter().zip(&theirs) {
        assert!(rel(a.clone(), b.clone()) <= 1e-4, "heads differ");
    }
    let loss = |h: Vec<Tensor<5>>| h.into_iter().map(|t| t.powi_scalar(2).mean()).reduce(|a, b| a + b).unwrap();
    let before = calls();
    let (ga, gb) = (loss(ours).backward(), loss(theirs).backward());
    assert!(calls() > before, "the backward pass took no 3D Winograd input gradient");
    for (i, j) in [(0, 1), (1, 0), (0, 2)] {
        let block = &m.grid[i][j].as_ref().unwrap().block;
        for w in [&block.conv1.weight, &block.conv2.weight] {
            let (a, b) = (w.val().grad(&ga).unwrap(), w.val().grad(&gb).unwrap());
            assert!(rel(a, b) <= 1e-4, "gradients of X^{i},{j} differ");
        }
    }
}

/// The prefetched runs are the rows the input transform reads: every (slice, row) of every
/// tile's 4x4x4 input that lies in the volume and nothing else, for units within and across
/// tile planes and at the volume's edges (a unit spanning whole tile planes names the slices
/// they share twice, which costs a repeated prefetch, nothing more).
#[test]
fn prefetched_spans_are_the_rows_read() {
    for sp in [[4, 4, 4], [6, 8, 10], [8, 4, 6], [10, 12, 2]] {
        let [d, h, wd] = sp;
        let th = (d / 2) * (h / 2);
        for (r0, r1) in [(0, 1), (0, th), (1, 3), (h / 2 - 1, h / 2 + 2), (th - 1, th)] {
            let (r0, r1) = (r0.min(th - 1), r1.min(th));
            let mut want = std::collections::BTreeSet::new();
            for row in r0..r1 {
                let (tz, ty) = ((row / (h / 2)) as isize, (row % (h / 2)) as isize);
                for z in 2 * tz - 1..=2 * tz + 2 {
                    for y in 2 * ty - 1..=2 * ty + 2 {
                        if (0..d as isize).contains(&z) && (0..h as isize).contains(&y) {
                            want.insert(z as usize * h + y as usize);
                        }
                    }
                }
            }
            let spans = winograd3d::spans_read(sp, (r0, r1));
            let mut got = Vec::new();
            for s in &spans {
                assert!(
                    s.start.is_multiple_of(wd) && s.end.is_multiple_of(wd) && s.end <= d * h * wd,
                    "{sp:?} {r0}..{r1}: {s:?}"
                );
                got.extend(s.start / wd..s.end / wd);
            }
            let got: std::collections::BTreeSet<_> = got.into_iter().collect();
            assert_eq!(got, want, "{sp:?} {r0}..{r1}");
        }
    }
}
