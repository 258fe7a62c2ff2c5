//! The CLI's verbs as library calls: each takes paths and options, does the work, writes files.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use burn::module::Module;

use crate::backend::Backend;
use crate::checkpoint::{self, Meta};
use crate::data::volume::spacing::on_input_grid;
use crate::data::{self, Splits, io};
use crate::infer::{self, Summary, writer};
use crate::model::{Mode, ModelConfig};
pub use crate::train::train;

/// A bundled sample data set (`samples/NAME` in the working directory or the source tree).
pub fn bundled(name: &str) -> anyhow::Result<PathBuf> {
    [Path::new("samples").join(name), Path::new(env!("CARGO_MANIFEST_DIR")).join("samples").join(name)]
        .into_iter()
        .find(|p| p.is_dir())
        .with_context(|| format!("bundled sample `{name}` not found; pass --data"))
}

/// `runs/run-001`, `runs/run-002`, ...: the first that does not exist.
pub fn next_run_dir(root: &Path) -> anyhow::Result<PathBuf> {
    (1..10_000).map(|i| root.join(format!("run-{i:03}"))).find(|p| !p.exists()).context("no free run directory")
}

/// 3 when the data set holds NIfTI volumes of more than one slice, else 2.
pub fn detect_dims(root: &Path) -> anyhow::Result<usize> {
    let s = Splits::find(root)?;
    let split = s.train.or(s.test).unwrap();
    let dir = if data::layout::split(&split)?.is_some() { split } else { split.join("images") };
    let volume = std::fs::read_dir(&dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .flatten()
        .any(|e| io::is_volume(&e.path()) && data::depth_of(&e.path()).is_none_or(|d| d > 1));
    Ok(if volume { 3 } else { 2 })
}

/// Whole 2D images up to 1024^2 go through in one window; volumes in windows of 64x128x128.
pub fn default_tile(cfg: &ModelConfig) -> [usize; 3] {
    if cfg.dims == 3 { [64, 128, 128] } else { [1, 1024, 1024] }
}

/// Options shared by `eval` and `predict`.
#[derive(Clone, Debug, Default)]
pub struct InferOptions {
    /// Default [`Mode::Accurate`].
    pub mode: Option<Mode>,
    /// Sliding-window size; default [`default_tile`].
    pub tile: Option<[usize; 3]>,
    pub backend: Backend,
    /// `eval`'s NSD tolerance (mm, pixels in 2D); default [`crate::metrics::Settings`]'s.
    pub nsd_tolerance: Option<f64>,
    /// What a label absent on both sides scores in `eval`; default [`crate::metrics::Empty::One`].
    pub empty: Option<crate::metrics::Empty>,
    /// Share of a window its neighbour overlaps; default [`infer::window::DEFAULT_OVERLAP`].
    pub overlap: Option<f64>,
    /// Mirroring test-time augmentation; default on for 3D models, off for 2D.
    pub tta: Option<bool>,
    /// Windows per model pass; default [`infer::window::auto_batch`].
    pub window_batch: Option<usize>,
}

impl InferOptions {
    /// Checks `--mode` and `--tile` against the model they will run.
    pub fn mode(&self) -> Mode {
        self.mode.unwrap_or(Mode::Accurate)
    }

    pub fn metrics(&self) -> crate::metrics::Settings {
        let d = crate::metrics::Settings::default();
        crate::metrics::Settings {
            nsd_tolerance: self.nsd_tolerance.unwrap_or(d.nsd_tolerance),
            empty: self.empty.unwrap_or(d.empty),
        }
    }

    pub fn tile(&self, cfg: &ModelConfig) -> [usize; 3] {
        self.tile.unwrap_or(default_tile(cfg))
    }

    /// How windows slide over inputs for the model `cfg` describes.
    pub fn sliding(&self, cfg: &ModelConfig) -> infer::Sliding {
        infer::Sliding {
            tile: self.tile(cfg),
            overlap: self.overlap.unwrap_or(infer::window::DEFAULT_OVERLAP),
            tta: self.tta.unwrap_or(cfg.dims == 3),
            batch: self.window_batch,
        }
    }

    pub fn validate(&self, cfg: &ModelConfig) -> anyhow::Result<()> {
        self.metrics().validate()?;
        infer::window::check_overlap(self.overlap.unwrap_or(infer::window::DEFAULT_OVERLAP))?;
        if let Some(b) = self.window_batch {
            anyhow::ensure!(b >= 1, "--window-batch 0: must be at least 1 (windows per model pass)");
            let [d, h, w] = self.tile(cfg);
            let voxels = h * w * if cfg.dims == 3 { d } else { 1 };
            crate::limits::ensure_memory(b as f64 * cfg.inference_bytes(voxels), || {
                format!("--window-batch {b} with windows of {}", crate::model::fmt_size(self.tile(cfg), cfg.dims))
            })?;
        }
        if let Mode::Fast(l) = self.mode() {
            let heads = cfg.head_columns();
            let allowed: Vec<String> = heads.iter().map(|j| format!("fast:{j}")).collect();
            anyhow::ensure!(
                heads.contains(&l),
                "--mode fast:{l}: this model has heads on X^0,j for j in {heads:?}; use accurate or {}",
                allowed.join(", ")
            );
        }
        let Some(tile) = self.tile else { return Ok(()) };
        cfg.check_size(tile, "--tile")?;
        // Only a tile asked for: the default window shrinks to small images, and refusing it
        // on a small machine would refuse inputs that fit.
        let voxels = tile[1] * tile[2] * if cfg.dims == 3 { tile[0] } else { 1 };
        crate::limits::ensure_memory(cfg.inference_bytes(voxels), || {
            format!(
                "inference with --tile {} (--width {}, --depth {})",
                crate::model::fmt_size(tile, cfg.dims),
                cfg.width,
                cfg.depth
            )
        })
    }
}

/// Evaluates a checkpoint, or the ensemble of several (their mean probabilities), on `data`
/// (its `test/` split when it has one); writes `scores.csv`, `summary.json`, overlays and
/// `report.html` into `out`. The post-processing decision beside the first checkpoint applies.
pub fn eval(
    cks: &[PathBuf],
    data_dir: &Path,
    out: &Path,
    opts: &InferOptions,
    skip_bad: bool,
) -> anyhow::Result<Summary> {
    let (cks, meta) = &members(cks, opts)?;
    let splits = Splits::find(data_dir)?;
    let dir =
        splits.test.or(splits.val).context("no test/ or val/ split (nnU-Net: imagesTs/ with labelsTs/) to evaluate")?;
    let images: Vec<PathBuf> = data::pairs(&dir, true)?.into_iter().map(|p| p.image).collect();
    check_dims(&images, cks, meta)?;
    crate::for_rank!(meta.model.dims, eval_d(cks, data_dir, &dir, out, opts, skip_bad))
}

/// The checkpoints a `--checkpoint` list names: a k-fold run directory (`train --folds`) stands
/// for its folds' best checkpoints, an ensemble, as nnU-Net predicts with every fold.
pub fn expand_checkpoints(cks: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut all = vec![];
    for ck in cks {
        if ck.is_dir() && crate::train::folds::is_folds_run(ck) {
            all.extend(crate::train::folds::checkpoints(ck)?);
        } else {
            all.push(ck.clone());
        }
    }
    Ok(all)
}

/// The checkpoints `cks` names ([`expand_checkpoints`]) and the ensemble's common metadata
/// ([`infer::ensemble::read_meta`]), once `opts` suit every member.
fn members(cks: &[PathBuf], opts: &InferOptions) -> anyhow::Result<(Vec<PathBuf>, Meta)> {
    let cks = expand_checkpoints(cks)?;
    let meta = infer::ensemble::read_meta(&cks)?;
    for ck in &cks {
        let m = checkpoint::read_meta(ck)?;
        let checked = opts.validate(&m.model);
        // Naming the member only helps where there are several.
        if cks.len() > 1 { checked.with_context(|| format!("checkpoint {}", ck.display()))? } else { checked? }
    }
    Ok((cks, meta))
}

/// Refuses inputs of other dimensions than the ensemble's models before anything is loaded.
fn check_dims(inputs: &[PathBuf], cks: &[PathBuf], meta: &Meta) -> anyhow::Result<()> {
    data::ensure_dims(inputs, meta.model.dims, &format!("checkpoint {}", infer::ensemble::first(cks).display()))
}

/// What `eval` and `predict` run: the ensemble's models on the backend's device, with the
/// post-processing decision saved beside its first checkpoint (and that file).
struct Loaded<const D: usize> {
    models: Vec<crate::model::UNetPP<D>>,
    meta: Meta,
    device: burn::prelude::Device,
    postprocess: Option<crate::postprocess::Decision>,
    postprocess_file: Option<PathBuf>,
    sliding: infer::Sliding,
}

impl<const D: usize> Loaded<D> {
    fn load(cks: &[PathBuf], opts: &InferOptions) -> anyhow::Result<Loaded<D>> {
        let device = opts.backend.device();
        let ck = infer::ensemble::first(cks);
        let (models, meta) = infer::ensemble::load::<D>(cks, &device)?;
        let postprocess = crate::postprocess::Decision::load_beside(ck, meta.model.classes)?;
        let postprocess_file = postprocess.as_ref().map(|_| crate::postprocess::beside(ck));
        if let Some(f) = &postprocess_file {
            eprintln!("applying the post-processing decided in {}", f.display());
        }
        let sliding = opts.sliding(&meta.model);
        Ok(Loaded { models, meta, device, postprocess, postprocess_file, sliding })
    }
}

fn eval_d<const D: usize>(
    cks: &[PathBuf],
    data_dir: &Path,
    dir: &Path,
    out: &Path,
    opts: &InferOptions,
    skip_bad: bool,
) -> anyhow::Result<Summary> {
    let Loaded { models, meta, device, postprocess, postprocess_file, sliding } = Loaded::<D>::load(cks, opts)?;
    crate::output::check_eval_out(data_dir, out)?;
    let samples = data::load(dir, &meta.data, true, skip_bad)?;
    let overlays = out.join("overlays");
    std::fs::create_dir_all(&overlays).with_context(|| format!("cannot create {}", overlays.display()))?;
    let scoring = infer::Scoring { metrics: opts.metrics(), postprocess, spacing: meta.data.spacing };
    let bar = crate::progress::Bar::items("eval", samples.len() as u64);
    let overlay = |s: &data::Sample, pred: &[u8]| {
        bar.set_message(s.name.clone());
        writer::overlay(&overlays, s, pred)?;
        bar.inc(1);
        Ok(())
    };
    let (scores, mut summary) =
        infer::evaluate(&models, &samples, &[opts.mode()], &sliding, &device, overlay, &scoring)?.remove(0);
    bar.finish_and_clear();
    summary.per_class = crate::infer::by_label::class_means(&scores, &crate::infer::by_label::class_names(&meta.data));
    let made = writer::Provenance { checkpoints: cks, postprocess: postprocess_file.as_deref(), sliding: &sliding };
    writer::scores(out, &scores, &summary, &made)?;
    crate::report::eval(out)?;
    Ok(summary)
}

/// `unetpp postprocess`: see [`crate::postprocess::run`].
pub fn postprocess(
    predictions: &Path,
    labels: &Path,
    out: &Path,
    classes: Option<usize>,
    connectivity: Option<crate::postprocess::Connectivity>,
) -> anyhow::Result<crate::postprocess::Decision> {
    crate::postprocess::run(predictions, labels, out, classes, connectivity)
}

/// What `predict` writes besides the masks, and which share of the inputs it takes.
#[derive(Clone, Debug, Default)]
pub struct PredictOptions {
    /// Also write probability maps, in this format.
    pub probabilities: Option<crate::probabilities::Format>,
    /// Replace files in `out` that unetpp did not write.
    pub overwrite: bool,
    /// Only this shard of the inputs; cases whose outputs are already complete are skipped, and
    /// a manifest of the shard is written in `out` ([`infer::shard`]).
    pub shard: Option<infer::shard::Shard>,
}

/// Predicts masks with a checkpoint, or the ensemble of several (their mean probabilities; the
/// post-processing decision beside the first applies), for one file or every image in a folder
/// (or its `images/`); returns the files written. Refused before anything is written: an `out`
/// that is the inputs' folder or the data's
/// ground truth, inputs whose outputs would share a name, and (unless `overwrite`) existing files
/// in `out` that unetpp did not write; its own earlier predictions are replaced. The next case is
/// read while the current one is computed.
pub fn predict(
    cks: &[PathBuf],
    input: &Path,
    out: &Path,
    opts: &InferOptions,
    p: &PredictOptions,
) -> anyhow::Result<Vec<PathBuf>> {
    let (cks, meta) = &members(cks, opts)?;
    let inputs = Inputs::find(input, &meta.data)?;
    check_dims(&inputs.files, cks, meta)?;
    crate::for_rank!(meta.model.dims, predict_d(cks, &inputs, out, opts, p))
}

/// What `predict --input` names, listed once: the path as given, the folder the inputs are in,
/// and the inputs: `input` itself, or the supported, non-hidden files of the folder (or of its
/// `images/`), sorted.
struct Inputs {
    given: PathBuf,
    dir: PathBuf,
    files: Vec<PathBuf>,
    /// nnU-Net cases (one file per channel), in the order of `files` (their first channels).
    cases: Option<Vec<data::layout::Case>>,
}

impl Inputs {
    fn find(input: &Path, cfg: &data::DataConfig) -> anyhow::Result<Inputs> {
        if input.is_file() || io::is_volume(input) {
            let dir = input.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
            let (given, dir, files) = (input.to_path_buf(), dir.to_path_buf(), vec![input.to_path_buf()]);
            return Ok(Inputs { given, dir, files, cases: None });
        }
        if let Some((dir, cases)) = data::layout::predict_cases(input, cfg)? {
            let files = cases.iter().map(|c| c.files[0].clone()).collect();
            return Ok(Inputs { given: input.to_path_buf(), dir, files, cases: Some(cases) });
        }
        let dir = if input.join("images").is_dir() { input.join("images") } else { input.to_path_buf() };
        // Hidden files are skipped as in data sets: they include a killed run's temporary files.
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .with_context(|| format!("cannot read {}", dir.display()))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                (p.is_file() && io::is_supported(p) || p.is_dir() && io::is_volume(p))
                    && !p.file_name().is_some_and(|n| n.as_encoded_bytes().starts_with(b"."))
            })
            .collect();
        files.sort();
        anyhow::ensure!(!files.is_empty(), "no images found in {}", dir.display());
        Ok(Inputs { given: input.to_path_buf(), dir, files, cases: None })
    }
}

