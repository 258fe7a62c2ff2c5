//! nnU-Net raw data sets (issue #17) on the committed fixture `tests/data/nnunet/Dataset990_Tiny`
//! (five 16^3 chest-CT crops, channels CT + smoothed, labels background / lung / spine; built and
//! its numpy reference values written by `scripts/make_nnunet_dataset.py --fixture`).
mod common;
use common::*;

use std::path::{Path, PathBuf};

use unetpp::data::intensity::ChannelNorm;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/nnunet/Dataset990_Tiny")
}

/// A copy of the fixture to change (and to keep outputs away from the committed files).
fn copy_fixture(to: &Path) -> PathBuf {
    let dst = to.join("Dataset990_Tiny");
    for entry in walk(&fixture()) {
        let rel = entry.strip_prefix(fixture()).unwrap();
        std::fs::create_dir_all(dst.join(rel).parent().unwrap()).unwrap();
        std::fs::copy(&entry, dst.join(rel)).unwrap();
    }
    dst
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() { out.extend(walk(&p)) } else { out.push(p) }
    }
    out
}

/// [`Tiny::D3`] on the fixture's 16^3 crops; no channel, class or normalisation flag.
fn train_args<'a>(data: &'a Path, out: &'a Path) -> Vec<&'a str> {
    common::train_args(data, out, Tiny { patch: "16,16,16", tile: "16,16,16", ..Tiny::D3 }, &[])
}

#[test]
fn train_eval_predict_with_only_data() {
    let tmp = tempfile::tempdir().unwrap();
    let data = copy_fixture(tmp.path());
    let run = tmp.path().join("run");
    ok(&train_args(&data, &run));
    let ck = run.join("checkpoints/best.unetpp");
    let meta = unetpp::checkpoint::read_meta(&ck).unwrap();
    assert_eq!((meta.model.in_channels, meta.model.classes, meta.model.dims), (2, 3, 3));
    let nn = meta.data.nnunet.as_ref().expect("the checkpoint keeps the data set's names and normalisation");
    assert_eq!(nn.labels, ["background", "lung", "spine"]);
    assert_eq!(nn.channel_names, ["CT", "smoothed"]);
    assert!(matches!(nn.norms[0], ChannelNorm::Ct { .. }) && nn.norms[1] == ChannelNorm::ZScore, "{:?}", nn.norms);

    let eval = tmp.path().join("eval");
    let printed = ok(&["eval", "--checkpoint", s(&ck), "--data", s(&data), "--out", s(&eval)]);
    assert!(
        printed.contains("1 images") && printed.contains("  lung: mean Dice") && printed.contains("  spine:"),
        "{printed}"
    );
    let csv = std::fs::read_to_string(eval.join("scores.csv")).unwrap();
    let mut lines = csv.lines();
    assert_eq!(
        lines.next(),
        Some("image,dice,iou,hd95,nsd,dice_lung,iou_lung,hd95_lung,nsd_lung,dice_spine,iou_spine,hd95_spine,nsd_spine")
    );
    let row = lines.next().unwrap();
    assert!(row.starts_with("\"tiny4\",") && row.split(',').count() == 13, "{csv}");
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(eval.join("summary.json")).unwrap()).unwrap();
    for label in ["lung", "spine"] {
        let dice = json["classes"][label]["dice"].as_f64().unwrap_or(f64::NAN);
        assert!((0.0..=1.0).contains(&dice), "{json}");
    }
    assert!(json["classes"].get("background").is_none(), "{json}");

    // predict on the data set (its imagesTs) and on imagesTs itself: one CASE.nii.gz per case.
    for (input, out) in [(data.clone(), tmp.path().join("pred")), (data.join("imagesTs"), tmp.path().join("pred2"))] {
        let printed = ok(&["predict", "--checkpoint", s(&ck), "--input", s(&input), "--out", s(&out)]);
        assert!(printed.contains("wrote 1 file(s)"), "{printed}");
        let names: Vec<_> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["tiny4.nii.gz"]);
        let raw = unetpp::data::io::read_raw(&out.join("tiny4.nii.gz")).unwrap();
        assert_eq!(raw.shape, [16, 16, 16]);
        assert!(raw.data.iter().all(|&v| v == 0.0 || v == 1.0 || v == 2.0));
    }
    // Never into the data set's ground truth or image folders, even with --overwrite.
    for folder in ["labelsTs", "labelsTr", "imagesTr"] {
        let before: Vec<_> = walk(&data).into_iter().map(|p| (p.clone(), std::fs::read(&p).unwrap())).collect();
        let out = data.join(folder);
        let args = ["predict", "--checkpoint", s(&ck), "--input", s(&data), "--out", s(&out), "--overwrite"];
        fails(&args, &[folder]);
        let after: Vec<_> = walk(&data).into_iter().map(|p| (p.clone(), std::fs::read(&p).unwrap())).collect();
        assert!(before == after, "predict --out {folder} changed the data set");
    }
}

