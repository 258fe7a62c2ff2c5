//! The kernels through burn: every operation (and its gradients) against burn's own ops.

use super::*;
use crate::model::layers::Conv;
use burn::prelude::*;
use burn::tensor::Distribution;

fn rel<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
    let scale = b.clone().abs().max().into_scalar::<f32>().max(1e-6);
    (a - b).abs().max().into_scalar::<f32>() / scale
}

/// Output and all three gradients equal burn's conv to 1e-4 relative, 2D and 3D, 3x3 and 1x1,
/// with and without bias.
fn check<const D: usize>(x_dims: [usize; D], c_out: usize, k: usize, bias: bool) {
    let d = Device::flex().autodiff();
    let mut conv = Conv::<D>::new(x_dims[1], c_out, k, &d);
    if !bias {
        conv = conv.without_bias();
    }
    let x = Tensor::<D>::random(x_dims, Distribution::Default, &d).require_grad();
    assert!(supported(&x), "the kernel must run on autodiff Flex");
    let y_ours = conv.forward(x.clone());
    let y_burn = conv.forward_burn(x.clone());
    let r = Tensor::<D>::random(y_burn.dims(), Distribution::Default, &d);
    assert!(rel(y_ours.clone(), y_burn.clone()) <= 1e-4, "forward {x_dims:?} k{k}");
    let g_ours = (y_ours * r.clone()).sum().backward();
    let g_burn = (y_burn * r).sum().backward();
    let gx = |g| x.grad(g).unwrap();
    assert!(rel(gx(&g_ours), gx(&g_burn)) <= 1e-4, "dx {x_dims:?} k{k}");
    let gw = |g| conv.weight.val().grad(g).unwrap();
    assert!(rel(gw(&g_ours), gw(&g_burn)) <= 1e-4, "dw {x_dims:?} k{k}");
    if let Some(b) = &conv.bias {
        assert!(rel(b.val().grad(&g_ours).unwrap(), b.val().grad(&g_burn).unwrap()) <= 1e-4);
    }
}

#[test]
fn same_conv_matches_burn_with_gradients() {
    check([2, 3, 12, 10], 5, 3, true);
    check([1, 4, 9, 7], 2, 1, true);
    check([3, 2, 8, 8], 4, 3, false);
    check([1, 2, 6, 5, 4], 3, 3, true);
    check([2, 6, 7, 19], 5, 3, true);
    check([1, 3, 4, 5, 17], 2, 3, false);
}

/// Up-sampling equals the burn path (bilinear in 2D, bilinear + depth lerp in 3D), with gradient.
#[test]
fn upsample_matches_burn_with_gradients() {
    let d = Device::flex().autodiff();
    let burn_path = |x: Tensor<5>| {
        set_enabled(false);
        let y = crate::model::layers::upsample(x, false, false);
        set_enabled(true);
        y
    };
    let x = Tensor::<5>::random([2, 3, 3, 4, 5], Distribution::Default, &d).require_grad();
    assert!(supported(&x));
    let (a, b) = (crate::model::layers::upsample(x.clone(), false, false), burn_path(x.clone()));
    let r = Tensor::<5>::random(b.dims(), Distribution::Default, &d);
    assert!(rel(a.clone(), b.clone()) <= 1e-5);
    let (ga, gb) = ((a * r.clone()).sum().backward(), (b * r).sum().backward());
    assert!(rel(x.grad(&ga).unwrap(), x.grad(&gb).unwrap()) <= 1e-5);
    let x2 = Tensor::<4>::random([2, 3, 5, 7], Distribution::Default, &d).require_grad();
    set_enabled(false);
    let b2 = crate::model::layers::upsample(x2.clone(), false, false);
    set_enabled(true);
    assert!(rel(crate::model::layers::upsample(x2, false, false), b2) <= 1e-5);
}

/// The sigmoid equals burn's at inference, and an autodiff tensor keeps burn's op (and its
/// graph: the kernel's copy out and back would cut it).
#[test]
fn sigmoid_matches_burn_and_keeps_the_graph() {
    let x = Tensor::<4>::random([2, 1, 5, 7], Distribution::Uniform(-20.0, 20.0), &Device::flex());
    let mut own = x.to_data().try_to_vec::<f32>().unwrap();
    sigmoid::in_place(&mut own);
    assert_eq!(sigmoid(x.clone()).to_data().try_to_vec::<f32>().unwrap(), own, "inference takes the kernel");
    assert!(rel(sigmoid(x.clone()), burn::tensor::activation::sigmoid(x)) <= 1e-6);
    let x = Tensor::<4>::random([2, 1, 5, 7], Distribution::Default, &Device::flex().autodiff()).require_grad();
    let g = sigmoid(x.clone()).sum().backward();
    assert!(x.grad(&g).is_some(), "the autodiff graph was cut");
}

