//! One preprocessed case in one file, readable by patch: the case's box (see [`super::crop_box`])
//! cut into fixed blocks, each block's channels and labels compressed on their own (deflate,
//! floats byte-shuffled first as blosc does, which is what lets deflate find their repeated
//! exponent bytes), then the foreground voxels' indices in chunks, then a JSON index, then a
//! trailer with the index's length and CRC-32. Every chunk carries its own CRC-32 too, so a
//! truncated or corrupted file is detected ([`CaseFile::open`], [`CaseFile::verify`]) and never
//! read as data.

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, ensure};
use flate2::Compression;
use serde::{Deserialize, Serialize};

use crate::data::Sample;

const MAGIC: &[u8; 8] = b"UNPPCAS1";
const END: &[u8; 8] = b"UNPPEND1";
/// Index length (u64) + index CRC-32 (u32) + END.
const TRAILER: u64 = 20;
/// Foreground indices per chunk: one chunk (128 KiB) is read to find the k-th.
pub const FG_CHUNK: usize = 16384;

/// Where a compressed chunk lies in the file and its CRC-32.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Chunk {
    pub offset: u64,
    pub len: u64,
    pub crc: u32,
}

/// A source file as it was when the entry was built (see [`super::stamp`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Stamp {
    pub path: PathBuf,
    pub size: u64,
    pub modified_s: i64,
    pub modified_ns: u32,
    /// CRC-32 of the header and sampled pieces of the content.
    pub sampled_crc: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Index {
    /// The preprocessing settings that made the entry ([`super::settings`]), compared in full.
    pub settings: String,
    pub sources: Vec<Stamp>,
    pub name: String,
    /// The sample's `source` (its image file).
    pub source: PathBuf,
    pub channels: usize,
    /// The preprocessed volume's shape [d, h, w]; outside `origin..origin + size` every voxel is
    /// `fill` (per channel, as f32 bits) with label 0.
    pub shape: [usize; 3],
    pub origin: [usize; 3],
    pub size: [usize; 3],
    pub fill: Vec<u32>,
    pub has_mask: bool,
    pub block: [usize; 3],
    /// One chunk per block (all channels), blocks in z, y, x order.
    pub image: Vec<Chunk>,
    /// One chunk per block; empty without labels.
    pub mask: Vec<Chunk>,
    /// Voxels with a label > 0, and their indices in the whole volume (increasing) in chunks
    /// of [`FG_CHUNK`].
    pub foreground: u64,
    pub fg_chunks: Vec<Chunk>,
    /// The foreground's centroid as [`crate::data::patch::centre_crop`] computes it (the
    /// volume's centre without foreground).
    pub centre: [usize; 3],
}

impl Index {
    /// Blocks along each axis.
    pub fn grid(&self) -> [usize; 3] {
        std::array::from_fn(|a| self.size[a].div_ceil(self.block[a]))
    }

    /// The box `[start, end)` (volume coordinates) of block `b` (grid coordinates).
    pub fn block_box(&self, b: [usize; 3]) -> ([usize; 3], [usize; 3]) {
        let lo: [usize; 3] = std::array::from_fn(|a| self.origin[a] + b[a] * self.block[a]);
        let hi = std::array::from_fn(|a| (lo[a] + self.block[a]).min(self.origin[a] + self.size[a]));
        (lo, hi)
    }
}

/// The 4 bytes of every float in 4 planes (first bytes, then second bytes...).
fn shuffle<const N: usize>(v: impl ExactSizeIterator<Item = [u8; N]>) -> Vec<u8> {
    let n = v.len();
    let mut out = vec![0u8; n * N];
    for (i, bytes) in v.enumerate() {
        for (b, &x) in bytes.iter().enumerate() {
            out[b * n + i] = x;
        }
    }
    out
}

fn unshuffle<const N: usize>(bytes: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
    let n = bytes.len() / N;
    (0..n).map(move |i| std::array::from_fn(|b| bytes[b * n + i]))
}

fn deflate(bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut e = flate2::write::DeflateEncoder::new(Vec::with_capacity(bytes.len() / 2), Compression::fast());
    e.write_all(bytes)?;
    e.finish()
}

/// Decompresses a chunk that must hold exactly `len` bytes.
fn inflate(bytes: &[u8], len: usize) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(len);
    flate2::read::DeflateDecoder::new(bytes).take(len as u64 + 1).read_to_end(&mut out)?;
    ensure!(out.len() == len, "a chunk holds {} bytes instead of {len}", out.len());
    Ok(out)
}

