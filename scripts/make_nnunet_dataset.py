#!/usr/bin/env python3
"""Builds nnU-Net v2 raw data sets (DatasetXXX_Name/{dataset.json,imagesTr,labelsTr,imagesTs,labelsTs})
from the shared volumes, for `unetpp train --data DatasetXXX_Name` (issue #17).

    python3 -m venv /work/venv-nnunet && /work/venv-nnunet/bin/pip install numpy nibabel
    /work/venv-nnunet/bin/python scripts/make_nnunet_dataset.py OUT            # two data sets into OUT
    /work/venv-nnunet/bin/python scripts/make_nnunet_dataset.py --fixture OUT  # the test fixture + reference.json

The shared data has one modality per scan, so every second channel here is DERIVED, not measured:
the first channel smoothed with a 3x3x3 mean filter. It is named `smoothed` in dataset.json, so
it gets nnU-Net's default per-case z-score while channel 0 (`CT`) gets the CT scheme.

- Dataset501_LungLesions (two channels): the pyradiomics lung CTs, lung2 cut into two cases along
  z (slices 0-29, 30-60) for imagesTr, lung1 in imagesTs with its label in labelsTs (nnU-Net's
  format has no labelsTs; unetpp's eval reads test labels from there). Labels: background, lesion.
- Dataset502_ChestCT (one channel, anisotropic and resampled): the slicerio chest CT (3.05 x 3.05 x
  10 mm) cut into three cases along z: slices 0-11 and 22-33 in imagesTr, the second resampled
  in-plane to half the resolution (6.1 x 6.1 x 10 mm, image by 2x2 mean, labels by taking every
  second voxel), so the cases differ in spacing as real data sets do; slices 12-21 in imagesTs
  with labelsTs, to evaluate on (the same patient: a check of the workflow, not a result).
  Labels: the 7 named structures.
- Dataset503_BrainMR (one channel, `MR`): the two pyradiomics brain MRs (0.78 x 0.78 x 6.5 mm),
  both in imagesTr, for the plan's choices on a channel that is not CT (per-case z-score).
- --fixture: tests/data/nnunet/Dataset990_Tiny, five 16^3 crops of the chest CT (4 train, 1 test),
  channels CT + smoothed, labels background / lung (5, 6) / spine (2, 3, 4); everything else is
  background. reference.json holds numpy's values for the tests: the CT fingerprint over every
  foreground voxel of imagesTr (mean, population std, np.percentile 0.5 / 99.5) and both channels
  of the test case normalised as nnU-Net's CTNormalization / ZScoreNormalization do.
"""
import json
import os
import sys

import nibabel as nib
import numpy as np

SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "shared", "data")
if not os.path.isdir(SHARED):
    SHARED = "/work/shared/data"


def load(path):
    img = nib.load(path)
    return np.asarray(img.dataobj), img.affine


def smoothed(a):
    """3x3x3 mean with edge padding, as float32 (the derived second channel)."""
    p = np.pad(a.astype(np.float64), 1, mode="edge")
    out = np.zeros(a.shape, np.float64)
    for dx in range(3):
        for dy in range(3):
            for dz in range(3):
                out += p[dx:dx + a.shape[0], dy:dy + a.shape[1], dz:dz + a.shape[2]]
    return (out / 27).astype(np.float32)


def save(a, affine, path):
    img = nib.Nifti1Image(a, affine)
    img.header.set_xyzt_units("mm")
    nib.save(img, path)


def write_dataset(root, name, channels, labels, train, test):
    """train/test: lists of (case, [channel arrays], label array, affine)."""
    d = os.path.join(root, name)
    # A data set is written whole or not at all: old cases left beside new ones would be trained on.
    if os.path.exists(d):
        sys.exit(f"{d} exists: remove it or choose another OUT")
    for sub in ["imagesTr", "labelsTr"] + (["imagesTs", "labelsTs"] if test else []):
        os.makedirs(os.path.join(d, sub))
    for split, cases in [("Tr", train), ("Ts", test)]:
        for case, chans, label, affine in cases:
            assert len(chans) == len(channels)
            for c, a in enumerate(chans):
                save(a, affine, os.path.join(d, f"images{split}", f"{case}_{c:04d}.nii.gz"))
            save(label.astype(np.uint8), affine, os.path.join(d, f"labels{split}", f"{case}.nii.gz"))
    meta = {
        "channel_names": {str(i): n for i, n in enumerate(channels)},
        "labels": {n: i for i, n in enumerate(labels)},
        "numTraining": len(train),
        "file_ending": ".nii.gz",
        "name": name,
        "description": "built by unetpp's scripts/make_nnunet_dataset.py"
        + ("; channel `smoothed` is derived" if "smoothed" in channels else ""),
    }
    with open(os.path.join(d, "dataset.json"), "w") as f:
        json.dump(meta, f, indent=2)
    return d


def with_z_origin(affine, z0):
    a = affine.copy()
    a[:3, 3] += affine[:3, 2] * z0
    return a


