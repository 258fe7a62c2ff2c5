//! The GEMM paths of the "same" convolution, on contiguous NC(D)HW f32 slices, built on the
//! `gemm` crate: one GEMM per kernel tap over a padded copy of the image ("shifted", see
//! `Padded`), or im2col (a chunk of output pixels unfolded with row copies, one GEMM), and a
//! weighted sum of planes for 1x1 convolutions to a few channels. `conv` sends here the shapes
//! neither the direct kernel nor Winograd takes, and everything on CPUs without AVX-512. burn
//! Flex instead converts every input to NHWC on one thread, unfolds per 512-pixel tile and
//! scatters the result back element by element.

use super::cpu::{Geom, Padded, SyncPtr, par_written};
use rayon::prelude::*;

#[cfg(not(test))]
const CHUNK_FLOATS: usize = 1 << 22;
// Small in tests, so that chunks end inside images and span several.
#[cfg(test)]
const CHUNK_FLOATS: usize = 1 << 12;

/// Output pixels per GEMM: the unfolded chunk stays near 16 MB, and never under 256 columns so
/// that the GEMM keeps its register tiles full.
fn chunk(g: &Geom) -> usize {
    ((CHUNK_FLOATS / g.rows()).max(256)).min(g.n * g.pixels())
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
    let (total, step) = (g.n * g.pixels(), chunk(g));
    for j0 in (0..total).step_by(step) {
        let j1 = (j0 + step).min(total);
        f(&segments(g, j0, j1), j1 - j0);
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

/// y = conv(x, w) + b, NC(D)HW in and out, for shapes neither the direct kernel nor Winograd
/// takes.
pub(super) fn forward(g: &Geom, x: &[f32], w: &[f32], b: &[f32]) -> Vec<f32> {
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

/// dL/dx for input channels c0..c0+c of the convolution `g` (one part of a channel
/// concatenation), from dL/dy and the whole weight, whose slice for the part is read in place:
/// the forward of the flipped, transposed kernel by shifted GEMMs where they win, else the
/// adjoint of im2col.
pub(super) fn backward_x_part(g: &Geom, dy: &[f32], w: &[f32], c0: usize, c: usize) -> Vec<f32> {
    let part = Geom { c_in: c, ..*g };
    let (rows, p, t) = (part.rows(), g.pixels(), g.taps());
    assert!(c0 + c <= g.c_in && w.len() == g.c_out * g.rows());
    let flipped = Geom { c_in: g.c_out, c_out: c, ..*g };
    if shifted(&flipped) {
        // Written in order (reads of one weight row each), in parallel over input channels.
        // SAFETY: chunk ci holds the c_out rows of t taps of input channel c0 + ci, all written.
        let wf = unsafe {
            par_written(g.c_out * c * t, g.c_out * t, |ci, rows| {
                for (o, row) in rows.chunks_mut(t).enumerate() {
                    let src = &w[(o * g.c_in + c0 + ci) * t..][..t];
                    for (k, v) in row.iter_mut().enumerate() {
                        v.write(src[t - 1 - k]);
                    }
                }
            })
        };
        return forward(&flipped, dy, &wf, &vec![0.0; c]);
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

/// dL/dw from the forward input and dL/dy, for shapes the direct kernel and Winograd do not
/// take.
pub(super) fn backward_w(g: &Geom, x: &[f32], dy: &[f32]) -> Vec<f32> {
    let rows = g.rows();
    let mut dw = vec![0.0; g.c_out * rows];
    if shifted_w(g) {
        backward_w_shifted(g, x, dy, &mut dw);
        return dw;
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
    dw
}
