# %% [markdown]
# # unetpp quickstart
#
# Train a small UNet++ on the bundled nuclei sample, segment a numpy image with it, score it on
# the test images and export it to ONNX. Runs as a script or, cell by cell, in Jupyter (jupytext
# reads the `# %%` cells). `UNETPP_DATA` points at another data set (images/ + masks/ folders,
# or train/ val/ test/ splits); `UNETPP_EPOCHS` sets the epochs (a real model needs more).

# %%
import os
import tempfile
from pathlib import Path

import numpy as np

import unetpp

data = Path(os.environ.get("UNETPP_DATA", "samples/nuclei"))
work = Path(tempfile.mkdtemp(prefix="unetpp-quickstart-"))

# %% [markdown]
# ## Train
# Any setting left out takes the default `unetpp train --data` would; `unetpp.train_config`
# shows them all. Progress appears as tqdm bars when tqdm is installed.

# %%
settings = {
    "data": str(data),
    "epochs": int(os.environ.get("UNETPP_EPOCHS", "1")),
    "steps_per_epoch": 4,
    "batch_size": 2,
    "patch": [1, 64, 64],
    "model": {"width": 8, "depth": 3},
}
print({k: v for k, v in unetpp.train_config(settings).items() if k in ("epochs", "lr", "patch", "input")})
run = unetpp.train(settings, work / "run")
print("run directory:", run)

# %% [markdown]
# ## Segment a numpy image
# The two lines a user needs: load a checkpoint, predict on an array (H x W here; C x H x W,
# D x H x W and C x D x H x W too), in the image's own units and dtype.

# %%
model = unetpp.load(run / "checkpoints" / "best.unetpp")
rng = np.random.default_rng(0)
yy, xx = np.mgrid[:128, :160]
image = rng.normal(2000, 500, (128, 160))
for cy, cx in [(30, 40), (80, 120), (100, 30)]:
    image[(yy - cy) ** 2 + (xx - cx) ** 2 < 15**2] += 20000
image = image.clip(0, 65535).astype(np.uint16)

labels = model.predict(image)
probabilities = model.predict(image, probabilities=True)
fast = model.predict(image, mode="fast:1")
print(model)
print("labels", labels.shape, labels.dtype, "foreground share", labels.mean().round(3))
print("probabilities", probabilities.shape, probabilities.dtype)

# %% [markdown]
# ## Evaluate on the data's test split
# Writes scores.csv, summary.json, overlays and report.html, and returns the summary.

# %%
summary = unetpp.evaluate(model.path, data, work / "eval")
print("mean Dice {mean_dice:.3f}, mean IoU {mean_iou:.3f} on {images} images".format(**summary["summary"]))

# %% [markdown]
# ## Export to ONNX
# The graph takes the normalised image (as `model.config["data"]["normalize"]` says) and
# returns probabilities.

# %%
onnx_file = model.export(work / "model.onnx")
print("ONNX:", onnx_file, onnx_file.stat().st_size, "bytes")
