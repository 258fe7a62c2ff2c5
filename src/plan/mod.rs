//! `unetpp plan`: a training plan made from the data, as nnU-Net's experiment planning makes one
//! (target spacing, patch, pooling per level and axis, batch, normalisation per channel), plus
//! the steps that fit a time budget on this machine, from a measured training step. The rules
//! are in [`rules`], the data set's fingerprint in [`fingerprint`], the measurement in [`timing`].
//!
//! `plan` writes `fingerprint.json` and `plan.toml` (atomically) to `DATA/unetpp_plan/` or
//! `--out`; `train` reads a plan from `--plan` or from there ([`for_training`]), makes one first
//! for 3D data that has none (unless the recipe was given by flags), lets every explicit flag win
//! over it ([`Plan::fill`]) and records it in the run's `config.toml`.

pub mod fingerprint;
pub mod rules;
pub mod timing;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, ensure};
use serde::{Deserialize, Serialize};

pub use fingerprint::Fingerprint;

use crate::backend::Backend;
use crate::data::intensity::{self, ChannelNorm};
use crate::data::volume::spacing::Spacing;
use crate::data::{Normalize, Splits, layout};
use crate::model::{Arch, ModelConfig, Preset, fmt_size};
use crate::train::TrainOptions;
use rules::GIB;

const MIB: f64 = 1024.0 * 1024.0;

/// Where `plan` writes by default, and where `train` looks for a plan: `DATA/unetpp_plan/`.
pub const DIR: &str = "unetpp_plan";
pub const PLAN_FILE: &str = "plan.toml";
pub const FINGERPRINT_FILE: &str = "fingerprint.json";

/// Two hours of training unless `--budget` says otherwise.
pub const DEFAULT_BUDGET: Duration = Duration::from_secs(2 * 3600);

/// The share of the memory this process may use ([`crate::limits::memory_limit`]) that a plan
/// takes by default: training also holds the data set, validation windows and the allocator's
/// slack, and the machine is rarely ours alone.
pub const MEMORY_SHARE: f64 = 0.5;

/// Deepest plan: the paper's UNet++ L4 (a fifth level doubles the widest layer again, to 512
/// filters at width 32, for little gain on patches of a few hundred voxels a side).
pub const MAX_DEPTH: usize = 4;

/// What `plan` is asked; `None` takes the default.
#[derive(Clone, Debug, Default)]
pub struct PlanOptions {
    pub data: PathBuf,
    /// Default `DATA/unetpp_plan/`.
    pub out: Option<PathBuf>,
    /// Training time to fill; default [`DEFAULT_BUDGET`].
    pub budget: Option<Duration>,
    /// Bytes training may use; default [`MEMORY_SHARE`] of what the machine has.
    pub memory: Option<u64>,
    /// Must agree with the data's (2 for images, 3 for volumes) when given.
    pub dims: Option<usize>,
    /// Default the preset's (32).
    pub width: Option<usize>,
    pub backend: Backend,
}

/// A plan: every item `train` takes from it, how it was decided, and what it was measured at.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub data: PathBuf,
    pub dims: usize,
    pub channels: usize,
    /// 1 = binary, n = labels 0..n-1 (an nnU-Net data set's labels).
    pub classes: usize,
    /// The data set's channel names (`dataset.json`, else `0`, `1`, ...), for the table.
    #[serde(default)]
    pub channel_names: Vec<String>,
    /// nnU-Net's label names by value; empty for other layouts.
    #[serde(default)]
    pub label_names: Vec<String>,
    pub width: usize,
    pub depth: usize,
    /// What the model pools per level and axis `[z, y, x]` (`ModelConfig::pool`); empty: 2 on
    /// every axis.
    pub pool: Vec<[usize; 3]>,
    /// nnU-Net's pooling rule's decision; differs from `pool` only where the model cannot pool
    /// per axis yet (see `notes`).
    pub pool_rule: Vec<[usize; 3]>,
    /// Volumes are resampled to this (mm, x, y, z); absent for 2D images.
    pub spacing: Option<Spacing>,
    /// Median shape of the cases once resampled, `[z, y, x]`.
    pub median_shape: [f64; 3],
    /// `[z, y, x]` (z = 1 in 2D).
    pub patch: [usize; 3],
    pub batch_size: usize,
    /// Used for every channel unless `channel_norms` names one per channel.
    pub normalize: Normalize,
    /// nnU-Net data sets: one per channel, by its name (CT: the fingerprint's window and statistics).
    pub channel_norms: Vec<ChannelNorm>,
    pub memory_budget_bytes: f64,
    /// Estimated bytes of one training step of the plan ([`ModelConfig::training_bytes`]).
    pub step_bytes: f64,
    /// Measured on the machine that made the plan ([`timing`]).
    pub step_seconds: f64,
    pub budget_seconds: f64,
    pub steps_per_epoch: usize,
    pub epochs: usize,
    /// Why an item is what it is where a rule did more than the obvious.
    pub notes: Vec<String>,
}

