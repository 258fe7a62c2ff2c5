//! The paper's comparison as one command: every model x seed (x fold) trained with the same
//! recipe, evaluated on the test split in accurate and every fast mode, and rendered as a
//! Markdown report. Each run lives in its own directory and is reused when complete (resumed
//! when cut off), so the table can be built across several sessions and re-rendered for free.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::checkpoint;
use crate::data::{self, Splits};
use crate::fsio;
use crate::infer::{self, Summary};
use crate::metrics;
use crate::model::{Arch, Mode, ModelConfig};
use crate::train::{self, State, TrainConfig};

/// One model of the comparison: overrides of the recipe's model.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Variant {
    pub name: String,
    pub arch: Arch,
    #[serde(default)]
    pub width: Option<usize>,
    #[serde(default)]
    pub depth: Option<usize>,
    pub deep_supervision: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    pub title: String,
    pub seeds: Vec<u64>,
    /// The recipe every run shares, as a run's `config.toml`; `model` is the base each variant
    /// overrides, `seed` is replaced per run.
    pub train: TrainConfig,
    pub models: Vec<Variant>,
    /// Add an Otsu-threshold row (binary data).
    #[serde(default)]
    pub otsu: bool,
    /// Leave-one-out over the data's `images/` (for sets of a handful of volumes): each image is
    /// the test set once, the others train.
    #[serde(default)]
    pub folds: bool,
    /// Image size [depth, height, width] at which each pruning level is timed.
    #[serde(default)]
    pub timing: Option<[usize; 3]>,
    /// Names of labels 1..classes (multi-class data), for the per-class table.
    #[serde(default)]
    pub class_names: Vec<String>,
}

/// `--quick`: the whole pipeline in minutes (one seed, a few steps, few test images).
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    pub quick: bool,
}

/// What a finished run left behind for the report.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunResult {
    pub model: String,
    pub seed: u64,
    pub fold: Option<String>,
    pub train_seconds: f64,
    pub epochs: usize,
    pub best_epoch: usize,
    pub eval_seconds: f64,
    /// Accurate first, then fast:1..L for deep-supervised models.
    pub modes: Vec<Summary>,
    /// Per test image IoU in accurate mode.
    pub images: Vec<(String, f64)>,
    /// Dice of labels 1..classes in accurate mode, mean over test images.
    #[serde(default)]
    pub class_dice: Vec<f64>,
}

fn slug(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect()
}

/// Where the run of `model` with `seed` (testing on `fold`) lives under the experiment's `out`.
fn run_dir(out: &Path, model: &str, seed: u64, fold: Option<&str>) -> PathBuf {
    let dir = out.join(slug(model)).join(format!("seed-{seed}"));
    match fold {
        Some(f) => dir.join(format!("fold-{f}")),
        None => dir,
    }
}

pub fn read_spec(path: &Path) -> anyhow::Result<Spec> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("cannot parse {}", path.display()))
}

impl Spec {
    fn quick(mut self) -> Self {
        self.seeds.truncate(1);
        let t = &mut self.train;
        t.epochs = 1;
        t.steps_per_epoch = 3;
        t.batch_size = t.batch_size.min(4);
        t.val_crop = [t.val_crop[0].min(32), 128, 128];
        self
    }

    fn config(&self, v: &Variant, seed: u64, data: &Path) -> TrainConfig {
        let base = &self.train.model;
        let model = ModelConfig {
            arch: v.arch,
            width: v.width.unwrap_or(base.width),
            depth: v.depth.unwrap_or(base.depth),
            deep_supervision: v.deep_supervision,
            ..base.clone()
        };
        TrainConfig { model, seed, data: data.to_path_buf(), ..self.train.clone() }
    }
}

/// Leave-one-out fold directories of symlinks: `folds/<name>/{train,test}/{images,<masks>}`.
fn make_folds(data: &Path, out: &Path) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let pairs = data::pairs(data, true)?;
    anyhow::ensure!(pairs.len() >= 2, "{}: leave-one-out needs at least 2 images", data.display());
    let mut folds = vec![];
    for held in &pairs {
        let dir = out.join("folds").join(&held.name);
        for p in &pairs {
            let split = if p.name == held.name { "test" } else { "train" };
            let mask = p.mask.as_ref().unwrap();
            for (src, sub) in [(&p.image, "images"), (mask, "labels")] {
                let target = dir.join(split).join(sub);
                std::fs::create_dir_all(&target)?;
                let link = target.join(src.file_name().unwrap());
                if !link.exists() {
                    let abs = std::fs::canonicalize(src)?;
                    std::os::unix::fs::symlink(&abs, &link)
                        .with_context(|| format!("cannot link {}", link.display()))?;
                }
            }
        }
        folds.push((held.name.clone(), dir));
    }
    Ok(folds)
}

