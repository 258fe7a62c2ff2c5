//! The run directory protocol: one writer at a time, one commit point per epoch, and a resume
//! that is exact wherever the previous process was killed.
//!
//! - Lock: the trainer holds an OS advisory lock (`flock`) on `DIR/.lock` for the whole run and
//!   writes its pid there. A second trainer on the same folder is refused with that pid; the
//!   kernel drops the lock when the holder dies (kill, crash, power cut), so there is no stale
//!   lock to clear by hand.
//! - Commit: `state.json` is the only commit point. It holds the epoch counters and every
//!   committed epoch's metrics row. An epoch ends in four steps:
//!   1. stage: `checkpoints/pending-N-last.unetpp`, `pending-N-last.optim` and (when it improved)
//!      `pending-N-best.unetpp` are written, each atomically;
//!   2. commit: `state.json` saying epoch N is replaced atomically (one rename);
//!   3. publish: the pending files are renamed to `last.unetpp`, `last.optim`, `best.unetpp`;
//!   4. `metrics.csv` is rewritten whole from the committed rows.
//!
//!   Steps 3 and 4 are idempotent and redone by [`recover`] before anything else at every start:
//!   pending files of the committed epoch are published, pending files of any other epoch (a
//!   commit that never happened) and temporaries of killed writers are deleted, and `metrics.csv`
//!   is rewritten, so rows written but not committed (or a row glued onto a line without its
//!   newline) disappear. A kill before step 2 therefore resumes from epoch N-1, one after it
//!   from epoch N, and both give the bytes an uninterrupted run gives.
//! - A folder with a `config.toml` but no `state.json` never finished its first epoch: it starts
//!   again from scratch, whether through `train --resume DIR` or the same `train --out DIR`.

use std::fmt::Write as _;
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Write};
use std::path::Path;

use anyhow::{Context, bail, ensure};
use serde::{Deserialize, Serialize};

use super::State;
use crate::checkpoint;
use crate::fsio;

pub const CONFIG: &str = "config.toml";
pub const STATE: &str = "state.json";
pub const METRICS: &str = "metrics.csv";
pub const CURVES: &str = "curves.png";
pub const LOCK: &str = ".lock";
pub const LAST: &str = "last.unetpp";
pub const BEST: &str = "best.unetpp";
pub const OPTIM: &str = "last.optim";
const HEADER: &str = "epoch,step,train_loss,val_iou,val_dice,seconds";

/// One committed epoch's line of `metrics.csv`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub epoch: usize,
    pub step: usize,
    pub train_loss: f64,
    /// `None` when there is no validation split (JSON has no NaN).
    pub val_iou: Option<f64>,
    pub val_dice: Option<f64>,
    /// Training wall time of all epochs up to this one, across resumes.
    pub seconds: f64,
}

/// The whole `metrics.csv` for `rows`.
pub fn csv(rows: &[Row]) -> String {
    let mut s = format!("{HEADER}\n");
    for r in rows {
        let (iou, dice) = (r.val_iou.unwrap_or(f64::NAN), r.val_dice.unwrap_or(f64::NAN));
        writeln!(s, "{},{},{:.6},{iou:.6},{dice:.6},{:.1}", r.epoch, r.step, r.train_loss, r.seconds).unwrap();
    }
    s
}

/// Rows of a `metrics.csv` written by an older unetpp (whose `state.json` has no rows): the last
/// well-formed row of each epoch up to `epochs`; junk and glued lines are dropped.
fn legacy_rows(text: &str, epochs: usize) -> Vec<Row> {
    let mut rows: Vec<Row> = vec![];
    for line in text.lines() {
        let v: Vec<&str> = line.split(',').map(str::trim).collect();
        if v.len() != 6 {
            continue;
        }
        let f = |i: usize| v[i].parse::<f64>().ok();
        let (Ok(epoch), Ok(step), Some(train_loss), Some(iou), Some(dice), Some(seconds)) =
            (v[0].parse::<usize>(), v[1].parse::<usize>(), f(2), f(3), f(4), f(5))
        else {
            continue;
        };
        if epoch == 0 || epoch > epochs {
            continue;
        }
        rows.retain(|r| r.epoch != epoch);
        let finite = |x: f64| Some(x).filter(|x| x.is_finite());
        rows.push(Row { epoch, step, train_loss, val_iou: finite(iou), val_dice: finite(dice), seconds });
    }
    rows.sort_by_key(|r| r.epoch);
    rows
}