impl Plan {
    /// The architecture the plan trains.
    pub fn model(&self) -> ModelConfig {
        let m = ModelConfig::new(Arch::Unetpp, Preset::Modern, self.depth);
        ModelConfig {
            width: self.width,
            dims: self.dims,
            in_channels: self.channels,
            classes: self.classes,
            pool: self.pool.clone(),
            ..m
        }
    }

    pub fn read(path: &Path) -> anyhow::Result<Plan> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read the plan {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("cannot parse the plan {}", path.display()))
    }

    /// `o` with every item it leaves out taken from the plan: explicit flags win. A `--depth` of
    /// its own drops the plan's pooling (made for the plan's depth).
    pub fn fill(&self, o: &TrainOptions) -> TrainOptions {
        let mut f = o.clone();
        let m = &mut f.model;
        m.dims = m.dims.or(Some(self.dims));
        m.width = m.width.or(Some(self.width));
        if m.depth.is_none() {
            m.depth = Some(self.depth);
            m.pool = Some(self.pool.clone());
        }
        f.spacing = f.spacing.or(self.spacing);
        f.patch = f.patch.or(Some(self.patch));
        f.batch_size = f.batch_size.or(Some(self.batch_size));
        f.steps_per_epoch = f.steps_per_epoch.or(Some(self.steps_per_epoch));
        f.epochs = f.epochs.or(Some(self.epochs));
        // Per-channel schemes go in through the nnU-Net input's norms (see `from_options`).
        if f.normalize.is_none() && self.channel_norms.is_empty() {
            f.normalize = Some(self.normalize);
        }
        f
    }

    /// The plan as a table, one item a line, with the notes below.
    pub fn table(&self) -> String {
        let d = self.dims;
        let pools = |p: &[[usize; 3]]| {
            if p.is_empty() {
                "2 on every axis".to_string()
            } else {
                p.iter().map(|l| fmt_size(*l, d)).collect::<Vec<_>>().join(" | ")
            }
        };
        let norm = if self.channel_norms.is_empty() {
            match self.normalize {
                Normalize::ZScore => "z-score per case".to_string(),
                Normalize::Percentile { low, high } => format!("percentiles {low}..{high} of each image to 0..1"),
                other => format!("{other:?}"),
            }
        } else {
            // Named, so that a reader sees which channel got the CT window.
            let name = |c: usize| self.channel_names.get(c).map_or(c.to_string(), |n| n.clone());
            let each = self.channel_norms.iter().enumerate();
            each.map(|(c, n)| format!("{}: {}", name(c), describe_norm(n))).collect::<Vec<_>>().join("; ")
        };
        let named = |n: usize, names: &[String]| {
            if names.is_empty() { n.to_string() } else { format!("{n} ({})", names.join(", ")) }
        };
        let median = self.median_shape[3 - d..].iter().map(|v| format!("{v:.0}")).collect::<Vec<_>>().join(",");
        let rows = [
            ("data", self.data.display().to_string()),
            ("dimensions", format!("{d}D")),
            ("channels", named(self.channels, &self.channel_names)),
            ("classes", named(self.classes, &self.label_names)),
            (
                "target spacing (x,y,z mm)",
                self.spacing
                    .map_or("each image's own (2D)".into(), |s| format!("{:.3},{:.3},{:.3}", s.0[0], s.0[1], s.0[2])),
            ),
            ("median shape, resampled", median),
            ("patch", fmt_size(self.patch, d)),
            ("depth / width", format!("{} / {}", self.depth, self.width)),
            ("pooling per level", pools(&self.pool)),
            ("pooling rule (nnU-Net)", pools(&self.pool_rule)),
            ("batch size", self.batch_size.to_string()),
            ("normalisation", norm),
            (
                "memory",
                format!("{:.2} GiB a step of {:.2} GiB budget", self.step_bytes / GIB, self.memory_budget_bytes / GIB),
            ),
            ("training step (measured)", format!("{:.3} s", self.step_seconds)),
            ("time budget", humantime::format_duration(Duration::from_secs(self.budget_seconds as u64)).to_string()),
            ("steps per epoch x epochs", format!("{} x {}", self.steps_per_epoch, self.epochs)),
        ];
        let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        let mut s = String::new();
        for (k, v) in rows {
            let _ = writeln!(s, "  {k:<w$}  {v}");
        }
        for n in &self.notes {
            let _ = writeln!(s, "  note: {n}");
        }
        s
    }
}