fn is_done(dir: &Path, epochs: usize) -> anyhow::Result<Option<State>> {
    let Ok(text) = std::fs::read_to_string(dir.join("state.json")) else { return Ok(None) };
    let state: State = serde_json::from_str(&text)?;
    Ok((state.epoch >= epochs || state.stopped_early).then_some(state))
}

fn modes_of(cfg: &ModelConfig) -> Vec<Mode> {
    let mut modes = vec![Mode::Accurate];
    if cfg.head_columns().len() > 1 {
        modes.extend(cfg.head_columns().into_iter().map(Mode::Fast));
    }
    modes
}

/// Trains (or resumes) and evaluates one run unless its `result.json` exists.
fn run_one(cfg: TrainConfig, dir: &Path, name: &str, fold: Option<&str>, quick: bool) -> anyhow::Result<RunResult> {
    let cached = dir.join("result.json");
    if let Ok(text) = std::fs::read_to_string(&cached) {
        return Ok(serde_json::from_str(&text)?);
    }
    let state = match is_done(dir, cfg.epochs)? {
        Some(s) => s,
        None if dir.join("config.toml").exists() => train::train(None, dir)?.state,
        None => train::train(Some(cfg.clone()), dir)?.state,
    };
    let ck = dir.join("checkpoints/best.unetpp");
    let result = crate::for_rank!(cfg.model.dims, evaluate(&cfg, &ck, quick))?;
    let (eval_seconds, modes, images, class_dice) = result;
    let r = RunResult {
        model: name.to_string(),
        seed: cfg.seed,
        fold: fold.map(str::to_string),
        train_seconds: state.seconds,
        epochs: state.epoch,
        best_epoch: state.best_epoch,
        eval_seconds,
        modes,
        images,
        class_dice,
    };
    fsio::write_atomic(&cached, serde_json::to_string_pretty(&r)?.as_bytes())?;
    Ok(r)
}

type Eval = (f64, Vec<Summary>, Vec<(String, f64)>, Vec<f64>);

fn test_samples(cfg: &TrainConfig, meta_data: &data::DataConfig, quick: bool) -> anyhow::Result<Vec<data::Sample>> {
    let splits = Splits::find(&cfg.data)?;
    let dir = splits.test.context("the experiment's data has no test/ split")?;
    let mut samples = data::load(&dir, meta_data, true, cfg.skip_bad)?;
    if quick {
        samples.truncate(2);
    }
    Ok(samples)
}

fn evaluate<const D: usize>(cfg: &TrainConfig, ck: &Path, quick: bool) -> anyhow::Result<Eval> {
    let device = cfg.backend.device();
    let (model, meta) = checkpoint::load::<D>(ck, &device)?;
    let model = model.fold_batchnorm();
    let samples = test_samples(cfg, &meta.data, quick)?;
    let modes = modes_of(&meta.model);
    let start = std::time::Instant::now();
    let (models, sliding) = (std::slice::from_ref(&model), infer::Sliding::new(cfg.tile));
    let scoring = infer::Scoring { spacing: meta.data.spacing, ..Default::default() };
    let all = infer::evaluate(models, &samples, &modes, &sliding, &device, |_, _| Ok(()), &scoring)?;
    let seconds = start.elapsed().as_secs_f64();
    let scores = &all[0].0;
    let images = scores.iter().map(|s| (s.name.clone(), s.iou)).collect();
    let class_dice = (0..scores[0].per_class.len())
        .map(|c| scores.iter().map(|s| s.per_class[c].dice).sum::<f64>() / scores.len() as f64)
        .collect();
    Ok((seconds, all.into_iter().map(|(_, s)| s).collect(), images, class_dice))
}

/// Otsu's threshold on the normalised image (foreground = brighter), per test image.
fn otsu(cfg: &TrainConfig, quick: bool) -> anyhow::Result<Summary> {
    let samples = test_samples(cfg, &cfg.input, quick)?;
    let mut scores = vec![];
    for s in &samples {
        let n = s.voxels();
        let grey: Vec<f32> = (0..n).map(|i| (0..s.channels).map(|c| s.image[c * n + i]).sum::<f32>()).collect();
        let t = otsu_threshold(&grey);
        let pred: Vec<bool> = grey.iter().map(|&v| v > t).collect();
        let truth: Vec<bool> = s.mask.iter().map(|&m| m > 0).collect();
        scores.push(metrics::binary(&pred, &truth));
    }
    let (mean_iou, std_iou) = metrics::mean_std(&scores.iter().map(|o| o.iou).collect::<Vec<_>>());
    let (mean_dice, std_dice) = metrics::mean_std(&scores.iter().map(|o| o.dice).collect::<Vec<_>>());
    Ok(Summary {
        mode: "otsu".into(),
        images: scores.len(),
        mean_dice,
        std_dice,
        mean_iou,
        std_iou,
        seconds: 0.0,
        per_class: vec![],
        surface: None,
    })
}

