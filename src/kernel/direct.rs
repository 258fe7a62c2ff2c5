//! Direct stride-1 "same" convolution and its weight gradient with AVX-512 FMA register tiles,
//! for the layers that GEMMs serve badly: few output channels over many pixels (UNet++'s
//! full-resolution nodes, 32 output channels). A GEMM formulation of such a layer has a short
//! output dimension, so its accumulator goes through memory once per kernel tap (shifted GEMMs)
//! or its input is unfolded first (im2col). Here, in the forward pass, a tile of up to 24 output
//! channels x 16-48 pixels of one output row stays in the 32 vector registers for the whole
//! reduction over a block of input channels and the taps, reading the unpadded input with one
//! masked load per 16 pixels (the masks are the zero padding) and each weight as a broadcast.
//! That is the shape of oneDNN's direct kernels, on NCHW; measured at ~80% of the FMA peak.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::cpu::{Geom, Padded, SyncPtr, aligned, assert_avx512, recycle, transpose_row};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Input channels per pass over a tile: a block's packed weights (32 x 9 taps x 8-24 output
/// channels) stay in L1 over the unit's rows; the partial sums go through the output between
/// blocks. 16, 64 and 128 measured within 5% of 32.
const CI_BLOCK: usize = 32;

/// Output channels per tile for rows of `vectors` vectors, with `left` channels still to do:
/// 24 accumulators where possible, fewer channels at the end.
fn block_width(vectors: usize, left: usize) -> usize {
    match (vectors, left) {
        (3, c) if c > 4 => 8,
        (3, _) => 4,
        (2, c) if c > 8 => 12,
        (2, _) => 8,
        (_, c) if c > 16 => 24,
        (_, c) if c > 8 => 16,
        _ => 8,
    }
}

/// One output-channel block of the tiles: its weights as [c_in][tap][width] (a tile's
/// broadcasts for one input channel and tap are consecutive, and a block's weights for one
/// input-channel block are one contiguous run that stays in L1) and its bias, zero-padded.
struct Block {
    o0: usize,
    width: usize,
    w: Vec<f32>,
    bias: Vec<f32>,
}

/// The blocks of weight(o, c, t) (output channel, input channel, tap) and bias `b`.
fn blocks(g: &Geom, b: &[f32], vectors: usize, weight: &(impl Fn(usize, usize, usize) -> f32 + Sync)) -> Vec<Block> {
    let taps = g.taps();
    let mut starts = vec![];
    let mut o0 = 0;
    while o0 < g.c_out {
        let width = block_width(vectors, g.c_out - o0);
        starts.push((o0, width));
        o0 += width;
    }
    // Packed on every call (weights change every step), so it must be cheap: blocks in
    // parallel, and the output channels innermost so that writes are runs and the reads of a
    // block's weight rows stay in cache across taps (tap-innermost writes, a page apart each,
    // made packing 10% of a batch-1 forward pass).
    starts
        .into_par_iter()
        .map(|(o0, width)| {
            let valid = width.min(g.c_out - o0);
            let mut wb = vec![0.0; g.c_in * taps * width];
            for t in 0..taps {
                for c in 0..g.c_in {
                    let run = &mut wb[(t * g.c_in + c) * width..][..valid];
                    for (i, v) in run.iter_mut().enumerate() {
                        *v = weight(o0 + i, c, t);
                    }
                }
            }
            let mut bias = vec![0.0; width];
            bias[..valid].copy_from_slice(&b[o0..o0 + valid]);
            Block { o0, width, w: wb, bias }
        })
        .collect()
}

/// The pixels of one output row as segments of whole vectors: as few segments as the 3-vector
/// tile allows, of equal width where possible (a 64-pixel row is 2 x 32, not 48 + 16).
fn segments(w: usize) -> Vec<(usize, usize)> {
    let parts = w.div_ceil(48);
    let width = w.div_ceil(parts).next_multiple_of(16);
    (0..w).step_by(width).map(|x0| (x0, width.min(w - x0))).collect()
}

/// Whether rows of `w` pixels split into vectors wasting under 10% of their lanes.
fn rows_fill_vectors(w: usize) -> bool {
    let lanes: usize = segments(w).iter().map(|s| s.1.next_multiple_of(16)).sum();
    10 * lanes <= 11 * w
}

