//! The optimisation recipe beyond Adam's step size: which loss (the paper's eq. 2 or nnU-Net's
//! Dice + CE) and how the step size changes over the run (constant, or nnU-Net's polynomial
//! decay). Defaults are the paper's; old run directories load with them.

use serde::{Deserialize, Serialize};

use crate::loss::Objective;

#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    #[serde(default)]
    pub loss: Objective,
    #[serde(default)]
    pub schedule: Schedule,
}

/// How the step size follows the run's progress.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    #[default]
    Constant,
    /// nnU-Net's `PolyLRScheduler`: lr · (1 − step / steps)^0.9, reaching 0 at the run's end.
    Poly,
}

impl Schedule {
    pub const VALUES: &[Schedule] = &[Schedule::Constant, Schedule::Poly];

    pub fn name(self) -> &'static str {
        match self {
            Schedule::Constant => "constant",
            Schedule::Poly => "poly",
        }
    }

    /// The step size for 0-based step `step` of a run of `steps` steps. Depends only on the step
    /// count, so a resumed run follows the same schedule.
    pub fn lr(self, base: f64, step: usize, steps: usize) -> f64 {
        match self {
            Schedule::Constant => base,
            Schedule::Poly => base * (1.0 - step.min(steps) as f64 / steps.max(1) as f64).powf(0.9),
        }
    }
}

crate::names::by_name!(Schedule, "--schedule");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poly_decays_as_nnunet() {
        // nnU-Net: initial_lr * (1 - current_step / max_steps) ** 0.9.
        let s = Schedule::Poly;
        assert_eq!(s.lr(1e-2, 0, 100), 1e-2);
        assert!((s.lr(1e-2, 50, 100) - 1e-2 * 0.5f64.powf(0.9)).abs() < 1e-15);
        assert!((s.lr(1e-2, 99, 100) - 1e-2 * 0.01f64.powf(0.9)).abs() < 1e-15);
        assert_eq!(Schedule::Constant.lr(1e-2, 99, 100), 1e-2);
    }

    #[test]
    fn parses_and_refuses() {
        assert_eq!("poly".parse::<Schedule>().unwrap(), Schedule::Poly);
        crate::names::check_names(Schedule::VALUES, "--schedule", "constant, poly");
        assert_eq!("nnunet".parse::<Objective>().unwrap(), Objective::Nnunet);
        crate::names::check_names(Objective::VALUES, "--loss", "paper, nnunet");
        let old: Recipe = toml::from_str("").unwrap();
        assert_eq!(old, Recipe::default());
    }
}
