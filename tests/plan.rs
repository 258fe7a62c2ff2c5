//! `unetpp plan` on data made here (anisotropic NIfTI volumes, 2D PNGs), on the bundled nnU-Net
//! data set and on the shared lesions, and `train` following the plan it finds.

mod common;

use std::path::{Path, PathBuf};

use common::{Tiny, fails, ok_text as ok, s, train_args};
use unetpp::data::intensity::ChannelNorm;
use unetpp::plan::{Fingerprint, Plan};

fn read_plan(dir: &Path) -> (Plan, Fingerprint) {
    let plan = Plan::read(&dir.join("plan.toml")).unwrap();
    let fp = serde_json::from_str(&std::fs::read_to_string(dir.join("fingerprint.json")).unwrap()).unwrap();
    (plan, fp)
}

/// A NIfTI volume `[z, y, x]` with voxel spacing `sp` (mm, x, y, z), through the crate's writer.
fn write_volume<T: nifti::DataElement + bytemuck::Pod>(path: &Path, v: &[T], shape: [usize; 3], sp: [f64; 3]) {
    let h = nifti::NiftiHeader {
        pixdim: [1.0, sp[0] as f32, sp[1] as f32, sp[2] as f32, 1.0, 1.0, 1.0, 1.0],
        sform_code: 1,
        srow_x: [sp[0] as f32, 0.0, 0.0, 0.0],
        srow_y: [0.0, sp[1] as f32, 0.0, 0.0],
        srow_z: [0.0, 0.0, sp[2] as f32, 0.0],
        ..Default::default()
    };
    unetpp::data::io::write_nifti_header(path, v, shape, h).unwrap();
}

/// Cases of 48x48 pixels of 0.6-0.8 mm in-plane and 8 slices of 4-6 mm, each with a lesion of
/// 4x6x6 = 144 voxels whose intensities are 100 + (i mod 5).
const SPACINGS: [[f64; 3]; 3] = [[0.6, 0.6, 4.0], [0.7, 0.7, 5.0], [0.8, 0.8, 6.0]];
const LESION: usize = 144;

fn anisotropic_volumes(d: &Path) {
    std::fs::create_dir_all(d.join("images")).unwrap();
    std::fs::create_dir_all(d.join("labels")).unwrap();
    let shape = [8, 48, 48];
    for (k, sp) in SPACINGS.iter().enumerate() {
        let n = shape.iter().product::<usize>();
        let mut image: Vec<f32> = (0..n).map(|i| (i % 13) as f32).collect();
        let mut label = vec![0u8; n];
        let mut fg = 0;
        for z in 2..6 {
            for y in 10..16 {
                for x in 20..26 {
                    let i = (z * 48 + y) * 48 + x;
                    (image[i], label[i], fg) = (100.0 + (fg % 5) as f32, 1, fg + 1);
                }
            }
        }
        write_volume(&d.join(format!("images/case{k}.nii.gz")), &image, shape, *sp);
        write_volume(&d.join(format!("labels/case{k}.nii.gz")), &label, shape, *sp);
    }
}

const FAST: &[&str] = &["--width", "4", "--budget", "20s"];

