"""Model.predict on numpy arrays against the CLI on the same file, dtypes, modes, the GIL."""

import threading
import time

import numpy as np
from conftest import blobs, run_cli, write_png


def test_array_gives_the_clis_probabilities_for_the_same_file(tiny, tmp_path):
    img = blobs(70, 90)  # not a multiple of 2^depth: padded as the CLI pads
    write_png(tmp_path / "cells.png", img)
    for mode in ["accurate", "fast:1"]:
        out = tmp_path / mode.replace(":", "")
        run_cli(
            "predict",
            "--checkpoint",
            tiny.path,
            "--input",
            tmp_path / "cells.png",
            "--out",
            out,
            "--mode",
            mode,
            "--probabilities",
            "npy",
        )
        cli = np.load(out / "cells_prob0.npy")
        probs = tiny.predict(img, mode=mode, probabilities=True)
        assert probs.dtype == np.float32 and probs.shape == (1, 70, 90)
        assert cli.shape == (70, 90) and cli.std() > 1e-4, "the CLI's map is constant: nothing is compared"
        np.testing.assert_array_equal(probs[0], cli)
        labels = tiny.predict(img, mode=mode)
        assert labels.dtype == np.uint8 and labels.shape == (70, 90)
        np.testing.assert_array_equal(labels, (cli > 0.5).astype(np.uint8))
        # The same file through the library's reader.
        np.testing.assert_array_equal(tiny.predict_file(tmp_path / "cells.png", mode=mode, probabilities=True), probs)


def test_the_dtype_sets_the_full_scale_imagenet_divides_by(tiny):
    img = blobs(64, 64, seed=1)
    as_u16 = tiny.predict(img, probabilities=True)
    as_float = tiny.predict(img.astype(np.float32) / 65535, probabilities=True)
    np.testing.assert_allclose(as_float, as_u16, atol=1e-5)
    # Read as floats in 16-bit units, the image is 65535 times too bright: not the same input.
    assert np.abs(tiny.predict(img.astype(np.float32), probabilities=True) - as_u16).max() > 1e-3
    # Channels first with one channel, and non-contiguous views, are the same image.
    np.testing.assert_array_equal(tiny.predict(img[None], probabilities=True), as_u16)
    wide = np.zeros((64, 128), np.uint16)
    wide[:, ::2] = img
    np.testing.assert_array_equal(tiny.predict(wide[:, ::2], probabilities=True), as_u16)


def test_predict_file_with_out_writes_what_the_cli_writes(tiny, tmp_path):
    write_png(tmp_path / "a.png", blobs(64, 64, seed=2))
    written = tiny.predict_file(tmp_path / "a.png", out=tmp_path / "out", probabilities="npy")
    assert sorted(p.name for p in written) == ["a.png", "a_prob0.npy"]
    np.testing.assert_array_equal(
        np.load(tmp_path / "out" / "a_prob0.npy"), tiny.predict_file(tmp_path / "a.png", probabilities=True)[0]
    )


def test_config_and_modes(tiny):
    cfg = tiny.config
    assert (
        cfg["model"]["width"] == 4 and cfg["model"]["depth"] == 2 and cfg["data"]["normalize"] == {"kind": "imagenet"}
    )
    assert tiny.modes == ["accurate", "fast:1", "fast:2"]
    assert "width 4" in repr(tiny)


def test_the_gil_is_released_while_predicting(tiny):
    """The main thread keeps running Python while another thread predicts: no pause in it is
    anywhere near as long as one prediction (holding the GIL, each would be one pause)."""
    img = blobs(768, 768, seed=3)
    calls = []
    done = threading.Event()

    def predict():
        for _ in range(3):
            start = time.perf_counter()
            tiny.predict(img)
            calls.append(time.perf_counter() - start)
        done.set()

    t = threading.Thread(target=predict)
    t.start()
    last, longest = time.perf_counter(), 0.0
    while not done.is_set():
        now = time.perf_counter()
        longest, last = max(longest, now - last), now
    t.join()
    assert longest < min(calls) / 2, f"the main thread paused {longest:.3f} s; predictions took {calls}"
