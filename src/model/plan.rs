//! The evaluation plan of a forward pass: which nodes of the grid run, in what order, and where
//! each one's output goes. `UNetPP::forward_level` follows it and only computes eq. 1.

use super::{Encoder, ModelConfig};

/// Where a node's output goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// Kept for the nodes (and heads) that read it.
    Stored,
    /// Kept, and its 2x max pooling D(x^{i,0}) kept for X^{i+1,0}.
    Pooled,
    /// Only into head `h`: X^{0,l} of a pass to level l, which no other node reads.
    Head(usize),
}

/// One node X^{i,j} of a plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    pub i: usize,
    pub j: usize,
    pub output: Output,
}

impl ModelConfig {
    /// The nodes with i + j <= `level` (fast mode at `level`; the whole grid at the depth), in an
    /// order in which every node's inputs come before it: column by column, top to bottom.
    pub fn plan(&self, level: usize) -> Vec<Step> {
        let head = self.head_columns().iter().position(|&j| j == level);
        let plain = self.encoder == Encoder::Plain;
        (0..=level)
            .flat_map(|j| (0..=level - j).map(move |i| (i, j)))
            .filter(|&(i, j)| self.has_node(i, j))
            .map(|(i, j)| {
                let output = match (i, j, head) {
                    (0, _, Some(h)) if j == level => Output::Head(h),
                    // A ResNet computes its own stages, X^{i,0}, pooling included.
                    (_, 0, _) if i < level && plain => Output::Pooled,
                    _ => Output::Stored,
                };
                Step { i, j, output }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Arch, Preset};

    /// UNet++ L2 with deep supervision: six nodes, X^{0,0} and X^{1,0} pooled for the node below,
    /// X^{0,2} only into its head (the second); fast:1 ends in head 0.
    #[test]
    fn plan_routes_outputs() {
        let cfg = ModelConfig::new(Arch::Unetpp, Preset::Modern, 2);
        let step = |i, j, output| Step { i, j, output };
        let (s, p) = (Output::Stored, Output::Pooled);
        assert_eq!(
            cfg.plan(2),
            vec![
                step(0, 0, p),
                step(1, 0, p),
                step(2, 0, s),
                step(0, 1, s),
                step(1, 1, s),
                step(0, 2, Output::Head(1))
            ]
        );
        assert_eq!(cfg.plan(1), vec![step(0, 0, p), step(1, 0, s), step(0, 1, Output::Head(0))]);
        // One head on X^{0,2} only: fast:1 has no head to sum X^{0,1} into.
        let one = ModelConfig { deep_supervision: false, ..cfg.clone() };
        assert_eq!(one.plan(1)[2], step(0, 1, s));
        // U-Net: the backbone and the last node of each level.
        let unet = ModelConfig::new(Arch::Unet, Preset::Modern, 2);
        let nodes: Vec<(usize, usize)> = unet.plan(2).iter().map(|s| (s.i, s.j)).collect();
        assert_eq!(nodes, vec![(0, 0), (1, 0), (2, 0), (1, 1), (0, 2)]);
        // A ResNet's stages are not pooled by the grid.
        let resnet = ModelConfig { in_channels: 3, ..cfg }.with_encoder(Encoder::Resnet18, true);
        assert!(resnet.plan(2).iter().all(|s| s.output != p));
    }
}
