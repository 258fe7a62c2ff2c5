//! Rank dispatch: burn fixes a tensor's rank at compile time (`Tensor<4>` for 2D batches,
//! `Tensor<5>` for 3D), while a model's dimensionality is data read at run time. Every command
//! crosses from one to the other here, once.

use burn::module::Module;
use burn::prelude::*;

use crate::model::ModelConfig;

/// `for_rank!(dims, f(args..))` calls `f::<4>(args..)` for 2D and `f::<5>(args..)` for 3D;
/// `f` is a function generic over `const D: usize` (the tensor rank), in scope by name.
/// `dims` is 2 or 3 once [`ModelConfig::validate`] has passed; every caller checks that first.
#[macro_export]
macro_rules! for_rank {
    ($dims:expr, $f:ident ( $($arg:expr),* $(,)? )) => {
        match $dims {
            2 => $f::<4>($($arg),*),
            3 => $f::<5>($($arg),*),
            d => unreachable!("a model of {d} spatial dimensions got past ModelConfig::validate (2 or 3)"),
        }
    };
}

/// Parameters of the model `cfg` describes (BatchNorm running statistics included), or of its
/// pruned sub-network UNet++ L_`pruned`.
pub fn num_params(cfg: &ModelConfig, pruned: Option<usize>) -> anyhow::Result<usize> {
    fn count<const D: usize>(cfg: &ModelConfig, pruned: Option<usize>) -> anyhow::Result<usize> {
        let model = cfg.init::<D>(&Device::flex());
        Ok(match pruned {
            Some(l) => model.prune(l)?.num_params(),
            None => model.num_params(),
        })
    }
    cfg.validate()?;
    for_rank!(cfg.dims, count(cfg, pruned))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Arch, Preset};

    fn rank<const D: usize>() -> usize {
        D
    }

    #[test]
    fn dims_pick_the_tensor_rank() {
        assert_eq!((for_rank!(2, rank()), for_rank!(3, rank())), (4, 5));
    }

    #[test]
    fn parameters_count_the_model_of_each_rank() {
        let cfg = ModelConfig { width: 4, ..ModelConfig::new(Arch::Unetpp, Preset::Modern, 2) };
        let cfg3 = ModelConfig { dims: 3, ..cfg.clone() };
        let d = Device::flex();
        assert_eq!(num_params(&cfg, None).unwrap(), cfg.init::<4>(&d).num_params());
        assert_eq!(num_params(&cfg3, None).unwrap(), cfg3.init::<5>(&d).num_params());
        assert_eq!(num_params(&cfg, Some(1)).unwrap(), cfg.init::<4>(&d).prune(1).unwrap().num_params());
        assert!(num_params(&cfg, Some(1)).unwrap() < num_params(&cfg, None).unwrap());
        let err = num_params(&ModelConfig { dims: 4, ..cfg }, None).unwrap_err().to_string();
        assert!(err.contains("dims"), "{err}");
    }
}
