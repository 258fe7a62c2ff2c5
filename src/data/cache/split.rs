//! Training's view of its data: the cases in memory ([`crate::train::load_splits`]) or in the
//! on-disk cache, split into training and validation the same way, batches from the
//! [`Loader`] over either, and validation scored one case at a time.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use super::loader::{Loader, Plan};
use super::{CacheChoice, CachedCase, DEFAULT_DIR};
use crate::data::{self, Sample, Splits, layout, patch::Cut};
use crate::infer;
use crate::model::{Mode, UNetPP};
use crate::train::TrainConfig;

/// The share of the memory a 3D data set may take before training reads it from the cache.
const MEMORY_SHARE: f64 = 0.25;

pub enum TrainData {
    Memory { train: Arc<Vec<Sample>>, val: Vec<Sample> },
    Cached { train: Arc<Vec<CachedCase>>, val: Vec<CachedCase>, val_crop: [usize; 3] },
}

impl TrainData {
    /// The run's cases, from the cache where `cfg.cache` asks for it; `run_dir` holds the
    /// cache when the data folder cannot.
    pub fn load(cfg: &TrainConfig, run_dir: &Path) -> anyhow::Result<TrainData> {
        let (root, fallback) = match &cfg.cache {
            CacheChoice::Off => (None, None),
            CacheChoice::Dir(d) => (Some(d.clone()), None),
            CacheChoice::Auto if cfg.model.dims == 3 && too_large(cfg)? => {
                (Some(cfg.data.join(DEFAULT_DIR)), Some(run_dir.join("cache")))
            }
            CacheChoice::Auto => (None, None),
        };
        match root {
            None => {
                let (train, val) = crate::train::load_splits(cfg)?;
                Ok(TrainData::Memory { train: Arc::new(train), val })
            }
            Some(root) => cached(cfg, &root, fallback.as_deref()),
        }
    }

    /// Training and validation cases.
    pub fn counts(&self) -> (usize, usize) {
        match self {
            TrainData::Memory { train, val } => (train.len(), val.len()),
            TrainData::Cached { train, val, .. } => (train.len(), val.len()),
        }
    }

    /// An epoch's batches, drawn from `rng` on the loader's thread.
    pub fn batches(&self, rng: StdRng, plan: Plan) -> anyhow::Result<Loader> {
        match self {
            TrainData::Memory { train, .. } => Loader::start(train.clone(), rng, plan),
            TrainData::Cached { train, .. } => Loader::start(train.clone(), rng, plan),
        }
    }

    /// Mean validation IoU and Dice (accurate mode); cached cases are read one at a time.
    pub fn validate<const D: usize>(
        &self,
        model: &UNetPP<D>,
        tile: [usize; 3],
        device: &burn::prelude::Device,
    ) -> anyhow::Result<(f64, f64)> {
        let (models, sliding, scoring) = (std::slice::from_ref(model), infer::Sliding::new(tile), Default::default());
        let score = |s: &[Sample]| {
            let all = infer::evaluate(models, s, &[Mode::Accurate], &sliding, device, |_, _| Ok(()), &scoring);
            all.map(|mut a| a.remove(0))
        };
        match self {
            TrainData::Memory { val, .. } => score(val).map(|(_, s)| (s.mean_iou, s.mean_dice)),
            TrainData::Cached { val, val_crop, .. } => {
                let (mut iou, mut dice) = (vec![], vec![]);
                for case in val {
                    for s in score(&[case.centre_crop(*val_crop)?])?.0 {
                        iou.push(s.iou);
                        dice.push(s.dice);
                    }
                }
                Ok((crate::metrics::nan_mean_std(&iou).0, crate::metrics::nan_mean_std(&dice).0))
            }
        }
    }
}

/// Whether the data set, as f32, would take more than [`MEMORY_SHARE`] of the memory.
fn too_large(cfg: &TrainConfig) -> anyhow::Result<bool> {
    let Some((limit, from)) = crate::limits::memory_limit()? else { return Ok(false) };
    let bytes = estimate(cfg)?;
    let large = bytes > limit * MEMORY_SHARE;
    if large {
        eprintln!(
            "the data set takes about {:.2} GB as f32, more than {:.0}% of the memory ({:.2} GB, {from}): \
             training reads patches from an on-disk cache (--no-cache keeps it all in memory)",
            bytes / 1e9,
            MEMORY_SHARE * 100.0,
            limit / 1e9
        );
    }
    Ok(large)
}

