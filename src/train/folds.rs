//! k-fold cross-validation training, as nnU-Net's (`nnunetv2/utilities/crossval_split.py`,
//! `run/run_training.py`): the training cases are split once, by a fixed seed, into K folds,
//! saved as `RUN/splits.json` in nnU-Net's format (a list of `{"train": [...], "val": [...]}` by
//! case name), and fold I trains in `RUN/fold_I/`, an ordinary run directory (its own lock,
//! commit point and exact `--resume`) whose `config.toml` lists its training and validation cases.
//!
//! - The split does not depend on `--seed`: every configuration trained on the same data is
//!   cross-validated on the same folds, so their scores compare (nnU-Net seeds it with 12345).
//!   Cases are shuffled, then cut into K consecutive folds, the first `n % K` one case larger, as
//!   scikit-learn's `KFold(shuffle=True)`; the shuffle is this crate's, not numpy's, so the folds
//!   are not nnU-Net's for the same names. Each list is sorted by name.
//! - The cases are all labelled cases of `train/` and, where the data has one, `val/` (nnU-Net's
//!   "all training cases"); `test/` stays out. `--val-fraction` plays no part.
//! - `splits.json` and `folds.toml` (the configuration every fold trains) are written once and
//!   never rewritten. A later `train --folds` into the same folder must ask for the same
//!   configuration and find the same cases; a `splits.json` that no longer matches the data is an
//!   error naming the cases. A hand-written `splits.json` (nnU-Net allows custom splits) is used
//!   as it is if its folds' validation sets are disjoint and cover the data.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail, ensure};
use rand::seq::SliceRandom;
use rand::{SeedableRng, rngs::StdRng};
use serde::{Deserialize, Serialize};

use super::{Run, State, TrainConfig, rundir};
use crate::data::{self, Sample, Splits};
use crate::fsio;

pub const SPLITS: &str = "splits.json";
/// The configuration every fold trains with (without its cases); `train --resume RUN` reads it.
pub const CONFIG: &str = "folds.toml";
/// nnU-Net's split seed.
pub const SPLIT_SEED: u64 = 12345;

/// One fold of `splits.json`: case names.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Split {
    pub train: Vec<String>,
    pub val: Vec<String>,
}

/// Which cases a fold's run trains and validates on; part of its `config.toml`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fold {
    pub index: usize,
    pub folds: usize,
    pub train: Vec<String>,
    pub val: Vec<String>,
}

/// What `folds.toml` holds.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FoldsConfig {
    folds: usize,
    train: TrainConfig,
}

/// A fold's run directory.
pub fn fold_dir(run: &Path, fold: usize) -> PathBuf {
    run.join(format!("fold_{fold}"))
}

/// Whether `dir` is a cross-validation run (what `train --resume` checks).
pub fn is_folds_run(dir: &Path) -> bool {
    dir.join(CONFIG).is_file() || dir.join(SPLITS).is_file()
}

/// The split folders whose cases are cross-validated: `train/` and `val/`.
pub fn case_dirs(data: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let splits = Splits::find(data)?;
    let train = splits.train.with_context(|| format!("no train/ split (or images/ folder) in {}", data.display()))?;
    Ok([Some(train), splits.val].into_iter().flatten().collect())
}

/// The labelled case names of the data (train/ and val/ together), sorted; a name in both is
/// an error, as the folds are by name.
pub fn case_names(data: &Path) -> anyhow::Result<Vec<String>> {
    let mut seen: BTreeMap<String, PathBuf> = BTreeMap::new();
    for dir in case_dirs(data)? {
        for p in data::pairs(&dir, true)? {
            if let Some(prev) = seen.insert(p.name.clone(), p.image.clone()) {
                bail!(
                    "case `{}` is in both {} and {}: cross-validation splits cases by name; rename one",
                    p.name,
                    prev.display(),
                    p.image.display()
                );
            }
        }
    }
    Ok(seen.into_keys().collect())
}

/// The K-fold split of `names` (sorted), as scikit-learn's `KFold(K, shuffle=True)` cuts it.
pub fn make_splits(names: &[String], k: usize, seed: u64) -> Vec<Split> {
    let mut order: Vec<usize> = (0..names.len()).collect();
    order.shuffle(&mut StdRng::seed_from_u64(seed));
    let (base, extra) = (names.len() / k, names.len() % k);
    let mut start = 0;
    (0..k)
        .map(|i| {
            let len = base + usize::from(i < extra);
            let val: BTreeSet<usize> = order[start..start + len].iter().copied().collect();
            start += len;
            let pick = |inside: bool| -> Vec<String> {
                (0..names.len()).filter(|j| val.contains(j) == inside).map(|j| names[j].clone()).collect()
            };
            Split { train: pick(false), val: pick(true) }
        })
        .collect()
}

