//! Timing of the model itself (forward in every mode, training step) on random data, medians
//! after a warm-up, and `--compare`: the same cases run by the PyTorch and ONNX Runtime peers of
//! `bench/peer.py` on the same machine in the same run, reported as ratios.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::Context;
use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::model::{Arch, Mode, ModelConfig, Preset};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Timing {
    pub case: String,
    pub median_ms: f64,
}

#[derive(Clone, Copy, Debug)]
pub struct BenchOptions {
    pub reps: usize,
    pub dims: usize,
    pub backend: Backend,
    /// Only the training step of the first size (for a clean peak-memory reading).
    pub train_only: bool,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self { reps: 10, dims: 2, backend: Backend::Flex, train_only: false }
    }
}

/// The PyTorch / ONNX Runtime side of `bench --compare`: `python script` prints its timings as JSON.
#[derive(Clone, Debug)]
pub struct Peer {
    pub python: PathBuf,
    pub script: PathBuf,
    /// Ours and the peers alternate this many times; each side keeps its best median per case.
    pub rounds: usize,
}

impl Default for Peer {
    fn default() -> Self {
        Self { python: ".venv/bin/python".into(), script: "bench/peer.py".into(), rounds: 2 }
    }
}

impl BenchOptions {
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            matches!(self.dims, 2 | 3),
            "--dims must be 2 or 3 (the 2D or the 3D model), got {}",
            self.dims
        );
        Ok(())
    }
}

/// The cases: batch 4 and 1 of 96x96 and one 256x256 in 2D; 1x64^3 in 3D.
pub fn sizes(dims: usize) -> Vec<(usize, [usize; 3])> {
    if dims == 3 { vec![(1, [64; 3])] } else { vec![(4, [1, 96, 96]), (1, [1, 96, 96]), (1, [1, 256, 256])] }
}

/// Median of `reps` timed runs after a warm-up, more for short cases: at least a second of them
/// (at most 200 runs), so that a 10 ms case is not decided by a tenth of a second of a shared
/// host. bench/peer.py counts its runs the same way.
fn time(case: String, reps: usize, mut f: impl FnMut()) -> Timing {
    let t = Instant::now();
    f(); // warm-up
    let warm_ms = t.elapsed().as_secs_f64() * 1e3;
    let reps = reps.max(((1000.0 / warm_ms.max(1e-3)).ceil() as usize).min(200));
    let mut v: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    v.sort_by(f64::total_cmp);
    Timing { case, median_ms: v[v.len() / 2] }
}

/// Forward (accurate and fast:L..1) and a full training step (forward, backward, Adam) of the
/// `modern` UNet++ L4 with four heads.
pub fn run(o: BenchOptions) -> Vec<Timing> {
    let cfg = ModelConfig { dims: o.dims, ..ModelConfig::new(Arch::Unetpp, Preset::Modern, 4) };
    let mut sizes = sizes(o.dims);
    if o.train_only {
        sizes.truncate(1);
    }
    let mut out = vec![];
    for (batch, shape) in sizes {
        let dims = &shape[3 - o.dims..];
        let label = format!("{batch}x1x{}", dims.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("x"));
        out.extend(crate::for_rank!(o.dims, bench_d(&cfg, batch, shape, o, &label)));
    }
    out
}

fn bench_d<const D: usize>(
    cfg: &ModelConfig,
    batch: usize,
    shape: [usize; 3],
    o: BenchOptions,
    label: &str,
) -> Vec<Timing> {
    let mut out = vec![];
    let device = o.backend.device();
    device.seed(0);
    let dims = crate::data::patch::batch_dims::<D>(batch, 1, shape);
    if !o.train_only {
        let model = cfg.init::<D>(&device).fold_batchnorm();
        let x = Tensor::<D>::random(dims, burn::tensor::Distribution::Default, &device);
        for mode in std::iter::once(Mode::Accurate).chain((1..=cfg.depth).rev().map(Mode::Fast)) {
            out.push(time(format!("forward {mode} {label}"), o.reps, || {
                let _busy = crate::backend::busy_workers();
                let _ = model.predict(x.clone(), mode).unwrap().into_data();
            }));
        }
    }
    let ad = o.backend.training_device();
    // Moved through each step as `train` does, so that Adam may update parameters it owns.
    let mut model = Some(cfg.init::<D>(&ad));
    let mut optim = crate::optim::adam(1e-8);
    let x = Tensor::<D>::random(dims, burn::tensor::Distribution::Default, &ad);
    let y = Tensor::<D>::random(dims, burn::tensor::Distribution::Bernoulli(0.3), &ad);
    out.push(time(format!("train step {label}"), o.reps, || {
        let m = model.take().expect("the model is put back after each step");
        model = Some(crate::train::step(m, &mut optim, 3e-4, x.clone(), y.clone()).0);
    }));
    out
}

