//! The on-disk preprocessed cache (`src/data/cache`): what it gives equals what memory gives
//! (cases, patches, whole training runs), entries that are damaged or out of date are rebuilt
//! and only those, and training on a data set four times larger than its own peak memory.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use rand::{Rng, SeedableRng, rngs::StdRng};
use unetpp::data::cache::{self, CachedCase, Prepared};
use unetpp::data::patch;
use unetpp::data::{self, DataConfig, Normalize, Sample};

use common::{Tiny, s};

mod common;

/// A volume `[x, y, z]` of noise inside a zero margin (what cropping removes), with a labelled blob.
fn volume(dir: &Path, name: &str, dims: [usize; 3], seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let margin = |i: usize, n: usize| i >= n / 6 && i < n - n / 6;
    let image = ndarray::Array3::from_shape_fn(dims, |(x, y, z)| {
        if margin(x, dims[0]) && margin(y, dims[1]) && margin(z, dims[2]) { rng.random_range(1..=255u8) } else { 0 }
    });
    let c = dims.map(|d| (d / 2) as f64 + (seed % 3) as f64);
    let mask = ndarray::Array3::from_shape_fn(dims, |(x, y, z)| {
        let r = ((x as f64 - c[0]).powi(2) + (y as f64 - c[1]).powi(2) + (z as f64 - c[2]).powi(2)).sqrt();
        u8::from(r < dims[0] as f64 / 5.0)
    });
    for (sub, arr) in [("images", image), ("masks", mask)] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
        nifti::writer::WriterOptions::new(dir.join(sub).join(format!("{name}.nii"))).write_nifti(&arr).unwrap();
    }
}

/// A grey 8-bit image of noise inside a zero margin, with a labelled square.
fn image_2d(dir: &Path, name: &str, (w, h): (u32, u32), seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let img = image::GrayImage::from_fn(w, h, |x, y| {
        let inside = x >= 5 && y >= 7 && x < w - 9 && y < h - 4;
        image::Luma([if inside { rng.random_range(1..=255u8) } else { 0 }])
    });
    let mask = image::GrayImage::from_fn(w, h, |x, y| {
        let inside = x >= 20 && y >= 30 && x < w - 30 && y < h - 20;
        image::Luma([if inside && (x / 9 + y / 11) % 4 == 1 { 255 } else { 0 }])
    });
    for (sub, im) in [("images", img), ("masks", mask)] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
        im.save(dir.join(sub).join(format!("{name}.png"))).unwrap();
    }
}

fn data_3d(dir: &Path, n: usize) -> PathBuf {
    let d = dir.join("vols");
    for i in 0..n {
        volume(&d, &format!("case{i}"), [30 + 2 * i, 26, 20 + i], i as u64);
    }
    d
}

fn prepare(data: &Path, cfg: &DataConfig, root: &Path) -> Prepared {
    let pairs = data::pairs(data, true).unwrap();
    let dir = cache::key_dir(root, &cache::settings(cfg).unwrap());
    cache::prepare(&pairs, cfg, &dir, false).unwrap()
}

