//! Resampling to a target spacing (src/data/volume/resample.rs) against nnU-Net's resampling as
//! skimage/scipy compute it (scripts/resample_refs.py, outputs in tests/data/resample/), and its
//! guarantees on labels and probabilities.
mod common;
use common::*;

use std::path::Path;

use serde_json::Value;
use unetpp::data::volume::resample::{Kind, Plan, resample, resample_labels};

fn case(name: &str) -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/resample").join(format!("{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn arr3<T: Copy>(v: &Value, f: impl Fn(&Value) -> T) -> [T; 3] {
    std::array::from_fn(|i| f(&v[i]))
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

fn u8s(v: &Value) -> Vec<u8> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u8).collect()
}

const CASES: [&str; 6] = ["iso_down", "iso_up", "aniso_down", "aniso_up", "aniso_y", "aniso_target"];

fn plan_of(c: &Value) -> Plan {
    let shape = arr3(&c["shape"], |x| x.as_u64().unwrap() as usize);
    let plan = Plan::to_spacing(
        shape,
        arr3(&c["spacing"], |x| x.as_f64().unwrap()),
        arr3(&c["target"], |x| x.as_f64().unwrap()),
        "case",
    )
    .unwrap();
    assert_eq!(plan.to, arr3(&c["new_shape"], |x| x.as_u64().unwrap() as usize), "new shape");
    assert_eq!(plan.separate, c["separate"].as_u64().map(|a| a as usize), "separate axis");
    plan
}

#[test]
fn images_match_nnunet_cubic_resampling_up_down_isotropic_and_anisotropic() {
    for name in CASES {
        let c = case(name);
        let plan = plan_of(&c);
        let (input, want) = (f32s(&c["image"]), f32s(&c["image_out"]));
        let got = resample(&input, 1, &plan, Kind::Image).unwrap();
        assert_eq!(got.len(), want.len(), "{name}");
        let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
        let err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max) / scale;
        assert!(err < 1e-6, "{name}: max error {err:e} of the largest value");
    }
}

#[test]
fn labels_match_the_argmax_of_linear_one_hot_exactly_and_nnunet_on_two_classes() {
    for name in CASES {
        let c = case(name);
        let plan = plan_of(&c);
        let got = resample_labels(&u8s(&c["labels"]), &plan).unwrap();
        assert_eq!(got, u8s(&c["labels_out"]), "{name}: four classes, arg-max");
        // nnU-Net's rule (a class where its mask reaches 0.5) differs only where none does, and
        // writes 0 there.
        let nnunet = u8s(&c["labels_nnunet_out"]);
        assert!(got.iter().zip(&nnunet).all(|(a, b)| a == b || *b == 0), "{name}: differs from nnU-Net elsewhere");
        let got = resample_labels(&u8s(&c["labels2"]), &plan).unwrap();
        assert_eq!(got, u8s(&c["labels2_nnunet_out"]), "{name}: two classes, nnU-Net's resize_segmentation");
    }
}

#[test]
fn probabilities_match_nnunet_linear_resampling() {
    for name in CASES {
        let c = case(name);
        let plan = plan_of(&c);
        let got = resample(&f32s(&c["probs"]), 3, &plan, Kind::Probabilities).unwrap();
        let want = f32s(&c["probs_out"]);
        let err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(got.len() == want.len() && err < 5e-7, "{name}: max error {err:e}");
    }
}

/// Three nested ellipsoids (classes 1..3, radii 0.42, 0.315 and 0.21 of the extent) in
/// background, large enough in voxels that a class's volume is a fair measure.
fn phantom(shape: [usize; 3]) -> Vec<u8> {
    let mut m = vec![0u8; shape.iter().product()];
    for (i, l) in m.iter_mut().enumerate() {
        let idx = [i / (shape[1] * shape[2]), i / shape[2] % shape[1], i % shape[2]];
        let r = |a: usize| ((idx[a] as f64 + 0.5) / shape[a] as f64 - 0.5) / 0.42;
        let d = (0..3).map(|a| r(a).powi(2)).sum::<f64>().sqrt();
        *l = [1.0, 0.75, 0.5].iter().filter(|&&k| d < k).count() as u8;
    }
    m
}

fn class_counts(m: &[u8]) -> [usize; 4] {
    let mut n = [0; 4];
    m.iter().for_each(|&l| n[l as usize] += 1);
    n
}

