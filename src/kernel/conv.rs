//! Stride-1 "same" convolution (odd kernel, padding k/2) on contiguous NC(D)HW f32 slices, with
//! its two backward products: this file only picks a path per shape (and CPU) and prepares the
//! weights for it. Winograd F(2x2,3x3) / F(4x4,3x3) (`winograd`) for 2D 3x3 layers from 16
//! input channels and 12x12 up, the direct kernels (`direct`) for the other shapes whose output
//! rows fill whole vectors (3D, odd sizes, the first layer), else the GEMM paths (`gemm`),
//! which are also what CPUs without AVX-512 run.

use super::cpu::{self, Geom, cat, written};
use super::{direct, gemm, norm, winograd};
use std::mem::MaybeUninit;

/// Winograd (F(2x2) or F(4x4), `winograd::tile_side`) on AVX-512 wherever it applies (2D 3x3,
/// even sizes) but on narrow inputs
/// (1 -> 32 at 96x96: 4.5x slower than direct, 16 -> 32: 1.2-1.6x faster) and 6x6 images (9
/// tiles per image fill a third of the 48-tile register tile; even with the im2col GEMM).
/// `once`: the weights are transformed for this call alone (training, where they change every
/// step), which takes a pass over 16/9 of the weights' size: on 12x12 images at batch 1 (36
/// tiles), where the weights are largest and the tiles fewest, that cost more than the products
/// saved, and a batch-1 training step ran 5-10% faster with the direct kernel there.
fn winograd_ok(g: &Geom, once: bool) -> bool {
    if g.k[0] == 3 {
        return winograd3d_ok(g);
    }
    let tiles = g.n * g.pixels() / 4;
    winograd::applies(g) && g.c_in >= 16 && g.sp[1].min(g.sp[2]) >= 12 && (!once || tiles >= 100)
}

/// 3D Winograd F(2x2x2) (`winograd3d`) on 3x3x3 layers of even sizes, from 4 input channels,
/// a 4 x 32 channel product and a register tile of tiles (48 of 2x2x2): against the direct
/// kernel, at batch 1 of the 3D bench model's layers, 1.5-3x faster forward and input gradient
/// from 16³ up (32 -> 32 at 64³: 2.5x), 1.1-2x at 8³ with 128-768 channels; slower only on
/// layers of a few channels (4 -> 8 at 16³: 1.4x slower; tenths of a millisecond).
fn winograd3d_ok(g: &Geom) -> bool {
    let tiles = g.n * g.pixels() / 8;
    winograd::applies(g) && g.c_in >= 4 && g.c_in * g.c_out >= 128 && tiles >= 48
}

/// The 3D Winograd weight gradient, where `winograd3d_ok` holds and there are 128+ tiles: its
/// dL/dU sums are as large as the weights x 64 / 27 whatever the volume, which on 8³ at batch
/// 1 (64 tiles) the products no longer pay for (256 -> 256 and 768 -> 256: 1.03-1.1x the direct
/// kernel's time; 16³: 0.3-0.8x).
fn winograd3d_w_ok(g: &Geom) -> bool {
    winograd3d_ok(g) && g.n * g.pixels() / 8 >= 128
}

/// The direct kernel runs spans of output positions in 16-pixel vectors: worth it where they
/// waste under 10% of their lanes (not on 6x6 images: 36 pixels in 48 lanes). Where Winograd
/// applies as well, Winograd is taken (`prepare`, `backward_x_parts`, `backward_w_parts`).
fn direct_ok(g: &Geom) -> bool {
    let lanes: usize = direct::spans(g).iter().map(|s| s.1.next_multiple_of(16)).sum();
    cpu::avx512() && !g.pointwise() && 10 * lanes <= 11 * g.pixels()
}

