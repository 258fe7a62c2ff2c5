#!/usr/bin/env python3
"""Writes the 3D reader fixtures of tests/volume_readers.rs into tests/data/volumes/.

Each volume is written by a reference tool (SimpleITK, pynrrd, nibabel, or a hand-written
MetaImage header for the byte orders SimpleITK never writes) and then read back with SimpleITK;
what SimpleITK reports goes into FILE.json next to the file (e.g. ct_raw.nrrd.json): voxels channels-first in
[c][z][y][x] order, GetSpacing/GetOrigin/GetDirection (LPS, ITK's x,y,z axis order) and the world
point of a few voxel indices. Run once (CI has no Python packages):

    python3 -m venv /work/venv-sitk && /work/venv-sitk/bin/pip install SimpleITK pynrrd numpy nibabel
    /work/venv-sitk/bin/python scripts/volume_fixtures.py
"""
import json
import os
import sys

import nibabel as nib
import nrrd
import numpy as np
import SimpleITK as sitk
from geometry_fixtures import rotation  # scripts/ is on the path when a script of it runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "data", "volumes")
LUNG = os.path.join(ROOT, "..", "..", "shared", "data", "lesions-pyradiomics", "images", "lung1.nii.gz")


def reference(name, channels_expected=None):
    """Reads OUT/name with SimpleITK and writes the JSON the Rust test compares against."""
    path = os.path.join(OUT, name)
    img = sitk.ReadImage(path)
    arr = sitk.GetArrayFromImage(img)  # [z, y, x] or [z, y, x, c]
    channels = img.GetNumberOfComponentsPerPixel()
    if channels_expected is not None:
        assert channels == channels_expected, (name, channels)
    if channels == 1:
        arr = arr[None]
    else:
        arr = np.moveaxis(arr, -1, 0)
    size = img.GetSize()
    corners = [(0, 0, 0), (size[0] - 1, 0, 0), (0, size[1] - 1, 0), (0, 0, size[2] - 1), (1, 2, 3)]
    points = [
        {"index": list(idx), "world": list(img.TransformIndexToPhysicalPoint([int(i) for i in idx]))}
        for idx in corners
    ]
    ref = {
        "file": name,
        "pixel_type": img.GetPixelIDTypeAsString(),
        "size_xyz": list(size),
        "channels": channels,
        "spacing": list(img.GetSpacing()),
        "origin": list(img.GetOrigin()),
        "direction": list(img.GetDirection()),
        "points": points,
        "voxels": [float(v) for v in arr.astype(np.float64).ravel()],
    }
    with open(os.path.join(OUT, name + ".json"), "w") as f:
        json.dump(ref, f, separators=(",", ":"))
    print(name, size, channels, img.GetPixelIDTypeAsString(), img.GetSpacing(), img.GetOrigin())


