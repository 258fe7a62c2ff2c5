#!/usr/bin/env python3
"""Writes the fixtures of tests/geometry.rs into tests/data/geometry/.

One small volume (a textured background of 0..20 and an off-centre ellipsoid of 100, whose
label map is the ellipsoid) is stored under two geometries, each in NIfTI, NRRD and MetaImage:
- `oblique`: a rotation with a flipped axis (left-handed), anisotropic spacing;
- `flipped`: axes permuted and flipped (x -> Right, y -> Superior, z -> Anterior).
Plus `oblique_perm`, the same image stored with its voxel axes permuted and flipped
(sitk.PermuteAxes + sitk.Flip keep the world geometry), and `oblique_canon`, SimpleITK's
DICOMOrient(image, "LPS") of it as NIfTI.

For every case CASE.json holds what SimpleITK reports: the geometry (LPS, ITK axis order), the
world centroid of the label (LabelShapeStatisticsImageFilter), and the canonical array and
geometry from sitk.DICOMOrient(image, "LPS") (voxels [z][y][x]). Run once (CI has no Python):

    python3 -m venv /work/venv-sitk && /work/venv-sitk/bin/pip install SimpleITK numpy
    /work/venv-sitk/bin/python scripts/geometry_fixtures.py
"""
import json
import os

import numpy as np
import SimpleITK as sitk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "data", "geometry")


def rotation(ax, ay, az):
    """Rz @ Ry @ Rx: a direction matrix rotated by the three angles (radians); the oblique
    fixtures of this script, scripts/volume_fixtures.py and scripts/dicom_fixtures.py."""
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def volume():
    """int16 image [z, y, x] = (6, 8, 10) and its uint8 label."""
    rng = np.random.default_rng(17)
    z, y, x = np.mgrid[0:6, 0:8, 0:10]
    blob = ((x - 6.3) / 2.6) ** 2 + ((y - 2.5) / 2.1) ** 2 + ((z - 3.7) / 1.9) ** 2 <= 1.0
    img = rng.integers(0, 21, size=blob.shape).astype(np.int16)
    img[blob] = 100
    return img, blob.astype(np.uint8)


def reference(name, img, lab):
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(lab)
    canon = sitk.DICOMOrient(img, "LPS")
    ref = {
        "spacing": list(img.GetSpacing()),
        "origin": list(img.GetOrigin()),
        "direction": list(img.GetDirection()),
        "label_centroid": list(stats.GetCentroid(1)),
        "label_voxels": int(stats.GetNumberOfPixels(1)),
        "canonical": {
            "size_xyz": list(canon.GetSize()),
            "spacing": list(canon.GetSpacing()),
            "origin": list(canon.GetOrigin()),
            "direction": list(canon.GetDirection()),
            "voxels": [float(v) for v in sitk.GetArrayFromImage(canon).ravel()],
        },
    }
    with open(os.path.join(OUT, name + ".json"), "w") as f:
        json.dump(ref, f, separators=(",", ":"))
    print(name, img.GetSize(), canon.GetSize(), stats.GetCentroid(1))


def write_all(name, img, lab):
    for ext in ["nii.gz", "nrrd", "mha"]:
        sitk.WriteImage(img, os.path.join(OUT, f"{name}.{ext}"), True)
    sitk.WriteImage(lab, os.path.join(OUT, f"{name}_label.nii.gz"), True)
    reference(name, img, lab)


def main():
    os.makedirs(OUT, exist_ok=True)
    for f in os.listdir(OUT):
        os.remove(os.path.join(OUT, f))
    arr, blob = volume()
    geometries = {
        "oblique": (rotation(0.3, -0.2, 0.5) @ np.diag([1.0, -1.0, 1.0]), (0.9, 1.2, 2.0), (-12.5, 30.25, 7.0)),
        "flipped": (np.array([[-1.0, 0, 0], [0, 0, -1.0], [0, 1.0, 0]]), (1.1, 0.8, 1.5), (40.0, -3.0, 12.5)),
    }
    for name, (d, spacing, origin) in geometries.items():
        img, lab = sitk.GetImageFromArray(arr), sitk.GetImageFromArray(blob)
        for im in (img, lab):
            im.SetDirection(d.ravel().tolist())
            im.SetSpacing(spacing)
            im.SetOrigin(origin)
        write_all(name, img, lab)
        if name == "oblique":
            # The same anatomy stored another way: world geometry kept, voxel order changed.
            perm = lambda im: sitk.Flip(sitk.PermuteAxes(im, [2, 0, 1]), [True, False, True])
            write_all("oblique_perm", perm(img), perm(lab))
            sitk.WriteImage(sitk.DICOMOrient(img, "LPS"), os.path.join(OUT, "oblique_canon.nii.gz"), True)


if __name__ == "__main__":
    main()