/// y = conv(cat(xs), w) + b, NC(D)HW in and out, then max(0, y) if `relu`: the input is the
/// channel concatenation of the parts. The direct kernel reads the parts in place and applies
/// the ReLU as it stores; the other paths get the parts copied together.
pub fn forward_parts(g: &Geom, xs: &[&[f32]], w: &[f32], b: &[f32], relu: bool) -> Vec<f32> {
    forward_prepared(g, xs, w, b, relu, prepare_for(g, w, b, true).as_ref())
}

/// Weights rearranged for the path that `g` takes, which `forward_parts` otherwise does on
/// every call: blocked for the direct kernel, transformed for Winograd.
pub enum Prepared {
    Direct(direct::Packed),
    Winograd(winograd::Weights),
}

/// The prepared weights for `g`'s path (`None` where the path reads them as they are), to be
/// used for many calls.
pub fn prepare(g: &Geom, w: &[f32], b: &[f32]) -> Option<Prepared> {
    prepare_for(g, w, b, false)
}

fn prepare_for(g: &Geom, w: &[f32], b: &[f32], once: bool) -> Option<Prepared> {
    if winograd_ok(g, once) {
        Some(Prepared::Winograd(winograd::prepare(g, w)))
    } else if direct_ok(g) {
        Some(Prepared::Direct(direct::pack(g, w, b)))
    } else {
        None
    }
}

/// `forward_parts` with the weights prepared beforehand (`prepare`, for the same geometry).
pub fn forward_prepared(
    g: &Geom,
    xs: &[&[f32]],
    w: &[f32],
    b: &[f32],
    relu: bool,
    prep: Option<&Prepared>,
) -> Vec<f32> {
    let len = g.n * g.c_out * g.pixels();
    match prep {
        // SAFETY: the direct kernel writes every element of its output.
        Some(Prepared::Direct(packed)) => unsafe {
            written(len, |out| direct::forward_packed(g, xs, packed, relu, out))
        },
        Some(Prepared::Winograd(u)) => winograd(g, (xs, false), u, b, relu),
        None => {
            // The GEMM paths read one input: parts are concatenated first.
            let y = match xs {
                [x] => gemm::forward(g, x, w, b),
                _ => gemm::forward(g, &cat(g.n, xs), w, b),
            };
            if relu { y.into_iter().map(|v| v.max(0.0)).collect() } else { y }
        }
    }
}

/// The Winograd forward into a new output, stored as it is.
fn winograd(g: &Geom, xs: (&[&[f32]], bool), u: &winograd::Weights, b: &[f32], relu: bool) -> Vec<f32> {
    let len = g.n * g.c_out * g.pixels();
    let store = winograd::Epilogue::Store;
    // SAFETY: Winograd writes every element of its output.
    unsafe { written(len, |out| winograd::forward(g, xs, u, b, relu, &mut [out], store)) }
}

/// Whether `forward_fused` takes the convolution `g` of `spatial` (2 or 3) axes: 2D Winograd,
/// the path whose output transform can pool, or sum into a head, each tile row as it leaves
/// it and whose input transform can up-sample a half-resolution part as it reads it. Where
/// it holds, `prepare` gives Winograd weights.
pub fn fuses(g: &Geom, spatial: usize) -> bool {
    spatial == 2 && winograd_ok(g, false)
}

/// Where `forward_fused` sends relu(conv(cat(xs))): see `ext::Sink`; `Head` holds the 1x1
/// convolution's weights `[classes][c_out]` and bias.
pub enum Sink<'a> {
    Store,
    Pool,
    Head(&'a [f32], &'a [f32]),
}

