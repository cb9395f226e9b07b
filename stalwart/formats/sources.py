"""Any checkpoint as a set of named whole tensors: the common read interface.

``stalwart diff`` and ``stalwart convert`` read every format through
:class:`TensorSource`. The native format is registered here; adapters for foreign
formats (DeepSpeed, DCP, Hugging Face, torch.save) register themselves with
:func:`register_source` and are tried in registration order by :func:`open_source`.

Nothing here imports torch: detection and metadata are torch-free, and tensors are
built (importing torch) only when one is read.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from stalwart.errors import FormatError
from stalwart.formats.dtypes import DType

if TYPE_CHECKING:
    import torch

MANIFEST_NAME = "manifest.json"  # stalwart.formats.manifest's, without importing the reader


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: DType
    role: str = "other"


class TensorSource(ABC):
    """Read-only access to the whole tensors of a checkpoint, one at a time."""

    format_name: str = ""

    @abstractmethod
    def infos(self) -> dict[str, TensorInfo]:
        """Every tensor's metadata, in the checkpoint's order."""

    @abstractmethod
    def read(self, name: str) -> torch.Tensor:
        """One whole tensor (verified where the format has checksums)."""

    def objects(self) -> dict:
        """Non-tensor state (step, scheduler, ...) as JSON-able values."""
        return {}

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class NativeSource(TensorSource):
    format_name = "stalwart"

    def __init__(self, path: str) -> None:
        from stalwart.formats.reader import Checkpoint

        self.ckpt = Checkpoint(path)

    def infos(self) -> dict[str, TensorInfo]:
        from stalwart.formats.dtypes import as_dtype

        out = {n: TensorInfo(n, t.shape, as_dtype(t.dtype), t.role) for n, t in self.ckpt.tensors.items()}
        for alias, owner in self.ckpt.aliases().items():
            t = self.ckpt.tensors[owner]
            out[alias] = TensorInfo(alias, t.shape, as_dtype(t.dtype), t.role)
        return out

    def read(self, name: str) -> torch.Tensor:
        return self.ckpt.read(name)

    def objects(self) -> dict:
        out = dict(self.ckpt.objects)
        if self.ckpt.step is not None:
            out.setdefault("step", self.ckpt.step)
        return out

    def close(self) -> None:
        self.ckpt.close()


Detector = Callable[[str, dict], "TensorSource | None"]
_DETECTORS: list[tuple[str, Detector]] = []


_PRIORITY: dict[str, int] = {}


def register_source(name: str, detector: Detector, priority: int = 100) -> None:
    """Add a format: ``detector(path, options)`` returns a source if it recognises ``path``, else
    None. ``options`` are the reader options given to :func:`open_source` (e.g. ``param_order``).
    Detectors are tried by ascending ``priority`` (more specific layouts first)."""
    _PRIORITY[name] = priority
    _DETECTORS.append((name, detector))
    _DETECTORS.sort(key=lambda d: _PRIORITY[d[0]])


def _detect_native(path: str, options: dict) -> TensorSource | None:
    if not os.path.isdir(path):
        return None
    if not os.path.exists(os.path.join(path, MANIFEST_NAME)):
        # a root whose 'latest' names a stalwart step (DeepSpeed writes a 'latest' too)
        from stalwart.formats.atomic import parse_step_dirname

        try:
            with open(os.path.join(path, "latest"), encoding="utf-8") as f:
                name = f.read(4096).strip()
        except (OSError, UnicodeDecodeError):
            return None
        if parse_step_dirname(name) is None and not os.path.exists(os.path.join(path, name, MANIFEST_NAME)):
            return None
    return NativeSource(path)


register_source("stalwart", _detect_native, priority=0)


def open_source(path: str, **options) -> TensorSource:
    """Open ``path`` with the first registered format that recognises it.

    ``options`` go to the readers: ``param_order`` (a file naming the params in
    optimizer order, or a model config.json) for optimizer state indexed by position.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FormatError(f"{path}: no such file or directory")
    _load_adapters()
    options = {k: v for k, v in options.items() if v is not None}
    for _, detect in _DETECTORS:
        src = detect(path, options)
        if src is not None:
            return src
    found = sorted(os.listdir(path))[:8] if os.path.isdir(path) else [os.path.basename(path)]
    known = ", ".join(n for n, _ in _DETECTORS)
    raise FormatError(f"{path}: not a checkpoint format stalwart reads (knows: {known}); found {found}")


def _load_adapters() -> None:
    """Import the foreign-format adapters so they register (importing them is lazy: torch-heavy)."""
    try:
        import stalwart.formats.adapters  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name != "stalwart.formats.adapters":
            raise
