//! The on-disk preprocessed cache, for data sets larger than memory (as nnU-Net's
//! `nnUNet_preprocessed`): every case is read, LPS-oriented, normalised and resampled exactly
//! as [`crate::data::load`] + [`crate::data::volume::spacing::to_target`] do, once, and written
//! to one compressed file per case ([`format`]) that training reads by patch, so that training
//! never holds the data set in memory.
//!
//! Keys: the folder is named after the preprocessing settings ([`settings`]: the `DataConfig`,
//! the block sizes and the format version; a CRC-32 names the folder and the whole text is
//! compared), and each entry records its source files' size, modification time and a CRC-32 of
//! their first and last 64 KiB and 16 pieces of 4 KiB between ([`stamp`]). An entry whose
//! settings or sources differ, or that fails its checks (truncated, corrupted), is rebuilt; the
//! others are reused.
//!
//! Cropping, as nnU-Net crops to the non-zero region: the entry stores the bounding box of the
//! voxels that differ from the volume's first voxel (in any channel) or have a label, and that
//! first voxel's value for the rest; for a scan padded with zeros that is its non-zero region,
//! and a patch cut from the entry equals the one cut from the sample in memory, bit for bit.

pub mod format;
pub mod loader;
pub mod split;

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::patch::{Cut, Patch};
use super::{DataConfig, Pair, Sample};
use format::{CaseFile, Index, Stamp};

/// Bumped whenever what an entry holds or how it is laid out changes.
const VERSION: u32 = 1;
/// Blocks of 32³ voxels (128 KiB of f32 per channel) in 3D, 256² in 2D.
const BLOCK_3D: [usize; 3] = [32, 32, 32];
const BLOCK_2D: [usize; 3] = [1, 256, 256];
/// The folder under the data root that holds the default cache.
pub const DEFAULT_DIR: &str = ".unetpp_cache";

/// Where training reads its cases from (`train --cache DIR`, `--no-cache`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CacheChoice {
    /// The cache in `DATA/.unetpp_cache` (else the run directory) for 3D data sets that would
    /// take more than a quarter of the memory; memory otherwise.
    #[default]
    Auto,
    /// Every case in memory.
    Off,
    /// The cache under this folder, 2D or 3D, whatever the size.
    Dir(PathBuf),
}

/// The settings an entry depends on, as text: equal text, same preprocessing.
pub fn settings(cfg: &DataConfig) -> anyhow::Result<String> {
    let v = serde_json::json!({ "version": VERSION, "block_3d": BLOCK_3D, "block_2d": BLOCK_2D, "data": cfg });
    Ok(serde_json::to_string(&v)?)
}

/// The folder under `root` holding the entries made with `settings`.
pub fn key_dir(root: &Path, settings: &str) -> PathBuf {
    root.join(format!("{:08x}", crc32fast::hash(settings.as_bytes())))
}

/// A source file's size, modification time and a CRC-32 of its first and last 64 KiB and of 16
/// pieces of 4 KiB spread between: a file rewritten in place with the same size and time (rare:
/// most tools update the time) is caught where those pieces changed, without reading whole
/// data sets at every start.
pub fn stamp(path: &Path) -> anyhow::Result<Stamp> {
    use std::io::{Read, Seek, SeekFrom};
    let err = || format!("cannot read {}", path.display());
    let mut f = std::fs::File::open(path).with_context(err)?;
    let meta = f.metadata().with_context(err)?;
    let size = meta.len();
    let t = meta.modified().with_context(err)?;
    let (modified_s, modified_ns) = match t.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64, d.subsec_nanos()),
        Err(e) => (-(e.duration().as_secs() as i64), e.duration().subsec_nanos()),
    };
    const END: u64 = 64 << 10;
    const PIECE: u64 = 4 << 10;
    let mut pieces = vec![(0, END.min(size)), (size.saturating_sub(END), END.min(size))];
    pieces.extend((1..=16).map(|i| (size / 17 * i, PIECE.min(size - size / 17 * i))));
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![];
    for (at, len) in pieces {
        buf.resize(len as usize, 0);
        f.seek(SeekFrom::Start(at)).with_context(err)?;
        f.read_exact(&mut buf).with_context(err)?;
        h.update(&buf);
    }
    Ok(Stamp { path: path.to_path_buf(), size, modified_s, modified_ns, sampled_crc: h.finalize() })
}