/// The output positions of one image (flattened (d, h, w)) as the runs one tile computes, of at
/// most 48 pixels: row segments (`segments`) where rows fill whole vectors, else runs of 48
/// consecutive positions across rows (24x24 and 12x12 images), whose lanes each get their own
/// border masks.
pub(super) fn spans(g: &Geom) -> Vec<(usize, usize)> {
    let (w, p) = (g.sp[2], g.pixels());
    let row = segments(w);
    if rows_fill_vectors(w) {
        (0..g.sp[0] * g.sp[1]).flat_map(|l| row.iter().map(move |&(x0, len)| (l * w + x0, len))).collect()
    } else {
        (0..p).step_by(48).map(|q0| (q0, 48.min(p - q0))).collect()
    }
}

/// y = conv(cat(xs), w) + b for NC(D)HW slices, where the input is the concatenation of the
/// parts `xs` along channels (read in place: UNet++'s dense skip inputs are never copied
/// together), on AVX-512. Every element of `y` is written (it may come uninitialised:
/// zero-filling the output costs a few percent of the convolution).
///
/// # Panics
/// On a CPU without AVX-512F (`cpu::avx512()`), and where the slices do not fit `g`.
#[cfg(test)] // the model's paths pack once (`pack`) and call `forward_packed`
pub fn forward(g: &Geom, xs: &[&[f32]], w: &[f32], b: &[f32], relu: bool, y: &mut [MaybeUninit<f32>]) {
    forward_packed(g, xs, &pack(g, w, b), relu, y)
}

/// The weights and biases packed for `forward_packed` on images of `g`'s size: blocks for each
/// span width in use (at most two).
pub struct Packed(Vec<(usize, Vec<Block>)>);

pub fn pack(g: &Geom, w: &[f32], b: &[f32]) -> Packed {
    let taps = g.taps();
    pack_with(g, b, |o, c, t| w[(o * g.c_in + c) * taps + t])
}

/// `pack` of the weights weight(o, c, t) (output channel, input channel, tap), which the input
/// gradient reads flipped and transposed straight from the forward's weights.
pub fn pack_with(g: &Geom, b: &[f32], weight: impl Fn(usize, usize, usize) -> f32 + Sync) -> Packed {
    let mut widths: Vec<usize> = span_plan(g).0.iter().map(|s| s.1.div_ceil(16)).collect();
    widths.sort_unstable();
    widths.dedup();
    Packed(widths.into_iter().map(|nv| (nv, blocks(g, b, nv, &weight))).collect())
}

/// `forward` with weights packed beforehand (`pack`, for the same geometry).
///
/// # Panics
/// On a CPU without AVX-512F (`cpu::avx512()`), and where the slices do not fit `g`.
pub fn forward_packed(g: &Geom, xs: &[&[f32]], packed: &Packed, relu: bool, y: &mut [MaybeUninit<f32>]) {
    assert_avx512("the direct convolution");
    let p = g.pixels();
    let plan = span_plan(g);
    let (spans, all_taps) = (&plan.0, &plan.1);
    let plans = &packed.0;
    let taps = g.taps();
    // Units of whole spans, at least four per thread over the batch.
    let threads = rayon::current_num_threads();
    let per = spans.len().div_ceil((4 * threads).div_ceil(g.n)).max(1);
    let units: Vec<(usize, usize)> =
        (0..g.n).flat_map(|n| (0..spans.len()).step_by(per).map(move |r| (n, r))).collect();
    let y_len = y.len();
    assert_eq!(y_len, g.n * g.c_out * p);
    // Input-channel blocks (part, first channel in the part, first channel overall, count):
    // no block straddles two parts.
    let mut cblocks = vec![];
    let mut c_all = 0;
    for (k, x) in xs.iter().enumerate() {
        let c_part = x.len() / (g.n * p);
        assert_eq!(x.len(), g.n * c_part * p);
        for c0 in (0..c_part).step_by(CI_BLOCK) {
            cblocks.push((k, c0, c_all + c0, CI_BLOCK.min(c_part - c0)));
        }
        c_all += c_part;
    }
    assert_eq!(c_all, g.c_in);
    let out = SyncPtr(y.as_mut_ptr().cast());
    units.into_par_iter().for_each(|(n, r0)| {
        let mine = &spans[r0..(r0 + per).min(spans.len())];
        let tap_lists = &all_taps[r0..r0 + mine.len()];
        // Input-channel blocks outermost: each block's weights stay in L1 over the unit's spans.
        for &(k, c_in_part, c0, cis) in &cblocks {
            let c_part = xs[k].len() / (g.n * p);
            let xc = &xs[k][(n * c_part + c_in_part) * p..][..cis * p];
            for (&(q0, len), tap_list) in mine.iter().zip(tap_lists) {
                let plan = &plans.iter().find(|p| p.0 == len.div_ceil(16)).expect("a plan per width").1;
                for block in plan {
                    let job = Job {
                        x: xc,
                        stride: p,
                        c_in: cis,
                        taps: tap_list,
                        tap_count: taps,
                        w: &block.w[c0 * block.width..],
                        w_tap: g.c_in * block.width,
                        bias: &block.bias,
                        first: c0 == 0,
                        relu: relu && c0 + cis == g.c_in,
                        len,
                        width: block.width,
                        channels: block.width.min(g.c_out - block.o0),
                        // SAFETY: in bounds: the output span of the block's channels in image
                        // n; units own distinct spans, so no two tasks write the same element.
                        y: out,
                        y_len,
                        y_at: (n * g.c_out + block.o0) * p + q0,
                        y_stride: p,
                    };
                    // SAFETY: AVX-512F is asserted above; `y` is the output slice, whose
                    // elements this unit alone touches (its spans) and, past the first
                    // input-channel block, were written by the earlier blocks; every tap of
                    // `span_taps` is a tap of the kernel. `run` checks the rest.
                    unsafe { job.run() };
                }
            }
        }
    });
}

