//! `unetpp synth nodules`: a reproducible lung-nodule benchmark in nnU-Net's layout, made by
//! placing synthetic nodules ([`super::shape`]) in the lungs of real CT volumes, plus the real
//! nodule of the held-out volume. docs/nodules.md describes every choice and its source.
//!
//! Splits: training cases come from the chest CT and the lung volume that is not held out;
//! synthetic test cases from the held-out lung volume, and its real nodule goes to `real/`, so
//! a model trained on `imagesTr` never saw the volume of any case it is tested on.
//!
//! A nodule is rendered on the source grid (each voxel's covered fraction, supersampled, sets
//! its partial-volume blend, and noise of the local CT's level is added where it covers), then
//! the case is resampled to the target spacing like the real cases; its mask is drawn on the
//! target grid (voxels at least half covered).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail, ensure};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde::Serialize;
use serde_json::json;

use super::grid::{Grid, WINDOW};
use super::lung;
use super::shape::{GLASS, Kind, Nodule, OUTSIDE, SOLID, normal};
use crate::data::volume::orient::{Frame, Orientation};
use crate::data::volume::spacing::Spacing;
use crate::data::volume::{self, Geometry};

pub const DEFAULT_CASES: usize = 120;
pub const DEFAULT_TEST_CASES: usize = 24;
/// The target spacing when `--spacing` is not given: isotropic, as the paper's LIDC crops.
pub const DEFAULT_SPACING_MM: f64 = 1.0;
/// How far a juxtapleural nodule may reach beyond the lung mask (mm): it abuts the chest wall.
pub const PLEURA_MM: f64 = 2.0;
/// Largest shift of a nodule from its window's centre, per axis (mm).
const OFFSET_MM: f64 = 8.0;
/// Vessels: lung voxels denser than this (HU).
const VESSEL_HU: f32 = -500.0;

/// Which lung volume feeds the test split (and whose real nodule is the real test case).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Holdout {
    #[default]
    Lung1,
    Lung2,
}

crate::names::by_name!(Holdout, "--holdout");

impl Holdout {
    pub const VALUES: &[Holdout] = &[Holdout::Lung1, Holdout::Lung2];