fn reference() -> serde_json::Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/nnunet/reference.json");
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

/// The CT fingerprint and both channels of the test case, normalised, against numpy's values.
#[test]
fn ct_and_zscore_normalisation_match_numpy() {
    let r = reference();
    let nn = unetpp::data::layout::defaults(&fixture(), false).unwrap().unwrap();
    let f = &r["ct_fingerprint"];
    let ChannelNorm::Ct { low, high, mean, std } = nn.norms[0] else { panic!("{:?}", nn.norms) };
    let close = |a: f64, key: &str| {
        let b = f[key].as_f64().unwrap();
        assert!((a - b).abs() <= 1e-9 * b.abs().max(1.0), "{key}: ours {a}, numpy {b}");
    };
    close(mean, "mean");
    close(std, "std");
    close(low, "percentile_00_5");
    close(high, "percentile_99_5");
    assert_eq!(nn.norms[1], ChannelNorm::ZScore);
    // An explicit --normalize replaces every channel's scheme.
    assert!(unetpp::data::layout::defaults(&fixture(), true).unwrap().unwrap().norms.is_empty());

    let cfg = unetpp::data::DataConfig {
        channels: 2,
        classes: 3,
        normalize: unetpp::data::Normalize::Percentile { low: 0.5, high: 99.5 },
        nnunet: Some(nn),
        spacing: None,
    };
    let samples = unetpp::data::load(&fixture().join("imagesTs"), &cfg, true, false).unwrap();
    assert_eq!(samples.len(), 1);
    let sample = &samples[0];
    assert_eq!((sample.name.as_str(), sample.shape), (r["test_case"].as_str().unwrap(), [16, 16, 16]));
    let n = sample.voxels();
    // The reference indexes the file's voxels; the sample is LPS-aligned, so undo that first.
    let frame = sample.geometry.as_ref().expect("a volume has its frame");
    let image = frame.orientation.undo(&sample.image, 2, frame.file_shape);
    let idx: Vec<usize> = r["voxel_indices"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
    for (c, key) in [(0, "channel0_ct"), (1, "channel1_zscore")] {
        let want = r[key].as_array().unwrap();
        let mut worst = 0f64;
        for (&i, w) in idx.iter().zip(want) {
            worst = worst.max((image[c * n + i] as f64 - w.as_f64().unwrap()).abs());
        }
        assert!(worst < 1e-5, "{key}: largest difference {worst}");
    }
    // The clipping is exercised: the test case reaches the upper percentile.
    let top = r["channel0_ct"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).fold(f64::MIN, f64::max);
    assert!((top - (high - mean) / std).abs() < 1e-9, "{top}");
}

fn write_labels(path: &Path, value: u8) {
    let mut a = ndarray::Array3::<u8>::zeros((16, 16, 16));
    a[[3, 4, 5]] = value;
    a[[0, 0, 0]] = 1;
    nifti::writer::WriterOptions::new(path).write_nifti(&a).unwrap();
}

fn edit_json(data: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = data.join("dataset.json");
    let mut j: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    f(&mut j);
    std::fs::write(p, serde_json::to_vec(&j).unwrap()).unwrap();
}

/// Every bad layout stops before anything is written, naming the case or file and the value.
#[test]
fn bad_layouts_are_errors_naming_the_file_and_value() {
    type Break = fn(&Path);
    let cases: [(Break, &[&str]); 8] = [
        (
            |d| std::fs::remove_file(d.join("imagesTr/tiny1_0001.nii.gz")).unwrap(),
            &["case `tiny1` lacks channel 0001 (`smoothed`)", "tiny1_0001.nii.gz is missing"],
        ),
        (
            |d| {
                std::fs::copy(d.join("imagesTr/tiny1_0001.nii.gz"), d.join("imagesTr/tiny1_0002.nii.gz")).unwrap();
            },
            &["case `tiny1` has a file for channel 0002", "tiny1_0002.nii.gz", "names 2 channel(s) (CT, smoothed)"],
        ),
        (
            |d| edit_json(d, |j| j["labels"] = serde_json::json!({"background": 0, "lung": 1, "spine": 3})),
            &["dataset.json", "`labels` must be consecutive from 0", "2 is missing from [0, 1, 3]"],
        ),
        (
            |d| write_labels(&d.join("labelsTr/tiny2.nii.gz"), 7),
            &["labelsTr/tiny2.nii.gz has the value 7", "0 background, 1 lung, 2 spine"],
        ),
        (|d| edit_json(d, |j| j["numTraining"] = 5.into()), &["numTraining 5", "holds 4 case(s)"]),
        (
            |d| std::fs::remove_file(d.join("labelsTr/tiny3.nii.gz")).unwrap(),
            &["case `tiny3` has no label file", "labelsTr/tiny3.nii.gz"],
        ),
        (
            |d| {
                std::fs::copy(d.join("labelsTr/tiny3.nii.gz"), d.join("labelsTr/tiny9.nii.gz")).unwrap();
            },
            &["label", "tiny9.nii.gz has no case `tiny9`"],
        ),
        (
            |d| edit_json(d, |j| j["labels"] = serde_json::json!({"background": 0, "lung": [1, 2], "spine": 2})),
            &["`lung` is a region", "not supported"],
        ),
    ];
    for (i, (damage, needles)) in cases.into_iter().enumerate() {
        let tmp = tempfile::tempdir().unwrap();
        let data = copy_fixture(tmp.path());
        damage(&data);
        let run = tmp.path().join("run");
        fails(&train_args(&data, &run), needles);
        assert!(!run.exists(), "case {i}: a run directory was written for a bad data set");
    }
}

#[test]
fn channels_or_classes_that_contradict_dataset_json_and_eval_without_labels_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = copy_fixture(tmp.path());
    let run = tmp.path().join("run");
    let mut a = train_args(&data, &run);
    a.extend(["--channels", "1"]);
    fails(&a, &["dataset.json names 2 channel(s) (CT, smoothed) but the model takes 1"]);
    let mut a = train_args(&data, &run);
    a.extend(["--classes", "5"]);
    fails(&a, &["dataset.json names 3 labels (background, lung, spine) but the model has 5 classes"]);

    ok(&train_args(&data, &run));
    std::fs::remove_dir_all(data.join("labelsTs")).unwrap();
    let ck = run.join("checkpoints/best.unetpp");
    let eval = tmp.path().join("eval");
    fails(
        &["eval", "--checkpoint", s(&ck), "--data", s(&data), "--out", s(&eval)],
        &["has no labelsTs folder", "evaluation needs the cases' labels there"],
    );
    assert!(!eval.join("scores.csv").exists());
}

