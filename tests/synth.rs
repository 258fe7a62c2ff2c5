//! `unetpp synth nodules` on the real CTs of ../shared/data: reproducible for a seed, masks
//! inside the lungs of the volume they came from, sizes and densities in the stated ranges, and
//! a data set the crate's nnU-Net reader takes.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::{fails, fails_with, ok, s};

use serde_json::Value;
use unetpp::data::volume::{self, Geometry, Volume};
use unetpp::synth::{lung, nodules};

/// The project's shared data (`../shared/data` beside the checkout, or one level further up
/// from a worktree), if this checkout has it.
fn find_sources() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    [root.join("../shared/data"), root.join("../../shared/data")]
        .into_iter()
        .find(|p| p.join("lesions-pyradiomics").is_dir() && p.join("chest-ct-slicerio").is_dir())
}

fn sources() -> PathBuf {
    find_sources().expect("../shared/data (lesions-pyradiomics, chest-ct-slicerio) is needed by these tests")
}

/// These tests generate from the real CTs, which are not in the repository (the brief keeps
/// them out): a checkout without `../shared/data` says so loudly and skips them, as
/// tests/plan.rs does for its shared-data test.
fn have_sources() -> bool {
    let found = find_sources().is_some();
    if !found {
        eprintln!("SKIPPED: ../shared/data (lesions-pyradiomics, chest-ct-slicerio) is not beside this checkout");
    }
    found
}

