//! Metrics in physical units and nnU-Net's post-processing: against scipy and MONAI on the
//! random shapes `scripts/metrics_refs.py` wrote (tests/data/metrics/refs.json), hand-made shapes,
//! constructed post-processing cases, and the `eval` / `postprocess` / `predict` commands.
mod common;
use common::*;

use std::path::Path;

use serde_json::Value;
use unetpp::metrics::{self, Empty, Settings, distance, edt};
use unetpp::postprocess::{self, Case, Connectivity};

fn refs() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/metrics/refs.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn arr3<T: Copy>(v: &Value, f: impl Fn(&Value) -> T) -> [T; 3] {
    let a = v.as_array().unwrap();
    [f(&a[0]), f(&a[1]), f(&a[2])]
}

fn labels(v: &Value) -> Vec<u8> {
    v.as_str().unwrap().bytes().map(|b| b - b'0').collect()
}

fn close(got: f64, want: f64, rel: f64) -> bool {
    (got - want).abs() <= rel * want.abs().max(1.0)
}

#[test]
fn distance_transform_matches_scipy() {
    for case in refs()["edt"].as_array().unwrap() {
        let shape = arr3(&case["shape"], |v| v.as_u64().unwrap() as usize);
        let spacing = arr3(&case["spacing"], |v| v.as_f64().unwrap());
        let feature: Vec<bool> = labels(&case["feature"]).iter().map(|&v| v > 0).collect();
        let want: Vec<f64> = case["distance"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        let got = edt::squared(&feature, shape, spacing);
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(close(g.sqrt(), *w, 1e-12), "{shape:?} voxel {i}: {} vs scipy {w}", g.sqrt());
        }
    }
}

#[test]
fn hd95_and_nsd_match_monai() {
    let cases = refs()["surface"].as_array().unwrap().clone();
    assert_eq!(cases.len(), 5);
    for case in cases {
        let shape = arr3(&case["shape"], |v| v.as_u64().unwrap() as usize);
        let spacing = arr3(&case["spacing"], |v| v.as_f64().unwrap());
        let classes = case["classes"].as_u64().unwrap() as usize;
        let settings = Settings { nsd_tolerance: case["tolerance"].as_f64().unwrap(), empty: Empty::One };
        let scores =
            metrics::score_labels(&labels(&case["pred"]), &labels(&case["truth"]), shape, spacing, classes, &settings);
        let hd95 = case["hd95"].as_array().unwrap();
        let nsd = case["nsd"].as_array().unwrap();
        assert_eq!(scores.len(), hd95.len());
        for (i, s) in scores.iter().enumerate() {
            // MONAI returns float32.
            let (h, n) = (hd95[i].as_f64().unwrap(), nsd[i].as_f64().unwrap());
            assert!(close(s.hd95, h, 1e-6), "{shape:?} label {}: HD95 {} vs MONAI {h}", s.label, s.hd95);
            assert!(close(s.nsd, n, 1e-6), "{shape:?} label {}: NSD {} vs MONAI {n}", s.label, s.nsd);
            assert!(s.nsd > 0.0 && s.nsd < 1.0 && s.hd95 > 0.0, "a case that tests something: {s:?}");
        }
    }
}

#[test]
fn components_match_scipy_label_with_face_and_full_connectivity() {
    for case in refs()["components"].as_array().unwrap() {
        let shape = arr3(&case["shape"], |v| v.as_u64().unwrap() as usize);
        let mask: Vec<bool> = labels(&case["mask"]).iter().map(|&v| v > 0).collect();
        for (name, conn) in [("face", Connectivity::Face), ("full", Connectivity::Full)] {
            let mut sizes = postprocess::components(&mask, shape, conn).1[1..].to_vec();
            sizes.sort();
            let want: Vec<usize> =
                case[name].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
            assert_eq!(sizes, want, "{shape:?} {name}");
        }
    }
}

/// A ball of radius `r` voxels (in index units) centred at `c`.
fn ball(shape: [usize; 3], c: [f64; 3], r: f64) -> Vec<bool> {
    let mut m = vec![false; shape.iter().product()];
    for z in 0..shape[0] {
        for y in 0..shape[1] {
            for x in 0..shape[2] {
                let d = [z as f64 - c[0], y as f64 - c[1], x as f64 - c[2]];
                m[(z * shape[1] + y) * shape[2] + x] = d.iter().map(|v| v * v).sum::<f64>() <= r * r;
            }
        }
    }
    m
}

