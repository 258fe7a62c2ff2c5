"""The notebook-style example runs end to end, as a script, from the repository root."""

import os
import subprocess
import sys

from conftest import REPO


def test_quickstart_runs_end_to_end():
    script = REPO / "python" / "examples" / "quickstart.py"
    env = dict(os.environ, UNETPP_DATA=str(REPO / "samples" / "nuclei"))
    r = subprocess.run(
        [sys.executable, str(script)], cwd=REPO, env=env, check=False, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    for expected in [
        "run directory:",
        "labels (128, 160) uint8",
        "probabilities (1, 128, 160) float32",
        "mean Dice",
        "ONNX:",
    ]:
        assert expected in r.stdout, f"{expected!r} not in the output:\n{r.stdout}"
