//! End-to-end runs of the `unetpp` binary on the bundled samples, and its errors on bad input.
mod common;
use common::*;

use std::path::{Path, PathBuf};

#[test]
fn train_eval_prune_predict_2d() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let stdout = ok(&train_on(&samples("nuclei"), &run));
    assert!(stdout.contains("run written to"), "{stdout}");
    for f in [
        "config.toml",
        "metrics.csv",
        "curves.png",
        "state.json",
        "checkpoints/best.unetpp",
        "checkpoints/last.unetpp",
        "checkpoints/last.optim",
    ] {
        assert!(run.join(f).exists(), "missing {f}");
    }
    let csv = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
    assert_eq!(csv.lines().count(), 3, "{csv}");
    let best = run.join("checkpoints/best.unetpp");

    for mode in ["accurate", "fast:1", "fast:2"] {
        let out = tmp.path().join(format!("eval-{mode}"));
        let stdout =
            ok(&["eval", "--checkpoint", s(&best), "--data", s(&samples("nuclei")), "--out", s(&out), "--mode", mode]);
        assert!(stdout.contains("mean Dice") && stdout.contains("mean IoU"), "{stdout}");
        let scores = std::fs::read_to_string(out.join("scores.csv")).unwrap();
        assert_eq!(scores.lines().count(), 3, "two test images + header");
        assert!(scores.contains("lif - Series001"), "names with spaces survive");
        assert_eq!(std::fs::read_dir(out.join("overlays")).unwrap().count(), 2);
    }
    fails(
        &[
            "eval",
            "--checkpoint",
            s(&best),
            "--data",
            s(&samples("nuclei")),
            "--out",
            s(&tmp.path().join("e")),
            "--mode",
            "fast:3",
        ],
        &["fast:3"],
    );

    let pruned = tmp.path().join("l1.unetpp");
    let stdout = ok(&["prune", "--checkpoint", s(&best), "--level", "1", "--out", s(&pruned)]);
    assert!(stdout.contains("UNet++ L1"), "{stdout}");
    let info = ok(&["info", "--checkpoint", s(&pruned)]);
    assert!(info.contains("depth 1"), "{info}");

    let pred = tmp.path().join("pred");
    let test_images = samples("nuclei").join("test/images");
    let stdout =
        ok(&["predict", "--checkpoint", s(&pruned), "--input", s(&test_images), "--out", s(&pred), "--probabilities"]);
    assert!(stdout.contains("wrote 4 file(s)"), "{stdout}");
    let mask = image::open(pred.join("2023-05-31_misc_MCC13_rfpcyto_w1cDAPI_s43.png")).unwrap();
    assert_eq!((mask.width(), mask.height()), (192, 192));
}

#[test]
fn train_eval_predict_3d() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run3d");
    ok(&train_args(&samples("lesions"), &run, TINY_3D, &[]));
    let best = run.join("checkpoints/best.unetpp");
    let stdout = ok(&[
        "eval",
        "--checkpoint",
        s(&best),
        "--data",
        s(&samples("lesions")),
        "--out",
        s(&tmp.path().join("ev")),
        "--mode",
        "fast:2",
    ]);
    assert!(stdout.contains("1 images"), "{stdout}");
    let pred = tmp.path().join("pred");
    ok(&[
        "predict",
        "--checkpoint",
        s(&best),
        "--input",
        s(&samples("lesions").join("test/images/lung1.nii.gz")),
        "--out",
        s(&pred),
    ]);
    let obj = nifti::ReaderOptions::new().read_file(pred.join("lung1.nii.gz")).unwrap();
    use nifti::NiftiObject;
    assert_eq!(&obj.header().dim[1..4], &[64, 64, 16]);
    let reference = nifti::ReaderOptions::new().read_file(samples("lesions").join("test/images/lung1.nii.gz")).unwrap();
    assert_eq!(obj.header().srow_x, reference.header().srow_x, "prediction keeps the input's affine");
}