#[test]
fn a_ball_and_its_translate() {
    // Moving a shape by t moves each surface voxel onto a surface voxel of the copy, so every
    // distance is at most |t|; the poles along t are exactly |t| from the other surface. Here
    // t = 2 slices of 2.5 mm.
    let shape = [24, 20, 20];
    let a = ball(shape, [10.0, 10.0, 10.0], 6.0);
    let b = ball(shape, [12.0, 10.0, 10.0], 6.0);
    let d = distance::surface_distances(&a, &b, shape, [2.5, 0.5, 0.5], false);
    let max = d.pred_to_ref.iter().chain(&d.ref_to_pred).fold(0.0f64, |m, &v| m.max(v));
    assert_eq!(max, 5.0);
    assert_eq!(d.nsd(5.0), 1.0);
    assert!(d.nsd(4.9) < 1.0);
    let hd95 = d.hd95();
    assert!(hd95 > 0.0 && hd95 <= 5.0, "{hd95}");
    // The same voxels at a spacing twice as large are twice as far apart.
    let d2 = distance::surface_distances(&a, &b, shape, [5.0, 1.0, 1.0], false);
    assert_eq!(d2.hd95(), 2.0 * hd95);
}

#[test]
fn empty_labels_follow_the_chosen_convention() {
    let shape = [1, 3, 4];
    let none = vec![false; 12];
    let mut some = none.clone();
    some[5] = true;
    let one = Settings::default();
    let nan = Settings { empty: Empty::Nan, ..one };
    let s = metrics::score_label(1, &none, &none, shape, [1.0, 2.0, 3.0], &one);
    assert_eq!((s.dice, s.iou, s.hd95, s.nsd), (1.0, 1.0, 0.0, 1.0));
    let s = metrics::score_label(1, &none, &none, shape, [1.0, 2.0, 3.0], &nan);
    assert!(s.dice.is_nan() && s.iou.is_nan() && s.hd95.is_nan() && s.nsd.is_nan());
    // Present on one side only: Dice 0, HD95 the image's diagonal (2 x 2 mm, 3 x 3 mm).
    for (p, t) in [(&some, &none), (&none, &some)] {
        let s = metrics::score_label(1, p, t, shape, [1.0, 2.0, 3.0], &nan);
        assert_eq!((s.dice, s.iou, s.nsd), (0.0, 0.0, 0.0));
        assert_eq!(s.hd95, (16.0f64 + 81.0).sqrt());
    }
    // NaN cases are left out of the means; with `one` they count as perfect.
    let cases = [
        metrics::score_labels(&[0, 0], &[0, 0], [1, 1, 2], [1.0; 3], 1, &nan),
        metrics::score_labels(&[1, 0], &[1, 1], [1, 1, 2], [1.0; 3], 1, &nan),
    ];
    let refs: Vec<&[metrics::LabelScore]> = cases.iter().map(|c| c.as_slice()).collect();
    let s = metrics::summarize(&refs, &nan);
    assert_eq!((s.per_label[0].cases, s.per_label[0].mean_dice), (1, 2.0 / 3.0));
}

/// A 2D case: `truth` and `pred` drawn as rectangles `(y, x, h, w)` on a 32x32 grid, label 1.
fn case(truth: &[(usize, usize, usize, usize)], pred: &[(usize, usize, usize, usize)]) -> Case {
    let draw = |rects: &[(usize, usize, usize, usize)]| {
        let mut m = vec![0u8; 32 * 32];
        for &(y0, x0, h, w) in rects {
            for y in y0..y0 + h {
                for x in x0..x0 + w {
                    m[y * 32 + x] = 1;
                }
            }
        }
        m
    };
    Case { name: "c".into(), pred: draw(pred), truth: draw(truth), shape: [1, 32, 32] }
}

#[test]
fn removing_a_spurious_component_is_adopted() {
    // Each prediction finds the object and adds a small false positive far from it.
    let cases = [
        case(&[(4, 4, 10, 10)], &[(4, 4, 10, 10), (25, 25, 3, 3)]),
        case(&[(10, 12, 8, 8)], &[(10, 12, 8, 7), (1, 28, 2, 2)]),
    ];
    let d = postprocess::decide(&cases, 1, Connectivity::Full);
    assert!(d.keep_largest_foreground, "{d:?}");
    assert!(d.dice_after.foreground_mean > d.dice_before.foreground_mean);
    let mut p = cases[0].pred.clone();
    d.apply(&mut p, [1, 32, 32]);
    assert_eq!(p, cases[0].truth);
}