fn describe_norm(n: &ChannelNorm) -> String {
    match n {
        ChannelNorm::Ct { low, high, mean, std } => {
            format!("CT window {low:.1}..{high:.1}, mean {mean:.1}, std {std:.1}")
        }
        ChannelNorm::ZScore => "z-score per case".into(),
        ChannelNorm::NoNorm => "none".into(),
        ChannelNorm::RescaleTo01 => "min..max of each case to 0..1".into(),
        ChannelNorm::RgbTo01 => "x / 255".into(),
    }
}

/// What `plan` made and where it wrote it.
pub struct Made {
    pub plan: Plan,
    pub fingerprint: Fingerprint,
    pub dir: PathBuf,
}

/// Makes a plan for `o.data` and writes it with its fingerprint.
pub fn run(o: &PlanOptions) -> anyhow::Result<Made> {
    let dir = o.out.clone().unwrap_or_else(|| o.data.join(DIR));
    check_out(&o.data, &dir)?;
    let fingerprint = Fingerprint::collect(&o.data)?;
    let plan = make(o, &fingerprint)?;
    save(&dir, &plan, &fingerprint)?;
    Ok(Made { plan, fingerprint, dir })
}

/// Writes `fingerprint.json` and `plan.toml` into `dir`, each atomically.
pub fn save(dir: &Path, plan: &Plan, fingerprint: &Fingerprint) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let json = serde_json::to_string_pretty(fingerprint)?;
    crate::fsio::write_atomic(&dir.join(FINGERPRINT_FILE), json.as_bytes())?;
    crate::fsio::write_atomic(&dir.join(PLAN_FILE), toml::to_string(plan)?.as_bytes())
}