/// Layer shapes of UNet++ L4 (`modern`) at batch 4 of 96x96 for the per-op table: (c_in, c_out,
/// side): X^{0,1} and X^{0,4} (narrow output, wide concatenated input), the second convolution of
/// a level-0 block, X^{1,3}, X^{2,2} and the bottom X^{4,0}.
const OP_SHAPES: [(usize, usize, usize); 6] =
    [(96, 32, 96), (192, 32, 96), (32, 32, 96), (320, 64, 48), (512, 128, 24), (256, 512, 6)];

/// Per-op timing of our kernels against burn Flex's own ops on the same tensors, medians in ms:
/// 3x3 convolution forward and forward + backward at each layer shape, and 2x up-sampling.
pub fn kernels(reps: usize) -> Vec<(String, f64, f64)> {
    use crate::model::layers::{Conv, upsample};
    let both = |case: String, f: &mut dyn FnMut()| {
        crate::kernel::set_enabled(false);
        let burn = time(case.clone(), reps, &mut *f).median_ms;
        crate::kernel::set_enabled(true);
        let ours = time(case.clone(), reps, f).median_ms;
        (case, ours, burn)
    };
    let (dev, ad) = (Device::flex(), Device::flex().autodiff());
    let mut out = vec![];
    for (c_in, c_out, side) in OP_SHAPES {
        let label = format!("{c_in}->{c_out} @ 4x{side}x{side}");
        let conv = Conv::<4>::new(c_in, c_out, 3, &dev);
        let x = Tensor::<4>::random([4, c_in, side, side], burn::tensor::Distribution::Default, &dev);
        out.push(both(format!("conv3x3 forward {label}"), &mut || {
            let _ = conv.forward(x.clone()).into_data();
        }));
        let conv = Conv::<4>::new(c_in, c_out, 3, &ad);
        let x = Tensor::<4>::random([4, c_in, side, side], burn::tensor::Distribution::Default, &ad).require_grad();
        out.push(both(format!("conv3x3 fwd+bwd {label}"), &mut || {
            let _ = conv.forward(x.clone()).sum().backward();
        }));
    }
    let x = Tensor::<4>::random([4, 64, 48, 48], burn::tensor::Distribution::Default, &ad).require_grad();
    out.push(both("upsample2x fwd+bwd 4x64x48x48".into(), &mut || {
        let _ = upsample(x.clone(), false, false).sum().backward();
    }));
    out
}

/// Peak resident memory of this process in MB (Linux `VmHWM`).
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<f64>().ok()? / 1024.0)
}

#[derive(Deserialize)]
struct PeerRow {
    case: String,
    peer: String,
    median_ms: f64,
}

#[derive(Deserialize)]
struct PeerReport {
    versions: serde_json::Value,
    peak_rss_mb: f64,
    rows: Vec<PeerRow>,
}

