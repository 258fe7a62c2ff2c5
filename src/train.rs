//! Training with deep supervision: Adam, random patches, validation IoU on whole images after
//! every epoch, early stopping, atomic best/last checkpoints, resume, metrics CSV and curves.
//! One `TrainConfig` (saved as `config.toml` in the run directory) drives a run; the defaults it
//! takes from the data are in [`options`]; how the run directory is locked, committed and
//! recovered is in [`rundir`].

pub mod folds;
pub mod options;
pub mod recipe;
pub mod rundir;

pub use options::{ModelOptions, TrainOptions};

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use burn::module::Module;
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::Tensor;
use rand::seq::SliceRandom;
use rand::{SeedableRng, rngs::StdRng};
use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::checkpoint::{self, Meta};
use crate::data::{self, DataConfig, Sample, Splits, patch};
use crate::fsio;
use crate::loss;
use crate::model::{ModelConfig, UNetPP};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub data: PathBuf,
    pub model: ModelConfig,
    pub input: DataConfig,
    pub epochs: usize,
    pub steps_per_epoch: usize,
    pub batch_size: usize,
    pub lr: f64,
    /// Patch [depth, height, width] (depth 1 in 2D).
    pub patch: [usize; 3],
    /// Share of patches centred on foreground.
    pub foreground: f64,
    /// Epochs without a better validation IoU before stopping.
    pub patience: usize,
    pub seed: u64,
    /// Share of images held out for validation when the data has no `val/` folder.
    pub val_fraction: f64,
    /// Sliding-window size for validation/evaluation on whole images.
    pub tile: [usize; 3],
    /// Validation scores a crop of this size around each image's foreground centre, so that
    /// checking every epoch stays cheap on large images.
    pub val_crop: [usize; 3],
    pub skip_bad: bool,
    #[serde(default)]
    pub backend: Backend,
    /// Start from this checkpoint's weights (fine-tuning) instead of a random init.
    #[serde(default)]
    pub weights: Option<PathBuf>,
    /// The plan the run followed (`unetpp plan`), kept as a record; the fields above already hold
    /// what it decided, and any flag that overrode it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<crate::plan::Plan>,
    /// A cross-validation fold's cases ([`folds`]), which replace the train/val folders' split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fold: Option<folds::Fold>,
    /// Where training reads its cases from (see [`data::cache`]).
    #[serde(default)]
    pub cache: data::cache::CacheChoice,
    /// Loss and step-size schedule (`--loss`, `--schedule`).
    #[serde(default)]
    pub recipe: recipe::Recipe,
}

/// What has been done so far; rewritten after every epoch so `--resume` can continue.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct State {
    pub epoch: usize,
    pub step: usize,
    pub best_iou: f64,
    pub best_epoch: usize,
    pub stopped_early: bool,
    /// Wall time of all epochs so far, across resumes.
    #[serde(default)]
    pub seconds: f64,
    /// The committed epochs' metrics rows; `metrics.csv` is rewritten from them.
    #[serde(default)]
    pub history: Vec<rundir::Row>,
}

pub struct Run {
    pub dir: PathBuf,
    pub state: State,
}

/// The run directory's checkpoint folder.
pub fn checkpoints(dir: &Path) -> PathBuf {
    dir.join("checkpoints")
}

/// Loads train and validation samples (a seeded split when there is no `val/`).
pub fn load_splits(cfg: &TrainConfig) -> anyhow::Result<(Vec<Sample>, Vec<Sample>)> {
    if let Some(fold) = &cfg.fold {
        return prepare_splits(cfg, folds::samples(cfg, fold)?);
    }
    let splits = Splits::find(&cfg.data)?;
    let train_dir = splits.train.context("no train/ split (or images/ folder) in the data")?;
    let mut train = data::load(&train_dir, &cfg.input, true, cfg.skip_bad)?;
    let val = match &splits.val {
        Some(v) => data::load(v, &cfg.input, true, cfg.skip_bad)?,
        None => {
            let mut rng = StdRng::seed_from_u64(cfg.seed);
            train.shuffle(&mut rng);
            let k = ((train.len() as f64 * cfg.val_fraction).round() as usize)
                .clamp(usize::from(train.len() > 1), train.len().saturating_sub(1));
            let val = train.split_off(train.len() - k);
            train.sort_by(|a, b| a.name.cmp(&b.name));
            val
        }
    };
    prepare_splits(cfg, (train, val))
}

