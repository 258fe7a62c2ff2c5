//! MetaImage volumes (`.mha` with the data after the header, `.mhd` with a detached data file),
//! as ITK's MetaIO writes and reads them. MetaImage is LPS by convention (ITK ignores
//! `AnatomicalOrientation`, and so do we).
//!
//! Supported fields (names case-insensitive): `ObjectType = Image`; `NDims = 3`; `DimSize`;
//! `ElementType` MET_CHAR, MET_UCHAR, MET_SHORT, MET_USHORT, MET_INT, MET_UINT, MET_LONG,
//! MET_ULONG (4 bytes, as in MetaIO), MET_LONG_LONG, MET_ULONG_LONG, MET_FLOAT, MET_DOUBLE (and
//! their `_ARRAY` forms); `ElementNumberOfChannels` (interleaved, read as channels);
//! `ElementSpacing` (else `ElementSize`, else 1); `Offset` (or `Origin`, `Position`);
//! `TransformMatrix` (or `Rotation`, `Orientation`; 9 numbers, each group of three the LPS
//! direction of one voxel axis x, y, z); `BinaryDataByteOrderMSB` (or `ElementByteOrderMSB`);
//! `CompressedData` (zlib); `HeaderSize` (bytes to skip in a detached file, -1 for "the last
//! bytes", uncompressed only); `ElementDataFile` = LOCAL or ONE file relative to the header,
//! which must be the last field.
//!
//! Errors (naming the file and field): ASCII data (`BinaryData = False`); `ElementDataFile` LIST
//! or a file pattern; other `NDims`; unknown element types; missing `DimSize`/`ElementType`/
//! `ElementDataFile`; sizes that overflow or differ from the data present (too little or too
//! much); a sheared `TransformMatrix`.

use std::path::Path;

use anyhow::{Context, bail, ensure};

use super::{Compression, Elem, Geometry, Volume};

fn elem(t: &str) -> Option<Elem> {
    Some(match t.strip_suffix("_ARRAY").unwrap_or(t) {
        "MET_CHAR" => Elem::I8,
        "MET_UCHAR" => Elem::U8,
        "MET_SHORT" => Elem::I16,
        "MET_USHORT" => Elem::U16,
        "MET_INT" | "MET_LONG" => Elem::I32,
        "MET_UINT" | "MET_ULONG" => Elem::U32,
        "MET_LONG_LONG" => Elem::I64,
        "MET_ULONG_LONG" => Elem::U64,
        "MET_FLOAT" => Elem::F32,
        "MET_DOUBLE" => Elem::F64,
        _ => return None,
    })
}

