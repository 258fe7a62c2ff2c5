//! `predict` and `eval` outputs: never over the inputs or the ground truth, never over each other,
//! never over a user's file without `--overwrite`, and complete or absent on a full disk.
mod common;
use common::*;

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// One tiny 2D model (width 4, depth 2) shared by every test of this file.
fn checkpoint() -> &'static Path {
    static CK: OnceLock<PathBuf> = OnceLock::new();
    CK.get_or_init(|| {
        let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
        // Earlier runs' models, unless another run of this file may still be using one.
        for e in std::fs::read_dir(tmp).into_iter().flatten().flatten() {
            let old =
                e.metadata().and_then(|m| m.modified()).is_ok_and(|t| t.elapsed().unwrap_or_default().as_secs() > 600);
            if e.file_name().to_string_lossy().starts_with("outputs-ck-") && old {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        let run = tmp.join(format!("outputs-ck-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&run);
        let data = samples("nuclei");
        let mut args: Vec<OsString> =
            vec!["train".into(), "--data".into(), data.into(), "--out".into(), run.clone().into()];
        let tiny = "--width 4 --depth 2 --epochs 1 --steps-per-epoch 1 --batch-size 2 --patch 32 --tile 64";
        args.extend(tiny.split(' ').map(OsString::from));
        ok(&args);
        run.join("checkpoints/best.unetpp")
    })
}

fn predict_args(input: &Path, out: &Path, extra: &[&str]) -> Vec<OsString> {
    let mut a: Vec<OsString> = ["predict", "--checkpoint"].map(OsString::from).to_vec();
    a.extend([checkpoint().into(), "--input".into(), input.into(), "--out".into(), out.into()]);
    a.extend(extra.iter().map(OsString::from));
    a
}

fn eval_args(data: &Path, out: &Path) -> Vec<OsString> {
    let mut a: Vec<OsString> = ["eval", "--checkpoint"].map(OsString::from).to_vec();
    a.extend([checkpoint().into(), "--data".into(), data.into(), "--out".into(), out.into()]);
    a
}

/// Every file under `dir` with its bytes, sorted by path.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut v = vec![];
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            v.extend(snapshot(&p));
        } else {
            v.push((p.clone(), std::fs::read(&p).unwrap()));
        }
    }
    v.sort();
    v
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let (src, dst) = (e.path(), to.join(e.file_name()));
        if src.is_dir() { copy_dir(&src, &dst) } else { std::fs::copy(&src, &dst).map(|_| ()).unwrap() }
    }
}

/// The nuclei test split with PNG images (so an output `NAME.png` would land on an input).
fn png_data(root: &Path) -> PathBuf {
    let d = root.join("data");
    copy_dir(&samples("nuclei").join("test"), &d);
    for e in std::fs::read_dir(d.join("images")).unwrap().flatten() {
        let p = e.path();
        image::open(&p).unwrap().save(p.with_extension("png")).unwrap();
        std::fs::remove_file(&p).unwrap();
    }
    d
}

fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|r| r.flatten().count()).unwrap_or(0)
}

/// "wrote N file(s)" must count the files that are really there.
fn written(stdout: &str) -> usize {
    let n = stdout.split("wrote ").nth(1).and_then(|s| s.split(' ').next()).expect(stdout);
    n.parse().unwrap()
}

#[test]
fn out_holding_inputs_or_masks_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let d = png_data(tmp.path());
    let before = snapshot(&d);
    let images = d.join("images");
    std::fs::create_dir(d.join("x")).unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink(&images, tmp.path().join("link")).unwrap();
    let cases: Vec<(PathBuf, PathBuf, &str)> = vec![
        (images.clone(), images.clone(), "the folder of the input images"),
        (d.clone(), images.clone(), "the folder of the input images"),
        (d.clone(), d.clone(), "the input folder"),
        (images.clone(), d.join("masks"), "the ground-truth folder"),
        (d.clone(), d.join("x/../masks"), "the ground-truth folder"),
        (images.clone(), d.join("x/new/../../images"), "the folder of the input images"),
        (images.clone(), tmp.path().join("link"), "the folder of the input images"),
        (std::fs::read_dir(&images).unwrap().next().unwrap().unwrap().path(), images.clone(), "input images"),
    ];
    for (input, out, why) in cases {
        fails(&predict_args(&input, &out, &["--probabilities", "--overwrite"]), &["--out", why]);
    }
    // Any data set's folders, not only the inputs'.
    std::fs::create_dir_all(tmp.path().join("other/images")).unwrap();
    for sub in ["images", "masks", "labels"] {
        let out = tmp.path().join("other").join(sub);
        fails(&predict_args(&images, &out, &[]), &[&format!("is the {sub}/ folder of the data set")]);
        assert_eq!(count_files(&out), 0);
    }
    // Labels are ground truth too.
    std::fs::rename(d.join("masks"), d.join("labels")).unwrap();
    fails(&predict_args(&images, &d.join("labels"), &["--overwrite"]), &["the ground-truth folder"]);
    std::fs::rename(d.join("labels"), d.join("masks")).unwrap();
    for out in [d.join("masks"), d.join("images"), d.join("images/eval"), d.join("x/../masks/deeper")] {
        fails(&eval_args(&d, &out), &["--out", "inside the data set's", "folder"]);
    }
    std::fs::remove_dir_all(d.join("x")).unwrap();
    assert_eq!(snapshot(&d), before, "an input or mask changed");
    // A folder beside the data (or the data root for eval) is fine.
    ok(&predict_args(&images, &tmp.path().join("pred"), &[]));
    ok(&eval_args(&d, &d.join("eval")));
}

