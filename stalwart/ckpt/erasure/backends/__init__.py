"""Bulk GF(2^8) matrix-product backends; every one produces identical bytes.

A backend has ``name``, ``available()`` and ``apply(matrix, inputs, outputs, nbytes)``
which writes ``outputs[i] = XOR_j matrix[i, j] * inputs[j]`` (byte-wise, GF(2^8)).

- ``numpy``: bit-sliced XOR engine on host memory, always available.
- ``torch``: the same engine on torch tensors, CPU or CUDA.
- ``isal``: Intel ISA-L ``ec_encode_data`` through ctypes, when ``libisal.so.2`` loads.
"""

from __future__ import annotations

import threading
from typing import Any

from stalwart.ckpt.erasure.backends import isal
from stalwart.ckpt.erasure.backends.numpy_backend import NumpyBackend

NAMES = ("numpy", "torch", "isal")

_lock = threading.Lock()
_instances: dict[str, Any] = {}


def available_backends() -> list[str]:
    """Names of the backends usable in this process."""
    return [n for n in NAMES if n != "isal" or isal.available()]


def get_backend(name: str) -> Any:
    """The shared instance of a backend (``OSError`` if ISA-L is asked for but missing)."""
    with _lock:
        be = _instances.get(name)
        if be is None:
            if name == "numpy":
                be = NumpyBackend()
            elif name == "torch":
                from stalwart.ckpt.erasure.backends.torch_backend import TorchBackend

                be = TorchBackend()
            elif name == "isal":
                be = isal.IsalBackend()
            else:
                raise ValueError(f"unknown backend {name!r}; choose from {', '.join(NAMES)}")
            _instances[name] = be
        return be