    pub fn name(self) -> &'static str {
        match self {
            Holdout::Lung1 => "lung1",
            Holdout::Lung2 => "lung2",
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct Options {
    pub out: PathBuf,
    /// Default 0.
    pub seed: Option<u64>,
    /// Training cases; default [`DEFAULT_CASES`].
    pub cases: Option<usize>,
    /// Synthetic test cases; default [`DEFAULT_TEST_CASES`].
    pub test_cases: Option<usize>,
    /// Default lung1.
    pub holdout: Option<Holdout>,
    /// Default [`DEFAULT_SPACING_MM`] along every axis.
    pub spacing: Option<Spacing>,
    /// The folder holding `lesions-pyradiomics/` and `chest-ct-slicerio/`; default the
    /// project's `../shared/data`.
    pub sources: Option<PathBuf>,
    /// Share of the synthetic cases (training and test alike) that hold a mass instead of a
    /// nodule, 0..=1; default 0 (LIDC's nodules only).
    pub masses: Option<f64>,
}

/// Where a nodule sits in the lung.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Placement {
    Inside,
    Pleura,
    Vessel,
}

/// One case of the manifest (`nodules.json`).
#[derive(Clone, Debug, Serialize)]
pub struct Record {
    pub case: String,
    pub split: &'static str,
    pub volume: &'static str,
    pub placement: Option<Placement>,
    /// The nodule's centre (synthetic) or the label's centroid (real), LPS world mm.
    pub centre_lps_mm: [f64; 3],
    pub nodule: Option<Nodule>,
    pub noise_sd_hu: Option<f64>,
    pub mask_voxels: usize,
    /// The diameter of the sphere of the mask's volume.
    pub mask_diameter_mm: f64,
}

/// A source CT with what placement needs.
struct Source {
    name: &'static str,
    ct: Vec<f32>,
    shape: [usize; 3],
    /// `[z, y, x]` mm.
    spacing: [f64; 3],
    geometry: Geometry,
    lung: Vec<bool>,
    /// The lung mask dilated by [`PLEURA_MM`]: nodules are clipped to it.
    near_lung: Vec<bool>,
    /// Distance (mm) to the nearest voxel outside the lung, and to the nearest vessel.
    to_wall: Vec<f32>,
    to_vessel: Vec<f32>,
    lung_voxels: Vec<u32>,
    /// The real lesion's label, if the volume has one, and its array-mm bounding box.
    lesion: Option<(Vec<u8>, [f64; 3], [f64; 3])>,
}

fn default_sources() -> PathBuf {
    let local = Path::new("../shared/data");
    if local.is_dir() { local.into() } else { Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data") }
}

fn read(path: &Path) -> anyhow::Result<volume::Volume> {
    ensure!(
        path.is_file(),
        "{}: not found (--sources must hold lesions-pyradiomics/ and chest-ct-slicerio/)",
        path.display()
    );
    let v = volume::read(path)?;
    ensure!(v.channels == 1, "{}: {} channels, a CT has 1", path.display(), v.channels);
    Ok(v)
}

impl Source {
    fn load(root: &Path, name: &'static str) -> anyhow::Result<Source> {
        let (image, label_path) = match name {
            "chest" => (root.join("chest-ct-slicerio/image.nii.gz"), root.join("chest-ct-slicerio/labels.nii.gz")),
            _ => (
                root.join(format!("lesions-pyradiomics/images/{name}.nii.gz")),
                root.join(format!("lesions-pyradiomics/labels/{name}.nii.gz")),
            ),
        };
        let ct = read(&image)?;
        let labels = read(&label_path)?;
        ensure!(
            labels.shape == ct.shape,
            "{}: shape {:?}, its image's is {:?}",
            label_path.display(),
            labels.shape,
            ct.shape
        );
        let spacing = Spacing(ct.geometry.spacing).zyx();
        let (lung, lesion) = if name == "chest" {
            // slicerio's labels: 5 right lung, 6 left lung.
            (labels.data.iter().map(|&l| l == 5.0 || l == 6.0).collect::<Vec<_>>(), None)
        } else {
            let lesion: Vec<u8> = labels.data.iter().map(|&l| (l > 0.0) as u8).collect();
            (lung::mask(&ct.data, ct.shape, spacing), Some(lesion))
        };
        ensure!(lung.iter().any(|&l| l), "{}: no lung found", image.display());
        Source::new(name, ct.data, ct.shape, ct.geometry, lung, lesion)
    }

    /// A source from its CT (HU), geometry, lung mask and real lesion label, if any.
    fn new(
        name: &'static str,
        ct: Vec<f32>,
        shape: [usize; 3],
        geometry: Geometry,
        lung: Vec<bool>,
        lesion: Option<Vec<u8>>,
    ) -> anyhow::Result<Source> {
        let (spacing, n) = (Spacing(geometry.spacing).zyx(), ct.len());
        let lesion = match lesion {
            Some(l) => {
                let (lo, hi) = bbox_mm(&l, shape, spacing).with_context(|| format!("{name}: empty lesion label"))?;
                Some((l, lo, hi))
            }
            None => None,
        };
        let near_lung = lung::dilate(&lung, shape, spacing, PLEURA_MM);
        let outside: Vec<bool> = lung.iter().map(|&l| !l).collect();
        let vessel: Vec<bool> = (0..n).map(|i| lung[i] && ct[i] > VESSEL_HU).collect();
        let dist =
            |f: &[bool]| crate::metrics::edt::squared(f, shape, spacing).iter().map(|d| d.sqrt() as f32).collect();
        let (to_wall, to_vessel): (Vec<f32>, Vec<f32>) = (dist(&outside), dist(&vessel));
        let lung_voxels: Vec<u32> =
            (0..n as u32).filter(|&i| lung[i as usize] && ct[i as usize] <= VESSEL_HU).collect();
        ensure!(!lung_voxels.is_empty(), "{name}: no air-like lung voxels to place nodules in");
        Ok(Source { name, ct, shape, spacing, geometry, lung, near_lung, to_wall, to_vessel, lung_voxels, lesion })
    }

    fn index(&self, z: usize, y: usize, x: usize) -> usize {
        (z * self.shape[1] + y) * self.shape[2] + x
    }

    /// The voxel holding array-mm point `p`, if inside the volume.
    fn voxel_at(&self, p: [f64; 3]) -> Option<usize> {
        let mut i = [0; 3];
        for a in 0..3 {
            let v = (p[a] / self.spacing[a]).round();
            if v < 0.0 || v >= self.shape[a] as f64 {
                return None;
            }
            i[a] = v as usize;
        }
        Some(self.index(i[0], i[1], i[2]))
    }

    fn world(&self, p: [f64; 3]) -> [f64; 3] {
        self.geometry.index_to_world([p[2] / self.spacing[2], p[1] / self.spacing[1], p[0] / self.spacing[0]])
    }
}

/// The array-mm bounding box of a non-empty mask.
fn bbox_mm(m: &[u8], shape: [usize; 3], spacing: [f64; 3]) -> Option<([f64; 3], [f64; 3])> {
    let (mut lo, mut hi) = ([f64::MAX; 3], [f64::MIN; 3]);
    for (i, _) in m.iter().enumerate().filter(|(_, v)| **v > 0) {
        let idx = [i / (shape[1] * shape[2]), i / shape[2] % shape[1], i % shape[2]];
        for a in 0..3 {
            lo[a] = lo[a].min(idx[a] as f64 * spacing[a]);
            hi[a] = hi[a].max(idx[a] as f64 * spacing[a]);
        }
    }
    (lo[0] <= hi[0]).then_some((lo, hi))
}

/// A case's image (HU, rounded to int16), mask and window geometry.
struct Case {
    image: Vec<i16>,
    mask: Vec<u8>,
    geometry: Geometry,
    record: Record,
}

/// The robust noise level of the lung voxels of a region: the spread of each voxel's difference
/// from the mean of its 6 neighbours (median absolute deviation), scaled to a voxel's own
/// standard deviation for white noise.
fn noise_sd(src: &Source, lo: [usize; 3], hi: [usize; 3]) -> f64 {
    let mut r = vec![];
    for z in lo[0].max(1)..hi[0].min(src.shape[0] - 1) {
        for y in lo[1].max(1)..hi[1].min(src.shape[1] - 1) {
            for x in lo[2].max(1)..hi[2].min(src.shape[2] - 1) {
                let i = src.index(z, y, x);
                if !src.lung[i] || src.ct[i] > VESSEL_HU {
                    continue;
                }
                let nb = [src.index(z - 1, y, x), src.index(z + 1, y, x), src.index(z, y - 1, x)];
                let nb2 = [src.index(z, y + 1, x), src.index(z, y, x - 1), src.index(z, y, x + 1)];
                let mean = nb.iter().chain(&nb2).map(|&j| src.ct[j] as f64).sum::<f64>() / 6.0;
                r.push(src.ct[i] as f64 - mean);
            }
        }
    }
    if r.len() < 50 {
        return 20.0;
    }
    let med = crate::metrics::distance::quantile(&r, 0.5);
    let mut dev: Vec<f64> = r.iter().map(|v| (v - med).abs()).collect();
    dev.sort_by(f64::total_cmp);
    1.4826 * dev[dev.len() / 2] / (7.0f64 / 6.0).sqrt()
}

/// Draws a voxel where a nodule of radius `r` sits as `placement` says, if one is found.
fn place(src: &Source, r: f64, placement: Placement, rng: &mut StdRng) -> Option<usize> {
    let slack = 0.5 * src.spacing.iter().copied().fold(f64::MAX, f64::min);
    for _ in 0..4000 {
        let i = src.lung_voxels[rng.random_range(0..src.lung_voxels.len())] as usize;
        let (wall, vessel) = (src.to_wall[i] as f64, src.to_vessel[i] as f64);
        let ok = match placement {
            Placement::Inside => wall >= r + 1.0,
            Placement::Pleura => (0.4 * r..=r + slack).contains(&wall),
            Placement::Vessel => wall >= r && (0.5 * r..=r + slack).contains(&vessel),
        };
        if ok {
            return Some(i);
        }
    }
    None
}

/// One synthetic case from `src` (module doc).
fn synthetic(
    src: &Source,
    target: [f64; 3],
    name: String,
    split: &'static str,
    seed: u64,
    masses: f64,
) -> anyhow::Result<Case> {
    let mut rng = StdRng::seed_from_u64(seed);
    // Drawn only when asked for, so that without masses every seed keeps its files.
    let kind = if masses > 0.0 && rng.random_range(0.0..1.0) < masses { Kind::Mass } else { Kind::Nodule };
    for _ in 0..200 {
        let nodule = Nodule::draw(&mut rng, kind);
        let r = nodule.diameter_mm / 2.0;
        let placement = match rng.random_range(0.0..1.0) {
            p if p < 0.60 => Placement::Inside,
            p if p < 0.85 => Placement::Pleura,
            _ => Placement::Vessel,
        };
        let Some(v) = place(src, r, placement, &mut rng) else { continue };
        let idx = [v / (src.shape[1] * src.shape[2]), v / src.shape[2] % src.shape[1], v % src.shape[2]];
        let centre: [f64; 3] = std::array::from_fn(|a| (idx[a] as f64 + rng.random_range(-0.5..0.5)) * src.spacing[a]);
        let ext = nodule.extent_mm();
        let off =
            (WINDOW as f64 / 2.0 * target.iter().copied().fold(f64::MAX, f64::min) - ext - 2.0).clamp(0.0, OFFSET_MM);
        let aim: [f64; 3] = std::array::from_fn(|a| centre[a] + rng.random_range(-off..=off));
        let grid = Grid::around(src.shape, src.spacing, aim, target, src.name)?;
        let (lo, hi) = (centre.map(|c| c - ext), centre.map(|c| c + ext));
        if !grid.holds(lo, hi, 1.0) {
            continue;
        }
        if let Some((_, llo, lhi)) = &src.lesion {
            // Keep the real lesion (and 5 mm around it) out of every synthetic window.
            let overlaps = (0..3).all(|a| {
                llo[a] - 5.0 <= grid.position(a, WINDOW as f64 - 0.5) && lhi[a] + 5.0 >= grid.position(a, -0.5)
            });
            if overlaps {
                continue;
            }
        }
        let noise = noise_sd(src, grid.region().0, std::array::from_fn(|a| grid.region().0[a] + grid.region().1[a]));
        let region = render(src, &grid, &nodule, centre, noise, &mut rng);
        let image = grid.resample_image(&region)?;
        let mask = mask(src, &grid, &nodule, centre);
        let voxels = mask.iter().filter(|&&m| m > 0).count();
        if voxels == 0 {
            continue;
        }
        let e = grid.voxel_mm();
        let record = Record {
            case: name,
            split,
            volume: src.name,
            placement: Some(placement),
            centre_lps_mm: src.world(centre),
            nodule: Some(nodule),
            noise_sd_hu: Some(noise),
            mask_voxels: voxels,
            mask_diameter_mm: sphere_diameter(voxels as f64 * e[0] * e[1] * e[2]),
        };
        let image = image.iter().map(|&v| v.round().clamp(i16::MIN as f32, i16::MAX as f32) as i16).collect();
        return Ok(Case { image, mask, geometry: grid.geometry(&src.geometry), record });
    }
    bail!("{}: found no place for a nodule in 200 draws; is the lung mask empty or tiny?", src.name)
}

pub fn sphere_diameter(volume_mm3: f64) -> f64 {
    (6.0 * volume_mm3 / std::f64::consts::PI).cbrt()
}

/// The source region of `grid` with the nodule blended in: each source voxel near it is
/// supersampled (about 0.4 mm apart, at most 12 per axis); the covered fractions of ground glass
/// and solid tissue raise the voxel towards their attenuation (never lower it: a vessel or the
/// chest wall stays as dense as it was), and noise of the local level is added in proportion.
fn render(src: &Source, grid: &Grid, n: &Nodule, centre: [f64; 3], noise: f64, rng: &mut StdRng) -> Vec<f32> {
    let (r0, size) = grid.region();
    let mut region = grid.cut(&src.ct, src.shape);
    let ext = n.extent_mm();
    let k: [usize; 3] = std::array::from_fn(|a| ((src.spacing[a] / 0.4).ceil() as usize).clamp(1, 12));
    let lo: [usize; 3] =
        std::array::from_fn(|a| (((centre[a] - ext) / src.spacing[a]).floor().max(r0[a] as f64)) as usize);
    let hi: [usize; 3] =
        std::array::from_fn(|a| (((centre[a] + ext) / src.spacing[a]).ceil() as usize + 1).min(r0[a] + size[a]));
    let total = (k[0] * k[1] * k[2]) as f64;
    for z in lo[0]..hi[0] {
        for y in lo[1]..hi[1] {
            for x in lo[2]..hi[2] {
                if !src.near_lung[src.index(z, y, x)] {
                    continue;
                }
                let (mut glass, mut solid) = (0usize, 0usize);
                let idx = [z, y, x];
                for i in 0..k[0] {
                    for j in 0..k[1] {
                        for l in 0..k[2] {
                            let sub = [i, j, l];
                            let p: [f64; 3] = std::array::from_fn(|a| {
                                (idx[a] as f64 + (sub[a] as f64 + 0.5) / k[a] as f64 - 0.5) * src.spacing[a] - centre[a]
                            });
                            match n.occupancy(p) {
                                GLASS => glass += 1,
                                SOLID => solid += 1,
                                _ => {}
                            }
                        }
                    }
                }
                if glass + solid == 0 {
                    continue;
                }
                let (cg, cs) = (glass as f64 / total, solid as f64 / total);
                let o = ((z - r0[0]) * size[1] + (y - r0[1])) * size[2] + (x - r0[2]);
                let bg = region[o] as f64;
                let v = bg
                    + cg * (n.hu_glass - bg).max(0.0)
                    + cs * (n.hu_solid - bg).max(0.0)
                    + (cg + cs) * noise * normal(rng);
                region[o] = v as f32;
            }
        }
    }
    region
}

/// The case's mask on the window: voxels whose 3x3x3 sub-samples are at least half (14 of 27)
/// inside the nodule and near the lung.
fn mask(src: &Source, grid: &Grid, n: &Nodule, centre: [f64; 3]) -> Vec<u8> {
    let mut m = vec![0u8; WINDOW.pow(3)];
    let e = grid.voxel_mm();
    let ext = n.extent_mm();
    let range = |a: usize| {
        let j0 = grid.position(a, 0.0);
        let lo = (((centre[a] - ext - j0) / e[a]).floor().max(0.0)) as usize;
        let hi = ((((centre[a] + ext - j0) / e[a]).ceil() + 1.0).max(0.0) as usize).min(WINDOW);
        lo..hi
    };
    for z in range(0) {
        for y in range(1) {
            for x in range(2) {
                let idx = [z, y, x];
                let mut inside = 0;
                for s in 0..27 {
                    let sub = [s / 9, s / 3 % 3, s % 3];
                    let p: [f64; 3] =
                        std::array::from_fn(|a| grid.position(a, idx[a] as f64 + (sub[a] as f64 - 1.0) / 3.0));
                    let near = src.voxel_at(p).is_some_and(|v| src.near_lung[v]);
                    if near && n.occupancy(std::array::from_fn(|a| p[a] - centre[a])) != OUTSIDE {
                        inside += 1;
                    }
                }
                m[(z * WINDOW + y) * WINDOW + x] = (inside >= 14) as u8;
            }
        }
    }
    m
}

/// The real nodule of a lung volume: a window centred on its label's centroid, image and label
/// resampled alike.
fn real(src: &Source, target: [f64; 3]) -> anyhow::Result<Case> {
    let (lesion, _, _) = src.lesion.as_ref().context("no real lesion")?;
    let (mut sum, mut count) = ([0.0; 3], 0usize);
    for (i, _) in lesion.iter().enumerate().filter(|(_, v)| **v > 0) {
        let idx = [i / (src.shape[1] * src.shape[2]), i / src.shape[2] % src.shape[1], i % src.shape[2]];
        (0..3).for_each(|a| sum[a] += idx[a] as f64 * src.spacing[a]);
        count += 1;
    }
    let centre = sum.map(|s| s / count as f64);
    let grid = Grid::around(src.shape, src.spacing, centre, target, src.name)?;
    let image = grid.resample_image(&grid.cut(&src.ct, src.shape))?;
    let mask = grid.resample_labels(&grid.cut(lesion, src.shape))?;
    let voxels = mask.iter().filter(|&&m| m > 0).count();
    let e = grid.voxel_mm();
    let record = Record {
        case: format!("real_{}", src.name),
        split: "real",
        volume: src.name,
        placement: None,
        centre_lps_mm: src.world(centre),
        nodule: None,
        noise_sd_hu: None,
        mask_voxels: voxels,
        mask_diameter_mm: sphere_diameter(voxels as f64 * e[0] * e[1] * e[2]),
    };
    let image = image.iter().map(|&v| v.round().clamp(i16::MIN as f32, i16::MAX as f32) as i16).collect();
    Ok(Case { image, mask, geometry: grid.geometry(&src.geometry), record })
}

/// A seed per case from the run's seed and the case's place, so that cases can be made in any
/// order (SplitMix64's finaliser).
fn case_seed(seed: u64, split: u64, i: usize) -> u64 {
    let mut z = seed ^ split.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (i as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn write_case(root: &Path, images: &str, labels: &str, c: &Case) -> anyhow::Result<()> {
    let frame = Frame { file: c.geometry, file_shape: [WINDOW; 3], orientation: Orientation::IDENTITY };
    let header = volume::write::header_for(&frame);
    let name = &c.record.case;
    use crate::data::io::write_nifti_header;
    write_nifti_header(&root.join(images).join(format!("{name}_0000.nii.gz")), &c.image, [WINDOW; 3], header.clone())?;
    write_nifti_header(&root.join(labels).join(format!("{name}.nii.gz")), &c.mask, [WINDOW; 3], header)
}

fn dataset_json(name: &str, training: usize, description: String) -> anyhow::Result<Vec<u8>> {
    let j = json!({
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, "nodule": 1},
        "numTraining": training,
        "file_ending": ".nii.gz",
        "name": name,
        "description": description,
    });
    Ok(serde_json::to_vec_pretty(&j)?)
}

/// What [`generate`] made.
pub struct Summary {
    pub records: Vec<Record>,
    pub train_volumes: Vec<&'static str>,
    pub test_volume: &'static str,
}

/// Writes the benchmark into `o.out` (module doc); refuses an `--out` that exists and is not
/// empty, or that lies inside the sources.
pub fn generate(o: &Options) -> anyhow::Result<Summary> {
    let sources = o.sources.clone().unwrap_or_else(default_sources);
    ensure!(sources.is_dir(), "--sources {}: not a folder", sources.display());
    let spacing = o.spacing.unwrap_or(Spacing([DEFAULT_SPACING_MM; 3]));
    spacing.check().map_err(anyhow::Error::msg)?;
    let seed = o.seed.unwrap_or(0);
    let (cases, test_cases) = (o.cases.unwrap_or(DEFAULT_CASES), o.test_cases.unwrap_or(DEFAULT_TEST_CASES));
    ensure!(cases >= 1, "--cases must be at least 1");
    ensure!(test_cases >= 1, "--test-cases must be at least 1");
    let masses = o.masses.unwrap_or(0.0);
    ensure!((0.0..=1.0).contains(&masses), "--masses {masses}: must be a share between 0 and 1");
    if o.out.exists() {
        let mut entries =
            std::fs::read_dir(&o.out).with_context(|| format!("--out {}: not a folder", o.out.display()))?;
        ensure!(entries.next().is_none(), "--out {}: exists and is not empty; choose a new folder", o.out.display());
    }
    let (out_abs, src_abs) = (crate::output::resolve(&o.out), crate::output::resolve(&sources));
    ensure!(!out_abs.starts_with(&src_abs), "--out {} lies inside --sources {}", o.out.display(), sources.display());
    let holdout = o.holdout.unwrap_or_default();
    let test_volume = holdout.name();
    let train_volumes = vec!["chest", if holdout == Holdout::Lung1 { "lung2" } else { "lung1" }];
    let train: Vec<Source> = train_volumes.iter().map(|n| Source::load(&sources, n)).collect::<anyhow::Result<_>>()?;
    let test = Source::load(&sources, test_volume)?;
    std::fs::create_dir_all(&o.out).with_context(|| format!("cannot create --out {}", o.out.display()))?;

    let target = spacing.zyx();

    let mut jobs: Vec<(&Source, String, &'static str, u64)> = vec![];
    for i in 0..cases {
        let s = &train[i % train.len()];
        jobs.push((s, format!("tr{i:03}_{}", s.name), "train", case_seed(seed, 1, i)));
    }
    for i in 0..test_cases {
        jobs.push((&test, format!("ts{i:03}_{}", test.name), "test", case_seed(seed, 2, i)));
    }
    for d in ["imagesTr", "labelsTr", "imagesTs", "labelsTs", "real/imagesTs", "real/labelsTs"] {
        std::fs::create_dir_all(o.out.join(d))?;
    }
    let made: Vec<Record> = jobs
        .par_iter()
        .map(|(s, name, split, seed)| {
            let c = synthetic(s, target, name.clone(), split, *seed, masses)?;
            let (images, labels) = if *split == "train" { ("imagesTr", "labelsTr") } else { ("imagesTs", "labelsTs") };
            write_case(&o.out, images, labels, &c)?;
            Ok(c.record)
        })
        .collect::<anyhow::Result<_>>()?;
    let r = real(&test, target)?;
    write_case(&o.out.join("real"), "imagesTs", "labelsTs", &r)?;
    let mut records = made;
    records.push(r.record);

    let what = format!(
        "synthetic lung nodules (unetpp synth nodules --seed {} --holdout {test_volume} --spacing {spacing}{}): \
         training cases from {}, test cases from {test_volume}",
        seed,
        if masses > 0.0 { format!(" --masses {masses}") } else { String::new() },
        train_volumes.join(" and ")
    );
    let fsio = crate::fsio::write_atomic;
    fsio(&o.out.join("dataset.json"), &dataset_json("SynthNodules", cases, what)?)?;
    let real_what = format!("the real nodule of {test_volume} (pyradiomics), resampled to {spacing} mm");
    fsio(&o.out.join("real/dataset.json"), &dataset_json("RealNodule", 0, real_what)?)?;
    let manifest = json!({
        "seed": seed,
        "holdout": test_volume,
        "spacing_mm": spacing.0,
        "masses": masses,
        "train_volumes": train_volumes,
        "test_volume": test_volume,
        "cases": records,
    });
    fsio(&o.out.join("nodules.json"), &serde_json::to_vec_pretty(&manifest)?)?;
    Ok(Summary { records, train_volumes, test_volume })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::shape::Density;

    /// Lung (-850 HU, noise sd 15) in a box of chest wall (40 HU) at 0.7 mm.
    fn phantom() -> Source {
        let (n, wall) = (100usize, 8usize);
        let mut rng = StdRng::seed_from_u64(3);
        let mut ct = vec![40.0f32; n * n * n];
        let mut lung = vec![false; n * n * n];
        for z in wall..n - wall {
            for y in wall..n - wall {
                for x in wall..n - wall {
                    let i = (z * n + y) * n + x;
                    ct[i] = (-850.0 + 15.0 * normal(&mut rng)) as f32;
                    lung[i] = true;
                }
            }
        }
        let geometry = Geometry { spacing: [0.7; 3], ..Geometry::default() };
        Source::new("phantom", ct, [n; 3], geometry, lung, None).unwrap()
    }

    /// Nodules rendered at a fine spacing keep their drawn attenuation inside (the median of the
    /// mask's interior voxels within 40 HU of it), the noise estimate finds the phantom's 15 HU,
    /// and the mask measures the drawn diameter.
    #[test]
    fn rendered_nodules_have_their_density_size_and_noise() {
        let src = phantom();
        let mut solid = 0;
        for seed in 0..16 {
            let c = synthetic(&src, [0.7; 3], format!("c{seed}"), "train", seed, 0.0).unwrap();
            let r = &c.record;
            let n = r.nodule.as_ref().unwrap();
            assert!((r.noise_sd_hu.unwrap() - 15.0).abs() < 3.0, "noise {:?}", r.noise_sd_hu);
            let w = WINDOW;
            let interior: Vec<f64> = (0..w.pow(3))
                .filter(|&i| {
                    let (z, y, x) = (i / (w * w), i / w % w, i % w);
                    [z, y, x].iter().all(|&v| v >= 2 && v < w - 2)
                        && [1, w, w * w]
                            .iter()
                            .all(|&d| (0..=2).all(|k| c.mask[i - k * d] > 0 && c.mask[i + k * d] > 0))
                })
                .map(|i| c.image[i] as f64)
                .collect();
            if interior.len() < 20 || r.placement != Some(Placement::Inside) {
                continue;
            }
            let median = crate::metrics::distance::quantile(&interior, 0.5);
            let want = match n.density {
                Density::Solid => {
                    solid += 1;
                    n.hu_solid
                }
                Density::GroundGlass => n.hu_glass,
                Density::PartSolid => continue,
            };
            assert!((median - want).abs() < 40.0, "{:?}: median {median} HU, drawn {want}", n.density);
            if n.form != crate::synth::shape::Form::Spiculated {
                let ratio = r.mask_diameter_mm / n.diameter_mm;
                assert!((0.9..1.1).contains(&ratio), "mask {} mm, drawn {} mm", r.mask_diameter_mm, n.diameter_mm);
            }
        }
        assert!(solid >= 3, "only {solid} solid nodules checked");
    }
}
