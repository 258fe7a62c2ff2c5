//! Winograd F(2x2, 3x3) and F(4x4, 3x3) for 2D 3x3 "same" convolutions of even-sized images, on
//! AVX-512.
//!
//! Each 2x2 output tile comes from a 4x4 input tile d through 16 element-wise products in a
//! transformed domain: Y = A^T [ (G w G^T) ⊙ (B^T d B) ] A. Over the tiles these products are 16
//! matrix products M_k = U_k · V_k (c_out x c_in times c_in x tiles), 2.25x fewer multiplications
//! than the direct form. F(2x2) transforms are sums of halves and whole values, so float32 results
//! stay within ~1e-6 relative of direct convolution. F(4x4) takes 4x4 output tiles from 6x6 input
//! tiles: 36 products per 16 outputs (4x fewer multiplications), with transforms that scale by up
//! to 8 and 1/24, so ~20x F(2x2)'s rounding (still ~1e-5 relative); it serves images with enough
//! 4x4 tiles to fill the vectors (`tile_side`).
//!
//! The work goes in units of a few tile rows of one image (and, where that leaves threads idle, a
//! range of output channels): the input transform writes V for the unit's tiles (vectorised over
//! 16 tiles, even and odd input columns split by permutes, the zero padding by load masks), the
//! products run in an 8-channel x 48-tile register tile that reads V and U where they lie (V's
//! rows are as long as the unit's tiles, so a tile's operand is one contiguous run that stays in
//! L1 across the output-channel blocks), and the output transform adds the bias, applies the ReLU
//! and interleaves the two columns of each tile as it stores. The `gemm` crate's products, which
//! pack both operands on every call, left this at the direct kernel's speed; with this register
//! tile a layer runs 1.4-2.3x faster than the direct kernel (at 96², 48² and 24², batch 1 and 4).
//!
//! Training uses it three times: the forward, the input gradient (the forward of the flipped,
//! transposed kernel, its outputs the parts of the input concatenation) and the weight gradient,
//! which is computed in the transformed domain too (`backward_w`).

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::cpu::{Geom, SyncPtr, aligned, assert_avx512, avx512, prefetch, recycle, transpose_row};
use super::{upsample, winograd3d};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Output channels per register tile (x 3 vectors of 16 tiles: 24 accumulators).
pub(super) const OB: usize = 8;
/// Tiles per register tile.
pub(super) const TT: usize = 48;
/// Input channels ahead whose rows the input transform prefetches.
pub(super) const PF: usize = 2;

/// Whether `g` is a convolution this path computes, on this CPU: 2D here, 3D 3x3x3 in
/// `winograd3d` (the functions below hand 3D geometries to it).
pub fn applies(g: &Geom) -> bool {
    applies2(g) || winograd3d::applies(g)
}

fn applies2(g: &Geom) -> bool {
    let even = g.sp[1].is_multiple_of(2) && g.sp[2].is_multiple_of(2);
    g.k == [1, 3, 3] && g.sp[0] == 1 && even && avx512()
}

/// U = G w G^T for every (output, input) channel pair, as [k][c_out / 8][c_in][8] (the eight
/// weights one register tile broadcasts for an input channel are consecutive), output channels
/// zero-padded to a multiple of 8; `m` the output tile's side. 3D (`winograd3d`) lays its 64
/// positions out the same way.
pub struct Weights {
    pub(super) u: Vec<f32>,
    pub(super) c_out_pad: usize,
    pub(super) m: usize,
}

/// G of F(2x2, 3x3) and of F(4x4, 3x3) (Lavin and Gray's points 0, ±1, ±2 for the latter).
pub(super) const G2: [[f32; 3]; 4] = [[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]];
const G4: [[f32; 3]; 6] = [
    [0.25, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];

/// The output tile's side for `g`: 4 (36 products per 16 outputs, against F(2x2)'s 16 per 4)
/// where both sides divide by 4 and an image has at least 100 such tiles, else 2. On smaller
/// images (24² has 36) vectors of 16 tiles are largely padding and the units too few for the
/// threads: F(4x4) ran a 24² layer 1.3-1.6x slower than F(2x2) at batch 1, and 48² (144 tiles)
/// 10-30% faster.
pub fn tile_side(g: &Geom) -> usize {
    let [d, h, w] = g.sp;
    if d > 1 {
        return 2;
    }
    if h.is_multiple_of(4) && w.is_multiple_of(4) && (h / 4) * (w / 4) >= 100 { 4 } else { 2 }
}

/// The weights of a forward convolution, `w` as [c_out][c_in][3][3].
pub fn prepare(g: &Geom, w: &[f32]) -> Weights {
    let taps = g.k.iter().product::<usize>();
    prepare_with(g, |o, c, t| w[(o * g.c_in + c) * taps + t])
}

/// The weights given as weight(o, c, t) (output channel, input channel, tap), which lets the
/// input gradient transform the flipped, transposed kernel straight from the forward's.
pub fn prepare_with(g: &Geom, weight: impl Fn(usize, usize, usize) -> f32 + Sync) -> Weights {
    if g.k[0] == 3 {
        return winograd3d::prepare_with(g, weight);
    }
    prepare_tiled(g, tile_side(g), weight)
}

/// As `prepare_with`, for output tiles of side `m` (2 or 4).
/// Per call in training, so cheap: blocks of 8 output channels in parallel, each input channel's
/// values computed for the 8 at once and stored as the runs the register tile reads.
pub fn prepare_tiled(g: &Geom, m: usize, weight: impl Fn(usize, usize, usize) -> f32 + Sync) -> Weights {
    let gm: &[[f32; 3]] = if m == 4 { &G4 } else { &G2 };
    let a = gm.len();
    assert!(m == a - 2 && g.sp[1].is_multiple_of(m) && g.sp[2].is_multiple_of(m));
    let cp = g.c_out.next_multiple_of(OB);
    let slab = cp * g.c_in;
    let run = g.c_in * OB;
    let mut u = Vec::with_capacity(a * a * slab);
    let u_ptr = SyncPtr(u.as_mut_ptr());
    (0..cp / OB).into_par_iter().for_each(|ob| {
        for c in 0..g.c_in {
            // k[t][o]: tap t of the block's 8 output channels (zero past c_out).
            let mut k = [[0.0f32; OB]; 9];
            for (t, kt) in k.iter_mut().enumerate() {
                for (o, v) in kt.iter_mut().enumerate() {
                    if ob * OB + o < g.c_out {
                        *v = weight(ob * OB + o, c, t);
                    }
                }
            }
            // (G k)[i][col] for the three kernel columns, then ((G k) G^T)[i][j].
            let comb = |r: &[f32; 3], x: [&[f32; OB]; 3]| -> [f32; OB] {
                std::array::from_fn(|o| r[0] * x[0][o] + r[1] * x[1][o] + r[2] * x[2][o])
            };
            for (i, ri) in gm.iter().enumerate() {
                let gk: [[f32; OB]; 3] = std::array::from_fn(|col| comb(ri, [&k[col], &k[3 + col], &k[6 + col]]));
                for (j, rj) in gm.iter().enumerate() {
                    let vals = comb(rj, [&gk[0], &gk[1], &gk[2]]);
                    // SAFETY: block ob alone writes runs [k][ob][c][..8] of the a² · slab floats.
                    unsafe {
                        let at = u_ptr.get().add((i * a + j) * slab + ob * run + c * OB);
                        std::ptr::copy_nonoverlapping(vals.as_ptr(), at, OB);
                    }
                }
            }
        }
    });
    // SAFETY: the blocks wrote every (k, ob, c) run.
    unsafe { u.set_len(a * a * slab) };
    Weights { u, c_out_pad: cp, m }
}

/// Tile rows per unit and output-channel groups for tiles of side `m`: the unit's V and M
/// ((m + 2)² floats per tile and channel each) near 1 MB so they stay in L2, tile counts in whole vectors where the rows allow
/// it, and at least two units per thread; where the image has too few tile rows for that, the
/// output channels are split too (each group redoes the cheap input transform), unless `whole`
/// (a fused head needs every channel of a pixel in one unit).
fn units(g: &Geom, m: usize, whole: bool) -> (usize, usize) {
    units_of(g, (g.sp[1] / m, g.sp[2] / m), (m + 2).pow(2), whole)
}

/// `units` for `th` tile rows of `tw` tiles per image with `kk` transformed positions per tile
/// (3D counts the tile rows of all its tile planes).
pub(super) fn units_of(g: &Geom, (th, tw): (usize, usize), kk: usize, whole: bool) -> (usize, usize) {
    let target = if cfg!(test) { 16 } else { (262144 / kk / (g.c_in + g.c_out)).max(TT) };
    let mut rows = (target / tw).clamp(1, th);
    while !(rows * tw).is_multiple_of(16) && rows < th && rows * tw < 2 * target {
        rows += 1;
    }
    let want = 2 * rayon::current_num_threads();
    let blocks = |rows: usize| g.n * th.div_ceil(rows);
    // Smaller blocks for the threads, while they keep a register tile's worth of tiles.
    while blocks(rows) < want && rows > 1 && rows.div_ceil(2) * tw >= TT {
        rows = rows.div_ceil(2);
    }
    let per_group = |groups: usize| g.c_out.div_ceil(groups).next_multiple_of(OB);
    let mut groups = 1;
    while !whole && blocks(rows) * groups < want && per_group(groups + 1) < per_group(groups) {
        groups += 1;
    }
    (rows, per_group(groups))
}

/// A row stride of at least `floats` (a multiple of 16) that is an odd number of cache lines:
/// the transforms write and read 16 or 36 rows at once, and rows a multiple of 4 KB apart (32
/// channels of 96 tiles, say) all fall in one L1 set of 12 ways.
pub(super) fn spread(floats: usize) -> usize {
    if (floats / 16).is_multiple_of(2) { floats + 16 } else { floats }
}

/// One input channel: its part, the channels in the part, the channel within it, and whether the
/// part is at half resolution (read as its 2x linear up-sampling). Planes are read where they lie.
#[derive(Clone, Copy)]
pub(super) struct Plane<'a> {
    pub(super) part: &'a [f32],
    pub(super) channels: usize,
    pub(super) channel: usize,
    half: bool,
}