#[test]
fn anisotropic_volumes_get_nnunets_spacing_and_pooling() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("data");
    anisotropic_volumes(&d);
    let out = ok(&[&["plan", "--data", s(&d)], FAST].concat());
    assert!(out.contains("patch") && out.contains("pooling rule (nnU-Net)") && out.contains("3 cases"), "{out}");
    let (plan, fp) = read_plan(&d.join("unetpp_plan"));
    // In-plane: the median of 0.6, 0.7, 0.8. z is over 3x coarser with 6x fewer voxels: the 10th
    // percentile of 4, 5, 6 (np.percentile: 4.2), not the median 5.
    let sp = plan.spacing.unwrap().0;
    assert!((sp[0] - 0.7).abs() < 1e-6 && (sp[1] - 0.7).abs() < 1e-6 && (sp[2] - 4.2).abs() < 1e-6, "{sp:?}");
    assert!(plan.notes.iter().any(|n| n.contains("10th percentile")), "{:?}", plan.notes);
    // z (4.2 mm) is not pooled while the in-plane spacing is under half of it (0.7, 1.4 mm).
    assert_eq!(plan.pool_rule, vec![[1, 2, 2], [1, 2, 2], [2, 2, 2]]);
    // The patch is the median resampled shape (8 x 5 / 4.2 = 9.5 slices, 48 x 48), a multiple of
    // what the model pools; the fallback to isotropic pooling, where it happens, says so.
    let div = |pool: &[[usize; 3]]| -> [usize; 3] { std::array::from_fn(|a| pool.iter().map(|p| p[a]).product()) };
    let pool = if plan.pool.is_empty() { vec![[2; 3]; plan.depth] } else { plan.pool.clone() };
    assert!((0..3).all(|a| plan.patch[a].is_multiple_of(div(&pool)[a])), "{plan:?}");
    assert_eq!(plan.patch[1..], [48, 48]);
    if plan.pool != plan.pool_rule {
        assert!(plan.notes.iter().any(|n| n.contains("pools 2 on every axis only")), "{:?}", plan.notes);
        assert_eq!((plan.patch[0], plan.depth), (16, 3));
    } else {
        assert_eq!(plan.patch[0], 10);
    }
    assert!(plan.batch_size >= 2 && plan.step_bytes <= plan.memory_budget_bytes, "{plan:?}");
    assert_eq!((plan.dims, plan.channels, plan.classes, plan.width), (3, 1, 1, 4));
    assert_eq!(plan.normalize, unetpp::data::Normalize::ZScore);
    // The fingerprint: shapes, spacings, label counts and the lesion's intensities by hand
    // (100..104, each 144/5 times: mean 101.986..., as computed below).
    assert_eq!(fp.cases.len(), 3);
    for (c, sp) in fp.cases.iter().zip(SPACINGS) {
        assert_eq!(c.shape_zyx, [8, 48, 48]);
        let got = c.spacing_xyz.unwrap();
        assert!((0..3).all(|a| (got[a] - sp[a]).abs() < 1e-6), "{got:?}");
        assert_eq!(c.label_voxels.get(&1), Some(&(LESION as u64)));
        assert_eq!(c.label_voxels.get(&0), Some(&((8 * 48 * 48 - LESION) as u64)));
    }
    let lesion: Vec<f64> = (0..LESION).map(|i| 100.0 + (i % 5) as f64).collect();
    let mean = lesion.iter().sum::<f64>() / LESION as f64;
    let std = (lesion.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / LESION as f64).sqrt();
    let st = fp.foreground[0].as_ref().unwrap();
    assert_eq!(st.foreground_voxels, 3 * LESION as u64);
    assert!((st.mean - mean).abs() < 1e-9 && (st.std - std).abs() < 1e-9, "{st:?}");
    assert_eq!((st.percentile_00_5, st.percentile_99_5), (100.0, 104.0));
}

#[test]
fn the_memory_and_time_budgets_shape_the_plan() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("data");
    anisotropic_volumes(&d);
    let plan_with = |extra: &[&str], out: &str| {
        let out = tmp.path().join(out);
        ok(&[&["plan", "--data", s(&d), "--width", "4", "--out", s(&out)], extra].concat());
        read_plan(&out).0
    };
    let roomy = plan_with(&["--budget", "20s", "--memory", "4GiB"], "roomy");
    let tight = plan_with(&["--budget", "20s", "--memory", "30MiB"], "tight");
    let voxels = |p: &Plan| p.patch.iter().product::<usize>();
    assert!(voxels(&tight) < voxels(&roomy), "{:?} vs {:?}", tight.patch, roomy.patch);
    assert!(tight.step_bytes <= tight.memory_budget_bytes && tight.memory_budget_bytes < 30.0 * 1048576.0, "{tight:?}");
    // The steps fill the budget at the measured step time (with a tenth kept for validation).
    let long = plan_with(&["--budget", "2min", "--memory", "4GiB"], "long");
    for p in [&roomy, &long] {
        let steps = (p.steps_per_epoch * p.epochs) as f64;
        let want = (0.9 * p.budget_seconds / p.step_seconds).floor();
        assert!(p.step_seconds > 0.0 && steps <= want && steps > want - p.steps_per_epoch as f64, "{p:?}");
    }
    assert_eq!((roomy.budget_seconds, long.budget_seconds), (20.0, 120.0));
    assert!(long.steps_per_epoch * long.epochs > roomy.steps_per_epoch * roomy.epochs);
    assert!(unetpp::plan::parse_memory("lots").unwrap_err().contains("--memory `lots`"));
    assert!(unetpp::plan::parse_budget("soon").unwrap_err().contains("--budget `soon`"));
    assert_eq!(unetpp::plan::parse_memory("2GiB"), Ok(2 << 30));
    assert_eq!(unetpp::plan::parse_budget("1h 30m").unwrap().as_secs(), 5400);
    fails(&["plan", "--data", s(&d), "--width", "4", "--memory", "1MiB"], &["memory budget"]);
    fails(&["plan", "--data", s(&d), "--dims", "2"], &["--dims 2", "volumes"]);
    let inside = d.join("labels/plan");
    fails(&["plan", "--data", s(&d), "--out", s(&inside)], &["inside the data set's folder"]);
    assert!(!inside.exists());
}