/// The exclusive right to write a run folder, held until dropped.
pub struct Lock {
    _file: Option<File>,
}

impl Lock {
    pub fn acquire(dir: &Path) -> anyhow::Result<Lock> {
        let path = dir.join(LOCK);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open the run lock {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                let pid = if pid.trim().is_empty() { "unknown".to_string() } else { pid.trim().to_string() };
                bail!(
                    "the run in {} is in use by another unetpp process (pid {pid}); wait for it to finish or stop it, \
                     then continue with `train --resume {}`",
                    dir.display(),
                    dir.display()
                );
            }
            // Some network file systems have no advisory locks: train unguarded rather than not at all.
            Err(TryLockError::Error(e)) if e.kind() == std::io::ErrorKind::Unsupported => {
                eprintln!(
                    "warning: {} does not support file locks; do not start a second training on it",
                    dir.display()
                );
                return Ok(Lock { _file: None });
            }
            Err(TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", path.display()));
            }
        }
        // The pid is only for the message above; the lock itself is the kernel's.
        file.set_len(0).and_then(|_| file.write_all(format!("{}\n", std::process::id()).as_bytes())).ok();
        Ok(Lock { _file: Some(file) })
    }
}

fn pending(epoch: usize, name: &str) -> String {
    format!("pending-{epoch}-{name}")
}

/// The epoch and final name of a pending file, e.g. `pending-3-last.optim` -> (3, `last.optim`).
fn parse_pending(name: &str) -> Option<(usize, &str)> {
    let (epoch, target) = name.strip_prefix("pending-")?.split_once('-')?;
    Some((epoch.parse().ok()?, target))
}

/// The name a temporary file of [`fsio::temp_path`] stands for: `.tmp-PID-NAME` -> `NAME`.
fn temp_target(name: &str) -> Option<&str> {
    name.strip_prefix(".tmp-")?.split_once('-').map(|(_, t)| t)
}

fn names(dir: &Path) -> anyhow::Result<Vec<String>> {
    if !dir.is_dir() {
        return Ok(vec![]);
    }
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    v.sort();
    Ok(v)
}