/// Max pooling equals burn's path (2D pool, 3D as 2D pool + depth max), with gradient.
#[test]
fn max_pool_matches_burn_with_gradients() {
    fn check<const D: usize>(dims: [usize; D]) {
        let d = Device::flex().autodiff();
        let x = Tensor::<D>::random(dims, Distribution::Default, &d).require_grad();
        let ours = crate::model::layers::max_pool(x.clone());
        set_enabled(false);
        let theirs = crate::model::layers::max_pool(x.clone());
        set_enabled(true);
        assert_eq!(ours.dims(), theirs.dims());
        assert!(rel(ours.clone(), theirs.clone()) <= 1e-6, "forward {dims:?}");
        let r = Tensor::<D>::random(ours.dims(), Distribution::Default, &d);
        let (ga, gb) = ((ours * r.clone()).sum().backward(), (theirs * r).sum().backward());
        assert!(rel(x.grad(&ga).unwrap(), x.grad(&gb).unwrap()) <= 1e-6, "dx {dims:?}");
    }
    check([2, 3, 8, 6]);
    check([1, 2, 4, 6, 8]);
}

/// Training BatchNorm + ReLU equals burn's BatchNorm then ReLU: output, the gradients of the
/// input, gamma and beta, and the running statistics, 2D and 3D.
#[test]
fn batch_norm_matches_burn_with_gradients() {
    fn check<const D: usize>(dims: [usize; D]) {
        use burn::module::Param;
        use burn::nn::{BatchNorm, BatchNormConfig};
        let d = Device::flex().autodiff();
        let c = dims[1];
        // Non-trivial affine parameters, and inputs off zero mean and unit variance.
        let gamma = Tensor::<1>::random([c], Distribution::Uniform(0.5, 1.5), &d);
        let beta = Tensor::<1>::random([c], Distribution::Uniform(-0.5, 0.5), &d);
        let norm = || BatchNorm {
            gamma: Param::from_tensor(gamma.clone()),
            beta: Param::from_tensor(beta.clone()),
            ..BatchNormConfig::new(c).init(&d)
        };
        let (a, b) = (norm(), norm());
        let x = Tensor::<D>::random(dims, Distribution::Uniform(-1.0, 3.0), &d).require_grad();
        let r = Tensor::<D>::random(dims, Distribution::Default, &d);
        assert!(supported(&x));
        let ours = crate::model::layers::norm_relu(&a, x.clone());
        let theirs = burn::tensor::activation::relu(b.forward(x.clone()));
        assert!(rel(ours.clone(), theirs.clone()) <= 1e-4, "forward {dims:?}");
        assert!(rel(a.running_mean.value_sync(), b.running_mean.value_sync()) <= 1e-5, "running mean {dims:?}");
        assert!(rel(a.running_var.value_sync(), b.running_var.value_sync()) <= 1e-5, "running var {dims:?}");
        let (ga, gb) = ((ours * r.clone()).sum().backward(), (theirs * r).sum().backward());
        assert!(rel(x.grad(&ga).unwrap(), x.grad(&gb).unwrap()) <= 1e-4, "dx {dims:?}");
        let g = |p: &Param<Tensor<1>>, grads| p.val().grad(grads).unwrap();
        assert!(rel(g(&a.gamma, &ga), g(&b.gamma, &gb)) <= 1e-4, "dgamma {dims:?}");
        assert!(rel(g(&a.beta, &ga), g(&b.beta, &gb)) <= 1e-4, "dbeta {dims:?}");
    }
    check([4, 5, 6, 7]);
    check([2, 3, 4, 5, 6]);
}

/// The whole model (every head, 2D and 3D) and its parameter gradients: our kernels against
/// burn's ops, random weights and inputs, 1e-4 relative.
#[test]
fn whole_model_matches_the_burn_path() {
    use crate::model::{Arch, ModelConfig, Preset};
    fn run<const D: usize>(cfg: ModelConfig, x_dims: [usize; D]) {
        let d = Device::flex().autodiff();
        d.seed(3);
        let m = cfg.init::<D>(&d);
        let x = Tensor::<D>::random(x_dims, Distribution::Default, &d);
        let heads = |on: bool| {
            set_enabled(on);
            let h = m.forward(x.clone());
            set_enabled(true);
            h
        };
        let (ours, theirs) = (heads(true), heads(false));
        let loss = |h: Vec<Tensor<D>>| h.into_iter().map(|t| t.powi_scalar(2).mean()).reduce(|a, b| a + b).unwrap();
        for (a, b) in ours.iter().zip(&theirs) {
            assert!(rel(a.clone(), b.clone()) <= 1e-4, "heads differ");
        }
        let (ga, gb) = (loss(ours).backward(), loss(theirs).backward());
        let w = |g| m.grid[0][1].as_ref().unwrap().block.conv1.weight.val().grad(g).unwrap();
        assert!(rel(w(&ga), w(&gb)) <= 1e-4, "gradients differ");
    }
    let cfg = |dims, width| ModelConfig { dims, width, ..ModelConfig::new(Arch::Unetpp, Preset::Modern, 3) };
    run::<4>(cfg(2, 8), [2, 1, 32, 32]);
    run::<5>(cfg(3, 4), [1, 1, 16, 16, 16]);
}