/// Resamples train and validation samples to the run's spacing, checks their dimensionality and
/// crops validation samples around their foreground.
fn prepare_splits(
    cfg: &TrainConfig,
    (train, val): (Vec<Sample>, Vec<Sample>),
) -> anyhow::Result<(Vec<Sample>, Vec<Sample>)> {
    let to_target = |v| data::volume::spacing::to_target(v, cfg.input.spacing);
    let (train, val) = (to_target(train)?, to_target(val)?);
    let dims = cfg.model.dims;
    for s in train.iter().chain(&val) {
        anyhow::ensure!(
            dims == 3 || s.shape[0] == 1,
            "{} is a volume but the model is 2D (use --dims 3)",
            s.source.display()
        );
    }
    let val = val.iter().map(|s| patch::centre_crop(s, cfg.val_crop)).collect();
    Ok((train, val))
}

/// One optimisation step on a batch: the deep-supervision loss, its gradients and Adam, with
/// rayon's workers kept polling throughout (see [`crate::backend::busy_workers`]). Returns the
/// model and the loss; a non-finite loss leaves the model as it was, for the caller to stop on.
/// `unetpp bench` times this same step.
pub fn step<const D: usize>(
    model: UNetPP<D>,
    optim: &mut ModuleOptimizer,
    lr: f64,
    x: Tensor<D>,
    y: Tensor<D>,
) -> (UNetPP<D>, f64) {
    step_with(model, optim, lr, loss::Objective::Paper, x, y)
}

/// [`step`] on the given loss.
pub fn step_with<const D: usize>(
    model: UNetPP<D>,
    optim: &mut ModuleOptimizer,
    lr: f64,
    objective: loss::Objective,
    x: Tensor<D>,
    y: Tensor<D>,
) -> (UNetPP<D>, f64) {
    let _busy = crate::backend::busy_workers();
    let loss = loss::deep_supervision(model.forward(x), y, objective);
    let value = loss.clone().into_data().iter::<f64>().next().unwrap();
    if !value.is_finite() {
        return (model, value);
    }
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    (optim.step(lr, model, grads), value)
}

/// Starts a new run in `dir` (`cfg` given; refused when `dir` holds a committed run) or resumes
/// the one there (`cfg` None), under the run directory's lock (see [`rundir`]).
pub fn train(cfg: Option<TrainConfig>, dir: &Path) -> anyhow::Result<Run> {
    let resume = cfg.is_none();
    // An existing folder is locked before anything in it is read; a new one once the data loaded.
    let lock = if dir.is_dir() { Some(rundir::Lock::acquire(dir)?) } else { None };
    let cfg: TrainConfig = match cfg {
        Some(c) => {
            anyhow::ensure!(
                !dir.join(rundir::STATE).exists(),
                "{} already holds a run; pick another --out or continue it with --resume",
                dir.display()
            );
            c
        }
        None => {
            let path = dir.join(rundir::CONFIG);
            let text = std::fs::read_to_string(&path).with_context(|| {
                format!(
                    "no run to resume in {} (no readable {}); start one with `train --out {}`",
                    dir.display(),
                    rundir::CONFIG,
                    dir.display()
                )
            })?;
            toml::from_str(&text).with_context(|| format!("cannot parse {}", path.display()))?
        }
    };
    cfg.validate()?;
    crate::for_rank!(cfg.model.dims, run(&cfg, dir, resume, lock))
}

