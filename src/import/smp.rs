//! segmentation_models.pytorch `UnetPlusPlus` on ResNet-18/34/50. smp names decoder nodes
//! `x_{d}_{l}` (l = position from the deepest level, d = offset along the skip pathway) and
//! concatenates `[up, X^{i,1..j-1}, X^{i,0}]` where we concatenate `[X^{i,0..j-1}, up]`, so the
//! first convolution of every node gets its input channels reordered on the way in.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, bail, ensure};

use super::Tensors;
use crate::model::{Arch, Encoder, ModelConfig, Preset};

/// Whether the tensor names are smp's UnetPlusPlus layout.
pub fn detect(shapes: &BTreeMap<String, Vec<usize>>) -> bool {
    shapes.contains_key("encoder.conv1.weight") && shapes.keys().any(|k| k.starts_with("decoder.blocks.x_"))
}

fn node_key(key: &str) -> Option<(usize, usize, &str)> {
    let rest = key.strip_prefix("decoder.blocks.x_")?;
    let (d, rest) = rest.split_once('_')?;
    let (l, tail) = rest.split_once('.')?;
    Some((d.parse().ok()?, l.parse().ok()?, tail))
}

/// The architecture an smp state dict describes. The up-sampling mode is not in the weights;
/// smp's default (nearest) is assumed unless `bilinear`.
pub fn infer_config(path: &Path, shapes: &BTreeMap<String, Vec<usize>>, bilinear: bool) -> anyhow::Result<ModelConfig> {
    let p = path.display();
    let blocks =
        |s: usize| (0..).take_while(|b| shapes.contains_key(&format!("encoder.layer{s}.{b}.conv1.weight"))).count();
    let bottleneck = shapes.contains_key("encoder.layer1.0.conv3.weight");
    let encoder = match (blocks(1), bottleneck) {
        (2, false) => Encoder::Resnet18,
        (3, false) => Encoder::Resnet34,
        (3, true) => Encoder::Resnet50,
        (n, b) => bail!(
            "{p}: encoder layer1 has {n} {} blocks; only ResNet-18/34/50 import",
            if b { "bottleneck" } else { "basic" }
        ),
    };
    let (expected, _) = encoder.resnet().unwrap();
    for s in 2..=4 {
        let n = blocks(s);
        ensure!(n == 0 || n == expected[s - 1], "{p}: layer{s} has {n} blocks, {encoder:?} has {}", expected[s - 1]);
    }
    let depth = 1 + shapes
        .keys()
        .filter_map(|k| node_key(k))
        .filter(|(d, _, _)| *d == 0)
        .map(|(_, l, _)| l)
        .max()
        .context(format!("{p}: no decoder blocks"))?;
    ensure!((2..=5).contains(&depth), "{p}: encoder depth {depth} (2..=5 supported)");
    let conv = |k: &str, expected: &str| super::conv_shape(path, shapes, k, expected);
    let conv1 = conv("encoder.conv1.weight", "[64, in_channels, 7, 7], in_channels at least 1")?;
    let head = conv("segmentation_head.0.weight", "[classes, decoder width, k, k], classes at least 1")?;
    let decoder_channels = (0..depth)
        .map(|l| conv(&format!("decoder.blocks.x_0_{l}.conv1.0.weight"), "[width, in, 3, 3]").map(|s| s[0]))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let cfg = ModelConfig {
        in_channels: conv1[1],
        classes: head[0],
        ..ModelConfig::new(Arch::Unetpp, Preset::Modern, depth).with_encoder(encoder, false)
    };
    let cfg = ModelConfig { decoder_channels, head_kernel: head[2], nearest: !bilinear, ..cfg };
    cfg.validate().with_context(|| format!("{p}: unsupported smp model"))?;
    Ok(cfg)
}