/// Inference keeps prepared weights per weight tensor: fresh weights of the same shapes
/// (allocated while older ones are dropped, so addresses get reused) and weights replaced in
/// a module must never see another tensor's prepared copy.
#[test]
fn prepared_weights_follow_the_weights() {
    let d = Device::flex();
    let x = Tensor::<4>::random([1, 3, 16, 16], Distribution::Default, &d);
    for _ in 0..10 {
        let mut conv = Conv::<4>::new(3, 4, 3, &d);
        assert!(rel(conv.forward(x.clone()), conv.forward_burn(x.clone())) <= 1e-4);
        conv.weight = burn::module::Param::from_tensor(conv.weight.val().mul_scalar(-2.0));
        assert!(rel(conv.forward(x.clone()), conv.forward_burn(x.clone())) <= 1e-4);
    }
}

/// `conv_relu_fused` into each sink, with a half-size part and without, against burn's
/// convolution on the concatenation with the part up-sampled first, at a size the Winograd
/// kernel takes; and `fuses` refuses what it cannot fuse.
#[test]
fn conv_relu_fused_equals_its_parts() {
    // Only the Winograd kernel fuses, and it runs only on AVX-512.
    super::testing::require_avx512();
    let d = Device::flex();
    let x = Tensor::<4>::random([2, 16, 24, 24], Distribution::Default, &d);
    let low = Tensor::<4>::random([2, 8, 12, 12], Distribution::Default, &d);
    let (c1, c2, head) = (Conv::<4>::new(24, 16, 3, &d), Conv::<4>::new(16, 16, 3, &d), Conv::<4>::new(16, 2, 1, &d));
    let relu = burn::tensor::activation::relu::<4>;
    let w = |c: &Conv<4>| (c.weight.val(), c.bias_val());
    assert!(fuses(&[&x, &low], true, &c1.weight.val(), None));
    let (w1, b1) = w(&c1);
    let up = conv_relu_fused(vec![x.clone(), low.clone()], true, w1, b1, Sink::Store).into_tensor();
    let want = relu(c1.forward_burn(Tensor::cat(vec![x.clone(), upsample2x(low.clone())], 1)));
    assert!(rel(up.clone(), want.clone()) <= 1e-4, "half-size part");
    let y_want = relu(c2.forward_burn(want));
    let (w2, b2) = w(&c2);
    let Out::Pooled(y, pooled) = conv_relu_fused(vec![up.clone()], false, w2.clone(), b2.clone(), Sink::Pool) else {
        panic!("a pooled output")
    };
    assert!(rel(y, y_want.clone()) <= 1e-4, "pooled sink's output");
    assert!(rel(pooled, max_pool2x(y_want.clone())) <= 1e-4, "pooled");
    assert!(fuses(&[&up], false, &w2, Some(&head.weight.val())));
    let (hw, hb) = w(&head);
    let Out::Head(h) = conv_relu_fused(vec![up.clone()], false, w2.clone(), b2, Sink::Head(hw, hb)) else {
        panic!("a head output")
    };
    assert!(rel(h, head.forward_burn(y_want)) <= 1e-4, "head");
    // Not fused: with gradients, kernels off, a 3x3 head, 6x6 images (Winograd's lower bound),
    // more than six parts, 3D.
    let ad = Tensor::<4>::random(up.dims(), Distribution::Default, &d.clone().autodiff());
    assert!(!fuses(&[&ad], false, &w2, None), "autodiff");
    set_enabled(false);
    assert!(!fuses(&[&up], false, &w2, None), "kernels off");
    set_enabled(true);
    assert!(!fuses(&[&up], false, &w2, Some(&w2)), "3x3 head");
    let small = Tensor::<4>::random([1, 16, 6, 6], Distribution::Default, &d);
    assert!(!fuses(&[&small], false, &w2, None), "6x6");
    let thin: Vec<Tensor<4>> = (0..8).map(|_| Tensor::random([1, 2, 24, 24], Distribution::Default, &d)).collect();
    assert!(!fuses(&thin.iter().collect::<Vec<_>>(), false, &w2, None), "eight parts");
    let x3 = Tensor::<5>::random([1, 16, 12, 12, 12], Distribution::Default, &d);
    let w3 = Conv::<5>::new(16, 16, 3, &d).weight.val();
    assert!(!fuses(&[&x3], false, &w3, None), "3D");
}

#[test]
fn inference_device_runs_the_kernel_too() {
    let d = Device::flex();
    let conv = Conv::<4>::new(3, 4, 3, &d);
    let x = Tensor::<4>::random([2, 3, 8, 8], Distribution::Default, &d);
    assert!(supported(&x));
    assert!(rel(conv.forward(x.clone()), conv.forward_burn(x.clone())) <= 1e-4);
    // ReLU fused into the kernel's stores, on the direct path (16-pixel rows) and a GEMM one.
    for side in [16, 8] {
        let x = Tensor::<4>::random([2, 3, side, side], Distribution::Default, &d);
        let fused = conv.forward_relu(vec![x.clone()]);
        assert!(rel(fused, burn::tensor::activation::relu(conv.forward_burn(x))) <= 1e-4);
    }
}
