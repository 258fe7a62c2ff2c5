//! `unetpp` command line: parses arguments and calls the library.

use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};
use unetpp::app::{self, BenchKind, InferOptions};
use unetpp::backend::Backend;
use unetpp::bench::{BenchOptions, Peer};
use unetpp::data::{Normalize, patch};
use unetpp::model::{Arch, Encoder, Mode, Preset};
use unetpp::train::{ModelOptions, TrainConfig, TrainOptions, folds};

#[derive(Parser)]
#[command(
    name = "unetpp",
    version,
    about = "UNet++ segmentation for 2D images and 3D volumes: train, evaluate, prune, predict"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model (with no arguments: on the bundled nuclei sample)
    Train(Box<TrainArgs>),
    /// Plan training from the data (nnU-Net's rules): spacing, patch, pooling, batch,
    /// normalisation, and steps that fit --budget from a measured training step; writes
    /// fingerprint.json and plan.toml, which `train` then follows
    Plan {
        /// Folder with images/ + masks/ (or labels/), a root with train/, or an nnU-Net data set
        #[arg(long)]
        data: PathBuf,
        /// Where fingerprint.json and plan.toml go (default DATA/unetpp_plan)
        #[arg(long)]
        out: Option<PathBuf>,
        /// Training time to fill, e.g. 2h, 90min, 1h30m (default 2h)
        #[arg(long, value_parser = unetpp::plan::parse_budget)]
        budget: Option<std::time::Duration>,
        /// Memory training may use, e.g. 16GiB, 512MiB (16G is 10^9 bytes; default half of what
        /// the machine has free)
        #[arg(long, value_parser = unetpp::plan::parse_memory)]
        memory: Option<u64>,
        /// 2 for images, 3 for volumes: must agree with the data (default: the data's)
        #[arg(long)]
        dims: Option<usize>,
        /// Filters at level 0 of the planned model (default 32)
        #[arg(long)]
        width: Option<usize>,
        #[command(flatten)]
        backend: BackendArg,
    },
    /// Score a checkpoint on a labelled data set (Dice, IoU per image, overlays)
    Eval {
        /// Folder with images/ + masks/ (or labels/), or a root with test/
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        skip_bad: bool,
        /// Normalised surface Dice tolerance, in mm for volumes (NIfTI spacing), pixels for 2D
        /// images (default 1)
        #[arg(long)]
        nsd_tolerance: Option<f64>,
        /// What a label absent from both reference and prediction scores: `one` (Dice, IoU, NSD 1,
        /// HD95 0; the default) or `nan` (undefined and left out of the means, as nnU-Net)
        #[arg(long)]
        empty: Option<unetpp::metrics::Empty>,
        #[command(flatten)]
        infer: InferArgs,
    },
    /// Decide nnU-Net's post-processing (keep the largest connected component, of all foreground
    /// and per label, where it raises the mean Dice) from validation predictions; `predict` and
    /// `eval` apply a decision saved beside their checkpoint as CHECKPOINT_STEM.postprocess.json
    Postprocess {
        /// Predicted masks (as `predict` writes them)
        #[arg(long)]
        predictions: PathBuf,
        /// Reference masks with the same file names (without extension)
        #[arg(long)]
        labels: PathBuf,
        /// Where the decision (JSON) goes, e.g. RUN/checkpoints/best.postprocess.json
        #[arg(long)]
        out: PathBuf,
        /// 1 = binary (the default); n >= 2 = label ids 0..n-1
        #[arg(long)]
        classes: Option<usize>,
        /// `full`: 26 neighbours in 3D, 8 in 2D (nnU-Net, the default); `face`: 6 in 3D, 4 in 2D
        #[arg(long)]
        connectivity: Option<unetpp::postprocess::Connectivity>,
    },
    /// Write masks (PNG for 2D, NIfTI for 3D) for an image, a volume or a folder of them.
    ///
    /// Never written over: the inputs, their folder, the data's masks/ or labels/, or (without
    /// --overwrite) a file unetpp did not write; its own earlier predictions are replaced
    Predict {
        #[arg(long)]
        input: PathBuf,
        /// Also write probability maps: bare, lossless (32-bit float TIFF for images, float NIfTI
        /// for volumes); npy (float32, images or volumes); png (8-bit, images)
        #[arg(long, num_args = 0..=1, default_missing_value = "lossless", value_name = "tiff|npy|png")]
        probabilities: Option<unetpp::probabilities::Format>,
        /// Replace existing files in --out that unetpp did not write (refused by default). Its own
        /// earlier predictions are always replaced; the inputs and their ground truth never are
        #[arg(long)]
        overwrite: bool,
        /// Only shard I of N (0-based: cases I, I+N, ... of the sorted inputs), for a job array;
        /// cases whose outputs are complete are skipped, and OUT/manifest.shard-I-of-N.jsonl
        /// lists each case (input, outputs, mode, seconds)
        #[arg(long, value_name = "I/N")]
        shard: Option<unetpp::infer::shard::Shard>,
        #[command(flatten)]
        infer: InferArgs,
    },
    /// Cross-validate a `train --folds` run: each fold's best checkpoint predicts its own
    /// validation cases (whole images); all cases scored together give the configuration's
    /// cross-validation score, and the post-processing is decided on them
    ///
    /// Writes RUN/crossval/{predictions/,scores.csv,summary.json} and RUN/postprocess.json, also
    /// beside every fold's best checkpoint (best.postprocess.json) where predict and eval apply it
    CrossValidate {
        /// The run directory `train --folds` wrote
        #[arg(long)]
        run: PathBuf,
        /// The data, if it has moved since training (default: the run's)
        #[arg(long)]
        data: Option<PathBuf>,
        /// `accurate` (mean of all heads, the default) or `fast:j`
        #[arg(long)]
        mode: Option<Mode>,
        /// Sliding-window size for large inputs, e.g. 512 or 64,128,128
        #[arg(long, value_parser = patch::parse_size)]
        tile: Option<[usize; 3]>,
        /// As `eval --nsd-tolerance`
        #[arg(long)]
        nsd_tolerance: Option<f64>,
        /// As `eval --empty`
        #[arg(long)]
        empty: Option<unetpp::metrics::Empty>,
        /// As `postprocess --connectivity`
        #[arg(long)]
        connectivity: Option<unetpp::postprocess::Connectivity>,
        /// No mirroring (mirroring along every axis is on by default for 3D: 8x the forward passes)
        #[arg(long)]
        no_tta: bool,
        #[arg(long)]
        skip_bad: bool,
        #[command(flatten)]
        backend: BackendArg,
    },
    /// Keep only the sub-network UNet++ L_j (nodes i + j' <= j and head j)
    Prune {
        #[arg(long)]
        checkpoint: PathBuf,
        #[arg(long)]
        level: usize,
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        backend: BackendArg,
    },
    /// Train and evaluate every model x seed of a spec (experiments/*.toml) and write a report;
    /// finished runs in --out are reused, cut-off ones resumed
    Experiment {
        #[arg(long)]
        spec: PathBuf,
        /// Run directory root (default runs/<spec file name>)
        #[arg(long)]
        out: Option<PathBuf>,
        /// Markdown report (a .png of the pruning trade-off is written beside it)
        #[arg(long)]
        report: Option<PathBuf>,
        /// One seed, 3 steps, 2 test images: the whole pipeline in minutes
        #[arg(long)]
        quick: bool,
    },
    /// Time forward passes (accurate, fast:4..1) and training steps of UNet++ L4 (modern)
    Bench {
        /// Repetitions per case, at least (median reported; cases under 100 ms get a second of runs,
        /// at most 200; default 10)
        #[arg(long)]
        reps: Option<usize>,
        /// 3 for the 3D model (1x64x64x64; default 2)
        #[arg(long)]
        dims: Option<usize>,
        /// Write the timings as JSON here
        #[arg(long)]
        json: Option<PathBuf>,
        #[command(flatten)]
        backend: BackendArg,
        /// Only training steps of the first size (peak-memory reading)
        #[arg(long)]
        train_only: bool,
        /// Also run the PyTorch / ONNX Runtime peers (bench/peer.py) and print ratios
        #[arg(long)]
        compare: bool,
        /// With --compare: alternate ours and the peers this many times and keep each side's
        /// best median per case (the host is shared; one slow minute should not decide a ratio;
        /// default 2)
        #[arg(long)]
        rounds: Option<usize>,
        /// Per-op table instead: our CPU kernels against burn Flex's own ops, same tensors
        #[arg(long)]
        kernels: bool,
        /// Python with torch (and onnxruntime, onnx) installed, for --compare (default
        /// .venv/bin/python)
        #[arg(long)]
        python: Option<PathBuf>,
        /// The peer script, for --compare (default bench/peer.py)
        #[arg(long)]
        peer: Option<PathBuf>,
    },
    /// Convert a PyTorch NestedUNet/UNet checkpoint (.pth/.pt/.safetensors) to a unetpp checkpoint
    Import {
        #[arg(long)]
        from: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// How the PyTorch model's inputs were normalised (see `train --help`; default percentile)
        #[arg(long)]
        normalize: Option<Normalize>,
        /// smp models trained with decoder_interpolation="bilinear" (the weights cannot tell)
        #[arg(long)]
        bilinear: bool,
        #[command(flatten)]
        backend: BackendArg,
    },
    /// Write a checkpoint as .safetensors (2D, pytorch-nested-unet names) or as an ONNX graph
    Export {
        #[arg(long)]
        checkpoint: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// `safetensors` (weights with pytorch-nested-unet's names, 2D `modern`; the default) or
        /// `onnx` (the inference graph, opset 17, probabilities out)
        #[arg(long)]
        format: Option<unetpp::export::Format>,
        /// ONNX only: `accurate` (mean of all heads, the default) or `fast:j` (the pruned L_j graph)
        #[arg(long)]
        mode: Option<Mode>,
        #[command(flatten)]
        backend: BackendArg,
    },
    /// Architecture and parameter counts per pruning level
    Info {
        /// Describe a checkpoint instead of an architecture
        #[arg(long)]
        checkpoint: Option<PathBuf>,
        #[command(flatten)]
        model: ModelArgs,
    },
    /// Make a synthetic benchmark from real images (docs/nodules.md)
    #[command(subcommand)]
    Synth(Synth),
}