/// The threshold maximising the between-class variance of a 256-bin histogram.
pub fn otsu_threshold(v: &[f32]) -> f32 {
    let (lo, hi) = v.iter().fold((f32::MAX, f32::MIN), |(a, b), &x| (a.min(x), b.max(x)));
    if hi <= lo {
        return hi;
    }
    let bin = |x: f32| (((x - lo) / (hi - lo)) * 255.0).round() as usize;
    let mut hist = [0f64; 256];
    v.iter().for_each(|&x| hist[bin(x)] += 1.0);
    let total: f64 = hist.iter().sum();
    let sum_all: f64 = hist.iter().enumerate().map(|(i, h)| i as f64 * h).sum();
    let (mut w0, mut sum0, mut best, mut best_t) = (0.0, 0.0, -1.0, 0);
    for (t, &h) in hist.iter().enumerate() {
        w0 += h;
        sum0 += t as f64 * h;
        let w1 = total - w0;
        if w0 == 0.0 || w1 == 0.0 {
            continue;
        }
        let between = w0 * w1 * (sum0 / w0 - (sum_all - sum0) / w1).powi(2);
        if between > best {
            best = between;
            best_t = t;
        }
    }
    lo + (best_t as f32 + 0.5) / 255.0 * (hi - lo)
}

/// Parameters and median milliseconds of one image in each pruning level (and accurate).
fn timing<const D: usize>(ck: &Path, size: [usize; 3], reps: usize) -> anyhow::Result<Vec<(Mode, usize, f64)>> {
    let device = Device::flex();
    let (raw, meta) = checkpoint::load::<D>(ck, &device)?;
    let model = raw.clone().fold_batchnorm();
    let cfg = meta.model;
    let shape: [usize; D] = std::array::from_fn(|a| match a {
        0 => 1,
        1 => cfg.in_channels,
        _ => size[a - 2 + (5 - D)],
    });
    let mut rows = vec![];
    for mode in modes_of(&cfg) {
        let params = match mode {
            Mode::Accurate => raw.num_params(),
            Mode::Fast(l) => raw.clone().prune(l)?.num_params(),
        };
        let mut ms = vec![];
        for r in 0..=reps {
            let x = Tensor::<D>::zeros(shape, &device);
            let t = std::time::Instant::now();
            let _busy = crate::backend::busy_workers();
            let y = model.predict(x, mode)?;
            let _ = y.into_data();
            if r > 0 {
                ms.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        ms.sort_by(f64::total_cmp);
        rows.push((mode, params, ms[ms.len() / 2]));
    }
    Ok(rows)
}

/// Runs (or reuses) every run of the spec and writes the report.
pub fn run(spec: Spec, out: &Path, report: &Path, command: &str, o: Options) -> anyhow::Result<Vec<RunResult>> {
    let spec = if o.quick { spec.quick() } else { spec };
    std::fs::create_dir_all(out)?;
    fsio::write_atomic(&out.join("spec.toml"), toml::to_string(&spec)?.as_bytes())?;
    let folds: Vec<(Option<String>, PathBuf)> = if spec.folds {
        make_folds(&spec.train.data, out)?.into_iter().map(|(n, d)| (Some(n), d)).collect()
    } else {
        vec![(None, spec.train.data.clone())]
    };
    let mut results = vec![];
    for (fold, data) in &folds {
        for seed in &spec.seeds {
            for v in &spec.models {
                let dir = run_dir(out, &v.name, *seed, fold.as_deref());
                eprintln!(
                    "== {} seed {seed}{}",
                    v.name,
                    fold.as_ref().map(|f| format!(" test {f}")).unwrap_or_default()
                );
                let r = run_one(spec.config(v, *seed, data), &dir, &v.name, fold.as_deref(), o.quick)?;
                results.push(r);
                // Re-rendered after every run, so an interrupted experiment still has a report.
                render(&spec, out, &results, report, command, None, None)?;
            }
        }
    }
    let otsu_row = if spec.otsu && !spec.folds { Some(otsu(&spec.train, o.quick)?) } else { None };
    let timing_rows = match (spec.timing, spec.models.iter().find(|v| v.deep_supervision)) {
        (Some(size), Some(v)) => {
            let ck = run_dir(out, &v.name, spec.seeds[0], folds[0].0.as_deref()).join("checkpoints/best.unetpp");
            let reps = if o.quick { 1 } else { 5 };
            Some(crate::for_rank!(spec.train.model.dims, timing(&ck, size, reps))?)
        }
        _ => None,
    };
    render(&spec, out, &results, report, command, otsu_row.as_ref(), timing_rows.as_deref())?;
    Ok(results)
}

/// PyTorch reference runs written by `bench/train_ref.py` (same JSON as ours), if any.
fn reference_runs(out: &Path) -> Vec<RunResult> {
    let Ok(entries) = std::fs::read_dir(out.join("pytorch")) else { return vec![] };
    let mut v: Vec<RunResult> = entries
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("result.json")).ok())
        .filter_map(|t| serde_json::from_str(&t).ok())
        .collect();
    v.sort_by_key(|r| r.seed);
    v
}