/// The plan for a fingerprint (without writing anything).
pub fn make(o: &PlanOptions, fp: &Fingerprint) -> anyhow::Result<Plan> {
    let dims = fp.dims;
    if let Some(d) = o.dims {
        ensure!(
            d == dims,
            "--dims {d}: {} holds {}, which train reads as {dims}D only",
            fp.data.display(),
            if dims == 3 { "volumes" } else { "2D images" }
        );
    }
    ensure!(!fp.cases.is_empty(), "{} has no cases to plan from", fp.data.display());
    let mut notes = vec![];
    let zyx = |s: [f64; 3]| [s[2], s[1], s[0]];
    let shapes: Vec<[f64; 3]> = fp.cases.iter().map(|c| c.shape_zyx.map(|v| v as f64)).collect();
    let (spacing, resampled) = if dims == 3 {
        let spacings: Vec<[f64; 3]> = fp
            .cases
            .iter()
            .map(|c| c.spacing_xyz.map(zyx).with_context(|| format!("{} has no voxel spacing", c.image.display())))
            .collect::<anyhow::Result<_>>()?;
        let (target, why) = rules::target_spacing(&spacings, &shapes);
        notes.extend(why);
        let resampled: Vec<[f64; 3]> =
            shapes.iter().zip(&spacings).map(|(sh, sp)| std::array::from_fn(|a| sh[a] * sp[a] / target[a])).collect();
        (Some(Spacing(zyx(target))), resampled)
    } else {
        (None, shapes)
    };
    let median_shape = rules::median(&resampled);
    let channels = fp.channel_names.len();
    let classes = if fp.label_names.is_empty() { 1 } else { fp.label_names.len() };
    let base = ModelConfig::new(Arch::Unetpp, Preset::Modern, MAX_DEPTH);
    let model = ModelConfig { width: o.width.unwrap_or(base.width), dims, in_channels: channels, classes, ..base };
    // Training holds every case, resampled, in memory (f32 per channel and a u8 label a voxel).
    let held: f64 = resampled.iter().map(|s| s.iter().product::<f64>() * (4 * channels + 1) as f64).sum();
    let (total, source) = match o.memory {
        Some(b) => (b as f64, "--memory".to_string()),
        None => match crate::limits::memory_limit()? {
            Some((bytes, source)) => (MEMORY_SHARE * bytes, format!("half of {source}")),
            None => (8.0 * GIB, "8 GiB (the machine's memory is unknown)".to_string()),
        },
    };
    let budget = total - held;
    ensure!(
        budget > 0.0,
        "the data set needs about {:.2} GiB in memory for training, more than the {:.2} GiB budget ({source})",
        held / GIB,
        total / GIB
    );
    let spacing_zyx = spacing.map_or([1.0; 3], |s| s.zyx());
    let rule = rules::fit_patch(&model, spacing_zyx, median_shape, MAX_DEPTH, budget, false)?;
    let iso = rule.pool.iter().all(|p| *p == rules::isotropic(1, dims)[0]);
    let per_axis = ModelConfig { depth: rule.pool.len(), pool: rule.pool.clone(), ..model.clone() };
    let fit = if iso || per_axis.validate().is_ok() {
        rule.clone()
    } else {
        let f = rules::fit_patch(&model, spacing_zyx, median_shape, MAX_DEPTH, budget, true)?;
        notes.push(format!(
            "this build's model pools 2 on every axis only: nnU-Net's rule pools {} for patch {}; the plan pools 2 \
             on every axis instead, with the patch a multiple of {} on every axis",
            rule.pool.iter().map(|l| fmt_size(*l, dims)).collect::<Vec<_>>().join(" | "),
            fmt_size(rule.patch, dims),
            1 << f.pool.len()
        ));
        f
    };
    let depth = fit.pool.len();
    let pool = if fit.pool.iter().all(|p| *p == rules::isotropic(1, dims)[0]) { vec![] } else { fit.pool.clone() };
    let model = ModelConfig { depth, pool: pool.clone(), ..model };
    let patch_voxels: usize = fit.patch.iter().product();
    let dataset_voxels: f64 = resampled.iter().map(|s| s.iter().product::<f64>()).sum();
    let batch_size = rules::batch_size(&model, patch_voxels, budget, dataset_voxels);
    let (normalize, channel_norms) = normalisation(fp, &mut notes)?;
    let step_seconds = timing::step_seconds(&model, batch_size, fit.patch, o.backend)?;
    let budget_seconds = o.budget.unwrap_or(DEFAULT_BUDGET).as_secs_f64();
    ensure!(budget_seconds > 0.0, "--budget must be longer than 0 s");
    let (steps_per_epoch, epochs) = rules::schedule(budget_seconds, step_seconds);
    if (steps_per_epoch * epochs) as f64 * step_seconds > budget_seconds {
        notes.push(format!(
            "one training step takes {step_seconds:.1} s: the budget of {budget_seconds:.0} s is too short for the \
             minimum of one step per epoch, so the run will take longer"
        ));
    }
    // Small data sets hold well under 0.01 GiB, which would read as nothing.
    let held_text = if held >= GIB { format!("{:.2} GiB", held / GIB) } else { format!("{:.1} MiB", held / MIB) };
    notes.push(format!("memory budget from {source}, less {held_text} for the data set held in memory"));
    Ok(Plan {
        data: fp.data.clone(),
        dims,
        channels,
        classes,
        channel_names: fp.channel_names.clone(),
        label_names: fp.label_names.clone(),
        width: model.width,
        depth,
        pool,
        pool_rule: rule.pool,
        spacing,
        median_shape,
        patch: fit.patch,
        batch_size,
        normalize,
        channel_norms,
        memory_budget_bytes: budget,
        step_bytes: model.training_bytes(patch_voxels, batch_size),
        step_seconds,
        budget_seconds,
        steps_per_epoch,
        epochs,
        notes,
    })
}

/// nnU-Net data sets: a scheme per channel by its name, CT with the fingerprint's foreground
/// window and statistics. Other volumes: per-case z-score (their modality is unknown). 2D images:
/// the 0.5..99.5 percentiles of each image, as `train` does without a plan.
fn normalisation(fp: &Fingerprint, notes: &mut Vec<String>) -> anyhow::Result<(Normalize, Vec<ChannelNorm>)> {
    if fp.dims == 2 {
        return Ok((Normalize::Percentile { low: 0.5, high: 99.5 }, vec![]));
    }
    if fp.label_names.is_empty() {
        notes.push("not an nnU-Net data set, so the channels' modality is unknown: per-case z-score".into());
        return Ok((Normalize::ZScore, vec![]));
    }
    let norms = fp
        .channel_names
        .iter()
        .zip(&fp.foreground)
        .map(|(name, stats)| match (intensity::is_ct(name), stats) {
            (true, Some(s)) => {
                Ok(ChannelNorm::Ct { low: s.percentile_00_5, high: s.percentile_99_5, mean: s.mean, std: s.std })
            }
            _ => intensity::scheme(name, None),
        })
        .collect::<anyhow::Result<Vec<_>>>()
        .with_context(|| fp.data.join(layout::DATASET_JSON).display().to_string())?;
    Ok((Normalize::ZScore, norms))
}