fn samples(data: &Path, cfg: &DataConfig) -> Vec<Sample> {
    let loaded = data::load(data, cfg, true, false).unwrap();
    data::volume::spacing::to_target(loaded, cfg.spacing).unwrap()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Each cached case reads back as its sample, and random patches (foreground-centred or not,
/// augmented) drawn from the same seed are the same, bit for bit.
fn assert_same(want: &[Sample], got: &[CachedCase], size: [usize; 3], cropped: bool) {
    assert_eq!(want.len(), got.len());
    for (s, c) in want.iter().zip(got) {
        let whole = c.load().unwrap();
        assert_eq!((&whole.name, whole.shape, &whole.mask), (&s.name, s.shape, &s.mask));
        assert_eq!(bits(&whole.image), bits(&s.image), "{}", s.name);
        let ix = &c.file.index;
        assert!(
            !cropped || ix.size.iter().product::<usize>() < s.voxels(),
            "{}: {:?} not cropped to its body {:?} at {:?}",
            s.name,
            s.shape,
            ix.size,
            ix.origin
        );
        for seed in 0..40 {
            let (mut a, mut b) = (StdRng::seed_from_u64(seed), StdRng::seed_from_u64(seed));
            let fg = [0.0, 0.5, 1.0][seed as usize % 3];
            let mut p = patch::sample(s, size, fg, &mut a).unwrap();
            let mut q = patch::sample(c, size, fg, &mut b).unwrap();
            patch::augment(&mut p, &mut a);
            patch::augment(&mut q, &mut b);
            assert_eq!((bits(&p.image), &p.mask), (bits(&q.image), &q.mask), "{} seed {seed}", s.name);
        }
        let (want, got) = (patch::centre_crop(s, [12, 12, 12]), c.centre_crop([12, 12, 12]).unwrap());
        assert_eq!((bits(&want.image), want.mask, want.shape), (bits(&got.image), got.mask, got.shape));
    }
}

#[test]
fn cached_patches_equal_patches_cut_in_memory_2d_and_3d() {
    let tmp = tempfile::tempdir().unwrap();
    let vols = data_3d(tmp.path(), 3);
    let mut cfg = DataConfig::new(1, 1, Normalize::ZScore);
    let p = prepare(&vols, &cfg, &tmp.path().join("c"));
    assert_eq!((p.built.len(), p.reused), (3, 0));
    assert_same(&samples(&vols, &cfg), &p.cases, [16, 16, 16], true);
    // Resampled to a target spacing first, as training does.
    cfg.spacing = Some("0.7,1.3,1.6".parse().unwrap());
    let p = prepare(&vols, &cfg, &tmp.path().join("c"));
    assert_eq!(p.built.len(), 3);
    let want = samples(&vols, &cfg);
    assert_ne!(want[0].shape, samples(&vols, &DataConfig::new(1, 1, Normalize::ZScore))[0].shape);
    assert_same(&want, &p.cases, [8, 24, 16], false);

    let flat = tmp.path().join("flat");
    for i in 0..3 {
        image_2d(&flat, &format!("im{i}"), (300 + 10 * i as u32, 280), i as u64);
    }
    let cfg = DataConfig::new(1, 1, Normalize::Percentile { low: 0.5, high: 99.5 });
    let p = prepare(&flat, &cfg, &tmp.path().join("c"));
    assert_eq!(p.cases[0].file.index.block, [1, 256, 256]);
    assert!(p.cases[0].file.index.image.len() > 1, "more than one block");
    assert_same(&samples(&flat, &cfg), &p.cases, [1, 96, 96], true);
}

fn entry(p: &Prepared, name: &str) -> PathBuf {
    p.cases.iter().find(|c| c.name() == name).unwrap().file.path.clone()
}

#[test]
fn corrupted_or_truncated_entries_are_detected_and_rebuilt() {
    let tmp = tempfile::tempdir().unwrap();
    let vols = data_3d(tmp.path(), 4);
    let cfg = DataConfig::new(1, 1, Normalize::ZScore);
    let root = tmp.path().join("c");
    let first = prepare(&vols, &cfg, &root);
    // A flipped byte in the middle (a block), the end cut off (an interrupted copy), an empty
    // file (a full disk).
    let flipped = entry(&first, "case0");
    let mut bytes = std::fs::read(&flipped).unwrap();
    let mid = bytes.len() / 3;
    bytes[mid] ^= 0x40;
    std::fs::write(&flipped, bytes).unwrap();
    let cut = entry(&first, "case1");
    let len = std::fs::metadata(&cut).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&cut).unwrap().set_len(len - 7).unwrap();
    std::fs::write(entry(&first, "case2"), b"").unwrap();
    let again = prepare(&vols, &cfg, &root);
    assert_eq!((again.built.clone(), again.reused), (vec!["case0".into(), "case1".into(), "case2".into()], 1));
    let why = again.rebuilt_because.join("\n");
    for needle in ["case0: ", "checksum", "case1: ", "case2: ", "too short"] {
        assert!(why.contains(needle), "{needle}: {why}");
    }
    assert_same(&samples(&vols, &cfg), &again.cases, [16, 16, 16], true);
    let third = prepare(&vols, &cfg, &root);
    assert_eq!((third.built.len(), third.reused), (0, 4));
}

#[test]
fn a_changed_source_rebuilds_only_that_case() {
    let tmp = tempfile::tempdir().unwrap();
    let vols = data_3d(tmp.path(), 3);
    let cfg = DataConfig::new(1, 1, Normalize::ZScore);
    let root = tmp.path().join("c");
    prepare(&vols, &cfg, &root);
    // Touched: a new modification time, the same bytes.
    let img = vols.join("images/case1.nii");
    let later = std::fs::metadata(&img).unwrap().modified().unwrap() + std::time::Duration::from_secs(5);
    std::fs::File::options().write(true).open(&img).unwrap().set_modified(later).unwrap();
    let p = prepare(&vols, &cfg, &root);
    assert_eq!((p.built.clone(), p.reused), (vec!["case1".to_string()], 2));
    assert!(p.rebuilt_because[0].contains("source files changed"), "{:?}", p.rebuilt_because);
    // Rewritten in place with the same size and time: the sampled content (here the last
    // 64 KiB) tells.
    let mask = vols.join("masks/case2.nii");
    let when = std::fs::metadata(&mask).unwrap().modified().unwrap();
    let mut bytes = std::fs::read(&mask).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&mask, &bytes).unwrap();
    std::fs::File::options().write(true).open(&mask).unwrap().set_modified(when).unwrap();
    let p = prepare(&vols, &cfg, &root);
    assert_eq!((p.built.clone(), p.reused), (vec!["case2".to_string()], 2));
    assert_same(&samples(&vols, &cfg), &p.cases, [16, 16, 16], true);
}