/// An interrupted run (stopped after epoch 1) resumed to epoch 2 gives the same numbers as an
/// uninterrupted one: same seed, same patches, same optimiser state.
#[test]
fn resume_matches_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let data = samples("nuclei");
    let base = |out: &Path, epochs: &'static str| ok(&train_args(&data, out, Tiny { epochs, ..Tiny::D2 }, &[]));
    let full = tmp.path().join("full");
    base(&full, "2");
    let cut = tmp.path().join("cut");
    base(&cut, "1");
    let cfg = std::fs::read_to_string(cut.join("config.toml")).unwrap().replace("epochs = 1", "epochs = 2");
    std::fs::write(cut.join("config.toml"), cfg).unwrap();
    ok(&["train", "--resume", s(&cut)]);
    let losses = |dir: &Path| -> Vec<String> {
        std::fs::read_to_string(dir.join("metrics.csv"))
            .unwrap()
            .lines()
            .skip(1)
            .map(|l| l.split(',').take(5).collect::<Vec<_>>().join(","))
            .collect()
    };
    assert_eq!(losses(&full), losses(&cut));
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).unwrap();
        }
    }
}

/// A copy of the nuclei train split to break in one way.
fn broken(tmp: &Path) -> PathBuf {
    let d = tmp.join("data");
    copy_dir(&samples("nuclei").join("train"), &d);
    d
}

fn train_on<'a>(data: &'a Path, out: &'a Path) -> Vec<&'a str> {
    train_args(data, out, Tiny::D2, &[])
}

/// The 3D run of this file and tests/resample.rs: width 2, two steps of 8x32x32 patches.
const TINY_3D: Tiny = Tiny { width: "2", steps: "2", patch: "8,32,32", ..Tiny::D3 };

fn fails_training(data: &Path, needles: &[&str]) {
    let out = data.parent().unwrap().join("out");
    fails(&train_on(data, &out), needles);
}

#[test]
fn bad_inputs_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();

    let d = broken(&t.join("size"));
    image::GrayImage::new(10, 10).save(d.join("masks/2022-03-18_RPE1_3.png")).unwrap();
    fails_training(&d, &["size mismatch", "2022-03-18_RPE1_3.tif", "192x192", "10x10"]);

    let d = broken(&t.join("unreadable"));
    std::fs::write(d.join("images/2023-05-31_misc_2.tif"), b"not a tiff").unwrap();
    fails_training(&d, &["2023-05-31_misc_2.tif"]);

    let d = broken(&t.join("orphan-mask"));
    std::fs::remove_file(d.join("images/2023-05-31_misc_8.tif")).unwrap();
    fails_training(&d, &["2023-05-31_misc_8.png", "has no image"]);

    let d = broken(&t.join("orphan-image"));
    std::fs::remove_file(d.join("masks/2023-05-31_misc_8.png")).unwrap();
    fails_training(&d, &["2023-05-31_misc_8.tif", "has no mask"]);

    let d = t.join("empty/data");
    std::fs::create_dir_all(d.join("images")).unwrap();
    std::fs::create_dir_all(d.join("masks")).unwrap();
    fails_training(&d, &["no images found", "images"]);

    let d = broken(&t.join("rgb"));
    let rgb = image::RgbImage::from_fn(192, 192, |x, y| image::Rgb([x as u8, y as u8, 7]));
    std::fs::remove_file(d.join("images/2023-05-31_misc_2.tif")).unwrap();
    rgb.save(d.join("images/2023-05-31_misc_2.png")).unwrap();
    fails_training(&d, &["2023-05-31_misc_2.png", "3 channel(s)", "--channels 3"]);

    let d = broken(&t.join("nan"));
    let mut vol = ndarray::Array3::<f32>::zeros((192, 192, 1));
    vol[[3, 4, 0]] = f32::NAN;
    std::fs::remove_file(d.join("images/2023-05-31_misc_2.tif")).unwrap();
    nifti::writer::WriterOptions::new(d.join("images/2023-05-31_misc_2.nii")).write_nifti(&vol).unwrap();
    fails_training(&d, &["2023-05-31_misc_2.nii", "non-finite"]);

    let d = broken(&t.join("patch"));
    let out = t.join("patch/out");
    fails(&train_args(&d, &out, Tiny { patch: "30", ..Tiny::D2 }, &[]), &["patch size 30", "divisible by 2^depth = 4"]);

    // --skip-bad lists the bad pair and trains on the rest.
    let d = broken(&t.join("skip"));
    image::GrayImage::new(10, 10).save(d.join("masks/2022-03-18_RPE1_3.png")).unwrap();
    let skip = t.join("skip/out");
    let out = unetpp(&train_args(&d, &skip, Tiny::D2, &["--skip-bad"]));
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("skipping"));
}