/// Checks a `splits.json` against the data's cases: validation sets disjoint from their training
/// sets and from each other, every case validated once, no name the data lacks.
pub fn check_splits(splits: &[Split], names: &[String], path: &Path) -> anyhow::Result<()> {
    ensure!(splits.len() >= 2, "{} holds {} fold(s); cross-validation needs at least 2", path.display(), splits.len());
    let data: BTreeSet<&String> = names.iter().collect();
    let listed: BTreeSet<&String> = splits.iter().flat_map(|s| s.train.iter().chain(&s.val)).collect();
    let missing: Vec<&str> = listed.difference(&data).map(|s| s.as_str()).collect();
    ensure!(
        missing.is_empty(),
        "{} names case(s) the data no longer has: {}; train into a new run directory to split the data again",
        path.display(),
        missing.join(", ")
    );
    let mut validated: BTreeMap<&String, usize> = BTreeMap::new();
    for (i, s) in splits.iter().enumerate() {
        if let Some(c) = s.val.iter().find(|c| s.train.contains(c)) {
            bail!("{}: case `{c}` is in both the training and the validation cases of fold {i}", path.display());
        }
        for c in &s.val {
            if let Some(j) = validated.insert(c, i) {
                bail!(
                    "{}: case `{c}` is validated in folds {j} and {i}; each case belongs to one fold",
                    path.display()
                );
            }
        }
    }
    let unsplit: Vec<&str> = data.iter().filter(|c| !validated.contains_key(*c)).map(|c| c.as_str()).collect();
    ensure!(
        unsplit.is_empty(),
        "the data has case(s) {} does not validate in any fold: {}; train into a new run directory to split the data again",
        path.display(),
        unsplit.join(", ")
    );
    Ok(())
}

/// The folds of the run in `run`, from its `splits.json`.
pub fn read_splits(run: &Path) -> anyhow::Result<Vec<Split>> {
    let path = run.join(SPLITS);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {} (is {} a `train --folds` run?)", path.display(), run.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{} is not a list of {{\"train\": [...], \"val\": [...]}} folds", path.display()))
}

/// The configuration every fold of `run` trains with (from its `folds.toml`), and K.
pub fn config(run: &Path) -> anyhow::Result<(TrainConfig, usize)> {
    let path = run.join(CONFIG);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {} (is {} a `train --folds` run?)", path.display(), run.display()))?;
    let c: FoldsConfig = toml::from_str(&text).with_context(|| format!("cannot parse {}", path.display()))?;
    Ok((c.train, c.folds))
}

/// The configuration fold `i` trains with.
pub fn fold_config(base: &TrainConfig, splits: &[Split], i: usize) -> TrainConfig {
    let s = &splits[i];
    let fold = Fold { index: i, folds: splits.len(), train: s.train.clone(), val: s.val.clone() };
    TrainConfig { fold: Some(fold), ..base.clone() }
}

/// The top-level keys where two configurations differ (the backend may: it is where, not what).
fn differences(a: &TrainConfig, b: &TrainConfig) -> anyhow::Result<Vec<String>> {
    let table = |c: &TrainConfig| -> anyhow::Result<toml::Table> {
        let mut t = toml::Table::try_from(c)?;
        t.remove("backend");
        Ok(t)
    };
    let (a, b) = (table(a)?, table(b)?);
    let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    Ok(keys.into_iter().filter(|k| a.get(*k) != b.get(*k)).cloned().collect())
}

