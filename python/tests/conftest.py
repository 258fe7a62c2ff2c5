"""Shared fixtures: the repository's files, the CLI binary, a tiny model trained once, and
pure-Python writers/readers (PNG, safetensors) so that the suite needs only numpy."""

import json
import os
import struct
import subprocess
import sys
import types
import zlib
from pathlib import Path

import numpy as np
import pytest

import unetpp

REPO = Path(__file__).resolve().parents[2]
NUCLEI = REPO / "samples" / "nuclei"
LESIONS = REPO / "samples" / "lesions"
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


# A 3D model as tests/common's Tiny::D3: one step of one 16x32x32 patch, the data's own normalisation.
TINY_3D = dict(TINY, data=str(LESIONS), steps_per_epoch=1, batch_size=1, patch=[16, 32, 32], tile=[16, 32, 32])
del TINY_3D["input"]


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


@pytest.fixture(scope="session")
def tiny_3d(tmp_path_factory):
    run = unetpp.train(TINY_3D, tmp_path_factory.mktemp("tiny3d") / "run", progress=False)
    return unetpp.load(run / "checkpoints" / "best.unetpp")


@pytest.fixture
def tqdm_bars(monkeypatch):
    """A stand-in tqdm.auto whose bars record themselves in the list returned."""
    bars = []

    class Bar:
        def __init__(self, total, desc, unit):
            self.total, self.desc, self.unit, self.n, self.closed, self.postfix = total, desc, unit, 0, False, ""
            bars.append(self)

        def update(self, k):
            self.n += k

        def set_postfix_str(self, s, refresh=True):
            self.postfix = s

        def close(self):
            self.closed = True

    auto = types.ModuleType("tqdm.auto")
    auto.tqdm = Bar
    monkeypatch.setitem(sys.modules, "tqdm", types.ModuleType("tqdm"))
    monkeypatch.setitem(sys.modules, "tqdm.auto", auto)
    return bars


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


def write_mha(path: Path, volume: np.ndarray) -> None:
    """A float32 MetaImage of a D x H x W array (x fastest, as numpy's C order), 1 mm voxels,
    identity direction: already in the layout the network is given (LPS-aligned)."""
    d, h, w = volume.shape
    header = (
        "ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
        f"DimSize = {w} {h} {d}\nElementSpacing = 1 1 1\nTransformMatrix = 1 0 0 0 1 0 0 0 1\n"
        "ElementType = MET_FLOAT\nElementDataFile = LOCAL\n"
    )
    path.write_bytes(header.encode() + volume.astype("<f4").tobytes())


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
