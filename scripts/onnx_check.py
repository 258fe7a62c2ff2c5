#!/usr/bin/env python3
"""Checks `unetpp export --format onnx` in ONNX Runtime, and times it.

`refs`: imports the PyTorch reference models of tests/data/torch (made by scripts/torch_refs.py:
pytorch-nested-unet's NestedUNet with bilinear align_corners=True, smp UnetPlusPlus on ResNets
with nearest up-sampling) with `unetpp import`, exports each with `unetpp export --format onnx`
in accurate and fast modes, validates the file with onnx.checker (full check: graph, types,
shape inference), runs it in ONNX Runtime on the stored input and compares the probabilities with
PyTorch's (sigmoid / softmax of the stored head logits; accurate = mean of the heads). It then
writes ONNX Runtime's output to tests/data/onnx/CASE-MODE.ort.f32 (raw little-endian float32;
the shape is the input's with the classes as channels), which tests/onnx.rs compares with our
own `predict`.

`bench`: median ONNX Runtime time of an exported model on 1x1xSxS inputs (the same counting as
`unetpp bench` and bench/peer.py: a warm-up, then at least `--reps` runs and a second of them).

Needs onnxruntime, onnx and numpy (scripts/peer-venv, or a venv with just those three); only
numpy to import, so that bench/peer.py takes its timing (`median_ms`) and sessions from here:

    python scripts/onnx_check.py refs target/release/unetpp
    python scripts/onnx_check.py bench model.onnx --sizes 96,256 --threads 2
"""
import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TORCH = ROOT / "tests" / "data" / "torch"
OUT = ROOT / "tests" / "data" / "onnx"

# case, weights file, modes (fast:j uses PyTorch's head j-1 where there are several heads)
CASES = [
    ("nested_c1_k1_ds", "pth", ["accurate", "fast:1", "fast:3"]),
    ("nested_c3_k3_ds", "safetensors", ["accurate", "fast:2"]),
    ("nested_c3_k1", "pth", ["accurate"]),
    ("smp_resnet18", "pth", ["accurate"]),
    ("smp_resnet34", "safetensors", ["accurate"]),
    ("smp_resnet50", "safetensors", ["accurate"]),
]

TOLERANCE = 1e-4


def read_safetensors(path):
    """float32 tensors of a .safetensors file (8-byte header length, JSON header, data)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        assert t["dtype"] == "F32", f"{path}: {name} is {t['dtype']}"
        a, b = t["data_offsets"]
        out[name] = np.frombuffer(raw[8 + n + a : 8 + n + b], dtype="<f4").reshape(t["shape"])
    return out


def probabilities(logits):
    if logits.shape[1] == 1:
        return 1.0 / (1.0 + np.exp(-logits))
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def expected(io, mode):
    heads = [probabilities(io[f"head{i}"].astype(np.float64)) for i in range(len(io) - 1)]
    if mode == "accurate":
        return sum(heads) / len(heads)
    j = int(mode.split(":")[1])
    return heads[j - 1] if len(heads) > 1 else heads[0]


def session(path, threads):
    """An ONNX Runtime CPU session on `threads` threads (one for running graphs in parallel)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def refs(unetpp):
    import onnx
    import onnxruntime as ort

    OUT.mkdir(parents=True, exist_ok=True)
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for case, ext, modes in CASES:
            ck = tmp / f"{case}.unetpp"
            subprocess.run([unetpp, "import", "--from", str(TORCH / f"{case}.{ext}"), "--out", str(ck)],
                           check=True, capture_output=True)
            io = read_safetensors(TORCH / f"{case}.io.safetensors")
            for mode in modes:
                path = tmp / f"{case}-{mode}.onnx"
                subprocess.run([unetpp, "export", "--checkpoint", str(ck), "--out", str(path), "--format", "onnx",
                                "--mode", mode], check=True, capture_output=True)
                model = onnx.load(str(path))
                onnx.checker.check_model(model, full_check=True)
                sess = session(path, 2)
                (got,) = sess.run(None, {sess.get_inputs()[0].name: io["input"]})
                want = expected(io, mode)
                assert got.shape == want.shape, f"{case} {mode}: shape {got.shape}, PyTorch {want.shape}"
                diff = float(np.abs(got - want).max())
                worst = max(worst, diff)
                print(f"{case} {mode}: {len(model.graph.node)} nodes, ONNX Runtime vs PyTorch max abs {diff:.2e}")
                assert diff <= TOLERANCE, f"{case} {mode}: ONNX Runtime differs from PyTorch by {diff}"
                name = mode.replace(":", "")
                (OUT / f"{case}-{name}.ort.f32").write_bytes(got.astype("<f4").tobytes())
    print(f"onnxruntime {ort.__version__}, onnx {onnx.__version__}: worst {worst:.2e}; refs in {OUT}")


def median_ms(f, reps):
    """The median of `f`'s times after a warm-up, as `unetpp bench` counts them: at least `reps`
    runs and, for short cases, a second of runs (at most 200)."""
    t = time.perf_counter()
    f()
    warm_ms = (time.perf_counter() - t) * 1e3
    reps = max(reps, min(200, math.ceil(1000 / max(warm_ms, 1e-3))))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    return times[len(times) // 2]


def bench(path, sizes, threads, reps):
    import onnxruntime as ort

    sess = session(path, threads)
    inp = sess.get_inputs()[0]
    channels = inp.shape[1]
    rows = []
    rng = np.random.default_rng(0)
    for s in sizes:
        x = rng.random((1, channels, s, s), dtype=np.float32)
        ms = median_ms(lambda: sess.run(None, {inp.name: x}), reps)
        rows.append({"case": f"1x{channels}x{s}x{s}", "peer": "onnxruntime", "median_ms": ms})
    print(json.dumps({"onnxruntime": ort.__version__, "threads": threads, "model": str(path), "rows": rows}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("refs", help="check against PyTorch and write tests/data/onnx")
    r.add_argument("unetpp", help="the unetpp binary")
    b = sub.add_parser("bench", help="time an exported model")
    b.add_argument("model")
    b.add_argument("--sizes", default="96,256")
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--reps", type=int, default=10)
    a = ap.parse_args()
    if a.cmd == "refs":
        refs(a.unetpp)
    else:
        bench(a.model, [int(s) for s in a.sizes.split(",")], a.threads, a.reps)


if __name__ == "__main__":
    sys.exit(main())
