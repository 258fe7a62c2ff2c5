//! Stride-1 "same" convolution (odd kernel, padding k/2) on contiguous NC(D)HW f32 slices, with
//! its two backward products, picking a path per shape (and CPU): Winograd F(2x2,3x3) of
//! `winograd` for 2D 3x3 layers from 16 input channels and 12x12 up, the direct kernels of
//! `direct` for the other shapes whose output rows fill whole vectors (3D, odd sizes, the first
//! layer), else GEMMs of the `gemm` crate: one GEMM per kernel tap over a padded copy of the image
//! ("shifted"), or im2col (a chunk of output pixels unfolded with row copies, one GEMM). The last
//! two are also what CPUs without AVX-512 run. burn Flex instead converts every input to NHWC on
//! one thread, unfolds per 512-pixel tile and scatters the result back element by element.

use rayon::prelude::*;
use std::mem::MaybeUninit;

#[cfg(not(test))]
const CHUNK_FLOATS: usize = 1 << 22;
// Small in tests, so that chunks end inside images and span several.
#[cfg(test)]
const CHUNK_FLOATS: usize = 1 << 12;

/// Shapes of one convolution. 2D uses `d = 1`, `kd = 1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geom {
    pub n: usize,
    pub c_in: usize,
    pub c_out: usize,
    /// Spatial size (d, h, w).
    pub sp: [usize; 3],
    /// Kernel size (kd, kh, kw), each odd.
    pub k: [usize; 3],
}

impl Geom {
    pub(super) fn pixels(&self) -> usize {
        self.sp.iter().product()
    }
    pub(super) fn taps(&self) -> usize {
        self.k.iter().product()
    }
    /// Rows of the unfolded matrix (GEMM's inner dimension).
    fn rows(&self) -> usize {
        self.c_in * self.taps()
    }
    fn pointwise(&self) -> bool {
        self.taps() == 1
    }
    /// Output pixels per GEMM: the unfolded chunk stays near 16 MB, and never under 256 columns
    /// so that the GEMM keeps its register tiles full.
    fn chunk(&self) -> usize {
        ((CHUNK_FLOATS / self.rows()).max(256)).min(self.n * self.pixels())
    }
}

/// A run of columns of the flattened (image, pixel) axis that lies within one image.
#[derive(Clone, Copy)]
struct Seg {
    image: usize,
    p0: usize,
    len: usize,
}

fn segments(g: &Geom, j0: usize, j1: usize) -> Vec<Seg> {
    let p = g.pixels();
    let mut out = vec![];
    let mut j = j0;
    while j < j1 {
        let (image, p0) = (j / p, j % p);
        let len = (p - p0).min(j1 - j);
        out.push(Seg { image, p0, len });
        j += len;
    }
    out
}

fn par() -> gemm::Parallelism {
    match rayon::current_num_threads() {
        1 => gemm::Parallelism::None,
        _ => gemm::Parallelism::Rayon(0),
    }
}