/// Generates a small benchmark once per (name, seed) into a temporary folder kept for the run.
fn generated(cell: &'static OnceLock<(tempfile::TempDir, PathBuf)>, seed: &str) -> &'static Path {
    &cell
        .get_or_init(|| {
            let tmp = tempfile::tempdir().unwrap();
            let out = tmp.path().join("bench");
            let src = sources();
            let args = ["synth", "nodules", "--out", out.to_str().unwrap(), "--seed", seed, "--cases", "6"];
            let args = [&args[..], &["--test-cases", "3", "--sources", src.to_str().unwrap()]].concat();
            ok(&args);
            (tmp, out)
        })
        .1
}

static A: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
static B: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
static C: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();

fn files(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.strip_prefix(root).unwrap().to_path_buf(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

fn manifest(root: &Path) -> Vec<Value> {
    let v: Value = serde_json::from_slice(&std::fs::read(root.join("nodules.json")).unwrap()).unwrap();
    v["cases"].as_array().unwrap().clone()
}

/// A case's image and label, from its split's folders.
fn case(root: &Path, c: &Value) -> (Volume, Volume) {
    let name = c["case"].as_str().unwrap();
    let (dir, images, labels) = match c["split"].as_str().unwrap() {
        "train" => (root.to_path_buf(), "imagesTr", "labelsTr"),
        "test" => (root.to_path_buf(), "imagesTs", "labelsTs"),
        _ => (root.join("real"), "imagesTs", "labelsTs"),
    };
    let image = volume::read(&dir.join(images).join(format!("{name}_0000.nii.gz"))).unwrap();
    let label = volume::read(&dir.join(labels).join(format!("{name}.nii.gz"))).unwrap();
    assert_eq!((image.shape, label.shape), ([64; 3], [64; 3]), "{name}");
    assert_eq!(image.geometry, label.geometry, "{name}");
    (image, label)
}

#[test]
fn the_same_seed_gives_identical_files_and_another_seed_other_ones() {
    if !have_sources() {
        return;
    }
    let (a, b, c) = (files(generated(&A, "5")), files(generated(&B, "5")), files(generated(&C, "6")));
    // 6 + 6 training, 3 + 3 test, 1 + 1 real files, two dataset.json and nodules.json.
    assert_eq!(a.len(), 23, "{:?}", a.keys());
    assert!(a == b, "two runs with seed 5 differ");
    assert_eq!(a.keys().collect::<Vec<_>>(), c.keys().collect::<Vec<_>>());
    for (k, v) in &a {
        let name = k.to_string_lossy();
        if name.contains("real") {
            // The real nodule does not depend on the seed.
            assert_eq!(v, &c[k], "{name}");
        } else if name.ends_with(".nii.gz") {
            assert_ne!(v, &c[k], "{name} is the same for seeds 5 and 6");
        }
    }
}

/// The source volumes' lung masks (chest: its labels 5 and 6), in their own grids.
fn source_lungs() -> BTreeMap<&'static str, (Volume, Vec<bool>)> {
    let src = sources();
    let mut out = BTreeMap::new();
    let chest = volume::read(&src.join("chest-ct-slicerio/image.nii.gz")).unwrap();
    let labels = volume::read(&src.join("chest-ct-slicerio/labels.nii.gz")).unwrap();
    out.insert("chest", (chest, labels.data.iter().map(|&l| l == 5.0 || l == 6.0).collect()));
    for name in ["lung1", "lung2"] {
        let v = volume::read(&src.join(format!("lesions-pyradiomics/images/{name}.nii.gz"))).unwrap();
        let spacing = [v.geometry.spacing[2], v.geometry.spacing[1], v.geometry.spacing[0]];
        let m = lung::mask(&v.data, v.shape, spacing);
        out.insert(name, (v, m));
    }
    out
}

fn voxel_of(g: &Geometry, shape: [usize; 3], world: [f64; 3]) -> Option<usize> {
    let i = g.world_to_index(world).map(|v| v.round());
    let (x, y, z) = (i[0], i[1], i[2]);
    let inside = |v: f64, n: usize| v >= 0.0 && v < n as f64;
    (inside(x, shape[2]) && inside(y, shape[1]) && inside(z, shape[0]))
        .then(|| ((z as usize * shape[1]) + y as usize) * shape[2] + x as usize)
}

/// Every synthetic mask is non-empty and lies, voxel by voxel, within the lung mask of the
/// volume it came from (mapped through both files' world coordinates) dilated by the pleural
/// margin plus a voxel; its equivalent diameter is within 3-30 mm, agrees with the manifest
/// and is within 25% of the drawn one (clipping at the pleura and partial volume take some).
#[test]
fn masks_lie_in_the_lungs_with_the_stated_sizes() {
    if !have_sources() {
        return;
    }
    let root = generated(&A, "5");
    let lungs = source_lungs();
    let mut dilated = BTreeMap::new();
    for (name, (v, m)) in &lungs {
        let s = [v.geometry.spacing[2], v.geometry.spacing[1], v.geometry.spacing[0]];
        let margin = nodules::PLEURA_MM + s.iter().copied().fold(0.0, f64::max) / 2.0 + 0.5;
        dilated.insert(*name, lung::dilate(m, v.shape, s, margin));
    }
    for c in manifest(root).iter().filter(|c| c["split"] != "real") {
        let (_, label) = case(root, c);
        let name = c["case"].as_str().unwrap();
        let (src, _) = &lungs[c["volume"].as_str().unwrap()];
        let near = &dilated[c["volume"].as_str().unwrap()];
        let mut count = 0;
        for (i, _) in label.data.iter().enumerate().filter(|(_, l)| **l > 0.0) {
            count += 1;
            let idx = [(i % 64) as f64, (i / 64 % 64) as f64, (i / 4096) as f64];
            let v = voxel_of(&src.geometry, src.shape, label.geometry.index_to_world(idx));
            assert!(v.is_some_and(|v| near[v]), "{name}: mask voxel {idx:?} outside the lung");
        }
        assert!(count > 0, "{name}: empty mask");
        let e = label.geometry.spacing;
        let d = nodules::sphere_diameter(count as f64 * e[0] * e[1] * e[2]);
        assert!((3.0..=30.0).contains(&d), "{name}: {d} mm");
        assert!((d - c["mask_diameter_mm"].as_f64().unwrap()).abs() < 1e-6, "{name}: manifest disagrees");
        let drawn = c["nodule"]["diameter_mm"].as_f64().unwrap();
        assert!((d / drawn - 1.0).abs() < 0.25, "{name}: mask {d} mm, drawn {drawn} mm");
        assert!(e.iter().all(|s| (s - 1.0).abs() < 0.01), "{name}: spacing {e:?}");
    }
}

/// `--masses 1`: every synthetic case holds a solid mass of 32-50 mm drawn, whose mask (in
/// the lung, so clipped at the pleura) measures 25-52 mm, within 25% of the drawn size, and
/// lies whole inside its 64 mm window (no mask voxel on the window's faces).
#[test]
fn masses_are_large_solid_and_inside_their_windows() {
    if !have_sources() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("masses");
    let src = sources();
    let (seed, sizes) = (["--seed", "2"], ["--cases", "4", "--test-cases", "2"]);
    ok(&[&["synth", "nodules", "--out", s(&out)][..], &seed, &sizes, &["--masses", "1", "--sources", s(&src)]]
        .concat());
    let cases: Vec<Value> = manifest(&out).into_iter().filter(|c| c["split"] != "real").collect();
    assert_eq!(cases.len(), 6);
    for c in &cases {
        let name = c["case"].as_str().unwrap();
        assert_eq!(c["nodule"]["kind"], "mass", "{name}");
        assert_eq!(c["nodule"]["density"], "solid", "{name}");
        let drawn = c["nodule"]["diameter_mm"].as_f64().unwrap();
        assert!((32.0..=50.0).contains(&drawn), "{name}: drawn {drawn} mm");
        let (_, label) = case(&out, c);
        let e = label.geometry.spacing;
        let voxels: Vec<usize> = (0..label.data.len()).filter(|&i| label.data[i] > 0.0).collect();
        let d = nodules::sphere_diameter(voxels.len() as f64 * e[0] * e[1] * e[2]);
        assert!((25.0..=52.0).contains(&d) && (d / drawn - 1.0).abs() < 0.25, "{name}: mask {d} mm, drawn {drawn}");
        let on_face = |i: &usize| [i % 64, i / 64 % 64, i / 4096].iter().any(|&k| k == 0 || k == 63);
        assert!(!voxels.iter().any(on_face), "{name}: the mass is cut by its window");
    }
}

/// The attenuations drawn are in the stated ranges for each density, and the written image is
/// denser under each mask than the lung around it (median of the mask's voxels above the
/// median of the window's lung-like voxels).
#[test]
fn densities_are_in_the_stated_ranges() {
    if !have_sources() {
        return;
    }
    use unetpp::synth::shape::{GROUND_GLASS_HU, SOLID_HU};
    let root = generated(&A, "5");
    let quantile = unetpp::metrics::distance::quantile;
    for c in manifest(root).iter().filter(|c| c["split"] != "real") {
        let n = &c["nodule"];
        let (solid, glass) = (n["hu_solid"].as_f64().unwrap(), n["hu_glass"].as_f64().unwrap());
        assert!((SOLID_HU[0]..=SOLID_HU[1]).contains(&solid), "{c}");
        assert!((GROUND_GLASS_HU[0]..=GROUND_GLASS_HU[1]).contains(&glass), "{c}");
        assert!((-100.0..=100.0).contains(&solid) && (-750.0..=-300.0).contains(&glass));
        let (image, label) = case(root, c);
        let inside: Vec<f64> =
            (0..image.data.len()).filter(|&i| label.data[i] > 0.0).map(|i| image.data[i] as f64).collect();
        let lung: Vec<f64> = image.data.iter().map(|&v| v as f64).filter(|&v| (-1000.0..-600.0).contains(&v)).collect();
        let (m, l) = (quantile(&inside, 0.5), quantile(&lung, 0.5));
        assert!(m > l + 10.0, "{}: median {m} HU under the mask, lung {l} HU", c["case"]);
    }
}

/// dataset.json and both splits read with the crate's nnU-Net reader: one CT channel, labels
/// background and nodule, every training case paired with its label; the real nodule's data set
/// holds the held-out volume's nodule, whose volume is the source label's within 10%.
#[test]
fn the_data_set_reads_as_nnunet_and_the_real_nodule_keeps_its_volume() {
    if !have_sources() {
        return;
    }
    use unetpp::data::layout;
    let root = generated(&A, "5");
    let split = layout::split(&root.join("imagesTr")).unwrap().unwrap();
    assert_eq!(split.json.channels, ["CT"]);
    assert_eq!(split.json.labels, ["background", "nodule"]);
    assert_eq!(split.json.num_training, Some(6));
    assert_eq!(layout::pairs(&split, true).unwrap().len(), 6);
    let test = layout::split(&root.join("imagesTs")).unwrap().unwrap();
    assert_eq!(layout::pairs(&test, true).unwrap().len(), 3);
    let input = layout::defaults(root, false).unwrap().unwrap();
    assert_eq!(input.labels, ["background", "nodule"]);
    let real = layout::split(&root.join("real/imagesTs")).unwrap().unwrap();
    let pairs = layout::pairs(&real, true).unwrap();
    assert_eq!(pairs.len(), 1);
    assert_eq!(pairs[0].name, "real_lung1");
    // The source label: 837 voxels of 0.57 x 0.57 x 5 mm (pyradiomics' lung1).
    let src = volume::read(&sources().join("lesions-pyradiomics/labels/lung1.nii.gz")).unwrap();
    let s = src.geometry.spacing;
    let want = src.data.iter().filter(|&&v| v > 0.0).count() as f64 * s[0] * s[1] * s[2];
    let label = volume::read(pairs[0].mask.as_ref().unwrap()).unwrap();
    let e = label.geometry.spacing;
    let got = label.data.iter().filter(|&&v| v > 0.0).count() as f64 * e[0] * e[1] * e[2];
    assert!((got / want - 1.0).abs() < 0.1, "real nodule {got} mm3, source {want} mm3");
    // Its window lies where the source label is: the label's centroid maps into the window.
    let m = manifest(root);
    let real_case = m.iter().find(|c| c["split"] == "real").unwrap();
    let centre: Vec<f64> = real_case["centre_lps_mm"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    let idx = label.geometry.world_to_index([centre[0], centre[1], centre[2]]);
    assert!(idx.iter().all(|&v| (28.0..36.0).contains(&v)), "centroid at {idx:?} in the window");
}

/// The simple lung mask agrees with the chest CT's expert lung labels (Dice over 0.9).
#[test]
fn the_simple_lung_mask_matches_the_labelled_lungs() {
    if !have_sources() {
        return;
    }
    let lungs = source_lungs();
    let (chest, labels) = &lungs["chest"];
    let s = [chest.geometry.spacing[2], chest.geometry.spacing[1], chest.geometry.spacing[0]];
    let ours = lung::mask(&chest.data, chest.shape, s);
    let both = ours.iter().zip(labels).filter(|(a, b)| **a && **b).count() as f64;
    let sum = (ours.iter().filter(|&&a| a).count() + labels.iter().filter(|&&b| b).count()) as f64;
    let dice = 2.0 * both / sum;
    assert!(dice > 0.9, "Dice {dice} against labels 5 and 6");
}

/// Bad input: an --out that is not empty, missing sources, zero cases; each an error naming
/// the option, exit code 1, nothing written.
#[test]
fn bad_options_are_refused() {
    if !have_sources() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let full = tmp.path().join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("keep.txt"), b"mine").unwrap();
    let src = sources();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let base = ["synth", "nodules", "--sources", s(&src), "--out"];
    fails(&[&base[..], &[s(&full)]].concat(), &["--out", "is not empty"]);
    assert_eq!(std::fs::read(full.join("keep.txt")).unwrap(), b"mine");
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    fails(&["synth", "nodules", "--sources", s(&empty), "--out", s(&a)], &["not found", "--sources"]);
    let inside = src.join("lesions-pyradiomics/synth-test-out");
    fails(&[&base[..], &[s(&inside)]].concat(), &["lies inside --sources"]);
    assert!(!inside.exists());
    fails(&[&base[..], &[s(&b), "--cases", "0"]].concat(), &["--cases"]);
    fails(&[&base[..], &[s(&b), "--masses", "1.5"]].concat(), &["--masses 1.5", "between 0 and 1"]);
    fails(&[&base[..], &[s(&b), "--masses", "NaN"]].concat(), &["--masses"]);
    fails_with(&[&base[..], &[s(&b), "--holdout", "lung3"]].concat(), 2, &["--holdout must be one of lung1, lung2"]);
    assert!(!a.exists() && !b.exists());
}