/// relu(conv(cat(xs)) + b) on the 2D Winograd path (`fuses`), the last part at half resolution
/// and read as its 2x linear up-sampling if `half`: the stored output, or the head's with
/// `Sink::Head` (the node's output then never stored), and with `Sink::Pool` its 2x max
/// pooling, each computed as the output transform leaves a tile row (no second pass).
pub fn forward_fused(
    g: &Geom,
    (xs, half): (&[&[f32]], bool),
    u: &winograd::Weights,
    b: &[f32],
    sink: Sink<'_>,
) -> (Vec<f32>, Option<Vec<f32>>) {
    let len = g.n * g.c_out * g.pixels();
    // SAFETY (all three): Winograd writes every element of each output it is given.
    match sink {
        Sink::Store => (winograd(g, (xs, half), u, b, true), None),
        Sink::Pool => {
            let mut y = vec![];
            let pooled = unsafe {
                written(len / 4, |pooled| {
                    let epi = winograd::Epilogue::Pool(pooled);
                    y = written(len, |out| winograd::forward(g, (xs, half), u, b, true, &mut [out], epi));
                })
            };
            (y, Some(pooled))
        }
        Sink::Head(hw, hb) => {
            let head = unsafe {
                written(g.n * hb.len() * g.pixels(), |out| {
                    let epi = winograd::Epilogue::Head { w: hw, b: hb, out };
                    winograd::forward(g, (xs, half), u, b, true, &mut [], epi)
                })
            };
            (head, None)
        }
    }
}

/// y = conv(x, w) + b, NC(D)HW in and out (the tests' one-part form of `forward_parts`).
#[cfg(test)]
pub fn forward(g: &Geom, x: &[f32], w: &[f32], b: &[f32]) -> Vec<f32> {
    forward_parts(g, &[x], w, b, false)
}

/// dL/dx from dL/dy (the tests' whole-input form of `backward_x_parts`).
#[cfg(test)]
pub fn backward_x(g: &Geom, dy: &[f32], w: &[f32]) -> Vec<f32> {
    backward_x_parts(g, dy, w, &[(0, g.c_in)]).remove(0)
}

/// dL/dx for the parts (first channel, channels) of the input of `g` (a channel concatenation),
/// from dL/dy and the whole weight. Winograd computes them in one pass whose outputs are the
/// parts (dL/dy is transformed once for all of them); the other paths one part at a time.
pub fn backward_x_parts(g: &Geom, dy: &[f32], w: &[f32], parts: &[(usize, usize)]) -> Vec<Vec<f32>> {
    let chans: Vec<usize> = parts.iter().flat_map(|&(c0, c)| c0..c0 + c).collect();
    let flipped = Geom { c_in: g.c_out, c_out: chans.len(), ..*g };
    if chans.is_empty() || !winograd_ok(&flipped, true) {
        return parts.iter().map(|&(c0, c)| backward_x_part(g, dy, w, c0, c)).collect();
    }
    assert!(chans.iter().all(|&c| c < g.c_in) && w.len() == g.c_out * g.rows());
    // Output channel o of the flipped, transposed kernel is input channel chans[o].
    let t = g.taps();
    let u = winograd::prepare_with(&flipped, |o, ci, k| w[(ci * g.c_in + chans[o]) * t + t - 1 - k]);
    let mut dxs: Vec<Vec<f32>> = parts.iter().map(|&(_, c)| Vec::with_capacity(g.n * c * g.pixels())).collect();
    {
        let mut outs: Vec<&mut [MaybeUninit<f32>]> = dxs.iter_mut().map(|d| d.spare_capacity_mut()).collect();
        winograd::forward(
            &flipped,
            (&[dy], false),
            &u,
            &vec![0.0; chans.len()],
            false,
            &mut outs,
            winograd::Epilogue::Store,
        );
    }
    for (d, &(_, c)) in dxs.iter_mut().zip(parts) {
        // SAFETY: the Winograd forward writes every element of its output parts.
        unsafe { d.set_len(g.n * c * g.pixels()) };
    }
    dxs
}

