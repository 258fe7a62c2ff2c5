//! Every reader under property tests: real files (the bundled samples, files the library writes,
//! the PyTorch fixtures) mutated — bit flips, byte and header-field overwrites with extreme values
//! (0, -1, 2^31, 2^63, NaN, ...), numbers in text replaced, truncation, inserted, deleted and
//! copied runs; gzip files mutated in their decompressed stream and re-compressed — and fed to
//! the library's reader for that format. Each must return Ok or Err: never panic, and never ask
//! the allocator for more than [`CAP`] bytes at once (a counting global allocator refuses such a
//! request and records it; where the caller cannot handle the refusal the process aborts loudly,
//! after printing which target's input, kept under `target/tmp/fuzz_readers/`, did it).
//!
//! Deterministic: a fixed seed (`PROPTEST_RNG_SEED` overrides it); `PROPTEST_CASES` sets the cases
//! per target for longer runs. Failures are saved in tests/proptest-regressions/fuzz_readers.txt
//! and replayed first by every later run.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::{Read, Write};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use burn::prelude::Device;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, FileFailurePersistence, RngAlgorithm, RngSeed, TestRunner};
use unetpp::data::{DataConfig, Normalize, io};
use unetpp::{checkpoint, import, plot, train};

/// What the library may decode one input to, lowered so that the cap below stays small.
const DECODE_LIMIT: u64 = 32 << 20;
/// The largest single allocation a reader may ask for: the decode limit plus room for a
/// growing Vec's doubling and a decoder's scratch buffers.
const CAP: usize = 128 << 20;

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static OVER: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static OVER_HERE: Cell<usize> = const { Cell::new(0) };
    static TARGET: Cell<&'static str> = const { Cell::new("?") };
    static REPORTING: Cell<bool> = const { Cell::new(false) };
}

