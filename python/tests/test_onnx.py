"""Model.export to ONNX, run in ONNX Runtime against Model.predict."""

import numpy as np
import onnxruntime as ort
from conftest import blobs


def test_onnx_runtime_gives_predicts_probabilities(tiny, tmp_path):
    img = blobs(64, 96, seed=4)
    # The graph takes normalised input: imagenet's grey formula on 16-bit data.
    x = ((img.astype(np.float32) / 65535 - 0.449) / 0.226)[None, None]
    for mode in ["accurate", "fast:1"]:
        path = tiny.export(tmp_path / f"{mode.replace(':', '')}.onnx", mode=mode)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (got,) = session.run(None, {session.get_inputs()[0].name: x})
        want = tiny.predict(img, mode=mode, probabilities=True)
        assert got.shape == (1, *want.shape) and want.std() > 1e-4
        assert np.abs(got[0] - want).max() <= 1e-4, mode