#[derive(Subcommand)]
enum Synth {
    /// Lung nodules placed in real chest CTs, written as an nnU-Net data set (imagesTr, labelsTr,
    /// imagesTs, labelsTs) with the held-out volume's real nodule in OUT/real/
    Nodules {
        #[arg(long)]
        out: PathBuf,
        /// Seed of every random choice (default 0): the same seed gives the same files
        #[arg(long)]
        seed: Option<u64>,
        /// Training cases (default 120)
        #[arg(long)]
        cases: Option<usize>,
        /// Synthetic test cases (default 24)
        #[arg(long)]
        test_cases: Option<usize>,
        /// The lung volume kept for testing, lung1 (default) or lung2; the other one and the
        /// chest CT feed training
        #[arg(long)]
        holdout: Option<unetpp::synth::nodules::Holdout>,
        /// Voxel spacing of the cases, X,Y,Z in mm or one number (default 1)
        #[arg(long)]
        spacing: Option<unetpp::data::volume::spacing::Spacing>,
        /// Folder holding lesions-pyradiomics/ and chest-ct-slicerio/ (default ../shared/data)
        #[arg(long)]
        sources: Option<PathBuf>,
        /// Share of the synthetic cases, 0 to 1, that hold a lung mass (32-50 mm, solid) instead
        /// of a nodule (3-30 mm, as in LIDC); default 0
        #[arg(long)]
        masses: Option<f64>,
    },
}

