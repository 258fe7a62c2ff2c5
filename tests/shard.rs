//! `predict --shard I/N` (issue #20): shards together write exactly the files one run writes, a
//! re-submitted shard redoes only what is missing, and each shard lists its cases in a manifest.
mod common;
use common::*;

use std::collections::BTreeMap;
use std::path::Path;

/// Every file in `dir` (name -> bytes), manifests left out.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap()))
        .filter(|(n, _)| !n.starts_with("manifest"))
        .collect()
}

fn manifest(out: &Path, shard: &str) -> Vec<serde_json::Value> {
    let name = format!("manifest.shard-{}.jsonl", shard.replace('/', "-of-"));
    std::fs::read_to_string(out.join(name)).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn three_shards_write_what_one_run_writes_and_resubmitting_redoes_only_what_is_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("tiny.unetpp");
    tiny_checkpoint(&ck, 2);
    // The seven bundled images, so that three shards get three, two and two.
    let input = tmp.path().join("images");
    std::fs::create_dir(&input).unwrap();
    for split in ["train", "val", "test"] {
        for e in std::fs::read_dir(samples("nuclei").join(split).join("images")).unwrap().flatten() {
            std::fs::copy(e.path(), input.join(e.file_name())).unwrap();
        }
    }
    let n = std::fs::read_dir(&input).unwrap().count();
    assert_eq!(n, 7);
    let run = |out: &Path, extra: &[&str]| {
        let mut args = vec!["predict", "--checkpoint", s(&ck), "--input", s(&input), "--out", s(out)];
        args.extend(["--tile", "256", "--probabilities", "tiff"]);
        args.extend(extra);
        ok_text(&args)
    };
    let whole = tmp.path().join("whole");
    run(&whole, &[]);
    let one = files(&whole);
    assert_eq!(one.len(), 2 * n, "a mask and a probability map per image");

    let sharded = tmp.path().join("sharded");
    let mut cases = vec![];
    for (shard, size) in [("0/3", 3), ("1/3", 2), ("2/3", 2)] {
        run(&sharded, &["--shard", shard]);
        let m = manifest(&sharded, shard);
        assert_eq!(m.len(), size);
        assert!(
            m.iter().all(|e| e["mode"] == "accurate" && e["skipped"] == false && e["seconds"].as_f64().unwrap() > 0.0)
        );
        cases.extend(m.iter().map(|e| e["input"].as_str().unwrap().to_owned()));
    }
    assert_eq!(files(&sharded), one, "the shards' files equal one run's, byte for byte");
    cases.sort();
    cases.dedup();
    assert_eq!(cases.len(), n, "every case in exactly one shard's manifest");

    // A lost output (a node died, a file was removed): the re-submitted shard redoes that case only.
    let m = manifest(&sharded, "1/3");
    let lost = Path::new(m[0]["outputs"][0].as_str().unwrap()).to_path_buf();
    std::fs::remove_file(&lost).unwrap();
    let log = run(&sharded, &["--shard", "1/3"]);
    assert_eq!(log.matches("predicted ").count(), 1, "{log}");
    assert_eq!(log.matches("skipped ").count(), m.len() - 1, "{log}");
    assert_eq!(files(&sharded), one);
    let again = manifest(&sharded, "1/3");
    assert_eq!(again.len(), m.len());
    assert_eq!(again.iter().filter(|e| e["skipped"] == false).count(), 1);
}

#[test]
fn a_bad_shard_is_refused_before_anything_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("tiny.unetpp");
    tiny_checkpoint(&ck, 2);
    let out = tmp.path().join("out");
    let input = samples("nuclei/test/images");
    for bad in ["3/3", "1/0", "x"] {
        let args = ["predict", "--checkpoint", s(&ck), "--input", s(&input), "--out", s(&out), "--shard", bad];
        fails_with(&args, 2, &["--shard must be I/N", bad]);
    }
    assert!(!out.exists());
}