fn predict_d<const D: usize>(
    cks: &[PathBuf],
    inputs: &Inputs,
    out: &Path,
    opts: &InferOptions,
    p: &PredictOptions,
) -> anyhow::Result<Vec<PathBuf>> {
    let Loaded { models, meta, device, postprocess, sliding, .. } = Loaded::<D>::load(cks, opts)?;
    let Inputs { given, dir, files, cases } = inputs;
    // An nnU-Net case's outputs are named CASE.nii.gz, as nnU-Net names them.
    let names: Vec<PathBuf> = match cases {
        Some(cases) => cases.iter().zip(files).map(|(c, f)| dir.join(c.name.clone() + output_ending(f))).collect(),
        None => files.clone(),
    };
    // Planned over every input, also for a shard: each shard checks the same names.
    let plan =
        crate::output::plan_predictions(given, dir, &names, out, meta.model.classes, p.probabilities, p.overwrite)?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut manifest = p.shard.map(|sh| infer::shard::Manifest::open(out, &sh.manifest_name()));
    let mode = opts.mode().to_string();
    let mut todo = vec![];
    for (i, (path, paths)) in plan.into_iter().enumerate() {
        match (p.shard, &mut manifest) {
            (Some(sh), _) if !sh.owns(i) => {}
            // A re-submitted shard redoes only what is missing.
            (Some(_), Some(m)) if infer::shard::done(&paths) => {
                eprintln!("skipped {}: its outputs are complete", path.display());
                let entry = infer::shard::Entry {
                    input: path,
                    outputs: paths,
                    mode: mode.clone(),
                    seconds: 0.0,
                    skipped: true,
                };
                m.record(entry)?;
            }
            _ => todo.push((i, path, paths)),
        }
    }
    let read = |(i, path, paths): (usize, PathBuf, Vec<PathBuf>)| {
        let s = match cases {
            Some(cases) => {
                let c = &cases[i];
                let (image, shape, geometry) = data::layout::read_channels(&c.name, &c.files, &meta.data)?;
                let (name, channels, source) = (c.name.clone(), meta.data.channels, c.files[0].clone());
                data::Sample { name, image, mask: vec![], channels, shape, source, geometry }
            }
            None => infer::read_unlabelled(&path, &meta.data)?,
        };
        Ok((path, paths, s, std::time::Instant::now()))
    };
    let mut written = vec![];
    let bar = crate::progress::Bar::items("predict", todo.len() as u64);
    infer::read_ahead::for_each(todo, read, |(path, paths, s, start)| {
        bar.set_message(s.name.clone());
        let probs = on_input_grid(&s, meta.data.spacing, |r| {
            infer::probabilities(&models, r, &[opts.mode()], &sliding, &device)
        })?
        .remove(0);
        let mut pred = infer::labels(&probs, meta.model.classes);
        if let Some(pp) = &postprocess {
            pp.apply(&mut pred, s.shape);
        }
        writer::prediction_to(&paths, &s, &pred, &probs, meta.model.classes)?;
        bar.println(format_args!("predicted {}", infer::describe(&s)));
        if let Some(m) = &mut manifest {
            let seconds = start.elapsed().as_secs_f64();
            m.record(infer::shard::Entry {
                input: path,
                outputs: paths.clone(),
                mode: mode.clone(),
                seconds,
                skipped: false,
            })?;
        }
        written.extend(paths);
        bar.inc(1);
        Ok(())
    })?;
    bar.finish_and_clear();
    manifest.map(|m| m.save()).transpose()?;
    Ok(written)
}

