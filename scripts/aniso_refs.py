"""Reference outputs for per-axis pooling and up-sampling (issue #17): PyTorch's max_pool2d/3d
with kernel = stride = a per-axis factor, and F.interpolate (nearest, bilinear/trilinear with
align_corners False) at per-axis scale factors, on small deterministic inputs.

Run once with /work/venv-torch/bin/python scripts/aniso_refs.py; writes
tests/data/aniso/refs.json, read by src/model/layers_tests.rs."""

import json
import pathlib

import torch
import torch.nn.functional as F


def ramp(shape):
    n = 1
    for s in shape:
        n *= s
    # The same values as the Rust test builds: ((i * 37) % 101) / 50 - 1.
    return torch.tensor([((i * 37) % 101) / 50.0 - 1.0 for i in range(n)], dtype=torch.float32).reshape(shape)


def flat(t):
    # 9 significant digits round-trip a float32 exactly.
    return [float(f"{v:.9g}") for v in t.flatten().tolist()]


cases = []
shape3 = [1, 2, 2, 4, 6]
shape2 = [1, 2, 4, 6]
for factor in ([1, 2, 2], [2, 1, 2], [2, 2, 1], [2, 2, 2], [1, 1, 2]):
    x = ramp(shape3)
    cases.append({"op": "max_pool", "shape": shape3, "factor": factor,
                  "out": flat(F.max_pool3d(x, factor, factor))})
    for mode in ("nearest", "trilinear"):
        kw = {} if mode == "nearest" else {"align_corners": False}
        y = F.interpolate(x, scale_factor=tuple(float(f) for f in factor), mode=mode, **kw)
        cases.append({"op": mode, "shape": shape3, "factor": factor, "out": flat(y)})
for factor in ([1, 2], [2, 1], [2, 2]):
    x = ramp(shape2)
    cases.append({"op": "max_pool", "shape": shape2, "factor": [1] + factor,
                  "out": flat(F.max_pool2d(x, factor, factor))})
    for mode in ("nearest", "bilinear"):
        kw = {} if mode == "nearest" else {"align_corners": False}
        y = F.interpolate(x, scale_factor=tuple(float(f) for f in factor), mode=mode, **kw)
        cases.append({"op": mode, "shape": shape2, "factor": [1] + factor, "out": flat(y)})

out = pathlib.Path(__file__).resolve().parent.parent / "tests/data/aniso/refs.json"
out.write_text(json.dumps({"torch": torch.__version__, "cases": cases}))
print(f"{len(cases)} cases -> {out}")
