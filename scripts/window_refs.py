#!/usr/bin/env python3
"""Writes tests/data/window_refs.json: nnU-Net's sliding-window maths on small cases, for
src/infer/window.rs's tests (CI has no Python; run this once and commit its output).

The two functions below follow nnunetv2/inference/sliding_window_prediction.py (compute_gaussian,
compute_steps_for_sliding_window) step for step, on numpy/scipy only (nnU-Net's own copy needs torch
and a GPU device argument): scipy.ndimage.gaussian_filter of a centred impulse with sigma = 1/8 of
the tile, scaled to a maximum of 1, zeros replaced by the smallest non-zero value; steps of at most
tile_step_size (= 1 - our --overlap) of a tile, spread evenly, rounded by np.round.

    python3 -m venv v && v/bin/pip install numpy scipy
    v/bin/python scripts/window_refs.py tests/data/window_refs.json
"""
import json
import sys

import numpy as np
import scipy
from scipy.ndimage import gaussian_filter


def compute_gaussian(tile_size, sigma_scale=1.0 / 8):
    tmp = np.zeros(tile_size)
    tmp[tuple(i // 2 for i in tile_size)] = 1
    g = gaussian_filter(tmp, [i * sigma_scale for i in tile_size], 0, mode="constant", cval=0)
    g = g / np.max(g)
    g[g == 0] = np.min(g[g != 0])
    return g


def compute_steps(image_size, tile_size, tile_step_size):
    target = [i * tile_step_size for i in tile_size]
    num_steps = [int(np.ceil((i - k) / j)) + 1 for i, j, k in zip(image_size, target, tile_size)]
    steps = []
    for dim in range(len(tile_size)):
        max_step = image_size[dim] - tile_size[dim]
        actual = max_step / (num_steps[dim] - 1) if num_steps[dim] > 1 else 99999999999
        steps.append([int(np.round(actual * i)) for i in range(num_steps[dim])])
    return steps


def main(out):
    gaussians = []
    for tile in [(1, 8, 6), (5, 12, 7), (6, 16, 10), (2, 3, 64)]:
        g = compute_gaussian(tile)
        gaussians.append({"tile": list(tile), "map": [float(v) for v in g.ravel()]})
    steps = []
    for length, tile, overlap in [
        (110, 64, 0.5), (128, 64, 0.5), (129, 64, 0.5), (200, 64, 0.25), (200, 64, 0.0), (333, 96, 0.5),
        (21, 8, 0.5), (512, 128, 0.5), (512, 128, 0.25), (97, 32, 0.7), (1000, 160, 0.5), (70, 64, 0.9),
    ]:
        steps.append({"len": length, "tile": tile, "overlap": overlap,
                      "steps": compute_steps((length,), (tile,), 1.0 - overlap)[0]})
    doc = {"numpy": np.__version__, "scipy": scipy.__version__, "gaussians": gaussians, "steps": steps}
    with open(out, "w") as f:
        json.dump(doc, f)
        f.write("\n")


if __name__ == "__main__":
    main(sys.argv[1])