/// dst (m x n) = [dst +] lhs (m x k) · rhs (k x n); each matrix given by (slice, row stride,
/// column stride).
#[allow(clippy::too_many_arguments)]
fn matmul(
    parallelism: gemm::Parallelism,
    m: usize,
    n: usize,
    k: usize,
    dst: (&mut [f32], isize, isize),
    accumulate: bool,
    lhs: (&[f32], isize, isize),
    rhs: (&[f32], isize, isize),
) {
    let span = |rows: usize, cols: usize, rs: isize, cs: isize| {
        if rows == 0 || cols == 0 { 0 } else { (rows - 1) as isize * rs + (cols - 1) as isize * cs + 1 }
    };
    assert!(span(m, n, dst.1, dst.2) as usize <= dst.0.len());
    assert!(span(m, k, lhs.1, lhs.2) as usize <= lhs.0.len());
    assert!(span(k, n, rhs.1, rhs.2) as usize <= rhs.0.len());
    // SAFETY: the asserts above keep every access of the three strided views inside its slice.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.0.as_mut_ptr(),
            dst.2,
            dst.1,
            accumulate,
            lhs.0.as_ptr(),
            lhs.2,
            lhs.1,
            rhs.0.as_ptr(),
            rhs.2,
            rhs.1,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// A c_out x len accumulator with every row set to its channel's bias.
fn bias_rows(b: &[f32], len: usize) -> Vec<f32> {
    let mut acc = vec![0.0f32; b.len() * len];
    for (row, &v) in acc.chunks_mut(len).zip(b) {
        row.fill(v);
    }
    acc
}

/// For each output line (d, h) crossed by the segment, the output w range and line start.
fn lines(g: &Geom, s: Seg, mut f: impl FnMut(usize, usize, usize, usize, usize)) {
    let [_, h, w] = g.sp;
    let mut p = s.p0;
    let end = s.p0 + s.len;
    let mut col = 0;
    while p < end {
        let (line, x0) = (p / w, p % w);
        let x1 = w.min(x0 + end - p);
        f(line / h, line % h, x0, x1, col);
        col += x1 - x0;
        p += x1 - x0;
    }
}

/// Calls `f(tap row offset, source line or None, dx)` for every kernel tap of one output line.
fn taps(g: &Geom, d: usize, y: usize, mut f: impl FnMut(usize, Option<usize>, isize)) {
    let [sd, sh, _] = g.sp;
    let [kd, kh, kw] = g.k;
    let mut t = 0;
    for a in 0..kd {
        let zd = d as isize + a as isize - (kd / 2) as isize;
        for b in 0..kh {
            let zy = y as isize + b as isize - (kh / 2) as isize;
            let inside = (0..sd as isize).contains(&zd) && (0..sh as isize).contains(&zy);
            let src = inside.then(|| (zd as usize * sh + zy as usize) * g.sp[2]);
            for c in 0..kw {
                f(t, src, c as isize - (kw / 2) as isize);
                t += 1;
            }
        }
    }
}

/// The overlap of output columns [x0, x1) shifted by dx with the input line [0, w).
fn overlap(x0: usize, x1: usize, dx: isize, w: usize) -> (usize, usize) {
    let lo = (x0 as isize).max(-dx).min(x1 as isize) as usize;
    let hi = ((x1 as isize).min(w as isize - dx)).max(lo as isize) as usize;
    (lo, hi)
}

/// Unfolds the chunk's columns into `col` (rows x width, row-major).
fn im2col(g: &Geom, x: &[f32], segs: &[Seg], width: usize, col: &mut [f32]) {
    let (p, taps_n, w) = (g.pixels(), g.taps(), g.sp[2]);
    col.par_chunks_mut(taps_n * width).enumerate().for_each(|(c, rows)| {
        for (s, start) in with_offsets(segs) {
            let plane = &x[(s.image * g.c_in + c) * p..][..p];
            lines(g, s, |d, y, x0, x1, at| {
                taps(g, d, y, |t, src, dx| {
                    let dst = &mut rows[t * width + start + at..][..x1 - x0];
                    match src {
                        None => dst.fill(0.0),
                        Some(line) => {
                            let (lo, hi) = overlap(x0, x1, dx, w);
                            dst[..lo - x0].fill(0.0);
                            let from = (line as isize + lo as isize + dx) as usize;
                            dst[lo - x0..hi - x0].copy_from_slice(&plane[from..from + hi - lo]);
                            dst[hi - x0..].fill(0.0);
                        }
                    }
                });
            });
        }
    });
}

/// Each segment with the chunk column where it starts.
fn with_offsets(segs: &[Seg]) -> impl Iterator<Item = (Seg, usize)> + '_ {
    segs.iter().scan(0, |at, s| {
        let start = *at;
        *at += s.len;
        Some((*s, start))
    })
}

/// Adds the unfolded gradient `col` back onto the input gradient `dx` (the adjoint of im2col).
fn col2im(g: &Geom, col: &[f32], segs: &[Seg], width: usize, dx: &mut [f32]) {
    let (p, taps_n, w) = (g.pixels(), g.taps(), g.sp[2]);
    let dx_ptr = SyncPtr(dx.as_mut_ptr());
    let len = dx.len();
    // Parallel over input channels: each owns its planes of dx in every image.
    (0..g.c_in).into_par_iter().for_each(|c| {
        let rows = &col[c * taps_n * width..][..taps_n * width];
        for (s, start) in with_offsets(segs) {
            let off = (s.image * g.c_in + c) * p;
            assert!(off + p <= len);
            // SAFETY: plane (image, c) is touched only by the task of channel c.
            let plane = unsafe { std::slice::from_raw_parts_mut(dx_ptr.get().add(off), p) };
            lines(g, s, |d, y, x0, x1, at| {
                taps(g, d, y, |t, src, dxo| {
                    if let Some(line) = src {
                        let (lo, hi) = overlap(x0, x1, dxo, w);
                        let from = &rows[t * width + start + at + lo - x0..][..hi - lo];
                        let to = (line as isize + lo as isize + dxo) as usize;
                        for (o, v) in plane[to..to + hi - lo].iter_mut().zip(from) {
                            *o += v;
                        }
                    }
                });
            });
        }
    });
}