/// Burn gives every parameter a random id, which the optimiser state is keyed by and the
/// checkpoint stores: renumbering them in module order makes `last.optim` the same bytes whether a
/// run went in one go or was resumed (the protocol's tests compare them). BatchNorm statistics
/// keep burn's random ids (a mapper cannot give them new ones); nothing reads those back.
fn stable_ids<const D: usize>(model: UNetPP<D>) -> UNetPP<D> {
    struct Renumber(u64);
    impl burn::module::ModuleMapper for Renumber {
        fn map_float<const K: usize>(
            &mut self,
            mut param: burn::module::Param<Tensor<K>>,
        ) -> burn::module::Param<Tensor<K>> {
            self.0 += 1;
            param.id = burn::module::ParamId::from(self.0);
            param
        }
    }
    model.map(&mut Renumber(0))
}

/// The optimiser state as bytes in a fixed order (burn writes it in hash-map order).
fn optim_bytes(optim: &burn::optim::ModuleOptimizer) -> anyhow::Result<Vec<u8>> {
    let err = |e| anyhow::anyhow!("cannot serialise the optimiser state: {e:?}");
    let bytes = optim.into_bytes().map_err(err)?;
    let canonical = burn::optim::OptimizerRecord::from_bytes(bytes).and_then(|r| r.into_bytes()).map_err(err)?;
    Ok(canonical.to_vec())
}

/// The error for a diverged run: where, and what was kept.
fn diverged(dir: &Path, state: &State, what: String) -> anyhow::Error {
    let kept = if state.epoch == 0 {
        "no epoch finished, so no checkpoint was saved".to_string()
    } else {
        format!("{} keeps the checkpoints of epoch {}, the last finite ones", dir.display(), state.epoch)
    };
    anyhow::anyhow!("training diverged: {what}; try a lower --lr ({kept})")
}

