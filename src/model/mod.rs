//! The UNet++ family as one grid of nodes X^{i,j} (i = down-sampling level, j = position on the
//! skip pathway), eq. 1 of the paper:
//!
//! ```text
//! x^{i,0} = H(D(x^{i-1,0}))                                  (D: max pooling by level i's factor)
//! x^{i,j} = H([x^{i,0}, ..., x^{i,j-1}, U(x^{i+1,j-1})])      (UNet++; U: up-sampling by it)
//! x^{i,j} = H([x^{i,0}, U(x^{i+1,j-1})]),  only where i+j = L (U-Net)
//! ```
//!
//! [`UNetPP::forward_level`] computes these lines and nothing else: which nodes run and where
//! each output goes (stored, pooled for the node below, only into a head) is the plan's
//! ([`plan`]), and whether a layer of H runs as one fused kernel pass is decided in one place,
//! `layers::Block::layer`.
//!
//! The same struct covers 2D (`D = 4`) and 3D (`D = 5`), any depth and width. Heads are 1x1
//! convolutions on X^{0,j} returning logits. The sub-grid `i + j <= l` is a complete network
//! ("UNet++ L_l"): fast mode evaluates only it, and [`UNetPP::prune`] keeps only it.
//!
//! With a ResNet encoder (segmentation_models.pytorch's `UnetPlusPlus`), X^{i,0} are the
//! backbone's stages, X^{0,0} does not exist, and the nested decoder is the same grid.

pub mod layers;
mod names;
pub mod plan;
mod pooling;
pub mod resnet;

use burn::module::Module;
use burn::prelude::*;
use serde::{Deserialize, Serialize};

use layers::{Block, Conv, Out, Part, Sink, UpConv, upsample_by};
use plan::{Output, Step};
pub use pooling::Pooling;
use resnet::ResNet;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Arch {
    Unet,
    WideUnet,
    Unetpp,
}

/// The encoder column X^{i,0}: the paper's own blocks, or a torchvision ResNet (ImageNet-style,
/// stem at stride 2, so level 0 holds only decoder nodes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Encoder {
    #[default]
    Plain,
    Resnet18,
    Resnet34,
    Resnet50,
}

impl Encoder {
    /// Blocks per stage and whether they are bottlenecks.
    pub fn resnet(self) -> Option<([usize; 4], bool)> {
        match self {
            Encoder::Plain => None,
            Encoder::Resnet18 => Some(([2, 2, 2, 2], false)),
            Encoder::Resnet34 => Some(([3, 4, 6, 3], false)),
            Encoder::Resnet50 => Some(([3, 4, 6, 3], true)),
        }
    }

    /// Output channels of stage `level` (1..=5).
    fn stage_width(self, level: usize) -> usize {
        match (level, self.resnet()) {
            (1, _) => 64,
            (_, Some((_, true))) => 256 << (level - 2),
            _ => 64 << (level - 2),
        }
    }
}