#[test]
fn labels_there_and_back_keep_their_classes_and_volumes() {
    for (spacing, target) in [([2.5, 0.7, 0.7], [1.5, 1.0, 1.0]), ([1.0, 0.8, 0.8], [0.6, 1.3, 1.1])] {
        let shape = [24, 96, 80];
        let m = phantom(shape);
        let plan = Plan::to_spacing(shape, spacing, target, "phantom").unwrap();
        let there = resample_labels(&m, &plan).unwrap();
        let back = resample_labels(&there, &plan.inverse()).unwrap();
        assert_eq!(back.len(), m.len());
        let (before, after) = (class_counts(&m), class_counts(&back));
        for c in 0..4 {
            assert!(before[c] > 0, "class {c} is in the phantom");
            let diff = (after[c] as f64 - before[c] as f64).abs() / before[c] as f64;
            assert!(diff < 0.02, "{spacing:?} -> {target:?}: class {c} {} -> {} voxels", before[c], after[c]);
        }
        // Physical volume is kept at the target grid too (voxel volumes differ).
        let vol = |counts: [usize; 4], s: [f64; 3], shape_from: [usize; 3], shape_to: [usize; 3]| {
            let v: f64 = (0..3).map(|a| s[a] * shape_from[a] as f64 / shape_to[a] as f64).product();
            counts.map(|n| n as f64 * v)
        };
        let (v0, v1) = (vol(before, spacing, shape, shape), vol(class_counts(&there), spacing, shape, plan.to));
        (1..4).for_each(|c| assert!((v1[c] - v0[c]).abs() / v0[c] < 0.03, "class {c}: {} vs {} mm3", v1[c], v0[c]));
        // A label map without class 2 never gains it.
        let no2: Vec<u8> = m.iter().map(|&l| if l == 2 { 3 } else { l }).collect();
        let r = resample_labels(&no2, &plan).unwrap();
        assert_eq!(class_counts(&r)[2], 0, "class 2 invented");
    }
}

#[test]
fn probabilities_resampled_back_sum_to_one() {
    let (shape, spacing, target) = ([12, 20, 18], [3.0, 0.8, 0.8], [1.0, 1.0, 1.0]);
    let plan = Plan::to_spacing(shape, spacing, target, "p").unwrap();
    let n: usize = plan.to.iter().product();
    // Softmax of smooth logits on the resampled grid, as a model would predict there.
    let logits: Vec<[f32; 3]> =
        (0..n).map(|i| [(i as f32 * 0.013).sin() * 4.0, (i as f32 * 0.007).cos() * 3.0, 0.5]).collect();
    let mut probs = vec![0f32; 3 * n];
    for (i, l) in logits.iter().enumerate() {
        let s: f32 = l.iter().map(|x| x.exp()).sum();
        (0..3).for_each(|c| probs[c * n + i] = l[c].exp() / s);
    }
    let back = resample(&probs, 3, &plan.inverse(), Kind::Probabilities).unwrap();
    let m: usize = shape.iter().product();
    assert_eq!(back.len(), 3 * m);
    for i in 0..m {
        let s: f32 = (0..3).map(|c| back[c * m + i]).sum();
        assert!((s - 1.0).abs() < 1e-5 && (0..3).all(|c| (0.0..=1.0).contains(&back[c * m + i])), "voxel {i}: sum {s}");
    }
}

#[test]
fn bad_spacings_shapes_and_oversized_targets_are_errors_naming_the_value() {
    let err = |r: anyhow::Result<Plan>| format!("{:#}", r.unwrap_err());
    let e = err(Plan::to_spacing([4, 4, 4], [1.0, 0.0, 1.0], [1.0; 3], "a.nii.gz"));
    assert!(e.contains("a.nii.gz") && e.contains("[1.0, 0.0, 1.0]") && e.contains("greater than 0"), "{e}");
    let e = err(Plan::to_spacing([4, 4, 4], [1.0; 3], [1.0, f64::NAN, 1.0], "a.nii.gz"));
    assert!(e.contains("--spacing") && e.contains("NaN"), "{e}");
    let e = err(Plan::to_spacing([4, 4, 4], [1.0; 3], [-2.0, 1.0, 1.0], "a.nii.gz"));
    assert!(e.contains("--spacing") && e.contains("-2.0"), "{e}");
    let e = err(Plan::to_spacing([4, 0, 4], [1.0; 3], [1.0; 3], "a.nii.gz"));
    assert!(e.contains("a.nii.gz") && e.contains("[4, 0, 4]") && e.contains("empty"), "{e}");
    let e = err(Plan::to_spacing([64, 64, 64], [1.0; 3], [0.002; 3], "big.nrrd"));
    assert!(e.contains("big.nrrd") && e.contains("0.002") && e.contains("GiB"), "{e}");
    let e = err(Plan::to_spacing([1, 64, 64], [1.0; 3], [5.0, 1.0, 1.0], "thin.mha"));
    assert!(e.contains("thin.mha") && e.contains("5") && e.contains("finer"), "{e}");
    // Wrongly sized data is an error, not a panic.
    let plan = Plan::to_spacing([4, 4, 4], [1.0; 3], [2.0; 3], "x").unwrap();
    assert!(resample(&[0.0; 63], 1, &plan, Kind::Image).is_err());
    assert!(resample_labels(&[0; 65], &plan).is_err());
}