/// The spans of an image and the taps of each: they depend on the image and kernel sizes only,
/// so they are computed once per size (a 96x96 image has 192 spans of 9 taps whose lane masks
/// took 2-3% of a batch-1 forward pass when computed per call).
fn span_plan(g: &Geom) -> std::sync::Arc<SpanPlan> {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};
    type Plans = Mutex<HashMap<([usize; 3], [usize; 3]), Arc<SpanPlan>>>;
    static PLANS: std::sync::OnceLock<Plans> = std::sync::OnceLock::new();
    let key = (g.sp, g.k);
    let plans = PLANS.get_or_init(Default::default);
    if let Some(plan) = plans.lock().expect("plan cache").get(&key) {
        return plan.clone();
    }
    let spans = spans(g);
    let taps = spans.par_iter().map(|&(q0, len)| span_taps(g, q0, len).collect()).collect();
    let plan = Arc::new((spans, taps));
    let mut plans = plans.lock().expect("plan cache");
    // A tool run sees a few sizes; inference on images of many sizes must not grow it forever.
    if plans.len() >= 64 {
        plans.clear();
    }
    plans.insert(key, plan.clone());
    plan
}

type SpanPlan = (Vec<(usize, usize)>, Vec<Vec<Tap>>);

/// A kernel tap as one output span sees it: the tap's index in the weights, where its input
/// starts relative to the plane (may be -1 and the like: those lanes are masked), and which
/// lanes of each of the span's vectors read inside the image.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // read by the AVX-512 code only
#[derive(Clone, Copy)]
struct Tap {
    t: usize,
    off: isize,
    masks: [u16; 3],
}

/// The taps of the output span q0..q0+len (flattened (d, h, w) positions, at most 48) that land
/// inside the image for some of its pixels: the zero padding of "same" convolution, without a
/// padded copy. Each lane keeps its own (d, h, w), so spans may cross rows.
fn span_taps(g: &Geom, q0: usize, len: usize) -> impl Iterator<Item = Tap> + '_ {
    let [sd, sh, sw] = g.sp;
    let [kd, kh, kw] = g.k;
    let start = [q0 / (sh * sw), q0 / sw % sh, q0 % sw];
    (0..kd * kh * kw).filter_map(move |t| {
        let index = [t / (kh * kw), t / kw % kh, t % kw];
        let shift: [isize; 3] = std::array::from_fn(|i| index[i] as isize - (g.k[i] / 2) as isize);
        let mut masks = [0u16; 3];
        let [mut z, mut y, mut x] = start;
        for l in 0..len {
            let inside = |v: usize, d: isize, n: usize| (0..n as isize).contains(&(v as isize + d));
            if inside(z, shift[0], sd) && inside(y, shift[1], sh) && inside(x, shift[2], sw) {
                masks[l / 16] |= 1 << (l % 16);
            }
            x += 1;
            if x == sw {
                x = 0;
                y += 1;
                if y == sh {
                    y = 0;
                    z += 1;
                }
            }
        }
        let off = q0 as isize + (shift[0] * sh as isize + shift[1]) * sw as isize + shift[2];
        (masks != [0; 3]).then_some(Tap { t, off, masks })
    })
}

