use super::*;

fn dev() -> Device {
    Device::flex()
}

fn paper(arch: Arch, depth: usize) -> ModelConfig {
    ModelConfig::new(arch, Preset::Paper, depth)
}

/// Counts the official Keras code reports (issue #2); they pin every node's wiring.
#[test]
fn paper_parameter_counts() {
    let d = dev();
    let count = |c: ModelConfig| c.init::<4>(&d).num_params();
    assert_eq!(count(paper(Arch::Unet, 4)), 7_759_521);
    assert_eq!(count(paper(Arch::WideUnet, 4)), 9_282_246);
    assert_eq!(count(ModelConfig { deep_supervision: false, ..paper(Arch::Unetpp, 4) }), 9_041_601);
    let full = paper(Arch::Unetpp, 4).init::<4>(&d);
    assert_eq!(full.num_params(), 9_041_700);
    for (level, expected) in [(1, 100_961), (2, 511_105), (3, 2_204_961), (4, 9_041_601)] {
        let full = paper(Arch::Unetpp, 4).init::<4>(&d);
        assert_eq!(full.prune(level).unwrap().num_params(), expected, "L{level}");
    }
}

#[test]
fn modern_preset_has_no_upconv_and_batchnorm() {
    let m = ModelConfig::new(Arch::Unetpp, Preset::Modern, 2).init::<4>(&dev());
    let node = m.grid[0][1].as_ref().unwrap();
    assert!(node.up.is_none() && node.block.norm1.is_some() && node.block.dropout.is_none());
    // X^{0,1} concatenates X^{0,0} (32) with the up-sampled X^{1,0} (64).
    assert_eq!(node.block.conv1.weight.dims(), [32, 96, 3, 3]);
}

fn small(arch: Arch, preset: Preset, depth: usize, dims: usize) -> ModelConfig {
    ModelConfig { width: 2, in_channels: 3, classes: 2, dims, ..ModelConfig::new(arch, preset, depth) }
}

#[test]
fn shapes_for_every_depth_2d_and_3d() {
    let d = dev();
    for depth in 1..=5 {
        for preset in [Preset::Modern, Preset::Paper] {
            let cfg = small(Arch::Unetpp, preset, depth, 2);
            let s = 1 << depth;
            let out = cfg.init::<4>(&d).forward(Tensor::zeros([2, 3, s * 2, s * 3], &d));
            assert_eq!(out.len(), depth);
            for t in out {
                assert_eq!(t.dims(), [2, 2, s * 2, s * 3]);
            }
            let cfg = small(Arch::Unetpp, preset, depth, 3);
            let out = cfg.init::<5>(&d).forward(Tensor::zeros([1, 3, s, s * 2, s], &d));
            assert_eq!(out.len(), depth);
            for t in out {
                assert_eq!(t.dims(), [1, 2, s, s * 2, s]);
            }
        }
        let unet = small(Arch::Unet, Preset::Modern, depth, 2).init::<4>(&d);
        assert_eq!(unet.forward(Tensor::zeros([1, 3, 32, 32], &d)).len(), 1);
    }
}

#[test]
fn fast_mode_evaluates_only_the_subgrid() {
    let d = dev();
    let m = small(Arch::Unetpp, Preset::Modern, 4, 2).init::<4>(&d);
    let x = Tensor::<4>::random([1, 3, 16, 16], burn::tensor::Distribution::Default, &d);
    // Nodes with i + j <= l: (l+1)(l+2)/2.
    for (level, nodes) in [(1, 3), (2, 6), (3, 10), (4, 15)] {
        let out = m.forward_level(x.clone(), level);
        assert_eq!(out.nodes_evaluated, nodes);
        assert_eq!(out.heads.last().unwrap().0, level);
    }
    let unet = small(Arch::Unet, Preset::Modern, 4, 2).init::<4>(&d);
    assert_eq!(unet.forward_level(x, 4).nodes_evaluated, 9);
}

#[test]
fn fast_mode_equals_the_head_of_the_full_grid_and_the_pruned_model() {
    let d = dev();
    let m = small(Arch::Unetpp, Preset::Modern, 3, 2).init::<4>(&d).valid();
    let x = Tensor::<4>::random([1, 3, 16, 16], burn::tensor::Distribution::Default, &d);
    let full = m.forward_level(x.clone(), 3).heads;
    let fast = m.predict(x.clone(), Mode::Fast(2)).unwrap();
    let head2 = to_probs(full[1].1.clone(), 2);
    fast.to_data().assert_approx_eq::<f32>(&head2.to_data(), burn::tensor::Tolerance::absolute(1e-6));
    let pruned = m.prune(2).unwrap();
    assert_eq!(pruned.config().depth, 2);
    let p = pruned.predict(x, Mode::Accurate).unwrap();
    p.to_data().assert_approx_eq::<f32>(&head2.to_data(), burn::tensor::Tolerance::absolute(1e-6));
}