#[test]
fn removing_half_of_a_split_object_is_rejected() {
    // The real object is in two parts; the predictions find both.
    let cases = [
        case(&[(4, 4, 10, 6), (4, 14, 10, 6)], &[(4, 4, 10, 6), (5, 14, 9, 6)]),
        case(&[(20, 2, 5, 5), (20, 20, 6, 6)], &[(20, 2, 5, 5), (20, 20, 6, 6), (2, 2, 1, 1)]),
    ];
    let d = postprocess::decide(&cases, 1, Connectivity::Full);
    assert!(!d.keep_largest_foreground, "{d:?}");
    assert!(d.is_noop());
    assert_eq!(d.dice_after, d.dice_before);
}

#[test]
fn connectivity_decides_what_counts_as_spurious() {
    // A false positive touching the object only at a corner: one component with 8-connectivity
    // (nothing to remove), a separate one with 4-connectivity (removed, Dice rises).
    let cases = [case(&[(4, 4, 8, 8)], &[(4, 4, 8, 8), (12, 12, 3, 3)])];
    assert!(!postprocess::decide(&cases, 1, Connectivity::Full).keep_largest_foreground);
    assert!(postprocess::decide(&cases, 1, Connectivity::Face).keep_largest_foreground);
}

#[test]
fn per_label_steps_are_decided_per_label() {
    // Label 1 has a spurious blob (removing it helps); label 2 is truly in two parts.
    let mut c = case(&[(2, 2, 6, 6)], &[(2, 2, 6, 6), (2, 20, 2, 2)]);
    for (y, x) in [(20, 2), (20, 20)] {
        for dy in 0..5 {
            for dx in 0..5 {
                c.truth[(y + dy) * 32 + x + dx] = 2;
                c.pred[(y + dy) * 32 + x + dx] = 2;
            }
        }
    }
    let d = postprocess::decide(&[c], 3, Connectivity::Full);
    assert!(!d.keep_largest_foreground, "label 2 would lose half: {d:?}");
    assert_eq!(d.keep_largest_per_label, vec![1]);
    assert_eq!(d.dice_after.per_label[0].1, 1.0);
    assert_eq!(d.dice_after.per_label[1].1, 1.0);
}

#[test]
fn a_ct_sized_pair_is_scored_in_seconds() {
    // 512x512x100 at 0.7x0.7x2.5 mm: a box and its copy moved 3 voxels along x, plus one stray
    // predicted voxel in a far corner, so the bounding box is the whole volume (the worst case).
    let shape = [100, 512, 512];
    let mut truth = vec![false; shape.iter().product()];
    for z in 10..90 {
        for y in 50..450 {
            truth[(z * 512 + y) * 512 + 50..(z * 512 + y) * 512 + 450].fill(true);
        }
    }
    let mut pred = vec![false; truth.len()];
    pred[3..].copy_from_slice(&truth[..truth.len() - 3]);
    pred[0] = true;
    let (start, cpu) = (std::time::Instant::now(), cpu_seconds());
    let d = distance::surface_distances(&pred, &truth, shape, [2.5, 0.7, 0.7], false);
    let (secs, cpu) = (start.elapsed().as_secs_f64(), cpu_seconds() - cpu);
    eprintln!("512x512x100 surface distances: {secs:.2} s wall, {cpu:.2} s CPU (all threads)");
    // The stray voxel is the farthest: from (0, 0, 0) to the box corner (10, 50, 50).
    let far = ((10.0f64 * 2.5).powi(2) + 2.0 * (50.0f64 * 0.7).powi(2)).sqrt();
    let max = d.pred_to_ref.iter().fold(0.0f64, |m, &v| m.max(v));
    assert!((max - far).abs() < 1e-9, "{max} vs {far}");
    // Every other surface voxel is within the 3-voxel shift (2.1 mm) of the other surface.
    assert_eq!(d.pred_to_ref.iter().filter(|&&v| v > 2.1 + 1e-9).count(), 1);
    assert!(d.ref_to_pred.iter().all(|&v| v <= 2.1 + 1e-9));
}

/// CPU time of the whole process, so that a timing on a loaded machine still says what the work
/// costs.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks: f64 = fields.get(11..13).map_or(0.0, |f| f.iter().map(|v| v.parse::<f64>().unwrap_or(0.0)).sum());
    ticks / 100.0
}

/// Components (8-connected) of each predicted PNG mask in `dir`.
fn components_per_mask(dir: &Path) -> Vec<usize> {
    let mut v = vec![];
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let img = image::open(e.path()).unwrap().to_luma8();
        let mask: Vec<bool> = img.as_raw().iter().map(|&p| p > 0).collect();
        let shape = [1, img.height() as usize, img.width() as usize];
        v.push(postprocess::components(&mask, shape, Connectivity::Full).1.len() - 1);
    }
    v
}

