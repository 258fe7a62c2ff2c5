#!/usr/bin/env python3
"""Writes tests/data/metrics/refs.json: small random masks and what the reference tools compute
on them, for tests/metrics.rs (CI has no Python; run this once and commit its output).

- scipy.ndimage.distance_transform_edt(~feature, sampling=spacing) on random feature grids
  (anisotropic spacing, 2D and 3D);
- MONAI's compute_hausdorff_distance(percentile=95) and compute_surface_dice (use_subvoxels=False)
  on random blob pairs, binary and multi-class, 2D and 3D, with anisotropic spacing;
- scipy.ndimage.label component sizes with face (6/4) and full (26/8) connectivity;
- MONAI's HD95 and NSD on the bundled real lesion labels (samples/lesions, NIfTI spacing) against
  the same label moved by a few voxels (`np.roll`).

Masks are stored as strings of '0'..'9' (label ids), voxels in [z][y][x] order (x fastest).
Run with numpy, scipy, torch and monai (e.g. python3 -m venv v && v/bin/pip install torch scipy
monai==1.6.1):

    v/bin/python scripts/metrics_refs.py tests/data/metrics/refs.json
"""
import gzip
import json
import struct
import sys
from pathlib import Path
import warnings

import monai
import numpy as np
import scipy
import torch
from monai.metrics import compute_hausdorff_distance, compute_surface_dice
from scipy import ndimage

warnings.filterwarnings("ignore")
rng = np.random.default_rng(20261202)


def enc(a):
    return "".join(str(int(v)) for v in a.reshape(-1))


def blobs(shape, labels, smooth):
    """Label map of thresholded smoothed noise: a few irregular blobs per label."""
    out = np.zeros(shape, dtype=np.uint8)
    for c in range(1, labels + 1):
        field = ndimage.gaussian_filter(rng.standard_normal(shape), smooth)
        out[field > np.quantile(field, 0.8)] = c
    return out


def perturb(m, labels, smooth):
    """A 'prediction': the reference with some blobs moved and noise added."""
    shift = tuple(int(s) for s in rng.integers(-1, 2, size=m.ndim))
    p = np.roll(m, shift, axis=tuple(range(m.ndim)))
    noise = blobs(m.shape, labels, smooth)
    keep = rng.random(m.shape) < 0.97
    return np.where(keep & (noise == 0), p, noise).astype(np.uint8)


def one_hot(m, labels):
    return torch.from_numpy(np.stack([(m == c) for c in range(labels + 1)])[None].astype(np.float32))


def to3(shape):
    return [1] + list(shape) if len(shape) == 2 else list(shape)


def read_nifti_labels(path):
    """A uint8 NIfTI-1 label volume as [z][y][x] and its pixdim spacing in the same order."""
    raw = gzip.open(path).read()
    dim = struct.unpack("<8h", raw[40:56])
    datatype = struct.unpack("<h", raw[70:72])[0]
    pixdim = struct.unpack("<8f", raw[76:108])
    offset = int(struct.unpack("<f", raw[108:112])[0])
    assert dim[0] == 3 and datatype == 2, (dim, datatype)
    nx, ny, nz = dim[1:4]
    data = np.frombuffer(raw[offset:offset + nx * ny * nz], dtype=np.uint8).reshape(nz, ny, nx)
    return data, [float(pixdim[3]), float(pixdim[2]), float(pixdim[1])]


def main(out):
    edt = []
    for shape, spacing, p in [((6, 9, 11), (2.5, 0.7, 1.3), 0.03), ((17, 13), (0.9, 1.7), 0.05)]:
        feature = rng.random(shape) < p
        d = ndimage.distance_transform_edt(~feature, sampling=spacing)
        edt.append({"shape": to3(shape), "spacing": ([1.0] + list(spacing)) if len(shape) == 2 else list(spacing),
                    "feature": enc(feature), "distance": [float(v) for v in d.reshape(-1)]})

    surface = []
    for shape, spacing, labels, smooth, tol in [
        ((10, 24, 20), (3.0, 0.8, 0.6), 1, 2.0, 1.5),
        ((8, 20, 22), (2.0, 1.1, 0.9), 3, 1.5, 2.0),
        ((40, 36), (1.0, 1.0), 1, 2.5, 1.0),
        ((32, 30), (0.7, 1.3), 2, 2.0, 1.2),
        ((12, 16, 16), (1.0, 1.0, 1.0), 2, 1.2, 1.0),
    ]:
        truth = blobs(shape, labels, smooth)
        pred = perturb(truth, labels, smooth)
        y, yp = one_hot(truth, labels), one_hot(pred, labels)
        hd = compute_hausdorff_distance(yp, y, include_background=False, percentile=95, spacing=list(spacing))
        nsd = compute_surface_dice(yp, y, [tol] * labels, include_background=False, spacing=list(spacing))
        surface.append({
            "shape": to3(shape), "spacing": ([1.0] + list(spacing)) if len(shape) == 2 else list(spacing),
            "classes": labels + 1 if labels > 1 else 1, "tolerance": tol,
            "pred": enc(pred), "truth": enc(truth),
            "hd95": [float(v) for v in hd[0]], "nsd": [float(v) for v in nsd[0]],
        })

    components = []
    for shape, p in [((7, 9, 8), 0.12), ((15, 14), 0.4)]:
        m = rng.random(shape) < p
        entry = {"shape": to3(shape), "mask": enc(m)}
        for name, conn in [("face", 1), ("full", m.ndim)]:
            lab, n = ndimage.label(m, structure=ndimage.generate_binary_structure(m.ndim, conn))
            entry[name] = sorted(int(v) for v in np.bincount(lab.reshape(-1))[1:])
        components.append(entry)

    root = Path(__file__).resolve().parent.parent
    lesions = []
    for name, shift, tol in [("test/labels/lung1.nii.gz", (1, 2, 0), 2.0),
                             ("train/labels/brain1.nii.gz", (0, -1, 3), 1.5)]:
        truth, spacing = read_nifti_labels(root / "samples/lesions" / name)
        truth = (truth > 0).astype(np.uint8)
        pred = np.roll(truth, shift, axis=(0, 1, 2))
        y, yp = one_hot(truth, 1), one_hot(pred, 1)
        hd = compute_hausdorff_distance(yp, y, include_background=False, percentile=95, spacing=spacing)
        nsd = compute_surface_dice(yp, y, [tol], include_background=False, spacing=spacing)
        lesions.append({"file": "samples/lesions/" + name, "shift": list(shift), "spacing": spacing,
                        "tolerance": tol, "hd95": float(hd[0][0]), "nsd": float(nsd[0][0])})

    versions = {"numpy": np.__version__, "scipy": scipy.__version__, "torch": torch.__version__,
                "monai": monai.__version__}
    with open(out, "w") as f:
        json.dump({"versions": versions, "edt": edt, "surface": surface, "components": components,
                   "lesions": lesions}, f)
        f.write("\n")


if __name__ == "__main__":
    main(sys.argv[1])