#[derive(Clone, Copy)]
pub(super) struct SyncPtr(pub(super) *mut f32);
// SAFETY: used only for disjoint writes, see col2im.
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}
impl SyncPtr {
    pub(super) fn get(self) -> *mut f32 {
        self.0
    }
}

/// Copies the chunk's columns of an (image, channel, pixel) tensor into a channels x width matrix.
fn gather(g: &Geom, t: &[f32], channels: usize, segs: &[Seg], width: usize) -> Vec<f32> {
    let p = g.pixels();
    let mut m = vec![0.0; channels * width];
    m.par_chunks_mut(width).enumerate().for_each(|(c, row)| {
        let mut at = 0;
        for s in segs {
            row[at..at + s.len].copy_from_slice(&t[(s.image * channels + c) * p + s.p0..][..s.len]);
            at += s.len;
        }
    });
    m
}

/// The inverse of `gather`.
fn scatter(g: &Geom, m: &[f32], channels: usize, segs: &[Seg], width: usize, t: &mut [f32]) {
    let p = g.pixels();
    for (c, row) in m.chunks(width).enumerate().take(channels) {
        let mut at = 0;
        for s in segs {
            t[(s.image * channels + c) * p + s.p0..][..s.len].copy_from_slice(&row[at..at + s.len]);
            at += s.len;
        }
    }
}

/// Runs `f(segments, width)` over the chunks of the (image, pixel) axis.
fn chunks(g: &Geom, mut f: impl FnMut(&[Seg], usize)) {
    let (total, step) = (g.n * g.pixels(), g.chunk());
    for j0 in (0..total).step_by(step) {
        let j1 = (j0 + step).min(total);
        f(&segments(g, j0, j1), j1 - j0);
    }
}

/// The zero-padded view behind the shifted-GEMM formulation: with the input padded by k/2 on
/// every side and the output indexed in padded coordinates (q = (d·Hp + h)·Wp + w), tap t of
/// the kernel reads the padded input at q + offset(t), so each tap is one GEMM over a contiguous
/// range. Positions with h >= H or w >= W are computed and thrown away (2-6% extra at our sizes).
pub(super) struct Padded {
    /// Padded spatial size (Dp, Hp, Wp).
    sp: [usize; 3],
    /// Output positions in padded coordinates: the last valid one plus one.
    pub(super) q: usize,
}

impl Padded {
    pub(super) fn new(g: &Geom) -> Self {
        let sp = [0, 1, 2].map(|i| g.sp[i] + 2 * (g.k[i] / 2));
        let [_, hp, wp] = sp;
        let q = ((g.sp[0] - 1) * hp + (g.sp[1] - 1)) * wp + g.sp[2];
        Padded { sp, q }
    }
    pub(super) fn volume(&self) -> usize {
        self.sp.iter().product()
    }
    /// Offset of each kernel tap, in the order of the weight's trailing axes.
    pub(super) fn offsets(&self, g: &Geom) -> Vec<usize> {
        let [_, hp, wp] = self.sp;
        let [kd, kh, kw] = g.k;
        (0..kd).flat_map(|a| (0..kh).flat_map(move |b| (0..kw).map(move |c| (a * hp + b) * wp + c))).collect()
    }
    /// Padded index of each output row start (d, h) -> (valid index, padded index).
    pub(super) fn rows(&self, g: &Geom) -> impl Iterator<Item = (usize, usize)> {
        let [sd, sh, sw] = g.sp;
        let [_, hp, wp] = self.sp;
        (0..sd).flat_map(move |d| (0..sh).map(move |h| ((d * sh + h) * sw, (d * hp + h) * wp)))
    }
    /// Copies `channels` planes of one image into the padded layout.
    pub(super) fn pad(&self, g: &Geom, t: &[f32], channels: usize) -> Vec<f32> {
        let (p, v, w) = (g.pixels(), self.volume(), g.sp[2]);
        let shift = (g.k[0] / 2 * self.sp[1] + g.k[1] / 2) * self.sp[2] + g.k[2] / 2;
        let mut out = vec![0.0; channels * v];
        out.par_chunks_mut(v).enumerate().for_each(|(c, plane)| {
            for (src, dst) in self.rows(g) {
                plane[shift + dst..][..w].copy_from_slice(&t[c * p + src..][..w]);
            }
        });
        out
    }
    /// Spreads `channels` planes of one image over the first `q` padded-coordinate positions,
    /// zero where there is no output.
    fn spread(&self, g: &Geom, t: &[f32], channels: usize) -> Vec<f32> {
        let (p, w) = (g.pixels(), g.sp[2]);
        let mut out = vec![0.0; channels * self.q];
        out.par_chunks_mut(self.q).enumerate().for_each(|(c, plane)| {
            for (src, dst) in self.rows(g) {
                plane[dst..][..w].copy_from_slice(&t[c * p + src..][..w]);
            }
        });
        out
    }
}