/// One register tile: `channels` (or fewer) output channels x `len` pixels of one output row,
/// reduced over `c_in` input channels and the row's taps.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // read by the AVX-512 code only
struct Job<'a> {
    /// Input planes of the tile's input channels (NC(D)HW, one image).
    x: &'a [f32],
    stride: usize,
    c_in: usize,
    taps: &'a [Tap],
    /// Taps of the kernel.
    tap_count: usize,
    /// The weights' step from one tap to the next.
    w_tap: usize,
    /// The block's packed weights from the first input channel of the tile on.
    w: &'a [f32],
    /// Output channels of the block (the tile's width).
    width: usize,
    bias: &'a [f32],
    /// Start from the bias (first input-channel block) or from the partial sums in y.
    first: bool,
    /// Store max(0, .): the last input-channel block of a convolution followed by ReLU.
    relu: bool,
    len: usize,
    /// Output channels of the block that exist (the rest are padding).
    channels: usize,
    y: SyncPtr,
    y_len: usize,
    y_at: usize,
    y_stride: usize,
}

impl Job<'_> {
    /// Computes the tile into its output elements: y_at + c·y_stride + (0..len) for the
    /// `channels` real output channels c. Checks that the input planes, the taps' reads, the
    /// weights and these elements lie inside `x`, `w` and `y_len`.
    ///
    /// # Safety
    /// - The CPU runs AVX-512F.
    /// - `y` is valid for reads and writes of `y_len` floats, and no other thread reads or
    ///   writes the tile's output elements while it runs.
    /// - Unless `first`, those elements are initialised (the earlier input-channel blocks'
    ///   sums): they are loaded as floats.
    /// - Every tap's `t` is below `tap_count` (the weights are bounds-checked for that many).
    #[cfg(target_arch = "x86_64")]
    unsafe fn run(&self) {
        let vectors = self.len.div_ceil(16);
        // Every unmasked lane of every tap reads inside its plane, and the planes are in x.
        assert!(self.c_in * self.stride <= self.x.len());
        for tap in self.taps {
            for (j, &m) in tap.masks.iter().enumerate() {
                if m != 0 {
                    let first = tap.off + (16 * j) as isize + m.trailing_zeros() as isize;
                    let last = tap.off + (16 * j) as isize + 15 - m.leading_zeros() as isize;
                    assert!(first >= 0 && last < self.stride as isize);
                }
            }
        }
        unsafe {
            match (vectors, self.width) {
                (3, 8) => self.tile::<8, 3>(),
                (3, 4) => self.tile::<4, 3>(),
                (2, 12) => self.tile::<12, 2>(),
                (2, 8) => self.tile::<8, 2>(),
                (1, 24) => self.tile::<24, 1>(),
                (1, 16) => self.tile::<16, 1>(),
                (1, 8) => self.tile::<8, 1>(),
                other => unreachable!("no tile for {other:?}"),
            }
        }
    }

    /// # Safety
    /// None to keep: there is no AVX-512 off x86-64, so this is never reached (the callers'
    /// `assert_avx512` fails first) and panics if it is.
    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn run(&self) {
        unreachable!("direct convolution needs x86-64 AVX-512")
    }

    /// `run`'s tile of CB output channels (the block's width) and NV vectors of 16 pixels.
    ///
    /// # Safety
    /// `run`'s preconditions, and the taps' reads checked as `run` checks them; CB is `width`
    /// and NV is `len.div_ceil(16)`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn tile<const CB: usize, const NV: usize>(&self) {
        let valid = self.channels;
        assert!(self.y_at + (valid - 1) * self.y_stride + self.len <= self.y_len);
        assert!(self.w.len() >= (self.tap_count - 1) * self.w_tap + self.c_in * CB && valid <= CB);
        assert!(self.bias.len() >= CB);
        let tail = self.len - 16 * (NV - 1);
        let mask: __mmask16 = if tail >= 16 { 0xffff } else { (1u16 << tail) - 1 };
        let y = self.y.get();
        let row = |c: usize| y.wrapping_add(self.y_at + c * self.y_stride);
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); NV]; CB];
            for (c, a) in acc.iter_mut().enumerate() {
                for (j, v) in a.iter_mut().enumerate() {
                    let m = if j + 1 == NV { mask } else { 0xffff };
                    *v = if self.first {
                        _mm512_set1_ps(self.bias[c])
                    } else if c < valid {
                        _mm512_maskz_loadu_ps(m, row(c).add(16 * j))
                    } else {
                        _mm512_setzero_ps()
                    };
                }
            }
            // Taps outermost: their masks stay in mask registers over the input channels.
            for tap in self.taps {
                let masks = tap.masks;
                // Lanes outside the image are masked off: never read, zero in the vector.
                let mut xs = self.x.as_ptr().wrapping_offset(tap.off);
                let mut w = self.w.as_ptr().add(tap.t * self.w_tap);
                for _ in 0..self.c_in {
                    let mut inp = [_mm512_setzero_ps(); NV];
                    for (j, v) in inp.iter_mut().enumerate() {
                        *v = _mm512_maskz_loadu_ps(masks[j], xs.wrapping_add(16 * j));
                        _mm_prefetch::<_MM_HINT_T0>(xs.wrapping_add(PFF * self.stride + 16 * j).cast());
                    }
                    rank1(&mut acc, &inp, w);
                    xs = xs.wrapping_add(self.stride);
                    w = w.add(CB);
                }
            }
            let zero = _mm512_setzero_ps();
            for (c, a) in acc.iter().enumerate().take(valid) {
                for (j, v) in a.iter().enumerate() {
                    let m = if j + 1 == NV { mask } else { 0xffff };
                    let v = if self.relu { _mm512_max_ps(*v, zero) } else { *v };
                    _mm512_mask_storeu_ps(row(c).add(16 * j), m, v);
                }
            }
        }
    }
}