/// The input channels of the parts `xs`, the last at half resolution if `half`.
pub(super) fn channel_planes<'a>(g: &Geom, xs: &[&'a [f32]], half: bool) -> Vec<Plane<'a>> {
    let planes: Vec<_> = xs
        .iter()
        .enumerate()
        .flat_map(|(k, &part)| {
            let half = half && k + 1 == xs.len();
            let channels = part.len() / (g.n * g.pixels() / if half { 4 } else { 1 });
            (0..channels).map(move |channel| Plane { part, channels, channel, half })
        })
        .collect();
    assert_eq!(planes.len(), g.c_in, "parts must add up to c_in channels");
    planes
}

/// What the output transform does besides (or instead of) storing y, while a tile row is still
/// in registers: inference passes that would read y again at once.
pub enum Epilogue<'a> {
    /// y alone.
    Store,
    /// Also y's 2x2 max pooling (n, c_out, h/2, w/2): the encoder node's output, pooled for the
    /// node below it, without a pass over y.
    Pool(&'a mut [MaybeUninit<f32>]),
    /// Instead of y, the 1x1 convolution of y to `b.len()` channels (weights `w`
    /// [classes][c_out], bias `b`) into `out` (n, classes, h, w): a head on a node nothing else
    /// reads, whose channels would otherwise be stored only to be summed. The output-channel
    /// groups of a unit are then never split.
    Head { w: &'a [f32], b: &'a [f32], out: &'a mut [MaybeUninit<f32>] },
}

/// y = conv(cat(xs), w) + b, then max(0, y) if `relu`, for NCHW slices; the input is the channel
/// concatenation of the parts `xs`, read in place, and so is the output of the parts `ys` (the
/// input gradient of a concatenation transforms dL/dy once for all its parts). Every element of
/// `ys` is written, and of the epilogue's output; with `Epilogue::Head`, `ys` is empty. With
/// `half`, the last part is at half resolution and enters as its 2x linear up-sampling
/// (align_corners = false): each unit up-samples the rows it transforms, in L1, so that a nested
/// node's largest input is never stored.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    g: &Geom,
    (xs, half): (&[&[f32]], bool),
    wt: &Weights,
    b: &[f32],
    relu: bool,
    ys: &mut [&mut [MaybeUninit<f32>]],
    epi: Epilogue,
) {
    assert_avx512("the Winograd convolution");
    if g.k[0] == 3 {
        assert!(!half && matches!(epi, Epilogue::Store), "3D Winograd neither up-samples nor fuses an epilogue");
        return winograd3d::forward(g, xs, wt, b, relu, ys);
    }
    let [_, h, wd] = g.sp;
    let side = wt.m;
    let kk = (side + 2) * (side + 2);
    let (th, tw, p) = (h / side, wd / side, h * wd);
    assert!(applies2(g) && b.len() == g.c_out && wt.c_out_pad == g.c_out.next_multiple_of(OB));
    assert!(h.is_multiple_of(side) && wd.is_multiple_of(side));
    assert_eq!(wt.u.len(), kk * wt.c_out_pad * g.c_in, "weights prepared for another geometry");
    // The epilogue's output and, for a head, its weights: (pooled, head out, head w, head b).
    let null = SyncPtr(std::ptr::null_mut());
    let (pooled, head, hw, hb): (SyncPtr, SyncPtr, &[f32], &[f32]) = match epi {
        Epilogue::Store => (null, null, &[], &[]),
        Epilogue::Pool(y) => {
            assert_eq!(y.len(), g.n * g.c_out * p / 4, "pooled output of another geometry");
            (SyncPtr(y.as_mut_ptr().cast()), null, &[], &[])
        }
        Epilogue::Head { w, b, out } => {
            assert!(ys.is_empty() && w.len() == b.len() * g.c_out && out.len() == g.n * b.len() * p);
            (null, SyncPtr(out.as_mut_ptr().cast()), w, b)
        }
    };
    let classes = hb.len();
    // Output channel o as (its part's first element, channels in the part, channel within it).
    let outs: Vec<(SyncPtr, usize, usize)> = ys
        .iter_mut()
        .flat_map(|y| {
            let cp = y.len() / (g.n * p);
            assert_eq!(y.len(), g.n * cp * p, "output parts must be whole NCHW tensors");
            let at = SyncPtr(y.as_mut_ptr().cast::<f32>());
            (0..cp).map(move |c| (at, cp, c))
        })
        .collect();
    assert!(outs.len() == g.c_out || classes > 0, "output parts must add up to c_out channels");
    let planes = channel_planes(g, xs, half);
    let (rows, group) = units(g, side, classes > 0);
    let work: Vec<(usize, usize, usize)> = (0..g.n)
        .flat_map(|n| (0..th).step_by(rows).flat_map(move |r0| (0..g.c_out).step_by(group).map(move |o0| (n, r0, o0))))
        .collect();
    work.into_par_iter().for_each(|(n, r0, o0)| {
        let r1 = (r0 + rows).min(th);
        let o1 = (o0 + group).min(g.c_out);
        let tb = (r1 - r0) * tw;
        let tbp = tb.next_multiple_of(16);
        // Input channels in chunks whose V (~512 KB) stays in L2 for the products that read it:
        // a 12² layer of 768 channels has 2.4 MB of V, which the products read from L3 once
        // per 8 output channels.
        let chunk = if cfg!(test) { 8 } else { (131072 / (kk * tbp)).next_multiple_of(8) }.min(g.c_in);
        let (vs, ms) = (spread(chunk * tbp), spread(group * tbp));
        let (mut v_buf, va) = aligned(kk * vs);
        let (mut m_buf, ma) = aligned(kk * ms);
        let v = v_buf[va..].as_mut_ptr();
        let m = m_buf[ma..].as_mut_ptr();
        // SAFETY: V has kk rows of vs ≥ chunk · tbp and M kk rows of ms ≥ `group` · tbp floats, 64-byte
        // aligned; the plane reads stay inside each plane (load masks); this unit alone writes
        // output rows side·r0 .. side·r1 of channels o0 .. o1 of image n, their pooled rows, or
        // (every channel in one unit) the head's rows (asserted lengths above).
        unsafe {
            for c0 in (0..g.c_in).step_by(chunk) {
                let cn = chunk.min(g.c_in - c0);
                transform_input(&planes[c0..c0 + cn], n, g.sp, side, (r0, r1), v, vs);
                products(wt, g.c_in, (c0, cn), (o0, o1), (v, vs), (m, ms), tbp);
            }
            // The head's rows of this unit start as its bias; each channel adds its share.
            let span = side * (r1 - r0) * wd;
            let head_rows = |c: usize| head.get().add((n * classes + c) * p + side * r0 * wd);
            for (c, &hbc) in hb.iter().enumerate() {
                std::slice::from_raw_parts_mut(head_rows(c), span).fill(hbc);
            }
            // Where output channel o's tile row ty goes.
            let sink = |o: usize, ty: usize| {
                if classes > 0 {
                    let acc = head_rows(0).add(side * (ty - r0) * wd);
                    Sink::Sum { acc, stride: p, w: hw.as_ptr().add(o), wstride: g.c_out, classes }
                } else {
                    let (y, cp, co) = outs[o];
                    let out = y.get().add((n * cp + co) * p + side * ty * wd);
                    let pooled = match pooled.get().is_null() {
                        true => pooled.get(),
                        false => pooled.get().add((n * g.c_out + o) * p / 4 + side / 2 * ty * wd / 2),
                    };
                    Sink::Rows { out, pooled }
                }
            };
            for (o, &bias) in b.iter().enumerate().take(o1).skip(o0) {
                let mo = m.add((o - o0) * tbp);
                if side == 4 && tw.is_multiple_of(4) {
                    output_tiles4(mo, ms, (tb, tw, wd), bias, relu, sink(o, r0));
                    continue;
                }
                for ty in r0..r1 {
                    let mrow = mo.add((ty - r0) * tw);
                    if side == 4 {
                        output_row4(mrow, ms, wd, bias, relu, sink(o, ty));
                    } else {
                        output_row(mrow, ms, wd, bias, relu, sink(o, ty));
                    }
                }
            }
        }
        recycle(v_buf);
        recycle(m_buf);
    });
}

