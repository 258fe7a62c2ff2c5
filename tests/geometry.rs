//! Volumes keep their place in the world through train/eval/predict (issue #17), checked against
//! SimpleITK (scripts/geometry_fixtures.py writes tests/data/geometry/ and its JSON references):
//! - the canonical (LPS-aligned) array of every fixture is SimpleITK's `DICOMOrient(img, "LPS")`,
//!   and the same anatomy stored permuted/flipped gives the same array;
//! - labels follow their image, also when stored in another voxel order; labels on another grid
//!   are refused;
//! - a prediction opened over its input lines up in world coordinates (label centroid), for
//!   oblique and flipped headers in NIfTI, NRRD and MetaImage, through the library's predict
//!   path with the model replaced by a known function, and through the CLI with a checkpoint.
mod common;
use common::*;

use std::path::{Path, PathBuf};

use burn::prelude::Device;
use serde_json::Value;
use unetpp::data::volume::{self, Geometry, Volume, orient};
use unetpp::data::{DataConfig, Normalize};

const FORMATS: [&str; 3] = ["nii.gz", "nrrd", "mha"];

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/geometry")
}

fn reference(case: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir().join(format!("{case}.json"))).unwrap()).unwrap()
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

fn close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}");
    assert!(got.iter().zip(want).all(|(a, b)| (a - b).abs() <= tol), "{what}: got {got:?}, SimpleITK {want:?}");
}

/// Spacing, origin and direction (row by row, as SimpleITK's GetDirection) against `r`. NIfTI
/// stores them in single precision.
fn same_geometry(what: &str, g: &Geometry, r: &Value) {
    close(&format!("{what} spacing"), &g.spacing, &f64s(&r["spacing"]), 1e-4);
    close(&format!("{what} origin"), &g.origin, &f64s(&r["origin"]), 1e-4);
    close(&format!("{what} direction"), g.direction.as_flattened(), &f64s(&r["direction"]), 1e-4);
}

fn read(path: &Path) -> Volume {
    volume::read(path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()))
}

/// The LPS world centroid of the voxels above 0.5 and their number.
fn world_centroid(v: &Volume) -> ([f64; 3], usize) {
    let [_, h, w] = v.shape;
    let (mut sum, mut n) = ([0.0; 3], 0);
    for (i, _) in v.data.iter().enumerate().filter(|(_, x)| **x > 0.5) {
        let p = v.geometry.index_to_world([(i % w) as f64, (i / w % h) as f64, (i / (w * h)) as f64]);
        (0..3).for_each(|a| sum[a] += p[a]);
        n += 1;
    }
    (sum.map(|s| s / n as f64), n)
}

/// The fixtures' intensities are 0..20 around a blob of 100: this window maps the blob to 1.
fn config() -> DataConfig {
    DataConfig::new(1, 1, Normalize::Window { low: 0.0, high: 100.0 })
}

#[test]
fn canonical_arrays_are_simpleitk_dicomorient_lps() {
    for case in ["oblique", "flipped", "oblique_perm"] {
        let r = &reference(case)["canonical"];
        for ext in FORMATS {
            let name = format!("{case}.{ext}");
            let file = read(&dir().join(&name));
            let (c, frame) = orient::canonical(file.clone());
            let size = f64s(&r["size_xyz"]);
            assert_eq!(c.shape.map(|s| s as f64), [size[2], size[1], size[0]], "{name}");
            assert_eq!(c.data, f64s(&r["voxels"]).iter().map(|&v| v as f32).collect::<Vec<_>>(), "{name} voxels");
            same_geometry(&format!("{name} canonical"), &c.geometry, r);
            assert_eq!(frame.orientation.undo(&c.data, 1, frame.file_shape), file.data, "{name}: undo");
        }
    }
    // Not a vacuous check: the fixtures' file layouts are not canonical.
    let flipped = read(&dir().join("flipped.nrrd"));
    assert_ne!(orient::canonical(flipped.clone()).0.shape, flipped.shape);
}

#[test]
fn the_same_anatomy_stored_permuted_and_flipped_gives_the_same_array() {
    for ext in FORMATS {
        let a = read(&dir().join(format!("oblique.{ext}")));
        let b = read(&dir().join(format!("oblique_perm.{ext}")));
        assert_ne!(a.shape, b.shape, "{ext}: the fixtures differ on disk");
        let (ca, cb) = (orient::canonical(a).0, orient::canonical(b).0);
        assert_eq!((ca.shape, &ca.data), (cb.shape, &cb.data), "{ext}");
        let g = &cb.geometry;
        let r = serde_json::json!({"spacing": g.spacing, "origin": g.origin, "direction": g.direction.as_flattened()});
        same_geometry(ext, &ca.geometry, &r);
    }
}

