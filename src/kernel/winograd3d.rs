//! Winograd F(2x2x2, 3x3x3) for 3D 3x3x3 "same" convolutions of even-sized volumes, on AVX-512.
//!
//! Each 2x2x2 output tile comes from a 4x4x4 input tile through 64 element-wise products in the
//! transformed domain, Y = A^T [ (G ⊗ G ⊗ G) w ⊙ (B^T ⊗ B^T ⊗ B^T) d ] A: 64 multiplications
//! per 8 outputs against the direct form's 216 (3.4x fewer). The transforms are F(2x2, 3x3)'s
//! 1D ones applied along each axis (sums of halves and whole values, so the results stay within
//! ~1e-6 relative of direct convolution).
//!
//! The products, the unit sizing and the weight gradient's register tiles are 2D's
//! (`winograd::products`, `units_of`, `weight_products`), which do not care how many transformed
//! positions there are; this file holds what differs: the 3D transforms. A unit is a range of
//! tile rows counted through the volume's tile planes ((d / 2) · (h / 2) rows of w / 2 tiles),
//! so that small volumes (8³: 16 tiles per plane) still fill the 48-tile register tile.

use std::arch::x86_64::*;

use super::cpu::{Geom, SyncPtr, aligned, avx512, prefetch, recycle, transpose_row};
use super::winograd::{
    G2, OB, PF, Plane, Sink, Weights, channel_planes, columns, emit, finish, first, products, split_row, spread,
    sum_groups, units_of, weight_products, weight_work, zero,
};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Transformed positions per tile: 4 x 4 x 4, index (a · 4 + b) · 4 + c for depth a, row b and
/// column c.
const KK: usize = 64;