fn output_ending(input: &Path) -> &'static str {
    if io::is_volume(input) { ".nii.gz" } else { ".png" }
}

/// Converts a PyTorch NestedUNet/UNet checkpoint (`.pth`, `.pt`, `.safetensors`) into a unetpp
/// checkpoint; inputs are to be normalised with `normalize` (default percentile 0.5..99.5, as
/// training's 2D default). The weights are loaded (and their
/// conversion checked) on `backend`.
pub fn import(
    src: &Path,
    out: &Path,
    normalize: Option<crate::data::Normalize>,
    opts: crate::import::ImportOptions,
    backend: Backend,
) -> anyhow::Result<crate::import::Report> {
    let normalize = normalize.unwrap_or(crate::data::Normalize::Percentile { low: 0.5, high: 99.5 });
    normalize.check().map_err(anyhow::Error::msg)?;
    ensure_not_input(out, &[src])?;
    let (model, report) = crate::import::import_with(src, opts, &backend.device())?;
    let cfg = model.config().clone();
    let data = crate::data::DataConfig::new(cfg.in_channels, cfg.classes, normalize);
    checkpoint::save(&model, &Meta { model: cfg, data, epoch: 0, val_iou: None }, out)?;
    Ok(report)
}

/// Writes a checkpoint as `.safetensors` with pytorch-nested-unet's names, or as ONNX.
pub fn export(
    ck: &Path,
    out: &Path,
    format: crate::export::Format,
    mode: Option<crate::model::Mode>,
    backend: Backend,
) -> anyhow::Result<()> {
    ensure_not_input(out, &[ck])?;
    crate::export::export(ck, out, format, mode, &backend.device())
}

