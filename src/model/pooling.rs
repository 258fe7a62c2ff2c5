//! Per-level, per-axis down-sampling factors (`ModelConfig::pool`): nnU-Net's anisotropic plans
//! pool only in-plane on the first levels when z is much coarser. Every size the model derives
//! from its depth (patch multiples, memory per level, window rounding, the layers' pooling and
//! up-sampling) comes from [`ModelConfig::factor`] and [`ModelConfig::scale`].

use super::{Encoder, ModelConfig};

/// `--pool`: one `z,y,x` (or `y,x`, z = 1) triple of factors per level, levels separated by
/// `:`, e.g. `1,2,2:2,2,2`. `Display` writes it back in that form.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pooling(pub Vec<[usize; 3]>);

impl std::str::FromStr for Pooling {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: String| {
            format!(
                "--pool takes one z,y,x (or y,x) of factors 1 or 2 per level, separated by `:`, e.g. 1,2,2:2,2,2; {why}"
            )
        };
        let level = |l: &str| -> Result<[usize; 3], String> {
            let v: Vec<usize> = l
                .split(',')
                .map(|f| f.trim().parse().map_err(|_| bad(format!("`{f}` in `{s}` is not a number"))))
                .collect::<Result<_, _>>()?;
            match v[..] {
                [z, y, x] => Ok([z, y, x]),
                [y, x] => Ok([1, y, x]),
                _ => Err(bad(format!("level `{l}` of `{s}` has {} factors", v.len()))),
            }
        };
        s.split(':').map(level).collect::<Result<_, _>>().map(Pooling)
    }
}

impl std::fmt::Display for Pooling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let levels: Vec<String> = self.0.iter().map(|p| format!("{},{},{}", p[0], p[1], p[2])).collect();
        write!(f, "{}", levels.join(":"))
    }
}

impl ModelConfig {
    /// The factor `[z, y, x]` by which level `level - 1` is divided to give level `level`
    /// (level 0: nothing, 1 on every axis). Without `pool`: 2 on every spatial axis (z is 1 in 2D).
    pub fn factor(&self, level: usize) -> [usize; 3] {
        match level {
            0 => [1, 1, 1],
            _ => match self.pool.get(level - 1) {
                Some(&f) => f,
                None => [if self.dims == 2 { 1 } else { 2 }, 2, 2],
            },
        }
    }

    /// How much level `level` is smaller than level 0 per axis: the product of the factors up to it.
    pub fn scale(&self, level: usize) -> [usize; 3] {
        (1..=level).fold([1; 3], |s, l| {
            let f = self.factor(l);
            std::array::from_fn(|a| s[a] * f[a])
        })
    }

    /// Voxels of level 0 per voxel of level `level`.
    pub fn reduction(&self, level: usize) -> f64 {
        self.scale(level).iter().product::<usize>() as f64
    }

    /// Whether every level halves every spatial axis (the paper's pooling).
    pub fn isotropic(&self) -> bool {
        (1..=self.depth).all(|l| self.factor(l)[3 - self.dims.clamp(2, 3)..].iter().all(|&f| f == 2))
    }

