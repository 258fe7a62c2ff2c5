//! `train --loss nnunet --schedule poly`: the flags reach the run's configuration and change
//! what is optimised; bad values are refused naming the flag.
mod common;
use common::*;

use std::path::Path;

const TINY: &[&str] = &[
    "--width",
    "4",
    "--depth",
    "2",
    "--epochs",
    "2",
    "--steps-per-epoch",
    "2",
    "--batch-size",
    "2",
    "--patch",
    "32",
    "--tile",
    "64",
];

fn train(out: &Path, extra: &[&str]) -> Vec<f64> {
    let data = samples("nuclei");
    let mut a = vec!["train", "--data", s(&data), "--out", s(out)];
    a.extend(TINY);
    a.extend(extra);
    ok(&a);
    let csv = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    csv.lines().skip(1).map(|l| l.split(',').nth(2).unwrap().parse().unwrap()).collect()
}

#[test]
fn loss_and_schedule_reach_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let paper = train(&tmp.path().join("paper"), &[]);
    let config = std::fs::read_to_string(tmp.path().join("paper/config.toml")).unwrap();
    assert!(config.contains("loss = \"paper\"") && config.contains("schedule = \"constant\""), "{config}");
    let nn = train(&tmp.path().join("nn"), &["--loss", "nnunet", "--schedule", "poly"]);
    let config = std::fs::read_to_string(tmp.path().join("nn/config.toml")).unwrap();
    assert!(config.contains("loss = \"nnunet\"") && config.contains("schedule = \"poly\""), "{config}");
    assert!(paper.iter().chain(&nn).all(|v| v.is_finite()), "{paper:?} {nn:?}");
    // Same seed and patches: only the loss differs in the first epoch (poly's first steps are
    // near the base step size), and nnU-Net's CE has twice the paper's weight.
    assert!((paper[0] - nn[0]).abs() > 1e-3, "{paper:?} {nn:?}");
    // A configuration without the recipe (written before it existed) still loads, with the paper's.
    let old = config.lines().filter(|l| !l.starts_with("loss") && !l.starts_with("schedule") && *l != "[recipe]");
    let old: String = old.map(|l| format!("{l}\n")).collect();
    let cfg: unetpp::train::TrainConfig = toml::from_str(&old).unwrap();
    assert_eq!(cfg.recipe, Default::default());
}

#[test]
fn bad_values_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = samples("nuclei");
    for (flag, bad, allowed) in
        [("--loss", "dice", "one of paper, nnunet"), ("--schedule", "cosine", "one of constant, poly")]
    {
        let out = tmp.path().join(bad);
        fails_with(&["train", "--data", s(&data), "--out", s(&out), flag, bad], 2, &[flag, allowed]);
        assert!(!out.exists(), "nothing written for {flag} {bad}");
    }
}