/// `paper`: the official Keras code (no BN, dropout 0.5, transposed-conv up-sampling).
/// `modern`: BN + ReLU, bilinear/trilinear up-sampling, no dropout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    Paper,
    Modern,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub arch: Arch,
    pub preset: Preset,
    /// Number of down-sampling steps L (levels 0..=L).
    pub depth: usize,
    /// Filters at level 0; level i has width * 2^i.
    pub width: usize,
    pub in_channels: usize,
    /// Output channels: 1 = binary (sigmoid), n >= 2 = n labels incl. background (softmax).
    pub classes: usize,
    /// 2 or 3 spatial dimensions.
    pub dims: usize,
    /// Heads on every X^{0,j} (UNet++ only); otherwise one head on X^{0,L}.
    pub deep_supervision: bool,
    #[serde(default)]
    pub align_corners: bool,
    /// Nearest-neighbour instead of (bi/tri)linear up-sampling (smp's default).
    #[serde(default)]
    pub nearest: bool,
    #[serde(default)]
    pub encoder: Encoder,
    /// Widths of the nodes X^{i,L-i} on the U-Net path, deepest first (smp's `decoder_channels`);
    /// empty: the level widths.
    #[serde(default)]
    pub decoder_channels: Vec<usize>,
    /// Encoder models only: the nested nodes X^{0,1..L-1}. smp's UnetPlusPlus has none (its
    /// X^{0,L} sees only the up-sampled X^{1,L-1}); deep supervision needs them.
    #[serde(default)]
    pub dense_top: bool,
    /// Kernel of the heads: 1 (the paper), 3 (smp).
    #[serde(default = "one")]
    pub head_kernel: usize,
    /// Down-sampling factor per level and spatial axis `[z, y, x]` (z is 1 in 2D): level i is
    /// level i-1 divided by `pool[i-1]`, each factor 1 or 2. Empty: 2 on every axis (the paper).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pool: Vec<[usize; 3]>,
}

fn one() -> usize {
    1
}

/// Most classes (labels are u8) and input channels a model may have.
pub const MAX_CLASSES: usize = 255;

/// Tensors of its own width a node keeps per voxel for the backward pass (see
/// [`ModelConfig::training_bytes`]).
const TRAIN_TENSORS_PER_NODE: f64 = 6.0;

/// `h,w` in 2D, `d,h,w` in 3D: a size as `--patch` and `--tile` take it.
pub fn fmt_size(size: [usize; 3], dims: usize) -> String {
    size[3 - dims..].iter().map(|v| v.to_string()).collect::<Vec<_>>().join(",")
}

impl ModelConfig {
    pub fn new(arch: Arch, preset: Preset, depth: usize) -> Self {
        Self {
            arch,
            preset,
            depth,
            width: if arch == Arch::WideUnet { 35 } else { 32 },
            in_channels: 1,
            classes: 1,
            dims: 2,
            deep_supervision: arch == Arch::Unetpp,
            align_corners: false,
            nearest: false,
            encoder: Encoder::Plain,
            decoder_channels: vec![],
            dense_top: false,
            head_kernel: 1,
            pool: vec![],
        }
    }

    /// UNet++ on a ResNet as smp builds it (nearest up-sampling, 3x3 head, decoder widths
    /// 256..16 for depth 5), with deep supervision if asked (adding X^{0,1..L-1} and their heads).
    pub fn with_encoder(self, encoder: Encoder, deep_supervision: bool) -> Self {
        if encoder == Encoder::Plain {
            return self;
        }
        let l = self.depth;
        Self {
            encoder,
            decoder_channels: (0..l).map(|k| 16 << (l - 1 - k)).collect(),
            nearest: true,
            head_kernel: 3,
            deep_supervision: deep_supervision && self.arch == Arch::Unetpp,
            dense_top: deep_supervision && self.arch == Arch::Unetpp,
            ..self
        }
    }