fn remove(path: &Path) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("cannot remove {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// Where step 1 of the commit writes epoch `epoch`'s `name` (`last.unetpp`, ...).
pub fn pending_path(ck: &Path, epoch: usize, name: &str) -> std::path::PathBuf {
    ck.join(pending(epoch, name))
}

/// Removes epoch `epoch`'s pending files (a commit that failed).
pub fn discard(ck: &Path, epoch: usize) {
    for name in [LAST, OPTIM, BEST] {
        let _ = std::fs::remove_file(ck.join(pending(epoch, name)));
    }
}

/// Steps 3 and 4 of the commit, for the committed `state` (none: no epoch committed yet):
/// publishes its pending files, deletes pending files of uncommitted epochs, and rewrites
/// `metrics.csv` from the committed rows.
pub fn publish(dir: &Path, state: Option<&State>) -> anyhow::Result<()> {
    let ck = super::checkpoints(dir);
    let committed = state.map_or(0, |s| s.epoch);
    for name in names(&ck)? {
        let Some((epoch, target)) = parse_pending(&name) else { continue };
        let path = ck.join(&name);
        let wanted = epoch == committed
            && epoch > 0
            && (target == LAST || target == OPTIM || (target == BEST && state.is_some_and(|s| s.best_epoch == epoch)));
        if wanted {
            fsio::failpoint("publish.rename");
            std::fs::rename(&path, ck.join(target))
                .with_context(|| format!("cannot move {} to {}", path.display(), ck.join(target).display()))?;
        } else {
            remove(&path)?;
        }
    }
    fsio::failpoint("publish.renamed");
    let metrics = dir.join(METRICS);
    match state {
        Some(s) => {
            let text = csv(&s.history);
            if std::fs::read_to_string(&metrics).ok().as_deref() != Some(text.as_str()) {
                fsio::write_atomic(&metrics, text.as_bytes())?;
            }
        }
        None => remove(&metrics)?,
    }
    Ok(())
}

/// Brings `dir` (locked by the caller) to its last committed state and returns it (`None`: no
/// epoch was ever committed, the run starts from scratch): removes what killed writers left,
/// finishes or undoes an interrupted commit, and checks that the checkpoints match the state.
pub fn recover(dir: &Path) -> anyhow::Result<Option<State>> {
    let ck = super::checkpoints(dir);
    // Temporaries of writers that were killed; ours only (the lock says no other trainer runs),
    // plus the optimiser temporary of unetpp versions before this protocol.
    for name in names(dir)? {
        if temp_target(&name).is_some_and(|t| [CONFIG, STATE, METRICS, CURVES].contains(&t)) {
            remove(&dir.join(&name))?;
        }
    }
    for name in names(&ck)? {
        if fsio::is_temp(Path::new(&name)) || name == "last.optim.tmp" {
            remove(&ck.join(&name))?;
        }
    }
    let path = dir.join(STATE);
    let mut state: Option<State> = match std::fs::read_to_string(&path) {
        Ok(text) => Some(serde_json::from_str(&text).with_context(|| format!("cannot parse {}", path.display()))?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    if let Some(s) = state.as_mut().filter(|s| s.epoch > 0 && s.history.is_empty()) {
        // Written by an older unetpp: its metrics.csv holds the rows (maybe with uncommitted ones).
        s.history = legacy_rows(&std::fs::read_to_string(dir.join(METRICS)).unwrap_or_default(), s.epoch);
    }
    publish(dir, state.as_ref())?;
    if let Some(s) = state.as_ref().filter(|s| s.epoch > 0) {
        let epoch_of = |name: &str| checkpoint::read_meta(&ck.join(name)).map(|m| m.epoch);
        let last = epoch_of(LAST)?;
        ensure!(
            last == s.epoch,
            "{} is from epoch {last} but {} says epoch {} (left by an older unetpp killed while saving); \
             this run cannot be resumed exactly: start a new one, or fine-tune from it with --weights",
            ck.join(LAST).display(),
            path.display(),
            s.epoch
        );
        let best = epoch_of(BEST)?;
        ensure!(
            best == s.best_epoch,
            "{} is from epoch {best} but {} says the best epoch is {}; this run cannot be resumed exactly",
            ck.join(BEST).display(),
            path.display(),
            s.best_epoch
        );
        ensure!(ck.join(OPTIM).is_file(), "{} is missing: the run cannot be resumed exactly", ck.join(OPTIM).display());
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_of_pending_and_temporary_files() {
        assert_eq!(parse_pending("pending-12-last.optim"), Some((12, "last.optim")));
        assert_eq!(parse_pending("pending-x-last.optim"), None);
        assert_eq!(parse_pending("best.unetpp"), None);
        let tmp = fsio::temp_path(Path::new("/r/metrics.csv"));
        assert_eq!(temp_target(tmp.file_name().unwrap().to_str().unwrap()), Some("metrics.csv"));
    }

    #[test]
    fn legacy_metrics_keep_committed_well_formed_rows() {
        let text = "epoch,step,train_loss,val_iou,val_dice,seconds\n1,2,0.5,0.1,0.2,1.0\n2,4,0.4,NaN,NaN,2.0\n\
                    2,4,0.4,0.2,0.3,2.5\n3,6,0.3,0.3,0.4,3.0\n4,8,0.2,0.3,0.4,4.05,8,0.2,0.3,0.4,4.0\n\n5,10,0.1";
        let rows = legacy_rows(text, 3);
        assert_eq!(rows.iter().map(|r| r.epoch).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(rows[1].val_iou, Some(0.2), "the later row of a repeated epoch wins");
        assert_eq!(csv(&rows).lines().nth(2), Some("2,4,0.400000,0.200000,0.300000,2.5"));
        let no_val = Row { epoch: 1, step: 2, train_loss: 0.5, val_iou: None, val_dice: None, seconds: 1.0 };
        assert_eq!(csv(&[no_val]).lines().nth(1), Some("1,2,0.500000,NaN,NaN,1.0"));
    }

    #[test]
    fn second_lock_is_refused_with_the_holders_pid_and_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let held = Lock::acquire(dir.path()).unwrap();
        let err = format!("{:#}", Lock::acquire(dir.path()).err().unwrap());
        assert!(err.contains(&format!("pid {}", std::process::id())), "{err}");
        assert!(err.contains(&dir.path().display().to_string()), "{err}");
        drop(held);
        Lock::acquire(dir.path()).unwrap();
    }
}