/// Tiny 3D settings as tests/cli.rs's 3D run.
const TINY_3D: Tiny = Tiny { width: "2", steps: "2", patch: "8,32,32", ..Tiny::D3 };

#[test]
fn train_at_a_target_spacing_then_predict_and_eval_on_the_inputs_grid() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let data = samples("lesions");
    ok(&train_args(&data, &run, TINY_3D, &["--spacing", "1,1,5"]));
    // The run's configuration and the checkpoint keep the spacing, so predict and eval use it.
    let config = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(config.contains("spacing = [1.0, 1.0, 5.0]"), "{config}");
    // The training samples are on the target grid: lung2 (64x64x16 at 0.63x0.63x5 mm) and the
    // brains (64x64x16 at 0.78x0.78x6.5 mm).
    let opts = unetpp::train::TrainOptions {
        data: Some(data.clone()),
        spacing: Some("1,1,5".parse().unwrap()),
        ..Default::default()
    };
    let cfg = unetpp::train::TrainConfig::from_options(&opts).unwrap();
    let (train, val) = unetpp::train::load_splits(&cfg).unwrap();
    let mut shapes: Vec<[usize; 3]> = train.iter().chain(&val).map(|s| s.shape).collect();
    shapes.sort();
    assert_eq!(shapes, vec![[16, 40, 40], [21, 50, 50], [21, 50, 50]]);
    assert!(train.iter().chain(&val).all(|s| s.mask.len() == s.voxels() && s.mask.contains(&1)));
    let best = run.join("checkpoints/best.unetpp");
    let meta = unetpp::checkpoint::read_meta(&best).unwrap();
    assert_eq!(meta.data.spacing.map(|s| s.0), Some([1.0, 1.0, 5.0]));
    // lung1 is 64x64x16 at 0.57x0.57x5 mm: the network sees about 36x36x16; the mask comes back
    // at 64x64x16 on the input's affine.
    let pred = tmp.path().join("pred");
    let input = data.join("test/images/lung1.nii.gz");
    ok(&["predict", "--checkpoint", s(&best), "--input", s(&input), "--out", s(&pred), "--probabilities"]);
    use nifti::NiftiObject;
    let obj = nifti::ReaderOptions::new().read_file(pred.join("lung1.nii.gz")).unwrap();
    let reference = nifti::ReaderOptions::new().read_file(&input).unwrap();
    assert_eq!(&obj.header().dim[1..4], &reference.header().dim[1..4]);
    assert_eq!(obj.header().srow_x, reference.header().srow_x, "prediction keeps the input's affine");
    let stdout = ok(&["eval", "--checkpoint", s(&best), "--data", s(&data), "--out", s(&tmp.path().join("ev"))]);
    assert!(stdout.contains("1 images"), "{stdout}");
}

#[test]
fn bad_spacing_options_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let data = samples("lesions");
    let r = tmp.path().join("r");
    for (bad, needle) in [("0,1,1", "greater than 0"), ("1,NaN,1", "greater than 0"), ("1,2", "X,Y,Z")] {
        fails_with(&train_args(&data, &r, TINY_3D, &["--spacing", bad]), 2, &["--spacing", needle]);
    }
    assert!(!r.exists(), "nothing written for a refused option");
    // A target spacing means nothing to 2D images.
    let nuclei = samples("nuclei");
    let out = tmp.path().join("r2");
    fails_with(
        &["train", "--data", s(&nuclei), "--out", s(&out), "--spacing", "1,1,1", "--patch", "32", "--epochs", "1"],
        1,
        &["--spacing", "2D"],
    );
}