/// M_k = U_k · V_k (added to M for a later chunk of input channels, c0 > 0) for every
/// transformed position k of the weights (16, 36 or 64: the products do not care which),
/// output channels o0..o1 of the unit, input channels c0..c0 + cn of c_in, in register tiles
/// of 8 channels x 48 tiles: V_k at v + k · vs (cn rows of tbp), M_k at m + k · ms (a row of
/// tbp per output channel from o0).
///
/// # Safety
/// - The CPU runs AVX-512F; o0 is a multiple of 8, o1 ≤ the weights' padded output channels
///   and c0 + cn ≤ c_in, the weights' input channels.
/// - V and M are 64-byte aligned, tbp and the strides multiples of 16; V holds the positions'
///   cn initialised rows of tbp floats, M (o1 - o0) rounded up to 8 writable rows of tbp
///   (initialised if c0 > 0).
pub(super) unsafe fn products(
    wt: &Weights,
    c_in: usize,
    (c0, cn): (usize, usize),
    (o0, o1): (usize, usize),
    (v, vs): (*const f32, usize),
    (m, ms): (*mut f32, usize),
    tbp: usize,
) {
    let slab = wt.c_out_pad * c_in;
    // SAFETY: the caller's V, M and channel ranges (above); U holds kk · slab floats.
    unsafe {
        for k in 0..wt.u.len() / slab {
            let vk = v.add(k * vs);
            let mk = m.add(k * ms);
            for t0 in (0..tbp).step_by(TT) {
                for ob in (0..o1 - o0).step_by(OB) {
                    let uk = wt.u.as_ptr().add(k * slab + (o0 + ob) * c_in + c0 * OB);
                    let (vt, mt) = (vk.add(t0), mk.add(ob * tbp + t0));
                    let add = c0 > 0;
                    match (tbp - t0).min(TT) / 16 {
                        3 => tile::<3>(uk, vt, tbp, cn, mt, add),
                        2 => tile::<2>(uk, vt, tbp, cn, mt, add),
                        _ => tile::<1>(uk, vt, tbp, cn, mt, add),
                    }
                }
            }
        }
    }
}

/// dL/dw ([c_out][c_in][3][3]) from the forward input (the parts `xs` of a channel
/// concatenation, read in place) and dL/dy: with dM = A dY A^T per tile (4x4 from the 2x2 output
/// gradient), dL/dU_k = Σ_tiles dM_k · V_k^T, 16 products over the tiles with 2.25x fewer
/// multiplications than the direct weight gradient, and dL/dw = G^T dL/dU G. dM is built from a
/// channels-last copy of the unit's dy rows, so that its vectors run over output channels and the
/// register tile (8-12 input channels x 32-48 output channels) broadcasts V, which the forward's
/// input transform writes. The threads split the input channels, each summing its units into its
/// own rows of dL/dU.
pub fn backward_w(g: &Geom, xs: &[&[f32]], dy: &[f32]) -> Vec<f32> {
    assert_avx512("the Winograd weight gradient");
    if g.k[0] == 3 {
        return winograd3d::backward_w(g, xs, dy);
    }
    let [_, h, wd] = g.sp;
    let (th, tw, p) = (h / 2, wd / 2, h * wd);
    assert!(applies2(g) && dy.len() == g.n * g.c_out * p);
    let planes = channel_planes(g, xs, false);
    let cpo = g.c_out.next_multiple_of(16);
    let (rows, _) = units(&Geom { c_out: cpo, ..*g }, 2, false);
    let (per_group, groups, items) = weight_work(g, th, rows);
    let sums: Vec<(usize, Vec<f32>)> = items
        .into_par_iter()
        .map(|(gr, chunk)| {
            let (c0, c1) = (gr * per_group, ((gr + 1) * per_group).min(g.c_in));
            let cpi = per_group;
            let mut du = vec![0.0f32; 16 * cpi * cpo];
            for &(n, r0) in &chunk {
                let r1 = (r0 + rows).min(th);
                let tb = (r1 - r0) * tw;
                let tbp = tb.next_multiple_of(16);
                let (vs, ds) = (spread(cpi * tbp), spread(tbp * cpo));
                let (mut v_buf, va) = aligned(16 * vs);
                let (mut cl_buf, ca) = aligned(2 * (r1 - r0) * wd * cpo);
                let (mut dm_buf, da) = aligned(16 * ds);
                let v = v_buf[va..].as_mut_ptr();
                let cl = &mut cl_buf[ca..][..2 * (r1 - r0) * wd * cpo];
                let dm = dm_buf[da..].as_mut_ptr();
                // SAFETY: V holds 16 rows of vs ≥ cpi · tbp floats, the channels-last rows
                // 2(r1 - r0) rows of wd · cpo, dM 16 of ds ≥ tbp · cpo, all 64-byte aligned; planes are read
                // inside (load masks); `du` holds 16 · cpi · cpo.
                unsafe {
                    transform_input(&planes[c0..c1], n, g.sp, 2, (r0, r1), v, vs);
                    // The register tiles' rows past the group's last channel: zero.
                    for k in 0..16 {
                        std::ptr::write_bytes(v.add(k * vs + (c1 - c0) * tbp), 0, (cpi - (c1 - c0)) * tbp);
                    }
                    let image = &dy[n * g.c_out * p..][..g.c_out * p];
                    for y in 2 * r0..2 * r1 {
                        let row = &mut cl[(y - 2 * r0) * wd * cpo..];
                        transpose_row(image, p, g.c_out, y * wd, wd, row, cpo, (0, cpo));
                    }
                    output_gradient(cl, wd, r1 - r0, cpo, dm, tbp, ds);
                    weight_products(&mut du, (cpi, cpo, tbp), (v, vs), (dm, ds));
                }
                recycle(v_buf);
                recycle(cl_buf);
                recycle(dm_buf);
            }
            (gr, du)
        })
        .collect();
    // Each group's sums added, then dL/dw[o][c] = G^T dL/dU[.][c][o] G for 16 output channels
    // at a time (dU's runs over o are contiguous).
    let du = sum_groups(groups, sums);
    let mut dw = vec![0.0f32; g.c_out * g.c_in * 9];
    dw.par_chunks_mut(16 * g.c_in * 9).enumerate().for_each(|(ob, rows)| {
        let o0 = 16 * ob;
        let valid = rows.len() / (g.c_in * 9);
        for c in 0..g.c_in {
            let group = &du[c / per_group];
            let u: [&[f32]; 16] = std::array::from_fn(|k| &group[(k * per_group + c % per_group) * cpo + o0..][..16]);
            // (dU G)[i][m], then G^T of that; G's columns are (1, .5, .5, 0), (0, .5, -.5, 0),
            // (0, .5, .5, 1).
            let ug: [[[f32; 16]; 3]; 4] = std::array::from_fn(|i| {
                let r = &u[i * 4..][..4];
                [
                    lanes(|l| r[0][l] + 0.5 * (r[1][l] + r[2][l])),
                    lanes(|l| 0.5 * (r[1][l] - r[2][l])),
                    lanes(|l| 0.5 * (r[1][l] + r[2][l]) + r[3][l]),
                ]
            });
            for m in 0..3 {
                let col = [&ug[0][m], &ug[1][m], &ug[2][m], &ug[3][m]];
                let taps = [
                    lanes(|l| col[0][l] + 0.5 * (col[1][l] + col[2][l])),
                    lanes(|l| 0.5 * (col[1][l] - col[2][l])),
                    lanes(|l| 0.5 * (col[1][l] + col[2][l]) + col[3][l]),
                ];
                for (l3, tap) in taps.iter().enumerate() {
                    for (o, v) in tap.iter().enumerate().take(valid) {
                        rows[(o * g.c_in + c) * 9 + l3 * 3 + m] = *v;
                    }
                }
            }
        }
    });
    dw
}

/// A thread's share of a weight gradient: (input-channel group, units as (image, first tile row)).
pub(super) type WeightItem = (usize, Vec<(usize, usize)>);

/// How the weight gradients split their work: the threads split the input channels (each
/// computes V and dL/dU for its own, and dM for all output channels, which is cheap), in groups
/// of whole register tiles (24 channels); where there are fewer groups than threads, the units
/// (of `rows` of the `th` tile rows of each image) too, and those sums are added
/// (`sum_groups`). Returns the channels per group, the groups, and the items: (group, units as
/// (image, first tile row)).
pub(super) fn weight_work(g: &Geom, th: usize, rows: usize) -> (usize, usize, Vec<WeightItem>) {
    let threads = rayon::current_num_threads();
    let per_group = g.c_in.div_ceil(24).div_ceil(threads).max(1) * 24;
    let groups = g.c_in.div_ceil(per_group);
    let work: Vec<(usize, usize)> = (0..g.n).flat_map(|n| (0..th).step_by(rows).map(move |r0| (n, r0))).collect();
    let per = work.len().div_ceil(threads.div_ceil(groups));
    let items = (0..groups).flat_map(|gr| work.chunks(per).map(move |w| (gr, w.to_vec()))).collect();
    (per_group, groups, items)
}

/// The items' dL/dU sums per group (`weight_work`), those of one group added (vectorised, in
/// parallel).
pub(super) fn sum_groups(groups: usize, sums: Vec<(usize, Vec<f32>)>) -> Vec<Vec<f32>> {
    let mut du: Vec<Vec<f32>> = vec![vec![]; groups];
    for (gr, s) in sums {
        if du[gr].is_empty() {
            du[gr] = s;
        } else {
            du[gr]
                .par_chunks_mut(1 << 14)
                .zip(s.par_chunks(1 << 14))
                .for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, b)| *a += b));
        }
    }
    du
}