def lesions(out):
    root = os.path.join(SHARED, "lesions-pyradiomics")
    ct2, aff2 = load(os.path.join(root, "images", "lung2.nii.gz"))
    lb2, _ = load(os.path.join(root, "labels", "lung2.nii.gz"))
    ct1, aff1 = load(os.path.join(root, "images", "lung1.nii.gz"))
    lb1, _ = load(os.path.join(root, "labels", "lung1.nii.gz"))
    train = []
    for case, (z0, z1) in [("lung2a", (0, 30)), ("lung2b", (30, ct2.shape[2]))]:
        a = ct2[:, :, z0:z1]
        train.append((case, [a, smoothed(a)], lb2[:, :, z0:z1], with_z_origin(aff2, z0)))
    test = [("lung1", [ct1, smoothed(ct1)], lb1, aff1)]
    return write_dataset(out, "Dataset501_LungLesions", ["CT", "smoothed"], ["background", "lesion"], train, test)


def chest(out):
    root = os.path.join(SHARED, "chest-ct-slicerio")
    ct, aff = load(os.path.join(root, "image.nii.gz"))
    lb, _ = load(os.path.join(root, "labels.nii.gz"))
    names = ["background", "ribs", "cervical spine", "thoracic spine", "lumbar spine", "right lung", "left lung",
             "tissue"]
    # z pieces: 0-11 and 22-33 to train (the second at half the in-plane resolution), 12-21 to test.
    bottom = ct[:, :, 22:]
    half = bottom.reshape(64, 2, 64, 2, -1).astype(np.float32).mean(axis=(1, 3))
    aff_half = with_z_origin(aff, 22)
    aff_half[:3, :2] *= 2
    train = [("chest_top", [ct[:, :, :12]], lb[:, :, :12], aff),
             ("chest_bottom_half_res", [half], lb[::2, ::2, 22:], aff_half)]
    test = [("chest_mid", [ct[:, :, 12:22]], lb[:, :, 12:22], with_z_origin(aff, 12))]
    return write_dataset(out, "Dataset502_ChestCT", ["CT"], names, train, test)


def brain(out):
    """The two MR volumes, both to train: a data set whose channel is not CT (per-case z-score)."""
    root = os.path.join(SHARED, "lesions-pyradiomics")
    train = []
    for case in ["brain1", "brain2"]:
        a, affine = load(os.path.join(root, "images", f"{case}.nii.gz"))
        lab, _ = load(os.path.join(root, "labels", f"{case}.nii.gz"))
        train.append((case, [a], lab, affine))
    return write_dataset(out, "Dataset503_BrainMR", ["MR"], ["background", "lesion"], train, [])


def fixture(out):
    ct, aff = load(os.path.join(SHARED, "chest-ct-slicerio", "image.nii.gz"))
    lb, _ = load(os.path.join(SHARED, "chest-ct-slicerio", "labels.nii.gz"))
    three = np.zeros_like(lb)
    three[np.isin(lb, [5, 6])] = 1
    three[np.isin(lb, [2, 3, 4])] = 2
    # Five 16^3 boxes holding both lung and spine.
    origins = [(48, 36, 10), (60, 40, 4), (56, 44, 18), (48, 40, 14), (60, 36, 12)]
    cases = []
    for i, (x, y, z) in enumerate(origins):
        sl = (slice(x, x + 16), slice(y, y + 16), slice(z, z + 16))
        a = ct[sl].astype(np.int16)
        lab = three[sl]
        assert (lab == 1).any() and (lab == 2).any(), f"box {i} lacks a class: {np.bincount(lab.ravel())}"
        affine = aff.copy()
        affine[:3, 3] = aff[:3, :3] @ np.array([x, y, z]) + aff[:3, 3]
        cases.append((f"tiny{i}", [a, smoothed(a)], lab, affine))
    d = write_dataset(out, "Dataset990_Tiny", ["CT", "smoothed"], ["background", "lung", "spine"], cases[:4], cases[4:])

    # nnU-Net's fingerprint, over every foreground voxel instead of 10,000 samples per case.
    fg = np.concatenate([c[1][0][c[2] > 0].astype(np.float64).ravel() for c in cases[:4]])
    stats = {"mean": float(fg.mean()), "std": float(fg.std()), "percentile_00_5": float(np.percentile(fg, 0.5)),
             "percentile_99_5": float(np.percentile(fg, 99.5)), "voxels": int(fg.size)}
    # The test case, as CTNormalization and ZScoreNormalization give it; [z][y][x] order (unetpp's).
    name, (c0, c1), _, _ = cases[4]
    ct_norm = (np.clip(c0.astype(np.float64), stats["percentile_00_5"], stats["percentile_99_5"]) - stats["mean"]) \
        / max(stats["std"], 1e-8)
    c1 = c1.astype(np.float64)
    z_norm = (c1 - c1.mean()) / max(c1.std(), 1e-8)
    # Every 7th voxel keeps the file small and still crosses both clipping bounds.
    idx = list(range(0, c0.size, 7))
    ref = {
        "ct_fingerprint": stats,
        "test_case": name,
        "voxel_indices": idx,
        "channel0_ct": ct_norm.transpose(2, 1, 0).ravel()[idx].tolist(),
        "channel1_zscore": z_norm.transpose(2, 1, 0).ravel()[idx].tolist(),
    }
    with open(os.path.join(out, "reference.json"), "w") as f:
        json.dump(ref, f)
    return d


def main():
    args = sys.argv[1:]
    if len(args) == 2 and args[0] == "--fixture":
        print(fixture(args[1]))
    elif len(args) == 1 and not args[0].startswith("-"):
        print(lesions(args[0]))
        print(chest(args[0]))
        print(brain(args[0]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