/// acc[c][j] += s[c] · v[j] for c < CB: the outer-product step both register tiles (forward and
/// weight gradient) are made of.
///
/// # Safety
/// The CPU runs AVX-512F, and `s` points to CB readable, initialised floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn rank1<const CB: usize, const NV: usize>(acc: &mut [[__m512; NV]; CB], v: &[__m512; NV], s: *const f32) {
    for (c, a) in acc.iter_mut().enumerate() {
        // SAFETY: the caller guarantees s[..CB] is readable.
        let sc = _mm512_set1_ps(unsafe { *s.add(c) });
        for (x, y) in a.iter_mut().zip(v) {
            *x = _mm512_fmadd_ps(sc, *y, *x);
        }
    }
}

/// dL/dw[o][c][t] = sum over images and output positions q of dy[o][q] · x_pad[c][q + offset(t)].
/// Both operands go channels-last first (x padded, dy spread over the padded coordinates with
/// zeros where there is no output), which makes every tap an outer-product reduction over
/// positions: a tile of 8 output channels x 48 input channels stays in registers, each position
/// costing 3 aligned vector loads and 8 broadcasts for 24 FMAs. Reducing over positions with
/// pixels in the vector lanes instead (NCHW as it comes) needs 9 unaligned loads per 18 FMAs and
/// ran at half this speed.
///
/// # Panics
/// On a CPU without AVX-512F (`cpu::avx512()`), and where the slices do not fit `g`.
pub fn backward_w(g: &Geom, xs: &[&[f32]], dy: &[f32], dw: &mut [f32]) {
    assert_avx512("the direct weight gradient");
    let pd = Padded::new(g);
    let (p, v, q, taps) = (g.pixels(), pd.volume(), pd.q, g.taps());
    let (cp, op) = (g.c_in.next_multiple_of(16), g.c_out.next_multiple_of(16));
    let offsets = pd.offsets(g);
    let rows: Vec<(usize, usize)> = pd.rows(g).collect();
    let w = g.sp[2];
    let shift = offsets[offsets.len() / 2];
    dw.fill(0.0);
    // Channels-last copies, per image: x_pad [v][cp] and dy [q][op].
    let lines = |per_image: usize, channels: usize, shift: usize| -> Vec<(usize, usize)> {
        (0..g.n)
            .flat_map(|n| rows.iter().map(move |&(src, dst)| (n * channels * p + src, n * per_image + shift + dst)))
            .collect()
    };
    // The input's parts (a channel concatenation) go to their lane ranges one after another.
    let (mut xbuf, xa) = aligned(g.n * v * cp);
    let mut c_off = 0;
    for (k, x) in xs.iter().enumerate() {
        let c = x.len() / (g.n * p);
        let c_end = if k + 1 == xs.len() { cp } else { c_off + c };
        channels_last(&lines(v, c, shift), w, x, c, p, &mut xbuf[xa..][..g.n * v * cp], cp, (c_off, c_end));
        c_off += c;
    }
    assert_eq!(c_off, g.c_in);
    // WO lanes of slack: a tile's last output channels may read past the last position's op.
    let (mut dybuf, da) = aligned(g.n * q * op + WO);
    channels_last(&lines(q, g.c_out, 0), w, dy, g.c_out, p, &mut dybuf[da..][..g.n * q * op], op, (0, op));
    let (xt, dyt) = (&xbuf[xa..][..g.n * v * cp], &dybuf[da..][..g.n * q * op + WO]);
    // Tasks: (output-channel block, input-channel block) pairs, each over a share of every
    // image's positions when there are fewer pairs than twice the threads; shares are summed.
    let pairs: Vec<(usize, usize)> =
        (0..op).step_by(WO).flat_map(|o0| (0..cp).step_by(WC).map(move |c0| (o0, c0))).collect();
    let parts = (2 * rayon::current_num_threads()).div_ceil(pairs.len()).min(q.div_ceil(W_BLOCK)).max(1);
    let tasks: Vec<(usize, usize)> = (0..pairs.len()).flat_map(|i| (0..parts).map(move |s| (i, s))).collect();
    let sums: Vec<Vec<f32>> = tasks
        .par_iter()
        .map(|&(i, share)| {
            let (o0, c0) = pairs[i];
            let vectors = ((cp - c0) / 16).min(WC / 16);
            let mut acc = vec![0.0f32; taps * WO * WC];
            let (q_lo, q_hi) = (share * q / parts, (share + 1) * q / parts);
            for n in 0..g.n {
                let (xn, dyn_) = (&xt[n * v * cp..][..v * cp], &dyt[n * q * op..]);
                for q0 in (q_lo..q_hi).step_by(W_BLOCK) {
                    let len = W_BLOCK.min(q_hi - q0);
                    for (off, a) in offsets.iter().zip(acc.chunks_mut(WO * WC)) {
                        let tile = WTile {
                            x: &xn[(q0 + off) * cp + c0..],
                            x_stride: cp,
                            dy: &dyn_[q0 * op + o0..],
                            dy_stride: op,
                            len,
                            vectors,
                        };
                        // SAFETY: AVX-512F is asserted above; `run` checks the bounds.
                        unsafe { tile.run(a) };
                    }
                }
            }
            acc
        })
        .collect();
    recycle(xbuf);
    recycle(dybuf);
    for (&(i, _), acc) in tasks.iter().zip(&sums) {
        let (o0, c0) = pairs[i];
        for (t, a) in acc.chunks(WO * WC).enumerate() {
            for o in o0..g.c_out.min(o0 + WO) {
                for c in c0..g.c_in.min(c0 + WC) {
                    dw[(o * g.c_in + c) * taps + t] += a[(o - o0) * WC + c - c0];
                }
            }
        }
    }
}