/// Bytes of the preprocessed data set: 4 per image voxel and 1 per label voxel, voxels from
/// NIfTI headers (scaled by the resampling to `--spacing`), other formats by their size on disk.
fn estimate(cfg: &TrainConfig) -> anyhow::Result<f64> {
    let voxels = |path: &Path| -> f64 {
        if data::volume::Format::of(path) == Some(data::volume::Format::Nifti)
            && let Ok(h) = nifti::NiftiHeader::from_file(path)
        {
            let n = h.dim[0].clamp(1, 4) as usize;
            let count: f64 = h.dim[1..=n].iter().map(|&d| d.max(1) as f64).product();
            let scale: f64 = match cfg.input.spacing {
                Some(t) => (0..3).map(|a| (h.pixdim[a + 1].abs() as f64).max(1e-6) / t.0[a]).product(),
                None => 1.0,
            };
            return count * scale;
        }
        std::fs::metadata(path).map_or(0.0, |m| m.len() as f64)
    };
    let splits = Splits::find(&cfg.data)?;
    let mut bytes = 0.0;
    for dir in [&splits.train, &splits.val].into_iter().flatten() {
        for pair in data::pairs(dir, true)? {
            let images = if pair.channels.is_empty() { vec![pair.image.clone()] } else { pair.channels.clone() };
            bytes += images.iter().map(|p| 4.0 * voxels(p)).sum::<f64>();
            bytes += pair.mask.as_deref().map_or(0.0, voxels);
        }
    }
    Ok(bytes)
}

/// The folder for the run's settings under `root`, created and marked with `settings.json`
/// (which also shows it is writable); under `fallback` when `root` is not writable.
fn key_dir(root: &Path, fallback: Option<&Path>, settings: &str) -> anyhow::Result<PathBuf> {
    let make = |root: &Path| -> anyhow::Result<PathBuf> {
        let dir = super::key_dir(root, settings);
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create the cache folder {}", dir.display()))?;
        let marker = dir.join("settings.json");
        if std::fs::read_to_string(&marker).ok().as_deref() != Some(settings) {
            crate::fsio::write_atomic(&marker, settings.as_bytes())?;
        }
        Ok(dir)
    };
    match (make(root), fallback) {
        (Ok(d), _) => Ok(d),
        (Err(e), Some(fb)) => {
            eprintln!("cannot keep the cache in {} ({e:#}): keeping it in {}", root.display(), fb.display());
            make(fb)
        }
        (Err(e), None) => Err(e.context("--cache: the folder must be writable")),
    }
}

/// The cached cases of every split, split into training and validation as
/// [`crate::train::load_splits`] splits samples (same seed, same cases).
fn cached(cfg: &TrainConfig, root: &Path, fallback: Option<&Path>) -> anyhow::Result<TrainData> {
    let splits = Splits::find(&cfg.data)?;
    let train_dir = splits.train.clone().context("no train/ split (or images/ folder) in the data")?;
    let dir = key_dir(root, fallback, &super::settings(&cfg.input)?)?;
    let prepare = |d: &Path| -> anyhow::Result<Vec<CachedCase>> {
        if let Some(split) = layout::split(d)? {
            layout::check_config(&split, &cfg.input)?;
        }
        let pairs = data::pairs(d, true)?;
        let p = super::prepare(&pairs, &cfg.input, &dir, cfg.skip_bad)?;
        for why in &p.rebuilt_because {
            eprintln!("cache: rebuilding {why}");
        }
        eprintln!("cache {}: {} cases built, {} reused", dir.display(), p.built.len(), p.reused);
        Ok(p.cases)
    };
    let (train, val) = match (&cfg.fold, &splits.val) {
        // A cross-validation fold: its cases by name from train/ and val/ pooled, as in memory.
        (Some(fold), _) => {
            let mut all = vec![];
            for d in crate::train::folds::case_dirs(&cfg.data)? {
                all.extend(prepare(&d)?);
            }
            let what = format!("fold {}", fold.index);
            let take = |all: &mut Vec<CachedCase>, names| {
                crate::train::folds::take(all, names, cfg.skip_bad, &what, |c: &CachedCase| c.name())
            };
            let train = take(&mut all, &fold.train)?;
            let val = take(&mut all, &fold.val)?;
            anyhow::ensure!(!train.is_empty(), "fold {}: none of its training cases could be read", fold.index);
            (train, val)
        }
        (None, Some(v)) => (prepare(&train_dir)?, prepare(v)?),
        (None, None) => {
            let mut train = prepare(&train_dir)?;
            let mut rng = StdRng::seed_from_u64(cfg.seed);
            train.shuffle(&mut rng);
            let k = ((train.len() as f64 * cfg.val_fraction).round() as usize)
                .clamp(usize::from(train.len() > 1), train.len().saturating_sub(1));
            let val = train.split_off(train.len() - k);
            train.sort_by(|a, b| a.name().cmp(b.name()));
            (train, val)
        }
    };
    for c in train.iter().chain(&val) {
        anyhow::ensure!(
            cfg.model.dims == 3 || c.shape()[0] == 1,
            "{} is a volume but the model is 2D (use --dims 3)",
            c.source().display()
        );
    }
    Ok(TrainData::Cached { train: Arc::new(train), val, val_crop: cfg.val_crop })
}
