//! The bottom layer of the kernels, which every kernel file builds on and none redefines: the
//! CPU feature check that guards all AVX-512 code, the convolution geometry (`Geom`, `Padded`),
//! the per-thread pool of aligned scratch buffers, outputs written in parallel without zeroing
//! (`par_written`, `written`, `SyncPtr`), and the channels-last transpose that the direct and
//! Winograd weight gradients share. It imports no other kernel file.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use rayon::prelude::*;
use std::mem::MaybeUninit;

/// True where the CPU runs AVX-512F (detected once by std and cached: an atomic load after).
pub(super) fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Panics unless the CPU runs AVX-512F: the check at the top of every safe function that runs
/// AVX-512 code, which on another CPU would execute instructions it does not have (undefined
/// behaviour, not merely a crash). Cheap: `avx512` is cached.
#[track_caller]
pub(super) fn assert_avx512(what: &str) {
    assert!(avx512(), "{what} needs a CPU with AVX-512F; callers pick another path where `cpu::avx512()` is false");
}

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
    pub(super) fn rows(&self) -> usize {
        self.c_in * self.taps()
    }
    pub(super) fn pointwise(&self) -> bool {
        self.taps() == 1
    }
}

/// A raw output pointer that tasks on several threads may hold at once. Only for writes that
/// the code using it keeps disjoint between tasks (each site says how), inside the buffer.
#[derive(Clone, Copy)]
pub(super) struct SyncPtr(pub(super) *mut f32);
// SAFETY: a pointer has no thread affinity; the users' writes are disjoint (see above), so no
// two threads touch one element.
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}
impl SyncPtr {
    pub(super) fn get(self) -> *mut f32 {
        self.0
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
    pub(super) fn spread(&self, g: &Geom, t: &[f32], channels: usize) -> Vec<f32> {
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

/// Prefetches every cache line of `xs` into L1: for reads the hardware prefetchers miss (a few
/// lines from each of many planes a page or more apart).
pub(super) fn prefetch(xs: &[f32]) {
    for l in (0..xs.len()).step_by(16) {
        // SAFETY: a prefetch of an address inside the slice; it reads nothing architecturally.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(xs.as_ptr().add(l).cast()) };
    }
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

/// An f32 buffer whose element `at` is 64-byte aligned, so that whole-vector loads of rows
/// whose length is a multiple of 16 never straddle two cache lines.
/// The buffer comes from a per-thread pool and its contents are whatever the last user left:
/// callers write every element they read (page faults and zero-filling of fresh buffers cost
/// as much as the transposes they hold).
pub(super) fn aligned(len: usize) -> (Vec<f32>, usize) {
    let mut buf = POOL.with(|p| p.borrow_mut().pop()).unwrap_or_default();
    // Grown, never shrunk: zero-filling happens only when a buffer first reaches a size.
    if buf.len() < len + 16 {
        buf.resize(len + 16, 0.0);
    }
    let at = buf.as_ptr().align_offset(64).min(16);
    (buf, at)
}

/// Returns a buffer of `aligned` to the pool (three kept per thread: the Winograd weight
/// gradient holds three at once).
pub(super) fn recycle(buf: Vec<f32>) {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < 3 {
            p.push(buf);
        }
    });
}

thread_local! {
    static POOL: std::cell::RefCell<Vec<Vec<f32>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A vector of `len` values written in parallel, `chunk` at a time, by `fill(chunk index,
/// chunk)`, without zeroing it first (zero-filled outputs cost ~3% of a training step).
///
/// # Safety
/// `fill` must write every element of every chunk it is given: the vector's elements are
/// treated as initialised afterwards, and an element left out would be read as uninitialised
/// memory.
pub(super) unsafe fn par_written(
    len: usize,
    chunk: usize,
    fill: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync + Send,
) -> Vec<f32> {
    let mut v = Vec::with_capacity(len);
    v.spare_capacity_mut()[..len].par_chunks_mut(chunk.max(1)).enumerate().for_each(|(i, c)| fill(i, c));
    // SAFETY: the caller's `fill` initialised all `len` elements.
    unsafe { v.set_len(len) };
    v
}

/// A vector of `len` values, all written by `fill` (never zeroed first).
///
/// # Safety
/// `fill` must write every element of the slice it is given (see `par_written`).
pub(super) unsafe fn written(len: usize, fill: impl FnOnce(&mut [MaybeUninit<f32>])) -> Vec<f32> {
    let mut v = Vec::with_capacity(len);
    fill(&mut v.spare_capacity_mut()[..len]);
    // SAFETY: the caller's `fill` wrote all `len` elements.
    unsafe { v.set_len(len) };
    v
}

/// Writes `channels` planes of NC(D)HW data channels-last: pixels src..src+w of each plane (the
/// planes `p` apart in `planes`) go to `row` as w positions of `stride` lanes, channel c of
/// position i at lane i·stride + c_off + c; lanes c_off + channels .. c_end get zeros, the
/// others are left alone. 16 x 16 blocks at a time through registers.
///
/// # Safety
/// - The CPU runs AVX-512F (`avx512()`).
/// - `c_off + channels <= c_end <= stride`, and when `channels > 0` the planes hold the loaded
///   pixels: `(channels - 1)·p + src + w <= planes.len()`.
/// - `row` holds the stored lanes: `(w - 1)·stride + c_end <= row.len()` (for w > 0).
///
/// None of these is checked here: the callers check them once, outside their loops.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn transpose_row(
    planes: &[f32],
    p: usize,
    channels: usize,
    src: usize,
    w: usize,
    row: &mut [f32],
    stride: usize,
    (c_off, c_end): (usize, usize),
) {
    unsafe {
        for c0 in (0..c_end - c_off).step_by(16) {
            let lanes = 16.min(c_end - c_off - c0);
            let keep: __mmask16 = if lanes == 16 { 0xffff } else { (1u16 << lanes) - 1 };
            for i0 in (0..w).step_by(16) {
                let n = 16.min(w - i0);
                let m: __mmask16 = if n == 16 { 0xffff } else { (1u16 << n) - 1 };
                let mut r = [_mm512_setzero_ps(); 16];
                for (k, v) in r.iter_mut().enumerate() {
                    if c0 + k < channels {
                        *v = _mm512_maskz_loadu_ps(m, planes.as_ptr().add((c0 + k) * p + src + i0));
                    }
                }
                transpose16(&mut r);
                for (j, v) in r.iter().enumerate().take(n) {
                    _mm512_mask_storeu_ps(row.as_mut_ptr().add((i0 + j) * stride + c_off + c0), keep, *v);
                }
            }
        }
    }
}

/// `transpose_row` off x86-64, where there is no AVX-512: never reached, as its callers assert
/// the CPU first.
///
/// # Safety
/// None to keep: it panics.
#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn transpose_row(
    _: &[f32],
    _: usize,
    _: usize,
    _: usize,
    _: usize,
    _: &mut [f32],
    _: usize,
    _: (usize, usize),
) {
    unreachable!("direct convolution needs x86-64 AVX-512")
}

/// In-register transpose of a 16 x 16 block (row k = vector k): pairs interleaved 32 bits, then
/// 64 bits, then 128-bit lanes twice.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn transpose16(r: &mut [__m512; 16]) {
    let mut t = [_mm512_setzero_ps(); 16];
    for k in 0..8 {
        t[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
        t[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
    }
    for k in 0..4 {
        let (a, b, c, d) = (t[4 * k], t[4 * k + 1], t[4 * k + 2], t[4 * k + 3]);
        r[4 * k] = _mm512_shuffle_ps::<0x44>(a, c);
        r[4 * k + 1] = _mm512_shuffle_ps::<0xee>(a, c);
        r[4 * k + 2] = _mm512_shuffle_ps::<0x44>(b, d);
        r[4 * k + 3] = _mm512_shuffle_ps::<0xee>(b, d);
    }
    for h in 0..2 {
        for k in 0..4 {
            t[8 * h + k] = _mm512_shuffle_f32x4::<0x88>(r[8 * h + k], r[8 * h + 4 + k]);
            t[8 * h + 4 + k] = _mm512_shuffle_f32x4::<0xdd>(r[8 * h + k], r[8 * h + 4 + k]);
        }
    }
    for k in 0..8 {
        r[k] = _mm512_shuffle_f32x4::<0x88>(t[k], t[8 + k]);
        r[8 + k] = _mm512_shuffle_f32x4::<0xdd>(t[k], t[8 + k]);
    }
}
