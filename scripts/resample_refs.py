"""Reference outputs for tests/resample.rs: nnU-Net v2's default resampling, written here with the
same library calls and arguments as nnunetv2/preprocessing/resampling/default_resampling.py
(skimage.transform.resize for each (slice of the) volume, scipy map_coordinates order 0 along a
separate coarse axis), on small seeded arrays.

Run once (outputs are committed):
    python3 -m venv /work/venv-resample && /work/venv-resample/bin/pip install numpy scipy scikit-image
    /work/venv-resample/bin/python scripts/resample_refs.py
Writes tests/data/resample/<case>.json; arrays are flat, C order ([z][y][x]), floats as float32.
"""

import json
import os

import numpy as np
import scipy
import skimage
from scipy.ndimage import map_coordinates
from skimage.transform import resize

ANISO = 3.0
OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "resample")


def new_shape(shape, spacing, target):
    # compute_new_shape: int(round(old_spacing / new_spacing * old_shape)), Python's round.
    return [int(round(s / t * n)) for s, t, n in zip(spacing, target, shape)]


def separate_axis(spacing, target):
    # get_do_separate_z on the old spacing, else the new; get_lowres_axis; one axis only.
    for s in (spacing, target):
        s = np.array(s, dtype=float)
        if s.max() / s.min() > ANISO:
            axes = np.where(s == s.max())[0]
            return int(axes[0]) if len(axes) == 1 else None
    return None


def along_axis_nearest(vol, shape_out):
    # nnU-Net's separate-z map_coordinates call (order 0, mode nearest).
    scales = [float(a) / b for a, b in zip(vol.shape, shape_out)]
    grid = np.mgrid[: shape_out[0], : shape_out[1], : shape_out[2]].astype(float)
    coords = np.array([s * (g + 0.5) - 0.5 for s, g in zip(scales, grid)])
    return map_coordinates(vol, coords, order=0, mode="nearest")


def resample(vol, shape_out, axis, order):
    """One channel as nnU-Net's resample_data_or_seg with is_seg=False (order in-plane, 0 along axis)."""
    vol = vol.astype(float)
    if list(vol.shape) == list(shape_out):
        return vol
    kw = dict(mode="edge", anti_aliasing=False)
    if axis is None:
        return resize(vol, shape_out, order, **kw)
    plane = [n for a, n in enumerate(shape_out) if a != axis]
    slices = [resize(np.take(vol, i, axis=axis), plane, order, **kw) for i in range(vol.shape[axis])]
    v = np.stack(slices, axis)
    return along_axis_nearest(v, shape_out) if v.shape[axis] != shape_out[axis] else v


def labels_argmax(lab, shape_out, axis):
    """Linear on each class's one-hot, then the arg-max, ties to the higher label."""
    classes = np.unique(lab)
    soft = np.stack([resample((lab == c).astype(float), shape_out, axis, 1) for c in classes])
    return classes[len(classes) - 1 - np.argmax(soft[::-1], axis=0)]


def labels_nnunet(lab, shape_out, axis):
    """batchgenerators' resize_segmentation (order 1) in-plane / in 3D, nearest along the axis."""
    def resize_seg(seg, shape):
        out = np.zeros(shape, dtype=seg.dtype)
        for c in np.unique(seg):
            out[resize((seg == c).astype(float), shape, 1, mode="edge", clip=True, anti_aliasing=False) >= 0.5] = c
        return out

    if axis is None:
        return resize_seg(lab, shape_out)
    plane = [n for a, n in enumerate(shape_out) if a != axis]
    v = np.stack([resize_seg(np.take(lab, i, axis=axis), plane) for i in range(lab.shape[axis])], axis)
    return along_axis_nearest(v.astype(float), shape_out).astype(lab.dtype) if v.shape[axis] != shape_out[axis] else v


def f32(a):
    """Floats as their shortest float32 text: exact for the f32 inputs, within 6e-8 for outputs."""
    return [float(str(v)) for v in np.asarray(a, dtype=np.float32).ravel()]


def blocky_labels(rng, shape, classes):
    coarse = rng.integers(0, classes, size=[max(1, (n + 2) // 3) for n in shape])
    idx = np.ix_(*[np.minimum(np.arange(n) // 3, c - 1) for n, c in zip(shape, coarse.shape)])
    return coarse[idx].astype(np.uint8)


CASES = {
    # name: (shape [z, y, x], spacing, target)
    "iso_down": ([7, 9, 11], [1.0, 1.0, 1.0], [1.5, 1.3, 1.7]),
    "iso_up": ([5, 6, 7], [1.0, 0.9, 0.8], [0.6, 0.5, 0.45]),
    "aniso_down": ([6, 12, 13], [4.0, 0.7, 0.7], [2.5, 1.0, 1.0]),
    "aniso_up": ([5, 8, 9], [3.5, 1.0, 1.0], [2.0, 0.6, 0.6]),
    "aniso_y": ([9, 4, 10], [1.0, 5.0, 1.2], [0.8, 3.0, 0.7]),
    "aniso_target": ([10, 8, 7], [1.0, 1.0, 1.0], [4.0, 0.9, 1.1]),
}


def main():
    os.makedirs(OUT, exist_ok=True)
    rng = np.random.default_rng(17)
    for name, (shape, spacing, target) in CASES.items():
        to = new_shape(shape, spacing, target)
        axis = separate_axis(spacing, target)
        # Smooth structure plus noise, in CT-like units.
        grid = np.mgrid[: shape[0], : shape[1], : shape[2]].astype(float)
        image = 300 * np.sin(grid[0] * 0.7 + grid[1] * 0.4) * np.cos(grid[2] * 0.5) + rng.normal(0, 100, shape)
        image = image.astype(np.float32)
        lab = blocky_labels(rng, shape, 4)
        lab2 = blocky_labels(rng, shape, 2)
        logits = rng.normal(0, 2, [3] + shape)
        probs = (np.exp(logits) / np.exp(logits).sum(0)).astype(np.float32)
        case = {
            "versions": {"numpy": np.__version__, "scipy": scipy.__version__, "skimage": skimage.__version__},
            "shape": shape,
            "spacing": spacing,
            "target": target,
            "new_shape": to,
            "separate": axis,
            "image": f32(image),
            "image_out": f32(resample(image, to, axis, 3)),
            "labels": lab.ravel().tolist(),
            "labels_out": labels_argmax(lab, to, axis).ravel().tolist(),
            "labels_nnunet_out": labels_nnunet(lab, to, axis).ravel().tolist(),
            "labels2": lab2.ravel().tolist(),
            "labels2_nnunet_out": labels_nnunet(lab2, to, axis).ravel().tolist(),
            "probs": f32(probs),
            "probs_out": f32(np.stack([resample(p, to, axis, 1) for p in probs])),
        }
        with open(os.path.join(OUT, name + ".json"), "w") as f:
            json.dump(case, f, separators=(",", ":"))
        print(name, shape, "->", to, "separate axis", axis)


if __name__ == "__main__":
    main()
