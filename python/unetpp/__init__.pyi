"""Typed interface of the unetpp package (see __init__.py for the docstrings)."""

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable

import numpy as np
import numpy.typing as npt
from typing_extensions import TypeAlias

__version__: str

PathLike: TypeAlias = str | os.PathLike[str]
Progress: TypeAlias = Callable[[str, int, str], None]

class UnetppError(ValueError):
    """An error reported by unetpp: bad input, option or file."""

class Model:
    def __init__(self, path: PathLike, backend: str = "flex") -> None: ...
    @property
    def path(self) -> Path: ...
    @property
    def config(self) -> dict[str, Any]: ...
    @property
    def modes(self) -> list[str]: ...
    def predict(
        self,
        array: npt.ArrayLike,
        mode: str = "accurate",
        probabilities: bool = False,
        *,
        tile: Sequence[int] | None = None,
        spacing: Sequence[float] | None = None,
    ) -> np.ndarray: ...
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
    ) -> np.ndarray | list[Path]: ...
    def export(self, path: PathLike, format: str = "onnx", mode: str | None = None) -> Path: ...

def load(path: PathLike, backend: str = "flex") -> Model: ...
def evaluate(
    checkpoint: PathLike,
    data: PathLike,
    out: PathLike,
    mode: str = "accurate",
    *,
    skip_bad: bool = False,
    progress: bool | Progress = True,
) -> dict[str, Any]: ...
def train_config(settings: Mapping[str, Any] | None = None, **kwargs: Any) -> dict[str, Any]: ...
def train(config: Mapping[str, Any] | PathLike | None, out: PathLike, progress: bool | Progress = True) -> Path: ...
def import_torch(
    source: PathLike | Mapping[str, Any] | Any,
    out: PathLike,
    *,
    normalize: str | None = None,
    bilinear: bool = False,
    backend: str = "flex",
) -> Model: ...