/// Forward by shifted GEMMs (see `Padded`): y[n] = b + sum over taps of W_t · shift_t(x[n]).
/// Small GEMMs split badly across threads, so the work is cut into independent units (an image,
/// or a range of one image's output positions when there are fewer images than threads), one
/// single-threaded GEMM chain per unit.
fn forward_shifted(g: &Geom, x: &[f32], w: &[f32], b: &[f32], y: &mut [f32]) {
    let pd = Padded::new(g);
    let (taps, p, q, v) = (g.taps() as isize, g.pixels(), pd.q, pd.volume());
    let threads = rayon::current_num_threads();
    let parts = (2 * threads).div_ceil(g.n).max(1);
    let step = q.div_ceil(parts);
    let padded: Vec<Vec<f32>> = (0..g.n).map(|n| pd.pad(g, &x[n * g.c_in * p..][..g.c_in * p], g.c_in)).collect();
    let units: Vec<(usize, usize, usize)> =
        (0..g.n).flat_map(|n| (0..q).step_by(step).map(move |q0| (n, q0, (q0 + step).min(q)))).collect();
    let (y_ptr, y_len) = (SyncPtr(y.as_mut_ptr()), y.len());
    units.into_par_iter().for_each(|(n, q0, q1)| {
        let len = q1 - q0;
        let mut acc = bias_rows(b, len);
        for (t, off) in pd.offsets(g).into_iter().enumerate() {
            let wt = (&w[t..], g.c_in as isize * taps, taps);
            let xs = (&padded[n][off + q0..], v as isize, 1);
            matmul(gemm::Parallelism::None, g.c_out, len, g.c_in, (&mut acc, len as isize, 1), true, wt, xs);
        }
        // Keep the valid positions of [q0, q1): each unit owns distinct pixels of y.
        for (dst, src) in pd.rows(g) {
            let (a, z) = (src.max(q0), (src + g.sp[2]).min(q1));
            if a >= z {
                continue;
            }
            for c in 0..g.c_out {
                let at = (n * g.c_out + c) * p + dst + a - src;
                assert!(at + z - a <= y_len);
                // SAFETY: in bounds (asserted); no other unit writes these positions.
                let out = unsafe { std::slice::from_raw_parts_mut(y_ptr.get().add(at), z - a) };
                out.copy_from_slice(&acc[c * len + a - q0..][..z - a]);
            }
        }
    });
}

/// dL/dw by shifted GEMMs: dW_t = sum over images of dy[n] · shift_t(x[n])^T. Each product
/// has a small output and a long inner dimension, which the GEMM does not split across threads,
/// so the taps run in parallel instead, one thread each.
fn backward_w_shifted(g: &Geom, x: &[f32], dy: &[f32], dw: &mut [f32]) {
    let pd = Padded::new(g);
    let (taps, p, q, v) = (g.taps(), g.pixels(), pd.q, pd.volume());
    let per_tap: Vec<Vec<f32>> = (0..g.n)
        .map(|n| {
            (
                pd.pad(g, &x[n * g.c_in * p..][..g.c_in * p], g.c_in),
                pd.spread(g, &dy[n * g.c_out * p..][..g.c_out * p], g.c_out),
            )
        })
        .fold(vec![vec![0.0; g.c_out * g.c_in]; taps], |mut acc, (xp, dyq)| {
            acc.par_iter_mut().zip(pd.offsets(g)).for_each(|(dst, off)| {
                matmul(
                    gemm::Parallelism::None,
                    g.c_out,
                    g.c_in,
                    q,
                    (dst, g.c_in as isize, 1),
                    true,
                    (&dyq, q as isize, 1),
                    (&xp[off..], 1, v as isize),
                );
            });
            acc
        });
    for (t, m) in per_tap.iter().enumerate() {
        for (i, &val) in m.iter().enumerate() {
            dw[i * taps + t] = val;
        }
    }
}

/// Shifted GEMMs stream the output once per tap, im2col streams a k^n-times copy of the input
/// once: the first wins when the output is narrower than the unfolded input, and needs rows
/// long enough that the thrown-away padding columns stay cheap.
fn shifted(g: &Geom) -> bool {
    !g.pointwise() && g.c_out < g.rows() && g.sp[2] >= 16
}

/// See `backward_w_shifted`; im2col wins only on tiny images.
fn shifted_w(g: &Geom) -> bool {
    !g.pointwise() && g.sp[2] >= 16
}

