//! `unetpp` command line: parses arguments and calls the library.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use unetpp::app::{self, InferOptions};
use unetpp::backend::Backend;
use unetpp::data::{DataConfig, Normalize};
use unetpp::model::{Arch, Encoder, Mode, ModelConfig, Preset};
use unetpp::train::TrainConfig;

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
    /// Score a checkpoint on a labelled data set (Dice, IoU per image, overlays)
    Eval {
        /// Folder with images/ + masks/ (or labels/), or a root with test/
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        skip_bad: bool,
        #[command(flatten)]
        infer: InferArgs,
    },
    /// Write masks (PNG for 2D, NIfTI for 3D) for an image, a volume or a folder of them.
    ///
    /// Never written over: the inputs, their folder, the data's masks/ or labels/, or (without
    /// --overwrite) a file unetpp did not write; its own earlier predictions are replaced
    Predict {
        #[arg(long)]
        input: PathBuf,
        /// Also write probability maps
        #[arg(long)]
        probabilities: bool,
        /// Replace existing files in --out that unetpp did not write (refused by default). Its own
        /// earlier predictions are always replaced; the inputs and their ground truth never are
        #[arg(long)]
        overwrite: bool,
        #[command(flatten)]
        infer: InferArgs,
    },
    /// Keep only the sub-network UNet++ L_j (nodes i + j' <= j and head j)
    Prune {
        #[arg(long)]
        checkpoint: PathBuf,
        #[arg(long)]
        level: usize,
        #[arg(long)]
        out: PathBuf,
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
        /// Repetitions per case, at least (median reported; cases under 100 ms get a second of runs, at most 200)
        #[arg(long, default_value_t = 10)]
        reps: usize,
        /// 3 for the 3D model (1x64x64x64)
        #[arg(long, default_value_t = 2)]
        dims: usize,
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
        /// best median per case (the host is shared; one slow minute should not decide a ratio)
        #[arg(long, default_value_t = 2)]
        rounds: usize,
        /// Per-op table instead: our CPU kernels against burn Flex's own ops, same tensors
        #[arg(long)]
        kernels: bool,
        /// Python with torch (and onnxruntime, onnx) installed, for --compare
        #[arg(long, default_value = ".venv/bin/python")]
        python: PathBuf,
        /// The peer script, for --compare
        #[arg(long, default_value = "bench/peer.py")]
        peer: PathBuf,
    },
    /// Convert a PyTorch NestedUNet/UNet checkpoint (.pth/.pt/.safetensors) to a unetpp checkpoint
    Import {
        #[arg(long)]
        from: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// How the PyTorch model's inputs were normalised (see `train --help`)
        #[arg(long, default_value = "percentile")]
        normalize: Normalize,
        /// smp models trained with decoder_interpolation="bilinear" (the weights cannot tell)
        #[arg(long)]
        bilinear: bool,
    },
    /// Write a checkpoint as .safetensors (2D, pytorch-nested-unet names) or as an ONNX graph
    Export {
        #[arg(long)]
        checkpoint: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, value_enum, default_value_t)]
        format: unetpp::export::Format,
        /// ONNX only: `accurate` (mean of all heads, the default) or `fast:j` (the pruned L_j graph)
        #[arg(long)]
        mode: Option<Mode>,
    },
    /// Architecture and parameter counts per pruning level
    Info {
        /// Describe a checkpoint instead of an architecture
        #[arg(long)]
        checkpoint: Option<PathBuf>,
        #[command(flatten)]
        model: ModelArgs,
    },
}

/// What `eval` and `predict` share.
#[derive(Args, Clone)]
struct InferArgs {
    #[arg(long)]
    checkpoint: PathBuf,
    #[arg(long)]
    out: PathBuf,
    /// `accurate` (mean of all heads) or `fast:j` (head j, sub-network i+j' <= j only)
    #[arg(long, default_value = "accurate")]
    mode: Mode,
    /// Sliding-window size for large inputs, e.g. 512 or 64,128,128
    #[arg(long)]
    tile: Option<String>,
    #[command(flatten)]
    backend: BackendArg,
}