/// The epochs of the run in `dir`, from its last committed epoch when `resume`.
fn run<const D: usize>(cfg: &TrainConfig, dir: &Path, resume: bool, lock: Option<rundir::Lock>) -> anyhow::Result<Run> {
    // `TrainConfig::validate` has checked the patch against the model's depth.
    let patch_size = [if cfg.model.dims == 2 { 1 } else { cfg.patch[0] }, cfg.patch[1], cfg.patch[2]];
    let data = data::cache::split::TrainData::load(cfg, dir)?;
    let (n_train, n_val) = data.counts();
    eprintln!("{n_train} training and {n_val} validation images from {}", cfg.data.display());
    let _lock = match lock {
        Some(l) => l,
        None => {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
            rundir::Lock::acquire(dir)?
        }
    };
    let restart = dir.join(rundir::CONFIG).exists();
    let committed = rundir::recover(dir)?;
    let ck = checkpoints(dir);
    std::fs::create_dir_all(&ck).with_context(|| format!("cannot create {}", ck.display()))?;
    let device = cfg.backend.training_device();
    let mut optim = crate::optim::adam(1e-8);
    let (model, mut state): (UNetPP<D>, State) = match committed {
        Some(state) => {
            anyhow::ensure!(
                resume,
                "{} already holds a run; pick another --out or continue it with --resume",
                dir.display()
            );
            let (model, _) = checkpoint::load::<D>(&ck.join(rundir::LAST), &device)?;
            let path = ck.join(rundir::OPTIM);
            let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
            optim = optim
                .from_bytes(burn::tensor::Bytes::from_bytes_vec(bytes))
                .map_err(|e| anyhow::anyhow!("cannot load optimiser state {}: {e:?}", path.display()))?;
            eprintln!("resuming {} after epoch {}", dir.display(), state.epoch);
            (model, state)
        }
        None => {
            if restart {
                eprintln!("{} holds a run that never finished its first epoch: starting it again", dir.display());
            }
            if !resume {
                fsio::write_atomic(&dir.join(rundir::CONFIG), toml::to_string(cfg)?.as_bytes())?;
            }
            device.seed(cfg.seed);
            let model = match &cfg.weights {
                Some(w) => {
                    let (model, meta) = checkpoint::load::<D>(w, &device)?;
                    anyhow::ensure!(
                        meta.model == cfg.model,
                        "--weights {} holds a different architecture than the run's",
                        w.display()
                    );
                    model
                }
                None => cfg.model.init::<D>(&device),
            };
            (model, State::default())
        }
    };
    let mut model = stable_ids(model);
    while state.epoch < cfg.epochs && !state.stopped_early {
        let epoch = state.epoch + 1;
        let epoch_start = Instant::now();
        // Seeded per epoch, so a resumed run sees the same patches as an uninterrupted one.
        let rng = StdRng::seed_from_u64(cfg.seed.wrapping_mul(1_000_003).wrapping_add(epoch as u64));
        device.seed(cfg.seed.wrapping_add(epoch as u64));
        let bar = crate::progress::Bar::new(format!("{epoch}/{}", cfg.epochs), cfg.steps_per_epoch as u64);
        let mut loss_sum = 0.0;
        let mut step_no = state.step;
        let plan = data::cache::loader::Plan {
            steps: cfg.steps_per_epoch,
            batch: cfg.batch_size,
            patch: patch_size,
            foreground: cfg.foreground,
        };
        let mut batches = data.batches(rng, plan)?;
        for _ in 0..cfg.steps_per_epoch {
            let patches = batches.next_batch()?;
            let refs: Vec<&patch::Patch> = patches.iter().collect();
            let x = patch::images_tensor::<D>(&refs, &device);
            let y = patch::targets_tensor::<D>(&refs, cfg.model.classes, &device);
            let value;
            let lr = cfg.recipe.schedule.lr(cfg.lr, step_no, cfg.epochs * cfg.steps_per_epoch);
            (model, value) = step_with(model, &mut optim, lr, cfg.recipe.loss, x, y);
            step_no += 1;
            if !value.is_finite() {
                bar.finish_and_clear();
                return Err(diverged(dir, &state, format!("the loss is {value} at step {step_no} (epoch {epoch})")));
            }
            loss_sum += value;
            bar.inc(1);
            bar.set_message(format!("loss {value:.4}"));
            fsio::failpoint("train.step");
        }
        bar.finish_and_clear();
        let valid = model.valid();
        if !checkpoint::all_finite(&valid) {
            return Err(diverged(
                dir,
                &state,
                format!("the weights are non-finite after step {step_no} (epoch {epoch})"),
            ));
        }
        let train_loss = loss_sum / cfg.steps_per_epoch as f64;
        let (val_iou, val_dice) =
            if n_val == 0 { (f64::NAN, f64::NAN) } else { data.validate(&valid, cfg.tile, &valid.devices()[0])? };
        // The next state, committed only once its files are on disk.
        let mut next = state.clone();
        next.epoch = epoch;
        next.step = step_no;
        next.seconds += epoch_start.elapsed().as_secs_f64();
        let meta = Meta {
            model: cfg.model.clone(),
            data: cfg.input.clone(),
            epoch,
            val_iou: Some(val_iou).filter(|v| v.is_finite()),
        };
        let improved = val_iou > state.best_iou || (n_val == 0 && epoch == cfg.epochs) || state.best_epoch == 0;
        if improved {
            next.best_iou = if val_iou.is_finite() { val_iou } else { 0.0 };
            next.best_epoch = epoch;
        }
        next.stopped_early = epoch - next.best_epoch >= cfg.patience;
        let finite = |x: f64| Some(x).filter(|x| x.is_finite());
        next.history.push(rundir::Row {
            epoch,
            step: step_no,
            train_loss,
            val_iou: finite(val_iou),
            val_dice: finite(val_dice),
            seconds: next.seconds,
        });
        fsio::failpoint("epoch.trained");
        let staged = (|| -> anyhow::Result<()> {
            checkpoint::save(&valid, &meta, &rundir::pending_path(&ck, epoch, rundir::LAST))?;
            let bytes = optim_bytes(&optim)?;
            fsio::write_atomic(&rundir::pending_path(&ck, epoch, rundir::OPTIM), &bytes)?;
            if improved {
                checkpoint::save(&valid, &meta, &rundir::pending_path(&ck, epoch, rundir::BEST))?;
            }
            fsio::failpoint("epoch.staged");
            fsio::write_atomic(&dir.join(rundir::STATE), serde_json::to_string_pretty(&next)?.as_bytes())
        })();
        if let Err(e) = staged {
            rundir::discard(&ck, epoch);
            return Err(e);
        }
        state = next;
        fsio::failpoint("epoch.committed");
        rundir::publish(dir, Some(&state))?;
        fsio::failpoint("epoch.published");
        eprintln!(
            "epoch {epoch}/{}: loss {train_loss:.4}  val IoU {val_iou:.4}  Dice {val_dice:.4}{}  ({:.0}s)",
            cfg.epochs,
            if improved { "  *best" } else { "" },
            state.seconds
        );
    }
    if state.stopped_early {
        eprintln!("early stop: no better validation IoU for {} epochs", cfg.patience);
    }
    crate::plot::curves(&dir.join(rundir::METRICS), &dir.join(rundir::CURVES))?;
    Ok(Run { dir: dir.to_path_buf(), state })
}