fn pm(v: &[f64]) -> String {
    let (m, s) = metrics::mean_std(v);
    if v.len() > 1 { format!("{m:.4} ± {s:.4}") } else { format!("{m:.4}") }
}

fn git_commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

fn cpu() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap().trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn render(
    spec: &Spec,
    out: &Path,
    results: &[RunResult],
    report: &Path,
    command: &str,
    otsu: Option<&Summary>,
    timing: Option<&[(Mode, usize, f64)]>,
) -> anyhow::Result<()> {
    let t = &spec.train;
    let mut s = String::new();
    writeln!(s, "# {}\n", spec.title)?;
    writeln!(s, "Written by `{command}` at commit `{}`.", git_commit())?;
    writeln!(
        s,
        "Machine: {} ({} threads), default Flex backend. Runs are cached in `{}`.\n",
        cpu(),
        rayon::current_num_threads(),
        out.display()
    )?;
    writeln!(
        s,
        "Recipe (same for every model): {} epochs x {} steps x batch {} of {:?} patches, Adam lr {}, \
         foreground share {}, early stopping after {} epochs without a better validation IoU; seeds {:?}.\n",
        t.epochs, t.steps_per_epoch, t.batch_size, t.patch, t.lr, t.foreground, t.patience, spec.seeds
    )?;
    writeln!(
        s,
        "## Test scores (accurate mode, mean ± std over runs; each run's score is its mean over test images)\n"
    )?;
    writeln!(s, "| model | params | runs | IoU | Dice | train time per run | epochs run (best) |")?;
    writeln!(s, "|---|---|---|---|---|---|---|")?;
    if let Some(o) = otsu {
        writeln!(s, "| Otsu threshold | 0 | – | {:.4} | {:.4} | – | – |", o.mean_iou, o.mean_dice)?;
    }
    let mut rows: Vec<(String, Vec<&RunResult>)> = vec![];
    for v in &spec.models {
        rows.push((v.name.clone(), results.iter().filter(|r| r.model == v.name).collect()));
    }
    let refs = reference_runs(out);
    if !refs.is_empty() {
        rows.push((format!("PyTorch {} (reference)", refs[0].model), refs.iter().collect()));
    }
    for (name, runs) in &rows {
        if runs.is_empty() {
            continue;
        }
        let params = spec
            .models
            .iter()
            .find(|v| &v.name == name)
            .and_then(|v| crate::dispatch::num_params(&spec.config(v, 0, &t.data).model, None).ok())
            .map(|p| format!("{:.2}M", p as f64 / 1e6))
            .unwrap_or_else(|| "–".into());
        let iou: Vec<f64> = runs.iter().map(|r| r.modes[0].mean_iou).collect();
        let dice: Vec<f64> = runs.iter().map(|r| r.modes[0].mean_dice).collect();
        let secs: Vec<f64> = runs.iter().map(|r| r.train_seconds).collect();
        let (m, _) = metrics::mean_std(&secs);
        let epochs: Vec<String> = runs.iter().map(|r| format!("{} ({})", r.epochs, r.best_epoch)).collect();
        writeln!(
            s,
            "| {name} | {params} | {} | {} | {} | {:.1} min | {} |",
            runs.len(),
            pm(&iou),
            pm(&dice),
            m / 60.0,
            epochs.join(", ")
        )?;
    }
    // Deep-supervised models: every mode from the same checkpoints.
    for v in spec.models.iter().filter(|v| v.deep_supervision) {
        let runs: Vec<&RunResult> = results.iter().filter(|r| r.model == v.name).collect();
        if runs.is_empty() {
            continue;
        }
        writeln!(s, "\n## {}: accurate vs fast (pruned) modes, same checkpoints\n", v.name)?;
        writeln!(s, "| mode | IoU | Dice |")?;
        writeln!(s, "|---|---|---|")?;
        for (k, m) in runs[0].modes.iter().enumerate() {
            let iou: Vec<f64> = runs.iter().map(|r| r.modes[k].mean_iou).collect();
            let dice: Vec<f64> = runs.iter().map(|r| r.modes[k].mean_dice).collect();
            writeln!(s, "| {} | {} | {} |", m.mode, pm(&iou), pm(&dice))?;
        }
        if let Some(rows) = timing {
            let size = spec.timing.unwrap();
            writeln!(
                s,
                "\n### Pruning: parameters, time per image ({}), IoU\n",
                if t.model.dims == 2 { format!("1x{}x{}", size[1], size[2]) } else { format!("{size:?}") }
            )?;
            writeln!(s, "| network | params | ms per image | IoU |")?;
            writeln!(s, "|---|---|---|---|")?;
            let mut points = vec![];
            for (mode, params, ms) in rows {
                let k = runs[0].modes.iter().position(|m| m.mode == mode.to_string()).unwrap();
                let iou: Vec<f64> = runs.iter().map(|r| r.modes[k].mean_iou).collect();
                let label = match mode {
                    Mode::Accurate => format!("L{} accurate (mean of heads)", t.model.depth),
                    Mode::Fast(l) => format!("UNet++ L{l} (fast:{l})"),
                };
                writeln!(s, "| {label} | {:.2}M | {ms:.0} | {} |", *params as f64 / 1e6, pm(&iou))?;
                if let Mode::Fast(l) = mode {
                    points.push((format!("L{l}"), *ms, metrics::mean_std(&iou).0));
                }
            }
            let png = report.with_extension("png");
            crate::plot::pruning(&points, &png)?;
            writeln!(s, "\n![pruning]({})", png.file_name().unwrap().to_string_lossy())?;
        }
    }
    if t.model.classes > 1 {
        let names: Vec<String> = (1..t.model.classes)
            .map(|c| spec.class_names.get(c - 1).cloned().unwrap_or_else(|| format!("label {c}")))
            .collect();
        writeln!(s, "\n## Dice per label (accurate mode, mean over runs)\n")?;
        writeln!(s, "| model | {} |", names.join(" | "))?;
        writeln!(s, "|---|{}", "---|".repeat(names.len()))?;
        for v in &spec.models {
            let runs: Vec<&RunResult> = results.iter().filter(|r| r.model == v.name).collect();
            let cells: Vec<String> = (0..names.len())
                .map(|c| pm(&runs.iter().filter_map(|r| r.class_dice.get(c).copied()).collect::<Vec<_>>()))
                .collect();
            writeln!(s, "| {} | {} |", v.name, cells.join(" | "))?;
        }
    }
    if spec.folds {
        writeln!(s, "\n## Per test case (accurate mode IoU)\n")?;
        let mut cases: Vec<String> = results.iter().filter_map(|r| r.fold.clone()).collect();
        cases.dedup();
        writeln!(s, "| model | {} |", cases.join(" | "))?;
        writeln!(s, "|---|{}", "---|".repeat(cases.len()))?;
        for v in &spec.models {
            let cells: Vec<String> = cases
                .iter()
                .map(|c| {
                    let v: Vec<f64> = results
                        .iter()
                        .filter(|r| r.model == v.name && r.fold.as_ref() == Some(c))
                        .map(|r| r.modes[0].mean_iou)
                        .collect();
                    if v.is_empty() { "–".into() } else { pm(&v) }
                })
                .collect();
            writeln!(s, "| {} | {} |", v.name, cells.join(" | "))?;
        }
    }
    if let Some(dir) = report.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    fsio::write_atomic(report, s.as_bytes())?;
    let dir_of = |r: &RunResult| run_dir(out, &r.model, r.seed, r.fold.as_deref());
    crate::report::experiment(&spec.title, results, report, &spec.class_names, timing.is_some(), dir_of)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn otsu_splits_two_populations() {
        let v: Vec<f32> = (0..100).map(|i| if i < 70 { 0.1 + (i % 5) as f32 * 0.01 } else { 0.8 }).collect();
        let t = super::otsu_threshold(&v);
        assert!(t > 0.14 && t < 0.8, "{t}");
    }
}
