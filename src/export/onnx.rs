//! A model as an ONNX inference graph (opset 17): the nodes one `--mode` evaluates, BatchNorm
//! folded into the convolutions, dropout left out (identity at inference), and one output of
//! probabilities exactly as [`UNetPP::predict`] computes them. Batch and spatial sizes are
//! symbolic; spatial sides must be multiples of the model's down-sampling per axis (2^depth
//! unless `pool` says otherwise), as for `predict` after its padding.

use std::collections::HashMap;

use anyhow::ensure;
use burn::prelude::*;
use prost::Message;

use super::proto::*;
use crate::model::layers::{Block, Conv, UpConv, fold};
use crate::model::resnet::ResNet;
use crate::model::{Mode, UNetPP};

pub const OPSET: i64 = 17;
/// The IR version that goes with opset 17.
const IR_VERSION: i64 = 8;
pub const INPUT: &str = "image";
pub const OUTPUT: &str = "probabilities";

/// The encoded model. `metadata` lands in the file's `metadata_props`.
pub fn encode<const D: usize>(model: &UNetPP<D>, mode: Mode, metadata: &[(&str, String)]) -> anyhow::Result<Vec<u8>> {
    let cfg = model.config();
    let level = match mode {
        Mode::Accurate => cfg.depth,
        Mode::Fast(l) => {
            ensure!(
                cfg.head_columns().contains(&l),
                "--mode fast:{l} needs a head on X^0,{l}; this model has heads on columns {:?} (--mode accurate or \
                 fast:j with j one of them)",
                cfg.head_columns()
            );
            l
        }
    };
    let mut g = Builder { dims: cfg.dims, ..Builder::default() };
    let graph = g.unetpp(model, mode, level)?;
    let model = ModelProto {
        ir_version: IR_VERSION,
        opset_import: vec![OperatorSetIdProto { domain: String::new(), version: OPSET }],
        producer_name: "unetpp".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        doc_string: format!(
            "UNet++ ({mode}): `{INPUT}` is N x C x spatial, normalised as unetpp normalises (metadata \
             unetpp.data), each spatial side a multiple of {} (per axis: the model's down-sampling); `{OUTPUT}` is N x \
             classes x spatial",
            crate::model::fmt_size(cfg.scale(cfg.depth), cfg.dims)
        ),
        graph: Some(graph),
        metadata_props: metadata
            .iter()
            .map(|(k, v)| StringStringEntryProto { key: (*k).into(), value: v.clone() })
            .collect(),
    };
    // A protobuf message cannot exceed 2 GiB; larger models would need external data files.
    let len = model.encoded_len();
    ensure!(
        len < (1 << 31),
        "the ONNX graph would be {len} bytes; ONNX files without external data are limited to 2 GiB"
    );
    Ok(model.encode_to_vec())
}

