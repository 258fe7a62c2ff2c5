//! Training patches: random crops (with foreground oversampling), flips and 90° rotations,
//! stacked into tensors.

use burn::prelude::*;
use rand::Rng;

use super::Sample;

/// A crop of a sample: channels x [d, h, w] image and [d, h, w] labels.
#[derive(Clone, Debug)]
pub struct Patch {
    pub image: Vec<f32>,
    pub mask: Vec<u8>,
    pub channels: usize,
    pub shape: [usize; 3],
}

fn index(shape: [usize; 3], z: usize, y: usize, x: usize) -> usize {
    (z * shape[1] + y) * shape[2] + x
}

/// Crops `size` at `origin` (which may reach past the border: zero-padded there).
pub fn crop(s: &Sample, origin: [isize; 3], size: [usize; 3]) -> Patch {
    let n = size.iter().product::<usize>();
    let mut image = vec![0.0; n * s.channels];
    let mut mask = vec![0u8; if s.mask.is_empty() { 0 } else { n }];
    let vox = s.voxels();
    for z in 0..size[0] {
        for y in 0..size[1] {
            for x in 0..size[2] {
                let (sz, sy, sx) = (origin[0] + z as isize, origin[1] + y as isize, origin[2] + x as isize);
                if sz < 0
                    || sy < 0
                    || sx < 0
                    || sz as usize >= s.shape[0]
                    || sy as usize >= s.shape[1]
                    || sx as usize >= s.shape[2]
                {
                    continue;
                }
                let src = index(s.shape, sz as usize, sy as usize, sx as usize);
                let dst = index(size, z, y, x);
                for c in 0..s.channels {
                    image[c * n + dst] = s.image[c * vox + src];
                }
                if !mask.is_empty() {
                    mask[dst] = s.mask[src];
                }
            }
        }
    }
    Patch { image, mask, channels: s.channels, shape: size }
}

/// What a patch is cut from: a sample in memory, or a case in the on-disk cache
/// ([`super::cache`]), which reads only the blocks a patch needs.
pub trait Cut {
    /// [depth, height, width]
    fn shape(&self) -> [usize; 3];
    /// Voxels with a label > 0.
    fn foreground_count(&self) -> anyhow::Result<usize>;
    /// The index (z, y, x order) of the `k`-th voxel with a label > 0.
    fn nth_foreground(&self, k: usize) -> anyhow::Result<usize>;
    /// As [`crop`].
    fn cut(&self, origin: [isize; 3], size: [usize; 3]) -> anyhow::Result<Patch>;
}

impl Cut for Sample {
    fn shape(&self) -> [usize; 3] {
        self.shape
    }
    fn foreground_count(&self) -> anyhow::Result<usize> {
        Ok(self.mask.iter().filter(|&&v| v > 0).count())
    }
    fn nth_foreground(&self, k: usize) -> anyhow::Result<usize> {
        Ok(self.mask.iter().enumerate().filter(|(_, v)| **v > 0).nth(k).unwrap().0)
    }
    fn cut(&self, origin: [isize; 3], size: [usize; 3]) -> anyhow::Result<Patch> {
        Ok(crop(self, origin, size))
    }
}

/// A random patch; with probability `fg_prob` it is centred on a random foreground voxel. The
/// draws from `rng` depend only on the shape and foreground, so a cached case gives the patch
/// its sample in memory gives.
pub fn sample(s: &impl Cut, size: [usize; 3], fg_prob: f64, rng: &mut impl Rng) -> anyhow::Result<Patch> {
    let shape = s.shape();
    let fg_centre = if rng.random_bool(fg_prob) {
        let count = s.foreground_count()?;
        if count > 0 {
            let k = rng.random_range(0..count);
            let i = s.nth_foreground(k)?;
            Some([i / (shape[1] * shape[2]), (i / shape[2]) % shape[1], i % shape[2]])
        } else {
            None
        }
    } else {
        None
    };
    let origin: [isize; 3] = std::array::from_fn(|a| {
        let (len, p) = (shape[a] as i64, size[a] as i64);
        match fg_centre {
            // Jitter so the foreground voxel is not always at the centre.
            Some(c) => (c[a] as i64 - p / 2 + rng.random_range(-(p / 4)..=p / 4))
                .clamp((len - p).min(0), (len - p).max(0)) as isize,
            None if len <= p => ((len - p) / 2) as isize,
            None => rng.random_range(0..=len - p) as isize,
        }
    });
    s.cut(origin, size)
}