/// The configuration and folds of `run`: written on the first call (from `base` and `k`),
/// read and checked against `base`, `k` and the data after that.
fn prepare(base: Option<TrainConfig>, run: &Path, k: Option<usize>) -> anyhow::Result<(TrainConfig, Vec<Split>)> {
    let cfg_path = run.join(CONFIG);
    let saved: Option<FoldsConfig> = match std::fs::read_to_string(&cfg_path) {
        Ok(text) => Some(toml::from_str(&text).with_context(|| format!("cannot parse {}", cfg_path.display()))?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", cfg_path.display())),
    };
    let (base, k) = match (base, &saved) {
        (Some(b), _) => (b, k.or(saved.as_ref().map(|s| s.folds))),
        (None, Some(s)) => (s.train.clone(), k.or(Some(s.folds))),
        (None, None) => bail!(
            "no cross-validation run to resume in {} (no readable {}); start one with `train --folds K --out {}`",
            run.display(),
            cfg_path.display(),
            run.display()
        ),
    };
    let k = k.context("--fold needs --folds K (or `train --resume RUN` on a cross-validation run)")?;
    ensure!(k >= 2, "--folds must be at least 2, got {k}");
    ensure!(base.fold.is_none(), "the configuration already names a fold's cases; train --folds from the data's own");
    base.validate()?;
    let names = case_names(&base.data)?;
    ensure!(
        names.len() >= k,
        "--folds {k}: the data has {} training case(s); each fold needs at least one validation case",
        names.len()
    );
    let splits_path = run.join(SPLITS);
    let splits = if splits_path.exists() {
        let splits = read_splits(run)?;
        check_splits(&splits, &names, &splits_path)?;
        ensure!(
            splits.len() == k,
            "--folds {k}: {} holds {} folds; pass --folds {} or train into a new run directory",
            splits_path.display(),
            splits.len(),
            splits.len()
        );
        splits
    } else {
        make_splits(&names, k, SPLIT_SEED)
    };
    if let Some(s) = &saved {
        let diff = differences(&s.train, &base)?;
        ensure!(
            diff.is_empty() && s.folds == k,
            "{} was started with another configuration (it differs in: {}); continue it with \
             `train --resume {}` or train into a new run directory",
            run.display(),
            if diff.is_empty() { "folds".to_string() } else { diff.join(", ") },
            run.display()
        );
    }
    std::fs::create_dir_all(run).with_context(|| format!("cannot create {}", run.display()))?;
    if !splits_path.exists() {
        fsio::write_atomic(&splits_path, serde_json::to_string_pretty(&splits)?.as_bytes())?;
    }
    if saved.is_none() {
        let text = toml::to_string(&FoldsConfig { folds: k, train: base.clone() })?;
        fsio::write_atomic(&cfg_path, text.as_bytes())?;
    }
    Ok((base, splits))
}

/// The committed state of a run directory whose every epoch is done and published.
fn finished(dir: &Path, cfg: &TrainConfig) -> anyhow::Result<Option<State>> {
    let path = dir.join(rundir::STATE);
    let Ok(text) = std::fs::read_to_string(&path) else { return Ok(None) };
    let state: State = serde_json::from_str(&text).with_context(|| format!("cannot parse {}", path.display()))?;
    let pending = std::fs::read_dir(super::checkpoints(dir))
        .map(|d| d.flatten().any(|e| e.file_name().to_string_lossy().starts_with("pending-")))
        .unwrap_or(true);
    let done = (state.epoch >= cfg.epochs || state.stopped_early) && !pending;
    Ok(Some(state).filter(|_| done))
}

/// `train --folds K [--fold I]` (`base` given) or `train --resume RUN [--fold I]` (`base` None):
/// trains fold `only`, or every fold in turn; a finished fold is skipped, a cut-off one resumed.
pub fn train(base: Option<TrainConfig>, run: &Path, k: Option<usize>, only: Option<usize>) -> anyhow::Result<Vec<Run>> {
    let (base, splits) = prepare(base, run, k)?;
    if let Some(i) = only {
        ensure!(i < splits.len(), "--fold {i}: the run has folds 0 to {}", splits.len() - 1);
    }
    let mut runs = vec![];
    for i in (0..splits.len()).filter(|&i| only.is_none_or(|o| o == i)) {
        let dir = fold_dir(run, i);
        let cfg = fold_config(&base, &splits, i);
        if dir.join(rundir::CONFIG).exists() {
            let path = dir.join(rundir::CONFIG);
            let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
            let had: TrainConfig = toml::from_str(&text).with_context(|| format!("cannot parse {}", path.display()))?;
            let diff = differences(&had, &cfg)?;
            ensure!(
                diff.is_empty(),
                "{} was started with another configuration than {} says (it differs in: {})",
                dir.display(),
                run.join(CONFIG).display(),
                diff.join(", ")
            );
            if let Some(state) = finished(&dir, &cfg)? {
                eprintln!("fold {i}: finished already ({}), skipped", dir.display());
                runs.push(Run { dir, state });
                continue;
            }
            eprintln!("fold {i}/{}: continuing {}", splits.len(), dir.display());
            runs.push(super::train(None, &dir)?);
        } else {
            eprintln!("fold {i}/{}: training in {}", splits.len(), dir.display());
            runs.push(super::train(Some(cfg), &dir)?);
        }
    }
    Ok(runs)
}

/// Every labelled case of `cfg`'s data (train/ and val/), read as `cfg.input` says.
pub fn load_cases(data_dir: &Path, input: &data::DataConfig, skip_bad: bool) -> anyhow::Result<Vec<Sample>> {
    let mut all = vec![];
    for dir in case_dirs(data_dir)? {
        all.extend(data::load(&dir, input, true, skip_bad)?);
    }
    Ok(all)
}

/// The samples named by `names`, in that order, taken out of `all`; a name without a sample is
/// an error (unless `skip_bad` left it out, which was reported when it was).
pub fn take<T>(
    all: &mut Vec<T>,
    names: &[String],
    skip_bad: bool,
    what: &str,
    name: impl Fn(&T) -> &str,
) -> anyhow::Result<Vec<T>> {
    let mut out = vec![];
    let mut missing = vec![];
    for n in names {
        match all.iter().position(|s| name(s) == n) {
            Some(j) => out.push(all.swap_remove(j)),
            None => missing.push(n.as_str()),
        }
    }
    ensure!(skip_bad || missing.is_empty(), "{what} names case(s) the data no longer has: {}", missing.join(", "));
    Ok(out)
}

/// A fold's training and validation samples (what [`super::load_splits`] reads for it).
pub fn samples(cfg: &TrainConfig, fold: &Fold) -> anyhow::Result<(Vec<Sample>, Vec<Sample>)> {
    let mut all = load_cases(&cfg.data, &cfg.input, cfg.skip_bad)?;
    let what = format!("fold {}", fold.index);
    let train = take(&mut all, &fold.train, cfg.skip_bad, &what, |s| &s.name)?;
    let val = take(&mut all, &fold.val, cfg.skip_bad, &what, |s| &s.name)?;
    ensure!(!train.is_empty(), "fold {}: none of its training cases could be read", fold.index);
    Ok((train, val))
}

/// The folds' best checkpoints, `RUN/fold_I/checkpoints/best.unetpp` in fold order: what an
/// ensemble of the cross-validation models predicts with. A fold not trained yet is an error
/// naming the command that trains it.
pub fn checkpoints(run: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let splits = read_splits(run)?;
    (0..splits.len())
        .map(|i| {
            let ck = super::checkpoints(&fold_dir(run, i)).join(rundir::BEST);
            ensure!(
                ck.is_file(),
                "fold {i} of {} has no best checkpoint ({}); train it with `unetpp train --resume {} --fold {i}`",
                run.display(),
                ck.display(),
                run.display()
            );
            Ok(ck)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("case{i:02}")).collect()
    }

    #[test]
    fn folds_are_disjoint_cover_every_case_and_follow_the_seed() {
        let all = names(11);
        let s = make_splits(&all, 3, SPLIT_SEED);
        assert_eq!(s.iter().map(|f| f.val.len()).collect::<Vec<_>>(), [4, 4, 3], "KFold's sizes");
        let mut val: Vec<String> = s.iter().flat_map(|f| f.val.clone()).collect();
        val.sort();
        assert_eq!(val, all, "every case validated exactly once");
        for f in &s {
            assert_eq!(f.train.len() + f.val.len(), 11);
            assert!(f.train.iter().all(|c| !f.val.contains(c)));
            assert!(f.train.is_sorted() && f.val.is_sorted());
        }
        check_splits(&s, &all, Path::new("splits.json")).unwrap();
        assert_eq!(make_splits(&all, 3, SPLIT_SEED), s);
        assert_ne!(make_splits(&all, 3, 1), s, "another seed, another split");
        assert_ne!(s[0].val, all[..4], "the cases are shuffled");
    }

    #[test]
    fn a_split_that_no_longer_matches_the_data_names_the_cases() {
        let all = names(6);
        let s = make_splits(&all, 2, SPLIT_SEED);
        let err = check_splits(&s, &all[1..], Path::new("R/splits.json")).unwrap_err().to_string();
        assert!(err.contains("R/splits.json") && err.contains("case00"), "{err}");
        let mut more = all.clone();
        more.push("new".into());
        let err = check_splits(&s, &more, Path::new("R/splits.json")).unwrap_err().to_string();
        assert!(err.contains("`new`") || err.contains(": new"), "{err}");
        let mut twice = s.clone();
        let first = twice[0].val[0].clone();
        twice[1].train.retain(|c| *c != first);
        twice[1].val.push(first);
        let err = check_splits(&twice, &all, Path::new("s.json")).unwrap_err().to_string();
        assert!(err.contains("folds 0 and 1"), "{err}");
    }
}