/// dU_k[c][o] += Σ_t V_k[c][t] · dM_k[t][o] for every transformed position k (du holds
/// du.len() / (cpi · cpo) of them: 16 in 2D, 64 in 3D), in register tiles of 8-24 input x
/// 16-48 output channels.
///
/// # Safety
/// - The CPU runs AVX-512F; cpi is a multiple of 24, cpo of 16, tbp of 16.
/// - V_k (cpi initialised rows of tbp floats) at v + k · vs; dM_k (tbp rows of cpo initialised
///   floats, 64-byte aligned) at dm + k · ds.
pub(super) unsafe fn weight_products(
    du: &mut [f32],
    (cpi, cpo, tbp): (usize, usize, usize),
    (v, vs): (*const f32, usize),
    (dm, ds): (*const f32, usize),
) {
    let nv = (cpo / 16).min(3);
    // SAFETY: the caller's V and dM (above); dU holds kk · cpi · cpo floats.
    unsafe {
        for k in 0..du.len() / (cpi * cpo) {
            let (vk, dmk) = (v.add(k * vs), dm.add(k * ds));
            let duk = du.as_mut_ptr().add(k * cpi * cpo);
            for oc in (0..cpo).step_by(16 * nv) {
                let at = |c: usize| (vk.add(c * tbp), dmk.add(oc), duk.add(c * cpo + oc));
                match (cpo - oc) / 16 {
                    1 => (0..cpi).step_by(24).for_each(|c| {
                        let (a, b, d) = at(c);
                        wtile::<1, 24>(a, b, tbp, cpo, d)
                    }),
                    2 => (0..cpi).step_by(12).for_each(|c| {
                        let (a, b, d) = at(c);
                        wtile::<2, 12>(a, b, tbp, cpo, d)
                    }),
                    _ => (0..cpi).step_by(8).for_each(|c| {
                        let (a, b, d) = at(c);
                        wtile::<3, 8>(a, b, tbp, cpo, d)
                    }),
                }
            }
        }
    }
}

fn lanes(f: impl Fn(usize) -> f32) -> [f32; 16] {
    std::array::from_fn(f)
}

/// dM = A dY A^T for the tiles of `rows` tile rows, from their output-gradient rows channels-last
/// (`cl`: 2 · rows rows of wd pixels x cpo channels): dM_k for tile t at `dm + k · kstride + t · cpo`,
/// padding tiles zero.
///
/// # Safety
/// - The CPU runs AVX-512F.
/// - `cl` holds 2 · rows · wd · cpo floats, wd is even and cpo a multiple of 16.
/// - `dm` is 64-byte aligned and valid for writes of 16 rows of `kstride` floats, `kstride` a
///   multiple of 16 and at least tbp · cpo, and tbp ≥ rows · wd / 2.
#[target_feature(enable = "avx512f")]
unsafe fn output_gradient(cl: &[f32], wd: usize, rows: usize, cpo: usize, dm: *mut f32, tbp: usize, kstride: usize) {
    // SAFETY: `cl` holds 2 · rows · wd · cpo floats; the caller gives dM room for 16 rows of
    // kstride ≥ tbp · cpo.
    unsafe {
        let tw = wd / 2;
        let zero = _mm512_setzero_ps();
        for t in rows * tw..tbp {
            for k in 0..16 {
                for ov in (0..cpo).step_by(16) {
                    _mm512_store_ps(dm.add(k * kstride + t * cpo + ov), zero);
                }
            }
        }
        for ty in 0..rows {
            for tx in 0..tw {
                let t = ty * tw + tx;
                for ov in (0..cpo).step_by(16) {
                    let px = |y: usize, x: usize| {
                        _mm512_loadu_ps(cl.as_ptr().add(((2 * ty + y) * wd + 2 * tx + x) * cpo + ov))
                    };
                    let (a, b, c, d) = (px(0, 0), px(0, 1), px(1, 0), px(1, 1));
                    // Rows of A dY: (a, b), (a + c, b + d), (a - c, b - d), (-c, -d); each row
                    // (p, q) times A^T: (p, p + q, p - q, -q).
                    let rows4 = [
                        (a, b),
                        (_mm512_add_ps(a, c), _mm512_add_ps(b, d)),
                        (_mm512_sub_ps(a, c), _mm512_sub_ps(b, d)),
                        (_mm512_sub_ps(zero, c), _mm512_sub_ps(zero, d)),
                    ];
                    for (i, (p, q)) in rows4.into_iter().enumerate() {
                        let vals = [p, _mm512_add_ps(p, q), _mm512_sub_ps(p, q), _mm512_sub_ps(zero, q)];
                        for (j, x) in vals.into_iter().enumerate() {
                            _mm512_store_ps(dm.add((i * 4 + j) * kstride + t * cpo + ov), x);
                        }
                    }
                }
            }
        }
    }
}

/// dU_k[c][o..o + 16·NV] += Σ_t V_k[c][t] · dM_k[t][o..] for CB input channels, in registers.
///
/// # Safety
/// - The CPU runs AVX-512F.
/// - `v` holds CB rows of tbp initialised floats at stride tbp.
/// - `dm` is 64-byte aligned, cpo a multiple of 16, and dM holds tbp rows of 16·NV initialised
///   floats at stride cpo.
/// - `du` holds CB rows of 16·NV initialised floats at stride cpo, readable and writable.
#[target_feature(enable = "avx512f")]
unsafe fn wtile<const NV: usize, const CB: usize>(v: *const f32, dm: *const f32, tbp: usize, cpo: usize, du: *mut f32) {
    // SAFETY: the caller passes CB rows of V of tbp floats at stride tbp, dM rows of 16·NV floats
    // (64-byte aligned) at stride cpo for tbp tiles, and CB rows of dU at stride cpo.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); NV]; CB];
        for t in 0..tbp {
            let mut x = [_mm512_setzero_ps(); NV];
            for (j, xj) in x.iter_mut().enumerate() {
                *xj = _mm512_load_ps(dm.add(t * cpo + 16 * j));
            }
            for (c, acc_c) in acc.iter_mut().enumerate() {
                let s = _mm512_set1_ps(*v.add(c * tbp + t));
                for j in 0..NV {
                    acc_c[j] = _mm512_fmadd_ps(s, x[j], acc_c[j]);
                }
            }
        }
        for (c, acc_c) in acc.iter().enumerate() {
            for (j, a) in acc_c.iter().enumerate() {
                let at = du.add(c * cpo + 16 * j);
                _mm512_storeu_ps(at, _mm512_add_ps(_mm512_loadu_ps(at), *a));
            }
        }
    }
}

/// V for the tiles (of side m) of tile rows r0..r1 of image n, one channel (`planes`) after
/// another: channel c's (m + 2)² rows of tbp tiles at `v + c · tbp + k · kstride`, padding tiles (past the unit's)
/// zero: they feed only padding columns of the products, but must not be NaN or denormal
/// (pooled memory holds anything). The rows the transform reads from the channel PF ahead are
/// prefetched: the planes are a page or more apart and a few lines are read from each, a pattern
/// the hardware prefetchers miss. Half-resolution planes have those rows of their up-sampling
/// made first, into a buffer that stays in L1.
///
/// # Safety
/// - The CPU runs AVX-512F.
/// - m is 2 or 4, h and wd are multiples of m, and r0 < r1 ≤ h / m (the planes' slices are
///   bounds-checked).
/// - `v` is valid for writes of (m + 2)² rows of `kstride` floats, each holding planes.len()
///   rows of tbp, (r1 - r0) · wd / m rounded up to a multiple of 16.
unsafe fn transform_input<'a>(
    planes: &[Plane<'a>],
    n: usize,
    [_, h, wd]: [usize; 3],
    m: usize,
    (r0, r1): (usize, usize),
    v: *mut f32,
    kstride: usize,
) {
    let p = h * wd;
    let tb = (r1 - r0) * (wd / m);
    let tbp = tb.next_multiple_of(16);
    let (i0, i1) = ((m * r0).saturating_sub(1), (m * r1 + 1).min(h));
    let plane = |pl: &Plane<'a>| -> &'a [f32] {
        let size = if pl.half { p / 4 } else { p };
        &pl.part[(n * pl.channels + pl.channel) * size..][..size]
    };
    // The rows i0..i1 that the transform reads, of a half-resolution plane's up-sampling.
    let mut upsampled =
        vec![MaybeUninit::<f32>::uninit(); if planes.iter().any(|pl| pl.half) { (i1 - i0) * wd } else { 0 }];
    let mut wide = Vec::new();
    for (c, at) in planes.iter().enumerate() {
        if let Some(ahead) = planes.get(c + PF) {
            let rows = match ahead.half {
                false => &plane(ahead)[i0 * wd..i1 * wd],
                true => &plane(ahead)[(i0 / 2).saturating_sub(1) * wd / 2..(i1.div_ceil(2) + 1).min(h / 2) * wd / 2],
            };
            prefetch(rows);
        }
        // The plane's rows i0..i1 from `rows`: row r at rows + r · wd (only those are read).
        let rows = match at.half {
            false => plane(at).as_ptr(),
            true => {
                upsample::plane_rows(plane(at), h / 2, wd / 2, (i0, i1), &mut wide, &mut upsampled);
                upsampled.as_ptr().cast::<f32>().wrapping_sub(i0 * wd)
            }
        };
        // SAFETY: the transforms read rows i0..i1 of the plane (all of it, or the up-sampled
        // rows just written); room for V is the caller's promise.
        unsafe {
            if m == 4 {
                input_rows4(rows, h, wd, r0, r1, v.add(c * tbp), kstride);
            } else {
                input_rows(rows, h, wd, r0, r1, v.add(c * tbp), kstride);
            }
            // Most units have no padding tiles; where they have, masked stores: a memset call
            // per row was 2.5% of a fast:1 forward pass (and, called even for nothing, 5% of
            // a forward).
            if tbp > tb {
                for k in 0..(m + 2) * (m + 2) {
                    zero(v.add(k * kstride + c * tbp + tb), tbp - tb);
                }
            }
        }
    }
}

/// Writes `n` zeros from `at`.
///
/// # Safety
/// The CPU runs AVX-512F, and `at` is valid for writes of `n` floats.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn zero(at: *mut f32, n: usize) {
    for i in (0..n).step_by(16) {
        // SAFETY: the caller's `n` floats from `at` are writable; lanes past them are masked off.
        unsafe { _mm512_mask_storeu_ps(at.add(i), first(n - i), _mm512_setzero_ps()) };
    }
}