/// Random flips along every axis and, when height = width, a random 90° rotation in-plane.
pub fn augment(p: &mut Patch, rng: &mut impl Rng) {
    let [d, h, w] = p.shape;
    let n = d * h * w;
    let flips = [rng.random_bool(0.5) && d > 1, rng.random_bool(0.5), rng.random_bool(0.5)];
    let rot = if h == w { rng.random_range(0..4) } else { 0 };
    if flips == [false; 3] && rot == 0 {
        return;
    }
    let map = |z: usize, y: usize, x: usize| -> usize {
        let (z, mut y, mut x) = (
            if flips[0] { d - 1 - z } else { z },
            if flips[1] { h - 1 - y } else { y },
            if flips[2] { w - 1 - x } else { x },
        );
        for _ in 0..rot {
            (y, x) = (x, h - 1 - y);
        }
        index([d, h, w], z, y, x)
    };
    let src: Vec<usize> = (0..n).map(|i| map(i / (h * w), (i / w) % h, i % w)).collect();
    let image = p.image.clone();
    for c in 0..p.channels {
        for (i, &s) in src.iter().enumerate() {
            p.image[c * n + i] = image[c * n + s];
        }
    }
    if !p.mask.is_empty() {
        let mask = p.mask.clone();
        for (i, &s) in src.iter().enumerate() {
            p.mask[i] = mask[s];
        }
    }
}

/// Tensor dims for a batch: [N, C, H, W] in 2D, [N, C, D, H, W] in 3D.
pub fn batch_dims<const D: usize>(n: usize, c: usize, shape: [usize; 3]) -> [usize; D] {
    let mut dims = [0; D];
    dims[0] = n;
    dims[1] = c;
    dims[2..].copy_from_slice(&shape[3 - (D - 2)..]);
    dims
}

pub fn images_tensor<const D: usize>(patches: &[&Patch], device: &Device) -> Tensor<D> {
    let p0 = patches[0];
    let data: Vec<f32> = patches.iter().flat_map(|p| p.image.iter().copied()).collect();
    Tensor::<1>::from_floats(data.as_slice(), device).reshape(batch_dims::<D>(patches.len(), p0.channels, p0.shape))
}

/// Targets: {0,1} maps for binary, one-hot maps for `classes` >= 2.
pub fn targets_tensor<const D: usize>(patches: &[&Patch], classes: usize, device: &Device) -> Tensor<D> {
    let p0 = patches[0];
    let n = p0.mask.len();
    let data: Vec<f32> = if classes == 1 {
        patches.iter().flat_map(|p| p.mask.iter().map(|&v| v as f32)).collect()
    } else {
        let mut v = vec![0.0; patches.len() * classes * n];
        for (b, p) in patches.iter().enumerate() {
            for (i, &l) in p.mask.iter().enumerate() {
                v[(b * classes + l as usize) * n + i] = 1.0;
            }
        }
        v
    };
    Tensor::<1>::from_floats(data.as_slice(), device).reshape(batch_dims::<D>(patches.len(), classes, p0.shape))
}

/// A crop of at most `size` centred on the foreground centroid (or the image centre): what
/// validation scores, so that checking every epoch stays cheap on large images.
pub fn centre_crop(s: &Sample, size: [usize; 3]) -> Sample {
    let size: [usize; 3] = std::array::from_fn(|a| size[a].min(s.shape[a]));
    let fg: Vec<usize> = s.mask.iter().enumerate().filter(|(_, v)| **v > 0).map(|(i, _)| i).collect();
    let centre: [usize; 3] = if fg.is_empty() {
        s.shape.map(|l| l / 2)
    } else {
        let plane = s.shape[1] * s.shape[2];
        let coord = |i: usize| [i / plane, (i / s.shape[2]) % s.shape[1], i % s.shape[2]];
        std::array::from_fn(|a| fg.iter().map(|&i| coord(i)[a]).sum::<usize>() / fg.len())
    };
    let origin: [isize; 3] =
        std::array::from_fn(|a| (centre[a].saturating_sub(size[a] / 2)).min(s.shape[a] - size[a]) as isize);
    let p = crop(s, origin, size);
    // A crop is no longer on the file's grid.
    Sample { image: p.image, mask: p.mask, shape: size, geometry: None, ..s.clone() }
}

