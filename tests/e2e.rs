//! The nnU-Net workflow end to end as a user runs it (issue #17): `plan --data D`, then
//! `train --data D` with no other flag (following D/unetpp_plan), then `eval`, on a copy of the
//! committed fixture `tests/data/nnunet/Dataset990_Tiny` (channels CT + smoothed, labels
//! background / lung / spine). docs/plan.md has the same workflow on the shared volumes.
mod common;
use common::*;

use std::path::{Path, PathBuf};

use unetpp::plan::Plan;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/nnunet/Dataset990_Tiny")
}

/// A copy of the fixture, so that the plan and outputs stay out of the committed files.
fn copy_fixture(to: &Path) -> PathBuf {
    fn copy(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let p = e.unwrap().path();
            let dst = to.join(p.file_name().unwrap());
            if p.is_dir() { copy(&p, &dst) } else { std::fs::copy(&p, &dst).map(|_| ()).unwrap() }
        }
    }
    let dst = to.join("Dataset990_Tiny");
    copy(&fixture(), &dst);
    dst
}

/// The value of the table row `key` (rows are `  key   value`).
fn row<'a>(table: &'a str, key: &str) -> &'a str {
    let line = table.lines().find(|l| l.trim_start().starts_with(key)).unwrap_or_else(|| panic!("no {key}: {table}"));
    line.trim_start()[key.len()..].trim()
}

#[test]
fn the_plan_table_names_channels_labels_and_their_normalisation() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("plan");
    let table = ok(&["plan", "--data", s(&fixture()), "--out", s(&out), "--width", "4", "--budget", "20s"]);
    assert_eq!(row(&table, "channels"), "2 (CT, smoothed)", "{table}");
    assert_eq!(row(&table, "classes"), "3 (background, lung, spine)", "{table}");
    // Which channel gets the CT window and which the per-case z-score, by name.
    let norm = row(&table, "normalisation");
    let (ct, smoothed) = norm.split_once("; ").unwrap_or_else(|| panic!("{table}"));
    assert!(ct.starts_with("CT: CT window ") && ct.contains(", mean ") && ct.contains(", std "), "{table}");
    assert_eq!(smoothed, "smoothed: z-score per case", "{table}");
    // Four 16^3 cases of 2 float channels and a byte label: 0.1 MiB, not "0.00 GiB".
    let note = table.lines().find(|l| l.contains("for the data set held in memory")).unwrap();
    assert!(note.contains("less 0.1 MiB for"), "{note}");

    let plan = Plan::read(&out.join("plan.toml")).unwrap();
    assert_eq!(
        (plan.channel_names.as_slice(), plan.label_names.as_slice()),
        (&["CT".to_string(), "smoothed".into()][..], &["background".to_string(), "lung".into(), "spine".into()][..])
    );
    // A plan written before the names were kept still reads, with its table unnamed.
    let text = std::fs::read_to_string(out.join("plan.toml")).unwrap();
    let old: String = text
        .lines()
        .filter(|l| !l.starts_with("channel_names") && !l.starts_with("label_names"))
        .fold(String::new(), |a, l| a + l + "\n");
    assert_ne!(old, text);
    let old_file = tmp.path().join("old.toml");
    std::fs::write(&old_file, old).unwrap();
    let old = Plan::read(&old_file).unwrap();
    assert!(old.channel_names.is_empty() && old.label_names.is_empty());
    assert_eq!(row(&old.table(), "channels"), "2");
    assert!(row(&old.table(), "normalisation").starts_with("0: CT window "), "{}", old.table());
}

#[test]
fn plan_then_train_with_only_data_then_eval_names_every_label() {
    let tmp = tempfile::tempdir().unwrap();
    let data = copy_fixture(tmp.path());
    ok(&["plan", "--data", s(&data), "--width", "4", "--budget", "2s"]);
    let plan = Plan::read(&data.join("unetpp_plan/plan.toml")).unwrap();
    let run = tmp.path().join("run");
    let printed = ok_text(&["train", "--data", s(&data), "--out", s(&run)]);
    assert!(printed.contains("following the plan"), "{printed}");
    let cfg = unetpp::train::TrainConfig::read(&run.join("config.toml")).unwrap();
    assert_eq!(cfg.plan.as_ref(), Some(&plan));
    assert_eq!((cfg.patch, cfg.model.width, cfg.model.depth), (plan.patch, 4, plan.depth));
    let nn = cfg.input.nnunet.as_ref().unwrap();
    assert_eq!(nn.norms, plan.channel_norms, "training normalises as the plan says");

    let eval = tmp.path().join("eval");
    let ck = run.join("checkpoints/best.unetpp");
    let printed = ok(&["eval", "--checkpoint", s(&ck), "--data", s(&data), "--out", s(&eval)]);
    assert!(printed.contains("  lung: mean Dice") && printed.contains("  spine: mean Dice"), "{printed}");
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(eval.join("summary.json")).unwrap()).unwrap();
    let classes: Vec<&str> = json["classes"].as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(classes, ["lung", "spine"], "{json}");
    // Every score of a label under its name: the surface scores too, and in the printed lines.
    for (name, value) in [("lung", 1), ("spine", 2)] {
        let c = &json["classes"][name];
        assert_eq!(c["label"], value, "{json}");
        assert!(c["hd95"].as_f64().is_some_and(|h| h >= 0.0) && c["nsd"].as_f64().is_some(), "{json}");
        let surface = &json["summary"]["surface"]["per_label"][value - 1];
        assert_eq!((&surface["label"], &surface["name"]), (&value.into(), &name.into()), "{json}");
        assert!(printed.contains(&format!("\n  {name} (label {value}): Dice ")), "{printed}");
    }
    assert!(!printed.contains("  label "), "a label printed without its name: {printed}");
    let report = std::fs::read_to_string(eval.join("report.html")).unwrap();
    assert!(report.contains("dice_lung") && report.contains("dice_spine"), "report.html names the labels");
}