#[test]
fn inputs_with_the_same_stem_are_refused_before_anything_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("in");
    std::fs::create_dir(&d).unwrap();
    let src = std::fs::read_dir(samples("nuclei").join("test/images")).unwrap().next().unwrap().unwrap().path();
    std::fs::copy(&src, d.join("a.tif")).unwrap();
    image::open(&src).unwrap().save(d.join("a.png")).unwrap();
    let out = tmp.path().join("out");
    fails(&predict_args(&d, &out, &[]), &["a.png", "a.tif", "nothing was written"]);
    assert_eq!(count_files(&out), 0);

    // One input's probability map would be another's mask.
    std::fs::rename(d.join("a.png"), d.join("a_prob0.png")).unwrap();
    fails(&predict_args(&d, &out, &["--probabilities", "png"]), &["a.tif", "a_prob0.png", "nothing was written"]);
    assert_eq!(count_files(&out), 0);
    let stdout = ok(&predict_args(&d, &out, &[]));
    assert_eq!((written(&stdout), count_files(&out)), (2, 2), "{stdout}");
}

#[cfg(unix)]
#[test]
fn names_that_are_not_utf8_get_their_own_outputs_and_pairs() {
    use std::os::unix::ffi::OsStrExt;
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("in");
    std::fs::create_dir(&d).unwrap();
    let mut srcs = std::fs::read_dir(samples("nuclei").join("test/images")).unwrap().flatten().map(|e| e.path());
    let (a, b) = (OsStr::from_bytes(b"\xff.tif"), OsStr::from_bytes(b"\xfe.tif"));
    std::fs::copy(srcs.next().unwrap(), d.join(a)).unwrap();
    std::fs::copy(srcs.next().unwrap(), d.join(b)).unwrap();
    let out = tmp.path().join("out");
    let stdout = ok(&predict_args(&d, &out, &["--probabilities", "png"]));
    assert_eq!((written(&stdout), count_files(&out)), (4, 4), "{stdout}");
    for name in [&b"\xff.png"[..], b"\xff_prob0.png", b"\xfe.png", b"\xfe_prob0.png"] {
        assert!(out.join(OsStr::from_bytes(name)).is_file(), "missing {:?}", OsStr::from_bytes(name));
    }

    // An image and a mask pair only when their names are the same bytes, not the same lossy text.
    let data = tmp.path().join("data");
    std::fs::create_dir_all(data.join("images")).unwrap();
    std::fs::create_dir_all(data.join("masks")).unwrap();
    let pair = std::fs::read_dir(samples("nuclei").join("test/masks")).unwrap().next().unwrap().unwrap().path();
    std::fs::copy(
        samples("nuclei").join("test/images").join(pair.with_extension("tif").file_name().unwrap()),
        data.join("images").join(a),
    )
    .unwrap();
    std::fs::copy(&pair, data.join("masks").join(OsStr::from_bytes(b"\xfe.png"))).unwrap();
    fails(&eval_args(&data, &tmp.path().join("e")), &["has no image named"]);
}

#[test]
fn reruns_replace_own_outputs_but_user_files_need_overwrite() {
    let tmp = tempfile::tempdir().unwrap();
    let images = samples("nuclei").join("test/images");
    let out = tmp.path().join("out");
    let first = ok(&predict_args(&images, &out, &["--probabilities"]));
    let again = ok(&predict_args(&images, &out, &["--probabilities"]));
    assert_eq!((written(&first), written(&again), count_files(&out)), (4, 4, 4));

    // A user's own file where a prediction would go.
    let name = std::fs::read_dir(&images).unwrap().next().unwrap().unwrap().path();
    let target = out.join(name.with_extension("png").file_name().unwrap());
    image::GrayImage::new(3, 3).save(&target).unwrap();
    let mine = std::fs::read(&target).unwrap();
    let before = snapshot(&out);
    fails(&predict_args(&images, &out, &["--probabilities"]), &["not written by unetpp", "--overwrite"]);
    assert_eq!(snapshot(&out), before, "nothing may be written when refusing");
    assert_eq!(std::fs::read(&target).unwrap(), mine);
    ok(&predict_args(&images, &out, &["--probabilities", "--overwrite"]));
    assert_ne!(std::fs::read(&target).unwrap(), mine);
    ok(&predict_args(&images, &out, &["--probabilities"]));

    let help = ok(&["predict", "--help"]);
    assert!(help.contains("--overwrite") && help.contains("did not write"), "{help}");
}