/// Refuses an `--out` inside a folder of the data set's images or labels.
fn check_out(data: &Path, out: &Path) -> anyhow::Result<()> {
    let s = Splits::find(data)?;
    let resolve = |p: &Path| {
        // The longest existing ancestor, resolved, with the rest appended.
        let mut rest = vec![];
        let mut p = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
        loop {
            if let Ok(r) = p.canonicalize() {
                return rest.iter().rev().fold(r, |acc: PathBuf, c| acc.join(c));
            }
            match (p.file_name().map(|n| n.to_os_string()), p.parent().map(Path::to_path_buf)) {
                (Some(n), Some(parent)) => (rest.push(n), p = parent).1,
                _ => return p,
            }
        }
    };
    let target = resolve(out);
    for split in [s.train, s.val, s.test].into_iter().flatten() {
        let folders = match layout::split(&split)? {
            Some(sp) => vec![sp.images, sp.labels],
            None => ["images", "masks", "labels"].iter().map(|d| split.join(d)).collect(),
        };
        for dir in folders.into_iter().filter(|d| d.is_dir()) {
            ensure!(
                !target.starts_with(resolve(&dir)),
                "--out {} is inside the data set's folder {}: the plan must not be written among the cases; \
                 choose a folder outside it (the default is {})",
                out.display(),
                dir.display(),
                data.join(DIR).display()
            );
        }
    }
    Ok(())
}

/// The plan `train` follows, if any: `o.plan`, else `DATA/unetpp_plan/plan.toml`, else, for 3D
/// data when no item of the recipe (patch, batch, epochs, steps, spacing, depth) was given, one
/// made now, kept in the run only (the data folder is the user's). None for 2D data without a
/// plan (its recipe stays as it was), when fine-tuning (the checkpoint decides the model) and on
/// the bundled sample. `o.budget` re-divides the plan's steps at its measured step time.
pub fn for_training(o: &TrainOptions, data: &Path, dims: usize) -> anyhow::Result<Option<Plan>> {
    let beside = data.join(DIR).join(PLAN_FILE);
    let plan = if let Some(p) = &o.plan {
        Plan::read(p)?
    } else if o.weights.is_some() || o.data.is_none() {
        return Ok(None);
    } else if beside.is_file() {
        eprintln!("following the plan {} (pass --plan FILE for another)", beside.display());
        Plan::read(&beside)?
    } else {
        let recipe = o.patch.is_some()
            || o.batch_size.is_some()
            || o.epochs.is_some()
            || o.steps_per_epoch.is_some()
            || o.spacing.is_some()
            || o.model.depth.is_some();
        if recipe || o.model.dims.unwrap_or(dims) != 3 || dims != 3 {
            return Ok(None);
        }
        eprintln!("no plan for {} (unetpp plan makes one to keep): making one for this run", data.display());
        let width = o.model.width;
        let opts =
            PlanOptions { data: data.to_path_buf(), width, budget: o.budget, backend: o.backend, ..Default::default() };
        let plan = make(&opts, &Fingerprint::collect(data)?)?;
        eprint!("{}", plan.table());
        return Ok(Some(plan));
    };
    Ok(Some(match o.budget {
        Some(b) => plan.rescheduled(b),
        None => plan,
    }))
}

impl Plan {
    /// The plan with its steps and epochs fitted to `budget` at its measured step time.
    pub fn rescheduled(self, budget: Duration) -> Plan {
        let budget_seconds = budget.as_secs_f64();
        let (steps_per_epoch, epochs) = rules::schedule(budget_seconds, self.step_seconds);
        Plan { budget_seconds, steps_per_epoch, epochs, ..self }
    }
}

/// `--budget`: `2h`, `90min`, `1h 30m`, `45s` (humantime's syntax).
pub fn parse_budget(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("--budget `{s}`: {e} (e.g. 2h, 90min, 1h30m)"))?;
    if d.is_zero() { Err(format!("--budget `{s}`: must be longer than 0 s")) } else { Ok(d) }
}

/// `--memory`: `16GiB`, `16G` (10^9), `512MiB`, bytes.
pub fn parse_memory(s: &str) -> Result<u64, String> {
    let b = s.trim().parse::<bytesize::ByteSize>().map_err(|e| format!("--memory `{s}`: {e} (e.g. 16GiB, 512MiB)"))?;
    if b.0 == 0 { Err(format!("--memory `{s}`: must be more than 0 bytes")) } else { Ok(b.0) }
}
