//! Per-channel normalisation chosen from the channel's modality, as nnU-Net does
//! (nnunetv2/preprocessing/normalization/default_normalization_schemes.py, picked by
//! `channel_names` case-insensitively): `CT` is clipped to the data set's foreground 0.5/99.5
//! percentiles and z-scored with the foreground mean and std, `noNorm` is left alone,
//! `rescale_to_0_1` maps each case's min..max to 0..1, `rgb_to_0_1` divides by 255, and any
//! other name is z-scored per case. Every value stays in the file's own units.
//!
//! The CT statistics are the data set's fingerprint: collected once over every foreground voxel
//! (label > 0) of every training case, then saved in the run's configuration and checkpoint so
//! that eval and predict normalise exactly as training did. nnU-Net v2 draws 10,000 foreground
//! voxels per case (with replacement, seeded); the mean and std here are over all of them, the
//! percentiles over up to 100,000 per case (see [`Foreground`]), with no random stream.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "scheme", rename_all = "kebab-case")]
pub enum ChannelNorm {
    /// nnU-Net's CTNormalization: clip to [low, high], then (x - mean) / max(std, 1e-8).
    Ct {
        low: f64,
        high: f64,
        mean: f64,
        std: f64,
    },
    ZScore,
    NoNorm,
    RescaleTo01,
    RgbTo01,
}

/// Whether channel `name` needs the data set's foreground statistics.
pub fn is_ct(name: &str) -> bool {
    name.to_lowercase() == "ct"
}

/// The scheme for a channel name; CT's statistics come from `foreground`.
pub fn scheme(name: &str, foreground: Option<Foreground>) -> anyhow::Result<ChannelNorm> {
    Ok(match name.to_lowercase().as_str() {
        "ct" => foreground.and_then(Foreground::stats).ok_or_else(|| {
            anyhow::anyhow!("channel `{name}` (CT) needs foreground voxels, but no training label has any")
        })?,
        "nonorm" => ChannelNorm::NoNorm,
        "rescale_to_0_1" => ChannelNorm::RescaleTo01,
        "rgb_to_0_1" => ChannelNorm::RgbTo01,
        _ => ChannelNorm::ZScore,
    })
}

/// One channel's foreground intensities over the training cases: exact count, mean and sum of
/// squared deviations (merged case by case, Chan et al.), and for the percentiles every voxel of
/// a case up to [`Foreground::PER_CASE`], an evenly strided subset beyond, so that memory stays
/// bounded on large data sets (nnU-Net keeps 10,000 random voxels per case).
#[derive(Clone, Debug, Default)]
pub struct Foreground {
    n: f64,
    mean: f64,
    m2: f64,
    samples: Vec<f32>,
}

impl Foreground {
    pub const PER_CASE: usize = 100_000;

    pub fn add_case(&mut self, v: &[f32]) {
        if v.is_empty() {
            return;
        }
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let m2 = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>();
        let total = self.n + n;
        let delta = mean - self.mean;
        self.m2 += m2 + delta * delta * self.n * n / total;
        self.mean += delta * n / total;
        self.n = total;
        self.samples.extend(v.iter().step_by(v.len().div_ceil(Self::PER_CASE)));
    }

    /// Mean, population std and numpy's (linear) 0.5/99.5 percentiles; `None` without voxels.
    pub fn stats(mut self) -> Option<ChannelNorm> {
        if self.samples.is_empty() {
            return None;
        }
        self.samples.sort_unstable_by(f32::total_cmp);
        let (low, high) = (percentile_linear(&self.samples, 0.5), percentile_linear(&self.samples, 99.5));
        Some(ChannelNorm::Ct { low, high, mean: self.mean, std: (self.m2 / self.n).sqrt() })
    }
}

/// `np.percentile(v, p)` (linear interpolation) of sorted `v`.
fn percentile_linear(sorted: &[f32], p: f64) -> f64 {
    let pos = p / 100.0 * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    let (a, b) = (sorted[lo] as f64, sorted[hi] as f64);
    a + (b - a) * (pos - lo as f64)
}

impl ChannelNorm {
    /// Normalises one channel of one case in place.
    pub fn apply(&self, ch: &mut [f32]) {
        match *self {
            ChannelNorm::Ct { low, high, mean, std } => {
                let sd = std.max(1e-8);
                ch.iter_mut().for_each(|x| *x = (((*x as f64).clamp(low, high) - mean) / sd) as f32);
            }
            ChannelNorm::ZScore => super::Normalize::ZScore.apply(ch, 1, 1.0),
            ChannelNorm::NoNorm => {}
            ChannelNorm::RescaleTo01 => {
                let min = ch.iter().copied().fold(f32::INFINITY, f32::min);
                let max = ch.iter().copied().fold(f32::NEG_INFINITY, f32::max) - min;
                ch.iter_mut().for_each(|x| *x = (*x - min) / max.max(1e-8));
            }
            ChannelNorm::RgbTo01 => ch.iter_mut().for_each(|x| *x /= 255.0),
        }
    }
}

/// Normalises a channels-first image: per channel from `norms` when given, else with `fallback`.
pub fn normalize(data: &mut [f32], channels: usize, norms: &[ChannelNorm], fallback: super::Normalize, full: f32) {
    if norms.len() == channels {
        let n = data.len() / channels;
        data.chunks_mut(n).zip(norms).for_each(|(ch, norm)| norm.apply(ch));
    } else {
        fallback.apply(data, channels, full);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ct_statistics_by_hand() {
        // 0..=100 in three cases: mean 50, population std sqrt(850), np.percentile(.., 0.5) = 0.5.
        let v: Vec<f32> = (0..=100).rev().map(|x| x as f32).collect();
        let mut fg = Foreground::default();
        [&v[..10], &v[10..11], &[], &v[11..]].iter().for_each(|c| fg.add_case(c));
        let ChannelNorm::Ct { low, high, mean, std } = fg.stats().unwrap() else { panic!() };
        assert_eq!((low, high), (0.5, 99.5));
        assert!((mean - 50.0).abs() < 1e-12);
        assert!((std - 850f64.sqrt()).abs() < 1e-9);
        let mut x = vec![-1000.0, 50.0, 1000.0];
        ChannelNorm::Ct { low, high, mean, std }.apply(&mut x);
        let want = [(0.5 - 50.0) / std, 0.0, (99.5 - 50.0) / std];
        assert!(x.iter().zip(want).all(|(a, b)| (*a as f64 - b).abs() < 1e-6), "{x:?}");
    }

    #[test]
    fn names_pick_nnunets_schemes() {
        assert_eq!(scheme("T2", None).unwrap(), ChannelNorm::ZScore);
        assert_eq!(scheme("noNorm", None).unwrap(), ChannelNorm::NoNorm);
        assert_eq!(scheme("Rescale_To_0_1", None).unwrap(), ChannelNorm::RescaleTo01);
        assert!(format!("{}", scheme("ct", Some(Foreground::default())).unwrap_err()).contains("no training label"));
        // Beyond PER_CASE voxels a case contributes an evenly strided subset to the percentiles.
        let mut fg = Foreground::default();
        fg.add_case(&(0..250_000).map(|x| x as f32).collect::<Vec<_>>());
        assert_eq!(fg.samples.len(), 83_334);
        assert_eq!(fg.samples[1], 3.0);
        let mut x = vec![2.0, 4.0, 6.0];
        ChannelNorm::RescaleTo01.apply(&mut x);
        assert_eq!(x, vec![0.0, 0.5, 1.0]);
    }
}