    /// Checks the architecture; messages name the command-line option that sets each field.
    /// Also refuses a model whose parameters alone would not fit in memory (before `init`
    /// allocates them).
    pub fn validate(&self) -> anyhow::Result<()> {
        use anyhow::ensure;
        ensure!((1..=5).contains(&self.depth), "--depth must be 1..=5, got {}", self.depth);
        ensure!(self.dims == 2 || self.dims == 3, "--dims must be 2 or 3, got {}", self.dims);
        ensure!(self.width > 0, "--width must be at least 1, got 0");
        ensure!(
            (1..=MAX_CLASSES).contains(&self.in_channels),
            "--channels must be 1..={MAX_CLASSES}, got {}",
            self.in_channels
        );
        // Labels are stored as u8.
        ensure!(
            (1..=MAX_CLASSES).contains(&self.classes),
            "--classes must be 1..={MAX_CLASSES} (1 = binary, n = labels 0..n-1), got {}",
            self.classes
        );
        ensure!(!(self.dims == 3 && self.align_corners), "align_corners up-sampling is only implemented for 2D");
        ensure!(
            self.decoder_channels.is_empty() || self.decoder_channels.len() == self.depth,
            "--decoder-channels needs one width per level ({} for --depth {}), got {:?}",
            self.depth,
            self.depth,
            self.decoder_channels
        );
        ensure!(
            self.decoder_channels.iter().all(|&c| c > 0),
            "--decoder-channels must all be at least 1, got {:?}",
            self.decoder_channels
        );
        ensure!(self.head_kernel % 2 == 1, "head_kernel must be odd, got {}", self.head_kernel);
        self.validate_pool()?;
        if self.encoder != Encoder::Plain {
            ensure!(
                self.dims == 2 && self.preset == Preset::Modern,
                "ResNet encoders (--encoder) are 2D and use the `modern` preset"
            );
            ensure!(!self.decoder_channels.is_empty(), "an encoder model needs --decoder-channels");
            ensure!(
                !self.deep_supervision || self.dense_top,
                "deep supervision on an encoder needs the nodes X^0,1..L-1 (dense_top)"
            );
        }
        let params = self.parameters_held();
        crate::limits::ensure_memory(params * 4.0, || {
            format!(
                "a model of about {:.0} million parameters (--width {}, --depth {})",
                params / 1e6,
                self.width,
                self.depth
            )
        })
    }

    /// The nodes of the grid with their level: (i, j).
    pub(crate) fn nodes(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        (0..=self.depth)
            .flat_map(move |i| (0..=self.depth - i).map(move |j| (i, j)))
            .filter(|&(i, j)| self.has_node(i, j))
    }

    /// Convolution weights of the nodes and heads: a lower bound on the parameters (BatchNorm
    /// and biases, a few per filter, are left out, as are a ResNet encoder's stages), so a
    /// checkpoint must hold at least this many values.
    pub fn parameters_estimate(&self) -> f64 {
        let k = 3f64.powi(self.dims as i32);
        let nodes: f64 = self
            .nodes()
            .filter(|&(_, j)| j > 0 || self.encoder == Encoder::Plain)
            .map(|(i, j)| {
                let (cin, w) = (self.node_inputs(i, j) as f64, self.node_width(i, j) as f64);
                (cin + w) * w * k
            })
            .sum();
        let head = self.head_kernel.pow(self.dims as u32) as f64;
        let heads: f64 =
            self.head_columns().iter().map(|&j| self.node_width(0, j) as f64 * self.classes as f64 * head).sum();
        nodes + heads
    }

    /// Parameters for the memory estimates: [`Self::parameters_estimate`] plus a ResNet
    /// encoder's (at most ResNet-50's 23.5 million).
    fn parameters_held(&self) -> f64 {
        self.parameters_estimate() + if self.encoder == Encoder::Plain { 0.0 } else { 23.5e6 }
    }

    /// A patch or window must be a positive multiple of the model's total down-sampling
    /// (`scale(depth)`, 2^depth on every pooled axis) on every spatial axis: the model divides
    /// it `depth` times, and inference would otherwise silently round it.
    pub fn check_size(&self, size: [usize; 3], option: &str) -> anyhow::Result<()> {
        let dims = self.dims.clamp(2, 3);
        let m = self.scale(self.depth.min(5));
        let axes = 3 - dims..3;
        if axes.clone().all(|a| size[a] >= m[a] && size[a].is_multiple_of(m[a])) {
            return Ok(());
        }
        let fix: [usize; 3] = std::array::from_fn(|a| size[a].div_ceil(m[a]).max(1) * m[a]);
        let given = fmt_size(size, dims);
        let why = if self.isotropic() {
            format!("2^depth = {} (--depth {})", m[2], self.depth)
        } else {
            format!("{} per axis (--depth {}, --pool {})", fmt_size(m, dims), self.depth, Pooling(self.pool.clone()))
        };
        anyhow::bail!(
            "{option} {given}: {} size {given} must be divisible by {why} and at least that on every axis, e.g. \
             {option} {}",
            option.trim_start_matches('-'),
            fmt_size(fix, dims)
        )
    }

