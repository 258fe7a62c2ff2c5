//! NRRD volumes (`.nrrd` with attached data, `.nhdr` with a detached data file), per the teem
//! NRRD format specification (magic `NRRD0001`..`NRRD0005`).
//!
//! Supported: `type` int8..uint64 (every teem spelling), float, double; `encoding` raw, gzip
//! (`gz`) and ascii (`text`, `txt`); `endian` little/big (required when samples are wider than
//! a byte); `byte skip` (with -1, raw only: the data are the file's last bytes) and `line skip`;
//! `data file` naming ONE file relative to the header; `dimension` 3 (a volume) or 4 with one
//! non-spatial axis, first (interleaved, e.g. SimpleITK's vectors) or last, read as channels;
//! `space` left-posterior-superior (LPS), right-anterior-superior (RAS) or
//! left-anterior-superior (LAS), converted to LPS; `space directions` (`none` for the channel
//! axis) giving spacing (vector lengths) and direction; `space origin`. Without `space
//! directions`: `spacings` (default 1), identity direction and origin 0, the non-spatial axis
//! told by `kinds` (vector, list, RGB-color, ... anything but domain/space).
//!
//! Errors (naming the file and field): a missing or unknown magic, type, encoding or endian; a
//! `block` type; bzip2/hex encodings; `data file: LIST` or file patterns; other spaces (e.g.
//! scanner-xyz, whose handedness is unknown); `space dimension` other than 3; sizes that
//! overflow or differ from the data present (too little or too much); sheared directions.

use std::path::Path;

use anyhow::{Context, bail, ensure};

use super::{Compression, Elem, Geometry, Volume};

fn elem(t: &str) -> Option<Elem> {
    Some(match t {
        "signed char" | "int8" | "int8_t" => Elem::I8,
        "uchar" | "unsigned char" | "uint8" | "uint8_t" => Elem::U8,
        "short" | "short int" | "signed short" | "signed short int" | "int16" | "int16_t" => Elem::I16,
        "ushort" | "unsigned short" | "unsigned short int" | "uint16" | "uint16_t" => Elem::U16,
        "int" | "signed int" | "int32" | "int32_t" => Elem::I32,
        "uint" | "unsigned int" | "uint32" | "uint32_t" => Elem::U32,
        "longlong"
        | "long long"
        | "long long int"
        | "signed long long"
        | "signed long long int"
        | "int64"
        | "int64_t" => Elem::I64,
        "ulonglong" | "unsigned long long" | "unsigned long long int" | "uint64" | "uint64_t" => Elem::U64,
        "float" => Elem::F32,
        "double" => Elem::F64,
        _ => return None,
    })
}

