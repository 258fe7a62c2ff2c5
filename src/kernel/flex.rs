//! `KernelBackend` and `FusedBackend` for Flex: the kernels on contiguous copies of the tensors (no copy where a
//! tensor is contiguous already), with prepared weights kept for inference (`cache`).

use super::cache::prepared;
use super::conv::{self, Prepared};
use super::ext::{Fused, FusedBackend, KernelBackend, PARTS, Sink};
use super::tensors::{contiguous, data, geom, layout, tensor};
use super::{cpu::Geom, norm, pool, upsample};
use burn::backend::flex::FlexTensor;
use burn::backend::{Flex, TensorMetadata};

impl KernelBackend for Flex {
    fn same_conv(
        x0: FlexTensor,
        x1: FlexTensor,
        x2: FlexTensor,
        x3: FlexTensor,
        x4: FlexTensor,
        x5: FlexTensor,
        weight: FlexTensor,
        bias: FlexTensor,
        relu: bool,
    ) -> FlexTensor {
        // Without autodiff the weights are a fixed model's: prepared once, kept while it lives.
        conv_flex([x0, x1, x2, x3, x4, x5], weight, bias, relu, true)
    }

    fn upsample2x(x: FlexTensor) -> FlexTensor {
        let x = contiguous(&x);
        let shape = x.shape().to_vec();
        let out: Vec<usize> = shape.iter().enumerate().map(|(i, &d)| if i >= 2 { 2 * d } else { d }).collect();
        tensor(upsample::forward(data(&x), &shape), out)
    }

    fn max_pool2x(x: FlexTensor) -> FlexTensor {
        let x = contiguous(&x);
        let shape = x.shape().to_vec();
        tensor(pool::forward(data(&x), &shape), pool::pooled_shape(&shape))
    }

    fn batch_stats(x: FlexTensor) -> FlexTensor {
        let x = contiguous(&x);
        let (mean, var) = norm::stats(layout(x.shape().as_slice()), data(&x));
        let c = mean.len();
        tensor([mean, var].concat(), vec![2, c])
    }

    fn batch_norm(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        stats: FlexTensor,
        epsilon: f64,
        relu: bool,
    ) -> FlexTensor {
        let (x, gamma, beta, stats) = (contiguous(&x), contiguous(&gamma), contiguous(&beta), contiguous(&stats));
        let (mean, var) = data(&stats).split_at(gamma.shape()[0]);
        let y = norm::forward(
            layout(x.shape().as_slice()),
            data(&x),
            &norm::Norm { gamma: data(&gamma), beta: data(&beta), mean, var, eps: epsilon, relu },
        );
        tensor(y, x.shape().to_vec())
    }
}

impl FusedBackend for Flex {
    fn conv_relu_fused(
        x0: FlexTensor,
        x1: FlexTensor,
        x2: FlexTensor,
        x3: FlexTensor,
        x4: FlexTensor,
        x5: FlexTensor,
        weight: FlexTensor,
        bias: FlexTensor,
        half: bool,
        sink: Sink<Flex>,
    ) -> Fused<Flex> {
        let (g, mut shape, parts, w, b) = conv_inputs([x0, x1, x2, x3, x4, x5], weight, bias, half);
        let parts: Vec<&[f32]> = parts.iter().map(data).collect();
        let prep = prepared(&g, &w, &b);
        let Some(Prepared::Winograd(u)) = prep.as_deref() else {
            panic!("conv_relu_fused called on a convolution the Winograd kernel does not take (see `ops::fuses`)")
        };
        let (pool, head) = match sink {
            Sink::Store => (false, None),
            Sink::Pool => (true, None),
            Sink::Head { weight, bias } => (false, Some((contiguous(&weight), contiguous(&bias)))),
        };
        let to = match &head {
            Some((hw, hb)) => conv::Sink::Head(data(hw), data(hb)),
            None if pool => conv::Sink::Pool,
            None => conv::Sink::Store,
        };
        let (y, pooled) = conv::forward_fused(&g, (&parts, half), u, data(&b), to);
        if let Some((_, hb)) = &head {
            shape[1] = hb.shape()[0];
        }
        match pooled {
            Some(pooled) => {
                let pooled_shape = pool::pooled_shape(&shape);
                Fused::Pooled(tensor(y, shape), tensor(pooled, pooled_shape))
            }
            None => Fused::One(tensor(y, shape)),
        }
    }
}

/// The convolution's geometry, output shape, used input parts and weights, contiguous; with
/// `half`, the last used part is at half resolution.
fn conv_inputs(
    xs: [FlexTensor; PARTS],
    weight: FlexTensor,
    bias: FlexTensor,
    half: bool,
) -> (Geom, Vec<usize>, Vec<FlexTensor>, FlexTensor, FlexTensor) {
    let xs: Vec<FlexTensor> = xs.iter().filter(|x| x.shape()[1] > 0).map(contiguous).collect();
    let (w, b) = (contiguous(&weight), contiguous(&bias));
    let last = xs.last().expect("an input part").shape().to_vec();
    let mut shape: Vec<usize> = last.iter().enumerate().map(|(i, &d)| if i >= 2 && half { 2 * d } else { d }).collect();
    for x in &xs[..xs.len() - 1] {
        assert_eq!(x.shape()[2..], shape[2..], "input parts of different sizes");
    }
    shape[1] = xs.iter().map(|x| x.shape()[1]).sum();
    let g = geom(&shape, w.shape().as_slice());
    shape[1] = g.c_out;
    (g, shape, xs, w, b)
}

pub(super) fn conv_flex(
    xs: [FlexTensor; PARTS],
    weight: FlexTensor,
    bias: FlexTensor,
    relu: bool,
    keep: bool,
) -> FlexTensor {
    let (g, shape, xs, w, b) = conv_inputs(xs, weight, bias, false);
    let parts: Vec<&[f32]> = xs.iter().map(data).collect();
    let y = if keep {
        conv::forward_prepared(&g, &parts, data(&w), data(&b), relu, prepared(&g, &w, &b).as_deref())
    } else {
        conv::forward_parts(&g, &parts, data(&w), data(&b), relu)
    };
    tensor(y, shape)
}