    /// Rough bytes one training step takes on a batch of `batch` patches of `voxels` voxels.
    ///
    /// Per sample, every node X^{i,j} at level i (voxels / [`Self::reduction`] positions) keeps for the
    /// backward pass its concatenated input and about [`TRAIN_TENSORS_PER_NODE`] tensors of its
    /// own width (two convolutions, two norms, two activations); each head keeps its logits,
    /// probabilities and loss terms. Gradients of these live only while the backward pass
    /// walks back through the node, so they add a fraction, not a copy. Weights are held four
    /// times: the model, its gradients and Adam's two moments. f32 throughout. Calibrated
    /// against peak RSS measured with `unetpp bench --train-only` (370 MiB for 4x96^2 in 2D,
    /// 1846 MiB for 64^3 in 3D; estimates 479 and 2319 MiB, pinned by tests/validation.rs):
    /// it overestimates by about a third, so it refuses only what cannot fit.
    pub fn training_bytes(&self, voxels: usize, batch: usize) -> f64 {
        let per_sample: f64 = self
            .nodes()
            .map(|(i, j)| {
                let at_level = voxels as f64 / self.reduction(i);
                (self.node_inputs(i, j) as f64 + TRAIN_TENSORS_PER_NODE * self.node_width(i, j) as f64) * at_level
            })
            .sum::<f64>()
            + (self.head_columns().len() * self.classes * 3) as f64 * voxels as f64;
        4.0 * (per_sample * batch as f64 + 4.0 * self.parameters_held())
    }

    /// Rough bytes a forward pass over one window of `voxels` voxels takes: every node's output
    /// can be held until the last node reads it, plus the largest node's input and output in
    /// flight, plus the weights.
    pub fn inference_bytes(&self, voxels: usize) -> f64 {
        let at_level = |i: usize| voxels as f64 / self.reduction(i);
        let held: f64 = self.nodes().map(|(i, j)| self.node_width(i, j) as f64 * at_level(i)).sum();
        let peak = self
            .nodes()
            .map(|(i, j)| (self.node_inputs(i, j) + self.node_width(i, j)) as f64 * at_level(i))
            .fold(0.0, f64::max);
        let heads = (self.head_columns().len() * self.classes) as f64 * voxels as f64;
        4.0 * (held + peak + heads + self.parameters_held())
    }

    /// Width of level i: the encoder node X^{i,0} and the nested nodes beside it.
    pub fn filters(&self, level: usize) -> usize {
        match (self.encoder, level) {
            (Encoder::Plain, _) => self.width << level,
            // Level 0 of an encoder model holds only decoder nodes.
            (_, 0) => self.decoder_channels[self.depth - 1],
            (e, _) => e.stage_width(level),
        }
    }

    /// Width of node X^{i,j}: the level's, or the decoder width on the U-Net path i + j = L.
    pub fn node_width(&self, i: usize, j: usize) -> usize {
        if j > 0 && i + j == self.depth && !self.decoder_channels.is_empty() {
            self.decoder_channels[self.depth - 1 - i]
        } else {
            self.filters(i)
        }
    }

    /// Whether node X^{i,j} exists in this architecture.
    pub fn has_node(&self, i: usize, j: usize) -> bool {
        let encoder = self.encoder != Encoder::Plain;
        let top_ok = !(encoder && i == 0) || (j > 0 && (self.dense_top || i + j == self.depth));
        top_ok && i + j <= self.depth && (j == 0 || self.arch == Arch::Unetpp || i + j == self.depth)
    }

