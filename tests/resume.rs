//! The run directory protocol end to end: a training killed at every write and every commit step
//! (through the `UNETPP_FAILPOINT` hook) or by a real SIGKILL at a random time, then resumed,
//! ends byte for byte where an uninterrupted run ends; a second trainer on a locked run is
//! refused; a diverged run keeps its last finite checkpoint.

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{Tiny, s, samples, stderr, weights};

mod common;

/// [`Tiny::D2`] with 3 epochs.
fn train_args(out: &Path) -> Vec<String> {
    let tiny = Tiny { epochs: "3", ..Tiny::D2 };
    common::train_args(&samples("nuclei"), out, tiny, &[]).into_iter().map(String::from).collect()
}

fn unetpp(args: &[String], failpoint: Option<&str>) -> Output {
    let env: Vec<(&str, &str)> = failpoint.map(|f| ("UNETPP_FAILPOINT", f)).into_iter().collect();
    common::unetpp_env(args, &env)
}

fn ok(args: &[String]) {
    let o = unetpp(args, None);
    assert!(o.status.success(), "unetpp {args:?} failed:\n{}", stderr(&o));
}

/// Every file of a run folder, in a form where an exact resume equals an uninterrupted run:
/// wall times removed from metrics.csv and state.json, the lock's pid ignored.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
                continue;
            }
            let name = p.strip_prefix(root).unwrap().to_str().unwrap().to_string();
            let bytes = std::fs::read(&p).unwrap();
            let bytes = match name.as_str() {
                ".lock" => vec![],
                "metrics.csv" => String::from_utf8(bytes)
                    .unwrap()
                    .lines()
                    .map(|l| l.rsplit_once(',').unwrap().0.to_string() + "\n")
                    .collect::<String>()
                    .into_bytes(),
                "state.json" => {
                    let mut v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
                    strip_seconds(&mut v);
                    v.to_string().into_bytes()
                }
                n if n.ends_with(".unetpp") => weights(&bytes),
                _ => bytes,
            };
            out.insert(name, bytes);
        }
    }
    fn strip_seconds(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                m.remove("seconds");
                m.values_mut().for_each(strip_seconds);
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(strip_seconds),
            _ => {}
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn assert_same(reference: &BTreeMap<String, Vec<u8>>, dir: &Path, what: &str) {
    let got = snapshot(dir);
    let names = |m: &BTreeMap<String, Vec<u8>>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(&got), names(reference), "{what}: the run folder's files differ (left-overs?)");
    for (name, bytes) in reference {
        assert!(&got[name] == bytes, "{what}: {name} differs from the uninterrupted run's");
    }
}

struct Reference {
    files: BTreeMap<String, Vec<u8>>,
    seconds: f64,
    dir: tempfile::TempDir,
}

/// One uninterrupted run, shared by the tests of this file.
fn reference() -> &'static Reference {
    static R: OnceLock<Reference> = OnceLock::new();
    R.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        let t = Instant::now();
        ok(&train_args(&run));
        let files = snapshot(&run);
        for f in ["config.toml", "state.json", "metrics.csv", "checkpoints/last.unetpp", "checkpoints/best.unetpp"] {
            assert!(files.contains_key(f), "reference run lacks {f}");
        }
        assert_eq!(files["metrics.csv"].iter().filter(|&&b| b == b'\n').count(), 4, "header and 3 epochs");
        Reference { files, seconds: t.elapsed().as_secs_f64(), dir }
    })
}

/// Continues a killed run the way a user would: `--resume` when the run's config.toml was
/// written, else the same `train --out` again.
fn continue_run(run: &Path, failpoint: Option<&str>) -> Output {
    if run.join("config.toml").exists() {
        unetpp(&["train".into(), "--resume".into(), s(run).into()], failpoint)
    } else {
        unetpp(&train_args(run), failpoint)
    }
}