/// Winograd (F(2x2) or F(4x4), `winograd::tile_side`) on AVX-512 wherever it applies (2D 3x3,
/// even sizes) but on narrow inputs
/// (1 -> 32 at 96x96: 4.5x slower than direct, 16 -> 32: 1.2-1.6x faster) and 6x6 images (9
/// tiles per image fill a third of the 48-tile register tile; even with the im2col GEMM).
/// `once`: the weights are transformed for this call alone (training, where they change every
/// step), which takes a pass over 16/9 of the weights' size: on 12x12 images at batch 1 (36
/// tiles), where the weights are largest and the tiles fewest, that cost more than the products
/// saved, and a batch-1 training step ran 5-10% faster with the direct kernel there.
fn winograd_ok(g: &Geom, once: bool) -> bool {
    let tiles = g.n * g.pixels() / 4;
    super::winograd::applies(g) && g.c_in >= 16 && g.sp[1].min(g.sp[2]) >= 12 && (!once || tiles >= 100)
}

/// The direct kernel runs spans of output positions in 16-pixel vectors: worth it where they
/// waste under 10% of their lanes (not on 6x6 images: 36 pixels in 48 lanes). Where Winograd
/// applies as well, Winograd is taken (`prepare`, `backward_x_parts`, `backward_w_parts`).
fn direct_ok(g: &Geom) -> bool {
    let lanes: usize = super::direct::spans(g).iter().map(|s| s.1.next_multiple_of(16)).sum();
    super::direct::available() && !g.pointwise() && 10 * lanes <= 11 * g.pixels()
}

/// Concatenates NC(D)HW parts along channels.
pub fn cat(n: usize, xs: &[&[f32]]) -> Vec<f32> {
    let mut out = Vec::with_capacity(xs.iter().map(|x| x.len()).sum());
    for i in 0..n {
        for x in xs {
            let per = x.len() / n;
            out.extend_from_slice(&x[i * per..][..per]);
        }
    }
    out
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
    Direct(super::direct::Packed),
    Winograd(super::winograd::Weights),
}

/// The prepared weights for `g`'s path (`None` where the path reads them as they are), to be
/// used for many calls.
pub fn prepare(g: &Geom, w: &[f32], b: &[f32]) -> Option<Prepared> {
    prepare_for(g, w, b, false)
}

fn prepare_for(g: &Geom, w: &[f32], b: &[f32], once: bool) -> Option<Prepared> {
    if winograd_ok(g, once) {
        Some(Prepared::Winograd(super::winograd::prepare(g, w)))
    } else if direct_ok(g) {
        Some(Prepared::Direct(super::direct::pack(g, w, b)))
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
            written(len, |out| super::direct::forward_packed(g, xs, packed, relu, out))
        },
        Some(Prepared::Winograd(u)) => winograd(g, (xs, false), u, b, relu),
        None => {
            // The GEMM paths read one input: parts are concatenated first.
            let y = match xs {
                [x] => forward_gemm(g, x, w, b),
                _ => forward_gemm(g, &cat(g.n, xs), w, b),
            };
            if relu { y.into_iter().map(|v| v.max(0.0)).collect() } else { y }
        }
    }
}

/// A vector of `len` values, all written by `fill` (never zeroed first).
///
/// # Safety
/// `fill` must write every element of the slice it is given.
unsafe fn written(len: usize, fill: impl FnOnce(&mut [MaybeUninit<f32>])) -> Vec<f32> {
    let mut v = Vec::with_capacity(len);
    fill(&mut v.spare_capacity_mut()[..len]);
    // SAFETY: the caller's `fill` wrote all `len` elements.
    unsafe { v.set_len(len) };
    v
}

/// The Winograd forward into a new output, stored as it is.
fn winograd(g: &Geom, xs: (&[&[f32]], bool), u: &super::winograd::Weights, b: &[f32], relu: bool) -> Vec<f32> {
    let len = g.n * g.c_out * g.pixels();
    let store = super::winograd::Epilogue::Store;
    // SAFETY: Winograd writes every element of its output.
    unsafe { written(len, |out| super::winograd::forward(g, xs, u, b, relu, &mut [out], store)) }
}