/// The files a pair is read from.
fn sources(pair: &Pair) -> Vec<&Path> {
    let mut v: Vec<&Path> = vec![&pair.image];
    v.extend(pair.channels.iter().map(PathBuf::as_path).filter(|p| *p != pair.image));
    v.extend(pair.mask.as_deref());
    v
}

/// An entry's file name: the case name made safe, and a CRC-32 of its source paths (two
/// splits may hold cases of one name).
fn entry_name(pair: &Pair) -> String {
    let safe: String = pair
        .name
        .chars()
        .take(60)
        .map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' })
        .collect();
    let paths: Vec<String> = sources(pair).iter().map(|p| p.to_string_lossy().into_owned()).collect();
    format!("{safe}-{:08x}.case", crc32fast::hash(paths.join("\n").as_bytes()))
}

/// The box around everything that is not background, and the background value per channel
/// (the first voxel's): outside the box every voxel equals it and has no label.
pub fn crop_box(s: &Sample) -> ([usize; 3], [usize; 3], Vec<u32>) {
    let vox = s.voxels();
    let fill: Vec<u32> = (0..s.channels).map(|c| s.image.get(c * vox).map_or(0, |v| v.to_bits())).collect();
    let (mut lo, mut hi) = (s.shape, [0usize; 3]);
    for i in 0..vox {
        let labelled = s.mask.get(i).is_some_and(|&l| l > 0);
        if labelled || (0..s.channels).any(|c| s.image[c * vox + i].to_bits() != fill[c]) {
            let p = [i / (s.shape[1] * s.shape[2]), (i / s.shape[2]) % s.shape[1], i % s.shape[2]];
            for a in 0..3 {
                lo[a] = lo[a].min(p[a]);
                hi[a] = hi[a].max(p[a] + 1);
            }
        }
    }
    if hi.contains(&0) {
        return ([0; 3], [0; 3], fill);
    }
    (lo, std::array::from_fn(|a| hi[a] - lo[a]), fill)
}

/// The foreground's centroid as [`super::patch::centre_crop`] computes it.
fn centre(s: &Sample) -> [usize; 3] {
    let (mut sum, mut n) = ([0usize; 3], 0usize);
    for (i, _) in s.mask.iter().enumerate().filter(|(_, v)| **v > 0) {
        let p = [i / (s.shape[1] * s.shape[2]), (i / s.shape[2]) % s.shape[1], i % s.shape[2]];
        (0..3).for_each(|a| sum[a] += p[a]);
        n += 1;
    }
    if n == 0 { s.shape.map(|l| l / 2) } else { sum.map(|v| v / n) }
}

/// A case in the cache: patches are read from its file block by block.
#[derive(Clone, Debug)]
pub struct CachedCase {
    pub file: CaseFile,
}

impl CachedCase {
    pub fn name(&self) -> &str {
        &self.file.index.name
    }

    pub fn source(&self) -> &Path {
        &self.file.index.source
    }

    /// The whole preprocessed case, as [`crate::data::load`] (then resampling) gives it, without
    /// its geometry.
    pub fn load(&self) -> anyhow::Result<Sample> {
        let p = self.cut([0; 3], self.shape())?;
        Ok(self.sample(p))
    }

    /// What [`super::patch::centre_crop`] of the whole case gives, reading only that crop.
    pub fn centre_crop(&self, size: [usize; 3]) -> anyhow::Result<Sample> {
        let shape = self.shape();
        let size: [usize; 3] = std::array::from_fn(|a| size[a].min(shape[a]));
        let c = self.file.index.centre;
        let origin = std::array::from_fn(|a| (c[a].saturating_sub(size[a] / 2)).min(shape[a] - size[a]) as isize);
        let p = self.cut(origin, size)?;
        Ok(self.sample(p))
    }