#[test]
fn accurate_mode_averages_head_probabilities() {
    let d = dev();
    let m = small(Arch::Unetpp, Preset::Modern, 2, 2).init::<4>(&d).valid();
    let x = Tensor::<4>::random([1, 3, 8, 8], burn::tensor::Distribution::Default, &d);
    let heads = m.forward(x.clone());
    let mean = (to_probs(heads[0].clone(), 2) + to_probs(heads[1].clone(), 2)).div_scalar(2.0);
    m.predict(x, Mode::Accurate)
        .unwrap()
        .to_data()
        .assert_approx_eq::<f32>(&mean.to_data(), burn::tensor::Tolerance::absolute(1e-6));
}

#[test]
fn pruning_needs_a_head() {
    let m = ModelConfig { deep_supervision: false, ..small(Arch::Unetpp, Preset::Modern, 3, 2) }.init::<4>(&dev());
    assert!(m.prune(2).is_err());
}

#[test]
fn mode_parses() {
    assert_eq!("accurate".parse::<Mode>().unwrap(), Mode::Accurate);
    assert_eq!("fast:3".parse::<Mode>().unwrap(), Mode::Fast(3));
    assert!("fast".parse::<Mode>().is_err());
}

#[test]
fn trilinear_depth_axis_matches_linear_interpolation() {
    let d = dev();
    // A ramp along depth 0,1,2 up-samples (align_corners=false) to 0,.25,.75,1.25,1.75,2.
    let x = Tensor::<1>::from_floats([0.0, 1.0, 2.0], &d).reshape([1, 1, 3, 1, 1]).repeat_dim(3, 2).repeat_dim(4, 2);
    let y = layers::upsample(x, false, false);
    assert_eq!(y.dims(), [1, 1, 6, 4, 4]);
    let col: Vec<f32> = y.narrow(3, 0, 1).narrow(4, 0, 1).into_data().iter::<f32>().collect();
    assert_eq!(col, vec![0.0, 0.25, 0.75, 1.25, 1.75, 2.0]);
}

#[test]
fn max_pool_3d_takes_the_max_of_each_2x2x2_cube() {
    let d = dev();
    let x = Tensor::<1>::from_floats(std::array::from_fn::<f32, 16, _>(|i| i as f32), &d).reshape([1, 1, 2, 2, 4]);
    let y: Vec<f32> = layers::max_pool(x).into_data().iter::<f32>().collect();
    assert_eq!(y, vec![13.0, 15.0]);
}

fn resnet(encoder: Encoder, depth: usize, ds: bool) -> ModelConfig {
    ModelConfig { in_channels: 3, ..ModelConfig::new(Arch::Unetpp, Preset::Modern, depth) }.with_encoder(encoder, ds)
}

/// segmentation_models.pytorch 0.6.0 `UnetPlusPlus(encoder, classes=1)` parameter counts plus
/// its BatchNorm running statistics (burn counts those too): the encoder layout, the decoder
/// widths and the 3x3 head must all match.
#[test]
fn smp_parameter_counts() {
    let d = dev();
    for (encoder, params, running) in [
        (Encoder::Resnet18, 15_970_449, 13_376),
        (Encoder::Resnet34, 26_078_609, 20_800),
        (Encoder::Resnet50, 48_985_745, 59_968),
    ] {
        assert_eq!(resnet(encoder, 5, false).init::<4>(&d).num_params(), params + running, "{encoder:?}");
    }
}

#[test]
fn encoder_models_with_deep_supervision_prune_like_the_plain_grid() {
    let d = dev();
    let cfg = resnet(Encoder::Resnet18, 3, true);
    cfg.validate().unwrap();
    let m = cfg.init::<4>(&d).valid();
    let x = Tensor::<4>::random([1, 3, 32, 16], burn::tensor::Distribution::Default, &d);
    let full = m.forward_level(x.clone(), 3);
    assert_eq!(full.heads.iter().map(|h| h.0).collect::<Vec<_>>(), vec![1, 2, 3]);
    for (_, h) in &full.heads {
        assert_eq!(h.dims(), [1, 1, 32, 16]);
    }
    // No X^{0,0}: the sub-grid i + j <= 2 has 5 nodes (3 of them encoder stages).
    assert_eq!(m.forward_level(x.clone(), 2).nodes_evaluated, 5);
    let head2 = to_probs(full.heads[1].1.clone(), 1);
    let fast = m.predict(x.clone(), Mode::Fast(2)).unwrap();
    fast.to_data().assert_approx_eq::<f32>(&head2.to_data(), burn::tensor::Tolerance::absolute(1e-6));
    let pruned = m.prune(2).unwrap();
    pruned.config().validate().unwrap();
    assert_eq!(pruned.encoder.as_ref().unwrap().layers.len(), 1);
    let p = pruned.predict(x, Mode::Accurate).unwrap();
    p.to_data().assert_approx_eq::<f32>(&head2.to_data(), burn::tensor::Tolerance::absolute(1e-6));
}