/// Reads a MetaImage volume (see the module doc) with its geometry in LPS.
pub fn read(path: &Path) -> anyhow::Result<Volume> {
    let bytes = super::read_file(path)?;
    let p = path.display();
    // Header lines up to and including `ElementDataFile`.
    let mut fields: Vec<(String, String)> = vec![];
    let mut pos = 0;
    let mut data_start = None;
    while pos < bytes.len() {
        let end = bytes[pos..].iter().position(|&b| b == b'\n').map_or(bytes.len(), |e| pos + e);
        let line = std::str::from_utf8(&bytes[pos..end])
            .with_context(|| format!("{p}: header line at byte {pos} is not text (no `ElementDataFile` before data?)"))?
            .trim();
        pos = end + 1;
        if line.is_empty() {
            continue;
        }
        let (k, v) = line.split_once('=').with_context(|| format!("{p}: header line `{line}` is not `Key = Value`"))?;
        let k = k.trim().to_ascii_lowercase();
        let last = k == "elementdatafile";
        fields.push((k, v.trim().to_string()));
        if last {
            data_start = Some(pos.min(bytes.len()));
            break;
        }
    }
    let get = |k: &str| fields.iter().rev().find(|(f, _)| f == k).map(|(_, v)| v.as_str());
    let any = |ks: &[&'static str]| ks.iter().find_map(|k| get(&k.to_ascii_lowercase()).map(|v| (*k, v)));
    let need =
        |k: &str| get(&k.to_ascii_lowercase()).with_context(|| format!("{p}: the required field `{k}` is missing"));
    let nums = |k: &str, v: &str, n: usize| -> anyhow::Result<Vec<f64>> {
        let out: Vec<f64> = v
            .split_whitespace()
            .map(|x| x.parse::<f64>().map_err(|_| anyhow::anyhow!("{p}: `{k}`: `{x}` is not a number")))
            .collect::<anyhow::Result<_>>()?;
        ensure!(out.len() == n, "{p}: `{k}` has {} values, expected {n}", out.len());
        Ok(out)
    };
    let flag = |k: &str, v: &str| -> anyhow::Result<bool> {
        match v.to_ascii_lowercase().as_str() {
            "true" | "1" => Ok(true),
            "false" | "0" => Ok(false),
            _ => bail!("{p}: `{k} = {v}` must be True or False"),
        }
    };

    if let Some(o) = get("objecttype") {
        ensure!(o.eq_ignore_ascii_case("image"), "{p}: `ObjectType = {o}` must be Image");
    }
    let nd = need("NDims")?;
    ensure!(nd == "3", "{p}: `NDims = {nd}`: only 3D volumes are read");
    let dims: Vec<usize> = need("DimSize")?
        .split_whitespace()
        .map(|s| s.parse::<usize>().ok().filter(|&n| n > 0))
        .collect::<Option<_>>()
        .filter(|v: &Vec<usize>| v.len() == 3)
        .with_context(|| format!("{p}: `DimSize` must be 3 positive whole numbers"))?;
    let ty = need("ElementType")?;
    let elem = elem(ty).with_context(|| {
        format!("{p}: `ElementType = {ty}` is not supported (MET_CHAR..MET_ULONG_LONG, MET_FLOAT, MET_DOUBLE)")
    })?;
    let channels = match get("elementnumberofchannels") {
        Some(c) => c
            .parse::<usize>()
            .ok()
            .filter(|&c| c > 0)
            .with_context(|| format!("{p}: `ElementNumberOfChannels = {c}` must be a positive whole number"))?,
        None => 1,
    };
    if let Some(b) = get("binarydata") {
        ensure!(flag("BinaryData", b)?, "{p}: `BinaryData = {b}`: ASCII MetaImage data is not supported");
    }
    let big = match any(&["BinaryDataByteOrderMSB", "ElementByteOrderMSB"]) {
        Some((k, v)) => flag(k, v)?,
        None => false,
    };
    let compression = match get("compresseddata") {
        Some(v) if flag("CompressedData", v)? => Compression::Zlib,
        _ => Compression::None,
    };

    let spacing = match any(&["ElementSpacing", "ElementSize"]) {
        Some((k, v)) => nums(k, v, 3)?,
        None => vec![1.0; 3],
    };
    let origin = match any(&["Offset", "Origin", "Position"]) {
        Some((k, v)) => nums(k, v, 3)?,
        None => vec![0.0; 3],
    };
    let (tm_field, tm) = match any(&["TransformMatrix", "Rotation", "Orientation"]) {
        Some((k, v)) => (k, nums(k, v, 9)?),
        None => ("TransformMatrix", vec![1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]),
    };
    // Each group of three is one voxel axis: a column of our direction.
    let direction = std::array::from_fn(|r| std::array::from_fn(|c| tm[c * 3 + r]));
    let geometry = Geometry::new(
        [spacing[0], spacing[1], spacing[2]],
        [origin[0], origin[1], origin[2]],
        direction,
        path,
        tm_field,
    )
    .with_context(|| format!("{p}: `ElementSpacing`/`Offset`/`{tm_field}`"))?;

    let file = need("ElementDataFile")?;
    let detached;
    let (raw, src): (&[u8], &Path) = if file.eq_ignore_ascii_case("LOCAL") {
        (&bytes[data_start.unwrap_or(bytes.len())..], path)
    } else {
        ensure!(
            !file.eq_ignore_ascii_case("LIST") && !file.contains(char::is_whitespace) && !file.contains('%'),
            "{p}: `ElementDataFile = {file}`: only LOCAL or a single data file is supported"
        );
        let dp = super::detached(path, file);
        detached = (super::read_file(&dp)?, dp);
        (&detached.0, &detached.1)
    };
    let header_size: i64 = match get("headersize") {
        Some(v) => v.parse().map_err(|_| anyhow::anyhow!("{p}: `HeaderSize = {v}` must be a whole number"))?,
        None => 0,
    };
    let [x, y, z] = [dims[0], dims[1], dims[2]];
    let total = super::byte_count(path, "DimSize", &[x, y, z, channels], elem)?;
    let raw = match header_size {
        -1 => {
            ensure!(compression == Compression::None, "{p}: `HeaderSize = -1` needs uncompressed data");
            ensure!(
                raw.len() >= total,
                "{p}: `DimSize` declares {total} bytes but {} holds {}",
                src.display(),
                raw.len()
            );
            &raw[raw.len() - total..]
        }
        s if s >= 0 && (s as usize) <= raw.len() => &raw[s as usize..],
        s => bail!("{p}: `HeaderSize = {s}` must be -1 or 0..{} (the data size)", raw.len()),
    };
    let bytes = super::payload(src, raw, compression, total)?;
    let data = super::planar(super::decode(&bytes, elem, big), channels);
    Ok(Volume { data, channels, shape: [z, y, x], geometry, full_scale: elem.full_scale() })
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str =
        "ObjectType = Image\nNDims = 3\nDimSize = 2 1 1\nElementType = MET_UCHAR\nElementDataFile = LOCAL\n";

    #[test]
    fn bad_headers_are_errors_naming_file_and_field() {
        let d = tempfile::tempdir().unwrap();
        let cases: &[(&str, &[u8], &[&str])] = &[
            (&OK.replace("NDims = 3", "NDims = 2"), &[0, 0], &["NDims = 2"]),
            (&OK.replace("DimSize = 2 1 1\n", ""), &[0, 0], &["`DimSize`", "missing"]),
            (&OK.replace("2 1 1", "2 1"), &[0, 0], &["`DimSize`"]),
            (&OK.replace("MET_UCHAR", "MET_STRING"), &[0, 0], &["ElementType = MET_STRING"]),
            (&OK.replace("ElementDataFile = LOCAL\n", ""), &[], &["`ElementDataFile`", "missing"]),
            (&OK.replace("LOCAL", "LIST"), &[], &["ElementDataFile = LIST"]),
            (&OK.replace("LOCAL", "gone.raw"), &[], &["gone.raw"]),
            (&OK.replace("2 1 1", "1024 1024 16"), &[0, 0], &["declares", "holds 2"]),
            (&OK.replace("2 1 1", "65536 65536 4096"), &[0, 0], &["`DimSize`", "MiB an input may decode to"]),
            (OK, &[0], &["declares 2", "holds 1"]),
            (OK, &[0, 0, 0], &["3 bytes of voxel data"]),
            (&OK.replace("NDims = 3", "NDims = 3\nCompressedData = True"), &[0, 0], &["corrupt"]),
            (&OK.replace("NDims = 3", "NDims = 3\nBinaryData = False"), &[0, 0], &["ASCII"]),
            (
                &OK.replace("NDims = 3", "NDims = 3\nTransformMatrix = 1 0 0 1 0 0 0 0 1"),
                &[0, 0],
                &["TransformMatrix", "orthonormal"],
            ),
            (&OK.replace("NDims = 3", "NDims = 3\nElementSpacing = 1 0 1"), &[0, 0], &["spacing"]),
            (&OK.replace("NDims = 3", "NDims = 3\nOffset = 1 2"), &[0, 0], &["`Offset` has 2 values"]),
            (&OK.replace("NDims = 3", "NDims = 3\nElementNumberOfChannels = 0"), &[0, 0], &["ElementNumberOfChannels"]),
            (
                &OK.replace("NDims = 3", "NDims = 3\nBinaryDataByteOrderMSB = maybe"),
                &[0, 0],
                &["BinaryDataByteOrderMSB"],
            ),
        ];
        for (i, (header, data, needles)) in cases.iter().enumerate() {
            let path = d.path().join(format!("bad{i}.mha"));
            let mut b = header.as_bytes().to_vec();
            b.extend_from_slice(data);
            std::fs::write(&path, b).unwrap();
            let e = format!("{:#}", read(&path).unwrap_err());
            assert!(e.contains(&format!("bad{i}.mha")) || e.contains("gone.raw"), "case {i}: {e}");
            for n in *needles {
                assert!(e.contains(n), "case {i}: `{n}` not in: {e}");
            }
        }
        let path = d.path().join("ok.mha");
        std::fs::write(&path, [OK.as_bytes(), &[7, 9]].concat()).unwrap();
        assert_eq!(read(&path).unwrap().data, vec![7.0, 9.0]);
    }
}