    /// The columns j of the full-resolution nodes X^{0,j} that carry a head.
    pub fn head_columns(&self) -> Vec<usize> {
        if self.deep_supervision && self.arch == Arch::Unetpp { (1..=self.depth).collect() } else { vec![self.depth] }
    }

    /// Same-level inputs concatenated into X^{i,j} (j > 0) before the up-sampled one.
    fn lateral_inputs(&self, i: usize, j: usize) -> Vec<usize> {
        (0..j).filter(|&k| self.has_node(i, k)).collect()
    }

    /// Input channels of node X^{i,j}.
    pub(crate) fn node_inputs(&self, i: usize, j: usize) -> usize {
        match (i, j) {
            (0, 0) => self.in_channels,
            (_, 0) => self.filters(i - 1),
            _ => {
                let up = match self.preset {
                    Preset::Paper => self.filters(i),
                    Preset::Modern => self.node_width(i + 1, j - 1),
                };
                self.lateral_inputs(i, j).iter().map(|&k| self.node_width(i, k)).sum::<usize>() + up
            }
        }
    }

    pub fn init<const D: usize>(&self, device: &Device) -> UNetPP<D> {
        assert_eq!(D, self.dims + 2, "tensor rank must be dims + 2");
        let paper = self.preset == Preset::Paper;
        let dropout = if paper { 0.5 } else { 0.0 };
        let plain = self.encoder == Encoder::Plain;
        let grid = (0..=self.depth)
            .map(|i| {
                (0..=self.depth - i)
                    .map(|j| {
                        (self.has_node(i, j) && (plain || j > 0)).then(|| Node {
                            up: (paper && j > 0)
                                .then(|| UpConv::new(self.filters(i + 1), self.filters(i), self.factor(i + 1), device)),
                            block: Block::new(
                                self.node_inputs(i, j),
                                self.node_width(i, j),
                                !paper,
                                plain,
                                dropout,
                                device,
                            ),
                        })
                    })
                    .collect()
            })
            .collect();
        let heads = self
            .head_columns()
            .iter()
            .map(|&j| Conv::new(self.node_width(0, j), self.classes, self.head_kernel, device))
            .collect();
        let encoder = (!plain).then(|| ResNet::new(self.encoder, self.in_channels, self.depth, device));
        UNetPP { encoder, grid, heads, config: self.clone() }
    }
}

/// One node X^{i,j}: its own learned up-sampling of X^{i+1,j-1} (paper preset) and H.
#[derive(Module, Debug)]
pub struct Node<const D: usize> {
    pub up: Option<UpConv<D>>,
    pub block: Block<D>,
}

#[derive(Module, Debug)]
pub struct UNetPP<const D: usize> {
    /// X^{i,0} for i >= 1 when the encoder is a ResNet (the grid then has no j = 0 nodes).
    pub encoder: Option<ResNet<D>>,
    /// grid[i][j] = X^{i,j}; `None` where the architecture has no node.
    pub grid: Vec<Vec<Option<Node<D>>>>,
    /// heads[h] sits on X^{0, config.head_columns()[h]}.
    pub heads: Vec<Conv<D>>,
    /// The architecture: carried with the parameters, not one of them.
    #[module(skip)]
    pub config: ModelConfig,
}

/// How inference combines the heads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mode {
    /// Mean of all heads' probabilities.
    Accurate,
    /// Head on X^{0,l} only, evaluating only the sub-grid i + j <= l.
    Fast(usize),
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "accurate" => Ok(Mode::Accurate),
            _ => s
                .strip_prefix("fast:")
                .and_then(|l| l.parse().ok())
                .map(Mode::Fast)
                .ok_or_else(|| format!("mode must be `accurate` or `fast:j`, got `{s}`")),
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mode::Accurate => write!(f, "accurate"),
            Mode::Fast(l) => write!(f, "fast:{l}"),
        }
    }
}