/// Trains with `UNETPP_FAILPOINT=site:n`, resumes, and checks the result equals the reference.
/// Returns false when the run never reached the n-th hit (it finished normally).
fn cut_and_resume(root: &Path, site: &str, n: usize) -> bool {
    let run = root.join(format!("{}-{n}", site.replace('.', "_")));
    let fp = format!("{site}:{n}");
    let first = unetpp(&train_args(&run), Some(&fp));
    if first.status.success() {
        assert_same(&reference().files, &run, &format!("{fp} (never reached)"));
        return false;
    }
    assert_eq!(first.status.signal(), Some(9), "{fp}: expected the failpoint's SIGKILL:\n{}", stderr(&first));
    let second = continue_run(&run, None);
    assert!(second.status.success(), "{fp}: resume failed:\n{}", stderr(&second));
    assert_same(&reference().files, &run, &fp);
    true
}

/// Every hit of `site` in a run, in turn (the n-th write, step, ...): kill there, resume, compare.
fn every_hit(site: &str) -> usize {
    let tmp = tempfile::tempdir().unwrap();
    let mut n = 1;
    while cut_and_resume(tmp.path(), site, n) {
        n += 1;
        assert!(n < 100, "{site} hit more often than a 3-epoch run writes");
    }
    n - 1
}

#[test]
fn kill_before_and_after_each_temp_write_then_resume_is_exact() {
    // config.toml, 3 epochs of pending checkpoints, optimiser state, state.json and metrics.csv,
    // and curves.png: every one of them cut before and after its temporary file is written.
    for site in ["fsio.before-write", "fsio.after-write"] {
        let hits = every_hit(site);
        assert!(hits >= 14, "{site}: {hits} writes");
    }
}

#[test]
fn kill_before_and_after_each_rename_then_resume_is_exact() {
    for site in ["fsio.before-rename", "fsio.after-rename"] {
        let hits = every_hit(site);
        assert!(hits >= 14, "{site}: {hits} writes");
    }
}

#[test]
fn kill_at_each_step_of_the_epoch_commit_then_resume_is_exact() {
    // Staged (pending files on disk, state not yet committed), committed, each publishing rename,
    // published, and mid-epoch after a training step.
    for (site, expected) in [
        ("epoch.trained", 3),
        ("epoch.staged", 3),
        ("epoch.committed", 3),
        ("publish.rename", 7),
        ("publish.renamed", 4),
        ("epoch.published", 3),
        ("train.step", 6),
    ] {
        let hits = every_hit(site);
        assert!(hits >= expected, "{site}: {hits} hits, expected at least {expected}");
    }
}

/// A kill during the recovery itself (half way through publishing the previous kill's commit) is
/// recovered from too.
#[test]
fn kill_during_recovery_then_resume_is_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let first = unetpp(&train_args(&run), Some("epoch.committed:2"));
    assert_eq!(first.status.signal(), Some(9), "{}", stderr(&first));
    assert!(
        std::fs::read_dir(run.join("checkpoints"))
            .unwrap()
            .flatten()
            .any(|e| { e.file_name().to_str().unwrap().starts_with("pending-2-") })
    );
    let second = continue_run(&run, Some("publish.rename:2"));
    assert_eq!(second.status.signal(), Some(9), "{}", stderr(&second));
    let third = continue_run(&run, None);
    assert!(third.status.success(), "{}", stderr(&third));
    assert_same(&reference().files, &run, "kill during recovery");
}

/// A run whose first epoch never committed (killed, or stopped by an error) restarts cleanly
/// through the same `train --out`, not only through `--resume`.
#[test]
fn unfinished_first_epoch_restarts_with_the_same_train_out() {
    let tmp = tempfile::tempdir().unwrap();
    for fp in ["epoch.staged:1", "train.step:1", "fsio.after-write:3"] {
        let run = tmp.path().join(fp.replace([':', '.'], "_"));
        let first = unetpp(&train_args(&run), Some(fp));
        assert_eq!(first.status.signal(), Some(9), "{fp}: {}", stderr(&first));
        assert!(run.join("config.toml").exists() && !run.join("state.json").exists(), "{fp}");
        let again = unetpp(&train_args(&run), None);
        assert!(again.status.success(), "{fp}: {}", stderr(&again));
        assert!(stderr(&again).contains("never finished its first epoch"), "{fp}: {}", stderr(&again));
        assert_same(&reference().files, &run, fp);
    }
}

