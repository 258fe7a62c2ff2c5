//! Flex tensors as the kernels' contiguous f32 slices and back, and the shapes as the kernels'
//! geometries: what the Flex and the Autodiff implementations share.

use super::cpu::Geom;
use super::norm;
use burn::backend::flex::FlexTensor;
use burn::tensor::TensorData;

/// The geometry of a convolution of input shape `x` by weight shape `w` (2D lifted to d = 1).
pub(super) fn geom(x: &[usize], w: &[usize]) -> Geom {
    let lift = |s: &[usize]| if s.len() == 2 { [1, s[0], s[1]] } else { [s[0], s[1], s[2]] };
    Geom { n: x[0], c_in: x[1], c_out: w[0], sp: lift(&x[2..]), k: lift(&w[2..]) }
}

pub(super) fn contiguous(t: &FlexTensor) -> FlexTensor {
    t.to_contiguous()
}

pub(super) fn data(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("contiguous f32 tensor")
}

pub(super) fn tensor(v: Vec<f32>, shape: Vec<usize>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(v, shape))
}

pub(super) fn layout(shape: &[usize]) -> norm::Layout {
    norm::Layout { n: shape[0], c: shape[1], p: shape[2..].iter().product() }
}