/// Appends chunks to the file being written, recording where each went.
struct Out {
    w: BufWriter<File>,
    at: u64,
}

impl Out {
    fn chunk(&mut self, raw: &[u8]) -> anyhow::Result<Chunk> {
        let z = deflate(raw)?;
        self.w.write_all(&z)?;
        let c = Chunk { offset: self.at, len: z.len() as u64, crc: crc32fast::hash(&z) };
        self.at += z.len() as u64;
        Ok(c)
    }
}

/// Writes `s` (preprocessed) to `path` atomically: the file appears whole or not at all. `index`
/// holds everything but the chunks, which this fills in.
pub fn write(path: &Path, s: &Sample, mut index: Index) -> anyhow::Result<()> {
    crate::fsio::write_with(path, |tmp| {
        let mut out = Out { w: BufWriter::new(File::create(tmp)?), at: MAGIC.len() as u64 };
        out.w.write_all(MAGIC)?;
        let vox = s.voxels();
        let [gz, gy, gx] = index.grid();
        let blocks: Vec<[usize; 3]> =
            (0..gz).flat_map(|z| (0..gy).flat_map(move |y| (0..gx).map(move |x| [z, y, x]))).collect();
        for &b in &blocks {
            let (lo, hi) = index.block_box(b);
            let rows =
                || (lo[0]..hi[0]).flat_map(move |z| (lo[1]..hi[1]).map(move |y| (z * s.shape[1] + y) * s.shape[2]));
            let mut values = vec![];
            for c in 0..s.channels {
                for row in rows() {
                    values.extend_from_slice(&s.image[c * vox + row + lo[2]..c * vox + row + hi[2]]);
                }
            }
            index.image.push(out.chunk(&shuffle(values.iter().map(|v| v.to_le_bytes())))?);
            if index.has_mask {
                let labels: Vec<u8> = rows().flat_map(|row| s.mask[row + lo[2]..row + hi[2]].iter().copied()).collect();
                index.mask.push(out.chunk(&labels)?);
            }
        }
        let mut fg = Vec::with_capacity(FG_CHUNK);
        for (i, _) in s.mask.iter().enumerate().filter(|(_, v)| **v > 0) {
            fg.push(i as u64);
            if fg.len() == FG_CHUNK {
                index.fg_chunks.push(out.chunk(&shuffle(fg.drain(..).map(u64::to_le_bytes)))?);
            }
        }
        if !fg.is_empty() {
            index.fg_chunks.push(out.chunk(&shuffle(fg.drain(..).map(u64::to_le_bytes)))?);
        }
        let json = serde_json::to_vec(&index)?;
        out.w.write_all(&json)?;
        out.w.write_all(&(json.len() as u64).to_le_bytes())?;
        out.w.write_all(&crc32fast::hash(&json).to_le_bytes())?;
        out.w.write_all(END)?;
        out.w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        Ok(())
    })
}

/// An entry opened and checked for shape: its index, and chunks only read on demand.
#[derive(Clone, Debug)]
pub struct CaseFile {
    pub path: PathBuf,
    pub index: Index,
}

impl CaseFile {
    /// Reads and checks the trailer and index: a truncated file, a foreign one or an index
    /// that does not describe the file is an error (the caller rebuilds the entry).
    pub fn open(path: &Path) -> anyhow::Result<CaseFile> {
        let mut f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let len = f.metadata()?.len();
        let bad = |what: &str| anyhow::anyhow!("{} is not a whole cache entry: {what}", path.display());
        if len < MAGIC.len() as u64 + TRAILER {
            return Err(bad("too short"));
        }
        let mut head = [0u8; 8];
        f.read_exact(&mut head)?;
        let mut tail = [0u8; TRAILER as usize];
        f.seek(SeekFrom::End(-(TRAILER as i64)))?;
        f.read_exact(&mut tail)?;
        if &head != MAGIC || &tail[12..] != END {
            return Err(bad("no start or end mark (truncated, or not written by unetpp)"));
        }
        let index_len = u64::from_le_bytes(tail[..8].try_into().unwrap());
        let crc = u32::from_le_bytes(tail[8..12].try_into().unwrap());
        let start = (len - TRAILER).checked_sub(index_len).filter(|&s| s >= MAGIC.len() as u64);
        let start = start.ok_or_else(|| bad("index length past the file"))?;
        let mut json = vec![0u8; index_len as usize];
        f.seek(SeekFrom::Start(start))?;
        f.read_exact(&mut json)?;
        if crc32fast::hash(&json) != crc {
            return Err(bad("index checksum mismatch"));
        }
        let index: Index = serde_json::from_slice(&json).map_err(|e| bad(&format!("index: {e}")))?;
        let blocks = index.grid().iter().product::<usize>();
        let in_file =
            |c: &Chunk| c.offset >= MAGIC.len() as u64 && c.offset.checked_add(c.len).is_some_and(|e| e <= start);
        let consistent = index.block.iter().all(|&b| b > 0)
            && (0..3).all(|a| index.origin[a] + index.size[a] <= index.shape[a])
            && index.fill.len() == index.channels
            && index.image.len() == blocks
            && index.mask.len() == if index.has_mask { blocks } else { 0 }
            && index.fg_chunks.len() == (index.foreground as usize).div_ceil(FG_CHUNK)
            && index.image.iter().chain(&index.mask).chain(&index.fg_chunks).all(in_file);
        if !consistent {
            return Err(bad("index does not describe the file"));
        }
        Ok(CaseFile { path: path.to_path_buf(), index })
    }

