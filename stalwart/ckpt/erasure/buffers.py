"""Zero-copy byte views of the buffers callers hand the codec.

Accepted: ``bytes``, ``bytearray``, ``memoryview`` and anything else with the buffer
protocol, numpy arrays and torch tensors (any dtype, CPU or CUDA), all C-contiguous.
A non-contiguous buffer is refused rather than silently copied.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from stalwart.ckpt.erasure.errors import ErasureError

ByteView = np.ndarray | torch.Tensor


def as_bytes(buf: Any, what: str, writable: bool = False) -> ByteView:
    """A flat ``uint8`` view of ``buf``: a tensor for torch tensors, a numpy array otherwise."""
    if isinstance(buf, torch.Tensor):
        t = buf.detach()
        if t.is_sparse or t.is_quantized:
            raise ErasureError(f"{what} is a sparse or quantized tensor; pass a dense one")
        if not t.is_contiguous():
            raise ErasureError(f"{what} is a non-contiguous tensor; pass .contiguous() (a copy) explicitly")
        try:
            return t.reshape(-1).view(torch.uint8)
        except RuntimeError as exc:
            raise ErasureError(f"{what}: cannot view a {t.dtype} tensor as bytes ({exc})") from None
    if isinstance(buf, np.ndarray):
        if buf.dtype.hasobject:
            raise ErasureError(f"{what} is a numpy array of Python objects, not raw bytes")
        if not buf.flags.c_contiguous:
            raise ErasureError(
                f"{what} is a non-contiguous numpy array; pass np.ascontiguousarray() (a copy) explicitly"
            )
        if writable and not buf.flags.writeable:
            raise ErasureError(f"{what} is a read-only numpy array")
        return buf.reshape(-1).view(np.uint8)
    try:
        mv = memoryview(buf)
    except TypeError:
        raise ErasureError(
            f"{what} is a {type(buf).__name__}, not a buffer (bytes-like, numpy array or torch tensor)"
        ) from None
    if not mv.c_contiguous:
        raise ErasureError(f"{what} is a non-contiguous memoryview")
    if writable and mv.readonly:
        raise ErasureError(
            f"{what} is read-only ({type(buf).__name__}); pass a bytearray, numpy array or tensor"
        )
    return np.frombuffer(mv.cast("B") if mv.ndim != 1 or mv.format != "B" else mv, dtype=np.uint8)


def nbytes_of(view: ByteView) -> int:
    """Length in bytes of a flat byte view."""
    return int(view.numel()) if isinstance(view, torch.Tensor) else int(view.shape[0])


def to_numpy(view: ByteView) -> np.ndarray:
    """The host byte view as numpy (a CPU tensor shares its memory)."""
    if isinstance(view, torch.Tensor):
        if view.device.type != "cpu":
            raise ErasureError(f"a tensor on {view.device} cannot be used by a host-memory backend")
        return view.numpy()
    return view


def to_torch(view: ByteView) -> torch.Tensor:
    """The byte view as a torch tensor (a numpy array shares its memory; never written if read-only)."""
    if isinstance(view, torch.Tensor):
        return view
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only inputs: torch warns, we only read them
        return torch.from_numpy(view)