fn attr_ints(name: &str, ints: Vec<i64>) -> AttributeProto {
    AttributeProto { name: name.into(), r#type: ATTR_INTS, ints, ..Default::default() }
}

fn attr_int(name: &str, i: i64) -> AttributeProto {
    AttributeProto { name: name.into(), r#type: ATTR_INT, i, ..Default::default() }
}

fn attr_str(name: &str, s: &str) -> AttributeProto {
    AttributeProto { name: name.into(), r#type: ATTR_STRING, s: s.as_bytes().to_vec(), ..Default::default() }
}

/// A float tensor input with symbolic batch and spatial sizes.
fn value_info(name: &str, channels: usize, dims: usize) -> ValueInfoProto {
    let sym = |s: &str| Dimension { dim_value: None, dim_param: Some(s.into()) };
    let mut dim = vec![sym("batch"), Dimension { dim_value: Some(channels as i64), dim_param: None }];
    dim.extend(["depth", "height", "width"][3 - dims..].iter().map(|s| sym(s)));
    let tensor_type = TensorTypeProto { elem_type: FLOAT, shape: Some(TensorShapeProto { dim }) };
    ValueInfoProto { name: name.into(), r#type: Some(TypeProto { tensor_type: Some(tensor_type) }) }
}

#[derive(Default)]
struct Builder {
    dims: usize,
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    /// The Resize `scales` tensors, one per up-sampling factor, each made once.
    scales: HashMap<[usize; 3], String>,
}

impl Builder {
    /// Adds `op` and returns the name of its (single) output, `name` itself.
    fn op(&mut self, op: &str, name: String, inputs: Vec<String>, attribute: Vec<AttributeProto>) -> String {
        let node =
            NodeProto { input: inputs, output: vec![name.clone()], name: name.clone(), op_type: op.into(), attribute };
        self.nodes.push(node);
        name
    }

    fn constant(&mut self, name: String, dims: Vec<i64>, values: impl Iterator<Item = f32>) -> String {
        let raw_data = values.flat_map(f32::to_le_bytes).collect();
        self.initializers.push(TensorProto { dims, data_type: FLOAT, name: name.clone(), raw_data });
        name
    }

    /// A weight as an initializer; a non-finite value is refused, naming the tensor.
    fn weight<const K: usize>(&mut self, name: String, t: Tensor<K>) -> anyhow::Result<String> {
        let dims = t.dims().iter().map(|&d| d as i64).collect();
        let values: Vec<f32> = t.into_data().iter::<f32>().collect();
        ensure!(
            values.iter().all(|v| v.is_finite()),
            "refusing to export: weight {name} holds NaN or infinite values (training diverged)"
        );
        Ok(self.constant(name, dims, values.into_iter()))
    }

    fn spatial(&self, v: i64) -> Vec<i64> {
        vec![v; self.dims]
    }

    /// A per-axis `[z, y, x]` on the model's spatial axes.
    fn axes(&self, f: [usize; 3]) -> Vec<i64> {
        f[3 - self.dims..].iter().map(|&v| v as i64).collect()
    }

    fn conv<const D: usize>(&mut self, name: &str, x: String, conv: &Conv<D>) -> anyhow::Result<String> {
        let k = conv.weight.dims()[2];
        let mut inputs = vec![x, self.weight(format!("{name}.weight"), conv.weight.val())?];
        if let Some(b) = &conv.bias {
            inputs.push(self.weight(format!("{name}.bias"), b.val())?);
        }
        let attrs = vec![
            attr_ints("kernel_shape", self.spatial(k as i64)),
            attr_ints("strides", self.spatial(conv.stride as i64)),
            attr_ints("pads", vec![(k / 2) as i64; 2 * self.dims]),
        ];
        Ok(self.op("Conv", name.into(), inputs, attrs))
    }

    fn conv_relu<const D: usize>(&mut self, name: &str, x: String, conv: &Conv<D>) -> anyhow::Result<String> {
        let y = self.conv(name, x, conv)?;
        Ok(self.op("Relu", format!("{name}.relu"), vec![y], vec![]))
    }

    fn conv_transpose<const D: usize>(&mut self, name: &str, x: String, up: &UpConv<D>) -> anyhow::Result<String> {
        let w = self.weight(format!("{name}.weight"), up.weight.val())?;
        let b = self.weight(format!("{name}.bias"), up.bias.val())?;
        let k: Vec<i64> = up.weight.dims()[2..].iter().map(|&v| v as i64).collect();
        let attrs = vec![attr_ints("kernel_shape", k.clone()), attr_ints("strides", k)];
        Ok(self.op("ConvTranspose", name.into(), vec![x, w, b], attrs))
    }

    /// Max pooling with stride `factor` per axis, a kernel of `kernel` (a factor's size: None).
    fn max_pool(&mut self, name: String, x: String, kernel: Option<i64>, pad: i64, factor: [usize; 3]) -> String {
        let strides = self.axes(factor);
        let attrs = vec![
            attr_ints("kernel_shape", kernel.map_or_else(|| strides.clone(), |k| self.spatial(k))),
            attr_ints("strides", strides),
            attr_ints("pads", vec![pad; 2 * self.dims]),
        ];
        self.op("MaxPool", name, vec![x], attrs)
    }

    /// Up-sampling by `factor` per axis as `layers::upsample_by` does it: nearest is PyTorch's
    /// (source index floor(dst / 2)); linear is half-pixel (align_corners = false) or align_corners.
    fn resize(&mut self, name: String, x: String, nearest: bool, align_corners: bool, factor: [usize; 3]) -> String {
        let scales = match self.scales.get(&factor) {
            Some(s) => s.clone(),
            None => {
                let axes = self.axes(factor);
                let v = [1.0, 1.0].into_iter().chain(axes.iter().map(|&f| f as f32));
                let name = match axes.iter().all(|&f| f == 2) {
                    true => "upsample.scales".to_string(),
                    false => {
                        format!("upsample.scales.{}", axes.iter().map(|f| f.to_string()).collect::<Vec<_>>().join("x"))
                    }
                };
                let s = self.constant(name, vec![self.dims as i64 + 2], v);
                self.scales.insert(factor, s.clone());
                s
            }
        };
        let attrs = if nearest {
            vec![
                attr_str("mode", "nearest"),
                attr_str("coordinate_transformation_mode", "asymmetric"),
                attr_str("nearest_mode", "floor"),
            ]
        } else {
            let transform = if align_corners { "align_corners" } else { "half_pixel" };
            vec![attr_str("mode", "linear"), attr_str("coordinate_transformation_mode", transform)]
        };
        self.op("Resize", name, vec![x, String::new(), scales], attrs)
    }

    fn concat(&mut self, name: String, mut parts: Vec<String>) -> String {
        if parts.len() == 1 {
            return parts.remove(0);
        }
        self.op("Concat", name, parts, vec![attr_int("axis", 1)])
    }

    /// H: (conv -> folded BatchNorm -> ReLU) twice; dropout is the identity at inference.
    fn block<const D: usize>(&mut self, name: &str, x: String, block: &Block<D>) -> anyhow::Result<String> {
        let b = block.clone().fold_batchnorm();
        let y = self.conv_relu(&format!("{name}.conv1"), x, &b.conv1)?;
        self.conv_relu(&format!("{name}.conv2"), y, &b.conv2)
    }

    /// X^{1,0} .. X^{levels,0} of a ResNet encoder (see `ResNet::forward`).
    fn resnet<const D: usize>(&mut self, enc: &ResNet<D>, levels: usize) -> anyhow::Result<Vec<String>> {
        let (stem, _) = fold(enc.conv1.clone(), Some(enc.bn1.clone()));
        let mut out = vec![self.conv_relu("encoder.conv1", INPUT.into(), &stem)?];
        for (s, layer) in enc.layers.iter().take(levels.saturating_sub(1)).enumerate() {
            let mut y = out.last().unwrap().clone();
            if s == 0 {
                y = self.max_pool("encoder.maxpool".into(), y, Some(3), 1, [2; 3]);
            }
            for (b, block) in layer.iter().enumerate() {
                let name = format!("encoder.layer{}.{b}", s + 1);
                let shortcut = match (&block.down, &block.down_norm) {
                    (Some(c), n) => {
                        self.conv(&format!("{name}.downsample"), y.clone(), &fold(c.clone(), n.clone()).0)?
                    }
                    _ => y.clone(),
                };
                let last = block.convs.len() - 1;
                let mut z = y;
                for (k, (c, n)) in block.convs.iter().zip(&block.norms).enumerate() {
                    let (c, _) = fold(c.clone(), Some(n.clone()));
                    let cname = format!("{name}.conv{}", k + 1);
                    z = if k < last { self.conv_relu(&cname, z, &c)? } else { self.conv(&cname, z, &c)? };
                }
                let sum = self.op("Add", format!("{name}.add"), vec![z, shortcut], vec![]);
                y = self.op("Relu", format!("{name}.relu"), vec![sum], vec![]);
            }
            out.push(y);
        }
        Ok(out)
    }

    /// The graph of `UNetPP::forward_level(x, level)` followed by `predict`'s probabilities.
    fn unetpp<const D: usize>(&mut self, model: &UNetPP<D>, mode: Mode, level: usize) -> anyhow::Result<GraphProto> {
        let cfg = model.config();
        let mut out: HashMap<(usize, usize), String> = HashMap::new();
        if let Some(enc) = &model.encoder {
            for (i, f) in self.resnet(enc, level)?.into_iter().enumerate() {
                out.insert((i + 1, 0), f);
            }
        }
        for step in cfg.plan(level) {
            let (i, j) = (step.i, step.j);
            if j == 0 && model.encoder.is_some() {
                continue;
            }
            let node = model.grid[i][j].as_ref().expect("node present by construction");
            let name = format!("x{i}_{j}");
            let input = match (i, j) {
                (0, 0) => INPUT.to_string(),
                (_, 0) => self.max_pool(format!("{name}.pool"), out[&(i - 1, 0)].clone(), None, 0, cfg.factor(i)),
                _ => {
                    let below = out[&(i + 1, j - 1)].clone();
                    let up = match &node.up {
                        Some(up) => self.conv_transpose(&format!("{name}.up"), below, up)?,
                        None => {
                            let f = cfg.factor(i + 1);
                            self.resize(format!("{name}.up"), below, cfg.nearest, cfg.align_corners, f)
                        }
                    };
                    let mut parts: Vec<String> =
                        (0..j).filter(|&k| cfg.has_node(i, k)).map(|k| out[&(i, k)].clone()).collect();
                    parts.push(up);
                    self.concat(format!("{name}.cat"), parts)
                }
            };
            let y = self.block(&name, input, &node.block)?;
            out.insert((i, j), y);
        }
        let mut probs = vec![];
        for (h, (&j, head)) in cfg.head_columns().iter().zip(&model.heads).enumerate() {
            if mode == Mode::Accurate || mode == Mode::Fast(j) {
                let logits = self.conv(&format!("head{h}"), out[&(0, j)].clone(), head)?;
                probs.push(match cfg.classes {
                    1 => self.op("Sigmoid", format!("head{h}.sigmoid"), vec![logits], vec![]),
                    _ => self.op("Softmax", format!("head{h}.softmax"), vec![logits], vec![attr_int("axis", 1)]),
                });
            }
        }
        if probs.len() > 1 {
            self.op("Mean", "mean".into(), probs, vec![]);
        }
        // The last node made the probabilities: it becomes the graph's output.
        self.nodes.last_mut().expect("a head").output[0] = OUTPUT.into();
        Ok(GraphProto {
            node: std::mem::take(&mut self.nodes),
            name: "unetpp".into(),
            initializer: std::mem::take(&mut self.initializers),
            input: vec![value_info(INPUT, cfg.in_channels, cfg.dims)],
            output: vec![value_info(OUTPUT, cfg.classes, cfg.dims)],
        })
    }
}
