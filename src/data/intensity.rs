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
//! voxels per case (with replacement, seeded); we use all of them, so the numbers are exact and
//! do not depend on a random stream.

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

/// The scheme for a channel name; CT gets its statistics from [`ct_stats`].
pub fn scheme(name: &str, foreground: Option<&mut Vec<f32>>) -> anyhow::Result<ChannelNorm> {
    Ok(match name.to_lowercase().as_str() {
        "ct" => {
            let v = foreground.filter(|v| !v.is_empty()).ok_or_else(|| {
                anyhow::anyhow!("channel `{name}` (CT) needs foreground voxels, but no training label has any")
            })?;
            ct_stats(v)
        }
        "nonorm" => ChannelNorm::NoNorm,
        "rescale_to_0_1" => ChannelNorm::RescaleTo01,
        "rgb_to_0_1" => ChannelNorm::RgbTo01,
        _ => ChannelNorm::ZScore,
    })
}

/// Mean, population std and numpy's (linear) 0.5/99.5 percentiles of the foreground voxels.
pub fn ct_stats(v: &mut [f32]) -> ChannelNorm {
    v.sort_unstable_by(f32::total_cmp);
    let n = v.len() as f64;
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
    let std = (v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
    ChannelNorm::Ct { low: percentile_linear(v, 0.5), high: percentile_linear(v, 99.5), mean, std }
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
        // 0..=100: mean 50, population std sqrt(850), np.percentile(.., 0.5) = 0.5, 99.5 -> 99.5.
        let mut v: Vec<f32> = (0..=100).rev().map(|x| x as f32).collect();
        let ChannelNorm::Ct { low, high, mean, std } = ct_stats(&mut v) else { panic!() };
        assert_eq!((low, high, mean), (0.5, 99.5, 50.0));
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
        assert!(format!("{}", scheme("ct", Some(&mut vec![])).unwrap_err()).contains("no training label"));
        let mut x = vec![2.0, 4.0, 6.0];
        ChannelNorm::RescaleTo01.apply(&mut x);
        assert_eq!(x, vec![0.0, 0.5, 1.0]);
    }
}