#[test]
fn a_changed_normalisation_rebuilds() {
    let tmp = tempfile::tempdir().unwrap();
    let vols = data_3d(tmp.path(), 2);
    let root = tmp.path().join("c");
    let z = DataConfig::new(1, 1, Normalize::ZScore);
    let w = DataConfig::new(1, 1, Normalize::Window { low: 10.0, high: 200.0 });
    let (sz, sw) = (cache::settings(&z).unwrap(), cache::settings(&w).unwrap());
    assert_ne!(cache::key_dir(&root, &sz), cache::key_dir(&root, &sw));
    assert_eq!(prepare(&vols, &z, &root).built.len(), 2);
    let p = prepare(&vols, &w, &root);
    assert_eq!((p.built.len(), p.reused), (2, 0));
    assert_same(&samples(&vols, &w), &p.cases, [16, 16, 16], true);
    // Entries of other settings found in the folder (a CRC collision) are rebuilt, not used.
    let pairs = data::pairs(&vols, true).unwrap();
    let p = cache::prepare(&pairs, &z, &cache::key_dir(&root, &sw), false).unwrap();
    assert_eq!(p.built.len(), 2);
    assert!(p.rebuilt_because.iter().all(|w| w.contains("other settings")), "{:?}", p.rebuilt_because);
    assert_same(&samples(&vols, &z), &p.cases, [16, 16, 16], true);
}

fn unetpp(args: &[&str], env: &[(&str, &str)]) -> Output {
    let o = common::unetpp_env(args, env);
    assert!(o.status.success(), "unetpp {args:?} failed:\n{}", common::stderr(&o));
    o
}

/// Checkpoints, optimiser state and metrics (wall times left out) of a run.
fn results(run: &Path) -> Vec<Vec<u8>> {
    let ck = run.join("checkpoints");
    let mut v: Vec<Vec<u8>> =
        ["best.unetpp", "last.unetpp"].iter().map(|f| common::weights(&std::fs::read(ck.join(f)).unwrap())).collect();
    v.push(std::fs::read(ck.join("last.optim")).unwrap());
    let csv = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
    let rows: Vec<String> = csv.lines().map(|l| l.rsplit_once(',').unwrap().0.to_string()).collect();
    v.push(rows.join("\n").into_bytes());
    v
}

const TINY_3D: Tiny = Tiny { epochs: "2", steps: "3", batch: "2", patch: "16,16,16", ..Tiny::D3 };

