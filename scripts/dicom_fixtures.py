#!/usr/bin/env python3
"""Writes the DICOM series of tests/dicom.rs into tests/data/dicom/, with SimpleITK's reading of each.

Every series is written slice by slice with pydicom (one file per slice, DICM preamble), small
enough to commit (int16/uint16, a few KB a series):
- `oblique/`: a rotated, anisotropic grid (PixelSpacing rows 0.7, columns 0.9 mm; 2.5 mm between
  slices), file names and InstanceNumbers shuffled (neither follows the position), plus a
  README.txt and a DICOMDIR-like file (a DICOM object with no pixel data) to be skipped;
- `flipped/`: InstanceNumber and file names run against the slice normal (IOP x to the Right, so
  the normal points Inferior while the slices were stacked upwards);
- `rescale/`: unsigned samples with a different RescaleSlope/RescaleIntercept on every slice;
- `rle/`, `deflate/`: the oblique series in RLE Lossless and Deflated Explicit VR Little Endian;
- `two_series/`: a CT series and a two-slice localizer in one folder (an error that lists both);
- `missing_slice/`: one position of six left out (an error naming the gap);
- `duplicate/`: two files at one position (an error naming both);
- `multiframe/`: one enhanced (multi-frame) file (an error).
For each readable series NAME.json holds SimpleITK's reading (ImageSeriesReader over
GetGDCMSeriesFileNames, as float32): size (x, y, z), spacing, origin, direction (LPS, row by
row), the voxels [z][y][x], and the NIfTI affine in RAS (diag(-1,-1,1) . direction . spacing,
origin negated likewise). `oblique_label.nii.gz` is a label map on the oblique series' grid
written by SimpleITK (voxels above the series' median), for the data-folder tests.

Run once (CI has no Python):

    python3 -m venv /work/venv-dicom && /work/venv-dicom/bin/pip install pydicom SimpleITK numpy
    /work/venv-dicom/bin/python scripts/dicom_fixtures.py
"""
import json
import os
import shutil

import numpy as np
import pydicom
import SimpleITK as sitk
from geometry_fixtures import rotation  # scripts/ is on the path when a script of it runs
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "data", "dicom")
RNG = np.random.default_rng(17)
STUDY = "1.2.826.0.1.3680043.8.498.17"


def slice_ds(series, pixels, iop, ipp, spacing, instance, *, signed=True, slope=None, intercept=None,
             desc="CT series", modality="CT", syntax=ExplicitVRLittleEndian):
    rows, cols = pixels.shape
    uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = uid
    ds.StudyInstanceUID = STUDY
    ds.SeriesInstanceUID = series
    ds.Modality = modality
    ds.SeriesDescription = desc
    ds.PatientName = "Fixture^Dicom"
    ds.PatientID = "unetpp-17"
    ds.InstanceNumber = int(instance)
    ds.ImageOrientationPatient = [f"{v:.10g}" for v in iop]
    ds.ImagePositionPatient = [f"{v:.10g}" for v in ipp]
    ds.PixelSpacing = [f"{v:.10g}" for v in spacing]
    ds.SliceThickness = "2.5"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1 if signed else 0
    if slope is not None:
        ds.RescaleSlope = f"{slope:.10g}"
        ds.RescaleIntercept = f"{intercept:.10g}"
        ds.RescaleType = "HU"
    ds.PixelData = pixels.astype("<i2" if signed else "<u2").tobytes()
    if syntax == RLELossless:
        ds.compress(RLELossless, pixels.astype(np.int16 if signed else np.uint16))
    elif syntax == DeflatedExplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    return ds


def write_series(name, *, size=(7, 5, 5), spacing=(0.7, 0.9), dz=2.5, rot=np.eye(3), origin=(0, 0, 0),
                 against_normal=False, shuffle=False, signed=True, rescale=False, skip=(), syntax=None,
                 series=None, desc="CT series", clear=True, prefix="IM"):
    """One series; `size` is (columns, rows, slices). Returns the folder and the voxels [z][y][x]
    in stored (not rescaled) values, in order of position along the slice normal."""
    folder = os.path.join(OUT, name)
    if clear:
        shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder, exist_ok=True)
    cols, rows, n = size
    row_dir, col_dir = rot[:, 0], rot[:, 1]
    normal = np.cross(row_dir, col_dir)
    series = series or generate_uid()
    k = np.arange(n)
    z, y, x = np.meshgrid(k, np.arange(rows), np.arange(cols), indexing="ij")
    stored = (x * 3 + y * 40 + z * 200 + (x * y) % 7 - (300 if signed else 0)).astype(np.int64)
    instances = RNG.permutation(n) + 1 if shuffle else (n - k if against_normal else k + 1)
    names = RNG.permutation(n) if shuffle else (n - 1 - k if against_normal else k)
    for i in range(n):
        if i in skip:
            continue
        ipp = np.asarray(origin) + i * dz * normal
        slope, intercept = ((0.5 + 0.75 * i, -1024.0 + 10 * i) if rescale else (None, None))
        ds = slice_ds(series, stored[i], list(row_dir) + list(col_dir), ipp, spacing, instances[i], signed=signed,
                      slope=slope, intercept=intercept, desc=desc, syntax=syntax or ExplicitVRLittleEndian)
        ds.save_as(os.path.join(folder, f"{prefix}{names[i]:04d}"), enforce_file_format=True)
    return folder, stored