/// A 2D nnU-Net data set (`file_ending` .png, two grey channels per case) reads as multi-channel
/// 2D samples, each channel normalised by its own scheme.
#[test]
fn two_dimensional_png_cases_read_with_their_channels() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("Dataset991_Png");
    for sub in ["imagesTr", "labelsTr"] {
        std::fs::create_dir_all(d.join(sub)).unwrap();
    }
    let json = r#"{"channel_names": {"0": "rgb_to_0_1", "1": "noNorm"}, "labels": {"background": 0, "cell": 1, "edge": 2},
                   "numTraining": 2, "file_ending": ".png"}"#;
    std::fs::write(d.join("dataset.json"), json).unwrap();
    for case in ["a", "b"] {
        let grey = |f: fn(u32, u32) -> u8| image::GrayImage::from_fn(8, 6, |x, y| image::Luma([f(x, y)]));
        grey(|x, _| (x * 30) as u8).save(d.join(format!("imagesTr/{case}_0000.png"))).unwrap();
        grey(|_, y| (y * 7) as u8).save(d.join(format!("imagesTr/{case}_0001.png"))).unwrap();
        grey(|x, y| ((x + y) % 3) as u8).save(d.join(format!("labelsTr/{case}.png"))).unwrap();
    }
    assert_eq!(unetpp::app::detect_dims(&d).unwrap(), 2);
    let nn = unetpp::data::layout::defaults(&d, false).unwrap().unwrap();
    assert_eq!(nn.norms, [ChannelNorm::RgbTo01, ChannelNorm::NoNorm]);
    let cfg = unetpp::data::DataConfig {
        channels: 2,
        classes: 3,
        normalize: unetpp::data::Normalize::ZScore,
        nnunet: Some(nn),
        spacing: None,
    };
    let samples = unetpp::data::load(&d.join("imagesTr"), &cfg, true, false).unwrap();
    assert_eq!(samples.len(), 2);
    let smp = &samples[1];
    assert_eq!((smp.name.as_str(), smp.channels, smp.shape), ("b", 2, [1, 6, 8]));
    // Pixel (x 3, y 2): channel 0 is 90 / 255, channel 1 stays 14, the label is (3 + 2) % 3.
    let i = 2 * 8 + 3;
    assert_eq!((smp.image[i], smp.image[48 + i], smp.mask[i]), (90.0 / 255.0, 14.0, 2));
}