/// What `eval` and `predict` share.
#[derive(Args, Clone)]
struct InferArgs {
    /// A checkpoint, or several (repeat the flag or list them with commas) to average their
    /// probabilities as an ensemble; the post-processing decision beside the first applies
    #[arg(long, required = true, value_delimiter = ',')]
    checkpoint: Vec<PathBuf>,
    #[arg(long)]
    out: PathBuf,
    /// `accurate` (mean of all heads, the default) or `fast:j` (head j, sub-network i+j' <= j only)
    #[arg(long)]
    mode: Option<Mode>,
    /// Sliding-window size for large inputs, e.g. 512 or 64,128,128
    #[arg(long, value_parser = patch::parse_size)]
    tile: Option<[usize; 3]>,
    /// Share of a window its neighbour overlaps, in [0, 1) (default 0.5); windows are averaged
    /// with nnU-Net's Gaussian weights. 0.25 takes about half the windows of 0.5 in 3D
    #[arg(long)]
    overlap: Option<f64>,
    /// Mirror each window along every axis and average (on by default for 3D models): costs 4x
    /// the forward passes in 2D, 8x in 3D
    #[arg(long, conflicts_with = "no_tta")]
    tta: bool,
    /// No mirroring (the default for 2D models)
    #[arg(long)]
    no_tta: bool,
    /// Windows per forward pass (default: as many as fit in half the free memory, at most 4)
    #[arg(long)]
    window_batch: Option<usize>,
    #[command(flatten)]
    backend: BackendArg,
}

