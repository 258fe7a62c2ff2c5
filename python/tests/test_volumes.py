"""Model.predict on 3D numpy arrays against the CLI on the same volume."""

import numpy as np
import pytest
from conftest import run_cli, write_mha

import unetpp


def test_a_volume_array_gives_the_clis_probabilities_for_the_same_file(tiny_3d, tmp_path):
    rng = np.random.default_rng(4)
    z, y, x = np.mgrid[:12, :40, :36]
    # A bright ball on noise; 12 x 40 x 36 is no multiple of 2^depth on two axes: padded as the CLI pads.
    vol = rng.normal(0.0, 50.0, (12, 40, 36)) + 400.0 * ((z - 6) ** 2 + (y - 18) ** 2 + (x - 20) ** 2 < 30)
    vol = vol.astype(np.float32)
    write_mha(tmp_path / "v.mha", vol)
    out = tmp_path / "out"
    run_cli("predict", "--checkpoint", tiny_3d.path, "--input", tmp_path / "v.mha", "--out", out, "--probabilities", "npy")
    cli = np.load(out / "v_prob0.npy")
    assert cli.shape == (12, 40, 36) and cli.std() > 1e-4, "the CLI's map is constant: nothing is compared"
    probs = tiny_3d.predict(vol, probabilities=True)
    assert probs.dtype == np.float32 and probs.shape == (1, 12, 40, 36)
    np.testing.assert_array_equal(probs[0], cli)
    labels = tiny_3d.predict(vol)
    assert labels.dtype == np.uint8 and labels.shape == (12, 40, 36)
    np.testing.assert_array_equal(labels, (cli > 0.5).astype(np.uint8))
    # C x D x H x W with one channel, a float64 copy and the file through the library's reader: the same.
    np.testing.assert_array_equal(tiny_3d.predict(vol[None], probabilities=True), probs)
    np.testing.assert_array_equal(tiny_3d.predict(vol.astype(np.float64), probabilities=True), probs)
    np.testing.assert_array_equal(tiny_3d.predict_file(tmp_path / "v.mha", probabilities=True), probs)


def test_a_batch_or_a_2d_array_is_refused_by_a_3d_model(tiny_3d):
    vol = np.zeros((8, 16, 16), np.float32)
    # N x C x D x H x W: one volume at a time.
    with pytest.raises(unetpp.UnetppError, match=r"shape \[1, 1, 8, 16, 16\].*D x H x W or C x D x H x W"):
        tiny_3d.predict(vol[None, None])
    with pytest.raises(unetpp.UnetppError, match=r"shape \[2, 8, 16, 16\]: 2 channel\(s\) but the model takes 1"):
        tiny_3d.predict(np.stack([vol, vol]))