fn data_set(root: &Path, pairs: &[(&str, &str)]) {
    for sub in ["images", "labels"] {
        std::fs::create_dir_all(root.join(sub)).unwrap();
    }
    for (image, label) in pairs {
        std::fs::copy(dir().join(image), root.join("images").join(image)).unwrap();
        let stem = image.split('.').next().unwrap();
        std::fs::copy(dir().join(label), root.join("labels").join(format!("{stem}.nii.gz"))).unwrap();
    }
}

#[test]
fn labels_follow_their_image_and_labels_on_another_grid_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    // The image's label stored in the file order of `oblique_perm` (same world grid), and a
    // NIfTI label paired by stem with NRRD and MetaImage images.
    data_set(tmp.path(), &[("oblique.nrrd", "oblique_perm_label.nii.gz"), ("flipped.mha", "flipped_label.nii.gz")]);
    let samples = unetpp::data::load(tmp.path(), &config(), true, false).unwrap();
    assert_eq!(samples.len(), 2);
    for s in &samples {
        let blob: Vec<u8> = s.image.iter().map(|&v| (v > 0.5) as u8).collect();
        assert_eq!(s.mask, blob, "{}: the label lies on the image's blob", s.name);
        let r = reference(&s.name);
        assert_eq!(s.mask.iter().filter(|&&v| v > 0).count() as u64, r["label_voxels"].as_u64().unwrap());
        same_geometry(&s.name, &s.geometry.as_ref().unwrap().geometry(), &r["canonical"]);
    }

    // Same file size, another grid: refused by name.
    let bad = tempfile::tempdir().unwrap();
    data_set(bad.path(), &[("flipped.nrrd", "oblique_label.nii.gz")]);
    let e = format!("{:#}", unetpp::data::load(bad.path(), &config(), true, false).unwrap_err());
    assert!(e.contains("flipped.nrrd") && e.contains("flipped.nii.gz") && e.contains("same voxel grid"), "{e}");
}

/// The library's predict path (read the input, "predict", write the prediction) with the model
/// replaced by a known function, probability = normalised intensity: then the prediction must be
/// the input's blob, and its world centroid SimpleITK's centroid of the blob's label. The network
/// only ever sees the array, so a model adds nothing to what this checks; the CLI test below
/// runs a real checkpoint.
#[test]
fn predictions_line_up_with_their_input_in_world_coordinates() {
    let out = tempfile::tempdir().unwrap();
    for case in ["oblique", "flipped", "oblique_perm"] {
        let r = reference(case);
        for ext in FORMATS {
            let input = dir().join(format!("{case}.{ext}"));
            let s = unetpp::infer::read_unlabelled(&input, &config()).unwrap();
            let probs: Vec<f32> = s.image.clone();
            let sub = out.path().join(ext);
            std::fs::create_dir_all(&sub).unwrap();
            let labels = unetpp::infer::labels(&probs, 1);
            let written = unetpp::infer::writer::prediction(
                &sub,
                &s,
                &labels,
                &probs,
                1,
                Some(unetpp::probabilities::Format::Lossless),
            )
            .unwrap();
            assert_eq!(written[0], sub.join(format!("{case}.nii.gz")));
            let pred = read(&written[0]);
            let what = format!("prediction for {case}.{ext}");
            same_geometry(&what, &pred.geometry, &r);
            assert_eq!(pred.shape, read(&input).shape, "{what}: the input's own voxel order");
            let (centroid, n) = world_centroid(&pred);
            assert_eq!(n as u64, r["label_voxels"].as_u64().unwrap(), "{what}");
            close(&format!("{what} world centroid"), &centroid, &f64s(&r["label_centroid"]), 1e-3);
            // The probability map is the input's intensities, voxel for voxel in the file's order.
            let prob = read(&written[1]);
            let want: Vec<f32> = read(&input).data.iter().map(|v| (v / 100.0).clamp(0.0, 1.0)).collect();
            assert!(prob.data.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-6), "{what}: probabilities");
        }
    }
    // A NIfTI input's own header is kept: sform and qform as they were.
    let (a, b) = (header(&dir().join("oblique.nii.gz")), header(&out.path().join("nii.gz/oblique.nii.gz")));
    assert_eq!((a.sform_code, a.srow_x, a.srow_y, a.srow_z), (b.sform_code, b.srow_x, b.srow_y, b.srow_z));
    assert_eq!(
        (a.qform_code, a.quatern_b, a.quatern_c, a.quatern_d),
        (b.qform_code, b.quatern_b, b.quatern_c, b.quatern_d)
    );
}

fn header(p: &Path) -> nifti::NiftiHeader {
    nifti::NiftiHeader::from_file(p).unwrap()
}