/// `forward_prepared` of a concatenation whose last part is given at half resolution and enters
/// as its 2x linear up-sampling (align_corners = false), `spatial` (2 or 3) axes: a nested node's
/// input. 2D Winograd up-samples the rows each unit transforms as it goes (the up-sampled part,
/// the largest input of such a node, is never stored); the other paths up-sample it first.
pub fn forward_up(
    g: &Geom,
    spatial: usize,
    xs: &[&[f32]],
    (w, b): (&[f32], &[f32]),
    relu: bool,
    prep: Option<&Prepared>,
) -> Vec<f32> {
    let Some((last, lateral)) = xs.split_last() else { panic!("no input parts") };
    if let (2, Some(Prepared::Winograd(u))) = (spatial, prep) {
        return winograd(g, (xs, true), u, b, relu);
    }
    let half: Vec<usize> = g.sp[3 - spatial..].iter().map(|&s| s / 2).collect();
    let c = last.len() / (g.n * half.iter().product::<usize>());
    let up = super::upsample::forward(last, &[&[g.n, c][..], &half].concat());
    let parts: Vec<&[f32]> = lateral.iter().copied().chain([up.as_slice()]).collect();
    forward_prepared(g, &parts, w, b, relu, prep)
}

/// `forward_prepared`, then 2x max pooling of each of its `spatial` (2 or 3) axes: (y, pool(y)).
/// 2D Winograd pools each tile row as it stores it (no second pass over y); the other paths
/// pool afterwards.
pub fn forward_pooled(
    g: &Geom,
    spatial: usize,
    xs: &[&[f32]],
    (w, b): (&[f32], &[f32]),
    relu: bool,
    prep: Option<&Prepared>,
) -> (Vec<f32>, Vec<f32>) {
    let len = g.n * g.c_out * g.pixels();
    if let (2, Some(Prepared::Winograd(u))) = (spatial, prep) {
        let mut y = vec![];
        // SAFETY: Winograd writes every element of its output and of the pooled output.
        let pooled = unsafe {
            written(len / 4, |pooled| {
                let epi = super::winograd::Epilogue::Pool(pooled);
                y = written(len, |out| super::winograd::forward(g, (xs, false), u, b, relu, &mut [out], epi));
            })
        };
        return (y, pooled);
    }
    let y = forward_prepared(g, xs, w, b, relu, prep);
    let shape = [&[g.n, g.c_out][..], &g.sp[3 - spatial..]].concat();
    let pooled = super::pool::forward(&y, &shape);
    (y, pooled)
}

/// The 1x1 convolution `hw` ([classes][c_out]) + `hb` of `forward_prepared`'s output: a head on a
/// node whose output nothing else reads. Winograd sums each tile row into the head as it leaves
/// the output transform, and never stores the node's output.
#[allow(clippy::too_many_arguments)]
pub fn forward_head(
    g: &Geom,
    xs: &[&[f32]],
    w: &[f32],
    b: &[f32],
    relu: bool,
    prep: Option<&Prepared>,
    hw: &[f32],
    hb: &[f32],
) -> Vec<f32> {
    let len = g.n * hb.len() * g.pixels();
    if let Some(Prepared::Winograd(u)) = prep {
        // SAFETY: Winograd writes every element of the head's output.
        return unsafe {
            written(len, |out| {
                let epi = super::winograd::Epilogue::Head { w: hw, b: hb, out };
                super::winograd::forward(g, (xs, false), u, b, relu, &mut [], epi)
            })
        };
    }
    let y = forward_prepared(g, xs, w, b, relu, prep);
    forward(&Geom { c_in: g.c_out, c_out: hb.len(), k: [1, 1, 1], ..*g }, &y, hw, hb)
}

/// A 1x1 convolution to a few channels (UNet++'s heads, 32 -> 1): each output plane is a
/// weighted sum of the input planes, streamed once in L1-sized blocks. The GEMM path would copy
/// the input into a matrix first and run a one-row product on it.
fn forward_pointwise_narrow(g: &Geom, x: &[f32], w: &[f32], b: &[f32]) -> Vec<f32> {
    // Small in tests, so that planes end inside a block.
    const BLOCK: usize = if cfg!(test) { 8 } else { 4096 };
    let p = g.pixels();
    let mut y = vec![0.0; g.n * g.c_out * p];
    // Blocks, not planes, for the threads: a batch of one image has one output plane.
    y.par_chunks_mut(p).enumerate().for_each(|(plane, out)| {
        let (n, o) = (plane / g.c_out, plane % g.c_out);
        out.par_chunks_mut(BLOCK).enumerate().for_each(|(k, acc)| {
            acc.fill(b[o]);
            for c in 0..g.c_in {
                let wc = w[o * g.c_in + c];
                let xs = &x[(n * g.c_in + c) * p + k * BLOCK..][..acc.len()];
                acc.iter_mut().zip(xs).for_each(|(a, &v)| *a += wc * v);
            }
        });
    });
    y
}

