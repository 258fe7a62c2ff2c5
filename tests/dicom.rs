//! DICOM series read as volumes (issue #17), checked against SimpleITK's `ImageSeriesReader`
//! (scripts/dicom_fixtures.py wrote the series with pydicom into tests/data/dicom/ and SimpleITK's
//! reading of each as NAME.json):
//! - voxels equal SimpleITK's, geometry within 1e-4, for an oblique series with shuffled file
//!   names and InstanceNumbers (plus a README and a DICOMDIR to skip), one stacked against its
//!   normal, per-slice rescale slope/intercept, RLE and deflate;
//! - two series, a missing slice, duplicates, a multi-frame object are errors naming the folder
//!   (and listing the series);
//! - a series is a case of a data folder (`images/NAME/`, `labels/NAME.nii.gz`) whose label
//!   lines up voxel for voxel, and `train`, `eval` and `predict --input <series folder>` run on
//!   it; the prediction's NIfTI affine is SimpleITK's geometry of the series in RAS.

mod common;

use std::path::{Path, PathBuf};

use serde_json::Value;
use unetpp::data::volume::{self, Format};
use unetpp::data::{self, DataConfig, Normalize};

use common::{fails, ok_text as ok, s};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/dicom")
}

fn reference(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join(format!("{name}.json"))).unwrap()).unwrap()
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

fn close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}");
    assert!(got.iter().zip(want).all(|(a, b)| (a - b).abs() <= tol), "{what}: got {got:?}, SimpleITK {want:?}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
    }
}

#[test]
fn series_read_as_simpleitk_reads_them() {
    for name in ["oblique", "flipped", "rescale", "rle", "deflate"] {
        let dir = fixtures().join(name);
        assert_eq!(Format::of(&dir), Some(Format::Dicom), "{name}");
        let v = volume::read(&dir).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let r = reference(name);
        let size = f64s(&r["size"]);
        assert_eq!(v.shape.map(|n| n as f64), [size[2], size[1], size[0]], "{name}: [z, y, x]");
        assert_eq!(v.channels, 1);
        let want: Vec<f32> = f64s(&r["voxels"]).iter().map(|&x| x as f32).collect();
        assert_eq!(v.data, want, "{name}: voxels differ from SimpleITK's");
        close(&format!("{name} spacing"), &v.geometry.spacing, &f64s(&r["spacing"]), 1e-4);
        close(&format!("{name} origin"), &v.geometry.origin, &f64s(&r["origin"]), 1e-4);
        close(&format!("{name} direction"), v.geometry.direction.as_flattened(), &f64s(&r["direction"]), 1e-4);
        // Rescaled voxels are in their own units (HU): --normalize imagenet must not divide them
        // by the stored type's range.
        assert_eq!(v.full_scale, if name == "rescale" { 1.0 } else { i16::MAX as f32 }, "{name}");
    }
    assert_eq!(data::depth_of(&fixtures().join("oblique")), Some(5));
}

#[test]
fn bad_series_are_errors_that_name_the_folder() {
    let err = |name: &str| {
        let dir = fixtures().join(name);
        let e = format!("{:#}", volume::read(&dir).expect_err(name));
        assert!(e.contains(s(&dir)), "{name}: the error does not name the folder: {e}");
        e
    };
    let e = err("two_series");
    for needle in ["2 DICOM series", "\"Abdomen 5mm\", CT, 3 slice(s)", "\"Localizer\", CT, 2 slice(s)", "own"] {
        assert!(e.contains(needle), "two_series lacks `{needle}`: {e}");
    }
    let e = err("missing_slice");
    assert!(e.contains("missing slice") && e.contains("5.0000 (") && e.contains("10.0000 ("), "{e}");
    let e = err("duplicate");
    assert!(e.contains("IM0001") && e.contains("IM0001_copy") && e.contains("duplicate"), "{e}");
    let e = err("multiframe");
    assert!(e.contains("enhanced.dcm") && e.contains("multi-frame") && e.contains("3 frames"), "{e}");

    let tmp = tempfile::tempdir().unwrap();
    // A folder with no DICOM file is no series; one whose only DICOM file is corrupt is an error.
    std::fs::write(tmp.path().join("README"), "notes").unwrap();
    assert_eq!(Format::of(tmp.path()), None);
    let mut bytes = vec![0u8; 128];
    bytes.extend(b"DICMgarbage");
    std::fs::write(tmp.path().join("broken.dcm"), bytes).unwrap();
    assert_eq!(Format::of(tmp.path()), Some(Format::Dicom));
    let e = format!("{:#}", volume::read(tmp.path()).unwrap_err());
    assert!(e.contains("broken.dcm") && e.contains("not a readable DICOM file"), "{e}");
}

/// `images/NAME/` (a series) + `labels/NAME.nii.gz`, NAME dotted like a UID.
fn data_folder(root: &Path) -> PathBuf {
    let series = root.join("images/1.2.840.17");
    copy_dir(&fixtures().join("oblique"), &series);
    std::fs::create_dir_all(root.join("labels")).unwrap();
    std::fs::copy(fixtures().join("oblique_label.nii.gz"), root.join("labels/1.2.840.17.nii.gz")).unwrap();
    series
}