fn tiny_checkpoint(path: &Path) {
    use unetpp::model::{Arch, ModelConfig, Preset};
    let model = ModelConfig { width: 4, dims: 3, ..ModelConfig::new(Arch::Unetpp, Preset::Modern, 2) };
    let meta = unetpp::checkpoint::Meta { model: model.clone(), data: config(), epoch: 1, val_iou: None };
    unetpp::checkpoint::save(&model.init::<5>(&Device::flex()), &meta, path).unwrap();
}

/// `predict` with a (randomly initialised) checkpoint: its probabilities are some function of
/// the array the network sees, different under any flip or permutation of it. So if every
/// input is brought to the same canonical array and its prediction written back on its own
/// grid, the predictions of one anatomy stored four ways (oblique NRRD/MHA/NIfTI, permuted and
/// flipped, and SimpleITK's own LPS-oriented copy) are the same map in the world. `eval` then
/// scores NRRD and MetaImage images against NIfTI labels paired by stem.
#[test]
fn predict_and_eval_through_the_cli_keep_the_world() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("tiny.unetpp");
    tiny_checkpoint(&ck);
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let runs: [&[&str]; 3] = [
        &["oblique.nrrd", "oblique_perm.mha", "oblique_canon.nii.gz"],
        &["oblique.mha", "oblique_perm.nii.gz"],
        &["oblique.nii.gz", "oblique_perm.nrrd"],
    ];
    let mut maps = vec![];
    for (i, files) in runs.iter().enumerate() {
        let input = tmp.path().join(format!("in{i}"));
        std::fs::create_dir_all(&input).unwrap();
        for f in *files {
            std::fs::copy(dir().join(f), input.join(f)).unwrap();
        }
        if i == 0 {
            // A detached header's data file sits beside it and is not an input itself.
            for f in ["ct_detached.nhdr", "ct_detached.raw"] {
                std::fs::copy(dir().join("../volumes").join(f), input.join(f)).unwrap();
            }
        }
        let out = tmp.path().join(format!("out{i}"));
        ok_text(&["predict", "--checkpoint", &s(&ck), "--input", &s(&input), "--out", &s(&out), "--probabilities"]);
        let mut names: Vec<String> =
            std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        let mut want: Vec<String> = files
            .iter()
            .chain(if i == 0 { &["ct_detached.nhdr"][..] } else { &[] })
            .flat_map(|f| {
                let stem = f.split('.').next().unwrap();
                [format!("{stem}.nii.gz"), format!("{stem}_prob0.nii.gz")]
            })
            .collect();
        want.sort();
        assert_eq!(names, want, "one prediction per input, none for the .raw");
        for f in *files {
            let stem = f.split('.').next().unwrap();
            let pred = read(&out.join(format!("{stem}_prob0.nii.gz")));
            let r = reference(if stem == "oblique_canon" { "oblique" } else { stem });
            if stem != "oblique_canon" {
                same_geometry(&format!("prediction for {f}"), &pred.geometry, &r);
            }
            assert_eq!(pred.shape, read(&dir().join(f)).shape, "{f}: written in the input's voxel order");
            maps.push((f.to_string(), orient::canonical(pred).0));
        }
        if i == 0 {
            let ct = read(&out.join("ct_detached.nii.gz"));
            let src = read(&dir().join("../volumes/ct_detached.nhdr"));
            same_geometry(
                "prediction for ct_detached.nhdr",
                &ct.geometry,
                &serde_json::json!({"spacing": src.geometry.spacing, "origin": src.geometry.origin,
                    "direction": src.geometry.direction.as_flattened()}),
            );
        }
    }
    let (first, base) = &maps[0];
    let spread = base.data.iter().fold(f32::INFINITY, |m, &v| m.min(v))
        - base.data.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    assert!(spread.abs() > 1e-4, "the probabilities vary (else this test could not fail)");
    for (f, m) in &maps[1..] {
        assert_eq!(m.shape, base.shape, "{f} vs {first}");
        let worst = m.data.iter().zip(&base.data).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(worst < 1e-5, "{f} vs {first}: probabilities differ by {worst} in the world");
    }

    let data = tmp.path().join("data");
    data_set(&data, &[("oblique.nrrd", "oblique_label.nii.gz"), ("flipped.mha", "flipped_label.nii.gz")]);
    let eval = tmp.path().join("eval");
    let text = ok_text(&["eval", "--checkpoint", &s(&ck), "--data", &s(&data), "--out", &s(&eval)]);
    assert!(text.contains("2 images"), "{text}");
    let scores = std::fs::read_to_string(eval.join("scores.csv")).unwrap();
    assert!(scores.contains("oblique") && scores.contains("flipped"), "{scores}");
}