/// Head logits plus how many nodes were evaluated to get them.
pub struct GridOutput<const D: usize> {
    /// (column j, logits of the head on X^{0,j})
    pub heads: Vec<(usize, Tensor<D>)>,
    pub nodes_evaluated: usize,
}

impl<const D: usize> UNetPP<D> {
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Evaluates the sub-grid i + j <= level (`ModelConfig::plan`) and the heads inside it.
    pub fn forward_level(&self, x: Tensor<D>, level: usize) -> GridOutput<D> {
        let cfg = self.config();
        let plan = cfg.plan(level);
        // x^{i,j}, and D(x^{i,0}) for X^{i+1,0}.
        let mut out: Vec<Vec<Option<Tensor<D>>>> = (0..=level).map(|i| vec![None; level + 1 - i]).collect();
        let mut down: Vec<Option<Tensor<D>>> = vec![None; level + 1];
        if let Some(encoder) = &self.encoder {
            for (i, f) in encoder.forward(x.clone(), level).into_iter().enumerate() {
                out[i + 1][0] = Some(f);
            }
        }
        let stored = |out: &[Vec<Option<Tensor<D>>>], i: usize, j: usize| out[i][j].clone().expect("planned before");
        let mut last_head = None;
        for &Step { i, j, output } in &plan {
            // A ResNet's stages X^{i,0} have no node block: the encoder computed them above.
            let Some(node) = &self.grid[i][j] else { continue };
            let parts = match j {
                0 if i == 0 => vec![Part::Same(x.clone())],
                // x^{i,0} = H(D(x^{i-1,0}))
                0 => vec![Part::Same(down[i - 1].take().expect("X^{i-1,0} pooled"))],
                // x^{i,j} = H([x^{i,0}, ..., x^{i,j-1}, U(x^{i+1,j-1})])
                _ => cfg
                    .lateral_inputs(i, j)
                    .iter()
                    .map(|&k| Part::Same(stored(&out, i, k)))
                    .chain([self.up(node, stored(&out, i + 1, j - 1), cfg.factor(i + 1))])
                    .collect(),
            };
            let sink = match output {
                Output::Stored => Sink::Store,
                Output::Pooled => Sink::Pool(cfg.factor(i + 1)),
                Output::Head(h) => Sink::Head(&self.heads[h]),
            };
            match node.block.forward(parts, sink) {
                Out::Stored(y) => out[i][j] = Some(y),
                Out::Pooled(y, pooled) => (out[i][j], down[i]) = (Some(y), Some(pooled)),
                Out::Head(logits) => last_head = Some((j, logits)),
            }
        }
        let heads = cfg
            .head_columns()
            .into_iter()
            .zip(&self.heads)
            .filter(|(j, _)| *j <= level && out[0][*j].is_some())
            .map(|(j, head)| (j, head.forward(stored(&out, 0, j))))
            .chain(last_head)
            .collect();
        GridOutput { heads, nodes_evaluated: plan.len() }
    }

    /// U in eq. 1, X^{i+1,j-1} as node X^{i,j} reads it, up-sampled by level i+1's `factor`:
    /// the paper preset's learned transposed convolution, nearest or align-corners up-sampling
    /// done here, or the default linear up-sampling left to the node as a reduced-size part.
    fn up(&self, node: &Node<D>, below: Tensor<D>, factor: [usize; 3]) -> Part<D> {
        let cfg = self.config();
        match &node.up {
            Some(up) => Part::Same(up.forward(below)),
            None if cfg.nearest || cfg.align_corners => {
                Part::Same(upsample_by(below, cfg.nearest, cfg.align_corners, factor))
            }
            None => Part::Half(below, factor),
        }
    }

    /// Logits of every head (training with deep supervision).
    pub fn forward(&self, x: Tensor<D>) -> Vec<Tensor<D>> {
        let depth = self.config().depth;
        self.forward_level(x, depth).heads.into_iter().map(|(_, t)| t).collect()
    }