/// Writes UNet++ L_level of a checkpoint; returns parameter counts before and after.
pub fn prune(ck: &Path, level: usize, out: &Path, backend: Backend) -> anyhow::Result<(usize, usize)> {
    ensure_not_input(out, &[ck])?;
    let meta = checkpoint::read_meta(ck)?;
    let heads = meta.model.head_columns();
    anyhow::ensure!(
        heads.contains(&level),
        "--level {level}: checkpoint {} has heads on X^0,j for j in {heads:?} only; pick one of those{}",
        ck.display(),
        if heads.len() == 1 { " (it was trained without deep supervision or is already pruned)" } else { "" }
    );
    meta.model.validate().with_context(|| format!("checkpoint {}", ck.display()))?;
    crate::for_rank!(meta.model.dims, prune_d(ck, level, out, backend))
}

fn prune_d<const D: usize>(ck: &Path, level: usize, out: &Path, backend: Backend) -> anyhow::Result<(usize, usize)> {
    let device = backend.device();
    let (model, meta) = checkpoint::load::<D>(ck, &device)?;
    let before = model.num_params();
    let pruned = model.prune(level)?;
    let after = pruned.num_params();
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    checkpoint::save(&pruned, &Meta { model: pruned.config().clone(), ..meta }, out)?;
    Ok((before, after))
}