#[test]
fn eval_reports_surface_metrics_and_postprocess_is_decided_and_applied() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let nuclei = Path::new(env!("CARGO_MANIFEST_DIR")).join("samples/nuclei");
    let run = t.join("run");
    #[rustfmt::skip]
    ok_both(&["train", "--data", s(&nuclei), "--out", s(&run), "--width", "4", "--depth", "2", "--epochs", "3",
        "--steps-per-epoch", "6", "--batch-size", "2", "--patch", "32", "--tile", "64", "--lr", "3e-3"]);
    // Trained just enough (and seeded) to predict several separate nuclei per test image.
    let ck = run.join("checkpoints/best.unetpp");

    let (stdout, _) = ok_both(&["eval", "--checkpoint", s(&ck), "--data", s(&nuclei), "--out", s(&t.join("e1"))]);
    assert!(stdout.contains("mean HD95") && stdout.contains("NSD@1"), "{stdout}");
    let csv = std::fs::read_to_string(t.join("e1/scores.csv")).unwrap();
    assert!(csv.starts_with("image,dice,iou,hd95,nsd\n"), "{csv}");
    let summary: Value = serde_json::from_str(&std::fs::read_to_string(t.join("e1/summary.json")).unwrap()).unwrap();
    let surface = &summary["summary"]["surface"];
    assert_eq!(surface["per_label"].as_array().unwrap().len(), 1, "{summary}");
    assert!(surface["mean_hd95"].as_f64().unwrap() > 0.0, "{summary}");
    assert_eq!(surface["empty"], "one");
    assert!(summary["postprocess"].is_null());
    let out = t.join("e-nan");
    #[rustfmt::skip]
    ok_both(&["eval", "--checkpoint", s(&ck), "--data", s(&nuclei), "--out", s(&out), "--empty", "nan", "--nsd-tolerance", "2.5"]);
    let summary: Value = serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(
        (&summary["summary"]["surface"]["empty"], &summary["summary"]["surface"]["nsd_tolerance"]),
        (&"nan".into(), &2.5.into())
    );
    #[rustfmt::skip]
    fails_with(&["eval", "--checkpoint", s(&ck), "--data", s(&nuclei), "--out", s(&out), "--empty", "zero"], 2, &["--empty must be one of one, nan, got `zero`"]);
    let e1 = t.join("e1").to_string_lossy().into_owned();
    fails(
        &["eval", "--checkpoint", s(&ck), "--data", s(&nuclei), "--out", &e1, "--nsd-tolerance=-1"],
        &["--nsd-tolerance -1"],
    );

    // Decide on the validation predictions.
    let preds = t.join("val-pred");
    ok_both(&["predict", "--checkpoint", s(&ck), "--input", s(&nuclei.join("val/images")), "--out", s(&preds)]);
    let decision = t.join("decision.json");
    let (stdout, _) = ok_both(&[
        "postprocess",
        "--predictions",
        s(&preds),
        "--labels",
        s(&nuclei.join("val/masks")),
        "--out",
        s(&decision),
        "--connectivity",
        "face",
    ]);
    assert!(stdout.contains("keep the largest foreground component") && stdout.contains("decision written"));
    let d: Value = serde_json::from_str(&std::fs::read_to_string(&decision).unwrap()).unwrap();
    assert_eq!(d["cases"], components_per_mask(&preds).len());
    assert_eq!(d["connectivity"], "face");
    fails(
        &["postprocess", "--predictions", s(&preds), "--labels", s(&nuclei.join("test/masks")), "--out", s(&decision)],
        &["has no reference with the same name in"],
    );
    fails(
        &[
            "postprocess",
            "--predictions",
            s(&preds),
            "--labels",
            s(&nuclei.join("val/masks")),
            "--out",
            s(&preds.join("d.json")),
        ],
        &["--out", "inside"],
    );

    // A decision beside the checkpoint is applied by predict and eval.
    let test_images = nuclei.join("test/images");
    ok_both(&["predict", "--checkpoint", s(&ck), "--input", s(&test_images), "--out", s(&t.join("plain"))]);
    let mut forced: Value = d.clone();
    forced["keep_largest_foreground"] = Value::Bool(true);
    forced["connectivity"] = "full".into();
    std::fs::write(postprocess::beside(&ck), forced.to_string()).unwrap();
    let (_, stderr) =
        ok_both(&["predict", "--checkpoint", s(&ck), "--input", s(&test_images), "--out", s(&t.join("pp"))]);
    assert!(stderr.contains("best.postprocess.json"), "{stderr}");
    let (plain, pp) = (components_per_mask(&t.join("plain")), components_per_mask(&t.join("pp")));
    assert!(plain.iter().any(|&n| n > 1), "the test needs predictions with several components: {plain:?}");
    assert!(pp.iter().all(|&n| n <= 1), "{pp:?}");
    let (_, stderr) = ok_both(&["eval", "--checkpoint", s(&ck), "--data", s(&nuclei), "--out", s(&t.join("e2"))]);
    assert!(stderr.contains("applying the post-processing"), "{stderr}");
    let summary: Value = serde_json::from_str(&std::fs::read_to_string(t.join("e2/summary.json")).unwrap()).unwrap();
    assert!(summary["postprocess"].as_str().unwrap().ends_with("best.postprocess.json"));
    assert_ne!(std::fs::read(t.join("e1/scores.csv")).unwrap(), std::fs::read(t.join("e2/scores.csv")).unwrap());

    // A decision for another class count is refused, naming the file.
    forced["classes"] = 3.into();
    std::fs::write(postprocess::beside(&ck), forced.to_string()).unwrap();
    fails(
        &["eval", "--checkpoint", s(&ck), "--data", s(&nuclei), "--out", s(&t.join("e3"))],
        &["best.postprocess.json", "3 class(es)"],
    );
    assert!(!t.join("e3").exists(), "nothing written before the check");
}