#[test]
fn existing_runs_and_checkpoints_are_never_overwritten_or_misread() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let nuclei = samples("nuclei");
    let a = train_on(&nuclei, &run);
    ok(&a);
    let best = run.join("checkpoints/best.unetpp");
    let before = std::fs::read(&best).unwrap();
    fails(&a, &["already holds a run", "--resume"]);
    assert_eq!(std::fs::read(&best).unwrap(), before);

    let cut = tmp.path().join("cut.unetpp");
    std::fs::write(&cut, &before[..before.len() / 2]).unwrap();
    fails(
        &[
            "predict",
            "--checkpoint",
            s(&cut),
            "--input",
            s(&samples("nuclei").join("test")),
            "--out",
            s(&tmp.path().join("p")),
        ],
        &["cut.unetpp"],
    );
    std::fs::write(&cut, b"hello").unwrap();
    fails(&["info", "--checkpoint", s(&cut)], &["cut.unetpp", "not a unetpp checkpoint"]);
}

/// `experiment` on the bundled sample: every model trained and scored, the report written with
/// the comparison, mode and pruning tables; a second call reuses the cached runs.
#[test]
fn experiment_runs_every_model_and_reuses_finished_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let data = samples("nuclei");
    let head = r#"
title = "tiny"
seeds = [1, 2]
otsu = true
timing = [1, 64, 64]

[[models]]
name = "U-Net"
arch = "unet"
deep_supervision = false

[[models]]
name = "UNet++ DS"
arch = "unetpp"
deep_supervision = true
"#;
    let spec = tiny_experiment(head, &data);
    let spec_path = tmp.path().join("tiny.toml");
    std::fs::write(&spec_path, spec).unwrap();
    let out = tmp.path().join("runs");
    let report = tmp.path().join("docs/results.md");
    let args = ["experiment", "--spec", s(&spec_path), "--out", s(&out), "--report", s(&report)];
    assert!(ok(&args).contains("4 runs"));
    let text = std::fs::read_to_string(&report).unwrap();
    for needle in ["| Otsu threshold |", "| U-Net |", "| UNet++ DS |", "| fast:1 |", "UNet++ L1 (fast:1)", "pruning"] {
        assert!(text.contains(needle), "report lacks `{needle}`:\n{text}");
    }
    assert!(report.with_extension("png").exists());
    assert!(out.join("u-net/seed-2/result.json").exists());
    // Cached: no run directory is touched again, the numbers are the same.
    let stamp = std::fs::metadata(out.join("u-net/seed-1/result.json")).unwrap().modified().unwrap();
    ok(&args);
    assert_eq!(std::fs::metadata(out.join("u-net/seed-1/result.json")).unwrap().modified().unwrap(), stamp);
    let again = std::fs::read_to_string(&report).unwrap();
    let table = |t: &str| t.lines().filter(|l| l.starts_with("| U-Net")).map(str::to_string).collect::<Vec<_>>();
    assert_eq!(table(&again), table(&text));
    // A reference run in the same format (as bench/train_ref.py writes) gets its own row.
    let reference = out.join("pytorch/seed-1");
    std::fs::create_dir_all(&reference).unwrap();
    let r = std::fs::read_to_string(out.join("unet---ds/seed-1/result.json")).unwrap();
    std::fs::write(reference.join("result.json"), r.replace("\"UNet++ DS\"", "\"UNet++ (deep supervision)\"")).unwrap();
    ok(&args);
    let text = std::fs::read_to_string(&report).unwrap();
    assert!(text.contains("| PyTorch UNet++ (deep supervision) (reference) |"), "{text}");
}
