//! Probability maps as files: lossless by default (32-bit float TIFF for 2D, float NIfTI for
//! volumes, or `.npy` for either), the 8-bit PNG only on request. Every kind carries unetpp's
//! mark (TIFF `Software`, NIfTI `descrip`, a comment in the `.npy` header) so `output`'s rule
//! holds for it too: its own earlier files are replaced, a user's file is refused.

use std::io::Cursor;
use std::path::Path;

use anyhow::Context;

use crate::output::MARK;

/// `--probabilities [tiff|npy|png]`; bare `--probabilities` is [`Format::Lossless`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Float TIFF for 2D images, float NIfTI for volumes.
    Lossless,
    Tiff,
    Npy,
    /// 8 bits: p * 255 rounded (what predict wrote before 2026-12-02).
    Png,
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Format, String> {
        match s {
            "lossless" => Ok(Format::Lossless),
            "tiff" => Ok(Format::Tiff),
            "npy" => Ok(Format::Npy),
            "png" => Ok(Format::Png),
            _ => Err(format!(
                "--probabilities {s}: use tiff (32-bit float, 2D), npy (float32, 2D or 3D) or png (8-bit, 2D)"
            )),
        }
    }
}

impl Format {
    /// The probability file's extension for an input (a NIfTI volume or a 2D image).
    pub fn extension(self, input: &Path) -> &'static str {
        match (self, crate::data::io::is_volume(input)) {
            (Format::Npy, _) => ".npy",
            (Format::Png, false) => ".png",
            (_, true) => ".nii.gz",
            (_, false) => ".tif",
        }
    }

    /// Refuses a kind that cannot hold the input: TIFF and PNG are 2D only here.
    pub fn check(self, input: &Path) -> anyhow::Result<()> {
        if crate::data::io::is_volume(input) && matches!(self, Format::Tiff | Format::Png) {
            anyhow::bail!(
                "--probabilities {}: {} is a volume; its probabilities are written as float NIfTI (bare \
                 --probabilities) or with --probabilities npy (nothing was written)",
                if self == Format::Tiff { "tiff" } else { "png" },
                input.display()
            );
        }
        Ok(())
    }
}

/// One class's probabilities `p` ([depth, height, width] voxels) as the bytes of `path`'s kind
/// (`.tif`, `.npy` or `.png`; NIfTI goes through `io::write_nifti`).
pub fn encode(path: &Path, p: &[f32], shape: [usize; 3]) -> anyhow::Result<Vec<u8>> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or_default();
    match ext {
        "tif" => tiff_f32(p, shape),
        "npy" => Ok(npy_f32(p, shape)),
        "png" => {
            let px: Vec<u8> = p.iter().map(|v| (v * 255.0).round() as u8).collect();
            crate::data::io::encode_png(&px, shape[2], shape[1], false)
        }
        _ => anyhow::bail!("no probability writer for {}", path.display()),
    }
}

fn tiff_f32(p: &[f32], [d, h, w]: [usize; 3]) -> anyhow::Result<Vec<u8>> {
    use tiff::encoder::{TiffEncoder, colortype::Gray32Float};
    anyhow::ensure!(d == 1, "a float TIFF holds one 2D plane, not {d} slices");
    let mut buf = Cursor::new(vec![]);
    let mut enc = TiffEncoder::new(&mut buf)?;
    let mut img = enc.new_image::<Gray32Float>(w.try_into()?, h.try_into()?)?;
    img.encoder().write_tag(tiff::tags::Tag::Software, MARK)?;
    img.write_data(p)?;
    Ok(buf.into_inner())
}

/// NumPy's format 1.0 (NEP 1): magic, header length, a Python dict literal padded with spaces to
/// a multiple of 64 bytes, then little-endian float32 in C order. Written here rather than with
/// a crate because the mark rides in the header as a Python comment, which `numpy.load` ignores.
fn npy_f32(p: &[f32], [d, h, w]: [usize; 3]) -> Vec<u8> {
    let shape = if d == 1 { format!("({h}, {w})") } else { format!("({d}, {h}, {w})") };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }} # {MARK}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + 4 * p.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend(p.iter().flat_map(|v| v.to_le_bytes()));
    out
}

/// Whether a `.tif` or `.npy` file carries unetpp's mark.
pub fn is_ours(path: &Path) -> bool {
    match path.extension().and_then(|e| e.to_str()) {
        Some("tif") => (|| -> anyhow::Result<bool> {
            let f = std::fs::File::open(path)?;
            let mut dec = tiff::decoder::Decoder::new(std::io::BufReader::new(f))?;
            Ok(dec.get_tag_ascii_string(tiff::tags::Tag::Software)? == MARK)
        })()
        .unwrap_or(false),
        Some("npy") => {
            let mut head = [0u8; 128];
            let n = std::fs::File::open(path).and_then(|mut f| std::io::Read::read(&mut f, &mut head)).unwrap_or(0);
            let text = String::from_utf8_lossy(&head[..n]);
            head.starts_with(b"\x93NUMPY") && text.contains(&format!("}} # {MARK}"))
        }
        _ => false,
    }
}

/// Reads a `.npy` this module wrote back: shape and values (for tests and the report).
pub fn read_npy(path: &Path) -> anyhow::Result<(Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    anyhow::ensure!(bytes.len() >= 10 && bytes.starts_with(b"\x93NUMPY\x01\x00"), "{}: not a .npy 1.0", path.display());
    let len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(bytes.get(10..10 + len).context("header cut short")?)?;
    anyhow::ensure!(header.contains("'descr': '<f4'") && header.contains("'fortran_order': False"), "{header}");
    let shape = header.split_once("'shape': (").and_then(|(_, s)| s.split_once(')')).context("no shape")?.0;
    let shape: Vec<usize> =
        shape.split(',').filter(|s| !s.trim().is_empty()).map(|s| s.trim().parse()).collect::<Result<_, _>>()?;
    let data = &bytes[10 + len..];
    anyhow::ensure!(
        data.len() == 4 * shape.iter().product::<usize>(),
        "{}: size does not match the shape",
        path.display()
    );
    Ok((shape, data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()))
}