/// The weight gradient's register tile: WO output channels x WC input channels.
const WO: usize = 8;
const WC: usize = 48;

/// How many positions (weight gradient) and input channels (forward) ahead the tiles prefetch:
/// the hardware prefetchers do not follow these strided streams well enough (measured +10% on
/// the weight gradient, +5% on the forward of 96x96 layers; 2-16 all within a few percent).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // read by the AVX-512 code only
const PF: usize = 8;
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // read by the AVX-512 code only
const PFF: usize = 4;

/// Positions per step of the weight gradient: all taps of a step read the block's rows shifted
/// by the tap offsets, so they share them in cache (64 to 512 measured the same).
const W_BLOCK: usize = 256;

/// Writes NC(D)HW data channels-last into lanes [c_off, c_end) of `out` ([position][stride]):
/// line (from, dst) copies pixels from..from+w of every channel plane (`p` apart) to positions
/// dst..dst+w, 16 x 16 blocks at a time through registers; lanes from c_off + channels to c_end
/// get zeros. The first call (c_off = 0) also zeroes every position outside the lines; later
/// calls add the next parts of a channel concatenation.
#[allow(clippy::too_many_arguments)]
fn channels_last(
    lines: &[(usize, usize)],
    w: usize,
    src: &[f32],
    channels: usize,
    p: usize,
    out: &mut [f32],
    stride: usize,
    (c_off, c_end): (usize, usize),
) {
    assert_avx512("the channels-last transpose");
    assert!(c_off + channels <= c_end && c_end <= stride);
    // Split `out` into the lines' spans, zeroing what lies between them.
    let mut spans: Vec<(usize, &mut [f32])> = Vec::with_capacity(lines.len());
    let mut rest = out;
    let mut at = 0;
    for &(from, dst) in lines {
        assert!(from + (channels - 1) * p + w <= src.len() && dst >= at);
        let (gap, tail) = std::mem::take(&mut rest).split_at_mut((dst - at) * stride);
        if c_off == 0 {
            gap.fill(0.0);
        }
        let (row, tail) = tail.split_at_mut(w * stride);
        spans.push((from, row));
        rest = tail;
        at = dst + w;
    }
    if c_off == 0 {
        rest.fill(0.0);
    }
    spans.into_par_iter().for_each(|(from, row)| {
        // SAFETY: AVX-512F is asserted above; loads stay in the line of each channel plane
        // (asserted above), stores in this line's span (lanes below c_end <= stride).
        unsafe { transpose_row(src, p, channels, from, w, row, stride, (c_off, c_end)) }
    });
}