/// `info`: [`info`] of a checkpoint's architecture, or of the one `model` asks for (2D unless
/// it says otherwise).
pub fn info_of(ck: Option<&Path>, model: &crate::train::ModelOptions) -> anyhow::Result<String> {
    let cfg = match ck {
        Some(c) => checkpoint::read_meta(c)?.model,
        None => model.config(2),
    };
    info(&cfg)
}

/// `experiment`: runs a spec file into `out` (default `runs/<spec name>`, `-quick` appended with
/// `quick`) and writes the report to `report` (default `out/results.md`); returns the runs and
/// the report's path. `command` is the command line the report quotes.
pub fn experiment(
    spec: &Path,
    out: Option<&Path>,
    report: Option<&Path>,
    command: &str,
    quick: bool,
) -> anyhow::Result<(Vec<crate::experiment::RunResult>, PathBuf)> {
    let stem = spec.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
    let suffix = if quick { "-quick" } else { "" };
    let out = out.map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from(format!("runs/{stem}{suffix}")));
    let report = report.map(Path::to_path_buf).unwrap_or_else(|| out.join("results.md"));
    let spec = crate::experiment::read_spec(spec)?;
    let results = crate::experiment::run(spec, &out, &report, command, crate::experiment::Options { quick })?;
    Ok((results, report))
}