impl TrainConfig {
    /// Checks every option (from the command line, a `--config` file or a run being resumed)
    /// before anything is written, naming the option and the values it allows; also refuses a
    /// patch x batch x model estimated not to fit in memory and data of the wrong
    /// dimensionality.
    pub fn validate(&self) -> anyhow::Result<()> {
        use anyhow::ensure;
        self.model.validate()?;
        ensure!(self.epochs >= 1, "--epochs must be at least 1, got 0");
        ensure!(self.steps_per_epoch >= 1, "--steps-per-epoch must be at least 1, got 0");
        ensure!(self.batch_size >= 1, "--batch-size must be at least 1, got 0");
        ensure!(
            self.lr.is_finite() && self.lr > 0.0 && self.lr <= 1.0,
            "--lr must be in (0, 1] (Adam's step size, e.g. 3e-4), got {}",
            self.lr
        );
        ensure!(
            (0.0..=1.0).contains(&self.foreground),
            "--foreground must be in [0, 1] (the share of patches centred on foreground), got {}",
            self.foreground
        );
        ensure!(
            self.patience >= 1,
            "--patience must be at least 1 (epochs without a better validation IoU before stopping), got 0"
        );
        ensure!(
            self.val_fraction > 0.0 && self.val_fraction < 1.0,
            "--val-fraction must be in (0, 1) (the share of images held out when there is no val/), got {}",
            self.val_fraction
        );
        self.model.check_size(self.patch, "--patch")?;
        self.model.check_size(self.tile, "--tile")?;
        ensure!(
            self.val_crop.iter().all(|&v| v >= 1),
            "val_crop must be at least 1 on every axis, got {:?}",
            self.val_crop
        );
        ensure!(
            self.input.channels == self.model.in_channels && self.input.classes == self.model.classes,
            "input channels and classes ({}, {}) differ from the model's ({}, {})",
            self.input.channels,
            self.input.classes,
            self.model.in_channels,
            self.model.classes
        );
        self.input.normalize.check().map_err(anyhow::Error::msg)?;
        if let Some(w) = &self.weights {
            ensure!(
                checkpoint::read_meta(w)?.model == self.model,
                "--weights {} holds a different architecture than the run's",
                w.display()
            );
        }
        let dims = self.model.dims;
        let voxels = |s: [usize; 3]| s[1] * s[2] * if dims == 3 { s[0] } else { 1 };
        let (m, fmt) = (&self.model, |s| crate::model::fmt_size(s, dims));
        crate::limits::ensure_memory(m.training_bytes(voxels(self.patch), self.batch_size), || {
            format!(
                "training on --patch {} with --batch-size {} (--width {}, --depth {})",
                fmt(self.patch),
                self.batch_size,
                m.width,
                m.depth
            )
        })?;
        let window: [usize; 3] = std::array::from_fn(|a| self.tile[a].min(self.val_crop[a]));
        crate::limits::ensure_memory(m.inference_bytes(voxels(window)), || {
            format!("validating with --tile {} (--width {}, --depth {})", fmt(self.tile), m.width, m.depth)
        })?;
        let splits = Splits::find(&self.data)?;
        for dir in [&splits.train, &splits.val].into_iter().flatten() {
            let images: Vec<PathBuf> = data::pairs(dir, true)?.into_iter().map(|p| p.image).collect();
            data::ensure_dims(&images, dims, &format!("the run's model (--dims {dims})"))?;
        }
        Ok(())
    }
}