impl InferArgs {
    fn options(&self) -> InferOptions {
        InferOptions {
            mode: self.mode,
            tile: self.tile,
            overlap: self.overlap,
            tta: if self.tta {
                Some(true)
            } else if self.no_tta {
                Some(false)
            } else {
                None
            },
            window_batch: self.window_batch,
            backend: self.backend.backend.unwrap_or_default(),
            ..Default::default()
        }
    }
}

#[derive(Args, Clone)]
struct BackendArg {
    /// Compute backend: flex, the default (others come with the `vulkan` and `tch` cargo features)
    #[arg(long)]
    backend: Option<Backend>,
}

#[derive(Args, Clone)]
struct ModelArgs {
    /// unet, wide-unet or unetpp (default unetpp)
    #[arg(long)]
    arch: Option<Arch>,
    /// paper (the Keras original) or modern (BatchNorm, bilinear up-sampling; default)
    #[arg(long)]
    preset: Option<Preset>,
    /// Down-sampling steps L (default 4; 5 with a ResNet encoder, as smp)
    #[arg(long)]
    depth: Option<usize>,
    /// Encoder column X^{i,0}: the paper's blocks, or a ResNet as in segmentation_models.pytorch
    /// (2D; nearest up-sampling, 3x3 head, decoder widths 256..16 unless --decoder-channels);
    /// plain (default), resnet18, resnet34 or resnet50
    #[arg(long)]
    encoder: Option<Encoder>,
    /// Widths of the U-Net-path nodes X^{i,L-i}, deepest first, e.g. 256,128,64,32,16
    #[arg(long, value_delimiter = ',')]
    decoder_channels: Option<Vec<usize>>,
    /// Filters at level 0 (default 32; 35 for wide-unet)
    #[arg(long)]
    width: Option<usize>,
    /// 2 or 3 spatial dimensions (default: from the data)
    #[arg(long)]
    dims: Option<usize>,
    /// 1 (grey, the default) or 3 (RGB); an nnU-Net data set's default is its dataset.json's channels
    #[arg(long)]
    channels: Option<usize>,
    /// 1 = binary (the default); n >= 2 = label ids 0..n-1 (multi-class); nnU-Net data: dataset.json's labels
    #[arg(long)]
    classes: Option<usize>,
    /// Train a single head on X^{0,L} instead of deep supervision
    #[arg(long)]
    no_deep_supervision: bool,
    /// Pooling factors (1 or 2) per level and axis, z,y,x (y,x in 2D), levels separated by `:`,
    /// e.g. 1,2,2:2,2,2 for --depth 2 pools level 1 only in-plane (for coarse z, as nnU-Net);
    /// default 2 on every axis
    #[arg(long)]
    pool: Option<unetpp::model::Pooling>,
}

impl ModelArgs {
    fn options(&self) -> ModelOptions {
        ModelOptions {
            arch: self.arch,
            preset: self.preset,
            depth: self.depth,
            encoder: self.encoder,
            decoder_channels: self.decoder_channels.clone(),
            width: self.width,
            dims: self.dims,
            channels: self.channels,
            classes: self.classes,
            no_deep_supervision: self.no_deep_supervision,
            pool: self.pool.clone().map(|p| p.0),
        }
    }
}