#[cfg(test)]
thread_local! {
    /// Calls of the 3D forward on this thread, for tests that must see the path taken.
    pub(super) static CALLS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Whether `g` is a 3D convolution this path computes, on this CPU: 3x3x3, every side even.
pub fn applies(g: &Geom) -> bool {
    g.k == [3, 3, 3] && g.sp.iter().all(|s| s.is_multiple_of(2)) && avx512()
}

/// U = (G ⊗ G ⊗ G) w for every (output, input) channel pair, laid out as 2D's (`Weights`),
/// from weight(o, c, t) (output channel, input channel, tap of 27); blocks of 8 output
/// channels in parallel, each input channel's values computed for the 8 at once (per call in
/// training, so cheap: one kernel at a time in scalar code made a 768 -> 256 layer's training
/// forward slower than the direct kernel's).
pub fn prepare_with(g: &Geom, weight: impl Fn(usize, usize, usize) -> f32 + Sync) -> Weights {
    assert!(g.k == [3, 3, 3]);
    let cp = g.c_out.next_multiple_of(OB);
    let slab = cp * g.c_in;
    let mut u = Vec::with_capacity(KK * slab);
    let u_ptr = SyncPtr(u.as_mut_ptr());
    (0..cp / OB).into_par_iter().for_each(|ob| {
        let valid = OB.min(g.c_out - ob * OB);
        for c in 0..g.c_in {
            // k[t][o]: tap t of the block's 8 output channels (zero past c_out).
            let mut k = [[0.0f32; OB]; 27];
            for (t, kt) in k.iter_mut().enumerate() {
                for (o, v) in kt.iter_mut().enumerate().take(valid) {
                    *v = weight(ob * OB + o, c, t);
                }
            }
            let comb = |r: &[f32; 3], x: [&[f32; OB]; 3]| -> [f32; OB] {
                std::array::from_fn(|o| r[0] * x[0][o] + r[1] * x[1][o] + r[2] * x[2][o])
            };
            // Along the columns (a[i][j][col]), the rows (b[i][row][col]), then the depth.
            let a: [[[[f32; OB]; 4]; 3]; 3] = std::array::from_fn(|i| {
                std::array::from_fn(|j| {
                    std::array::from_fn(|col| comb(&G2[col], [0, 1, 2].map(|l| &k[i * 9 + j * 3 + l])))
                })
            });
            let b: [[[[f32; OB]; 4]; 4]; 3] = std::array::from_fn(|i| {
                std::array::from_fn(|row| std::array::from_fn(|col| comb(&G2[row], [0, 1, 2].map(|j| &a[i][j][col]))))
            });
            for kk in 0..KK {
                let vals = comb(&G2[kk / 16], [0, 1, 2].map(|i| &b[i][kk / 4 % 4][kk % 4]));
                // SAFETY: block ob alone writes runs [k][ob][c][..8] of the KK · slab floats.
                unsafe {
                    let at = u_ptr.get().add(kk * slab + ob * OB * g.c_in + c * OB);
                    std::ptr::copy_nonoverlapping(vals.as_ptr(), at, OB);
                }
            }
        }
    });
    // SAFETY: the blocks wrote every (k, ob, c) run.
    unsafe { u.set_len(KK * slab) };
    Weights { u, c_out_pad: cp, m: 2 }
}

/// dw = (G^T ⊗ G^T ⊗ G^T) dU for 16 output channels at once (lanes), dU_k given per position
/// k (64 -> 27 values), the weight gradient's last step.
fn untransform_gradient(du: [&[f32]; KK]) -> [[f32; 16]; 27] {
    let gt = |l: usize, x: [&[f32; 16]; 4]| -> [f32; 16] {
        std::array::from_fn(|o| G2[0][l] * x[0][o] + G2[1][l] * x[1][o] + G2[2][l] * x[2][o] + G2[3][l] * x[3][o])
    };
    let du: [[f32; 16]; KK] = du.map(|d| std::array::from_fn(|o| d[o]));
    let a: [[[[f32; 16]; 3]; 4]; 4] = std::array::from_fn(|i| {
        std::array::from_fn(|j| std::array::from_fn(|l| gt(l, std::array::from_fn(|c| &du[i * 16 + j * 4 + c]))))
    });
    let b: [[[[f32; 16]; 3]; 3]; 4] = std::array::from_fn(|i| {
        std::array::from_fn(|j| std::array::from_fn(|l| gt(j, std::array::from_fn(|r| &a[i][r][l]))))
    });
    std::array::from_fn(|t| gt(t / 9, std::array::from_fn(|i| &b[i][t / 3 % 3][t % 3])))
}

/// y = conv(cat(xs), w) + b, then max(0, y) if `relu`, for NCDHW slices: the input is the
/// channel concatenation of the parts `xs`, read in place, and so is the output of the parts
/// `ys` (the input gradient's parts). Every element of `ys` is written.
pub fn forward(g: &Geom, xs: &[&[f32]], wt: &Weights, b: &[f32], relu: bool, ys: &mut [&mut [MaybeUninit<f32>]]) {
    #[cfg(test)]
    CALLS.with(|c| c.set(c.get() + 1));
    let [d, h, wd] = g.sp;
    let (th, tw, p) = ((d / 2) * (h / 2), wd / 2, g.pixels());
    assert!(applies(g) && b.len() == g.c_out && wt.c_out_pad == g.c_out.next_multiple_of(OB));
    assert_eq!(wt.u.len(), KK * wt.c_out_pad * g.c_in, "weights prepared for another geometry");
    // Output channel o as (its part's first element, channels in the part, channel within it).
    let outs: Vec<(SyncPtr, usize, usize)> = ys
        .iter_mut()
        .flat_map(|y| {
            let cp = y.len() / (g.n * p);
            assert_eq!(y.len(), g.n * cp * p, "output parts must be whole NCDHW tensors");
            let at = SyncPtr(y.as_mut_ptr().cast::<f32>());
            (0..cp).map(move |c| (at, cp, c))
        })
        .collect();
    assert_eq!(outs.len(), g.c_out, "output parts must add up to c_out channels");
    let planes = channel_planes(g, xs, false);
    let (rows, group) = units_of(g, (th, tw), KK, false);
    let work: Vec<(usize, usize, usize)> = (0..g.n)
        .flat_map(|n| (0..th).step_by(rows).flat_map(move |r0| (0..g.c_out).step_by(group).map(move |o0| (n, r0, o0))))
        .collect();
    work.into_par_iter().for_each(|(n, r0, o0)| {
        let r1 = (r0 + rows).min(th);
        let o1 = (o0 + group).min(g.c_out);
        let tbp = ((r1 - r0) * tw).next_multiple_of(16);
        // Input channels in chunks whose V (~512 KB) stays in L2 for the products.
        let chunk = if cfg!(test) { 8 } else { (131072 / (KK * tbp)).next_multiple_of(8) }.min(g.c_in);
        let (vs, ms) = (spread(chunk * tbp), spread(group * tbp));
        let (mut v_buf, va) = aligned(KK * vs);
        let (mut m_buf, ma) = aligned(KK * ms);
        let v = v_buf[va..].as_mut_ptr();
        let m = m_buf[ma..].as_mut_ptr();
        // SAFETY: V has KK rows of vs ≥ chunk · tbp and M KK rows of ms ≥ `group` · tbp floats,
        // 64-byte aligned; the plane reads stay inside each plane (load masks); this unit alone
        // writes the output rows of tile rows r0..r1 of channels o0..o1 of image n.
        unsafe {
            for c0 in (0..g.c_in).step_by(chunk) {
                let cn = chunk.min(g.c_in - c0);
                transform_input(&planes[c0..c0 + cn], n, g.sp, (r0, r1), v, vs);
                products(wt, g.c_in, (c0, cn), (o0, o1), (v, vs), (m, ms), tbp);
            }
            for (o, &bias) in b.iter().enumerate().take(o1).skip(o0) {
                let (y, cp, co) = outs[o];
                let out = y.get().add((n * cp + co) * p);
                output_rows(m.add((o - o0) * tbp), ms, g.sp, (r0, r1), bias, relu, out);
            }
        }
        recycle(v_buf);
        recycle(m_buf);
    });
}

/// V for the tiles of tile rows r0..r1 (counted through the tile planes) of image n, one
/// channel (`planes`) after another: channel c's 64 rows of tbp tiles at
/// `v + c · tbp + k · kstride`, padding tiles (past the unit's) zero (pooled memory holds
/// anything, and NaN would reach the padding columns of the products).
///
/// # Safety
/// - The CPU runs AVX-512F; d, h and wd are even and r0 < r1 ≤ (d / 2) · (h / 2) (the planes'
///   slices are bounds-checked).
/// - `v` is valid for writes of 64 rows of `kstride` floats, each holding planes.len() rows of
///   tbp, (r1 - r0) · wd / 2 rounded up to a multiple of 16.
unsafe fn transform_input<'a>(
    planes: &[Plane<'a>],
    n: usize,
    sp: [usize; 3],
    (r0, r1): (usize, usize),
    v: *mut f32,
    kstride: usize,
) {
    let p = sp.iter().product::<usize>();
    let tb = (r1 - r0) * (sp[2] / 2);
    let tbp = tb.next_multiple_of(16);
    let plane = |pl: &Plane<'a>| -> &'a [f32] { &pl.part[(n * pl.channels + pl.channel) * p..][..p] };
    let spans = spans_read(sp, (r0, r1));
    for (c, pl) in planes.iter().enumerate() {
        if let Some(ahead) = planes.get(c + PF) {
            let ahead = plane(ahead);
            for span in &spans {
                prefetch(&ahead[span.clone()]);
            }
        }
        let plane = plane(pl);
        // SAFETY: the plane holds the volume; room for V is the caller's promise.
        unsafe {
            input_rows(plane.as_ptr(), sp, (r0, r1), v.add(c * tbp), kstride);
            if tbp > tb {
                for k in 0..KK {
                    zero(v.add(k * kstride + c * tbp + tb), tbp - tb);
                }
            }
        }
    }
}

/// The runs of a channel's volume (element ranges, rows of consecutive slices each) that
/// `input_rows` reads for tile rows r0..r1: for each tile plane the rows touch, the input rows
/// 2·ty - 1 ..= 2·ty + 2 of their tiles in the slices 2·tz - 1 ..= 2·tz + 2 that exist. The
/// transform reads a few lines from each of 16 or more rows a slice apart, per channel a
/// volume apart: the hardware prefetchers miss that pattern, and the masked loads' misses were
/// most of the transform's time, so the channel PF ahead is prefetched as in 2D.
pub(super) fn spans_read([d, h, wd]: [usize; 3], (r0, r1): (usize, usize)) -> Vec<std::ops::Range<usize>> {
    let th = h / 2;
    let mut spans = Vec::new();
    let mut row = r0;
    while row < r1 {
        let (tz, ty0) = (row / th, row % th);
        let ty1 = (r1 - tz * th).min(th);
        let (y0, y1) = ((2 * ty0).saturating_sub(1), (2 * ty1 + 1).min(h));
        for z in (2 * tz).saturating_sub(1)..(2 * tz + 3).min(d) {
            spans.push((z * h + y0) * wd..(z * h + y1) * wd);
        }
        row = tz * th + ty1;
    }
    spans
}

/// B^T x of F(2x2, 3x3) for four vectors (rows (1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0),
/// (0, 1, 0, -1)).
#[target_feature(enable = "avx512f")]
#[inline]
fn bt4(x: [__m512; 4]) -> [__m512; 4] {
    [_mm512_sub_ps(x[0], x[2]), _mm512_add_ps(x[1], x[2]), _mm512_sub_ps(x[2], x[1]), _mm512_sub_ps(x[1], x[3])]
}

/// A^T x of F(2x2, 3x3) for four vectors (rows (1, 1, 1, 0), (0, 1, -1, -1)).
#[target_feature(enable = "avx512f")]
#[inline]
fn at4(x: [__m512; 4]) -> [__m512; 2] {
    [_mm512_add_ps(_mm512_add_ps(x[0], x[1]), x[2]), _mm512_sub_ps(_mm512_sub_ps(x[1], x[2]), x[3])]
}

/// V = (B^T ⊗ B^T ⊗ B^T) d for the tiles of tile rows r0..r1 of one channel's volume, 16 tiles
/// of a row at a time: each of the tile's four input rows is split into its column phases in
/// the four slices it spans and transformed along the depth, then each depth position's 4x4
/// values as in 2D. V_k for tile t (counted from the unit's first) at `v + k · kstride + t`.
///
/// # Safety
/// - The CPU runs AVX-512F; the sides are even and r0 ≤ r1 ≤ (d / 2) · (h / 2).
/// - `plane` holds the channel's d · h · wd initialised floats (only those are read; the zero
///   padding is masked off).
/// - `v` is valid for writes of 64 rows at stride `kstride` of (r1 - r0) · wd / 2 floats.
#[allow(clippy::needless_range_loop)] // positions index several arrays at once
#[target_feature(enable = "avx512f")]
unsafe fn input_rows(plane: *const f32, [d, h, wd]: [usize; 3], (r0, r1): (usize, usize), v: *mut f32, kstride: usize) {
    let (th, tw) = (h / 2, wd / 2);
    let zero = _mm512_setzero_ps();
    for k0 in (0..tw).step_by(16) {
        // padded column 2·t + j of tile t = k0 + l is input column 2·k0 - 1 + 2·l + j.
        let col0 = 2 * k0 as isize - 1;
        let masks = [0, 16, 2, 18].map(|off| columns(col0 + off, wd));
        let split = |z: isize, r: isize| {
            if z < 0 || z >= d as isize || r < 0 || r >= h as isize {
                [zero; 4]
            } else {
                // SAFETY: slice z, row r lies in the volume; columns outside are masked off.
                unsafe { split_row(plane.wrapping_add((z as usize * h + r as usize) * wd), col0, masks) }
            }
        };
        let mask = first(tw - k0);
        for row in r0..r1 {
            let (tz, ty) = ((row / th) as isize, (row % th) as isize);
            // dz[a][i][j]: depth position a of input row i, column phase j.
            let mut dz = [[[zero; 4]; 4]; 4];
            for i in 0..4 {
                let s: [[__m512; 4]; 4] =
                    std::array::from_fn(|z| split(2 * tz + z as isize - 1, 2 * ty + i as isize - 1));
                for j in 0..4 {
                    let t = bt4([s[0][j], s[1][j], s[2][j], s[3][j]]);
                    for a in 0..4 {
                        dz[a][i][j] = t[a];
                    }
                }
            }
            let at = v.wrapping_add((row - r0) * tw + k0);
            for (a, da) in dz.iter().enumerate() {
                // Along the rows (per column phase), then along the columns.
                let cols: [[__m512; 4]; 4] = std::array::from_fn(|j| bt4([da[0][j], da[1][j], da[2][j], da[3][j]]));
                for i in 0..4 {
                    let vi = bt4([cols[0][i], cols[1][i], cols[2][i], cols[3][i]]);
                    for (j, x) in vi.into_iter().enumerate() {
                        // SAFETY: position (a, i, j)'s row of V has the unit's tiles (caller).
                        unsafe { _mm512_mask_storeu_ps(at.add(((a * 4 + i) * 4 + j) * kstride), mask, x) };
                    }
                }
            }
        }
    }
}

/// Y = (A^T ⊗ A^T ⊗ A^T) M + bias (then the ReLU) for the tiles of tile rows r0..r1 of one
/// output channel, into its volume at `out`; M_k for tile t at `m + k · kstride + t`.
///
/// # Safety
/// - The CPU runs AVX-512F; the sides are even and r0 ≤ r1 ≤ (d / 2) · (h / 2).
/// - M holds 64 rows of (r1 - r0) · wd / 2 initialised floats at stride `kstride`.
/// - `out` is valid for writes of the channel's d · h · wd floats.
#[allow(clippy::needless_range_loop)] // positions index several arrays at once
#[target_feature(enable = "avx512f")]
unsafe fn output_rows(
    m: *const f32,
    kstride: usize,
    [_, h, wd]: [usize; 3],
    (r0, r1): (usize, usize),
    bias: f32,
    relu: bool,
    out: *mut f32,
) {
    let (th, tw) = (h / 2, wd / 2);
    for row in r0..r1 {
        let (tz, ty) = (row / th, row % th);
        let mrow = m.wrapping_add((row - r0) * tw);
        for k0 in (0..tw).step_by(16) {
            let lanes = (tw - k0).min(16);
            let mask = first(lanes);
            // SAFETY: M's rows hold the tile row's tiles; lanes past them are masked off.
            let mv = |k: usize| unsafe { _mm512_maskz_loadu_ps(mask, mrow.add(k * kstride + k0)) };
            // Along the depth: mz[oz][i][j] for the two output slices.
            let mut mz = [[[_mm512_setzero_ps(); 4]; 4]; 2];
            for i in 0..4 {
                for j in 0..4 {
                    let z = at4(std::array::from_fn(|a| mv((a * 4 + i) * 4 + j)));
                    mz[0][i][j] = z[0];
                    mz[1][i][j] = z[1];
                }
            }
            for (oz, mi) in mz.iter().enumerate() {
                let s: [[__m512; 4]; 2] = {
                    let cols: [[__m512; 2]; 4] = std::array::from_fn(|j| at4([mi[0][j], mi[1][j], mi[2][j], mi[3][j]]));
                    std::array::from_fn(|r| std::array::from_fn(|j| cols[j][r]))
                };
                let y = s.map(|sr| finish(at4(sr), bias, relu));
                let rows = out.wrapping_add(((2 * tz + oz) * h + 2 * ty) * wd);
                // SAFETY: output rows 2·ty, 2·ty + 1 of slice 2·tz + oz lie in the channel's
                // volume, columns 2·k0 .. 2·(k0 + lanes).
                unsafe { emit(Sink::Rows { out: rows, pooled: std::ptr::null_mut() }, wd, 2 * k0, y, lanes) };
            }
        }
    }
}

/// dL/dw ([c_out][c_in][27]) from the forward input (the parts `xs` of a channel concatenation,
/// read in place) and dL/dy, in the transformed domain as in 2D (`winograd::backward_w`): dM =
/// (A ⊗ A ⊗ A) dY per tile from a channels-last copy of the unit's dy rows, dL/dU_k = Σ_tiles
/// dM_k · V_k^T in 2D's register tiles, and dL/dw = (G^T ⊗ G^T ⊗ G^T) dL/dU.
pub fn backward_w(g: &Geom, xs: &[&[f32]], dy: &[f32]) -> Vec<f32> {
    let [d, h, wd] = g.sp;
    let (th, tw, p) = ((d / 2) * (h / 2), wd / 2, g.pixels());
    assert!(applies(g) && dy.len() == g.n * g.c_out * p);
    let planes = channel_planes(g, xs, false);
    let cpo = g.c_out.next_multiple_of(16);
    let (rows, _) = units_of(&Geom { c_out: cpo, ..*g }, (th, tw), KK, false);
    let (per_group, groups, items) = weight_work(g, th, rows);
    let sums: Vec<(usize, Vec<f32>)> = items
        .into_par_iter()
        .map(|(gr, chunk)| {
            let (c0, c1) = (gr * per_group, ((gr + 1) * per_group).min(g.c_in));
            let cpi = per_group;
            let mut du = vec![0.0f32; KK * cpi * cpo];
            for &(n, r0) in &chunk {
                let r1 = (r0 + rows).min(th);
                let tbp = ((r1 - r0) * tw).next_multiple_of(16);
                let (vs, ds) = (spread(cpi * tbp), spread(tbp * cpo));
                let (mut v_buf, va) = aligned(KK * vs);
                let cl_len = 4 * (r1 - r0) * wd * cpo;
                let (mut cl_buf, ca) = aligned(cl_len);
                let (mut dm_buf, da) = aligned(KK * ds);
                let v = v_buf[va..].as_mut_ptr();
                let cl = &mut cl_buf[ca..][..cl_len];
                let dm = dm_buf[da..].as_mut_ptr();
                // SAFETY: V holds 64 rows of vs ≥ cpi · tbp floats, the channels-last rows four
                // per tile row of wd · cpo, dM 64 rows of ds ≥ tbp · cpo, all 64-byte aligned;
                // planes are read inside (load masks); `du` holds 64 · cpi · cpo.
                unsafe {
                    transform_input(&planes[c0..c1], n, g.sp, (r0, r1), v, vs);
                    // The register tiles' rows past the group's last channel: zero.
                    for k in 0..KK {
                        std::ptr::write_bytes(v.add(k * vs + (c1 - c0) * tbp), 0, (cpi - (c1 - c0)) * tbp);
                    }
                    let image = &dy[n * g.c_out * p..][..g.c_out * p];
                    for row in r0..r1 {
                        let (tz, ty) = (row / (h / 2), row % (h / 2));
                        for q in 0..4 {
                            let src = ((2 * tz + q / 2) * h + 2 * ty + q % 2) * wd;
                            let to = &mut cl[(4 * (row - r0) + q) * wd * cpo..];
                            transpose_row(image, p, g.c_out, src, wd, to, cpo, (0, cpo));
                        }
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
    let du = sum_groups(groups, sums);
    // dL/dw[o][c] for 16 output channels at a time (dU's runs over o are contiguous).
    let mut dw = vec![0.0f32; g.c_out * g.c_in * 27];
    dw.par_chunks_mut(16 * g.c_in * 27).enumerate().for_each(|(ob, rows)| {
        let valid = rows.len() / (g.c_in * 27);
        for c in 0..g.c_in {
            let group = &du[c / per_group];
            let taps = untransform_gradient(std::array::from_fn(|k| {
                &group[(k * per_group + c % per_group) * cpo + 16 * ob..][..16]
            }));
            for (t, tap) in taps.iter().enumerate() {
                for (o, &v) in tap.iter().enumerate().take(valid) {
                    rows[(o * g.c_in + c) * 27 + t] = v;
                }
            }
        }
    });
    dw
}

/// dM = (A ⊗ A ⊗ A) dY for the tiles of `rows` tile rows, from their output-gradient rows
/// channels-last (`cl`: per tile row, its rows (slice 0, row 0), (0, 1), (1, 0), (1, 1) of wd
/// pixels x cpo channels): dM_k for tile t at `dm + k · kstride + t · cpo`, padding tiles zero.
///
/// # Safety
/// - The CPU runs AVX-512F.
/// - `cl` holds 4 · rows · wd · cpo floats, wd is even and cpo a multiple of 16.
/// - `dm` is 64-byte aligned and valid for writes of 64 rows of `kstride` floats, `kstride` a
///   multiple of 16 and at least tbp · cpo, and tbp ≥ rows · wd / 2.
#[target_feature(enable = "avx512f")]
unsafe fn output_gradient(cl: &[f32], wd: usize, rows: usize, cpo: usize, dm: *mut f32, tbp: usize, kstride: usize) {
    let tw = wd / 2;
    let zero = _mm512_setzero_ps();
    // A's rows: (1, 0), (1, 1), (1, -1), (0, -1).
    let a = |x: __m512, y: __m512| [x, _mm512_add_ps(x, y), _mm512_sub_ps(x, y), _mm512_sub_ps(zero, y)];
    // SAFETY: the caller's `cl` rows and dM room (above); loads stay inside `cl` (its length).
    unsafe {
        for t in rows * tw..tbp {
            for k in 0..KK {
                for ov in (0..cpo).step_by(16) {
                    _mm512_store_ps(dm.add(k * kstride + t * cpo + ov), zero);
                }
            }
        }
        for ty in 0..rows {
            for tx in 0..tw {
                let t = ty * tw + tx;
                for ov in (0..cpo).step_by(16) {
                    let px = |q: usize, x: usize| {
                        let at = ((4 * ty + q) * wd + 2 * tx + x) * cpo + ov;
                        _mm512_loadu_ps(cl[at..at + 16].as_ptr())
                    };
                    // Along the depth, then the rows, then the columns.
                    let z0 = a(px(0, 0), px(2, 0));
                    let z1 = a(px(0, 1), px(2, 1));
                    let z2 = a(px(1, 0), px(3, 0));
                    let z3 = a(px(1, 1), px(3, 1));
                    for az in 0..4 {
                        let r0 = a(z0[az], z2[az]);
                        let r1 = a(z1[az], z3[az]);
                        for i in 0..4 {
                            for (j, x) in a(r0[i], r1[i]).into_iter().enumerate() {
                                _mm512_store_ps(dm.add(((az * 4 + i) * 4 + j) * kstride + t * cpo + ov), x);
                            }
                        }
                    }
                }
            }
        }
    }
}