/// What `bench` times.
#[derive(Clone, Debug)]
pub enum BenchKind {
    /// The model's forward passes and training step.
    Model,
    /// Our CPU kernels against burn Flex's own ops, op by op.
    Kernels,
    /// The model against the PyTorch / ONNX Runtime peers.
    Compare(crate::bench::Peer),
}

/// `bench`: the timings as the text to print; [`BenchKind::Model`] timings are also written as
/// JSON to `json` when given.
pub fn bench(o: crate::bench::BenchOptions, kind: &BenchKind, json: Option<&Path>) -> anyhow::Result<String> {
    o.validate()?;
    let mut s = String::new();
    match kind {
        BenchKind::Kernels => {
            writeln!(s, "| op | unetpp kernel ms | burn Flex ms | ratio |\n|---|---|---|---|")?;
            for (case, ours, burn) in crate::bench::kernels(o.reps) {
                writeln!(s, "| {case} | {ours:.1} | {burn:.1} | {:.2} |", ours / burn)?;
            }
        }
        BenchKind::Compare(peer) => s = crate::bench::compare(peer, o)?,
        BenchKind::Model => {
            let timings = crate::bench::run(o);
            writeln!(s, "{:<36} {:>10}", "case", "median ms")?;
            for t in &timings {
                writeln!(s, "{:<36} {:>10.1}", t.case, t.median_ms)?;
            }
            if let Some(mb) = crate::bench::peak_rss_mb() {
                writeln!(s, "peak RSS MB: {mb:.0}")?;
            }
            if let Some(path) = json {
                crate::fsio::write_atomic(path, serde_json::to_string_pretty(&timings)?.as_bytes())?;
            }
        }
    }
    Ok(s)
}