    fn sample(&self, p: Patch) -> Sample {
        Sample {
            name: self.name().to_string(),
            image: p.image,
            mask: p.mask,
            channels: p.channels,
            shape: p.shape,
            source: self.source().to_path_buf(),
            geometry: None,
        }
    }
}

impl Cut for CachedCase {
    fn shape(&self) -> [usize; 3] {
        self.file.index.shape
    }

    fn foreground_count(&self) -> anyhow::Result<usize> {
        Ok(self.file.index.foreground as usize)
    }

    fn nth_foreground(&self, k: usize) -> anyhow::Result<usize> {
        self.file.foreground(&mut self.file.reader()?, k)
    }

    fn cut(&self, origin: [isize; 3], size: [usize; 3]) -> anyhow::Result<Patch> {
        let ix = &self.file.index;
        let (shape, ch) = (ix.shape, ix.channels);
        let n = size.iter().product::<usize>();
        let mut image = vec![0.0f32; n * ch];
        let mut mask = vec![0u8; if ix.has_mask { n } else { 0 }];
        // Patch voxels [from, to) along each axis that lie in `[start, end)` of the volume.
        let span = |a: usize, start: usize, end: usize| {
            let from = (start as isize - origin[a]).clamp(0, size[a] as isize) as usize;
            let to = (end as isize - origin[a]).clamp(0, size[a] as isize) as usize;
            (from, to)
        };
        let inside: [(usize, usize); 3] = std::array::from_fn(|a| span(a, 0, shape[a]));
        for c in 0..ch {
            let fill = f32::from_bits(ix.fill[c]);
            for z in inside[0].0..inside[0].1 {
                for y in inside[1].0..inside[1].1 {
                    let row = c * n + (z * size[1] + y) * size[2];
                    image[row + inside[2].0..row + inside[2].1].fill(fill);
                }
            }
        }
        let grid = ix.grid();
        // The blocks the patch overlaps.
        let blocks: [(usize, usize); 3] = std::array::from_fn(|a| {
            let lo = (origin[a].max(ix.origin[a] as isize) as usize).min(ix.origin[a] + ix.size[a]);
            let hi = ((origin[a] + size[a] as isize).max(0) as usize).min(ix.origin[a] + ix.size[a]);
            if lo >= hi {
                (0, 0)
            } else {
                ((lo - ix.origin[a]) / ix.block[a], (hi - 1 - ix.origin[a]) / ix.block[a] + 1)
            }
        });
        let mut f = None;
        for bz in blocks[0].0..blocks[0].1 {
            for by in blocks[1].0..blocks[1].1 {
                for bx in blocks[2].0..blocks[2].1 {
                    let f = match &mut f {
                        Some(f) => f,
                        None => f.insert(self.file.reader()?),
                    };
                    let (lo, hi) = ix.block_box([bz, by, bx]);
                    let bs: [usize; 3] = std::array::from_fn(|a| hi[a] - lo[a]);
                    let bn = bs.iter().product::<usize>();
                    let nb = (bz * grid[1] + by) * grid[2] + bx;
                    let values = self.file.image_block(f, nb, bn)?;
                    let labels = if ix.has_mask { self.file.mask_block(f, nb, bn)? } else { vec![] };
                    let r: [(usize, usize); 3] = std::array::from_fn(|a| span(a, lo[a], hi[a]));
                    let (x0, x1) = r[2];
                    if x0 >= x1 {
                        continue;
                    }
                    // Patch x0 is volume x = origin + x0, block column x - lo.
                    let bx0 = (origin[2] + x0 as isize) as usize - lo[2];
                    for z in r[0].0..r[0].1 {
                        let vz = (origin[0] + z as isize) as usize - lo[0];
                        for y in r[1].0..r[1].1 {
                            let vy = (origin[1] + y as isize) as usize - lo[1];
                            let src = (vz * bs[1] + vy) * bs[2] + bx0;
                            let dst = (z * size[1] + y) * size[2] + x0;
                            let w = x1 - x0;
                            for c in 0..ch {
                                image[c * n + dst..c * n + dst + w]
                                    .copy_from_slice(&values[c * bn + src..c * bn + src + w]);
                            }
                            if ix.has_mask {
                                mask[dst..dst + w].copy_from_slice(&labels[src..src + w]);
                            }
                        }
                    }
                }
            }
        }
        Ok(Patch { image, mask, channels: ch, shape: size })
    }
}