/// dL/dx for input channels c0..c0+c of the convolution `g` (one part of a channel
/// concatenation), from dL/dy and the whole weight, whose slice for the part is read in place,
/// on the paths other than Winograd.
fn backward_x_part(g: &Geom, dy: &[f32], w: &[f32], c0: usize, c: usize) -> Vec<f32> {
    let t = g.taps();
    assert!(c0 + c <= g.c_in && w.len() == g.c_out * g.rows());
    let flipped = Geom { c_in: g.c_out, c_out: c, ..*g };
    if direct_ok(&flipped) {
        // The input gradient is the convolution of dy with the flipped, transposed kernel, whose
        // weights are prepared straight from the forward's: input channel c0 + o of the part is
        // the flipped convolution's output channel o.
        let weight = |o: usize, ci: usize, k: usize| w[(ci * g.c_in + c0 + o) * t + t - 1 - k];
        let zeros = vec![0.0; c];
        let packed = direct::pack_with(&flipped, &zeros, weight);
        return forward_prepared(&flipped, &[dy], &[], &zeros, false, Some(&Prepared::Direct(packed)));
    }
    gemm::backward_x_part(g, dy, w, c0, c)
}

/// (dL/dw, dL/db) from the forward input, given as the parts of a channel concatenation, and
/// dL/dy. The direct kernel reads the parts in place; the GEMM paths get them copied together.
pub fn backward_w_parts(g: &Geom, xs: &[&[f32]], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    if winograd_ok(g, true) && (g.k[0] != 3 || winograd3d_w_ok(g)) {
        return (winograd::backward_w(g, xs, dy), bias_grad(g, dy));
    }
    if direct_w_ok(g) {
        let mut dw = vec![0.0; g.c_out * g.rows()];
        direct::backward_w(g, xs, dy, &mut dw);
        return (dw, bias_grad(g, dy));
    }
    let dw = match xs {
        [x] => gemm::backward_w(g, x, dy),
        _ => gemm::backward_w(g, &cat(g.n, xs), dy),
    };
    (dw, bias_grad(g, dy))
}

/// The direct weight gradient beats the GEMMs from 8-pixel rows up (at 6x6: 1.6x slower).
fn direct_w_ok(g: &Geom) -> bool {
    cpu::avx512() && !g.pointwise() && g.sp[2] >= 8
}

fn bias_grad(g: &Geom, dy: &[f32]) -> Vec<f32> {
    let p = g.pixels();
    (0..g.c_out)
        .map(|o| {
            (0..g.n)
                .map(|n| {
                    let plane = &dy[(n * g.c_out + o) * p..][..p];
                    norm::lane_sums(plane, plane, |v, _| [v])[0]
                })
                .sum::<f64>() as f32
        })
        .collect()
}

/// (dL/dw, dL/db) from the forward input and dL/dy (the tests' one-part form of
/// `backward_w_parts`).
#[cfg(test)]
pub fn backward_w(g: &Geom, x: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    backward_w_parts(g, &[x], dy)
}

#[cfg(test)]
mod tests {
    use super::super::testing::{close, naive, rand};
    use super::*;