#[test]
fn a_series_is_a_case_whose_label_lines_up() {
    let tmp = tempfile::tempdir().unwrap();
    data_folder(tmp.path());
    // The label (written by SimpleITK on the series' grid) is the voxels above the median; the
    // window keeps the order of intensities, so the mask must be exactly image > median.
    let cfg = DataConfig::new(1, 1, "window:-1000:1000".parse::<Normalize>().unwrap());
    let samples = data::load(tmp.path(), &cfg, true, false).unwrap();
    assert_eq!(samples.len(), 1);
    let c = &samples[0];
    assert_eq!((c.name.as_str(), c.shape), ("1.2.840.17", [5, 6, 8]));
    let mut v: Vec<f32> = f64s(&reference("oblique")["voxels"]).iter().map(|&x| x as f32).collect();
    v.sort_by(f32::total_cmp);
    // numpy's median of an even count: the mean of the middle two.
    let median = ((v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0 + 1000.0) / 2000.0;
    let want: Vec<u8> = c.image.iter().map(|&x| (x > median) as u8).collect();
    assert_eq!(c.mask, want);
    assert!(c.mask.contains(&1) && c.mask.contains(&0));
}

#[test]
fn train_eval_and_predict_on_a_series_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let series = data_folder(&tmp.path().join("data"));
    let run = tmp.path().join("run");
    #[rustfmt::skip]
    ok(&["train", "--data", s(&tmp.path().join("data")), "--out", s(&run), "--width", "2", "--depth", "2",
        "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "1", "--patch", "8,16,16", "--tile", "8,16,16"]);
    let best = run.join("checkpoints/best.unetpp");
    let text = ok(&[
        "eval",
        "--checkpoint",
        s(&best),
        "--data",
        s(&tmp.path().join("data")),
        "--out",
        s(&tmp.path().join("ev")),
    ]);
    assert!(text.contains("1 images"), "{text}");
    let scores = std::fs::read_to_string(tmp.path().join("ev/scores.csv")).unwrap();
    assert!(scores.contains("\"1.2.840.17\","), "{scores}");

    let pred = tmp.path().join("pred");
    let text = ok(&["predict", "--checkpoint", s(&best), "--input", s(&series), "--out", s(&pred)]);
    assert!(text.contains("README.txt (not DICOM") && text.contains("DICOMDIR (a DICOMDIR"), "{text}");
    let out = pred.join("1.2.840.17.nii.gz");
    let h = nifti::NiftiHeader::from_file(&out).unwrap();
    assert_eq!(&h.dim[1..4], &[8, 6, 5], "the series' own voxel order, x along the rows");
    let want = reference("oblique")["affine_ras"].clone();
    let rows: Vec<Vec<f64>> = want.as_array().unwrap().iter().map(f64s).collect();
    for (r, srow) in [h.srow_x, h.srow_y, h.srow_z].iter().enumerate() {
        let got: Vec<f64> = srow.iter().map(|&x| x as f64).collect();
        close(&format!("srow {r}"), &got, &rows[r], 1e-4);
    }
    assert_eq!((h.sform_code, h.qform_code), (1, 1));
    // A folder of two series is refused before anything is written, listing them.
    let two = tmp.path().join("two");
    let e = fails(
        &["predict", "--checkpoint", s(&best), "--input", s(&fixtures().join("two_series")), "--out", s(&two)],
        &["two_series", "2 DICOM series", "\"Localizer\", CT, 2 slice(s)", "a folder of its own"],
    );
    assert!(!two.join("two_series.nii.gz").exists(), "{e}");
    // The folder holding the series predicts it too, under the same name.
    let again = tmp.path().join("pred2");
    ok(&["predict", "--checkpoint", s(&best), "--input", s(&tmp.path().join("data")), "--out", s(&again)]);
    assert!(again.join("1.2.840.17.nii.gz").is_file());
}

proptest::proptest! {
    #![proptest_config(proptest::test_runner::Config { cases: 64, failure_persistence: None, ..Default::default() })]
    /// A slice with bytes overwritten or cut off is read or refused with an error naming the
    /// folder or the file, never a panic.
    #[test]
    fn damaged_slices_are_errors_not_panics(
        at in 0usize..1000,
        bytes in proptest::collection::vec(proptest::num::u8::ANY, 1..8),
        cut in proptest::option::of(0usize..1000),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        copy_dir(&fixtures().join("rle"), tmp.path());
        let f = tmp.path().join("IM0002");
        let mut b = std::fs::read(&f).unwrap();
        let at = at % b.len();
        let n = bytes.len().min(b.len() - at);
        b[at..at + n].copy_from_slice(&bytes[..n]);
        if let Some(c) = cut {
            b.truncate(c % b.len());
        }
        std::fs::write(&f, b).unwrap();
        if let Err(e) = volume::read(tmp.path()) {
            let e = format!("{e:#}");
            proptest::prop_assert!(e.contains(s(tmp.path())), "{}", e);
        }
    }
}