impl InferArgs {
    fn options(&self) -> anyhow::Result<InferOptions> {
        Ok(InferOptions { mode: self.mode, tile: parse_size(self.tile.as_deref())?, backend: self.backend.backend })
    }
}

#[derive(Args, Clone)]
struct BackendArg {
    /// Compute backend (others come with the `vulkan` and `tch` cargo features)
    #[arg(long, value_enum, default_value = "flex")]
    backend: Backend,
}

#[derive(Args, Clone)]
struct ModelArgs {
    #[arg(long, value_enum, default_value = "unetpp")]
    arch: Arch,
    #[arg(long, value_enum, default_value = "modern")]
    preset: Preset,
    /// Down-sampling steps L (default 4; 5 with a ResNet encoder, as smp)
    #[arg(long)]
    depth: Option<usize>,
    /// Encoder column X^{i,0}: the paper's blocks, or a ResNet as in segmentation_models.pytorch
    /// (2D; nearest up-sampling, 3x3 head, decoder widths 256..16 unless --decoder-channels)
    #[arg(long, value_enum, default_value = "plain")]
    encoder: Encoder,
    /// Widths of the U-Net-path nodes X^{i,L-i}, deepest first, e.g. 256,128,64,32,16
    #[arg(long, value_delimiter = ',')]
    decoder_channels: Option<Vec<usize>>,
    /// Filters at level 0 (default 32; 35 for wide-unet)
    #[arg(long)]
    width: Option<usize>,
    /// 2 or 3 spatial dimensions (default: from the data)
    #[arg(long)]
    dims: Option<usize>,
    /// 1 (grey) or 3 (RGB)
    #[arg(long, default_value_t = 1)]
    channels: usize,
    /// 1 = binary; n >= 2 = label ids 0..n-1 (multi-class)
    #[arg(long, default_value_t = 1)]
    classes: usize,
    /// Train a single head on X^{0,L} instead of deep supervision
    #[arg(long)]
    no_deep_supervision: bool,
}