    fn dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(&a, &b)| a as f64 * b as f64).sum()
    }

    fn geoms() -> Vec<Geom> {
        vec![
            Geom { n: 2, c_in: 3, c_out: 4, sp: [1, 7, 5], k: [1, 3, 3] },
            Geom { n: 3, c_in: 2, c_out: 5, sp: [1, 4, 6], k: [1, 1, 1] },
            // 1x1 to few channels: the heads' weighted sums
            Geom { n: 2, c_in: 3, c_out: 2, sp: [1, 5, 7], k: [1, 1, 1] },
            Geom { n: 1, c_in: 4, c_out: 1, sp: [2, 3, 3], k: [1, 1, 1] },
            Geom { n: 1, c_in: 2, c_out: 3, sp: [3, 4, 5], k: [3, 3, 3] },
            Geom { n: 2, c_in: 1, c_out: 2, sp: [1, 2, 3], k: [1, 5, 5] },
            // more pixels than one chunk, so segments cross image borders
            Geom { n: 3, c_in: 40, c_out: 3, sp: [1, 33, 17], k: [1, 3, 3] },
            // rows of 16 or more: the shifted-GEMM paths
            Geom { n: 2, c_in: 6, c_out: 5, sp: [1, 5, 18], k: [1, 3, 3] },
            Geom { n: 1, c_in: 2, c_out: 2, sp: [3, 4, 16], k: [3, 3, 3] },
            Geom { n: 2, c_in: 3, c_out: 2, sp: [1, 3, 20], k: [1, 5, 5] },
            // even sizes from 12, 16+ channels, 100+ tiles of 2x2: Winograd, forward and input
            // gradient (units of several tile rows and of one, output channels not a multiple
            // of its 8; F(2x2) here, F(4x4) on the 12x260)
            Geom { n: 3, c_in: 17, c_out: 16, sp: [1, 12, 14], k: [1, 3, 3] },
            Geom { n: 1, c_in: 16, c_out: 18, sp: [1, 12, 260], k: [1, 3, 3] },
        ]
    }

    #[test]
    fn forward_matches_the_definition() {
        for g in geoms() {
            let x = rand(g.n * g.c_in * g.pixels(), 1);
            let w = rand(g.c_out * g.rows(), 2);
            let b = rand(g.c_out, 3);
            // F(4x4) Winograd rounds ~20x more than the other paths (see its tests).
            let tol = if winograd_ok(&g, true) && winograd::tile_side(&g) == 4 { 1e-4 } else { 1e-5 };
            close(&forward(&g, &x, &w, &b), &naive(&g, &x, &w, &b), tol);
        }
    }

    /// The backward products are the adjoints of the forward: <conv(x), dy> = <x, dx(dy)> and
    /// <conv_w(x), dy> = <w, dw(dy)> for the bias-free linear maps.
    #[test]
    fn backward_is_the_adjoint_of_forward() {
        for g in geoms() {
            let x = rand(g.n * g.c_in * g.pixels(), 4);
            let w = rand(g.c_out * g.rows(), 5);
            let dy = rand(g.n * g.c_out * g.pixels(), 6);
            let zero = vec![0.0; g.c_out];
            let y = forward(&g, &x, &w, &zero);
            let lhs = dot(&y, &dy);
            let dx = backward_x(&g, &dy, &w);
            let (dw, db) = backward_w(&g, &x, &dy);
            assert!((lhs - dot(&x, &dx)).abs() < 1e-3 * (1.0 + lhs.abs()), "dx of {g:?}");
            assert!((lhs - dot(&w, &dw)).abs() < 1e-3 * (1.0 + lhs.abs()), "dw of {g:?}");
            let sums: Vec<f32> = (0..g.c_out)
                .map(|o| (0..g.n).map(|n| dy[(n * g.c_out + o) * g.pixels()..][..g.pixels()].iter().sum::<f32>()).sum())
                .collect();
            close(&db, &sums, 1e-4);
        }
    }

    /// A part's input gradient (channels c0..c0+c) is that slice of the whole input gradient,
    /// on every path (the part's weights are read in place, with the whole weight's strides).
    #[test]
    fn part_input_gradient_is_a_slice_of_the_whole() {
        for g in geoms().into_iter().filter(|g| g.c_in >= 3) {
            let w = rand(g.c_out * g.rows(), 5);
            let dy = rand(g.n * g.c_out * g.pixels(), 6);
            let whole = backward_x(&g, &dy, &w);
            // Two parts, channel 0 left out (a part that needs no gradient); or none at all.
            assert!(backward_x_parts(&g, &dy, &w, &[]).is_empty());
            let parts = [(1, 1), (2, g.c_in - 2)];
            let p = g.pixels();
            for (dx, (c0, c)) in backward_x_parts(&g, &dy, &w, &parts).iter().zip(parts) {
                let want: Vec<f32> =
                    (0..g.n).flat_map(|n| whole[(n * g.c_in + c0) * p..][..c * p].iter().copied()).collect();
                close(dx, &want, 1e-5);
            }
        }
    }
}