/// 8 output channels x up to 48 input channels of one tap, over `len` positions.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // read by the AVX-512 code only
struct WTile<'a> {
    /// Channels-last padded input at (first position + tap offset, first input channel).
    x: &'a [f32],
    x_stride: usize,
    /// Channels-last output gradient at (first position, first output channel).
    dy: &'a [f32],
    dy_stride: usize,
    len: usize,
    /// Input-channel vectors of the tile (1 to WC / 16).
    vectors: usize,
}

impl WTile<'_> {
    /// Adds the tile's sums to `acc` ([8][48]). Checks that the reads lie inside `x`, `dy` and
    /// `acc`.
    ///
    /// # Safety
    /// The CPU runs AVX-512F.
    #[cfg(target_arch = "x86_64")]
    unsafe fn run(&self, acc: &mut [f32]) {
        assert!(acc.len() >= WO * WC && self.len > 0 && (1..=WC / 16).contains(&self.vectors));
        assert!((self.len - 1) * self.x_stride + 16 * self.vectors <= self.x.len());
        assert!((self.len - 1) * self.dy_stride + WO <= self.dy.len());
        unsafe {
            match self.vectors {
                3 => self.tile::<3>(acc),
                2 => self.tile::<2>(acc),
                _ => self.tile::<1>(acc),
            }
        }
    }

    /// # Safety
    /// None to keep: never reached off x86-64 (see `Job::run`'s).
    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn run(&self, _: &mut [f32]) {
        unreachable!("direct convolution needs x86-64 AVX-512")
    }

    /// `run`'s tile of NV input-channel vectors.
    ///
    /// # Safety
    /// The CPU runs AVX-512F; NV is `vectors`, and `run`'s checks hold.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn tile<const NV: usize>(&self, mem: &mut [f32]) {
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); NV]; WO];
            for (c, a) in acc.iter_mut().enumerate() {
                for (j, v) in a.iter_mut().enumerate() {
                    *v = _mm512_loadu_ps(mem.as_ptr().add(c * WC + 16 * j));
                }
            }
            let (mut xs, mut ds) = (self.x.as_ptr(), self.dy.as_ptr());
            for _ in 0..self.len {
                let mut xv = [_mm512_setzero_ps(); NV];
                for (j, v) in xv.iter_mut().enumerate() {
                    *v = _mm512_loadu_ps(xs.add(16 * j));
                    _mm_prefetch::<_MM_HINT_T0>(xs.wrapping_add(PF * self.x_stride + 16 * j).cast());
                }
                _mm_prefetch::<_MM_HINT_T0>(ds.wrapping_add(PF * self.dy_stride).cast());
                rank1(&mut acc, &xv, ds);
                xs = xs.add(self.x_stride);
                ds = ds.add(self.dy_stride);
            }
            for (c, a) in acc.iter().enumerate() {
                for (j, v) in a.iter().enumerate() {
                    _mm512_storeu_ps(mem.as_mut_ptr().add(c * WC + 16 * j), *v);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{close, naive, rand, require_avx512};
    use super::*;

    /// dL/dw by its definition, in f64.
    fn naive_dw(g: &Geom, x: &[f32], dy: &[f32]) -> Vec<f32> {
        let taps = g.taps();
        let mut dw = vec![0.0; g.c_out * g.c_in * taps];
        // Column (o, c, t) of the weight is the forward with a one-hot weight, read against dy.
        for (i, d) in dw.iter_mut().enumerate() {
            let mut e = vec![0.0; g.c_out * g.c_in * taps];
            e[i] = 1.0;
            let y = naive(g, x, &e, &vec![0.0; g.c_out]);
            *d = y.iter().zip(dy).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() as f32;
        }
        dw
    }

    fn geoms() -> Vec<Geom> {
        vec![
            // rows of one partial vector; channel tails of every tile width
            Geom { n: 2, c_in: 3, c_out: 5, sp: [1, 4, 5], k: [1, 3, 3] },
            Geom { n: 1, c_in: 40, c_out: 13, sp: [1, 3, 17], k: [1, 3, 3] },
            Geom { n: 2, c_in: 5, c_out: 30, sp: [1, 3, 33], k: [1, 3, 3] },
            Geom { n: 1, c_in: 2, c_out: 50, sp: [1, 2, 50], k: [1, 3, 3] },
            Geom { n: 1, c_in: 17, c_out: 1, sp: [1, 5, 64], k: [1, 3, 3] },
            Geom { n: 1, c_in: 3, c_out: 4, sp: [3, 4, 16], k: [3, 3, 3] },
            // short rows: spans of 48 positions across rows and planes
            Geom { n: 2, c_in: 2, c_out: 3, sp: [3, 4, 5], k: [3, 3, 3] },
            Geom { n: 1, c_in: 9, c_out: 20, sp: [1, 12, 12], k: [1, 3, 3] },
            Geom { n: 2, c_in: 2, c_out: 3, sp: [1, 6, 7], k: [1, 5, 5] },
        ]
    }

    #[test]
    #[cfg_attr(not(target_arch = "x86_64"), ignore = "needs AVX-512, an x86-64 extension")]
    fn forward_matches_the_definition() {
        require_avx512();
        for g in geoms() {
            let x = rand(g.n * g.c_in * g.pixels(), 11);
            let w = rand(g.c_out * g.c_in * g.taps(), 12);
            let b = rand(g.c_out, 13);
            let mut y = vec![MaybeUninit::new(f32::NAN); g.n * g.c_out * g.pixels()];
            forward(&g, &[&x], &w, &b, false, &mut y);
            // SAFETY: initialised above (an element the kernel missed stays NaN and fails).
            let y: Vec<f32> = y.into_iter().map(|v| unsafe { v.assume_init() }).collect();
            close(&y, &naive(&g, &x, &w, &b), 1e-5);
        }
    }

    #[test]
    #[cfg_attr(not(target_arch = "x86_64"), ignore = "needs AVX-512, an x86-64 extension")]
    fn weight_gradient_matches_the_definition() {
        require_avx512();
        for g in geoms() {
            let x = rand(g.n * g.c_in * g.pixels(), 14);
            let dy = rand(g.n * g.c_out * g.pixels(), 15);
            let mut dw = vec![0.0; g.c_out * g.c_in * g.taps()];
            forward_and_back(&g, &x, &dy, &mut dw);
            close(&dw, &naive_dw(&g, &x, &dy), 1e-4);
        }
    }

    /// The input as a concatenation of parts of 1, 5 and the remaining channels (unaligned lane
    /// offsets, input-channel blocks ending inside a part) gives the same weight gradient as the
    /// whole, and the forward of the parts with ReLU fused is relu(conv).
    #[test]
    #[cfg_attr(not(target_arch = "x86_64"), ignore = "needs AVX-512, an x86-64 extension")]
    fn weight_gradient_of_parts() {
        require_avx512();
        let g = Geom { n: 2, c_in: 23, c_out: 5, sp: [1, 4, 18], k: [1, 3, 3] };
        let p = g.pixels();
        let x = rand(g.n * g.c_in * p, 17);
        let dy = rand(g.n * g.c_out * p, 18);
        let part = |c0: usize, c1: usize| -> Vec<f32> {
            (0..g.n).flat_map(|n| x[(n * g.c_in + c0) * p..(n * g.c_in + c1) * p].iter().copied()).collect()
        };
        let (a, b, c) = (part(0, 1), part(1, 6), part(6, 23));
        let mut whole = vec![0.0; g.c_out * g.c_in * 9];
        let mut parts = whole.clone();
        backward_w(&g, &[&x], &dy, &mut whole);
        backward_w(&g, &[&a, &b, &c], &dy, &mut parts);
        close(&parts, &whole, 1e-6);
        close(&whole, &naive_dw(&g, &x, &dy), 1e-4);
        let mut y = vec![MaybeUninit::new(f32::NAN); g.n * g.c_out * p];
        let w = rand(g.c_out * g.c_in * 9, 19);
        forward(&g, &[&a, &b, &c], &w, &[0.5; 5], true, &mut y);
        // SAFETY: initialised above.
        let y: Vec<f32> = y.into_iter().map(|v| unsafe { v.assume_init() }).collect();
        let relu: Vec<f32> = naive(&g, &x, &w, &[0.5; 5]).into_iter().map(|v| v.max(0.0)).collect();
        close(&y, &relu, 1e-5);
    }

    /// Twice, so that the second call gets the first one's pooled buffers, dirty.
    fn forward_and_back(g: &Geom, x: &[f32], dy: &[f32], dw: &mut [f32]) {
        let noise = rand(g.n * g.c_in * g.pixels(), 16);
        backward_w(g, &[&noise], dy, dw);
        backward_w(g, &[x], dy, dw);
    }
}