    /// `pool`: empty or one entry per level, factors 1 or 2, z = 1 in 2D, some axis pooled on
    /// every level, and only the paper's pooling under a ResNet encoder.
    pub(super) fn validate_pool(&self) -> anyhow::Result<()> {
        use anyhow::ensure;
        let given = || Pooling(self.pool.clone());
        ensure!(
            self.pool.is_empty() || self.pool.len() == self.depth,
            "--pool needs one z,y,x per level ({} for --depth {}), got {} in `{}`",
            self.depth,
            self.depth,
            self.pool.len(),
            given()
        );
        for (l, f) in self.pool.iter().enumerate() {
            ensure!(
                f.iter().all(|&v| v == 1 || v == 2),
                "--pool factors must be 1 or 2, got {},{},{} for level {}",
                f[0],
                f[1],
                f[2],
                l + 1
            );
            ensure!(
                self.dims == 3 || f[0] == 1,
                "--pool: a 2D model has no z axis to pool (z must be 1), got {},{},{} for level {}",
                f[0],
                f[1],
                f[2],
                l + 1
            );
            ensure!(
                f.contains(&2),
                "--pool: level {} pools no axis ({},{},{}); every level must halve at least one",
                l + 1,
                f[0],
                f[1],
                f[2]
            );
        }
        ensure!(
            self.encoder == Encoder::Plain || self.isotropic(),
            "ResNet encoders (--encoder) pool by 2 on every axis, got --pool {}",
            given()
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Arch, Preset};

    fn cfg3(pool: &str) -> ModelConfig {
        let pool = pool.parse::<Pooling>().unwrap().0;
        ModelConfig { dims: 3, pool, ..ModelConfig::new(Arch::Unetpp, Preset::Modern, 2) }
    }

    #[test]
    fn parses_and_prints_levels() {
        assert_eq!("1,2,2:2,2,2".parse::<Pooling>().unwrap().0, vec![[1, 2, 2], [2, 2, 2]]);
        assert_eq!("2,1:2,2".parse::<Pooling>().unwrap().0, vec![[1, 2, 1], [1, 2, 2]]);
        assert_eq!(Pooling(vec![[1, 2, 2], [2, 2, 2]]).to_string(), "1,2,2:2,2,2");
        for bad in ["", "2", "1,2,x", "1,2,2,2", "1,2,2;2,2,2"] {
            let e = bad.parse::<Pooling>().unwrap_err();
            assert!(e.contains("--pool") && e.contains("1,2,2:2,2,2"), "{bad}: {e}");
        }
    }

    #[test]
    fn factors_and_scales_per_axis() {
        let c = cfg3("1,2,2:2,2,2");
        assert_eq!((c.factor(0), c.factor(1), c.factor(2)), ([1, 1, 1], [1, 2, 2], [2, 2, 2]));
        assert_eq!((c.scale(1), c.scale(2)), ([1, 2, 2], [2, 4, 4]));
        assert_eq!(c.reduction(2), 32.0);
        assert!(!c.isotropic());
        // Empty: the paper's 2 on every axis, z untouched in 2D.
        let paper = ModelConfig::new(Arch::Unetpp, Preset::Modern, 3);
        assert_eq!((paper.scale(3), paper.reduction(3)), ([1, 8, 8], 64.0));
        assert!(paper.isotropic());
        assert_eq!(ModelConfig { dims: 3, ..paper }.scale(3), [8, 8, 8]);
        assert!(cfg3("2,2,2:2,2,2").isotropic());
    }

    #[test]
    fn validation_names_the_rule() {
        cfg3("1,2,2:2,2,2").validate().unwrap();
        let err = |c: ModelConfig| c.validate().unwrap_err().to_string();
        assert!(err(cfg3("2,2,2")).contains("one z,y,x per level (2 for --depth 2), got 1"));
        assert!(err(cfg3("1,3,2:2,2,2")).contains("must be 1 or 2, got 1,3,2 for level 1"));
        assert!(err(cfg3("1,1,1:2,2,2")).contains("level 1 pools no axis"));
        let flat = ModelConfig { dims: 2, ..cfg3("2,2,2:1,2,2") };
        assert!(err(flat).contains("z must be 1"));
        let two_d = ModelConfig { dims: 2, ..cfg3("1,2,1:1,2,2") };
        two_d.validate().unwrap();
        let resnet = ModelConfig { in_channels: 3, ..ModelConfig::new(Arch::Unetpp, Preset::Modern, 2) }
            .with_encoder(Encoder::Resnet18, true);
        ModelConfig { pool: vec![[1, 2, 2]; 2], ..resnet.clone() }.validate().unwrap();
        assert!(err(ModelConfig { pool: vec![[1, 1, 2], [1, 2, 2]], ..resnet }).contains("ResNet encoders"));
    }
}