/// A tmpfs of `bytes` (rounded up to pages) mounted over a fresh folder; unmounted on drop.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn new(bytes: u64) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .unwrap_or_else(|e| panic!("the full-disk test needs `mount` (run as root): {e}"));
        assert!(
            out.status.success(),
            "the full-disk test needs to mount a small tmpfs (root, CAP_SYS_ADMIN): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

fn pages(bytes: usize) -> u64 {
    bytes.div_ceil(4096) as u64 * 4096
}

fn no_temporaries(dir: &Path) {
    for (p, _) in snapshot(dir) {
        assert!(!p.file_name().unwrap().to_string_lossy().starts_with(".tmp-"), "temporary left: {}", p.display());
    }
}

/// The disk fills during the third prediction (then, below, during eval's second overlay of small
/// images, whose PNGs fit in an encoder's buffer, and during eval's summary): exit 1 naming the
/// file and the cause, earlier files complete and the same as on a roomy disk, no partial or
/// temporary file left.
#[test]
fn full_disk_during_predict_leaves_complete_files_and_no_partial_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let images = samples("nuclei").join("test/images");
    let roomy = tmp.path().join("roomy");
    ok(&predict_args(&images, &roomy, &["--probabilities", "png"]));
    let mut inputs: Vec<PathBuf> = std::fs::read_dir(&images).unwrap().flatten().map(|e| e.path()).collect();
    inputs.sort();
    let stem = |p: &Path| p.file_stem().unwrap().to_string_lossy().into_owned();
    let order: Vec<String> =
        inputs.iter().flat_map(|p| [format!("{}.png", stem(p)), format!("{}_prob0.png", stem(p))]).collect();
    let sizes: Vec<usize> = order.iter().map(|n| std::fs::read(roomy.join(n)).unwrap().len()).collect();

    let disk = Tmpfs::new(pages(sizes[0]) + pages(sizes[1]));
    let out = disk.0.path().join("pred");
    let err = fails(&predict_args(&images, &out, &["--probabilities", "png"]), &["No space left", &order[2]]);
    assert!(!err.contains(&order[1]), "{err}");
    no_temporaries(disk.0.path());
    assert_eq!(count_files(&out), 2, "{:?}", snapshot(&out).iter().map(|f| &f.0).collect::<Vec<_>>());
    for n in &order[..2] {
        let got = std::fs::read(out.join(n)).unwrap();
        assert_eq!(got, std::fs::read(roomy.join(n)).unwrap(), "{n} differs from a roomy disk's");
        image::load_from_memory(&got).unwrap();
    }
}

#[test]
fn full_disk_during_eval_leaves_complete_files_and_no_partial_ones() {
    let tmp = tempfile::tempdir().unwrap();
    // 48x48 crops: each overlay is a few KB.
    let small = tmp.path().join("small");
    for sub in ["images", "masks"] {
        std::fs::create_dir_all(small.join(sub)).unwrap();
        for e in std::fs::read_dir(samples("nuclei").join("test").join(sub)).unwrap().flatten() {
            let crop = image::open(e.path()).unwrap().crop_imm(40, 40, 48, 48);
            crop.save(small.join(sub).join(e.path().with_extension("png").file_name().unwrap())).unwrap();
        }
    }
    let roomy = tmp.path().join("eval-small");
    ok(&eval_args(&small, &roomy));
    let overlays = snapshot(&roomy.join("overlays"));
    assert!(overlays.iter().all(|(_, b)| b.len() < 8192), "overlays should be small");
    let disk = Tmpfs::new(pages(overlays[0].1.len()));
    let out = disk.0.path().join("eval");
    let second = overlays[1].0.file_name().unwrap().to_string_lossy().into_owned();
    fails(&eval_args(&small, &out), &["No space left", &second]);
    no_temporaries(disk.0.path());
    assert_eq!(snapshot(&out.join("overlays")).len(), 1);
    let got = std::fs::read(out.join("overlays").join(overlays[0].0.file_name().unwrap())).unwrap();
    assert_eq!(got, overlays[0].1);
    image::load_from_memory(&got).unwrap();
    assert!(!out.join("scores.csv").exists() && !out.join("summary.json").exists());
    drop(disk);

    let roomy = tmp.path().join("eval");
    ok(&eval_args(&samples("nuclei"), &roomy));
    let overlays: Vec<(PathBuf, Vec<u8>)> = snapshot(&roomy.join("overlays"));
    let scores = std::fs::read(roomy.join("scores.csv")).unwrap();
    let disk = Tmpfs::new(overlays.iter().map(|(_, b)| pages(b.len())).sum::<u64>() + pages(scores.len()));
    let out = disk.0.path().join("eval");
    fails(&eval_args(&samples("nuclei"), &out), &["No space left", "summary.json"]);
    no_temporaries(disk.0.path());
    assert!(!out.join("summary.json").exists());
    assert_eq!(std::fs::read(out.join("scores.csv")).unwrap(), scores);
    for (p, bytes) in &overlays {
        let got = std::fs::read(out.join("overlays").join(p.file_name().unwrap())).unwrap();
        assert_eq!(&got, bytes);
        image::load_from_memory(&got).unwrap();
    }
}