/// Lanes `l` of 16 whose column `start + l` lies in `0..wd`.
pub(super) fn columns(start: isize, wd: usize) -> u16 {
    let lo = (-start).clamp(0, 16) as u32;
    let hi = (wd as isize - start).clamp(0, 16) as u32;
    let upto = |b: u32| if b >= 16 { u16::MAX } else { (1u16 << b) - 1 };
    upto(hi) & !upto(lo)
}

/// The first `lanes` of 16.
pub(super) fn first(lanes: usize) -> u16 {
    if lanes >= 16 { u16::MAX } else { (1u16 << lanes) - 1 }
}

/// V = B^T d B for the tiles of tile rows r0..r1 of one channel's plane: V_k for tile t (counted
/// from the first tile of row r0) at `v + k · kstride + t`. Consecutive tile rows share two input
/// rows, which are split into even and odd columns once.
///
/// # Safety
/// - The CPU runs AVX-512F; wd is even and r0 ≤ r1.
/// - The plane's rows 2·r0 - 1 ..= 2·r1 that lie in 0..h hold wd readable, initialised floats
///   each, row r at `plane + r · wd` (only those are read; the zero padding is masked off).
/// - `v` is valid for writes of 16 rows at stride `kstride` of (r1 - r0) · wd / 2 floats each.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn input_rows(plane: *const f32, h: usize, wd: usize, r0: usize, r1: usize, v: *mut f32, kstride: usize) {
    // SAFETY: the caller passes a plane whose rows 2·r0 - 1 .. 2·r1 + 1 (those inside 0..h) of wd
    // floats are readable at plane + row · wd, and room for 16 rows of V at stride
    // `kstride` from `v`; loads outside the plane's rows and columns are not made or masked off.
    unsafe {
        let tw = wd / 2;
        for k0 in (0..tw).step_by(16) {
            // padded column 2·t + j of tile t = k0 + l is input column 2·k0 - 1 + 2·l + j.
            let col0 = 2 * k0 as isize - 1;
            let masks = [0, 16, 2, 18].map(|off| columns(col0 + off, wd));
            // padded row 2·ty + i is input row 2·ty + i - 1; rows outside are the zero padding.
            let split = |r: isize| {
                if r < 0 || r >= h as isize {
                    [_mm512_setzero_ps(); 4]
                } else {
                    split_row(plane.wrapping_add(r as usize * wd), col0, masks)
                }
            };
            let mut d = [
                split(2 * r0 as isize - 1),
                split(2 * r0 as isize),
                [_mm512_setzero_ps(); 4],
                [_mm512_setzero_ps(); 4],
            ];
            let mask = first(tw - k0);
            for ty in r0..r1 {
                d[2] = split(2 * ty as isize + 1);
                d[3] = split(2 * ty as isize + 2);
                let mut t = [[_mm512_setzero_ps(); 4]; 4];
                for j in 0..4 {
                    t[0][j] = _mm512_sub_ps(d[0][j], d[2][j]);
                    t[1][j] = _mm512_add_ps(d[1][j], d[2][j]);
                    t[2][j] = _mm512_sub_ps(d[2][j], d[1][j]);
                    t[3][j] = _mm512_sub_ps(d[1][j], d[3][j]);
                }
                let at = v.add((ty - r0) * tw + k0);
                for (i, ti) in t.iter().enumerate() {
                    let vi = [
                        _mm512_sub_ps(ti[0], ti[2]),
                        _mm512_add_ps(ti[1], ti[2]),
                        _mm512_sub_ps(ti[2], ti[1]),
                        _mm512_sub_ps(ti[1], ti[3]),
                    ];
                    for (j, x) in vi.into_iter().enumerate() {
                        _mm512_mask_storeu_ps(at.add((i * 4 + j) * kstride), mask, x);
                    }
                }
                d[0] = d[2];
                d[1] = d[3];
            }
        }
    }
}

/// permutex2var indices of the even and of the odd lanes of two vectors (a:b, 32 lanes).
#[target_feature(enable = "avx512f")]
#[inline]
fn even_odd() -> (__m512i, __m512i) {
    (
        _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30),
        _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31),
    )
}

/// Columns col0 + 2·l + j (j = 0..4) of a row, as 4 vectors over l = 0..16, zero outside the
/// row: `masks` are the `columns` of the loads from col0 + 0, 16, 2 and 18 (the same for every
/// row, so the caller computes them once).
///
/// # Safety
/// The CPU runs AVX-512F, and for each load s every lane l set in `masks[s]` reads a readable,
/// initialised float at `row + col0 + [0, 16, 2, 18][s] + l` (masked-off lanes read nothing).
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) unsafe fn split_row(row: *const f32, col0: isize, masks: [u16; 4]) -> [__m512; 4] {
    let (even, odd) = even_odd();
    let mut q = [_mm512_setzero_ps(); 4];
    for (s, off) in [0isize, 16, 2, 18].into_iter().enumerate() {
        // SAFETY: lanes outside the row are masked off (and masked lanes are never read).
        q[s] = unsafe { _mm512_maskz_loadu_ps(masks[s], row.wrapping_offset(col0 + off)) };
    }
    [
        _mm512_permutex2var_ps(q[0], even, q[1]),
        _mm512_permutex2var_ps(q[0], odd, q[1]),
        _mm512_permutex2var_ps(q[2], even, q[3]),
        _mm512_permutex2var_ps(q[2], odd, q[3]),
    ]
}

/// V = B^T d B for tiles of side 4 (6x6 input tiles) of tile rows r0..r1 of one channel's plane,
/// laid out as `input_rows`'. Each input row is split into the six column phases and transformed
/// along the row once; consecutive tile rows share two of their six rows.
///
/// # Safety
/// As `input_rows`', for tiles of side 4: wd a multiple of 4, the plane's rows 4·r0 - 1 ..= 4·r1
/// that lie in 0..h readable, and 36 rows of V of (r1 - r0) · wd / 4 floats.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn input_rows4(plane: *const f32, h: usize, wd: usize, r0: usize, r1: usize, v: *mut f32, kstride: usize) {
    // SAFETY: as `input_rows`, for rows 4·r0 - 1 .. 4·r1 + 1.
    unsafe {
        let tw = wd / 4;
        for k0 in (0..tw).step_by(16) {
            // padded column 4·t + j of tile t = k0 + l is input column 4·k0 - 1 + 4·l + j.
            let col0 = 4 * k0 as isize - 1;
            let masks: [u16; 5] = std::array::from_fn(|s| columns(col0 + 16 * s as isize, wd));
            let row = |r: isize| {
                if r < 0 || r >= h as isize {
                    [_mm512_setzero_ps(); 6]
                } else {
                    bt6(split_row4(plane.wrapping_add(r as usize * wd), col0, masks))
                }
            };
            let mask = first(tw - k0);
            // The rows transformed along the row, in a ring of six (every slot is written
            // before it is read: no zeroing, which was a memset per call); the columns are
            // transformed and stored one at a time, so that only the ring lives in memory.
            let mut ring = MaybeUninit::<[[__m512; 6]; 6]>::uninit();
            let ring = ring.as_mut_ptr().cast::<[__m512; 6]>();
            for ty in r0..r1 {
                let base = 4 * (ty - r0) % 6;
                let slot = |i: usize| if base + i >= 6 { base + i - 6 } else { base + i };
                // The first tile row computes its six rows, the others the four not shared.
                let shared = if ty == r0 { 0 } else { 2 };
                for i in shared..6 {
                    ring.add(slot(i)).write(row((4 * ty + i) as isize - 1));
                }
                let at = v.add((ty - r0) * tw + k0);
                for j in 0..6 {
                    let col = bt6(std::array::from_fn(|i| (*ring.add(slot(i)))[j]));
                    for (i, x) in col.into_iter().enumerate() {
                        _mm512_mask_storeu_ps(at.add((i * 6 + j) * kstride), mask, x);
                    }
                }
            }
        }
    }
}

/// B^T d of F(4x4, 3x3) for six vectors d: rows (4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0),
/// (0, 4, -4, -1, 1, 0), (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1).
#[target_feature(enable = "avx512f")]
#[inline]
fn bt6(d: [__m512; 6]) -> [__m512; 6] {
    let (four, five, two) = (_mm512_set1_ps(4.0), _mm512_set1_ps(5.0), _mm512_set1_ps(2.0));
    let t1 = _mm512_fnmadd_ps(four, d[2], d[4]);
    let t2 = _mm512_fnmadd_ps(four, d[1], d[3]);
    let t3 = _mm512_sub_ps(d[4], d[2]);
    let t4 = _mm512_mul_ps(two, _mm512_sub_ps(d[3], d[1]));
    [
        _mm512_fmadd_ps(four, d[0], _mm512_fnmadd_ps(five, d[2], d[4])),
        _mm512_add_ps(t1, t2),
        _mm512_sub_ps(t1, t2),
        _mm512_add_ps(t3, t4),
        _mm512_sub_ps(t3, t4),
        _mm512_fmadd_ps(four, d[1], _mm512_fnmadd_ps(five, d[3], d[5])),
    ]
}