    /// Reads every chunk and checks its CRC-32 (a streaming pass, one chunk in memory).
    pub fn verify(&self) -> anyhow::Result<()> {
        let mut f = File::open(&self.path).with_context(|| format!("cannot open {}", self.path.display()))?;
        let i = &self.index;
        for c in i.image.iter().chain(&i.mask).chain(&i.fg_chunks) {
            self.raw(&mut f, c)?;
        }
        Ok(())
    }

    /// A chunk's compressed bytes, checked.
    fn raw(&self, f: &mut File, c: &Chunk) -> anyhow::Result<Vec<u8>> {
        let mut z = vec![0u8; c.len as usize];
        f.seek(SeekFrom::Start(c.offset))?;
        f.read_exact(&mut z).with_context(|| format!("cannot read {}", self.path.display()))?;
        ensure!(
            crc32fast::hash(&z) == c.crc,
            "{} is corrupted (a chunk's checksum differs); delete it and it is rebuilt",
            self.path.display()
        );
        Ok(z)
    }

    pub fn reader(&self) -> anyhow::Result<File> {
        File::open(&self.path).with_context(|| format!("cannot open {}", self.path.display()))
    }

    /// Block `n`'s image (channels x its voxels).
    pub fn image_block(&self, f: &mut File, n: usize, voxels: usize) -> anyhow::Result<Vec<f32>> {
        let bytes = self.inflated(f, &self.index.image[n], voxels * self.index.channels * 4)?;
        Ok(unshuffle::<4>(&bytes).map(f32::from_le_bytes).collect())
    }

    /// Block `n`'s labels.
    pub fn mask_block(&self, f: &mut File, n: usize, voxels: usize) -> anyhow::Result<Vec<u8>> {
        self.inflated(f, &self.index.mask[n], voxels)
    }

    /// The `k`-th foreground voxel's index in the volume.
    pub fn foreground(&self, f: &mut File, k: usize) -> anyhow::Result<usize> {
        let total = self.index.foreground as usize;
        ensure!(k < total, "foreground voxel {k} of {total} asked of {}", self.path.display());
        let len = FG_CHUNK.min(total - k / FG_CHUNK * FG_CHUNK);
        let bytes = self.inflated(f, &self.index.fg_chunks[k / FG_CHUNK], len * 8)?;
        Ok(u64::from_le_bytes(unshuffle::<8>(&bytes).nth(k % FG_CHUNK).unwrap()) as usize)
    }

    fn inflated(&self, f: &mut File, c: &Chunk, len: usize) -> anyhow::Result<Vec<u8>> {
        inflate(&self.raw(f, c)?, len).with_context(|| format!("{} is corrupted", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shuffling_round_trips() {
        let v = [1.5f32, -0.0, f32::MAX, 3e-40];
        let s = shuffle(v.iter().map(|x| x.to_le_bytes()));
        assert_eq!(s[..4], [1.5f32.to_le_bytes()[0], 0, f32::MAX.to_le_bytes()[0], 3e-40f32.to_le_bytes()[0]]);
        let back: Vec<u32> = unshuffle::<4>(&s).map(|b| f32::from_le_bytes(b).to_bits()).collect();
        assert_eq!(back, v.map(f32::to_bits));
        assert!(inflate(&deflate(&s).unwrap(), s.len() + 1).is_err(), "a short chunk is an error");
    }
}
