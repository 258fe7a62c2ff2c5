"""Bad input raises unetpp.UnetppError (a ValueError) with the library's message."""

import numpy as np
import pytest

import unetpp


def raises(fn, *needles):
    with pytest.raises(unetpp.UnetppError) as e:
        fn()
    assert isinstance(e.value, ValueError)
    for n in needles:
        assert n in str(e.value), f"{n!r} not in {str(e.value)!r}"


def test_bad_arrays(tiny):
    img = np.zeros((64, 64), np.float32)
    raises(lambda: tiny.predict(np.zeros((1, 1, 64, 64))), "shape [1, 1, 64, 64]", "H x W or C x H x W")
    raises(lambda: tiny.predict(np.zeros((3, 64, 64))), "3 channel(s) but the model takes 1")
    raises(lambda: tiny.predict(np.zeros(5)), "shape [5]")
    nan = img.copy()
    nan[3, 4] = np.nan
    raises(lambda: tiny.predict(nan), "non-finite value at flat index 196")
    raises(lambda: tiny.predict(np.zeros((0, 64))), "at least 1 element")
    raises(lambda: tiny.predict(np.array([["a"]])), "dtype <U1", "float or integer")
    raises(lambda: tiny.predict(img, spacing=(1, 1, 1)), "trained without --spacing")
    raises(lambda: tiny.predict(img, tile=(1, 2, 3, 4)), "tile [1, 2, 3, 4]")


def test_bad_modes_and_options(tiny, tmp_path):
    img = np.zeros((64, 64), np.float32)
    raises(lambda: tiny.predict(img, mode="fast:7"), "fast:7", "fast:1, fast:2")
    raises(lambda: tiny.predict(img, mode="slow"), "`accurate` or `fast:j`", "`slow`")
    raises(lambda: tiny.export(tmp_path / "m.x", format="keras"), "--format must be one of", "onnx", "got `keras`")
    raises(lambda: unetpp.load(tiny.path, backend="cuda"), "--backend must be one of flex", "got `cuda`")
    raises(lambda: tiny.predict_file(tmp_path / "none.png"), "none.png")


def test_bad_checkpoints(tmp_path):
    raises(lambda: unetpp.load(tmp_path / "missing.unetpp"), "cannot read checkpoint", "missing.unetpp")
    (tmp_path / "x.unetpp").write_bytes(b"not a checkpoint")
    raises(lambda: unetpp.load(tmp_path / "x.unetpp"), "x.unetpp is not a unetpp checkpoint")


def test_bad_training_settings(tmp_path):
    raises(lambda: unetpp.train_config(epoch=2), "unknown field `epoch`")
    raises(lambda: unetpp.train_config(lr=0), "--lr must be in (0, 1]")
    raises(lambda: unetpp.train_config(input={"normalize": "gamma"}), "input.normalize", "percentile")
    raises(lambda: unetpp.train({"data": str(tmp_path / "nothing")}, tmp_path / "run"), "nothing")
    assert not (tmp_path / "run").exists()