/// y = conv(x, w) + b, NC(D)HW in and out.
pub fn forward(g: &Geom, x: &[f32], w: &[f32], b: &[f32]) -> Vec<f32> {
    forward_parts(g, &[x], w, b, false)
}

/// The forward paths for shapes neither the direct kernel nor Winograd takes.
fn forward_gemm(g: &Geom, x: &[f32], w: &[f32], b: &[f32]) -> Vec<f32> {
    let (rows, p) = (g.rows(), g.pixels());
    if g.pointwise() && g.c_out <= 4 {
        return forward_pointwise_narrow(g, x, w, b);
    }
    let mut y = vec![0.0; g.n * g.c_out * p];
    if shifted(g) {
        forward_shifted(g, x, w, b, &mut y);
        return y;
    }
    let mut col = vec![];
    chunks(g, |segs, width| {
        let rhs = if g.pointwise() {
            gather(g, x, g.c_in, segs, width)
        } else {
            // The unfolded chunk is reused from one chunk to the next.
            let mut buf = std::mem::take(&mut col);
            buf.resize(rows * width, 0.0);
            im2col(g, x, segs, width, &mut buf);
            buf
        };
        let mut out = bias_rows(b, width);
        matmul(
            par(),
            g.c_out,
            width,
            rows,
            (&mut out, width as isize, 1),
            true,
            (w, rows as isize, 1),
            (&rhs, width as isize, 1),
        );
        scatter(g, &out, g.c_out, segs, width, &mut y);
        if !g.pointwise() {
            col = rhs;
        }
    });
    y
}