#[test]
fn a_cached_training_run_equals_the_in_memory_run() {
    let tmp = tempfile::tempdir().unwrap();
    let vols = data_3d(tmp.path(), 5);
    let run = |name: &str, extra: &[&str], env: &[(&str, &str)]| {
        let out = tmp.path().join(name);
        let mut args = vec!["train", "--data", s(&vols), "--out", s(&out), "--foreground", "0.5"];
        args.extend(TINY_3D.flags().iter().chain(extra));
        let o = unetpp(&args, env);
        (results(&out), String::from_utf8_lossy(&o.stderr).into_owned())
    };
    let (memory, log) = run("memory", &["--no-cache"], &[]);
    assert!(!log.contains("cache"), "{log}");
    let dir = tmp.path().join("mine");
    let (chosen, log) = run("chosen", &["--cache", s(&dir)], &[]);
    assert!(log.contains("5 cases built, 0 reused"), "{log}");
    assert!(memory == chosen, "--cache DIR trains as in memory");
    let (again, log) = run("again", &["--cache", s(&dir)], &[]);
    assert!(log.contains("0 cases built, 5 reused"), "{log}");
    assert!(memory == again, "a reused cache trains as in memory");
    // Killed after its first epoch and resumed: still the same run.
    let out = tmp.path().join("killed");
    let mut args = vec!["train", "--data", s(&vols), "--out", s(&out), "--foreground", "0.5", "--cache", s(&dir)];
    args.extend(TINY_3D.flags());
    let o = common::unetpp_cut(&args, "epoch.published:1");
    assert!(!o.status.success() && out.join("state.json").exists(), "killed after epoch 1");
    unetpp(&["train", "--resume", s(&out)], &[]);
    assert!(memory == results(&out), "a cached run resumed after a kill trains as in memory");
}

/// The peak resident memory of `args`' run: the child's own high-water mark (`VmHWM`), read
/// from /proc until it exits. Not `wait4`'s `ru_maxrss`: the kernel carries the parent's resident
/// size at fork into the child's account across `execve`, so a test process holding data (other
/// tests of this file run beside it) would be counted as the child's. VmHWM never decreases, so
/// the last reading covers everything up to a few milliseconds before the exit.
#[cfg(target_os = "linux")]
fn peak_rss(args: &[&str], env: &[(&str, &str)], log: &Path) -> u64 {
    let f = std::fs::File::create(log).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_unetpp"))
        .args(args)
        .envs(env.iter().copied())
        .env_remove("UNETPP_FAILPOINT")
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .spawn()
        .unwrap();
    let status_file = format!("/proc/{}/status", child.id());
    let mut peak = 0u64;
    let status = loop {
        let hwm = std::fs::read_to_string(&status_file).ok().and_then(|t| {
            let line = t.lines().find(|l| l.starts_with("VmHWM:"))?.to_owned();
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        });
        peak = peak.max(hwm.unwrap_or(0) * 1024);
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    };
    let text = std::fs::read_to_string(log).unwrap();
    assert!(status.success(), "unetpp {args:?} failed:\n{text}");
    assert!(peak > 0, "no VmHWM read for the child");
    peak
}

#[cfg(target_os = "linux")]
#[test]
fn trains_on_a_data_set_four_times_larger_than_its_peak_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("big");
    let (n, dims) = (260, [96usize, 96, 64]);
    std::thread::scope(|sc| {
        for part in 0..4 {
            let data = &data;
            sc.spawn(move || {
                for i in (part..n).step_by(4) {
                    volume(data, &format!("v{i:03}"), dims, i as u64);
                }
            });
        }
    });
    let f32_bytes = (n * dims.iter().product::<usize>() * 4) as u64;
    let out = tmp.path().join("run");
    let mut args = vec!["train", "--data", s(&data), "--out", s(&out), "--val-fraction", "0.02"];
    args.extend(Tiny { epochs: "1", tile: "32,64,64", ..TINY_3D }.flags());
    // The machine's memory stands in as 1 GB: the data set is more than a quarter of it.
    let peak = peak_rss(&args, &[("UNETPP_MEMORY_GB", "1")], &tmp.path().join("log"));
    let log = std::fs::read_to_string(tmp.path().join("log")).unwrap();
    assert!(log.contains("on-disk cache") && log.contains(&format!("{n} cases built, 0 reused")), "{log}");
    assert!(data.join(".unetpp_cache").is_dir(), "the default cache is in the data folder");
    assert!(out.join("checkpoints/best.unetpp").is_file(), "{log}");
    eprintln!("data set {:.0} MB as f32, training's peak RSS {:.0} MB", f32_bytes as f64 / 1e6, peak as f64 / 1e6);
    assert!(peak * 4 <= f32_bytes, "peak RSS {peak} B is more than a quarter of the data set's {f32_bytes} B\n{log}");
}