fn peer(python: &Path, script: &Path, o: BenchOptions, threads: usize) -> anyhow::Result<PeerReport> {
    let mut cmd = Command::new(python);
    cmd.arg(script).args([
        "--threads",
        &threads.to_string(),
        "--reps",
        &o.reps.to_string(),
        "--dims",
        &o.dims.to_string(),
    ]);
    if o.train_only {
        cmd.arg("--train-only");
    }
    let out = cmd.output().with_context(|| format!("cannot run {} {}", python.display(), script.display()))?;
    anyhow::ensure!(out.status.success(), "the peer failed:\n{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).context("the peer printed no JSON report")
}

/// Our timings and memory, measured in a child process so its peak RSS covers training only.
fn ours_train_memory(o: BenchOptions) -> anyhow::Result<f64> {
    let exe = std::env::current_exe()?;
    let out = Command::new(exe)
        .args(["bench", "--train-only", "--reps", "3", "--dims", &o.dims.to_string(), "--backend", o.backend.name()])
        .output()
        .context("cannot re-run unetpp for the memory reading")?;
    anyhow::ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("peak RSS MB: "))
        .and_then(|v| v.trim().parse().ok())
        .context("no peak RSS line from the child")
}

/// Runs ours and the peers in one go and renders the comparison as a Markdown table.
pub fn compare(p: &Peer, o: BenchOptions) -> anyhow::Result<String> {
    let (python, script) = (p.python.as_path(), p.script.as_path());
    let threads = rayon::current_num_threads();
    // Alternate the two sides and keep each one's best median per case.
    let mut ours: Vec<Timing> = vec![];
    let mut peers: Option<PeerReport> = None;
    for _ in 0..p.rounds.max(1) {
        for t in run(o) {
            match ours.iter_mut().find(|b| b.case == t.case) {
                Some(b) => b.median_ms = b.median_ms.min(t.median_ms),
                None => ours.push(t),
            }
        }
        let round = peer(python, script, o, threads)?;
        match &mut peers {
            None => peers = Some(round),
            Some(best) => {
                for r in round.rows {
                    if let Some(b) = best.rows.iter_mut().find(|b| b.case == r.case && b.peer == r.peer) {
                        b.median_ms = b.median_ms.min(r.median_ms);
                    }
                }
            }
        }
    }
    let peers = peers.expect("at least one round");
    let ours_mem = ours_train_memory(o)?;
    let peers_mem = peer(python, script, BenchOptions { train_only: true, reps: 3, ..o }, threads)?.peak_rss_mb;
    let find = |case: &str, who: &str| peers.rows.iter().find(|r| r.case == case && r.peer == who).map(|r| r.median_ms);
    let cell = |v: Option<f64>| v.map(|v| format!("{v:.1}")).unwrap_or_else(|| "–".into());
    let ratio = |a: f64, b: Option<f64>| b.map(|b| format!("{:.2}", a / b)).unwrap_or_else(|| "–".into());
    let mut s = String::new();
    writeln!(s, "threads: {threads}; rounds: {} (best median of each side); peers: {}", p.rounds, peers.versions)?;
    writeln!(s, "| case | unetpp ({:?}) ms | PyTorch ms | ratio | ONNX Runtime ms | ratio |", o.backend)?;
    writeln!(s, "|---|---|---|---|---|---|")?;
    for t in &ours {
        let (pt, ort) = (find(&t.case, "pytorch"), find(&t.case, "onnxruntime"));
        writeln!(
            s,
            "| {} | {:.1} | {} | {} | {} | {} |",
            t.case,
            t.median_ms,
            cell(pt),
            ratio(t.median_ms, pt),
            cell(ort),
            ratio(t.median_ms, ort)
        )?;
    }
    writeln!(s, "| peak RSS, training (MB) | {ours_mem:.0} | {peers_mem:.0} | {:.2} | – | – |", ours_mem / peers_mem)?;
    let acc = ours.iter().find(|t| t.case.starts_with("forward accurate")).map(|t| t.median_ms);
    let f = |l: usize| ours.iter().find(|t| t.case.starts_with(&format!("forward fast:{l} "))).map(|t| t.median_ms);
    if let (Some(l4), Some(l3), Some(l1)) = (f(4), f(3), f(1)) {
        writeln!(
            s,
            "\npruning (first size): fast:3 is {:.0}% faster than fast:4; fast:1 is {:.1}x faster; accurate {:.1} ms",
            100.0 * (1.0 - l3 / l4),
            l4 / l1,
            acc.unwrap_or(f64::NAN)
        )?;
    }
    Ok(s)
}
