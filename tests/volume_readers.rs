//! The 3D readers against files written by reference tools (SimpleITK, pynrrd, nibabel; see
//! scripts/volume_fixtures.py): every fixture's voxels must match SimpleITK's exactly and its
//! spacing, origin, direction and world points to 1e-5.

use std::path::{Path, PathBuf};

use serde_json::Value;
use unetpp::data::volume::{self, Volume};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/volumes")
}

fn read(name: &str) -> Volume {
    let p = dir().join(name);
    let n = name.to_lowercase();
    let r = if n.ends_with(".nrrd") || n.ends_with(".nhdr") {
        volume::nrrd::read(&p)
    } else if n.ends_with(".mha") || n.ends_with(".mhd") {
        volume::metaimage::read(&p)
    } else {
        volume::nifti::read(&p)
    };
    r.unwrap_or_else(|e| panic!("{name}: {e:#}"))
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

fn close(name: &str, what: &str, got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{name} {what}");
    for (a, b) in got.iter().zip(want) {
        assert!((a - b).abs() <= 1e-5, "{name} {what}: got {got:?}, SimpleITK {want:?}");
    }
}

/// Reads `name`, compares with its JSON reference and returns the volume.
fn check(name: &str) -> Volume {
    let text = std::fs::read_to_string(dir().join(format!("{name}.json"))).unwrap();
    let r: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(r["file"], name);
    let v = read(name);
    let size = f64s(&r["size_xyz"]);
    assert_eq!(v.shape, [size[2] as usize, size[1] as usize, size[0] as usize], "{name} shape");
    assert_eq!(v.channels as u64, r["channels"].as_u64().unwrap(), "{name} channels");
    let want: Vec<f32> = f64s(&r["voxels"]).iter().map(|&x| x as f32).collect();
    assert_eq!(v.data.len(), want.len(), "{name} voxel count");
    if let Some(i) = (0..want.len()).find(|&i| v.data[i] != want[i]) {
        panic!("{name}: voxel {i} is {} where SimpleITK reads {}", v.data[i], want[i]);
    }
    let g = v.geometry;
    close(name, "spacing", &g.spacing, &f64s(&r["spacing"]));
    close(name, "origin", &g.origin, &f64s(&r["origin"]));
    close(name, "direction", &g.direction.concat(), &f64s(&r["direction"]));
    for pt in r["points"].as_array().unwrap() {
        let idx = f64s(&pt["index"]);
        let idx = [idx[0], idx[1], idx[2]];
        let world = g.index_to_world(idx);
        close(name, &format!("world of {idx:?}"), &world, &f64s(&pt["world"]));
        close(name, &format!("index of {world:?}"), &g.world_to_index(world), &idx);
    }
    v
}

#[test]
fn nrrd_raw_gzip_and_detached_match_simpleitk() {
    let a = check("ct_raw.nrrd");
    assert_eq!(a, check("ct_gzip.nrrd"));
    assert_eq!(a, check("ct_detached.nhdr"));
    // A real CT crop: signed Hounsfield units, not a constant.
    assert!(a.data.iter().any(|&x| x < -500.0) && a.data.iter().any(|&x| x > 0.0), "{:?}", &a.data[..12]);
}

#[test]
fn metaimage_raw_zlib_and_detached_match_simpleitk_and_nrrd() {
    let a = check("ct_raw.mha");
    assert_eq!(a, check("ct_zlib.mha"));
    assert_eq!(a, check("ct_detached.mhd"));
    assert_eq!(a, read("ct_raw.nrrd"));
}

#[test]
fn oblique_flipped_geometry_matches_in_every_format() {
    for name in ["oblique.nrrd", "oblique.mha", "oblique.nii.gz"] {
        let v = check(name);
        let d = v.geometry.direction;
        let det = d[0][0] * (d[1][1] * d[2][2] - d[1][2] * d[2][1]) - d[0][1] * (d[1][0] * d[2][2] - d[1][2] * d[2][0])
            + d[0][2] * (d[1][0] * d[2][1] - d[1][1] * d[2][0]);
        assert!((det + 1.0).abs() < 1e-5, "{name}: a flipped axis gives determinant -1, got {det}");
    }
}

#[test]
fn multi_channel_volumes_read_channels_first() {
    for name in ["vector.nrrd", "vector.mha", "list2.nrrd"] {
        let v = check(name);
        assert!(v.channels > 1, "{name}");
    }
    // vector.*: channel 1 is minus channel 0.
    let v = read("vector.nrrd");
    let n = v.data.len() / 3;
    assert!((0..n).all(|i| v.data[n + i] == -v.data[i]) && v.data[..n].iter().any(|&x| x != 0.0));
}

#[test]
fn uint16_labels_above_255_and_big_endian_data_are_exact() {
    for name in ["labels_u16.nrrd", "labels_u16.mha"] {
        let v = check(name);
        assert!(v.data.contains(&300.0) && v.data.contains(&65535.0), "{name}");
    }
    // pynrrd: RAS space, big-endian, gzip in a detached file; a hand-written big-endian .mhd.
    check("ras_big.nhdr");
    check("big_endian.mhd");
}

#[test]
fn nifti_geometry_follows_itk_for_sform_qform_both_neither_and_flips() {
    for name in [
        "nii_sform.nii",
        "nii_qform.nii",
        "nii_both.nii",
        "nii_both_scanner.nii",
        "nii_shear.nii",
        "nii_pixdim.nii",
        "nii_flip.nii.gz",
    ] {
        check(name);
    }
    // The two "both" files differ only in sform_code, and ITK reads them differently.
    assert_ne!(read("nii_both.nii").geometry.origin, read("nii_both_scanner.nii").geometry.origin);
    let e = format!("{:#}", volume::nifti::read(&dir().join("nii_shear_only.nii")).unwrap_err());
    assert!(e.contains("nii_shear_only.nii") && e.contains("srow_x") && e.contains("sheared"), "{e}");
}

#[test]
fn truncated_fixtures_are_errors_naming_the_file() {
    let t = tempfile::tempdir().unwrap();
    for (name, cut) in
        [("ct_raw.nrrd", 100), ("ct_gzip.nrrd", 100), ("ct_raw.mha", 100), ("ct_zlib.mha", 100), ("nii_sform.nii", 10)]
    {
        let bytes = std::fs::read(dir().join(name)).unwrap();
        let p = t.path().join(name);
        std::fs::write(&p, &bytes[..bytes.len() - cut]).unwrap();
        let r = if name.ends_with(".nrrd") {
            volume::nrrd::read(&p)
        } else if name.ends_with(".mha") {
            volume::metaimage::read(&p)
        } else {
            volume::nifti::read(&p)
        };
        let e = format!("{:#}", r.unwrap_err());
        assert!(e.contains(name), "{name}: {e}");
    }
    // A detached header whose data file is shorter than declared.
    std::fs::copy(dir().join("ct_detached.mhd"), t.path().join("ct_detached.mhd")).unwrap();
    std::fs::write(t.path().join("ct_detached.raw"), [0u8; 100]).unwrap();
    let e = format!("{:#}", volume::metaimage::read(&t.path().join("ct_detached.mhd")).unwrap_err());
    assert!(e.contains("ct_detached.raw") && e.contains("declares 1440 bytes") && e.contains("holds 100"), "{e}");
}