impl Counting {
    fn refuse(size: usize) -> bool {
        if REPORTING.try_with(|r| r.get()).unwrap_or(false) {
            return false;
        }
        if size <= CAP && LIVE.load(Ordering::Relaxed) + size <= 8 * CAP {
            return false;
        }
        OVER.fetch_max(size, Ordering::Relaxed);
        let _ = OVER_HERE.try_with(|o| o.set(o.get().max(size)));
        // Not allocating here: a caller that cannot take the refusal aborts right after.
        let name = TARGET.try_with(|t| t.get()).unwrap_or("?");
        let mut err = std::io::stderr();
        let _ = err.write_all(b"fuzz_readers: refused an allocation over the cap while reading target `");
        let _ = err.write_all(name.as_bytes());
        let _ = err.write_all(b"`; its input is in target/tmp/fuzz_readers/\n");
        // Where it came from; the backtrace's own allocations pass while `REPORTING` is set.
        if REPORTING.try_with(|r| !r.replace(true)).unwrap_or(false) {
            eprintln!("{}", std::backtrace::Backtrace::force_capture());
            REPORTING.with(|r| r.set(false));
        }
        true
    }
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if Self::refuse(layout.size()) {
            return std::ptr::null_mut();
        }
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if Self::refuse(layout.size()) {
            return std::ptr::null_mut();
        }
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() && Self::refuse(new_size) {
            return std::ptr::null_mut();
        }
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            LIVE.fetch_add(new_size, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn samples(rel: &str) -> Vec<u8> {
    std::fs::read(root().join("samples").join(rel)).unwrap()
}

fn gunzip(bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![];
    flate2::read::MultiGzDecoder::new(bytes).read_to_end(&mut out).unwrap();
    out
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(vec![], flate2::Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

/// Values written over header fields: zero, -1, sign bits, the largest of each width, NaN and
/// infinities (f32 and f64 bit patterns), and sizes just past common limits.
const EXTREMES: [u64; 16] = [
    0,
    1,
    2,
    u64::MAX,
    1 << 31,
    1 << 63,
    0x7fff_ffff,
    0xffff,
    0x8000,
    0x7fff,
    100_000,
    0x7fc0_0000,
    0x7f80_0000,
    0xff80_0000,
    0x7ff8_0000_0000_0000,
    0xffff_ffff_0000_0000,
];

/// Numbers in text (JSON, CSV, a checkpoint's metadata) are replaced by these.
const TEXTS: [&str; 14] = [
    "0",
    "-1",
    "2147483648",
    "9223372036854775808",
    "18446744073709551616",
    "1e400",
    "NaN",
    "-0",
    "1e-400",
    "4294967296",
    "100000",
    "",
    "\"x\"",
    "[]",
];

#[derive(Clone, Debug)]
enum Mutation {
    Flip {
        at: Index,
        bit: u8,
    },
    Byte {
        at: Index,
        value: u8,
    },
    Truncate {
        at: Index,
    },
    /// An extreme value over a header field of the format (or anywhere), `width` bytes.
    Field {
        header: bool,
        at: Index,
        width: usize,
        value: u64,
        big_endian: bool,
    },
    Insert {
        at: Index,
        bytes: Vec<u8>,
    },
    Delete {
        at: Index,
        len: usize,
    },
    Copy {
        from: Index,
        to: Index,
        len: usize,
    },
    Number {
        k: Index,
        text: &'static str,
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (any::<Index>(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        2 => (any::<Index>(), any::<u8>()).prop_map(|(at, value)| Mutation::Byte { at, value }),
        1 => any::<Index>().prop_map(|at| Mutation::Truncate { at }),
        4 => (
            prop::bool::weighted(0.8),
            any::<Index>(),
            prop::sample::select(vec![1usize, 2, 4, 8]),
            prop::sample::select(EXTREMES.to_vec()),
            any::<bool>()
        )
            .prop_map(|(header, at, width, value, big_endian)| Mutation::Field { header, at, width, value, big_endian }),
        1 => (any::<Index>(), prop::collection::vec(any::<u8>(), 1..64))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        1 => (any::<Index>(), 1usize..256).prop_map(|(at, len)| Mutation::Delete { at, len }),
        1 => (any::<Index>(), any::<Index>(), 1usize..128).prop_map(|(from, to, len)| Mutation::Copy { from, to, len }),
        2 => (any::<Index>(), prop::sample::select(TEXTS.to_vec())).prop_map(|(k, text)| Mutation::Number { k, text }),
    ]
}

/// Runs of ASCII number characters, as (start, end).
fn numbers(b: &[u8]) -> Vec<(usize, usize)> {
    let is_num = |c: u8| c.is_ascii_digit() || matches!(c, b'.' | b'-' | b'e' | b'E' | b'+');
    let mut runs = vec![];
    let mut i = 0;
    while i < b.len() {
        if b[i].is_ascii_digit() {
            let mut s = i;
            while s > 0 && is_num(b[s - 1]) {
                s -= 1;
            }
            let mut e = i;
            while e < b.len() && is_num(b[e]) {
                e += 1;
            }
            runs.push((s, e));
            i = e;
        } else {
            i += 1;
        }
    }
    runs
}

fn apply(mut b: Vec<u8>, muts: &[Mutation], fields: &[usize]) -> Vec<u8> {
    for m in muts {
        let n = b.len();
        match m {
            Mutation::Flip { at, bit } if n > 0 => b[at.index(n)] ^= 1 << bit,
            Mutation::Byte { at, value } if n > 0 => b[at.index(n)] = *value,
            Mutation::Truncate { at } => b.truncate(at.index(n + 1)),
            Mutation::Field { header, at, width, value, big_endian } if n > 0 => {
                let pos = if *header && !fields.is_empty() { fields[at.index(fields.len())] } else { at.index(n) };
                let bytes = if *big_endian {
                    value.to_be_bytes()[8 - width..].to_vec()
                } else {
                    value.to_le_bytes()[..*width].to_vec()
                };
                for (i, v) in bytes.into_iter().enumerate() {
                    if let Some(x) = b.get_mut(pos + i) {
                        *x = v;
                    }
                }
            }
            Mutation::Insert { at, bytes } => {
                let pos = at.index(n + 1);
                b.splice(pos..pos, bytes.iter().copied());
            }
            Mutation::Delete { at, len } if n > 0 => {
                let pos = at.index(n);
                b.drain(pos..(pos + len).min(n));
            }
            Mutation::Copy { from, to, len } if n > 0 => {
                let (f, t) = (from.index(n), to.index(n));
                let run = b[f..(f + len).min(n)].to_vec();
                let end = (t + run.len()).min(n);
                b[t..end].copy_from_slice(&run[..end - t]);
            }
            Mutation::Number { k, text } => {
                let runs = numbers(&b);
                if !runs.is_empty() {
                    let (s, e) = runs[k.index(runs.len())];
                    b.splice(s..e, text.bytes());
                }
            }
            _ => {}
        }
    }
    b
}

type Reader = Box<dyn Fn(&Path) -> anyhow::Result<()>>;

struct Target {
    name: &'static str,
    /// The input's file name: its extension picks the reader path.
    file: &'static str,
    /// Plain bytes (decompressed when `gz`).
    seed: Vec<u8>,
    gz: bool,
    /// Recomputes checksums after a mutation (PNG's chunk CRCs), so that most cases reach the
    /// decoder rather than its checksum check.
    fix: fn(&mut [u8]),
    /// Offsets of the format's header fields in the plain bytes.
    fields: Vec<usize>,
    cases: u32,
    read: Reader,
}

fn image_reader() -> Reader {
    Box::new(|p| {
        let grey = DataConfig::new(1, 1, Normalize::Percentile { low: 0.5, high: 99.5 });
        let rgb = DataConfig::new(3, 2, Normalize::ZScore);
        let a = io::read_input(p, &grey).map(drop);
        let b = io::read_input(p, &rgb).map(drop);
        let c = io::read_mask(p, 1).map(drop);
        let d = io::read_mask(p, 3).map(drop);
        a.or(b).or(c).or(d)
    })
}

fn volume_reader() -> Reader {
    let images = image_reader();
    Box::new(move |p| {
        let h = io::read_header(p).map(drop);
        images(p).or(h)
    })
}

fn checkpoint_reader() -> Reader {
    Box::new(|p| {
        let device = Device::flex();
        let meta = checkpoint::read_meta(p).map(drop);
        let d2 = checkpoint::load::<4>(p, &device).map(drop);
        let d3 = checkpoint::load::<5>(p, &device).map(drop);
        d2.or(d3).or(meta)
    })
}

fn torch_reader() -> Reader {
    Box::new(|p| {
        let shapes = import::shapes(p).map(drop);
        let tensors = import::read_tensors(p).map(drop);
        let model = import::import(p, &Device::flex()).map(drop);
        model.or(tensors).or(shapes)
    })
}

fn metrics_reader() -> Reader {
    Box::new(|p| {
        let png = p.with_extension("png");
        let r = plot::curves(p, &png);
        let _ = std::fs::remove_file(png);
        r
    })
}

fn state_reader() -> Reader {
    Box::new(|p| Ok(serde_json::from_slice::<train::State>(&std::fs::read(p)?).map(drop)?))
}

/// PNG is big-endian: IHDR's width, height, depth, colour type, compression, filter, interlace,
/// and every chunk's length and type.
fn png_fields(b: &[u8]) -> Vec<usize> {
    let mut f = vec![16, 20, 24, 25, 26, 27, 28];
    let mut i = 8;
    while i + 8 <= b.len() {
        f.extend([i, i + 4]);
        i += 12 + u32::from_be_bytes(b[i..i + 4].try_into().unwrap()) as usize;
    }
    f
}

fn fix_png_crcs(b: &mut [u8]) {
    let mut i = 8;
    while i + 12 <= b.len() {
        let len = u32::from_be_bytes(b[i..i + 4].try_into().unwrap()) as usize;
        let Some(end) = (i + 8).checked_add(len).filter(|&e| e + 4 <= b.len()) else { break };
        let mut crc = flate2::Crc::new();
        crc.update(&b[i + 4..end]);
        b[end..end + 4].copy_from_slice(&crc.sum().to_be_bytes());
        i = end + 4;
    }
}

fn le(b: &[u8], at: usize, n: usize) -> Option<usize> {
    let s = b.get(at..at + n)?;
    Some(s.iter().rev().fold(0usize, |v, &x| v << 8 | x as usize))
}

/// A zip's stored (uncompressed) entries: name and data range, from the central directory.
fn zip_entries(b: &[u8]) -> Vec<(String, std::ops::Range<usize>, usize, usize)> {
    let mut out = vec![];
    let mut i = 0;
    while let Some(p) = b[i..].windows(4).position(|w| w == b"PK\x01\x02").map(|p| p + i) {
        i = p + 4;
        let Some(local) = le(b, p + 42, 4) else { break };
        if b.get(local..local + 4) != Some(b"PK\x03\x04") || le(b, local + 8, 2) != Some(0) {
            continue;
        }
        let (Some(n), Some(m), Some(size)) = (le(b, local + 26, 2), le(b, local + 28, 2), le(b, local + 18, 4)) else {
            continue;
        };
        let name = String::from_utf8_lossy(&b[local + 30..(local + 30 + n).min(b.len())]).into_owned();
        let start = local + 30 + n + m;
        if start + size <= b.len() {
            out.push((name, start..start + size, local, p));
        }
    }
    out
}

/// Recomputes the CRC-32 of every stored zip entry (a `.pth` is a zip), in its local header and
/// its central directory record, so that mutations of the pickle reach the pickle parser.
fn fix_zip_crcs(b: &mut [u8]) {
    for (_, data, local, central) in zip_entries(b) {
        let mut crc = flate2::Crc::new();
        crc.update(&b[data]);
        let sum = crc.sum().to_le_bytes();
        b[local + 14..local + 18].copy_from_slice(&sum);
        b[central + 16..central + 20].copy_from_slice(&sum);
    }
}

/// A little-endian TIFF's header and every field (tag, type, count, value) of its first IFD.
fn tiff_fields(b: &[u8]) -> Vec<usize> {
    assert_eq!(&b[..2], b"II", "the TIFF seeds are little-endian");
    let ifd = u32::from_le_bytes(b[4..8].try_into().unwrap()) as usize;
    let n = u16::from_le_bytes(b[ifd..ifd + 2].try_into().unwrap()) as usize;
    let mut f = vec![2, 4, ifd];
    for e in 0..n {
        let at = ifd + 2 + 12 * e;
        f.extend([at, at + 2, at + 4, at + 8]);
    }
    f
}

/// A JPEG's segment lengths and its frame header (precision, height, width, components).
fn jpeg_fields(b: &[u8]) -> Vec<usize> {
    let mut f = vec![];
    let mut i = 2;
    while i + 4 <= b.len() && b[i] == 0xff {
        let marker = b[i + 1];
        f.push(i + 2);
        if matches!(marker, 0xc0..=0xc3) {
            f.extend([i + 4, i + 5, i + 7, i + 9, i + 10, i + 11]);
        }
        if marker == 0xda {
            break;
        }
        i += 2 + u16::from_be_bytes([b[i + 2], b[i + 3]]) as usize;
    }
    f
}

/// NIfTI-1: sizeof_hdr, dim[0..=7], intent, datatype, bitpix, pixdim, vox_offset, scl_slope,
/// scl_inter, the magic and the extender.
fn nifti_fields() -> Vec<usize> {
    let mut f = vec![0, 56, 70, 72, 108, 112, 116, 344, 348];
    f.extend((40..56).step_by(2));
    f.extend((76..108).step_by(4));
    f
}

fn encode(img: &image::DynamicImage, format: image::ImageFormat) -> Vec<u8> {
    let mut out = std::io::Cursor::new(vec![]);
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

/// A JPEG and a BMP made from a crop of a real nuclei image (8-bit, so both formats hold it).
fn nuclei_crop() -> image::DynamicImage {
    let tif = samples("nuclei/train/images/2023-05-31_misc_2.tif");
    let img = image::load_from_memory(&tif).unwrap().crop_imm(40, 40, 64, 48);
    image::DynamicImage::ImageLuma8(img.to_luma8())
}

fn cases(n: u32) -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(n)
}

fn target(name: &str) -> Target {
    let mask = "nuclei/train/masks/2022-03-18_RPE1_3.png";
    let mut fix: fn(&mut [u8]) = |_| {};
    let (file, seed, gz, fields, n, read): (_, Vec<u8>, _, _, _, Reader) = match name {
        "png" => {
            fix = fix_png_crcs;
            ("mask.png", samples(mask), false, png_fields(&samples(mask)), 2000, image_reader())
        }
        "tiff" => {
            let b = samples("nuclei/train/images/2023-05-31_misc_2.tif");
            ("image.tif", b.clone(), false, tiff_fields(&b), 1500, image_reader())
        }
        "jpeg" => {
            let b = encode(&nuclei_crop(), image::ImageFormat::Jpeg);
            ("image.jpg", b.clone(), false, jpeg_fields(&b), 700, image_reader())
        }
        "bmp" => {
            let rgb = image::DynamicImage::ImageRgb8(nuclei_crop().to_rgb8());
            let f = vec![2, 10, 14, 18, 22, 26, 28, 30, 34, 38, 42, 46, 50];
            ("image.bmp", encode(&rgb, image::ImageFormat::Bmp), false, f, 2000, image_reader())
        }
        "nifti_gz_label" => {
            let b = gunzip(&samples("lesions/train/labels/brain2.nii.gz"));
            ("label.nii.gz", b, true, nifti_fields(), 700, volume_reader())
        }
        "nifti_gz_image" => {
            let b = gunzip(&samples("lesions/train/images/lung2.nii.gz"));
            ("image.nii.gz", b, true, nifti_fields(), 300, volume_reader())
        }
        "nifti" => {
            let b = gunzip(&samples("lesions/test/labels/lung1.nii.gz"));
            ("label.nii", b, false, nifti_fields(), 700, volume_reader())
        }
        "checkpoint" => {
            let b = tiny_checkpoint();
            let n = u64::from_le_bytes(b[8..16].try_into().unwrap()) as usize;
            let f = vec![8].into_iter().chain((16 + n..16 + n + 64).step_by(4)).collect();
            ("model.unetpp", b, false, f, 2000, checkpoint_reader())
        }
        "pth" => {
            let b = std::fs::read(root().join("tests/data/torch/nested_c1_k3.pth")).unwrap();
            fix = fix_zip_crcs;
            let pickle = zip_entries(&b).into_iter().find(|e| e.0.ends_with("data.pkl")).expect("data.pkl").1;
            ("model.pth", b, false, pickle.collect(), 400, torch_reader())
        }
        "safetensors" => {
            let b = std::fs::read(root().join("tests/data/torch/nested_c1_k3.safetensors")).unwrap();
            ("model.safetensors", b, false, vec![0, 4], 250, torch_reader())
        }
        "metrics" => ("metrics.csv", metrics_csv(), false, vec![], 600, metrics_reader()),
        "state" => {
            let row = |epoch: usize, val_iou| train::rundir::Row {
                epoch,
                step: 10 * epoch,
                train_loss: 0.5,
                val_iou,
                val_dice: val_iou,
                seconds: 1.5 * epoch as f64,
            };
            let state = train::State {
                epoch: 3,
                step: 30,
                best_iou: 0.5,
                best_epoch: 2,
                stopped_early: false,
                seconds: 4.5,
                history: vec![row(1, Some(0.25)), row(2, Some(0.5)), row(3, None)],
            };
            ("state.json", serde_json::to_vec_pretty(&state).unwrap(), false, vec![], 2000, state_reader())
        }
        _ => unreachable!("{name}"),
    };
    Target { name: name.to_string().leak(), file, seed, gz, fix, fields, cases: cases(n), read }
}

/// A checkpoint of a tiny 2D model, written by the library.
fn tiny_checkpoint() -> Vec<u8> {
    use unetpp::model::{Arch, ModelConfig, Preset};
    let model = ModelConfig { width: 4, ..ModelConfig::new(Arch::Unetpp, Preset::Modern, 2) };
    let meta = checkpoint::Meta {
        model: model.clone(),
        data: DataConfig::new(1, 1, Normalize::Percentile { low: 0.5, high: 99.5 }),
        epoch: 2,
        val_iou: Some(0.25),
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.unetpp");
    checkpoint::save(&model.init::<4>(&Device::flex()), &meta, &path).unwrap();
    std::fs::read(path).unwrap()
}

/// metrics.csv as training writes it (header and rows in train.rs's format, NaN where there is
/// no validation set).
fn metrics_csv() -> Vec<u8> {
    let mut s = String::from("epoch,step,train_loss,val_iou,val_dice,seconds\n");
    for (e, (loss, iou)) in [(0.9, 0.1), (0.6, 0.3), (0.5, f64::NAN), (0.45, 0.52)].into_iter().enumerate() {
        s += &format!("{},{},{loss:.6},{iou:.6},{:.6},{:.1}\n", e + 1, 10 * (e + 1), iou * 1.1, 1.5 * e as f64);
    }
    s.into_bytes()
}

/// Runs `read`, catching a panic; returns its message and the largest refused allocation.
fn guarded(name: &'static str, read: &Reader, path: &Path) -> (Result<bool, String>, usize) {
    TARGET.with(|t| t.set(name));
    OVER_HERE.with(|o| o.set(0));
    let r = catch_unwind(AssertUnwindSafe(|| read(path).is_ok())).map_err(|e| {
        e.downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default()
    });
    (r, OVER_HERE.with(|o| o.get()))
}

fn fuzz(name: &str) {
    io::set_max_decoded_bytes(DECODE_LIMIT);
    let t = target(name);
    // FUZZ_REPLAY=FILE reads one saved input (e.g. from target/tmp/fuzz_readers/) with this
    // target's reader, to see what it does.
    if let Ok(file) = std::env::var("FUZZ_REPLAY") {
        let path = PathBuf::from(file);
        if path.extension() == Path::new(t.file).extension() {
            eprintln!("{}: {:?}", t.name, guarded(t.name, &t.read, &path));
        }
        return;
    }
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fuzz_readers").join(t.name);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(t.file);
    let encode = |plain: &[u8]| if t.gz { gzip(plain) } else { plain.to_vec() };

    // The real file itself must read: a reader that refuses everything would pass the rest.
    std::fs::write(&path, encode(&t.seed)).unwrap();
    let (seed_ok, over) = guarded(t.name, &t.read, &path);
    assert_eq!(seed_ok, Ok(true), "{}: the unmutated seed must read", t.name);
    assert_eq!(over, 0, "{}: the unmutated seed asked for more than the cap", t.name);

    let seed = std::env::var("PROPTEST_RNG_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(16);
    let config = Config {
        cases: t.cases,
        rng_algorithm: RngAlgorithm::ChaCha,
        rng_seed: RngSeed::Fixed(seed),
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "tests/proptest-regressions/fuzz_readers.txt",
        ))),
        max_shrink_iters: 200,
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let (ok, start) = (Cell::new(0u32), Instant::now());
    // gzip files: mostly the decompressed stream (the reader's parser), sometimes the raw gzip;
    // PNG and .pth: mostly with checksums fixed, sometimes without.
    let strategy = (prop::collection::vec(mutation(), 1..6), prop::bool::weighted(0.15));
    let result = runner.run(&strategy, |(muts, raw)| {
        let bytes = if t.gz && raw {
            apply(encode(&t.seed), &muts, &[])
        } else {
            let mut plain = apply(t.seed.clone(), &muts, &t.fields);
            if !raw {
                (t.fix)(&mut plain);
            }
            encode(&plain)
        };
        std::fs::write(&path, &bytes).unwrap();
        let (r, over) = guarded(t.name, &t.read, &path);
        prop_assert!(over == 0, "{}: asked the allocator for {over} bytes (cap {CAP})", t.name);
        match r {
            Ok(accepted) => ok.set(ok.get() + accepted as u32),
            Err(msg) => prop_assert!(false, "{}: the reader panicked: {msg}", t.name),
        }
        Ok(())
    });
    eprintln!(
        "{}: {} mutated inputs in {:.1}s, {} read Ok (all others an error)",
        t.name,
        t.cases,
        start.elapsed().as_secs_f64(),
        ok.get()
    );
    if let Err(e) = result {
        panic!("{e}");
    }
    assert_eq!(OVER.load(Ordering::Relaxed), 0, "an allocation over the cap was refused on another thread");
}

macro_rules! fuzz_tests {
    ($($name:ident),*) => {$(
        #[test]
        fn $name() {
            fuzz(stringify!($name));
        }
    )*};
}

fuzz_tests!(png, tiff, jpeg, bmp, nifti_gz_label, nifti_gz_image, nifti, checkpoint, pth, safetensors, metrics, state);

// The cases the fuzzer is after, one by one: each is refused with an error naming the file, and
// without an allocation over the cap.

/// Reads `bytes` as `file` with `read` in a fresh directory; returns the error message.
fn refused(file: &str, bytes: &[u8], read: impl Fn(&Path) -> anyhow::Result<()> + Copy + 'static) -> String {
    io::set_max_decoded_bytes(DECODE_LIMIT);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(file);
    std::fs::write(&path, bytes).unwrap();
    let (r, over) = guarded("refused", &(Box::new(read) as Reader), &path);
    assert_eq!(over, 0, "{file}: asked for more than the cap");
    assert_eq!(r, Ok(false), "{file}: must be an error");
    let err = format!("{:#}", read(&path).unwrap_err());
    assert!(err.contains(&path.display().to_string()), "the error names the file: {err}");
    err
}

fn put(b: &mut [u8], at: usize, v: &[u8]) {
    b[at..at + v.len()].copy_from_slice(v);
}

fn nifti_label() -> Vec<u8> {
    gunzip(&samples("lesions/train/labels/brain2.nii.gz"))
}

#[test]
fn nifti_declaring_a_huge_volume_is_refused() {
    let mut b = nifti_label();
    for at in [42, 44, 46] {
        put(&mut b, at, &32767i16.to_le_bytes());
    }
    let read = |p: &Path| io::read_raw(p).map(drop);
    for (file, bytes) in [("huge.nii", b.clone()), ("huge.nii.gz", gzip(&b))] {
        let err = refused(file, &bytes, read);
        assert!(err.contains("35181150961663 voxels ([32767, 32767, 32767])"), "{err}");
        let err = refused(file, &bytes, |p| io::read_header(p).map(drop));
        assert!(err.contains("voxels"), "{err}");
    }
}

#[test]
fn nifti_header_fields_are_checked() {
    let cases: [(usize, &[u8], &str); 6] = [
        (40, &0i16.to_le_bytes(), "dim[0] is 0"),
        (44, &0i16.to_le_bytes(), "empty axis"),
        (70, &32i16.to_le_bytes(), "datatype 32 is not supported"),
        (72, &7i16.to_le_bytes(), "bitpix 7"),
        (108, &f32::NAN.to_le_bytes(), "vox_offset NaN"),
        (344, b"ni1\0", "magic"),
    ];
    for (at, value, needle) in cases {
        let mut b = nifti_label();
        put(&mut b, at, value);
        let err = refused("bad.nii.gz", &gzip(&b), |p| io::read_raw(p).map(drop));
        assert!(err.contains(needle), "byte {at}: `{needle}` not in: {err}");
    }
    let mut b = nifti_label();
    b.truncate(b.len() - 1);
    let err = refused("short.nii", &b, |p| io::read_raw(p).map(drop));
    assert!(err.contains("is truncated"), "{err}");
}

/// A gzip bomb: a valid header, then far more data than declared or allowed.
#[test]
fn nifti_decompressing_past_the_limit_is_refused() {
    let mut b = nifti_label();
    b.resize(DECODE_LIMIT as usize + 1024, 0);
    let gz = gzip(&b);
    assert!(gz.len() < 1 << 20, "the bomb is small");
    let err = refused("bomb.nii.gz", &gz, |p| io::read_raw(p).map(drop));
    assert!(err.contains("larger than the limit"), "{err}");
}

/// Our NIfTI reader (header checked, voxels from `vox_offset`) gives the `nifti` crate's own
/// reading of every bundled volume, voxel for voxel, in our [c][z][y][x] order.
#[test]
fn nifti_reads_as_the_nifti_crate_does() {
    use nifti::{IntoNdArray, NiftiObject};
    io::set_max_decoded_bytes(DECODE_LIMIT);
    let mut n = 0;
    for split in ["train", "test"] {
        for kind in ["images", "labels"] {
            for e in std::fs::read_dir(root().join("samples/lesions").join(split).join(kind)).unwrap() {
                let path = e.unwrap().path();
                let ours = io::read_raw(&path).unwrap();
                let obj = nifti::ReaderOptions::new().read_file(&path).unwrap();
                let theirs = obj.into_volume().into_ndarray::<f32>().unwrap();
                let s = theirs.shape();
                assert_eq!(ours.shape, [s[2], s[1], s[0]], "{}", path.display());
                let reordered: Vec<f32> = theirs.permuted_axes(vec![2, 1, 0]).iter().copied().collect();
                assert_eq!(ours.data, reordered, "{}", path.display());
                assert!(ours.data.iter().any(|&v| v != 0.0), "{}: not all zero", path.display());
                n += 1;
            }
        }
    }
    assert_eq!(n, 8);
}

#[test]
fn tiff_tag_count_beyond_the_file_is_refused() {
    let mut b = samples("nuclei/train/images/2023-05-31_misc_2.tif");
    let f = tiff_fields(&b);
    // The first entry's count (the field after tag and type).
    put(&mut b, f[5], &0x0fff_ffffu32.to_le_bytes());
    let err = refused("many.tif", &b, |p| io::read_raw(p).map(drop));
    assert!(err.contains("declares 268435455 values"), "{err}");
}

#[test]
fn png_declaring_huge_dimensions_is_refused() {
    let mut b = samples("nuclei/train/masks/2022-03-18_RPE1_3.png");
    put(&mut b, 16, &100_000u32.to_be_bytes());
    put(&mut b, 20, &100_000u32.to_be_bytes());
    fix_png_crcs(&mut b);
    let err = refused("huge.png", &b, |p| io::read_mask(p, 1).map(drop));
    assert!(err.contains("100000x100000"), "{err}");
}

#[test]
fn checkpoint_metadata_length_past_the_end_is_refused() {
    // u64::MAX used to wrap `16 + n` around and panic slicing.
    for n in [u64::MAX, u64::MAX - 15, 1 << 40] {
        let mut b = tiny_checkpoint();
        put(&mut b, 8, &n.to_le_bytes());
        let err = refused("long.unetpp", &b, |p| checkpoint::read_meta(p).map(drop));
        assert!(err.contains("is truncated"), "{err}");
    }
}

#[test]
fn checkpoint_declaring_a_huge_model_is_refused() {
    let b = tiny_checkpoint();
    let n = u64::from_le_bytes(b[8..16].try_into().unwrap()) as usize;
    let mut meta: serde_json::Value = serde_json::from_slice(&b[16..16 + n]).unwrap();
    // Wide enough to need far more weights than stored, small enough to pass the memory check
    // (`ModelConfig::validate` refuses a width that cannot fit in memory before this one).
    meta["model"]["width"] = 256.into();
    let json = serde_json::to_vec(&meta).unwrap();
    let mut out = b[..8].to_vec();
    out.extend((json.len() as u64).to_le_bytes());
    out.extend(json);
    out.extend(&b[16 + n..]);
    let err = refused("wide.unetpp", &out, |p| checkpoint::load::<4>(p, &Device::flex()).map(drop));
    assert!(err.contains("parameters but holds only"), "{err}");
}

#[test]
fn metrics_csv_rows_are_checked() {
    // A short row used to index out of bounds; an infinite epoch or a value range overflowing
    // to infinity used to hang plotters. The plot ends a training run, so junk rows are skipped
    // (a hand-edited metrics.csv must not fail a finished run) and an overflowing panel is left
    // blank; the plot is still written.
    for row in ["5,50\n", "1e400,50,0.4,0.5\n", "5,50,1e308,0.5\n6,60,-1e308,0.5\n"] {
        let dir = tempfile::tempdir().unwrap();
        let (csv, png) = (dir.path().join("metrics.csv"), dir.path().join("curves.png"));
        let mut b = metrics_csv();
        b.extend(row.as_bytes());
        std::fs::write(&csv, &b).unwrap();
        plot::curves(&csv, &png).unwrap_or_else(|e| panic!("`{row}`: {e:#}"));
        assert!(image::open(&png).is_ok(), "`{row}`: no decodable plot");
    }
}