/// Columns col0 + 4·l + j (j = 0..6) of a row, as 6 vectors over l = 0..16, zero outside the
/// row: `masks` are the `columns` of the loads from col0 + 16·s (s = 0..5).
///
/// # Safety
/// The CPU runs AVX-512F, and for each load s every lane l set in `masks[s]` reads a readable,
/// initialised float at `row + col0 + 16·s + l`.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn split_row4(row: *const f32, col0: isize, masks: [u16; 5]) -> [__m512; 6] {
    let mut q = [_mm512_setzero_ps(); 5];
    for (s, qs) in q.iter_mut().enumerate() {
        // SAFETY: lanes outside the row are masked off (and masked lanes are never read).
        *qs = unsafe { _mm512_maskz_loadu_ps(masks[s], row.wrapping_offset(col0 + 16 * s as isize)) };
    }
    // Even and odd columns of q0:q1 and of q2:q3, then the even and odd of those: phase j
    // (columns 4·l + j) in four permutes of two.
    let (even, odd) = even_odd();
    let (e01, o01) = (_mm512_permutex2var_ps(q[0], even, q[1]), _mm512_permutex2var_ps(q[0], odd, q[1]));
    let (e23, o23) = (_mm512_permutex2var_ps(q[2], even, q[3]), _mm512_permutex2var_ps(q[2], odd, q[3]));
    let p = [
        _mm512_permutex2var_ps(e01, even, e23),
        _mm512_permutex2var_ps(o01, even, o23),
        _mm512_permutex2var_ps(e01, odd, e23),
        _mm512_permutex2var_ps(o01, odd, o23),
    ];
    // Phases 4 and 5 are phases 0 and 1 one tile on, their last lanes columns 64 and 65.
    let q4 = _mm512_castps_si512(q[4]);
    let next = |x: __m512, last: __m512i| _mm512_castsi512_ps(_mm512_alignr_epi32::<1>(last, _mm512_castps_si512(x)));
    [p[0], p[1], p[2], p[3], next(p[0], q4), next(p[1], _mm512_alignr_epi32::<1>(q4, q4))]
}

/// M_k[o][t..t+16·NV] = Σ_c U_k[o][c] · V_k[c][t..] for 8 output channels, in registers;
/// added to M's values if `add` (the sum over a later chunk of input channels).
///
/// # Safety
/// - The CPU runs AVX-512F.
/// - `u` holds c_in · 8 initialised floats.
/// - `v` and `m` are 64-byte aligned and tbp a multiple of 16; V holds c_in rows of 16·NV
///   initialised floats at stride tbp; M 8 such rows, writable, and initialised if `add`.
#[target_feature(enable = "avx512f")]
unsafe fn tile<const NV: usize>(u: *const f32, v: *const f32, tbp: usize, c_in: usize, m: *mut f32, add: bool) {
    // SAFETY: the caller passes U rows of 8 weights for c_in channels, 64-byte aligned V rows
    // of 16·NV floats at stride tbp, and 8 such rows of M (initialised if `add`).
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); NV]; OB];
        if add {
            for (o, acc_o) in acc.iter_mut().enumerate() {
                for (j, a) in acc_o.iter_mut().enumerate() {
                    *a = _mm512_load_ps(m.add(o * tbp + 16 * j));
                }
            }
        }
        for c in 0..c_in {
            let row = v.add(c * tbp);
            let mut x = [_mm512_setzero_ps(); NV];
            for (j, xj) in x.iter_mut().enumerate() {
                *xj = _mm512_load_ps(row.add(16 * j));
            }
            let uc = u.add(c * OB);
            for (o, acc_o) in acc.iter_mut().enumerate() {
                let w = _mm512_set1_ps(*uc.add(o));
                for j in 0..NV {
                    acc_o[j] = _mm512_fmadd_ps(w, x[j], acc_o[j]);
                }
            }
        }
        for (o, acc_o) in acc.iter().enumerate() {
            for (j, a) in acc_o.iter().enumerate() {
                _mm512_store_ps(m.add(o * tbp + 16 * j), *a);
            }
        }
    }
}

/// Where the output transform puts one tile row of one output channel.
#[derive(Clone, Copy)]
pub(super) enum Sink {
    /// In rows of wd floats from `out`; unless `pooled` is null, their 2x2 maxima too, in rows
    /// of wd / 2 floats from `pooled`.
    Rows { out: *mut f32, pooled: *mut f32 },
    /// Added into rows of wd floats from `acc` (class c's `stride` floats on) times the weight
    /// at `w + c · wstride`, for `classes` classes: this channel's term of a 1x1 head.
    Sum { acc: *mut f32, stride: usize, w: *const f32, wstride: usize, classes: usize },
}

/// Y = A^T M A + bias (then the ReLU) for the tiles of one tile row of one output channel: two
/// output rows, to `sink`; M_k for tile t at `m + k · kstride + t`.
///
/// # Safety
/// - The CPU runs AVX-512F; wd is even.
/// - M holds 16 rows of wd / 2 initialised floats (the tile row's tiles) at stride `kstride`.
/// - The sink has room for the tile row (see `Sink`): two output rows of wd floats at stride
///   wd, and one pooled row of wd / 2 unless `pooled` is null; for `Sum`, those rows of every
///   class, initialised, and the classes' weights readable.
#[target_feature(enable = "avx512f")]
unsafe fn output_row(m: *const f32, kstride: usize, wd: usize, bias: f32, relu: bool, sink: Sink) {
    // SAFETY: the caller passes M rows of the tile row's tiles at stride `kstride` and a sink
    // with room for the tile row's two output rows of wd floats.
    unsafe {
        let tw = wd / 2;
        let zero = _mm512_setzero_ps();
        for k0 in (0..tw).step_by(16) {
            let lanes = (tw - k0).min(16);
            let mask = first(lanes);
            // Rows of A^T M: m0 + m1 + m2 and m1 - m2 - m3, for each column j.
            let mut s = [[zero; 4]; 2];
            for j in 0..4 {
                let mv = |i: usize| _mm512_maskz_loadu_ps(mask, m.add((i * 4 + j) * kstride + k0));
                let (m0, m1, m2, m3) = (mv(0), mv(1), mv(2), mv(3));
                let [s0, s1] = &mut s;
                s0[j] = _mm512_add_ps(_mm512_add_ps(m0, m1), m2);
                s1[j] = _mm512_sub_ps(_mm512_sub_ps(m1, m2), m3);
            }
            let y = s.map(|sr| {
                let y0 = _mm512_add_ps(_mm512_add_ps(sr[0], sr[1]), sr[2]);
                let y1 = _mm512_sub_ps(_mm512_sub_ps(sr[1], sr[2]), sr[3]);
                finish([y0, y1], bias, relu)
            });
            emit(sink, wd, 2 * k0, y, lanes);
        }
    }
}

/// Y = A^T M A + bias (then the ReLU) for tiles of side 4: four output rows, to `sink`, M laid
/// out as for `output_row`. A^T rows: (1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0),
/// (0, 1, -1, 8, -8, 1).
///
/// # Safety
/// As `output_row`'s, for tiles of side 4: wd a multiple of 4, 36 rows of M of wd / 4 floats,
/// four output rows and two pooled rows.
#[target_feature(enable = "avx512f")]
unsafe fn output_row4(m: *const f32, kstride: usize, wd: usize, bias: f32, relu: bool, sink: Sink) {
    // SAFETY: the caller passes M rows of the tile row's tiles at stride `kstride` and a sink
    // with room for the tile row's four output rows of wd floats.
    unsafe {
        let tw = wd / 4;
        for k0 in (0..tw).step_by(16) {
            let lanes = (tw - k0).min(16);
            let mask = first(lanes);
            let y = output_tiles(|k| _mm512_maskz_loadu_ps(mask, m.add(k * kstride + k0)), bias, relu);
            emit(sink, wd, 4 * k0, y, lanes);
        }
    }
}