#[test]
fn an_nnunet_data_set_gets_its_channels_labels_and_ct_window() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/nnunet/Dataset990_Tiny");
    let tmp = tempfile::tempdir().unwrap();
    ok(&[&["plan", "--data", s(&root), "--out", s(tmp.path())], FAST].concat());
    let (plan, fp) = read_plan(tmp.path());
    assert_eq!((plan.dims, plan.channels, plan.classes), (3, 2, 3));
    assert_eq!(fp.channel_names, ["CT", "smoothed"]);
    assert_eq!(fp.label_names, ["background", "lung", "spine"]);
    // The CT window is the one training computes without a plan; the other channel is z-scored.
    let trained = unetpp::data::layout::defaults(&root, false).unwrap().unwrap();
    assert_eq!(plan.channel_norms, trained.norms);
    assert!(matches!(plan.channel_norms[0], ChannelNorm::Ct { .. }) && plan.channel_norms[1] == ChannelNorm::ZScore);
    // 16^3 voxels of 3.05 x 3.05 x 10 mm: z is 3.3x coarser but has as many voxels, so the median stays.
    let sp = plan.spacing.unwrap().0;
    assert!((sp[2] - 10.0).abs() < 1e-4 && (sp[0] - fp.cases[0].spacing_xyz.unwrap()[0]).abs() < 1e-6, "{sp:?}");
    assert_eq!(plan.pool_rule[0], [1, 2, 2]);
    let total: u64 = fp.cases.iter().map(|c| c.label_voxels.values().sum::<u64>()).sum();
    assert_eq!(total, 4 * 16 * 16 * 16);
}

#[test]
fn images_get_a_2d_plan_without_spacing() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("data");
    for sub in ["images", "masks"] {
        std::fs::create_dir_all(d.join(sub)).unwrap();
    }
    for (k, (h, w)) in [(40, 56), (48, 64), (64, 80)].into_iter().enumerate() {
        let img = image::GrayImage::from_fn(w, h, |x, y| image::Luma([((x * 7 + y * 3) % 256) as u8]));
        let mask = image::GrayImage::from_fn(w, h, |x, y| image::Luma([if x < 10 && y < 10 { 255 } else { 0 }]));
        img.save(d.join(format!("images/im{k}.png"))).unwrap();
        mask.save(d.join(format!("masks/im{k}.png"))).unwrap();
    }
    ok(&[&["plan", "--data", s(&d)], FAST].concat());
    let (plan, fp) = read_plan(&d.join("unetpp_plan"));
    assert_eq!((plan.dims, plan.spacing, plan.classes), (2, None, 1));
    // The median image (48 x 64), a multiple of the pooling's 8 x 8.
    // Pooled three times: at 6 x 8 only x could be pooled, and a lone axis needs 12 pixels.
    assert_eq!((plan.median_shape, plan.patch, plan.depth), ([1.0, 48.0, 64.0], [1, 48, 64], 3));
    assert!(plan.pool.is_empty() && plan.channel_norms.is_empty());
    assert_eq!(plan.normalize, unetpp::data::Normalize::Percentile { low: 0.5, high: 99.5 });
    assert_eq!(fp.cases[0].label_voxels.get(&255), Some(&100));
    assert!(fp.cases.iter().all(|c| c.spacing_xyz.is_none()));
}

