"""Shared fixtures: the repository's files, the CLI binary, a tiny model trained once, and
pure-Python writers/readers (PNG, safetensors) so that the suite needs only numpy."""

import json
import os
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest

import unetpp

REPO = Path(__file__).resolve().parents[2]
NUCLEI = REPO / "samples" / "nuclei"
TORCH = REPO / "tests" / "data" / "torch"

# As tests/cli.rs's TINY_2D: width 4, depth 2, 32x32 patches, two steps; imagenet normalisation
# so that the array's dtype (its full scale) matters.
TINY = {
    "data": str(NUCLEI),
    "epochs": 1,
    "steps_per_epoch": 2,
    "batch_size": 2,
    "patch": [1, 32, 32],
    "tile": [1, 64, 64],
    "model": {"width": 4, "depth": 2},
    "input": {"normalize": "imagenet"},
}


def unetpp_cli() -> Path:
    """The `unetpp` binary of this checkout: $UNETPP_BIN, else the release build."""
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    path = Path(os.environ.get("UNETPP_BIN", target / "release" / "unetpp"))
    if not path.is_file():
        pytest.fail(f"no unetpp binary at {path}: run `cargo build --release` or set UNETPP_BIN")
    return path


def run_cli(*args) -> str:
    r = subprocess.run([str(unetpp_cli()), *map(str, args)], check=False, capture_output=True, text=True)
    assert r.returncode == 0, f"unetpp {' '.join(map(str, args))} failed:\n{r.stderr}"
    return r.stderr


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A run directory trained once with TINY, with the progress events it reported."""
    events = []
    run = unetpp.train(TINY, tmp_path_factory.mktemp("tiny") / "run", progress=lambda *e: events.append(e))
    return run, events


@pytest.fixture(scope="session")
def tiny(tiny_run):
    return unetpp.load(tiny_run[0] / "checkpoints" / "best.unetpp")


def blobs(h, w, seed=0, scale=60000):
    """A 16-bit grey image of bright discs on a noisy background (nuclei-like)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:h, :w]
    img = rng.normal(3000, 800, (h, w))
    for _ in range(6):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(4, 12)
        img[(y - cy) ** 2 + (x - cx) ** 2 < r * r] += scale / 2
    return np.clip(img, 0, 65535).astype(np.uint16)


def write_png(path: Path, img: np.ndarray) -> None:
    """A grey PNG (8- or 16-bit, from the dtype), unfiltered."""
    h, w = img.shape
    depth = 16 if img.dtype == np.uint16 else 8
    rows = img.astype(">u2" if depth == 16 else "u1").tobytes()
    stride = w * depth // 8
    raw = b"".join(b"\0" + rows[i * stride : (i + 1) * stride] for i in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, depth, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def read_safetensors(path: Path) -> dict:
    """Name -> numpy array (float16/32/64, int64)."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    dtypes = {"F16": "<f2", "F32": "<f4", "F64": "<f8", "I64": "<i8"}
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        a, b = t["data_offsets"]
        out[name] = np.frombuffer(data[8 + n + a : 8 + n + b], dtype=dtypes[t["dtype"]]).reshape(t["shape"])
    return out