/// What [`prepare`] found and did.
#[derive(Debug, Default)]
pub struct Prepared {
    /// The usable cases, in the order of the pairs (bad ones left out with `skip_bad`).
    pub cases: Vec<CachedCase>,
    /// Names of the cases (re)built, and why each existing entry was not used.
    pub built: Vec<String>,
    pub rebuilt_because: Vec<String>,
    pub reused: usize,
}

/// Whether `path` is a whole entry made from `settings` and sources as they are now.
fn reusable(path: &Path, settings: &str, stamps: &[Stamp]) -> anyhow::Result<()> {
    let file = CaseFile::open(path)?;
    anyhow::ensure!(file.index.settings == settings, "made with other settings");
    anyhow::ensure!(file.index.sources == stamps, "its source files changed");
    file.verify()
}

fn build(pair: &Pair, cfg: &DataConfig, path: &Path, settings: &str, stamps: Vec<Stamp>) -> anyhow::Result<()> {
    let s = super::io::read_pair(pair, cfg)?;
    let s = super::volume::spacing::to_target(vec![s], cfg.spacing)?.remove(0);
    let (origin, size, fill) = crop_box(&s);
    let index = Index {
        settings: settings.to_string(),
        sources: stamps,
        name: s.name.clone(),
        source: s.source.clone(),
        channels: s.channels,
        shape: s.shape,
        origin,
        size,
        fill,
        has_mask: !s.mask.is_empty(),
        block: if s.shape[0] == 1 { BLOCK_2D } else { BLOCK_3D },
        image: vec![],
        mask: vec![],
        foreground: s.mask.iter().filter(|&&v| v > 0).count() as u64,
        fg_chunks: vec![],
        centre: centre(&s),
    };
    format::write(path, &s, index)
}