impl ModelArgs {
    fn config(&self, dims: usize) -> ModelConfig {
        let depth = self.depth.unwrap_or(if self.encoder == Encoder::Plain { 4 } else { 5 });
        let base = ModelConfig::new(self.arch, self.preset, depth);
        let cfg = ModelConfig {
            width: self.width.unwrap_or(base.width),
            in_channels: self.channels,
            classes: self.classes,
            dims: self.dims.unwrap_or(dims),
            deep_supervision: base.deep_supervision && !self.no_deep_supervision,
            ..base
        };
        let ds = cfg.deep_supervision;
        let cfg = cfg.with_encoder(self.encoder, ds);
        match &self.decoder_channels {
            Some(d) => ModelConfig { decoder_channels: d.clone(), ..cfg },
            None => cfg,
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
    #[arg(long, default_value_t = 3e-4)]
    lr: f64,
    /// Patch size: 96 (2D) or 64,64,64 (3D, depth first)
    #[arg(long)]
    patch: Option<String>,
    /// Share of patches centred on a foreground voxel
    #[arg(long, default_value_t = 0.33)]
    foreground: f64,
    #[arg(long, default_value_t = 5)]
    patience: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// percentile[:LOW:HIGH], zscore, window:LOW:HIGH in the file's own units (e.g. window:-1000:400 for CT), or
    /// imagenet (divide by the type's full scale, then ImageNet mean/std)
    #[arg(long)]
    normalize: Option<Normalize>,
    /// Validation share when the data has no val/ folder
    #[arg(long, default_value_t = 0.2)]
    val_fraction: f64,
    #[arg(long)]
    tile: Option<String>,
    /// Leave out (and list) unreadable or inconsistent pairs instead of stopping
    #[arg(long)]
    skip_bad: bool,
    #[command(flatten)]
    backend: BackendArg,
    /// Fine-tune from this checkpoint (its architecture replaces the model options)
    #[arg(long)]
    weights: Option<PathBuf>,
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
                let run = app::train(None, &dir)?;
                return report(&run.dir);
            }
            let cfg = match &a.config {
                Some(path) => {
                    let cfg: TrainConfig = toml::from_str(
                        &std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?,
                    )
                    .with_context(|| format!("cannot parse {}", path.display()))?;
                    // `train` checks again; here the message can say which file holds the bad value.
                    cfg.validate().with_context(|| format!("--config {}", path.display()))?;
                    cfg
                }
                None => train_config(&a)?,
            };
            let out = match a.out {
                Some(o) => o,
                None => app::next_run_dir(Path::new("runs"))?,
            };
            let run = app::train(Some(cfg), &out)?;
            report(&run.dir)
        }
        Command::Eval { data, skip_bad, infer } => {
            let (checkpoint, out) = (&infer.checkpoint, &infer.out);
            let summary = app::eval(checkpoint, &data, out, &infer.options()?, skip_bad)?;
            println!(
                "{} images, mode {}: mean Dice {:.4} ± {:.4}, mean IoU {:.4} ± {:.4}",
                summary.images, summary.mode, summary.mean_dice, summary.std_dice, summary.mean_iou, summary.std_iou
            );
            println!("per-image scores and overlays in {}", out.display());
            Ok(())
        }
        Command::Predict { input, probabilities, overwrite, infer } => {
            let out = &infer.out;
            let written = app::predict(&infer.checkpoint, &input, out, &infer.options()?, probabilities, overwrite)?;
            println!("wrote {} file(s) to {}", written.len(), out.display());
            Ok(())
        }
        Command::Prune { checkpoint, level, out } => {
            let (before, after) = app::prune(&checkpoint, level, &out)?;
            println!("UNet++ L{level}: {after} parameters (from {before}), written to {}", out.display());
            Ok(())
        }
        Command::Experiment { spec, out, report, quick } => {
            let stem = spec.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
            let suffix = if quick { "-quick" } else { "" };
            let out = out.unwrap_or_else(|| PathBuf::from(format!("runs/{stem}{suffix}")));
            let report = report.unwrap_or_else(|| out.join("results.md"));
            let command: Vec<String> = std::env::args().skip(1).collect();
            let command = format!("unetpp {}", command.join(" "));
            let spec = unetpp::experiment::read_spec(&spec)?;
            let results =
                unetpp::experiment::run(spec, &out, &report, &command, unetpp::experiment::Options { quick })?;
            println!("{} runs; report written to {}", results.len(), report.display());
            Ok(())
        }
        Command::Bench { reps, dims, json, backend, train_only, compare, rounds, kernels, python, peer } => {
            if kernels {
                println!("| op | unetpp kernel ms | burn Flex ms | ratio |\n|---|---|---|---|");
                for (case, ours, burn) in unetpp::bench::kernels(reps) {
                    println!("| {case} | {ours:.1} | {burn:.1} | {:.2} |", ours / burn);
                }
                return Ok(());
            }
            let o = unetpp::bench::BenchOptions { reps, dims, backend: backend.backend, train_only };
            if compare {
                print!("{}", unetpp::bench::compare(&python, &peer, o, rounds)?);
                return Ok(());
            }
            let timings = unetpp::bench::run(o);
            println!("{:<36} {:>10}", "case", "median ms");
            for t in &timings {
                println!("{:<36} {:>10.1}", t.case, t.median_ms);
            }
            if let Some(mb) = unetpp::bench::peak_rss_mb() {
                println!("peak RSS MB: {mb:.0}");
            }
            if let Some(path) = json {
                unetpp::fsio::write_atomic(&path, serde_json::to_string_pretty(&timings)?.as_bytes())?;
            }
            Ok(())
        }
        Command::Import { from, out, normalize, bilinear } => {
            let report = app::import(&from, &out, normalize, unetpp::import::ImportOptions { bilinear })?;
            print!("{report}");
            println!("written to {}", out.display());
            Ok(())
        }
        Command::Export { checkpoint, out, format, mode } => {
            app::export(&checkpoint, &out, format, mode)?;
            println!("written to {}", out.display());
            Ok(())
        }
        Command::Info { checkpoint, model } => {
            let cfg = match checkpoint {
                Some(c) => unetpp::checkpoint::read_meta(&c)?.model,
                None => model.config(2),
            };
            print!("{}", app::info(&cfg)?);
            Ok(())
        }
    }
}