#[derive(Args)]
struct TrainArgs {
    /// Folder with images/ + masks/, or a root with train/ (and val/, test/)
    #[arg(long)]
    data: Option<PathBuf>,
    /// Run directory (default: a new runs/run-NNN)
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the run in this directory from its last checkpoint
    #[arg(long, conflicts_with_all = ["data", "out", "config"])]
    resume: Option<PathBuf>,
    /// Read the whole run configuration from a TOML file (as written to RUN/config.toml)
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    model: ModelArgs,
    /// Default 10 (5 on the bundled sample)
    #[arg(long)]
    epochs: Option<usize>,
    /// Default 20 (10 on the bundled sample)
    #[arg(long)]
    steps_per_epoch: Option<usize>,
    /// Default 8 (4 on the bundled sample)
    #[arg(long)]
    batch_size: Option<usize>,
    /// Adam's step size (default 3e-4)
    #[arg(long)]
    lr: Option<f64>,
    /// paper (eq. 2: 0.5 CE - per-image soft Dice, background included; default) or nnunet
    /// (nnU-Net's CE - soft Dice of the foreground classes over the whole batch)
    #[arg(long)]
    loss: Option<unetpp::loss::Objective>,
    /// constant (default) or poly (nnU-Net's lr * (1 - step/steps)^0.9)
    #[arg(long)]
    schedule: Option<unetpp::train::recipe::Schedule>,
    /// Patch size: 96 (2D) or 64,64,64 (3D, depth first); these are the defaults
    #[arg(long, value_parser = patch::parse_size)]
    patch: Option<[usize; 3]>,
    /// Share of patches centred on a foreground voxel (default 0.33)
    #[arg(long)]
    foreground: Option<f64>,
    /// Epochs without a better validation IoU before stopping (default 5)
    #[arg(long)]
    patience: Option<usize>,
    /// Default 42
    #[arg(long)]
    seed: Option<u64>,
    /// percentile[:LOW:HIGH], zscore, window:LOW:HIGH in the file's own units (e.g. window:-1000:400 for CT), or
    /// imagenet (divide by the type's full scale, then ImageNet mean/std)
    #[arg(long)]
    normalize: Option<Normalize>,
    /// Resample volumes to this voxel spacing, X,Y,Z in mm (or one number), as nnU-Net does;
    /// predict and eval use the checkpoint's (default: each volume's own grid)
    #[arg(long)]
    spacing: Option<unetpp::data::volume::spacing::Spacing>,
    /// Validation share when the data has no val/ folder (default 0.2)
    #[arg(long)]
    val_fraction: Option<f64>,
    /// Sliding-window size for validation (default 1024,1024 in 2D, 64,128,128 in 3D)
    #[arg(long, value_parser = patch::parse_size)]
    tile: Option<[usize; 3]>,
    /// Leave out (and list) unreadable or inconsistent pairs instead of stopping
    #[arg(long)]
    skip_bad: bool,
    #[command(flatten)]
    backend: BackendArg,
    /// Fine-tune from this checkpoint (its architecture replaces the model options)
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Follow this plan (`unetpp plan`); default DATA/unetpp_plan/plan.toml, or for 3D data without
    /// one and no recipe flag (patch, batch, epochs, steps, spacing, depth) one made first. Every
    /// flag given wins over the plan's item
    #[arg(long)]
    plan: Option<PathBuf>,
    /// Training time the plan's steps and epochs fill, e.g. 2h, 90min (default the plan's; 2h
    /// for a plan made by train)
    #[arg(long, value_parser = unetpp::plan::parse_budget)]
    budget: Option<std::time::Duration>,
    /// K-fold cross-validation: split the training cases (train/ and val/) into K folds, saved as
    /// OUT/splits.json, and train fold I in OUT/fold_I/ (all folds in turn; finished ones skipped)
    #[arg(long)]
    folds: Option<usize>,
    /// Train only this fold (0..K-1) of a --folds run, e.g. on another machine
    #[arg(long)]
    fold: Option<usize>,
    /// Preprocess every case once into this folder and train from it by patch (default: in
    /// DATA/.unetpp_cache for 3D data sets larger than a quarter of the memory)
    #[arg(long, conflicts_with = "no_cache")]
    cache: Option<PathBuf>,
    /// Hold every case in memory, whatever the data set's size
    #[arg(long)]
    no_cache: bool,
}