def main():
    os.makedirs(OUT, exist_ok=True)
    for f in os.listdir(OUT):
        os.remove(os.path.join(OUT, f))

    # A real CT crop (int16 Hounsfield units) with the scanner's geometry.
    lung = sitk.ReadImage(LUNG)
    cx, cy, cz = (s // 2 for s in lung.GetSize())
    ct = lung[cx - 6 : cx + 6, cy - 5 : cy + 5, cz - 3 : cz + 3]
    assert ct.GetSize() == (12, 10, 6), ct.GetSize()
    sitk.WriteImage(ct, os.path.join(OUT, "ct_raw.nrrd"), False)
    reference("ct_raw.nrrd")
    sitk.WriteImage(ct, os.path.join(OUT, "ct_gzip.nrrd"), True)
    reference("ct_gzip.nrrd")
    sitk.WriteImage(ct, os.path.join(OUT, "ct_detached.nhdr"), False)
    reference("ct_detached.nhdr")
    sitk.WriteImage(ct, os.path.join(OUT, "ct_raw.mha"), False)
    reference("ct_raw.mha")
    sitk.WriteImage(ct, os.path.join(OUT, "ct_zlib.mha"), True)
    reference("ct_zlib.mha")
    sitk.WriteImage(ct, os.path.join(OUT, "ct_detached.mhd"), False)
    reference("ct_detached.mhd")

    # An oblique volume with a flipped axis (a left-handed direction), float32 ramp.
    ramp = np.arange(6 * 5 * 4, dtype=np.float32).reshape(4, 5, 6) * 0.5 - 17.25
    obl = sitk.GetImageFromArray(ramp)
    d = rotation(0.3, -0.2, 0.5) @ np.diag([1.0, -1.0, 1.0])
    obl.SetDirection(d.ravel().tolist())
    obl.SetSpacing((0.7, 1.3, 2.5))
    obl.SetOrigin((-12.5, 30.25, 7.0))
    sitk.WriteImage(obl, os.path.join(OUT, "oblique.nrrd"), True)
    reference("oblique.nrrd")
    sitk.WriteImage(obl, os.path.join(OUT, "oblique.mha"), False)
    reference("oblique.mha")
    sitk.WriteImage(obl, os.path.join(OUT, "oblique.nii.gz"))
    reference("oblique.nii.gz")

    # Multi-channel (3 float32 components per voxel).
    mc = np.stack([ramp, -ramp, ramp * 2 + 1], axis=-1)
    vec = sitk.GetImageFromArray(mc, isVector=True)
    vec.SetSpacing((1.5, 1.0, 3.0))
    vec.SetOrigin((4.0, -2.0, 1.0))
    sitk.WriteImage(vec, os.path.join(OUT, "vector.nrrd"), True)
    reference("vector.nrrd", 3)
    sitk.WriteImage(vec, os.path.join(OUT, "vector.mha"), True)
    reference("vector.mha", 3)

    # A label map in uint16 with ids above 255.
    lab = np.zeros((4, 5, 6), dtype=np.uint16)
    lab[1:3, 1:4, 2:5] = 300
    lab[2, 2, 3] = 65535
    lab[0, 0, 0] = 1
    labels = sitk.GetImageFromArray(lab)
    labels.SetSpacing((0.8, 0.8, 2.0))
    sitk.WriteImage(labels, os.path.join(OUT, "labels_u16.nrrd"), True)
    reference("labels_u16.nrrd")
    sitk.WriteImage(labels, os.path.join(OUT, "labels_u16.mha"), True)
    reference("labels_u16.mha")

    # pynrrd: RAS space, big-endian, detached gzip data, uint16 and a `list` axis of 2 channels.
    ras = {
        "type": "uint16",
        "space": "right-anterior-superior",
        "space directions": np.array([[0.0, 0.9, 0.0], [-1.1, 0.0, 0.0], [0.0, 0.0, 2.0]]),
        "space origin": np.array([10.0, -20.0, 30.0]),
        "endian": "big",
        "encoding": "gzip",
        "kinds": ["domain", "domain", "domain"],
    }
    vol = (np.arange(6 * 5 * 4).reshape(6, 5, 4) * 331 % 65536).astype(np.uint16)  # x, y, z
    nrrd.write(os.path.join(OUT, "ras_big.nhdr"), vol, ras, detached_header=True, index_order="F")
    reference("ras_big.nhdr")
    two = np.stack([vol, vol // 2], axis=0).astype(np.int32)  # c, x, y, z
    hdr = {
        "type": "int32",
        "space": "left-posterior-superior",
        "space directions": np.array([[np.nan] * 3, [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.5]]),
        "space origin": np.array([1.0, 2.0, 3.0]),
        "kinds": ["list", "domain", "domain", "domain"],
        "encoding": "raw",
        "endian": "little",
    }
    nrrd.write(os.path.join(OUT, "list2.nrrd"), two, hdr, index_order="F")
    reference("list2.nrrd", 2)

    # MetaImage written by hand: big-endian int16 and a TransformMatrix that is not the identity.
    t = rotation(0.0, 0.0, 0.4)
    data = (np.arange(6 * 5 * 4).reshape(4, 5, 6) - 50).astype(">i2")
    with open(os.path.join(OUT, "big_endian.mhd"), "w") as f:
        f.write(
            "ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = True\n"
            "CompressedData = False\nTransformMatrix = "
            + " ".join(repr(float(v)) for v in t.T.ravel())
            + "\nOffset = 1.5 -2.5 3.5\nCenterOfRotation = 0 0 0\nAnatomicalOrientation = RAI\n"
            "ElementSpacing = 0.5 0.75 1.25\nDimSize = 6 5 4\nElementType = MET_SHORT\n"
            "ElementDataFile = big_endian.raw\n"
        )
    data.tofile(os.path.join(OUT, "big_endian.raw"))
    reference("big_endian.mhd")

    # NIfTI geometry variants (nibabel writes the header fields as given).
    arr = np.arange(6 * 5 * 4, dtype=np.int16).reshape(6, 5, 4)  # x, y, z
    zooms = np.array([0.9, 1.1, 2.5])
    r = rotation(0.2, 0.1, -0.3)
    aff = np.eye(4)
    aff[:3, :3] = r * zooms
    aff[:3, 3] = [-40.0, 25.0, 60.0]
    qaff = np.eye(4)
    qaff[:3, :3] = rotation(0.0, 0.0, 0.25) * zooms
    qaff[:3, 3] = [5.0, 6.0, 7.0]

    def nifti(name, sform=None, scode=0, qform=None, qcode=0, pixdim=zooms):
        img = nib.Nifti1Image(arr, None)
        img.header.set_zooms(tuple(pixdim))
        img.header.set_sform(sform if sform is not None else np.eye(4), code=scode)
        img.header.set_qform(qform if qform is not None else np.eye(4), code=qcode)
        if qform is None:
            # set_qform(code=0) still writes a quaternion; the spec says qform_code 0 ignores it.
            img.header["quatern_b"] = img.header["quatern_c"] = img.header["quatern_d"] = 0
            img.header["qoffset_x"] = img.header["qoffset_y"] = img.header["qoffset_z"] = 0
            img.header["pixdim"][1:4] = pixdim
        nib.save(img, os.path.join(OUT, name))
        reference(name)

    nifti("nii_sform.nii", sform=aff, scode=2)
    nifti("nii_qform.nii", qform=qaff, qcode=1)
    # Both set and different: ITK takes a scanner-anatomical (code 1) sform, but an aligned
    # (code 2) sform only when it matches the qform, so these two read differently.
    nifti("nii_both.nii", sform=aff, scode=2, qform=qaff, qcode=1)
    nifti("nii_both_scanner.nii", sform=aff, scode=1, qform=qaff, qcode=1)
    shear = aff.copy()
    shear[0, 1] += 0.4
    nifti("nii_shear.nii", sform=shear, scode=2, qform=qaff, qcode=1)
    nifti("nii_pixdim.nii")
    # A sheared sform and no qform: SimpleITK refuses it, and so must we (no JSON).
    img = nib.Nifti1Image(arr, None)
    img.header.set_zooms(tuple(zooms))
    img.header.set_sform(shear, code=1)
    img.header.set_qform(np.eye(4), code=0)
    nib.save(img, os.path.join(OUT, "nii_shear_only.nii"))
    try:
        sitk.ReadImage(os.path.join(OUT, "nii_shear_only.nii"))
        raise SystemExit("SimpleITK read nii_shear_only.nii")
    except RuntimeError:
        pass
    flip = np.diag([-0.9, 1.1, -2.5, 1.0])
    flip[:3, 3] = [3.0, -4.0, 5.0]
    nifti("nii_flip.nii.gz", qform=flip, qcode=1)

    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
    print("total bytes", total, file=sys.stderr)


if __name__ == "__main__":
    main()