/// Removes the temporary files of builds killed before their rename (`.tmp-PID-...` of a
/// process that no longer runs; another trainer's files are left alone).
fn remove_orphans(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let pid = name.strip_prefix(".tmp-").and_then(|r| r.split('-').next()).and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid
            && pid != std::process::id()
            && cfg!(target_os = "linux")
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Cases built at once: each is held whole while it is preprocessed, so this bounds memory.
fn parallel_builds() -> usize {
    rayon::current_num_threads().clamp(1, 4)
}

/// Brings the entries of `pairs` in `dir` (a [`key_dir`]) up to date and opens them: reused
/// where whole and made from the same settings and sources, (re)built otherwise. With
/// `skip_bad`, a pair that cannot be read is reported and left out, as `data::load` does.
pub fn prepare(pairs: &[Pair], cfg: &DataConfig, dir: &Path, skip_bad: bool) -> anyhow::Result<Prepared> {
    use rayon::prelude::*;
    let settings = settings(cfg)?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create the cache folder {}", dir.display()))?;
    remove_orphans(dir);
    let mut out = Prepared::default();
    // Entries are checked or built first and opened after: an index kept from each case as it is
    // built would sit between the large buffers of the next ones, and with freed memory kept in
    // the process (`backend::keep_freed_memory`) the heap then grew by a case's size per case.
    let mut ready = vec![];
    for group in pairs.chunks(parallel_builds()) {
        let results: Vec<_> = group
            .par_iter()
            .map(|pair| -> anyhow::Result<Option<String>> {
                let stamps = sources(pair).into_iter().map(stamp).collect::<anyhow::Result<Vec<_>>>()?;
                let path = dir.join(entry_name(pair));
                let why = if path.exists() {
                    match reusable(&path, &settings, &stamps) {
                        Ok(()) => return Ok(None),
                        Err(e) => format!("{}: {e:#}", pair.name),
                    }
                } else {
                    String::new()
                };
                build(pair, cfg, &path, &settings, stamps)?;
                Ok(Some(why))
            })
            .collect();
        for (pair, res) in group.iter().zip(results) {
            match res {
                Ok(None) => out.reused += 1,
                Ok(Some(why)) => {
                    out.built.push(pair.name.clone());
                    if !why.is_empty() {
                        out.rebuilt_because.push(why);
                    }
                }
                Err(e) if skip_bad => {
                    eprintln!("skipping {}: {e:#}", pair.image.display());
                    continue;
                }
                Err(e) => return Err(e),
            }
            ready.push(dir.join(entry_name(pair)));
        }
    }
    for path in ready {
        out.cases.push(CachedCase { file: CaseFile::open(&path)? });
    }
    anyhow::ensure!(!out.cases.is_empty(), "no usable image/mask pairs for the cache in {}", dir.display());
    Ok(out)
}

/// Patches of a cached case equal those of the same sample in memory (the loader's contract).
pub fn same_patch(a: &impl Cut, b: &impl Cut, origin: [isize; 3], size: [usize; 3]) -> anyhow::Result<bool> {
    let (p, q) = (a.cut(origin, size)?, b.cut(origin, size)?);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    Ok(p.shape == q.shape && p.mask == q.mask && bits(&p.image) == bits(&q.image))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(shape: [usize; 3], channels: usize) -> Sample {
        let vox = shape.iter().product::<usize>();
        let mut image = vec![-0.5f32; vox * channels];
        let mut mask = vec![0u8; vox];
        // A body in [2..5, 3..9, 1..40] with labels inside.
        for z in 2..5 {
            for y in 3..9 {
                for x in 1..40 {
                    let i = (z * shape[1] + y) * shape[2] + x;
                    (0..channels).for_each(|c| image[c * vox + i] = (i * (c + 2)) as f32 * 0.25);
                    mask[i] = ((x + y) % 7 == 0) as u8 * 2;
                }
            }
        }
        Sample { name: "a b".into(), image, mask, channels, shape, source: "a.nii".into(), geometry: None }
    }

    #[test]
    fn cut_equals_crop_everywhere() {
        let dir = tempfile::tempdir().unwrap();
        let s = sample([6, 12, 45], 2);
        let (origin, size, fill) = crop_box(&s);
        assert_eq!((origin, size, fill[0]), ([2, 3, 1], [3, 6, 39], (-0.5f32).to_bits()));
        let index = Index {
            settings: "t".into(),
            sources: vec![],
            name: s.name.clone(),
            source: s.source.clone(),
            channels: 2,
            shape: s.shape,
            origin,
            size,
            fill,
            has_mask: true,
            block: [2, 4, 16],
            image: vec![],
            mask: vec![],
            foreground: s.mask.iter().filter(|&&v| v > 0).count() as u64,
            fg_chunks: vec![],
            centre: centre(&s),
        };
        let path = dir.path().join("a.case");
        format::write(&path, &s, index).unwrap();
        let case = CachedCase { file: CaseFile::open(&path).unwrap() };
        case.file.verify().unwrap();
        for origin in [[0, 0, 0], [-3, -5, -20], [1, 2, 3], [4, 10, 30], [5, 11, 44], [-1, 4, 17]] {
            for size in [[1, 1, 1], [3, 5, 17], [8, 16, 64], [1, 12, 45]] {
                assert!(same_patch(&s, &case, origin, size).unwrap(), "{origin:?} {size:?}");
            }
        }
        let fg = s.foreground_count().unwrap();
        assert_eq!(case.foreground_count().unwrap(), fg);
        for k in [0, 1, fg / 2, fg - 1] {
            assert_eq!(case.nth_foreground(k).unwrap(), s.nth_foreground(k).unwrap());
        }
        let want = crate::data::patch::centre_crop(&s, [4, 4, 4]);
        let got = case.centre_crop([4, 4, 4]).unwrap();
        assert_eq!((got.image, got.mask, got.shape), (want.image, want.mask, want.shape));
    }
}