/// A patch or window size as the command line writes it: `96` -> [96, 96, 96] (a 2D model
/// reads [1, 96, 96]), `96,128` -> [1, 96, 128], `64,128,128` -> depth, height, width.
pub fn parse_size(s: &str) -> Result<[usize; 3], String> {
    let v: Vec<usize> = s
        .split(',')
        .map(|x| x.trim().parse())
        .collect::<Result<_, _>>()
        .map_err(|_| format!("bad size `{s}`: give N, H,W or D,H,W in voxels, e.g. 96 or 64,128,128"))?;
    match v[..] {
        [a] => Ok([a, a, a]),
        [h, w] => Ok([1, h, w]),
        [d, h, w] => Ok([d, h, w]),
        _ => Err(format!("size `{s}` must be N, H,W or D,H,W")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn sample_2d() -> Sample {
        Sample {
            name: "s".into(),
            image: (0..12).map(|v| v as f32).collect(),
            mask: (0..12).map(|v| (v == 5) as u8).collect(),
            channels: 1,
            shape: [1, 3, 4],
            source: "s.png".into(),
            geometry: None,
        }
    }

    #[test]
    fn crop_pads_outside_with_zeros() {
        let p = crop(&sample_2d(), [0, -1, 2], [1, 2, 3]);
        assert_eq!(p.image, vec![0.0, 0.0, 0.0, 2.0, 3.0, 0.0]);
    }

    #[test]
    fn foreground_sampling_contains_foreground() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for _ in 0..20 {
            let p = sample(&sample_2d(), [1, 2, 2], 1.0, &mut rng).unwrap();
            assert!(p.mask.contains(&1));
        }
    }

    #[test]
    fn augmentation_keeps_image_and_mask_aligned() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let s = Sample {
            shape: [1, 3, 3],
            image: (0..9).map(|v| v as f32).collect(),
            mask: (0..9).map(|v| v as u8).collect(),
            ..sample_2d()
        };
        for _ in 0..10 {
            let mut p = crop(&s, [0, 0, 0], [1, 3, 3]);
            augment(&mut p, &mut rng);
            let img: Vec<u8> = p.image.iter().map(|&v| v as u8).collect();
            assert_eq!(img, p.mask);
            let mut sorted = p.mask.clone();
            sorted.sort();
            assert_eq!(sorted, (0..9).collect::<Vec<u8>>());
        }
    }

    #[test]
    fn one_hot_targets() {
        let p = Patch { image: vec![0.0; 2], mask: vec![2, 0], channels: 1, shape: [1, 1, 2] };
        let t: Tensor<4> = targets_tensor(&[&p], 3, &Device::flex());
        let v: Vec<f32> = t.into_data().iter::<f32>().collect();
        assert_eq!(v, vec![0.0, 1.0, 0.0, 0.0, 1.0, 0.0]);
    }
    #[test]
    fn centre_crop_follows_the_foreground() {
        // 1x4x6 image with foreground at (y, x) = (3, 5): a 2x2 crop ends at the corner.
        let mut mask = vec![0u8; 24];
        mask[3 * 6 + 5] = 1;
        let image: Vec<f32> = (0..24).map(|i| i as f32).collect();
        let s = Sample {
            name: "c".into(),
            image,
            mask,
            channels: 1,
            shape: [1, 4, 6],
            source: "c.png".into(),
            geometry: None,
        };
        let c = centre_crop(&s, [1, 2, 2]);
        assert_eq!(
            (c.shape, c.image.clone(), c.mask.clone()),
            ([1, 2, 2], vec![16.0, 17.0, 22.0, 23.0], vec![0, 0, 0, 1])
        );
        // Larger than the image: the whole image.
        assert_eq!(centre_crop(&s, [64, 64, 64]).image, s.image);
    }

    #[test]
    fn sizes_parse_as_documented() {
        assert_eq!(parse_size("96"), Ok([96, 96, 96]));
        assert_eq!(parse_size("96, 128"), Ok([1, 96, 128]));
        assert_eq!(parse_size("64,128,128"), Ok([64, 128, 128]));
        assert!(parse_size("1,2,3,4").unwrap_err().contains("N, H,W or D,H,W"));
        assert!(parse_size("x").unwrap_err().contains("bad size `x`"));
    }
}