#[test]
fn train_follows_the_plan_records_it_and_lets_flags_win() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("data");
    anisotropic_volumes(&d);
    ok(&["plan", "--data", s(&d), "--width", "4", "--budget", "2s"]);
    let (plan, _) = read_plan(&d.join("unetpp_plan"));
    // No flag but the data and the run: everything comes from the plan beside the data.
    let run = tmp.path().join("run");
    let out = ok(&["train", "--data", s(&d), "--out", s(&run)]);
    assert!(out.contains("following the plan"), "{out}");
    let cfg = unetpp::train::TrainConfig::read(&run.join("config.toml")).unwrap();
    assert_eq!(cfg.plan.as_ref(), Some(&plan), "the run records its plan");
    assert_eq!((cfg.patch, cfg.batch_size), (plan.patch, plan.batch_size));
    assert_eq!((cfg.epochs, cfg.steps_per_epoch), (plan.epochs, plan.steps_per_epoch));
    assert_eq!((cfg.model.depth, cfg.model.width, &cfg.model.pool), (plan.depth, 4, &plan.pool));
    assert_eq!(cfg.input.spacing, plan.spacing);
    // Explicit flags win over the plan, item by item.
    let run2 = tmp.path().join("run2");
    let flags = ["--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "3", "--spacing", "1,1,4"];
    ok(&[&["train", "--data", s(&d), "--out", s(&run2)], &flags[..]].concat());
    let cfg = unetpp::train::TrainConfig::read(&run2.join("config.toml")).unwrap();
    assert_eq!((cfg.epochs, cfg.steps_per_epoch, cfg.batch_size), (1, 1, 3));
    assert_eq!(cfg.input.spacing.unwrap().0, [1.0, 1.0, 4.0]);
    assert_eq!((cfg.patch, cfg.model.depth), (plan.patch, plan.depth));
    // Without a plan and a recipe, 3D data gets one made first, recorded in the run (not written
    // into the data folder); --budget divides its steps.
    let other = tmp.path().join("other");
    anisotropic_volumes(&other);
    let run3 = tmp.path().join("run3");
    let out = ok(&["train", "--data", s(&other), "--out", s(&run3), "--width", "4", "--budget", "2s"]);
    assert!(out.contains("making one") && out.contains("pooling rule (nnU-Net)"), "{out}");
    assert!(!other.join("unetpp_plan").exists());
    let cfg = unetpp::train::TrainConfig::read(&run3.join("config.toml")).unwrap();
    let made = cfg.plan.expect("the run records the plan it made");
    assert_eq!((made.patch, made.budget_seconds, cfg.epochs), (plan.patch, 2.0, made.epochs));
    // A recipe flag (here --epochs) and no plan: today's recipe, no plan made.
    let run4 = tmp.path().join("run4");
    ok(&train_args(&other, &run4, Tiny { batch: "2", ..Tiny::D3 }, &[]));
    let cfg = unetpp::train::TrainConfig::read(&run4.join("config.toml")).unwrap();
    assert!(cfg.plan.is_none() && cfg.input.spacing.is_none());
    // --budget with an existing plan re-divides its measured steps.
    let run5 = tmp.path().join("run5");
    ok(&["train", "--data", s(&d), "--out", s(&run5), "--budget", "1s", "--epochs", "1"]);
    let cfg = unetpp::train::TrainConfig::read(&run5.join("config.toml")).unwrap();
    let p5 = cfg.plan.unwrap();
    assert_eq!((p5.budget_seconds, p5.step_seconds, cfg.epochs), (1.0, plan.step_seconds, 1));
    assert_eq!(cfg.steps_per_epoch, p5.steps_per_epoch);
    // --plan names another plan; a missing one is an error naming it.
    let missing = tmp.path().join("nope.toml");
    fails(&["train", "--data", s(&d), "--out", s(&tmp.path().join("run6")), "--plan", s(&missing)], &["nope.toml"]);
}

#[test]
fn the_shared_lesions_plan() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/lesions-pyradiomics");
    let root: PathBuf = if root.is_dir() { root } else { PathBuf::from("/work/shared/data/lesions-pyradiomics") };
    if !root.is_dir() {
        eprintln!("skipped: {} is absent (the shared data is not on this machine)", root.display());
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // A small memory budget keeps the measured step short.
    let args = ["--width", "4", "--budget", "1h", "--memory", "512MiB"];
    ok(&[&["plan", "--data", s(&root), "--out", s(tmp.path())], &args[..]].concat());
    let (plan, fp) = read_plan(tmp.path());
    let names: Vec<&str> = fp.cases.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["brain1", "brain2", "lung1", "lung2"]);
    // The data's README: lesions of 837 (lung1) and 24,644 (lung2) voxels.
    assert_eq!(fp.cases[2].label_voxels.get(&1), Some(&837));
    assert_eq!(fp.cases[3].label_voxels.get(&1), Some(&24644));
    // In-plane: the median of the four cases' spacings; z (5-6.5 mm, 23-61 slices of 256-512):
    // the 10th percentile of 5, 5, 6.5, 6.5 = 5.
    let median = |a: usize| {
        let mut v: Vec<f64> = fp.cases.iter().map(|c| c.spacing_xyz.unwrap()[a]).collect();
        v.sort_by(f64::total_cmp);
        (v[1] + v[2]) / 2.0
    };
    let sp = plan.spacing.unwrap().0;
    assert!((sp[0] - median(0)).abs() < 1e-9 && (sp[1] - median(1)).abs() < 1e-9, "{sp:?}");
    assert!((sp[2] - 5.0).abs() < 1e-6, "{sp:?}");
    assert_eq!(plan.pool_rule[..2], [[1, 2, 2], [1, 2, 2]]);
    assert_eq!(plan.normalize, unetpp::data::Normalize::ZScore);
}