/// A human-readable description: the grid, heads and parameters per pruning level.
pub fn info(cfg: &ModelConfig) -> anyhow::Result<String> {
    cfg.validate()?;
    let mut s = String::new();
    writeln!(
        s,
        "{:?} ({:?} preset, {:?} encoder), {}D, depth {}, filters {:?}",
        cfg.arch,
        cfg.preset,
        cfg.encoder,
        cfg.dims,
        cfg.depth,
        (0..=cfg.depth).map(|i| cfg.filters(i)).collect::<Vec<_>>()
    )?;
    writeln!(
        s,
        "input channels {}, output classes {}, heads on X^0,j for j in {:?}",
        cfg.in_channels,
        cfg.classes,
        cfg.head_columns()
    )?;
    if !cfg.pool.is_empty() {
        let (pool, scale) = (crate::model::Pooling(cfg.pool.clone()), cfg.scale(cfg.depth));
        writeln!(s, "pooling z,y,x per level {pool}: level {} is the input / {scale:?}", cfg.depth)?;
    }
    writeln!(s, "nodes (i = level, j = column):")?;
    for i in 0..=cfg.depth {
        let row: Vec<String> =
            (0..=cfg.depth - i).filter(|&j| cfg.has_node(i, j)).map(|j| format!("X{i},{j}")).collect();
        writeln!(s, "  {}", row.join(" "))?;
    }
    let params = |pruned| crate::dispatch::num_params(cfg, pruned);
    writeln!(s, "parameters: {} (BatchNorm running statistics included)", params(None)?)?;
    let heads = cfg.head_columns();
    if heads.len() > 1 {
        for l in heads {
            writeln!(s, "  pruned L{l}: {} parameters, {} nodes", params(Some(l))?, cfg.plan(l).len())?;
        }
    }
    Ok(s)
}

/// Refuses an output path that is one of the command's inputs: writing it would replace the
/// input (the atomic rename makes no exception for that).
fn ensure_not_input(out: &Path, inputs: &[&Path]) -> anyhow::Result<()> {
    let Ok(o) = out.canonicalize() else { return Ok(()) };
    for i in inputs {
        anyhow::ensure!(
            i.canonicalize().ok().as_deref() != Some(o.as_path()),
            "--out {} is the input {}; pick another --out (nothing overwrites an input)",
            out.display(),
            i.display()
        );
    }
    Ok(())
}

/// `synth nodules`: writes the benchmark and says what went where.
pub fn synth_nodules(o: &crate::synth::nodules::Options) -> anyhow::Result<String> {
    let s = crate::synth::nodules::generate(o)?;
    let count = |split: &str| s.records.iter().filter(|r| r.split == split).count();
    Ok(format!(
        "{} training cases (from {}), {} test cases (from {}) and the real nodule of {} (in real/) written to {}\n",
        count("train"),
        s.train_volumes.join(", "),
        count("test"),
        s.test_volume,
        s.test_volume,
        o.out.display()
    ))
}