fn main() {
    unetpp::backend::keep_freed_memory();
    if let Err(e) = unetpp::backend::join_thread_pool() {
        eprintln!("warning: running beside rayon's thread pool: {e}");
    }
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Train(a) => {
            if let Some(dir) = a.resume {
                if a.folds.is_some() || a.fold.is_some() || folds::is_folds_run(&dir) {
                    return report_folds(&dir, &folds::train(None, &dir, a.folds, a.fold)?);
                }
                let run = app::train(None, &dir)?;
                return report(&run.dir);
            }
            let cfg = match &a.config {
                Some(path) => TrainConfig::read(path)?,
                None => TrainConfig::from_options(&a.options())?,
            };
            let out = match a.out {
                Some(o) => o,
                None => app::next_run_dir(Path::new("runs"))?,
            };
            if a.folds.is_some() || a.fold.is_some() {
                return report_folds(&out, &folds::train(Some(cfg), &out, a.folds, a.fold)?);
            }
            let run = app::train(Some(cfg), &out)?;
            report(&run.dir)
        }
        Command::Plan { data, out, budget, memory, dims, width, backend } => {
            let backend = backend.backend.unwrap_or_default();
            let o = unetpp::plan::PlanOptions { data, out, budget, memory, dims, width, backend };
            let made = unetpp::plan::run(&o)?;
            print!("{}", made.plan.table());
            println!("{} cases; plan and fingerprint written to {}", made.fingerprint.cases.len(), made.dir.display());
            Ok(())
        }
        Command::Eval { data, skip_bad, nsd_tolerance, empty, infer } => {
            let (checkpoint, out) = (&infer.checkpoint, &infer.out);
            let opts = InferOptions { nsd_tolerance, empty, ..infer.options() };
            let summary = app::eval(checkpoint, &data, out, &opts, skip_bad)?;
            println!(
                "{} images, mode {}: mean Dice {:.4} ± {:.4}, mean IoU {:.4} ± {:.4}",
                summary.images, summary.mode, summary.mean_dice, summary.std_dice, summary.mean_iou, summary.std_iou
            );
            if let Some(s) = &summary.surface {
                println!("{}", unetpp::metrics::describe(s));
            }
            for (name, o) in &summary.per_class {
                println!("  {name}: mean Dice {:.4}, mean IoU {:.4}", o.dice, o.iou);
            }
            println!("per-image scores and overlays in {}", out.display());
            Ok(())
        }
        Command::Predict { input, probabilities, overwrite, shard, infer } => {
            let out = &infer.out;
            let p = app::PredictOptions { probabilities, overwrite, shard };
            let written = app::predict(&infer.checkpoint, &input, out, &infer.options(), &p)?;
            println!("wrote {} file(s) to {}", written.len(), out.display());
            Ok(())
        }
        Command::Postprocess { predictions, labels, out, classes, connectivity } => {
            let d = app::postprocess(&predictions, &labels, &out, classes, connectivity)?;
            println!("{}", unetpp::postprocess::describe(&d));
            println!("decision written to {}", out.display());
            Ok(())
        }
        Command::CrossValidate {
            run,
            data,
            mode,
            tile,
            nsd_tolerance,
            empty,
            connectivity,
            no_tta,
            skip_bad,
            backend,
        } => {
            let backend = backend.backend.unwrap_or_default();
            let tta = no_tta.then_some(false);
            let opts = InferOptions { mode, tile, backend, nsd_tolerance, empty, tta, ..Default::default() };
            let cv = unetpp::crossval::run(&run, data.as_deref(), &opts, connectivity, skip_bad)?;
            let (s, p) = (&cv.summary, &cv.postprocessed);
            println!(
                "cross-validation, {} folds, {} cases, mode {}: mean Dice {:.4} ± {:.4}, mean IoU {:.4} ± {:.4}",
                cv.checkpoints.len(),
                s.images,
                s.mode,
                s.mean_dice,
                s.std_dice,
                s.mean_iou,
                s.std_iou
            );
            if let Some(surface) = &s.surface {
                println!("{}", unetpp::metrics::describe(surface));
            }
            for (name, o) in &s.per_class {
                println!("  {name}: mean Dice {:.4}, mean IoU {:.4}", o.dice, o.iou);
            }
            println!("post-processing: {}", unetpp::postprocess::describe(&cv.decision));
            println!("after post-processing: mean Dice {:.4}, mean IoU {:.4}", p.mean_dice, p.mean_iou);
            println!(
                "predictions and scores in {}; decision in {} and beside each fold's best checkpoint",
                run.join(unetpp::crossval::DIR).display(),
                run.join(unetpp::crossval::DECISION).display()
            );
            Ok(())
        }
        Command::Prune { checkpoint, level, out, backend } => {
            let (before, after) = app::prune(&checkpoint, level, &out, backend.backend.unwrap_or_default())?;
            println!("UNet++ L{level}: {after} parameters (from {before}), written to {}", out.display());
            Ok(())
        }
        Command::Experiment { spec, out, report, quick } => {
            let command: Vec<String> = std::env::args().skip(1).collect();
            let command = format!("unetpp {}", command.join(" "));
            let (results, report) = app::experiment(&spec, out.as_deref(), report.as_deref(), &command, quick)?;
            println!("{} runs; report written to {}", results.len(), report.display());
            Ok(())
        }
        Command::Bench { reps, dims, json, backend, train_only, compare, rounds, kernels, python, peer } => {
            let d = BenchOptions::default();
            let o = BenchOptions {
                reps: reps.unwrap_or(d.reps),
                dims: dims.unwrap_or(d.dims),
                backend: backend.backend.unwrap_or(d.backend),
                train_only,
            };
            let kind = match (kernels, compare) {
                (true, _) => BenchKind::Kernels,
                (_, true) => {
                    let d = Peer::default();
                    BenchKind::Compare(Peer {
                        python: python.unwrap_or(d.python),
                        script: peer.unwrap_or(d.script),
                        rounds: rounds.unwrap_or(d.rounds),
                    })
                }
                _ => BenchKind::Model,
            };
            print!("{}", app::bench(o, &kind, json.as_deref())?);
            Ok(())
        }
        Command::Import { from, out, normalize, bilinear, backend } => {
            let opts = unetpp::import::ImportOptions { bilinear };
            let report = app::import(&from, &out, normalize, opts, backend.backend.unwrap_or_default())?;
            print!("{report}");
            println!("written to {}", out.display());
            Ok(())
        }
        Command::Export { checkpoint, out, format, mode, backend } => {
            app::export(&checkpoint, &out, format.unwrap_or_default(), mode, backend.backend.unwrap_or_default())?;
            println!("written to {}", out.display());
            Ok(())
        }
        Command::Synth(Synth::Nodules { out, seed, cases, test_cases, holdout, spacing, sources, masses }) => {
            let o = unetpp::synth::nodules::Options { out, seed, cases, test_cases, holdout, spacing, sources, masses };
            print!("{}", app::synth_nodules(&o)?);
            Ok(())
        }
        Command::Info { checkpoint, model } => {
            print!("{}", app::info_of(checkpoint.as_deref(), &model.options())?);
            Ok(())
        }
    }
}

