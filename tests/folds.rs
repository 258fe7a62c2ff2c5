//! k-fold cross-validation end to end on six small images made here (four in train/, two in
//! val/, which a cross-validation pools): the saved split, folds trained in turn, one at a time
//! and after a kill, and `cross-validate`'s predictions, scores and post-processing decision.

use std::collections::BTreeSet;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::{Tiny, fails, ok_both, s, stderr, unetpp_cut};
use serde_json::Value;

mod common;

const CASES: [&str; 6] = ["c0", "c1", "c2", "c3", "c4", "c5"];

/// Six 64x64 grey images, each with a bright disk (its mask) on a ramp: c0..c3 in train/,
/// c4 and c5 in val/.
fn make_data(root: &Path) -> PathBuf {
    for (i, name) in CASES.iter().enumerate() {
        let split = if i < 4 { "train" } else { "val" };
        for sub in ["images", "masks"] {
            std::fs::create_dir_all(root.join(split).join(sub)).unwrap();
        }
        let (cy, cx, r) = (20.0 + 4.0 * i as f64, 44.0 - 3.0 * i as f64, 8.0 + i as f64);
        let mut image = vec![0u8; 64 * 64];
        let mut mask = vec![0u8; 64 * 64];
        for y in 0..64 {
            for x in 0..64 {
                let inside = (y as f64 - cy).powi(2) + (x as f64 - cx).powi(2) <= r * r;
                image[y * 64 + x] = if inside { 200 } else { (x + y) as u8 / 2 };
                mask[y * 64 + x] = if inside { 255 } else { 0 };
            }
        }
        let file = format!("{name}.png");
        unetpp::data::io::write_png(&root.join(split).join("images").join(&file), &image, [1, 64, 64]).unwrap();
        unetpp::data::io::write_png(&root.join(split).join("masks").join(&file), &mask, [1, 64, 64]).unwrap();
    }
    root.to_path_buf()
}

/// 3-fold training with [`Tiny::D2`], then `extra`.
fn train_args<'a>(data: &'a Path, out: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = common::train_args(data, out, Tiny::D2, &["--folds", "3"]);
    a.extend_from_slice(extra);
    a
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn json(p: &Path) -> Value {
    serde_json::from_str(&read(p)).unwrap()
}

fn names(v: &Value) -> Vec<String> {
    v.as_array().unwrap().iter().map(|n| n.as_str().unwrap().to_string()).collect()
}

/// metrics.csv without its wall-time column.
fn metrics(run: &Path) -> String {
    read(&run.join("metrics.csv")).lines().map(|l| l.rsplit_once(',').unwrap().0.to_string() + "\n").collect()
}

struct Reference {
    data: PathBuf,
    run: PathBuf,
    cv_stdout: String,
    _dir: tempfile::TempDir,
}

/// One data set and one whole 3-fold run, cross-validated, shared by the tests of this file.
fn reference() -> &'static Reference {
    static R: OnceLock<Reference> = OnceLock::new();
    R.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let data = make_data(&dir.path().join("data"));
        let run = dir.path().join("run");
        ok_both(&train_args(&data, &run, &[]));
        // Again: every fold is finished, nothing is trained or rewritten.
        let splits = read(&run.join("splits.json"));
        let (_, again) = ok_both(&train_args(&data, &run, &[]));
        assert_eq!(again.matches("finished already").count(), 3, "{again}");
        assert_eq!(read(&run.join("splits.json")), splits);
        // Another configuration into the same folder is refused before anything is written.
        fails(&train_args(&data, &run, &["--lr", "1e-3"]), &["another configuration", "lr"]);
        let (cv_stdout, _) = ok_both(&["cross-validate", "--run", s(&run)]);
        Reference { data, run, cv_stdout, _dir: dir }
    })
}