/// `output_row4` for the `tb` tiles of a whole unit (tile rows of `tw` tiles, a multiple of 4),
/// 16 consecutive tiles of M per vector whichever tile rows they fall in, each group of four
/// stored where its row puts it: row by row, 96² (24 tiles a row) and 48² (12) left a quarter of
/// the vectors' lanes empty. `sink` is that of the unit's first tile row.
///
/// # Safety
/// - The CPU runs AVX-512F; tw is a multiple of 4, wd = 4 · tw and tb a multiple of tw.
/// - M holds 36 rows of tb initialised floats rounded up to a multiple of 16 (whole vectors are
///   loaded) at stride `kstride`.
/// - The sink has room for the unit's tb / tw tile rows: 4 · tb / tw output rows of wd floats
///   (and 2 · tb / tw pooled rows of wd / 2 unless `pooled` is null); for `Sum`, those rows of
///   every class, initialised, and the classes' weights readable.
#[target_feature(enable = "avx512f")]
unsafe fn output_tiles4(
    m: *const f32,
    kstride: usize,
    (tb, tw, wd): (usize, usize, usize),
    bias: f32,
    relu: bool,
    sink: Sink,
) {
    // SAFETY: the caller passes M rows of ≥ tb tiles padded to a multiple of 16 (whole vectors
    // load) at stride `kstride`, and a sink with room for the unit's tile rows; each store
    // writes one group of four tiles inside its tile row (tw is a multiple of 4).
    unsafe {
        let half = |v: __m512, upper: bool| {
            let d = _mm512_castps_pd(v);
            _mm256_castpd_ps(if upper { _mm512_extractf64x4_pd::<1>(d) } else { _mm512_castpd512_pd256(d) })
        };
        for t0 in (0..tb).step_by(16) {
            let y = output_tiles(|k| _mm512_loadu_ps(m.add(k * kstride + t0)), bias, relu);
            // rows[r][q]: output row r of tiles 4q .. 4q + 4, in pixel order; pooled[pr]: pooled
            // row pr of tiles 0 .. 8 and 8 .. 16.
            let rows = y.map(|r| interleave(r));
            let pooled_rows: [[__m512; 2]; 2] = std::array::from_fn(|pr| match sink {
                Sink::Rows { pooled, .. } if !pooled.is_null() => {
                    pool_pairs(std::array::from_fn(|j| _mm512_max_ps(y[2 * pr][j], y[2 * pr + 1][j])))
                }
                _ => [_mm512_setzero_ps(); 2],
            });
            for q in 0..4 {
                let t = t0 + 4 * q;
                if t >= tb {
                    break;
                }
                let at = |r: usize| (4 * (t / tw) + r) * wd + 4 * (t % tw);
                match sink {
                    Sink::Rows { out, pooled } => {
                        for (r, row) in rows.iter().enumerate() {
                            _mm512_storeu_ps(out.add(at(r)), row[q]);
                        }
                        if !pooled.is_null() {
                            for (pr, pair) in pooled_rows.iter().enumerate() {
                                let to = pooled.add((2 * (t / tw) + pr) * wd / 2 + 2 * (t % tw));
                                _mm256_storeu_ps(to, half(pair[q / 2], q % 2 == 1));
                            }
                        }
                    }
                    Sink::Sum { acc, stride, w, wstride, classes } => {
                        for c in 0..classes {
                            let wc = _mm512_set1_ps(*w.add(c * wstride));
                            for (r, row) in rows.iter().enumerate() {
                                let to = acc.add(c * stride + at(r));
                                _mm512_storeu_ps(to, _mm512_fmadd_ps(wc, row[q], _mm512_loadu_ps(to)));
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Y = A^T M A + bias (then the ReLU) of 16 F(4x4) tiles whose M_k (k = 0..36) `load` gives:
/// y[r][j] is output row r, column j (lanes: tiles).
#[target_feature(enable = "avx512f")]
#[inline]
fn output_tiles(load: impl Fn(usize) -> __m512, bias: f32, relu: bool) -> [[__m512; 4]; 4] {
    let cols: [[__m512; 4]; 6] = std::array::from_fn(|j| at6(std::array::from_fn(|i| load(i * 6 + j))));
    std::array::from_fn(|r| finish(at6(std::array::from_fn(|j| cols[j][r])), bias, relu))
}

/// A pooled row of F(4x4) tiles from the maxima `v` of its two output rows (column j, lanes:
/// tiles): the maxima of column pairs, interleaved (tiles 0..8, then 8..16).
#[target_feature(enable = "avx512f")]
#[inline]
fn pool_pairs(v: [__m512; 4]) -> [__m512; 2] {
    pairs(_mm512_max_ps(v[0], v[1]), _mm512_max_ps(v[2], v[3]))
}

/// y + bias, then the ReLU.
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) fn finish<const S: usize>(y: [__m512; S], bias: f32, relu: bool) -> [__m512; S] {
    let (bv, zero) = (_mm512_set1_ps(bias), _mm512_setzero_ps());
    y.map(|v| if relu { _mm512_max_ps(_mm512_add_ps(v, bv), zero) } else { _mm512_add_ps(v, bv) })
}

/// The S output rows y[r] of `lanes` tiles of side S (column j of tile l in lane l of y[r][j]),
/// from output column `col`, where `sink` says.
///
/// # Safety
/// - The CPU runs AVX-512F; S is 2 or 4 and `lanes` at most 16.
/// - The sink's S rows of wd floats hold columns col .. col + S · lanes (and, unless `pooled` is
///   null, its S / 2 pooled rows of wd / 2 floats columns col / 2 .. col / 2 + S / 2 · lanes);
///   for `Sum`, those of every class, initialised, and the classes' weights readable.
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) unsafe fn emit<const S: usize>(sink: Sink, wd: usize, col: usize, y: [[__m512; S]; S], lanes: usize) {
    // SAFETY: the sink's rows hold the tile row's S rows of wd floats (wd / 2 pooled); every
    // access covers S · lanes floats from `col` (S / 2 · lanes from col / 2), masked past them.
    unsafe {
        match sink {
            Sink::Rows { out, pooled } => {
                for (r, yr) in y.iter().enumerate() {
                    let vals = interleave(*yr);
                    for (q, x) in vals.into_iter().enumerate().take(S) {
                        if S * lanes > 16 * q {
                            _mm512_mask_storeu_ps(out.add(r * wd + col + 16 * q), first(S * lanes - 16 * q), x);
                        }
                    }
                }
                if !pooled.is_null() {
                    // Rows 2r and 2r + 1, then column pairs: tile l's pooled columns are
                    // (S / 2)·l + j / 2, lane l of the maxima of columns j and j + 1.
                    for r in 0..S / 2 {
                        let row = pooled.add(r * wd / 2 + col / 2);
                        let v: [__m512; S] = std::array::from_fn(|j| _mm512_max_ps(y[2 * r][j], y[2 * r + 1][j]));
                        if S == 2 {
                            _mm512_mask_storeu_ps(row, first(lanes), _mm512_max_ps(v[0], v[1]));
                        } else {
                            let [lo, hi] = pool_pairs([v[0], v[1], v[2], v[3]]);
                            _mm512_mask_storeu_ps(row, first(2 * lanes), lo);
                            if lanes > 8 {
                                _mm512_mask_storeu_ps(row.add(16), first(2 * lanes - 16), hi);
                            }
                        }
                    }
                }
            }
            Sink::Sum { acc, stride, w, wstride, classes } => {
                for (r, yr) in y.iter().enumerate() {
                    let vals = interleave(*yr);
                    for c in 0..classes {
                        let wc = _mm512_set1_ps(*w.add(c * wstride));
                        let row = acc.add(c * stride + r * wd + col);
                        for (q, x) in vals.into_iter().enumerate().take(S) {
                            if S * lanes > 16 * q {
                                let (at, k) = (row.add(16 * q), first(S * lanes - 16 * q));
                                _mm512_mask_storeu_ps(at, k, _mm512_fmadd_ps(wc, x, _mm512_maskz_loadu_ps(k, at)));
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Lanes 0..8 of a and b interleaved (a0, b0, a1, b1, ..), then lanes 8..16.
#[target_feature(enable = "avx512f")]
#[inline]
fn pairs(a: __m512, b: __m512) -> [__m512; 2] {
    let lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    let hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    [_mm512_permutex2var_ps(a, lo, b), _mm512_permutex2var_ps(a, hi, b)]
}

/// One output row of tiles of side S (2 or 4) from their columns y_j (lane l: tile l), in
/// pixel order: y_j[l] at S·l + j of the S vectors (the first S of four).
#[target_feature(enable = "avx512f")]
#[inline]
fn interleave<const S: usize>(y: [__m512; S]) -> [__m512; 4] {
    let zero = _mm512_setzero_ps();
    let [p01, q01] = pairs(y[0], y[1]);
    if S == 4 {
        // Pairs (y0, y1) and (y2, y3) interleaved, then the pairs.
        let qa = _mm512_setr_epi32(0, 1, 16, 17, 2, 3, 18, 19, 4, 5, 20, 21, 6, 7, 22, 23);
        let qb = _mm512_setr_epi32(8, 9, 24, 25, 10, 11, 26, 27, 12, 13, 28, 29, 14, 15, 30, 31);
        let [p23, q23] = pairs(y[2], y[3]);
        [
            _mm512_permutex2var_ps(p01, qa, p23),
            _mm512_permutex2var_ps(p01, qb, p23),
            _mm512_permutex2var_ps(q01, qa, q23),
            _mm512_permutex2var_ps(q01, qb, q23),
        ]
    } else {
        [p01, q01, zero, zero]
    }
}

/// A^T m of F(4x4, 3x3) for six vectors m (four results).
#[target_feature(enable = "avx512f")]
#[inline]
fn at6(m: [__m512; 6]) -> [__m512; 4] {
    let (s, d) = (_mm512_add_ps(m[1], m[2]), _mm512_sub_ps(m[1], m[2]));
    let (s2, d2) = (_mm512_add_ps(m[3], m[4]), _mm512_sub_ps(m[3], m[4]));
    [
        _mm512_add_ps(_mm512_add_ps(m[0], s), s2),
        _mm512_fmadd_ps(_mm512_set1_ps(2.0), d2, d),
        _mm512_fmadd_ps(_mm512_set1_ps(4.0), s2, s),
        _mm512_add_ps(_mm512_fmadd_ps(_mm512_set1_ps(8.0), d2, d), m[5]),
    ]
}

#[cfg(test)]
mod tests {
    use super::super::cpu::cat;
    use super::super::testing::{close, naive, rand, require_avx512};
    use super::*;

    fn run(g: &Geom, m: usize, split: &[usize], relu: bool) {
        let x = rand(g.n * g.c_in * g.pixels(), 3);
        let w = rand(g.c_out * g.c_in * 9, 5);
        let b = rand(g.c_out, 7);
        let mut want = naive(g, &x, &w, &b);
        if relu {
            want.iter_mut().for_each(|v| *v = v.max(0.0));
        }
        // The parts as NCHW slices of their own channel counts.
        let p = g.pixels();
        let mut parts = vec![];
        let mut c0 = 0;
        for &c in split {
            let part: Vec<f32> = (0..g.n).flat_map(|n| x[(n * g.c_in + c0) * p..][..c * p].to_vec()).collect();
            parts.push(part);
            c0 += c;
        }
        let xs: Vec<&[f32]> = parts.iter().map(|v| v.as_slice()).collect();
        let wt = prepare_tiled(g, m, |o, c, t| w[(o * g.c_in + c) * 9 + t]);
        // The output in two parts (the first output channel alone, then the rest).
        let mut y0 = vec![MaybeUninit::new(f32::NAN); g.n * p];
        let mut y1 = vec![MaybeUninit::new(f32::NAN); want.len() - g.n * p];
        forward(g, (&xs, false), &wt, &b, relu, &mut [&mut y0, &mut y1], Epilogue::Store);
        // SAFETY: forward writes every element (NaN left anywhere fails the comparison).
        let init =
            |y: Vec<MaybeUninit<f32>>| -> Vec<f32> { y.into_iter().map(|v| unsafe { v.assume_init() }).collect() };
        let (y0, y1) = (init(y0), init(y1));
        let p0 = g.n * p;
        let y: Vec<f32> = (0..g.n)
            .flat_map(|n| [&y0[n * p..][..p], &y1[n * (g.c_out - 1) * p..][..(g.c_out - 1) * p]].concat())
            .collect();
        // F(4x4)'s transforms scale by up to 8 and 1/24: its rounding errors are ~20x F(2x2)'s
        // (up to 5e-5 here, against outputs of magnitude ~4); a wrong index or sign errs by ~1.
        close(&y, &want, if m == 4 { 1e-4 } else { 1e-5 });
        assert_eq!(y.len(), p0 + y1.len());
    }

    /// A last part at half resolution, up-sampled by the units as they transform it, against the
    /// definition on the up-sampled concatenation: F(2x2) and F(4x4), units of a few tile rows
    /// (the first, inner and last rows of a unit up-sampled from the right input rows).
    #[test]
    fn half_resolution_part_matches_upsampling_first() {
        require_avx512();
        for (n, lateral, below, c_out, h, w, m) in [
            (2, 3, 5, 6, 12, 20, 2),
            (1, 0, 4, 9, 8, 36, 2),
            (2, 4, 3, 7, 16, 24, 4),
            (1, 2, 6, 8, 24, 72, 4),
            (1, 3, 4, 6, 16, 48, 4),
        ] {
            let g = Geom { n, c_in: lateral + below, c_out, sp: [1, h, w], k: [1, 3, 3] };
            let (x, low) = (rand(n * lateral * h * w, 3), rand(n * below * h * w / 4, 4));
            let up = upsample::forward(&low, &[n, below, h / 2, w / 2]);
            let cat = cat(n, &[&x, &up]);
            let (wts, b) = (rand(c_out * g.c_in * 9, 5), rand(c_out, 7));
            let want = naive(&g, &cat, &wts, &b);
            let wt = prepare_tiled(&g, m, |o, c, t| wts[(o * g.c_in + c) * 9 + t]);
            let mut y = vec![MaybeUninit::new(f32::NAN); want.len()];
            let parts: Vec<&[f32]> = if lateral > 0 { vec![&x, &low] } else { vec![&low] };
            forward(&g, (&parts, true), &wt, &b, false, &mut [&mut y], Epilogue::Store);
            let y: Vec<f32> = y.into_iter().map(|v| unsafe { v.assume_init() }).collect();
            close(&y, &want, if m == 4 { 1e-4 } else { 1e-5 });
        }
    }

    /// The pooled and the head epilogues against pooling / a 1x1 convolution of the definition.
    #[test]
    fn epilogues_match_the_definition() {
        require_avx512();
        let init =
            |y: Vec<MaybeUninit<f32>>| -> Vec<f32> { y.into_iter().map(|v| unsafe { v.assume_init() }).collect() };
        // F(2x2) with a masked vector of 7 tiles and one of 17; F(4x4) with 5 (masked), 16 and
        // 18 tiles; 1 and 3 classes.
        for (n, c_in, c_out, h, w, m, classes) in [
            (2, 5, 11, 6, 14, 2, 1),
            (1, 9, 8, 4, 68, 2, 3),
            (2, 6, 10, 8, 20, 4, 1),
            (1, 7, 9, 12, 72, 4, 3),
            (1, 3, 17, 8, 64, 4, 2),
            (2, 6, 10, 16, 48, 4, 2),
            (1, 5, 9, 8, 96, 4, 1),
        ] {
            let g = Geom { n, c_in, c_out, sp: [1, h, w], k: [1, 3, 3] };
            let (x, wts, b) = (rand(n * c_in * h * w, 3), rand(c_out * c_in * 9, 5), rand(c_out, 7));
            let y: Vec<f32> = naive(&g, &x, &wts, &b).into_iter().map(|v| v.max(0.0)).collect();
            let wt = prepare_tiled(&g, m, |o, c, t| wts[(o * c_in + c) * 9 + t]);
            let tol = if m == 4 { 1e-4 } else { 1e-5 };
            // Pooled: every 2x2 window's maximum, and y itself unchanged.
            let mut out = vec![MaybeUninit::new(f32::NAN); y.len()];
            let mut pooled = vec![MaybeUninit::new(f32::NAN); y.len() / 4];
            forward(&g, (&[&x], false), &wt, &b, true, &mut [&mut out], Epilogue::Pool(&mut pooled));
            close(&init(out), &y, tol);
            let want: Vec<f32> = (0..n * c_out * h * w / 4)
                .map(|i| {
                    let (plane, r, c) = (i / (h * w / 4), i % (h * w / 4) / (w / 2), i % (w / 2));
                    let at = |dr: usize, dc: usize| y[plane * h * w + (2 * r + dr) * w + 2 * c + dc];
                    at(0, 0).max(at(0, 1)).max(at(1, 0)).max(at(1, 1))
                })
                .collect();
            close(&init(pooled), &want, tol);
            // Head: Σ_o hw[c][o] y_o + hb[c].
            let (hw, hb) = (rand(classes * c_out, 9), rand(classes, 11));
            let mut head = vec![MaybeUninit::new(f32::NAN); n * classes * h * w];
            forward(&g, (&[&x], false), &wt, &b, true, &mut [], Epilogue::Head { w: &hw, b: &hb, out: &mut head });
            let p = h * w;
            let want: Vec<f32> = (0..n * classes * p)
                .map(|i| {
                    let (img, c, px) = (i / (classes * p), i / p % classes, i % p);
                    hb[c] + (0..c_out).map(|o| hw[c * c_out + o] * y[(img * c_out + o) * p + px]).sum::<f32>()
                })
                .collect();
            close(&init(head), &want, 10.0 * tol);
        }
    }

    /// The weight gradient against its definition, Σ dy(o, y, x) · x(c, y + l - 1, x + m - 1).
    #[test]
    fn weight_gradient_matches_the_definition() {
        require_avx512();
        for (n, c_in, c_out, h, w, split) in
            [(2, 5, 11, 6, 6, vec![5]), (1, 9, 40, 10, 14, vec![4, 5]), (3, 26, 17, 8, 36, vec![1, 25])]
        {
            let g = Geom { n, c_in, c_out, sp: [1, h, w], k: [1, 3, 3] };
            let p = h * w;
            let x = rand(n * c_in * p, 11);
            let dy = rand(n * c_out * p, 13);
            let mut want = vec![0.0f64; c_out * c_in * 9];
            for (b, o, c) in (0..n).flat_map(|b| (0..c_out).flat_map(move |o| (0..c_in).map(move |c| (b, o, c)))) {
                for (y, xx, t) in (0..h).flat_map(|y| (0..w).flat_map(move |xx| (0..9).map(move |t| (y, xx, t)))) {
                    let (sy, sx) = ((y + t / 3) as isize - 1, (xx + t % 3) as isize - 1);
                    if sy >= 0 && sx >= 0 && (sy as usize) < h && (sx as usize) < w {
                        let xv = x[(b * c_in + c) * p + sy as usize * w + sx as usize];
                        want[(o * c_in + c) * 9 + t] += (dy[(b * c_out + o) * p + y * w + xx] * xv) as f64;
                    }
                }
            }
            let mut parts = vec![];
            let mut c0 = 0;
            for &c in &split {
                parts.push((0..n).flat_map(|b| x[(b * c_in + c0) * p..][..c * p].to_vec()).collect::<Vec<f32>>());
                c0 += c;
            }
            let xs: Vec<&[f32]> = parts.iter().map(|v| v.as_slice()).collect();
            let want: Vec<f32> = want.into_iter().map(|v| v as f32).collect();
            close(&backward_w(&g, &xs, &dy), &want, 1e-5);
        }
    }

    #[test]
    fn matches_the_definition() {
        require_avx512();
        let g = |n, c_in, c_out, h, w| Geom { n, c_in, c_out, sp: [1, h, w], k: [1, 3, 3] };
        // F(2x2): tile rows of 3, 7 (a masked vector), 16, 24 (one and a half) and 34 tiles (a
        // tail of 2).
        run(&g(2, 5, 11, 6, 6), 2, &[5], false);
        run(&g(1, 9, 8, 10, 14), 2, &[4, 5], true);
        run(&g(2, 16, 20, 8, 32), 2, &[16], true);
        run(&g(1, 3, 17, 4, 48), 2, &[1, 2], false);
        run(&g(3, 7, 9, 12, 68), 2, &[7], true);
        // F(4x4): tile rows of 1, 5 (masked), 8, 16, 17 and 18 tiles (the last two columns of the
        // input past a vector's 64), one tile row and several.
        run(&g(2, 5, 11, 4, 4), 4, &[5], false);
        run(&g(1, 9, 8, 12, 20), 4, &[4, 5], true);
        run(&g(2, 16, 20, 8, 32), 4, &[16], true);
        run(&g(1, 3, 17, 4, 64), 4, &[1, 2], false);
        run(&g(3, 7, 9, 12, 68), 4, &[7], true);
        run(&g(1, 6, 10, 16, 72), 4, &[2, 4], true);
        // Whole units' tiles in vectors across tile rows (rows of 12 and 24 tiles).
        run(&g(2, 5, 7, 16, 48), 4, &[5], true);
        run(&g(1, 3, 9, 8, 96), 4, &[1, 2], false);
        assert_eq!(tile_side(&g(1, 1, 1, 96, 96)), 4);
        assert_eq!(tile_side(&g(1, 1, 1, 24, 24)), 2);
        assert_eq!(tile_side(&g(1, 1, 1, 40, 40)), 4);
    }
}