def sitk_reference(name, folder):
    reader = sitk.ImageSeriesReader()
    uids = reader.GetGDCMSeriesIDs(folder)
    assert len(uids) == 1, (name, uids)
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(folder, uids[0]))
    reader.SetOutputPixelType(sitk.sitkFloat32)
    img = reader.Execute()
    d = np.array(img.GetDirection()).reshape(3, 3)
    s = np.array(img.GetSpacing())
    flip = np.diag([-1.0, -1.0, 1.0])
    affine = np.eye(4)
    affine[:3, :3] = flip @ d @ np.diag(s)
    affine[:3, 3] = flip @ np.array(img.GetOrigin())
    ref = {
        "size": list(img.GetSize()),
        "spacing": list(img.GetSpacing()),
        "origin": list(img.GetOrigin()),
        "direction": list(img.GetDirection()),
        "affine_ras": affine.tolist(),
        "voxels": sitk.GetArrayFromImage(img).astype(float).ravel().tolist(),
    }
    with open(os.path.join(OUT, f"{name}.json"), "w") as f:
        json.dump(ref, f, indent=1)
    return img


def main():
    os.makedirs(OUT, exist_ok=True)
    oblique_rot = rotation(0.3, -0.2, 0.5)
    # 8 x 6 pixels: GDCM (SimpleITK) fails on the RLE of some odd sizes pydicom writes.
    common = dict(size=(8, 6, 5), spacing=(0.7, 0.9), dz=2.5, rot=oblique_rot, origin=(-20.5, 13.25, 40.0),
                  shuffle=True)
    folder, stored = write_series("oblique", **common)
    img = sitk_reference("oblique", folder)
    # Rescale is absent: the voxels are the stored values, sorted by position.
    assert np.array_equal(sitk.GetArrayFromImage(img), stored.astype(np.float32))
    label = sitk.Cast(img > float(np.median(stored)), sitk.sitkUInt8)
    sitk.WriteImage(label, os.path.join(OUT, "oblique_label.nii.gz"))
    with open(os.path.join(folder, "README.txt"), "w") as f:
        f.write("Not DICOM: the reader skips this file with a reason.\n")
    dicomdir = Dataset()
    dicomdir.file_meta = FileMetaDataset()
    dicomdir.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    dicomdir.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    dicomdir.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dicomdir.FileSetID = "UNETPP"
    dicomdir.save_as(os.path.join(folder, "DICOMDIR"), enforce_file_format=True)
    # SimpleITK ignores both extras too.
    assert np.array_equal(sitk.GetArrayFromImage(sitk_reference("oblique", folder)), sitk.GetArrayFromImage(img))

    for syntax, name in [(RLELossless, "rle"), (DeflatedExplicitVRLittleEndian, "deflate")]:
        folder, s = write_series(name, **common, syntax=syntax)
        assert pydicom.dcmread(os.path.join(folder, "IM0000")).file_meta.TransferSyntaxUID == syntax
        assert np.array_equal(sitk.GetArrayFromImage(sitk_reference(name, folder)), s.astype(np.float32))

    # x to the patient's Right, y Posterior: the normal points Inferior; slices stacked upwards.
    flipped = np.array([[-1.0, 0, 0], [0, 1, 0], [0, 0, -1]])
    folder, _ = write_series("flipped", size=(6, 4, 4), spacing=(1.25, 0.5), dz=3.0, rot=flipped,
                             origin=(5.0, -7.5, 100.0), against_normal=True)
    sitk_reference("flipped", folder)

    folder, stored = write_series("rescale", size=(5, 4, 3), rot=np.eye(3), signed=False, rescale=True)
    img = sitk_reference("rescale", folder)
    want = np.stack([stored[i] * (0.5 + 0.75 * i) + (-1024.0 + 10 * i) for i in range(3)]).astype(np.float32)
    assert np.allclose(sitk.GetArrayFromImage(img), want), "SimpleITK rescales each slice by its own slope"

    folder, _ = write_series("two_series", size=(4, 4, 3), desc="Abdomen 5mm")
    write_series("two_series", size=(4, 4, 2), rot=rotation(np.pi / 2, 0, 0), desc="Localizer", clear=False,
                 prefix="LOC")
    assert len(sitk.ImageSeriesReader().GetGDCMSeriesIDs(folder)) == 2

    write_series("missing_slice", size=(4, 3, 6), skip=(3,))
    folder, _ = write_series("duplicate", size=(4, 3, 3))
    shutil.copy(os.path.join(folder, "IM0001"), os.path.join(folder, "IM0001_copy"))
    ds = pydicom.dcmread(os.path.join(folder, "IM0001_copy"))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(os.path.join(folder, "IM0001_copy"), enforce_file_format=True)

    folder = os.path.join(OUT, "multiframe")
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    frames = np.arange(3 * 4 * 4, dtype=np.int16).reshape(3, 4, 4)
    ds = slice_ds(generate_uid(), frames[0], [1, 0, 0, 0, 1, 0], [0, 0, 0], (1, 1), 1)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    ds.NumberOfFrames = 3
    ds.PixelData = frames.tobytes()
    ds.save_as(os.path.join(folder, "enhanced.dcm"), enforce_file_format=True)


if __name__ == "__main__":
    main()