/// Real SIGKILLs at seeded random times during a run, then resume: the same result.
#[test]
fn sigkill_at_random_times_then_resume_is_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let span = reference().seconds;
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for trial in 0..4 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let delay = Duration::from_secs_f64(span * (seed % 1000) as f64 / 1000.0);
        let run = tmp.path().join(format!("kill-{trial}"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_unetpp"))
            .args(train_args(&run))
            .env_remove("UNETPP_FAILPOINT")
            .stderr(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        let _ = child.kill();
        child.wait().unwrap();
        if run.exists() {
            let o = continue_run(&run, None);
            assert!(o.status.success(), "killed after {delay:?}, resume failed:\n{}", stderr(&o));
        } else {
            ok(&train_args(&run));
        }
        assert_same(&reference().files, &run, &format!("SIGKILL after {delay:?}"));
    }
}

/// While a training runs, a second `train --out` or `--resume` on its folder is refused with the
/// holder's pid and changes nothing; once the holder is killed the lock is free again.
#[test]
fn second_writer_is_refused_while_the_first_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let mut long = train_args(&run);
    let i = long.iter().position(|x| x == "--steps-per-epoch").unwrap();
    long[i + 1] = "20000".into();
    let mut first = Command::new(env!("CARGO_BIN_EXE_unetpp"))
        .args(&long)
        .env_remove("UNETPP_FAILPOINT")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = first.id().to_string();
    let t = Instant::now();
    while !(std::fs::read_to_string(run.join(".lock")).is_ok_and(|p| p.trim() == pid)
        && run.join("config.toml").exists())
    {
        assert!(t.elapsed() < Duration::from_secs(60), "the first training never took the lock");
        std::thread::sleep(Duration::from_millis(20));
    }
    let config = std::fs::read(run.join("config.toml")).unwrap();
    for args in [train_args(&run), vec!["train".into(), "--resume".into(), s(&run).into()]] {
        let o = unetpp(&args, None);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", stderr(&o));
        let err = stderr(&o);
        assert!(err.contains("in use by another unetpp process") && err.contains(&format!("pid {pid}")), "{err}");
        assert!(err.contains(s(&run)) && !err.contains("panicked"), "{err}");
    }
    assert_eq!(std::fs::read(run.join("config.toml")).unwrap(), config, "the refused writer changed the run");
    first.kill().unwrap();
    first.wait().unwrap();
    // The dead holder's lock is gone with it: a resume gets past it (and is cut after one step).
    let o = unetpp(&["train".into(), "--resume".into(), s(&run).into()], Some("train.step:1"));
    assert_eq!(o.status.signal(), Some(9), "{}", stderr(&o));
    assert!(!stderr(&o).contains("in use"), "{}", stderr(&o));
}

/// Multiplies every weight of a model by a constant.
struct Scale(f64);

impl burn::module::ModuleMapper for Scale {
    fn map_float<const K: usize>(
        &mut self,
        param: burn::module::Param<burn::tensor::Tensor<K>>,
    ) -> burn::module::Param<burn::tensor::Tensor<K>> {
        let f = self.0;
        param.map(|t| t.mul_scalar(f))
    }
}

/// A run that diverges in epoch 2 stops with a non-zero exit naming the step and --lr, keeps the
/// epoch-1 checkpoints and state untouched, and writes no non-finite weights.
#[test]
fn diverged_run_stops_and_keeps_the_last_finite_checkpoint() {
    use burn::module::Module;
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    ok(&train_args(&run).into_iter().map(|x| if x == "3" { "1".into() } else { x }).collect::<Vec<_>>());
    // Weights ~1e30 are finite but overflow float32 in the first forward pass of epoch 2.
    let last = run.join("checkpoints/last.unetpp");
    let (model, meta) = unetpp::checkpoint::load::<4>(&last, &burn::tensor::Device::flex()).unwrap();
    unetpp::checkpoint::save(&model.map(&mut Scale(1e30)), &meta, &last).unwrap();
    let cfg = std::fs::read_to_string(run.join("config.toml")).unwrap().replace("epochs = 1", "epochs = 3");
    std::fs::write(run.join("config.toml"), cfg).unwrap();
    let before = snapshot(&run);
    let o = unetpp(&["train".into(), "--resume".into(), s(&run).into()], None);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    // Either the loss of step 3 or the weights after step 4 (epoch 2's) are caught, by platform.
    for needle in ["training diverged", "(epoch 2)", "lower --lr", "keeps the checkpoints of epoch 1"] {
        assert!(err.contains(needle), "stderr lacks `{needle}`:\n{err}");
    }
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(snapshot(&run), before, "a diverged epoch changed the run folder");
}