#[test]
fn the_split_is_seeded_disjoint_covering_and_each_fold_trains_on_its_own() {
    let r = reference();
    let splits = json(&r.run.join("splits.json"));
    let folds = splits.as_array().unwrap();
    assert_eq!(folds.len(), 3);
    let mut validated = vec![];
    for (i, f) in folds.iter().enumerate() {
        let (train, val) = (names(&f["train"]), names(&f["val"]));
        assert_eq!(val.len(), 2, "6 cases in 3 folds");
        let both: BTreeSet<&String> = train.iter().chain(&val).collect();
        assert_eq!(both.len(), 6, "fold {i}: train and val are disjoint and cover every case");
        validated.extend(val.clone());
        // The fold's own run directory trains on exactly those cases.
        let cfg: toml::Table = toml::from_str(&read(&r.run.join(format!("fold_{i}/config.toml")))).unwrap();
        let fold = &cfg["fold"];
        assert_eq!(fold["index"].as_integer(), Some(i as i64));
        let list = |k: &str| fold[k].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
        assert_eq!((list("train"), list("val")), (train, val));
        let state = json(&r.run.join(format!("fold_{i}/state.json")));
        assert_eq!(state["epoch"].as_u64(), Some(2));
        assert!(r.run.join(format!("fold_{i}/checkpoints/best.unetpp")).is_file());
    }
    validated.sort();
    assert_eq!(validated, CASES, "every case, train/ and val/ pooled, is validated exactly once");
    // The split is nnU-Net's kind: fixed by its own seed, not by the training seed.
    let tmp = tempfile::tempdir().unwrap();
    let other = tmp.path().join("other");
    ok_both(&train_args(&r.data, &other, &["--fold", "2", "--seed", "7"]));
    assert_eq!(read(&other.join("splits.json")), read(&r.run.join("splits.json")));
}

#[test]
fn one_fold_alone_trains_only_that_fold() {
    let r = reference();
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    ok_both(&train_args(&r.data, &run, &["--fold", "1"]));
    let entries: BTreeSet<String> =
        std::fs::read_dir(&run).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(entries, BTreeSet::from(["fold_1", "folds.toml", "splits.json"].map(String::from)));
    assert_eq!(metrics(&run.join("fold_1")), metrics(&r.run.join("fold_1")), "the same fold trains the same");
    fails(&["cross-validate", "--run", s(&run)], &["fold 0", "--fold 0"]);
    fails(&train_args(&r.data, &run, &["--fold", "3"]), &["--fold 3", "0 to 2"]);
    fails(
        &["train", "--data", s(&r.data), "--out", s(&tmp.path().join("x")), "--fold", "1"],
        &["--fold needs --folds"],
    );
    let y = tmp.path().join("y");
    fails(&["train", "--data", s(&r.data), "--out", s(&y), "--folds", "7"], &["--folds 7", "6 training case"]);
    assert!(!y.exists(), "nothing written");
}

#[test]
fn a_fold_killed_mid_run_resumes_exactly_and_finished_folds_are_skipped() {
    let r = reference();
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    // Epochs end in turn: fold 0's two, then fold 1's; the 4th is fold 1's second, killed
    // after training, before its commit.
    let first = unetpp_cut(&train_args(&r.data, &run, &[]), "epoch.trained:4");
    assert_eq!(first.status.signal(), Some(9), "expected the failpoint's SIGKILL:\n{}", stderr(&first));
    assert_eq!(json(&run.join("fold_0/state.json"))["epoch"].as_u64(), Some(2));
    assert_eq!(json(&run.join("fold_1/state.json"))["epoch"].as_u64(), Some(1));
    assert!(!run.join("fold_2").exists());
    let (_, err) = ok_both(&["train", "--resume", s(&run)]);
    assert!(err.contains("fold 0: finished already") && err.contains("resuming"), "{err}");
    assert_eq!(read(&run.join("splits.json")), read(&r.run.join("splits.json")));
    for i in 0..3 {
        let (got, want) = (run.join(format!("fold_{i}")), r.run.join(format!("fold_{i}")));
        assert_eq!(metrics(&got), metrics(&want), "fold {i}");
        let optim = |d: &Path| std::fs::read(d.join("checkpoints/last.optim")).unwrap();
        assert!(optim(&got) == optim(&want), "fold {i}: optimiser state differs from the uninterrupted run's");
    }
}

