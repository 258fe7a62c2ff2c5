"""UNet++ segmentation of 2D images and 3D volumes, from Python.

The same library as the ``unetpp`` command line, compiled into this package: every default,
check and error message is the command line's. Arrays go in and out as numpy arrays, and the
interpreter's lock is released while the library computes, so other Python threads keep running.

    import unetpp
    model = unetpp.load("run/checkpoints/best.unetpp")
    labels = model.predict(image)            # numpy H x W (or C x H x W, D x H x W, C x D x H x W)

Bad input raises :class:`UnetppError` (a ``ValueError``) with the library's message.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable, Union

import numpy as np

from . import _native
from ._native import UnetppError

__all__ = [
    "Model",
    "UnetppError",
    "evaluate",
    "import_torch",
    "load",
    "train",
    "train_config",
]
__version__ = "0.1.0"

PathLike = Union[str, "os.PathLike[str]"]
Progress = Callable[[str, int, str], None]


class Model:
    """A checkpoint loaded for inference (see :func:`load`)."""

    def __init__(self, path: PathLike, backend: str = "flex") -> None:
        self._backend = backend
        self._native = _native.NativeModel(os.fspath(path), backend)

    @property
    def path(self) -> Path:
        """The checkpoint file."""
        return Path(self._native.path())

    @property
    def config(self) -> dict:
        """The checkpoint's configuration: ``model`` (architecture), ``data`` (channels, classes,
        normalisation, spacing), ``epoch`` and ``val_iou``, as in ``RUN/config.toml``."""
        return json.loads(self._native.meta_json())

    @property
    def modes(self) -> list:
        """The inference modes this model runs: ``"accurate"`` and ``"fast:J"`` per head."""
        return self._native.modes()

    def __repr__(self) -> str:
        m = self.config["model"]
        return (
            f"unetpp.Model({str(self.path)!r}: {m['arch']} {m['dims']}D, depth {m['depth']}, width {m['width']}, "
            f"{m['in_channels']} channel(s), {m['classes']} class(es))"
        )

    def predict(
        self,
        array: Any,
        mode: str = "accurate",
        probabilities: bool = False,
        *,
        tile: Sequence[int] | None = None,
        spacing: Sequence[float] | None = None,
    ) -> np.ndarray:
        """Segments a numpy array as ``unetpp predict`` segments a file holding it.

        ``array`` is H x W or C x H x W for a 2D model, D x H x W or C x D x H x W for a 3D one
        (channels first), of any float or integer dtype, in the image's own units: it is
        normalised as the checkpoint says (``imagenet`` divides by the dtype's full scale: 255
        for uint8, 65535 for uint16, 1 for floats). ``mode`` is ``"accurate"`` (the mean of all
        heads) or ``"fast:J"`` (the pruned sub-network ending at head J). ``tile`` (2 or 3 ints)
        sets the sliding window; ``spacing`` (mm per axis, D, H, W order) is needed only by
        checkpoints trained with a target spacing.

        Returns the labels (uint8, the spatial shape; 0/1 for binary models, class ids
        otherwise, with the checkpoint's post-processing applied), or with ``probabilities=True``
        the class probabilities (float32, K x spatial shape; K = 1 for binary models).
        """
        a = np.asarray(array)
        if a.dtype == np.bool_:
            a = a.astype(np.uint8)
        labels, probs = self._native.predict(
            a, mode, probabilities, None if tile is None else list(tile), _spacing(spacing)
        )
        return probs if probabilities else labels

    def predict_file(
        self,
        path: PathLike,
        out: PathLike | None = None,
        mode: str = "accurate",
        probabilities: bool | str = False,
        *,
        overwrite: bool = False,
        tile: Sequence[int] | None = None,
        progress: bool | Progress = True,
    ) -> np.ndarray | list:
        """Segments an image or volume file (PNG, TIFF, JPEG, BMP, NIfTI, NRRD, MetaImage).

        Without ``out``: returns the labels (or with ``probabilities=True`` the probabilities)
        as :meth:`predict` does, on the file's own voxel grid (a volume's axes in its file's
        order, z, y, x, as SimpleITK's ``GetArrayFromImage``).

        With ``out`` (a folder), ``path`` may also be a folder of images, and the predictions are
        written as ``unetpp predict --out`` writes them (``probabilities``: ``True`` for
        lossless files, or ``"tiff"``, ``"npy"``, ``"png"``); returns the files written, with a
        progress bar over the inputs as :func:`train` shows one (``progress``).
        """
        t = None if tile is None else list(tile)
        if out is None:
            if not isinstance(probabilities, bool):
                raise UnetppError(f"probabilities={probabilities!r}: a file format needs out=FOLDER")
            labels, probs = self._native.predict_file(os.fspath(path), mode, probabilities, t)
            return probs if probabilities else labels
        fmt = {True: "lossless", False: None}.get(probabilities, probabilities)  # type: ignore[arg-type]
        written = _native.predict_to(
            os.fspath(self.path),
            os.fspath(path),
            os.fspath(out),
            mode,
            fmt,
            overwrite,
            t,
            self._backend,
            _progress(progress),
        )
        return [Path(p) for p in written]

    def export(self, path: PathLike, format: str = "onnx", mode: str | None = None) -> Path:
        """Writes the model as ONNX (``format="onnx"``: the inference graph, opset 17,
        probabilities out; ``mode`` ``"accurate"`` or ``"fast:J"``; inputs normalised as
        :attr:`config` ``["data"]`` says) or as PyTorch-named ``.safetensors`` weights."""
        _native.export(os.fspath(self.path), os.fspath(path), format, mode, self._backend)
        return Path(path)


def load(path: PathLike, backend: str = "flex") -> Model:
    """Loads a unetpp checkpoint (``.unetpp``, as ``train`` and ``import`` write)."""
    return Model(path, backend)


def evaluate(
    checkpoint: PathLike,
    data: PathLike,
    out: PathLike,
    mode: str = "accurate",
    *,
    skip_bad: bool = False,
    progress: bool | Progress = True,
) -> dict:
    """``unetpp eval``: scores a checkpoint on ``data`` (its ``test/`` split when it has one),
    writes ``scores.csv``, ``summary.json``, overlays and ``report.html`` into ``out``, and
    returns ``summary.json`` as a dict (``summary`` holds the mean Dice, IoU, HD95, NSD).
    ``progress``: a bar over the images, as :func:`train` shows one."""
    paths = (os.fspath(checkpoint), os.fspath(data), os.fspath(out))
    return json.loads(_native.evaluate(*paths, mode, skip_bad, "flex", _progress(progress)))


def train_config(settings: Mapping | None = None, **kwargs: Any) -> dict:
    """The whole training configuration that ``settings`` (plus keyword arguments) asks for:
    ``data`` (a folder; default the bundled sample) gives the defaults ``unetpp train --data``
    takes, and every given key replaces its default (tables such as ``model`` key by key), e.g.
    ``train_config(data="DIR", epochs=2, model={"width": 16})``. Unknown keys are errors."""
    return json.loads(_native.train_config(_settings_json(settings, kwargs)))


def train(
    config: Mapping | PathLike | None,
    out: PathLike,
    progress: bool | Progress = True,
) -> Path:
    """Trains a model into the run directory ``out`` and returns it (its checkpoints are under
    ``out/checkpoints/``).

    ``config`` is a dict of settings (see :func:`train_config`; partial settings take the
    defaults), a TOML file as ``RUN/config.toml`` (a whole configuration), or ``None`` to resume
    the run already in ``out``. ``progress=True`` shows tqdm bars (in a notebook too) when tqdm
    is installed, nothing otherwise; a callable gets ``(kind, number, text)`` events instead:
    ``("start", total, label)`` (label ``"epoch 1/5"``, ``"predict"``, ``"eval"``),
    ``("update", position, message)`` and ``("finish", 0, "")``.
    """
    callback = _progress(progress)
    if config is None:
        return Path(_native.train(os.fspath(out), None, None, callback))
    if isinstance(config, Mapping):
        return Path(_native.train(os.fspath(out), _settings_json(config, {}), None, callback))
    return Path(_native.train(os.fspath(out), None, os.fspath(config), callback))


def import_torch(
    source: PathLike | Mapping | Any,
    out: PathLike,
    *,
    normalize: str | None = None,
    bilinear: bool = False,
    backend: str = "flex",
) -> Model:
    """Converts PyTorch weights into a unetpp checkpoint at ``out`` and loads it.

    ``source`` is a ``.pth``/``.pt``/``.safetensors`` file, a state dict (a mapping of names to
    numpy arrays or torch tensors, possibly nested as ``{"state_dict": ...}``) or a module with
    ``state_dict()``: pytorch-nested-unet's ``NestedUNet``/``UNet`` or
    segmentation_models.pytorch's ``UnetPlusPlus`` (ResNet encoders; ``bilinear=True`` if it was
    built with ``decoder_interpolation="bilinear"``). ``normalize`` is how its inputs are to be
    normalised (``"percentile"`` by default, ``"zscore"``, ``"imagenet"``, ``"window:LOW:HIGH"``).
    """
    if hasattr(source, "state_dict") and callable(source.state_dict):
        source = source.state_dict()
    if not isinstance(source, Mapping):
        _native.import_torch(os.fspath(source), os.fspath(out), normalize, bilinear, backend)
        return Model(out, backend)
    with tempfile.TemporaryDirectory(prefix="unetpp-import-") as tmp:
        file = os.path.join(tmp, "state_dict.safetensors")
        _write_safetensors(_flatten(source), file)
        try:
            _native.import_torch(file, os.fspath(out), normalize, bilinear, backend)
        except UnetppError as e:
            raise UnetppError(str(e).replace(file, "the state dict")) from None
    return Model(out, backend)


def _spacing(spacing: Sequence[float] | None) -> list | None:
    if spacing is None:
        return None
    s = [float(v) for v in spacing]
    if len(s) != 3:
        raise UnetppError(f"spacing {tuple(spacing)}: give three values in mm (D, H, W)")
    return s


def _settings_json(settings: Mapping | None, kwargs: Mapping) -> str:
    merged = dict(settings or {})
    merged.update(kwargs)
    try:
        return json.dumps(merged, default=os.fspath)
    except TypeError as e:
        raise UnetppError(f"training settings must be numbers, strings, paths, lists and dicts: {e}") from None


def _progress(progress: bool | Progress) -> Progress | None:
    if callable(progress):
        return progress
    if not progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    bars: list = []

    def on_event(kind: str, number: int, text: str) -> None:
        if kind == "start":
            unit = "step" if text.startswith("epoch ") else "image"
            bars.append(tqdm(total=number, desc=text, unit=unit))
        elif kind == "update" and bars:
            bars[-1].update(number - bars[-1].n)
            if text:
                bars[-1].set_postfix_str(text, refresh=False)
        elif kind == "finish" and bars:
            bars.pop().close()

    return on_event


def _flatten(tensors: Mapping, prefix: str = "") -> dict:
    """Name -> numpy array; nested mappings joined with dots, values that are not tensors
    (epoch numbers, optimiser settings) left out."""
    flat = {}
    for k, v in tensors.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            flat.update(_flatten(v, name + "."))
        elif hasattr(v, "detach") and hasattr(v, "cpu"):  # a torch tensor, without importing torch
            t = v.detach().cpu()
            if str(t.dtype) == "torch.bfloat16":
                t = t.float()
            flat[name] = t.numpy()
        elif isinstance(v, np.ndarray):
            flat[name] = v
    return flat


_DTYPES = {
    "float16": "F16",
    "float32": "F32",
    "float64": "F64",
    "int8": "I8",
    "int16": "I16",
    "int32": "I32",
    "int64": "I64",
    "uint8": "U8",
    "bool": "BOOL",
}


def _write_safetensors(tensors: Mapping, path: str) -> None:
    """The safetensors format: an 8-byte little-endian header length, a JSON header of
    dtype/shape/offsets per tensor, then the little-endian data."""
    header, blobs, offset = {}, [], 0
    for name, a in tensors.items():
        if a.dtype.name not in _DTYPES:
            raise UnetppError(f"tensor `{name}` has dtype {a.dtype}, which a checkpoint cannot hold")
        data = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes()
        header[name] = {
            "dtype": _DTYPES[a.dtype.name],
            "shape": list(a.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        f.writelines(blobs)