#[test]
fn encoders_are_2d_modern_only() {
    assert!(ModelConfig { dims: 3, ..resnet(Encoder::Resnet34, 4, true) }.validate().is_err());
    assert!(ModelConfig { preset: Preset::Paper, ..resnet(Encoder::Resnet34, 4, true) }.validate().is_err());
    assert!(ModelConfig { dense_top: false, ..resnet(Encoder::Resnet34, 4, true) }.validate().is_err());
}

/// Random BatchNorm statistics, so eval mode and folding have something to do.
fn randomise_batchnorm<const D: usize>(m: UNetPP<D>) -> UNetPP<D> {
    use burn::module::RunningState;
    use burn::tensor::Distribution::Uniform;
    let d = dev();
    let grid = m
        .grid
        .into_iter()
        .map(|row| {
            row.into_iter()
                .map(|n| {
                    n.map(|mut n| {
                        for bn in [&mut n.block.norm1, &mut n.block.norm2].into_iter().flatten() {
                            let c = bn.gamma.dims()[0];
                            bn.running_mean = RunningState::new(Tensor::random([c], Uniform(-0.5, 0.5), &d));
                            bn.running_var = RunningState::new(Tensor::random([c], Uniform(0.5, 1.5), &d));
                            bn.gamma = burn::module::Param::from_tensor(Tensor::random([c], Uniform(0.5, 1.5), &d));
                            bn.beta = burn::module::Param::from_tensor(Tensor::random([c], Uniform(0.0, 0.5), &d));
                        }
                        n
                    })
                })
                .collect()
        })
        .collect();
    UNetPP { grid, ..m }
}

/// Folded BatchNorm gives the plain path's outputs (relative error <= 1e-4), 2D and 3D, every mode.
#[test]
fn folded_batchnorm_matches_the_plain_path() {
    let d = dev();
    let rel = |a: Tensor<4>, b: Tensor<4>| {
        let scale = b.clone().abs().max().into_scalar::<f32>().max(1e-6);
        (a - b).abs().max().into_scalar::<f32>() / scale
    };
    let m = randomise_batchnorm(small(Arch::Unetpp, Preset::Modern, 3, 2).init::<4>(&d)).valid();
    let x = Tensor::<4>::random([2, 3, 16, 24], burn::tensor::Distribution::Default, &d);
    let folded = m.clone().fold_batchnorm();
    assert!(folded.grid[0][1].as_ref().unwrap().block.norm1.is_none());
    for (a, b) in folded.forward(x.clone()).into_iter().zip(m.forward(x.clone())) {
        assert!(rel(a, b) <= 1e-4);
    }
    let m3 = randomise_batchnorm(small(Arch::Unetpp, Preset::Modern, 2, 3).init::<5>(&d)).valid();
    let x3 = Tensor::<5>::random([1, 3, 8, 8, 4], burn::tensor::Distribution::Default, &d);
    let (a, b) = (
        m3.clone().fold_batchnorm().predict(x3.clone(), Mode::Fast(1)).unwrap(),
        m3.predict(x3, Mode::Fast(1)).unwrap(),
    );
    assert!((a - b).abs().max().into_scalar::<f32>() <= 1e-4);
}

/// Inference up-samples each node's half-size part as the convolution reads it, pools each
/// encoder node and sums the last node into its head as the convolutions store
/// (`Block::layer`'s fused path): with widths and sizes that take
/// the Winograd kernel (F(2x2) at 24x32, F(4x4) at 48x48), binary and two-class heads, every
/// mode gives the probabilities of burn's unfused ops to 1e-4 relative.
#[test]
fn fused_inference_matches_burn_ops() {
    let d = dev();
    let rel = |a: Tensor<4>, b: Tensor<4>| {
        let scale = b.clone().abs().max().into_scalar::<f32>().max(1e-6);
        (a - b).abs().max().into_scalar::<f32>() / scale
    };
    for classes in [1, 2] {
        let cfg = ModelConfig { width: 16, classes, ..small(Arch::Unetpp, Preset::Modern, 3, 2) };
        let m = randomise_batchnorm(cfg.init::<4>(&d)).valid().fold_batchnorm();
        for dims in [[2, 3, 24, 32], [1, 3, 48, 48]] {
            let x = Tensor::<4>::random(dims, burn::tensor::Distribution::Default, &d);
            for mode in [Mode::Fast(1), Mode::Fast(2), Mode::Fast(3), Mode::Accurate] {
                let ours = m.predict(x.clone(), mode).unwrap();
                crate::kernel::set_enabled(false);
                let theirs = m.predict(x.clone(), mode).unwrap();
                crate::kernel::set_enabled(true);
                assert!(rel(ours, theirs) <= 1e-4, "{mode} {dims:?} {classes} classes");
            }
        }
    }
}