#[test]
fn cross_validation_predicts_each_case_once_with_the_model_that_did_not_see_it() {
    let r = reference();
    assert!(r.cv_stdout.contains("3 folds, 6 cases"), "{}", r.cv_stdout);
    let cv = r.run.join("crossval");
    let summary = json(&cv.join("summary.json"));
    let splits = json(&r.run.join("splits.json"));
    let images = summary["images"].as_array().unwrap();
    let seen: BTreeSet<&str> = images.iter().map(|i| i["name"].as_str().unwrap()).collect();
    assert_eq!((images.len(), seen), (6, BTreeSet::from(CASES)));
    for image in images {
        let (name, fold) = (image["name"].as_str().unwrap(), image["fold"].as_u64().unwrap() as usize);
        assert!(names(&splits[fold]["val"]).iter().any(|n| n == name), "{name} is fold {fold}'s");
        let cfg: toml::Table = toml::from_str(&read(&r.run.join(format!("fold_{fold}/config.toml")))).unwrap();
        let trained: Vec<&str> = cfg["fold"]["train"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        assert!(!trained.contains(&name), "{name} was predicted by a model trained on it");
        let ck = r.run.join(format!("fold_{fold}/checkpoints/best.unetpp"));
        assert_eq!(summary["folds"][fold]["checkpoint"].as_str(), Some(s(&ck)));
        assert!(cv.join(format!("predictions/{name}.png")).is_file());
    }
    let dice: Vec<f64> = images.iter().map(|i| i["dice"].as_f64().unwrap()).collect();
    let mean = dice.iter().sum::<f64>() / 6.0;
    assert!((summary["summary"]["mean_dice"].as_f64().unwrap() - mean).abs() < 1e-12);
    assert_eq!(read(&cv.join("scores.csv")).lines().count(), 7);
    // The prediction of a case is its fold's checkpoint's: `predict` with a copy of that
    // checkpoint (no post-processing beside it) writes the same mask.
    let tmp = tempfile::tempdir().unwrap();
    for (fold, f) in splits.as_array().unwrap().iter().enumerate() {
        let name = &names(&f["val"])[0];
        let ck = tmp.path().join(format!("f{fold}.unetpp"));
        std::fs::copy(r.run.join(format!("fold_{fold}/checkpoints/best.unetpp")), &ck).unwrap();
        let split = if ["c4", "c5"].contains(&name.as_str()) { "val" } else { "train" };
        let input = r.data.join(split).join("images").join(format!("{name}.png"));
        let out = tmp.path().join(format!("p{fold}"));
        ok_both(&["predict", "--checkpoint", s(&ck), "--input", s(&input), "--out", s(&out), "--tile", "64"]);
        let png = |p: &Path| unetpp::data::io::read_mask(p, 1).unwrap();
        assert_eq!(png(&out.join(format!("{name}.png"))), png(&cv.join(format!("predictions/{name}.png"))), "{name}");
    }
}

#[test]
fn the_post_processing_decided_on_it_is_saved_beside_every_fold_checkpoint() {
    let r = reference();
    let decision = read(&r.run.join("postprocess.json"));
    let d: Value = serde_json::from_str(&decision).unwrap();
    assert_eq!(d["cases"].as_u64(), Some(6), "decided on every cross-validation case");
    for i in 0..3 {
        assert_eq!(read(&r.run.join(format!("fold_{i}/checkpoints/best.postprocess.json"))), decision, "fold {i}");
    }
    // `postprocess` on the written predictions against the labels decides the same.
    let tmp = tempfile::tempdir().unwrap();
    let labels = tmp.path().join("labels");
    std::fs::create_dir_all(&labels).unwrap();
    for split in ["train", "val"] {
        for e in std::fs::read_dir(r.data.join(split).join("masks")).unwrap().flatten() {
            std::fs::copy(e.path(), labels.join(e.file_name())).unwrap();
        }
    }
    let out = tmp.path().join("d.json");
    let preds = r.run.join("crossval/predictions");
    ok_both(&["postprocess", "--predictions", s(&preds), "--labels", s(&labels), "--out", s(&out)]);
    let cli = json(&out);
    assert_eq!((&cli["keep_largest_foreground"], &cli["cases"]), (&d["keep_largest_foreground"], &d["cases"]));
    for k in ["dice_before", "dice_after"] {
        let mean = |v: &Value| v[k]["foreground_mean"].as_f64().unwrap();
        assert!((mean(&cli) - mean(&d)).abs() < 1e-12, "{k}: {cli} vs {d}");
    }
    // `eval` with a fold's checkpoint applies it.
    let (_, ev) = ok_both(&[
        "eval",
        "--checkpoint",
        s(&r.run.join("fold_0/checkpoints/best.unetpp")),
        "--data",
        s(&r.data),
        "--out",
        s(&tmp.path().join("eval")),
        "--tile",
        "64",
    ]);
    assert!(ev.contains("best.postprocess.json"), "{ev}");
}

#[test]
fn a_split_that_no_longer_matches_the_data_is_an_error_naming_the_cases() {
    let r = reference();
    let tmp = tempfile::tempdir().unwrap();
    let data = make_data(&tmp.path().join("data"));
    for sub in ["images", "masks"] {
        std::fs::remove_file(data.join("val").join(sub).join("c5.png")).unwrap();
    }
    let run = tmp.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::copy(r.run.join("splits.json"), run.join("splits.json")).unwrap();
    fails(&train_args(&data, &run, &[]), &["splits.json", "no longer has: c5"]);
    assert!(!run.join("folds.toml").exists() && !run.join("fold_0").exists(), "nothing written");
}

#[test]
fn a_folds_run_as_checkpoint_is_the_ensemble_of_its_folds() {
    let r = reference();
    let tmp = tempfile::tempdir().unwrap();
    let input = r.data.join("val/images");
    let folds: Vec<String> =
        (0..3).map(|i| s(&r.run.join(format!("fold_{i}/checkpoints/best.unetpp"))).to_owned()).collect();
    let (by_run, by_list) = (tmp.path().join("run"), tmp.path().join("list"));
    let common = ["--input", s(&input), "--tile", "64", "--probabilities", "npy"];
    let mut args = vec!["predict", "--checkpoint", s(&r.run), "--out", s(&by_run)];
    args.extend(common);
    ok_both(&args);
    let list = folds.join(",");
    let mut args = vec!["predict", "--checkpoint", &list, "--out", s(&by_list)];
    args.extend(common);
    ok_both(&args);
    let mut n = 0;
    for e in std::fs::read_dir(&by_list).unwrap().flatten() {
        assert_eq!(std::fs::read(e.path()).unwrap(), std::fs::read(by_run.join(e.file_name())).unwrap());
        n += 1;
    }
    assert_eq!(n, 2 * std::fs::read_dir(&input).unwrap().count(), "a mask and probabilities per case");
    // An unfinished fold is named, with the command that trains it.
    let partial = tmp.path().join("partial");
    std::fs::create_dir_all(partial.join("fold_0")).unwrap();
    std::fs::copy(r.run.join("splits.json"), partial.join("splits.json")).unwrap();
    let out = tmp.path().join("p");
    fails(&["predict", "--checkpoint", s(&partial), "--input", s(&input), "--out", s(&out)], &["fold 0", "--fold 0"]);
}

/// A fold trained from the on-disk cache takes the fold's cases, as in memory: the same metrics
/// and weights as the same fold trained in memory.
#[test]
fn a_fold_trained_from_the_cache_equals_the_in_memory_fold() {
    let r = reference();
    let tmp = tempfile::tempdir().unwrap();
    let (cached, memory, cache) = (tmp.path().join("cached"), tmp.path().join("memory"), tmp.path().join("cache"));
    ok_both(&train_args(&r.data, &cached, &["--fold", "1", "--cache", s(&cache)]));
    ok_both(&train_args(&r.data, &memory, &["--fold", "1", "--no-cache"]));
    assert!(std::fs::read_dir(&cache).unwrap().next().is_some(), "the cache was used");
    assert_eq!(metrics(&cached.join("fold_1")), metrics(&memory.join("fold_1")));
    assert_eq!(metrics(&memory.join("fold_1")), metrics(&r.run.join("fold_1")));
    // The weights, through what they compute (checkpoint files also hold burn's per-process
    // parameter ids).
    let probs = |run: &Path| {
        let out = tmp.path().join(format!("p-{}", run.file_name().unwrap().to_string_lossy()));
        let ck = run.join("fold_1/checkpoints/best.unetpp");
        let input = r.data.join("val/images");
        #[rustfmt::skip]
        ok_both(&["predict", "--checkpoint", s(&ck), "--input", s(&input), "--out", s(&out), "--tile", "64", "--probabilities", "npy"]);
        let mut files: Vec<_> = std::fs::read_dir(&out).unwrap().flatten().map(|e| e.path()).collect();
        files.sort();
        files.iter().map(|f| std::fs::read(f).unwrap()).collect::<Vec<_>>()
    };
    let reference = probs(&r.run);
    assert!(probs(&memory) == reference, "one fold alone trains as within the whole run");
    assert!(probs(&cached) == reference, "the same weights from the cache");
}