/// A metrics.csv edited by hand (a blank line, a junk row, no final newline) or holding rows no
/// commit covers is rewritten from the committed rows on resume; the plot never trips on it.
#[test]
fn hand_edited_metrics_csv_is_rewritten_from_the_committed_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let first = unetpp(&train_args(&run), Some("epoch.published:2"));
    assert_eq!(first.status.signal(), Some(9), "{}", stderr(&first));
    let csv = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
    assert_eq!(csv.lines().count(), 3, "{csv}");
    std::fs::write(run.join("metrics.csv"), format!("{}\n\njunk,,\n3,6,0.1,0.2,0.3,9.9", csv.trim_end())).unwrap();
    let o = continue_run(&run, None);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_same(&reference().files, &run, "edited metrics.csv");
}

/// Runs written by unetpp versions before this protocol: a consistent one resumes (its rows
/// taken from metrics.csv, uncommitted and junk rows dropped); one cut while saving (weights of
/// epoch 2, state saying 1: the old double-training bug) is refused, naming both.
#[test]
fn runs_of_older_unetpp_resume_or_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let first = unetpp(&train_args(&run), Some("epoch.published:2"));
    assert_eq!(first.status.signal(), Some(9), "{}", stderr(&first));
    let mut state: serde_json::Value = serde_json::from_slice(&std::fs::read(run.join("state.json")).unwrap()).unwrap();
    state.as_object_mut().unwrap().remove("history");
    std::fs::write(run.join("state.json"), state.to_string()).unwrap();
    let csv = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
    std::fs::write(run.join("metrics.csv"), format!("{csv}3,6,0.1,0.2,0.3,9.9")).unwrap();
    let saved = tmp.path().join("saved");
    std::fs::create_dir_all(&saved).unwrap();
    for f in ["state.json", "metrics.csv"] {
        std::fs::copy(run.join(f), saved.join(f)).unwrap();
    }

    state["epoch"] = 1.into();
    std::fs::write(run.join("state.json"), state.to_string()).unwrap();
    let o = continue_run(&run, None);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    for needle in ["last.unetpp is from epoch 2", "state.json says epoch 1", "cannot be resumed exactly"] {
        assert!(err.contains(needle), "stderr lacks `{needle}`:\n{err}");
    }

    for f in ["state.json", "metrics.csv"] {
        std::fs::copy(saved.join(f), run.join(f)).unwrap();
    }
    let o = continue_run(&run, None);
    assert!(o.status.success(), "{}", stderr(&o));
    // Rows read back from metrics.csv carry its 6 decimals, so state.json's full-precision
    // losses differ from a new run's; everything else is the same.
    let mut reference = reference().files.clone();
    let mut got = snapshot(&run);
    reference.remove("state.json");
    got.remove("state.json");
    assert!(got == reference, "a resumed older run differs from an uninterrupted one");
}

/// A run stopped by an error in its first epoch (here: diverged from absurd --weights) leaves no
/// checkpoint, and the same `train --out` with the option fixed starts it again cleanly.
#[test]
fn run_failed_in_its_first_epoch_is_reused_by_the_same_train_out() {
    use burn::module::Module;
    let tmp = tempfile::tempdir().unwrap();
    let huge = tmp.path().join("huge.unetpp");
    let last = reference().dir.path().join("run/checkpoints/last.unetpp");
    let (model, meta) = unetpp::checkpoint::load::<4>(&last, &burn::tensor::Device::flex()).unwrap();
    unetpp::checkpoint::save(&model.map(&mut Scale(1e30)), &meta, &huge).unwrap();
    let run = tmp.path().join("run");
    let mut args = train_args(&run);
    args.extend(["--weights".into(), s(&huge).into()]);
    let o = unetpp(&args, None);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("training diverged") && err.contains("no checkpoint was saved"), "{err}");
    assert!(!run.join("state.json").exists() && !run.join("checkpoints/last.unetpp").exists());
    let o = unetpp(&train_args(&run), None);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_same(&reference().files, &run, "re-run after a failed first epoch");
}