/// dL/dx from dL/dy.
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
    let u = super::winograd::prepare_with(&flipped, |o, ci, k| w[(ci * g.c_in + chans[o]) * 9 + 8 - k]);
    let mut dxs: Vec<Vec<f32>> = parts.iter().map(|&(_, c)| Vec::with_capacity(g.n * c * g.pixels())).collect();
    {
        let mut outs: Vec<&mut [MaybeUninit<f32>]> = dxs.iter_mut().map(|d| d.spare_capacity_mut()).collect();
        super::winograd::forward(
            &flipped,
            (&[dy], false),
            &u,
            &vec![0.0; chans.len()],
            false,
            &mut outs,
            super::winograd::Epilogue::Store,
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
    let part = Geom { c_in: c, ..*g };
    let (rows, p, t) = (part.rows(), g.pixels(), g.taps());
    assert!(c0 + c <= g.c_in && w.len() == g.c_out * g.rows());
    let flipped = Geom { c_in: g.c_out, c_out: c, ..*g };
    let zeros = vec![0.0; c];
    // The input gradient is the convolution of dy with the flipped, transposed kernel, whose
    // weights are prepared straight from the forward's: input channel c0 + o of the part is the
    // flipped convolution's output channel o.
    let weight = |o: usize, ci: usize, k: usize| w[(ci * g.c_in + c0 + o) * t + t - 1 - k];
    if direct_ok(&flipped) {
        let packed = super::direct::pack_with(&flipped, &zeros, weight);
        return forward_prepared(&flipped, &[dy], &[], &zeros, false, Some(&Prepared::Direct(packed)));
    }
    if shifted(&flipped) {
        // Written in order (reads of one weight row each), in parallel over input channels.
        // SAFETY: chunk ci holds the c_out rows of t taps of input channel c0 + ci, all written.
        let wf = unsafe {
            super::par_written(g.c_out * c * t, g.c_out * t, |ci, rows| {
                for (o, row) in rows.chunks_mut(t).enumerate() {
                    let src = &w[(o * g.c_in + c0 + ci) * t..][..t];
                    for (k, v) in row.iter_mut().enumerate() {
                        v.write(src[t - 1 - k]);
                    }
                }
            })
        };
        return forward(&flipped, dy, &wf, &zeros);
    }
    let mut dx = vec![0.0; g.n * c * p];
    chunks(&part, |segs, width| {
        let dyc = gather(&part, dy, g.c_out, segs, width);
        let mut dcol = vec![0.0; rows * width];
        // The part's w^T is the weight buffer read with swapped strides from its first column.
        matmul(
            par(),
            rows,
            width,
            g.c_out,
            (&mut dcol, width as isize, 1),
            false,
            (&w[c0 * t..], 1, g.rows() as isize),
            (&dyc, width as isize, 1),
        );
        if g.pointwise() {
            scatter(&part, &dcol, c, segs, width, &mut dx);
        } else {
            col2im(&part, &dcol, segs, width, &mut dx);
        }
    });
    dx
}

/// (dL/dw, dL/db) from the forward input, given as the parts of a channel concatenation, and
/// dL/dy. The direct kernel reads the parts in place; the GEMM paths get them copied together.
pub fn backward_w_parts(g: &Geom, xs: &[&[f32]], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    if winograd_ok(g, true) {
        return (super::winograd::backward_w(g, xs, dy), bias_grad(g, dy));
    }
    if direct_w_ok(g) {
        let mut dw = vec![0.0; g.c_out * g.rows()];
        super::direct::backward_w(g, xs, dy, &mut dw);
        return (dw, bias_grad(g, dy));
    }
    match xs {
        [x] => backward_w_gemm(g, x, dy),
        _ => backward_w_gemm(g, &cat(g.n, xs), dy),
    }
}

/// The direct weight gradient beats the GEMMs from 8-pixel rows up (at 6x6: 1.6x slower).
fn direct_w_ok(g: &Geom) -> bool {
    super::direct::available() && !g.pointwise() && g.sp[2] >= 8
}

fn bias_grad(g: &Geom, dy: &[f32]) -> Vec<f32> {
    let p = g.pixels();
    (0..g.c_out)
        .map(|o| {
            (0..g.n)
                .map(|n| {
                    let plane = &dy[(n * g.c_out + o) * p..][..p];
                    super::norm::lane_sums(plane, plane, |v, _| [v])[0]
                })
                .sum::<f64>() as f32
        })
        .collect()
}

/// (dL/dw, dL/db) from the forward input and dL/dy.
pub fn backward_w(g: &Geom, x: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    backward_w_parts(g, &[x], dy)
}

/// The weight-gradient paths for shapes the direct kernel does not take.
fn backward_w_gemm(g: &Geom, x: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let rows = g.rows();
    let mut dw = vec![0.0; g.c_out * rows];
    let db = bias_grad(g, dy);
    if shifted_w(g) {
        backward_w_shifted(g, x, dy, &mut dw);
        return (dw, db);
    }
    let mut first = true;
    chunks(g, |segs, width| {
        let dyc = gather(g, dy, g.c_out, segs, width);
        let col = if g.pointwise() {
            gather(g, x, g.c_in, segs, width)
        } else {
            let mut col = vec![0.0; rows * width];
            im2col(g, x, segs, width, &mut col);
            col
        };
        // dw (c_out x rows) += dy (c_out x width) · col^T (width x rows)
        matmul(
            par(),
            g.c_out,
            rows,
            width,
            (&mut dw, rows as isize, 1),
            !first,
            (&dyc, width as isize, 1),
            (&col, 1, width as isize),
        );
        first = false;
    });
    (dw, db)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// Direct definition of the convolution, for checking.
    pub(crate) fn naive(g: &Geom, x: &[f32], w: &[f32], b: &[f32]) -> Vec<f32> {
        let [sd, sh, sw] = g.sp;
        let [kd, kh, kw] = g.k;
        let mut y = vec![0.0; g.n * g.c_out * g.pixels()];
        for n in 0..g.n {
            for o in 0..g.c_out {
                for z in 0..sd {
                    for r in 0..sh {
                        for c in 0..sw {
                            let mut acc = b[o] as f64;
                            for i in 0..g.c_in {
                                for a in 0..kd {
                                    for bb in 0..kh {
                                        for cc in 0..kw {
                                            let (zz, rr, ccc) = (
                                                z as isize + a as isize - (kd / 2) as isize,
                                                r as isize + bb as isize - (kh / 2) as isize,
                                                c as isize + cc as isize - (kw / 2) as isize,
                                            );
                                            if zz < 0
                                                || rr < 0
                                                || ccc < 0
                                                || zz >= sd as isize
                                                || rr >= sh as isize
                                                || ccc >= sw as isize
                                            {
                                                continue;
                                            }
                                            let xi = (((n * g.c_in + i) * sd + zz as usize) * sh + rr as usize) * sw
                                                + ccc as usize;
                                            let wi = (((o * g.c_in + i) * kd + a) * kh + bb) * kw + cc;
                                            acc += x[xi] as f64 * w[wi] as f64;
                                        }
                                    }
                                }
                            }
                            y[(((n * g.c_out + o) * sd + z) * sh + r) * sw + c] = acc as f32;
                        }
                    }
                }
            }
        }
        y
    }

    pub(crate) fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(&a, &b)| a as f64 * b as f64).sum()
    }

    pub(crate) fn close(a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= tol * (1.0 + y.abs()), "element {i}: {x} vs {y}");
        }
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
            let tol = if winograd_ok(&g, true) && super::super::winograd::tile_side(&g) == 4 { 1e-4 } else { 1e-5 };
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