fn report_folds(dir: &Path, runs: &[unetpp::train::Run]) -> anyhow::Result<()> {
    println!("cross-validation run in {} (folds in {})", dir.display(), dir.join("splits.json").display());
    for r in runs {
        println!(
            "  {}: best epoch {}, checkpoint {}",
            r.dir.display(),
            r.state.best_epoch,
            r.dir.join("checkpoints/best.unetpp").display()
        );
    }
    println!("once every fold is trained: unetpp cross-validate --run {}", dir.display());
    Ok(())
}

fn report(dir: &Path) -> anyhow::Result<()> {
    println!("run written to {}", dir.display());
    println!("  best checkpoint: {}", dir.join("checkpoints/best.unetpp").display());
    println!("  metrics: {}  curves: {}", dir.join("metrics.csv").display(), dir.join("curves.png").display());
    Ok(())
}

impl TrainArgs {
    fn options(&self) -> TrainOptions {
        TrainOptions {
            data: self.data.clone(),
            model: self.model.options(),
            epochs: self.epochs,
            steps_per_epoch: self.steps_per_epoch,
            batch_size: self.batch_size,
            lr: self.lr,
            patch: self.patch,
            foreground: self.foreground,
            patience: self.patience,
            seed: self.seed,
            normalize: self.normalize,
            spacing: self.spacing,
            val_fraction: self.val_fraction,
            tile: self.tile,
            skip_bad: self.skip_bad,
            backend: self.backend.backend.unwrap_or_default(),
            weights: self.weights.clone(),
            plan: self.plan.clone(),
            budget: self.budget,
            recipe: unetpp::train::recipe::Recipe {
                loss: self.loss.unwrap_or_default(),
                schedule: self.schedule.unwrap_or_default(),
            },
            cache: match (&self.cache, self.no_cache) {
                (Some(d), _) => unetpp::data::cache::CacheChoice::Dir(d.clone()),
                (None, true) => unetpp::data::cache::CacheChoice::Off,
                (None, false) => unetpp::data::cache::CacheChoice::Auto,
            },
        }
    }
}