/// Splits a field value into words, keeping each `( ... )` vector whole.
fn tokens(v: &str) -> Vec<String> {
    let mut out = vec![];
    let mut cur = String::new();
    let mut depth = 0;
    for ch in v.chars() {
        match ch {
            '(' => {
                depth += 1;
                cur.push(ch);
            }
            ')' => {
                depth -= 1;
                cur.push(ch);
            }
            c if c.is_whitespace() && depth == 0 => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c if c.is_whitespace() => {}
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

struct Header {
    fields: Vec<(String, String)>,
    /// Byte offset of the attached data (just past the blank line), if any.
    data_start: Option<usize>,
}

impl Header {
    fn get(&self, key: &str) -> Option<&str> {
        self.fields.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

fn parse_header(path: &Path, bytes: &[u8]) -> anyhow::Result<Header> {
    ensure!(
        bytes.starts_with(b"NRRD000") && bytes.len() >= 8 && (b'1'..=b'5').contains(&bytes[7]),
        "{}: not a NRRD file (the first line must be the magic NRRD0001..NRRD0005)",
        path.display()
    );
    let mut fields = vec![];
    let mut pos = 0;
    let mut data_start = None;
    let mut first = true;
    while pos < bytes.len() {
        let end = bytes[pos..].iter().position(|&b| b == b'\n').map_or(bytes.len(), |e| pos + e);
        let line = std::str::from_utf8(&bytes[pos..end])
            .with_context(|| format!("{}: header line at byte {pos} is not text", path.display()))?
            .trim_end_matches('\r');
        pos = end + 1;
        if first {
            first = false;
            continue;
        }
        if line.is_empty() {
            data_start = Some(pos.min(bytes.len()));
            break;
        }
        if line.starts_with('#') || line.contains(":=") {
            continue;
        }
        let Some((k, v)) = line.split_once(": ") else {
            bail!("{}: header line `{line}` is not `field: value`", path.display());
        };
        fields.push((k.trim().to_string(), v.trim().to_string()));
    }
    Ok(Header { fields, data_start })
}

/// Reads a NRRD volume (see the module doc) with its geometry in LPS.
pub fn read(path: &Path) -> anyhow::Result<Volume> {
    let bytes = super::read_file(path)?;
    let h = parse_header(path, &bytes)?;
    let p = path.display();
    let need = |k: &str| h.get(k).with_context(|| format!("{p}: the required field `{k}` is missing"));
    let num = |k: &str, v: &str| -> anyhow::Result<f64> {
        v.parse::<f64>().map_err(|_| anyhow::anyhow!("{p}: `{k}`: `{v}` is not a number"))
    };

    let ty = need("type")?;
    let elem = elem(ty).with_context(|| {
        format!("{p}: `type: {ty}` is not supported (int8..uint64 in any teem spelling, float or double)")
    })?;
    let dim: usize =
        need("dimension")?.parse().map_err(|_| anyhow::anyhow!("{p}: `dimension` is not a whole number"))?;
    ensure!(dim == 3 || dim == 4, "{p}: `dimension: {dim}`: only 3D volumes (3, or 4 with a channel axis) are read");
    let sizes: Vec<usize> = tokens(need("sizes")?)
        .iter()
        .map(|s| s.parse::<usize>().ok().filter(|&n| n > 0))
        .collect::<Option<_>>()
        .with_context(|| format!("{p}: `sizes` must be {dim} positive whole numbers"))?;
    ensure!(sizes.len() == dim, "{p}: `sizes` has {} values for `dimension: {dim}`", sizes.len());

    let enc = need("encoding")?;
    let (compression, ascii) = match enc {
        "raw" => (Compression::None, false),
        "gzip" | "gz" => (Compression::Gzip, false),
        "ascii" | "text" | "txt" => (Compression::None, true),
        other => bail!("{p}: `encoding: {other}` is not supported (raw, gzip, ascii)"),
    };
    let big = match h.get("endian") {
        Some("big") => true,
        Some("little") => false,
        Some(o) => bail!("{p}: `endian: {o}` must be little or big"),
        None if elem.size() == 1 || ascii => false,
        None => bail!("{p}: the field `endian` is required for `type: {ty}`"),
    };

    // Which axes are spatial, and the geometry.
    let space_sign = match h.get("space") {
        None => None,
        Some("left-posterior-superior" | "LPS") => Some([1.0, 1.0, 1.0]),
        Some("right-anterior-superior" | "RAS") => Some([-1.0, -1.0, 1.0]),
        Some("left-anterior-superior" | "LAS") => Some([1.0, -1.0, 1.0]),
        Some(o) => bail!(
            "{p}: `space: {o}` is not supported (left-posterior-superior, right-anterior-superior, \
             left-anterior-superior)"
        ),
    };
    if let Some(sd) = h.get("space dimension") {
        ensure!(sd == "3", "{p}: `space dimension: {sd}` must be 3");
        ensure!(space_sign.is_some(), "{p}: `space dimension` without `space`: cannot tell RAS from LPS");
    }
    let vec3 = |k: &str, t: &str| -> anyhow::Result<[f64; 3]> {
        let inner = t.strip_prefix('(').and_then(|t| t.strip_suffix(')'));
        let v: Vec<f64> = inner
            .with_context(|| format!("{p}: `{k}`: `{t}` is not a vector `(a,b,c)`"))?
            .split(',')
            .map(|x| num(k, x.trim()))
            .collect::<anyhow::Result<_>>()?;
        ensure!(v.len() == 3, "{p}: `{k}`: `{t}` must have 3 components");
        Ok([v[0], v[1], v[2]])
    };
    let (spatial, geometry): (Vec<usize>, Geometry) = if let Some(dirs) = h.get("space directions") {
        let sign = space_sign.with_context(|| format!("{p}: `space directions` without `space`"))?;
        let t = tokens(dirs);
        ensure!(t.len() == dim, "{p}: `space directions` has {} entries for `dimension: {dim}`", t.len());
        let mut spatial = vec![];
        let mut cols = vec![];
        for (axis, tok) in t.iter().enumerate() {
            if tok == "none" {
                continue;
            }
            spatial.push(axis);
            cols.push(vec3("space directions", tok)?);
        }
        ensure!(spatial.len() == 3, "{p}: `space directions` must give 3 spatial axes, got {}", spatial.len());
        let m = std::array::from_fn(|r| std::array::from_fn(|c| sign[r] * cols[c][r]));
        let origin = match h.get("space origin") {
            Some(o) => {
                let o = vec3("space origin", o)?;
                std::array::from_fn(|r| sign[r] * o[r])
            }
            None => [0.0; 3],
        };
        (spatial, Geometry::from_axes(m, origin, path, "space directions")?)
    } else {
        let spatial: Vec<usize> = if dim == 3 {
            vec![0, 1, 2]
        } else {
            let kinds = tokens(h.get("kinds").with_context(|| {
                format!("{p}: `dimension: 4` needs `space directions` or `kinds` to tell the channel axis")
            })?);
            ensure!(kinds.len() == dim, "{p}: `kinds` has {} entries for `dimension: {dim}`", kinds.len());
            (0..dim).filter(|&a| matches!(kinds[a].as_str(), "domain" | "space")).collect()
        };
        ensure!(spatial.len() == 3, "{p}: `kinds` must mark exactly 3 axes domain or space");
        let spacing: [f64; 3] = match h.get("spacings") {
            Some(s) => {
                let t = tokens(s);
                ensure!(t.len() == dim, "{p}: `spacings` has {} entries for `dimension: {dim}`", t.len());
                let mut out = [1.0; 3];
                for (i, &a) in spatial.iter().enumerate() {
                    out[i] = num("spacings", &t[a])?;
                }
                out
            }
            None => [1.0; 3],
        };
        (spatial, Geometry::new(spacing, [0.0; 3], super::geometry::IDENTITY, path, "spacings")?)
    };
    let channel_axis = (0..dim).find(|a| !spatial.contains(a));
    if let Some(a) = channel_axis {
        ensure!(
            a == 0 || a == dim - 1,
            "{p}: the non-spatial axis {a} must be the first or the last axis to be read as channels"
        );
    }
    let channels = channel_axis.map_or(1, |a| sizes[a]);
    let [x, y, z] = [sizes[spatial[0]], sizes[spatial[1]], sizes[spatial[2]]];

    // The voxel bytes.
    let data_file;
    let (raw, src): (&[u8], &Path) = match h.get("data file").or(h.get("datafile")) {
        Some(f) => {
            ensure!(
                f != "LIST" && !f.contains(char::is_whitespace),
                "{p}: `data file: {f}`: only a single data file is supported (not LIST or a file pattern)"
            );
            let dp = super::detached(path, f);
            data_file = (super::read_file(&dp)?, dp);
            (&data_file.0, &data_file.1)
        }
        None => {
            let start = h.data_start.with_context(|| format!("{p}: no data: neither `data file` nor attached data"))?;
            (&bytes[start..], path)
        }
    };
    let mut raw = raw;
    let line_skip: usize = match h.get("line skip").or(h.get("lineskip")) {
        Some(v) => v.parse().map_err(|_| anyhow::anyhow!("{p}: `line skip: {v}` must be a whole number"))?,
        None => 0,
    };
    for _ in 0..line_skip {
        let nl = raw
            .iter()
            .position(|&b| b == b'\n')
            .with_context(|| format!("{p}: `line skip: {line_skip}` passes the end of {}", src.display()))?;
        raw = &raw[nl + 1..];
    }
    let byte_skip: i64 = match h.get("byte skip").or(h.get("byteskip")) {
        Some(v) => v.parse().map_err(|_| anyhow::anyhow!("{p}: `byte skip: {v}` must be a whole number"))?,
        None => 0,
    };
    let total = super::byte_count(path, "sizes", &sizes, elem)?;
    let data = if ascii {
        let text =
            std::str::from_utf8(raw).with_context(|| format!("{p}: ascii data in {} is not text", src.display()))?;
        let v: Vec<f32> = text
            .split(|c: char| c.is_whitespace() || c == ',')
            .filter(|s| !s.is_empty())
            .map(|s| s.parse::<f64>().map(|x| x as f32))
            .collect::<Result<_, _>>()
            .map_err(|e| anyhow::anyhow!("{p}: ascii data in {}: {e}", src.display()))?;
        let n = total / elem.size();
        ensure!(v.len() == n, "{p}: `sizes` declares {n} samples but {} holds {}", src.display(), v.len());
        v
    } else {
        let bytes = match (byte_skip, compression) {
            (-1, Compression::None) => {
                ensure!(
                    raw.len() >= total,
                    "{p}: `sizes` declares {total} bytes but {} holds {}",
                    src.display(),
                    raw.len()
                );
                raw[raw.len() - total..].to_vec()
            }
            (-1, _) => bail!("{p}: `byte skip: -1` is only allowed with `encoding: raw`"),
            (s, c) if s >= 0 => {
                let s = s as usize;
                if c == Compression::None {
                    ensure!(raw.len() >= s, "{p}: `byte skip: {s}` passes the end of {}", src.display());
                    super::payload(src, &raw[s..], c, total)?
                } else {
                    let all = super::payload(src, raw, c, total.checked_add(s).context("byte skip overflows")?)?;
                    all[s..].to_vec()
                }
            }
            (s, _) => bail!("{p}: `byte skip: {s}` must be -1 or more"),
        };
        super::decode(&bytes, elem, big)
    };
    let data = if channel_axis == Some(0) && dim == 4 { super::planar(data, channels) } else { data };
    Ok(Volume { data, channels, shape: [z, y, x], geometry, full_scale: elem.full_scale() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, header: &str, data: &[u8]) -> std::path::PathBuf {
        let p = dir.join(name);
        let mut b = header.as_bytes().to_vec();
        b.extend_from_slice(data);
        std::fs::write(&p, b).unwrap();
        p
    }

    const OK: &str = "NRRD0004\ntype: uint8\ndimension: 3\nsizes: 2 1 1\nencoding: raw\n\n";

    #[test]
    fn a_minimal_raw_volume_reads() {
        let d = tempfile::tempdir().unwrap();
        let v = read(&write(d.path(), "a.nrrd", OK, &[3, 250])).unwrap();
        assert_eq!((v.data, v.shape, v.channels), (vec![3.0, 250.0], [1, 1, 2], 1));
        assert_eq!(v.geometry, Geometry::default());
    }

    #[test]
    fn bad_headers_are_errors_naming_file_and_field() {
        let d = tempfile::tempdir().unwrap();
        let cases: &[(&str, &[u8], &[&str])] = &[
            ("NRRX0004\n\n", &[], &["not a NRRD"]),
            (&OK.replace("uint8", "block"), &[0, 0], &["type: block"]),
            (&OK.replace("type: uint8\n", ""), &[0, 0], &["`type`", "missing"]),
            (&OK.replace("uint8", "uint16"), &[0; 4], &["`endian`"]),
            (&OK.replace("raw", "bzip2"), &[0, 0], &["encoding: bzip2"]),
            (&OK.replace("2 1 1", "2 1"), &[0, 0], &["`sizes`"]),
            (&OK.replace("2 1 1", "2 x 1"), &[0, 0], &["`sizes`"]),
            (&OK.replace("dimension: 3", "dimension: 2"), &[0, 0], &["dimension: 2"]),
            (&OK.replace("2 1 1", "1024 1024 16"), &[0, 0], &["declares 16777216 bytes", "holds 2"]),
            (&OK.replace("2 1 1", "65536 65536 65536"), &[0, 0], &["`sizes`", "MiB an input may decode to"]),
            (OK, &[0], &["declares 2", "holds 1"]),
            (OK, &[0, 0, 0], &["3 bytes of voxel data", "declares 2"]),
            (&OK.replace("raw", "gzip"), &[0, 0], &["corrupt"]),
            (&OK.replace("encoding: raw", "encoding: raw\nspace: scanner-xyz"), &[0, 0], &["space: scanner-xyz"]),
            (
                &OK.replace("encoding: raw", "encoding: raw\nspace: RAS\nspace directions: (1,0,0) (1,0,0) (0,0,1)"),
                &[0, 0],
                &["space directions", "orthonormal"],
            ),
            (
                &OK.replace("encoding: raw", "encoding: raw\nspace: RAS\nspace directions: (1,0,0) (0,1,0)"),
                &[0, 0],
                &["space directions", "2 entries"],
            ),
            (&OK.replace("encoding: raw", "encoding: raw\ndata file: LIST"), &[], &["data file: LIST"]),
            (&OK.replace("encoding: raw", "encoding: raw\ndata file: missing.raw"), &[], &["missing.raw"]),
            (&OK.replace("sizes: 2 1 1", "sizes: 18446744073709551615 2 1"), &[], &["overflows"]),
        ];
        for (i, (header, data, needles)) in cases.iter().enumerate() {
            let p = write(d.path(), &format!("bad{i}.nrrd"), header, data);
            let e = format!("{:#}", read(&p).unwrap_err());
            assert!(e.contains(&format!("bad{i}.nrrd")) || e.contains("missing.raw"), "case {i}: {e}");
            for n in *needles {
                assert!(e.contains(n), "case {i}: `{n}` not in: {e}");
            }
        }
    }
}