/// A volume's spacing `[z, y, x]` in the file's own voxel order (the reader's geometry).
fn file_spacing(path: &Path) -> [f64; 3] {
    let g = unetpp::data::io::read_raw(path).unwrap().geometry.unwrap();
    [g.spacing[2], g.spacing[1], g.spacing[0]]
}

#[test]
fn spacing_comes_from_the_nifti_header_and_is_pixels_in_2d() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("samples");
    // pixdim[1..=3] of lung1 as stored: 0.5703125, 0.5703125, 5 (x, y, z).
    let lung1 = file_spacing(&root.join("lesions/test/labels/lung1.nii.gz"));
    assert_eq!(lung1, [5.0, 0.5703125, 0.5703125]);
    let cfg = unetpp::data::DataConfig::new(1, 1, unetpp::data::Normalize::ZScore);
    let volume = unetpp::infer::read_unlabelled(&root.join("lesions/test/images/lung1.nii.gz"), &cfg).unwrap();
    assert_eq!(metrics::voxel_spacing(&volume), [5.0, 0.5703125, 0.5703125]);
    let png = root.join("nuclei/val/images/2022-05-26_RPE1_2198.tif");
    assert_eq!(metrics::voxel_spacing(&unetpp::infer::read_unlabelled(&png, &cfg).unwrap()), [1.0; 3]);
}

#[test]
fn hd95_and_nsd_match_monai_on_real_lesions_in_mm() {
    // The bundled lesion labels, read with their NIfTI spacing, against themselves moved by a
    // few voxels (wrapping round, as numpy.roll).
    for case in refs()["lesions"].as_array().unwrap() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(case["file"].as_str().unwrap());
        // The file's own voxel order (read_mask would LPS-align it), as numpy read it.
        let raw = unetpp::data::io::read_raw(&path).unwrap();
        let (truth, shape): (Vec<u8>, _) = (raw.data.iter().map(|&v| (v > 0.0) as u8).collect(), raw.shape);
        let spacing = file_spacing(&path);
        assert_eq!(spacing, arr3(&case["spacing"], |v| v.as_f64().unwrap()));
        let shift = arr3(&case["shift"], |v| v.as_i64().unwrap());
        let mut pred = vec![0u8; truth.len()];
        for z in 0..shape[0] {
            for y in 0..shape[1] {
                for x in 0..shape[2] {
                    let to = |i: usize, k: usize| (i as i64 + shift[k]).rem_euclid(shape[k] as i64) as usize;
                    pred[(to(z, 0) * shape[1] + to(y, 1)) * shape[2] + to(x, 2)] =
                        truth[(z * shape[1] + y) * shape[2] + x];
                }
            }
        }
        let settings = Settings { nsd_tolerance: case["tolerance"].as_f64().unwrap(), empty: Empty::One };
        let s = metrics::score_labels(&pred, &truth, shape, spacing, 1, &settings)[0];
        let (h, n) = (case["hd95"].as_f64().unwrap(), case["nsd"].as_f64().unwrap());
        assert!(close(s.hd95, h, 1e-6) && close(s.nsd, n, 1e-6), "{path:?}: {s:?} vs MONAI HD95 {h}, NSD {n}");
    }
}
