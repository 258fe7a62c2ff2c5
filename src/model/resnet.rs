//! ResNet-18/34/50 as the encoder column X^{i,0} (torchvision's layout, as segmentation_models.pytorch
//! uses it): level 1 = 7x7 stride-2 stem, level 2 = max pool + `layer1`, levels 3..5 = `layer2..4`.
//! There is no full-resolution stage, so X^{0,0} does not exist in encoder models.

use burn::module::Module;
use burn::nn::{BatchNorm, BatchNormConfig};
use burn::prelude::*;
use burn::tensor::activation::relu;

use super::Encoder;
use super::layers::{Conv, max_pool_3x3};

fn conv<const D: usize>(c_in: usize, c_out: usize, k: usize, stride: usize, device: &Device) -> Conv<D> {
    Conv::new(c_in, c_out, k, device).without_bias().with_stride(stride)
}

fn bn(c: usize, device: &Device) -> BatchNorm {
    BatchNormConfig::new(c).init(device)
}

/// BasicBlock (two 3x3 convs) or Bottleneck (1x1, 3x3, 1x1 x4; stride on the 3x3 as in
/// torchvision v1.5), with a strided 1x1 projection when the shape changes.
#[derive(Module, Debug)]
pub struct Residual<const D: usize> {
    pub convs: Vec<Conv<D>>,
    pub norms: Vec<BatchNorm>,
    pub down: Option<Conv<D>>,
    pub down_norm: Option<BatchNorm>,
}

impl<const D: usize> Residual<D> {
    fn new(c_in: usize, planes: usize, stride: usize, bottleneck: bool, device: &Device) -> Self {
        let (convs, c_out) = if bottleneck {
            let c_out = planes * 4;
            let convs = vec![
                conv(c_in, planes, 1, 1, device),
                conv(planes, planes, 3, stride, device),
                conv(planes, c_out, 1, 1, device),
            ];
            (convs, c_out)
        } else {
            (vec![conv(c_in, planes, 3, stride, device), conv(planes, planes, 3, 1, device)], planes)
        };
        let norms = convs.iter().map(|c| bn(c.weight.dims()[0], device)).collect();
        let project = stride != 1 || c_in != c_out;
        Self {
            convs,
            norms,
            down: project.then(|| conv(c_in, c_out, 1, stride, device)),
            down_norm: project.then(|| bn(c_out, device)),
        }
    }

    fn forward(&self, x: Tensor<D>) -> Tensor<D> {
        let shortcut = match (&self.down, &self.down_norm) {
            (Some(c), Some(n)) => n.forward(c.forward(x.clone())),
            _ => x.clone(),
        };
        let last = self.convs.len() - 1;
        let mut y = x;
        for (k, (c, n)) in self.convs.iter().zip(&self.norms).enumerate() {
            y = n.forward(c.forward(y));
            if k < last {
                y = relu(y);
            }
        }
        relu(y + shortcut)
    }
}

#[derive(Module, Debug)]
pub struct ResNet<const D: usize> {
    pub conv1: Conv<D>,
    pub bn1: BatchNorm,
    /// `layer1..` of torchvision, as many as the model's depth needs (depth - 1).
    pub layers: Vec<Vec<Residual<D>>>,
}

impl<const D: usize> ResNet<D> {
    pub fn new(encoder: Encoder, in_channels: usize, depth: usize, device: &Device) -> Self {
        let (blocks, bottleneck) = encoder.resnet().expect("a ResNet encoder");
        let mut c_in = 64;
        let layers = (0..depth.saturating_sub(1))
            .map(|s| {
                let planes = 64 << s;
                (0..blocks[s])
                    .map(|b| {
                        let stride = if s > 0 && b == 0 { 2 } else { 1 };
                        let block = Residual::new(c_in, planes, stride, bottleneck, device);
                        c_in = if bottleneck { planes * 4 } else { planes };
                        block
                    })
                    .collect()
            })
            .collect();
        Self { conv1: conv(in_channels, 64, 7, 2, device), bn1: bn(64, device), layers }
    }

    /// X^{1,0} .. X^{levels,0}.
    pub fn forward(&self, x: Tensor<D>, levels: usize) -> Vec<Tensor<D>> {
        let mut out = vec![relu(self.bn1.forward(self.conv1.forward(x)))];
        for (s, layer) in self.layers.iter().take(levels.saturating_sub(1)).enumerate() {
            let mut y = out.last().unwrap().clone();
            if s == 0 {
                y = max_pool_3x3(y);
            }
            for block in layer {
                y = block.forward(y);
            }
            out.push(y);
        }
        out
    }

    /// Keeps the stages up to `level` (pruning).
    pub fn truncate(mut self, level: usize) -> Self {
        self.layers.truncate(level.saturating_sub(1));
        self
    }
}