fn report(dir: &Path) -> anyhow::Result<()> {
    println!("run written to {}", dir.display());
    println!("  best checkpoint: {}", dir.join("checkpoints/best.unetpp").display());
    println!("  metrics: {}  curves: {}", dir.join("metrics.csv").display(), dir.join("curves.png").display());
    Ok(())
}

/// `96` -> [1, 96, 96]; `64,64,64` -> [64, 64, 64] (depth first).
fn parse_size(s: Option<&str>) -> anyhow::Result<Option<[usize; 3]>> {
    let Some(s) = s else { return Ok(None) };
    let v: Vec<usize> =
        s.split(',').map(|x| x.trim().parse()).collect::<Result<_, _>>().with_context(|| format!("bad size `{s}`"))?;
    match v[..] {
        [a] => Ok(Some([a, a, a])),
        [h, w] => Ok(Some([1, h, w])),
        [d, h, w] => Ok(Some([d, h, w])),
        _ => anyhow::bail!("size `{s}` must be N, H,W or D,H,W"),
    }
}

fn train_config(a: &TrainArgs) -> anyhow::Result<TrainConfig> {
    let data = match &a.data {
        Some(d) => d.clone(),
        None => app::bundled("nuclei")?,
    };
    // The bundled sample is four small crops: a short run shows the whole loop in minutes.
    let (epochs, steps, batch) = if a.data.is_some() { (10, 20, 8) } else { (5, 10, 4) };
    if a.data.is_none() {
        eprintln!("no --data given: training on the bundled sample {} (pass --data DIR for your own)", data.display());
    }
    let dims = app::detect_dims(&data)?;
    // Fine-tuning keeps the checkpoint's architecture and, unless told otherwise, its input normalisation.
    let (model, normalize) = match &a.weights {
        Some(w) => {
            let meta = unetpp::checkpoint::read_meta(w)?;
            (meta.model, a.normalize.or(Some(meta.data.normalize)))
        }
        None => (a.model.config(dims), a.normalize),
    };
    let patch = parse_size(a.patch.as_deref())?.unwrap_or(if model.dims == 3 { [64; 3] } else { [1, 96, 96] });
    let tile = parse_size(a.tile.as_deref())?.unwrap_or(app::default_tile(&model));
    let val_crop = if model.dims == 3 { [64, 192, 192] } else { [1, 384, 384] };
    let normalize = normalize.unwrap_or(if model.dims == 3 {
        Normalize::ZScore
    } else {
        Normalize::Percentile { low: 0.5, high: 99.5 }
    });
    Ok(TrainConfig {
        data,
        input: DataConfig { channels: model.in_channels, classes: model.classes, normalize },
        model,
        epochs: a.epochs.unwrap_or(epochs),
        steps_per_epoch: a.steps_per_epoch.unwrap_or(steps),
        batch_size: a.batch_size.unwrap_or(batch),
        lr: a.lr,
        patch,
        foreground: a.foreground,
        patience: a.patience,
        seed: a.seed,
        val_fraction: a.val_fraction,
        tile,
        val_crop,
        skip_bad: a.skip_bad,
        backend: a.backend.backend,
        weights: a.weights.clone(),
    })
}
