//! report.html of an ensemble names every member, from a `--checkpoint a,b` list and from a k-fold
//! run directory, with the post-processing, test-time augmentation and window settings used.
mod common;
use common::*;

use std::path::Path;

fn eval_report(checkpoint: &str, out: &Path, extra: &[&str]) -> String {
    let nuclei = samples("nuclei");
    let mut args = vec!["eval", "--checkpoint", checkpoint, "--data", s(&nuclei), "--out", s(out)];
    args.extend_from_slice(extra);
    ok(&args);
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    // Only the <dl> of the summary: the needles below must not match elsewhere by chance.
    let start = html.find("<dl class=\"summary\">").expect("a summary list");
    html[start..start + html[start..].find("</dl>").unwrap()].to_string()
}

/// A path as the page shows it (escaped, `/` included).
fn esc(p: &Path) -> String {
    unetpp::report::page::esc(s(p))
}

fn item(p: &Path) -> String {
    format!("<li>{}</li>", esc(p))
}

#[test]
fn a_checkpoint_list_is_named_whole_with_its_settings() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a.unetpp"), tmp.path().join("b.unetpp"));
    tiny_checkpoint(&a, 2);
    tiny_checkpoint(&b, 2);
    let list = format!("{},{}", s(&a), s(&b));
    let out = tmp.path().join("eval");
    let dl = eval_report(&list, &out, &["--tta", "--overlap", "0.25", "--tile", "64", "--window-batch", "3"]);
    assert!(dl.contains("checkpoints (ensemble of 2)"), "{dl}");
    let (pa, pb) = (dl.find(&item(&a)), dl.find(&item(&b)));
    assert!(pa.is_some() && pb.is_some() && pa < pb, "both members, in order: {dl}");
    for needle in [
        "<dt>post-processing</dt><dd>none</dd>",
        "<dt>test-time augmentation</dt><dd>on (mirrored copies averaged)</dd>",
        "<dt>window</dt><dd>1 x 64 x 64</dd>",
        "<dt>window overlap</dt><dd>0.2500</dd>",
        "<dt>windows per pass</dt><dd>3</dd>",
    ] {
        assert!(dl.contains(needle), "no `{needle}` in {dl}");
    }
    // One checkpoint, defaults: 2D models run without mirroring.
    let single = eval_report(s(&a), &tmp.path().join("one"), &[]);
    assert!(
        single.contains(&format!("<dt>checkpoint</dt><dd><ol class=\"checkpoints\">{}</ol>", item(&a))),
        "{single}"
    );
    assert!(single.contains("<dt>test-time augmentation</dt><dd>off</dd>"), "{single}");
    assert!(single.contains("<dt>windows per pass</dt><dd>as memory allows</dd>"), "{single}");
}

#[test]
fn a_k_fold_run_is_named_by_each_folds_checkpoint_and_its_post_processing() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let folds = serde_json::json!([{"train": ["a"], "val": ["b"]}, {"train": ["b"], "val": ["a"]}]);
    std::fs::create_dir_all(&run).unwrap();
    std::fs::write(run.join("splits.json"), folds.to_string()).unwrap();
    let cks: Vec<_> = (0..2).map(|i| run.join(format!("fold_{i}/checkpoints/best.unetpp"))).collect();
    for ck in &cks {
        std::fs::create_dir_all(ck.parent().unwrap()).unwrap();
        tiny_checkpoint(ck, 2);
    }
    // A decision as `cross-validate` leaves beside the first fold's checkpoint.
    let case = unetpp::postprocess::Case {
        name: "c".into(),
        pred: vec![1, 1, 0, 0, 0, 1],
        truth: vec![1, 1, 0, 0, 0, 0],
        shape: [1, 1, 6],
    };
    let decision = unetpp::postprocess::decide(&[case], 1, Default::default());
    let pp = unetpp::postprocess::beside(&cks[0]);
    std::fs::write(&pp, serde_json::to_string(&decision).unwrap()).unwrap();

    let dl = eval_report(s(&run), &tmp.path().join("eval"), &["--tile", "64"]);
    assert!(dl.contains("checkpoints (ensemble of 2)"), "{dl}");
    assert!(dl.find(&item(&cks[0])) < dl.find(&item(&cks[1])) && dl.contains(&item(&cks[0])), "{dl}");
    assert!(dl.contains(&format!("<dt>post-processing</dt><dd>as decided in {}</dd>", esc(&pp))), "{dl}");
}
