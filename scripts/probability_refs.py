#!/usr/bin/env python3
"""Reference data for the lossless probability files (tests/report.rs, issue #20).

1. Writes tests/data/probabilities/values.json: a 3x5 float32 probability map (seeded random
   values plus 0, 1, 1/3, 1e-7, a subnormal and the float just below 1) as raw bit patterns, so
   no decimal round trip is involved.
2. Checks the files unetpp wrote from those values (tests/data/probabilities/unetpp.{npy,tif},
   written by `UNETPP_BLESS=1 cargo test --release --test report probabilities`): numpy.load and
   tifffile.imread must return the same bits, the .npy's data must equal numpy's own np.save
   output byte for byte, and both files must carry the mark (npy header comment, TIFF Software).

    python3 -m venv /work/venv-report && /work/venv-report/bin/pip install numpy tifffile
    /work/venv-report/bin/python scripts/probability_refs.py
"""
import json
import os
import sys

import numpy as np

HERE = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "probabilities")


def values():
    rng = np.random.default_rng(20)
    v = rng.random((3, 5), dtype=np.float32)
    special = [0.0, 1.0, 1 / 3, 1e-7, np.float32(1e-40), np.nextafter(np.float32(1), np.float32(0))]
    v.flat[: len(special)] = np.array(special, dtype=np.float32)
    return v


def main():
    os.makedirs(HERE, exist_ok=True)
    v = values()
    with open(os.path.join(HERE, "values.json"), "w") as f:
        json.dump({"shape": list(v.shape), "bits": [int(b) for b in v.view(np.uint32).ravel()]}, f)
        f.write("\n")
    npy, tif = os.path.join(HERE, "unetpp.npy"), os.path.join(HERE, "unetpp.tif")
    if not (os.path.exists(npy) and os.path.exists(tif)):
        print("values.json written; bless unetpp's files, then run this again to check them")
        return 0
    import io

    import tifffile

    got = np.load(npy)
    assert got.dtype == np.float32 and got.shape == v.shape, (got.dtype, got.shape)
    assert (got.view(np.uint32) == v.view(np.uint32)).all(), "npy values differ"
    ref = io.BytesIO()
    np.save(ref, v)
    ours = open(npy, "rb").read()
    assert ours[-v.nbytes:] == ref.getvalue()[-v.nbytes:], "npy data differs from numpy's"
    assert b"} # unetpp" in ours[:128], "npy mark missing"
    with tifffile.TiffFile(tif) as t:
        page = t.pages[0]
        got = page.asarray()
        assert page.tags["Software"].value == "unetpp", page.tags["Software"].value
    assert got.dtype == np.float32 and got.shape == v.shape, (got.dtype, got.shape)
    assert (got.view(np.uint32) == v.view(np.uint32)).all(), "tif values differ"
    print(f"numpy {np.__version__} and tifffile {tifffile.__version__} read unetpp's files bit for bit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