    /// Probabilities for inference in the given mode: sigmoid (binary) or softmax over classes.
    pub fn predict(&self, x: Tensor<D>, mode: Mode) -> anyhow::Result<Tensor<D>> {
        Ok(self.predict_modes(x, &[mode])?.remove(0))
    }

    /// Probabilities in several modes from one pass over the grid: fast:j's head is the same
    /// head whether or not the rest of the grid was evaluated, so scoring every pruning level
    /// costs one accurate-mode pass.
    pub fn predict_modes(&self, x: Tensor<D>, modes: &[Mode]) -> anyhow::Result<Vec<Tensor<D>>> {
        let cfg = self.config();
        let mut level = 0;
        for &mode in modes {
            level = level.max(match mode {
                Mode::Accurate => cfg.depth,
                Mode::Fast(l) => {
                    anyhow::ensure!(
                        cfg.head_columns().contains(&l),
                        "fast:{l} needs a head on X^0,{l}; this model has heads on columns {:?}",
                        cfg.head_columns()
                    );
                    l
                }
            });
        }
        let probs: Vec<(usize, Tensor<D>)> =
            self.forward_level(x, level).heads.into_iter().map(|(j, t)| (j, to_probs(t, cfg.classes))).collect();
        Ok(modes
            .iter()
            .map(|&mode| {
                let picked: Vec<Tensor<D>> = probs
                    .iter()
                    .filter(|(j, _)| mode == Mode::Accurate || mode == Mode::Fast(*j))
                    .map(|(_, t)| t.clone())
                    .collect();
                let n = picked.len();
                let sum = picked.into_iter().reduce(|a, b| a + b).unwrap();
                if n > 1 { sum.div_scalar(n as f64) } else { sum }
            })
            .collect())
    }

    /// The model for inference: BatchNorm folded into the convolutions of every node (see
    /// [`layers::Block::fold_batchnorm`]); same outputs, one pass less per layer.
    pub fn fold_batchnorm(self) -> Self {
        let grid = self
            .grid
            .into_iter()
            .map(|row| row.into_iter().map(|n| n.map(|n| Node { block: n.block.fold_batchnorm(), ..n })).collect())
            .collect();
        Self { grid, ..self }
    }

    /// "UNet++ L_l": keeps only the nodes i + j <= l and the head on X^{0,l}. The result is a
    /// depth-l network with one head, saved and loaded like any other model.
    pub fn prune(self, level: usize) -> anyhow::Result<UNetPP<D>> {
        let cfg = self.config().clone();
        let columns = cfg.head_columns();
        let Some(h) = columns.iter().position(|&j| j == level) else {
            anyhow::bail!(
                "cannot prune to L{level}: the model has heads on columns {columns:?} only (train with deep supervision)"
            );
        };
        let head = self.heads.into_iter().nth(h).unwrap();
        let grid = self
            .grid
            .into_iter()
            .take(level + 1)
            .enumerate()
            .map(|(i, row)| row.into_iter().take(level + 1 - i).collect())
            .collect();
        let decoder_channels = if cfg.decoder_channels.is_empty() {
            vec![]
        } else {
            (0..level).rev().map(|i| cfg.node_width(i, level - i)).collect()
        };
        let pool = cfg.pool.iter().take(level).copied().collect();
        let config = ModelConfig { depth: level, deep_supervision: false, decoder_channels, pool, ..cfg };
        let encoder = self.encoder.map(|e| e.truncate(level));
        Ok(UNetPP { encoder, grid, heads: vec![head], config })
    }
}

pub fn to_probs<const D: usize>(logits: Tensor<D>, classes: usize) -> Tensor<D> {
    if classes == 1 { crate::kernel::sigmoid(logits) } else { burn::tensor::activation::softmax(logits, 1) }
}

#[cfg(test)]
mod aniso_tests;
#[cfg(test)]
mod tests;
