#!/usr/bin/env python3
"""Cuts the small bundled samples in samples/ from ../shared/data (run from the repo root).

numpy, tifffile, pillow and nibabel are needed: pip install numpy tifffile pillow nibabel.
The crops keep the original dtypes (uint16/uint8 TIFF, int16 NIfTI with a shifted affine)."""
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import tifffile
from PIL import Image

SHARED = Path("../shared/data")
OUT = Path("samples")

# (split, source split, file stem, crop top-left y, x) -- 192x192 crops, chosen to hold nuclei.
NUCLEI = [
    ("train", "train", "2022-03-18_RPE1_3", 288, 338),
    ("train", "train", "2022-10-14_U2OS_5", 288, 338),
    ("train", "train", "2023-05-31_misc_2", 160, 160),
    ("train", "train", "2023-05-31_misc_8", 600, 600),
    ("val", "val", "2022-05-26_RPE1_2198", 288, 338),
    ("test", "test", "2023-05-31_misc_MAX_2021_3_25_hela_misseg_dcas9_1_chr1XCE568_DAPI_40x.lif - Series001", 160, 160),
    ("test", "test", "2023-05-31_misc_MCC13_rfpcyto_w1cDAPI_s43", 160, 160),
]
SIZE = 192


def nuclei():
    root = OUT / "nuclei"
    for split, src, stem, y, x in NUCLEI:
        img = tifffile.imread(SHARED / "nuclei-mnfinder" / src / "images" / f"{stem}.tif")
        mask = np.array(Image.open(SHARED / "nuclei-mnfinder" / src / "masks" / f"{stem}.png"))
        for sub in ("images", "masks"):
            (root / split / sub).mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(root / split / "images" / f"{stem}.tif", img[y:y + SIZE, x:x + SIZE])
        Image.fromarray(mask[y:y + SIZE, x:x + SIZE]).save(root / split / "masks" / f"{stem}.png")
    shutil.copy(SHARED / "nuclei-mnfinder" / "LICENSE.txt", root / "LICENSE.txt")


def lesions():
    root = OUT / "lesions"
    split = {"lung1": "test", "lung2": "train", "brain1": "train", "brain2": "train"}
    crop = np.array([64, 64, 16])  # x, y, z
    for name, sp in split.items():
        img = nib.load(SHARED / "lesions-pyradiomics" / "images" / f"{name}.nii.gz")
        lab = nib.load(SHARED / "lesions-pyradiomics" / "labels" / f"{name}.nii.gz")
        a, l = np.asanyarray(img.dataobj), np.asanyarray(lab.dataobj)
        centre = np.round(np.argwhere(l > 0).mean(0)).astype(int)
        lo = np.clip(centre - crop // 2, 0, np.array(a.shape) - crop)
        sl = tuple(slice(s, s + c) for s, c in zip(lo, crop))
        affine = img.affine.copy()
        affine[:3, 3] = img.affine[:3, :3] @ lo + img.affine[:3, 3]
        for sub, arr, ref in (("images", a[sl], img), ("labels", l[sl], lab)):
            (root / sp / sub).mkdir(parents=True, exist_ok=True)
            out = nib.Nifti1Image(np.ascontiguousarray(arr).astype(ref.get_data_dtype()), affine)
            nib.save(out, root / sp / sub / f"{name}.nii.gz")
    shutil.copy(SHARED / "lesions-pyradiomics" / "LICENSE.txt", root / "LICENSE.txt")


if __name__ == "__main__":
    nuclei()
    lesions()