/// Renames (and reorders) smp tensors into our names, PyTorch conventions kept for BatchNorm.
/// Returns the tensors and the names of encoder stages smp builds but never runs at this depth.
pub fn to_ours(path: &Path, cfg: &ModelConfig, tensors: Tensors) -> anyhow::Result<(Tensors, Vec<String>)> {
    let l = cfg.depth;
    let stage = regex::Regex::new(r"^encoder\.layer(\d)\.(\d+)\.(conv|bn)(\d)\.(.*)$").unwrap();
    let down = regex::Regex::new(r"^encoder\.layer(\d)\.(\d+)\.downsample\.([01])\.(.*)$").unwrap();
    let (mut out, mut ignored) = (Tensors::new(), vec![]);
    for (key, (shape, data)) in tensors {
        let stage_of = |s: &str| s.parse::<usize>().unwrap();
        let renamed = if let Some(c) = stage.captures(&key) {
            let s = stage_of(&c[1]);
            if s >= l {
                ignored.push(key);
                continue;
            }
            let kind = if &c[3] == "conv" { "convs" } else { "norms" };
            format!("encoder.layers.{}.{}.{kind}.{}.{}", s - 1, &c[2], stage_of(&c[4]) - 1, &c[5])
        } else if let Some(c) = down.captures(&key) {
            let s = stage_of(&c[1]);
            if s >= l {
                ignored.push(key);
                continue;
            }
            let part = if &c[3] == "0" { "down" } else { "down_norm" };
            format!("encoder.layers.{}.{}.{part}.{}", s - 1, &c[2], &c[4])
        } else if let Some((d, li, tail)) = node_key(&key) {
            ensure!(li < l && d <= li, "{}: unexpected decoder block in `{key}`", path.display());
            let (i, j) = (l - 1 - li, li - d + 1);
            let (layer, rest) = tail.split_once('.').unwrap_or((tail, ""));
            let (part, rest) = rest.split_once('.').unwrap_or((rest, ""));
            let k = layer.strip_prefix("conv").with_context(|| format!("{}: unexpected `{key}`", path.display()))?;
            let name = match part {
                "0" => format!("grid.{i}.{j}.block.conv{k}.{rest}"),
                "1" => format!("grid.{i}.{j}.block.norm{k}.{rest}"),
                _ => bail!("{}: unexpected `{key}` (attention blocks are not supported)", path.display()),
            };
            if k == "1" && part == "0" && rest == "weight" {
                let data =
                    reorder_inputs(cfg, i, j, &shape, data).with_context(|| format!("{}: `{key}`", path.display()))?;
                out.insert(name, (shape, data));
                continue;
            }
            name
        } else if let Some(rest) = key.strip_prefix("segmentation_head.0.") {
            format!("heads.0.{rest}")
        } else {
            key // encoder.conv1 / encoder.bn1 keep their names; anything else is reported unexpected
        };
        out.insert(renamed, (shape, data));
    }
    Ok((out, ignored))
}

/// smp's `[up, X^{i,1..j-1}, X^{i,0}]` input channels into our `[X^{i,0..j-1}, up]`.
fn reorder_inputs(cfg: &ModelConfig, i: usize, j: usize, shape: &[usize], data: Vec<f32>) -> anyhow::Result<Vec<f32>> {
    let laterals = if i == 0 { 0 } else { j };
    let (w, u) = (cfg.filters(i), cfg.node_width(i + 1, j - 1));
    ensure!(
        shape.len() == 4 && shape[1] == u + laterals * w,
        "shape {shape:?}, expected {} input channels",
        u + laterals * w
    );
    let (c_out, c_in, k) = (shape[0], shape[1], shape[2] * shape[3]);
    // Our channel c reads smp's channel src(c).
    let src = |c: usize| match c {
        _ if c >= laterals * w => c - laterals * w,
        _ if c < w => u + (laterals - 1) * w + c,
        _ => u + c - w,
    };
    let mut out = vec![0f32; data.len()];
    for o in 0..c_out {
        for c in 0..c_in {
            let (to, from) = ((o * c_in + c) * k, (o * c_in + src(c)) * k);
            out[to..to + k].copy_from_slice(&data[from..from + k]);
        }
    }
    Ok(out)
}
