"""Systematic Reed-Solomon RS(k, m) over GF(2^8) with ISA-L's Cauchy generator matrix."""

from __future__ import annotations

import numbers
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from stalwart.ckpt.erasure import gf
from stalwart.ckpt.erasure.backends import NAMES, available_backends, get_backend, isal
from stalwart.ckpt.erasure.buffers import ByteView, as_bytes, nbytes_of, to_numpy, to_torch
from stalwart.ckpt.erasure.errors import ErasureError

BACKENDS = ("auto", *NAMES)


class ReedSolomon:
    """RS(k, m): ``k`` data shards, ``m`` parity shards; any ``k`` of the ``k + m`` rebuild the data.

    The generator is ``[I_k; C]`` with ``C[i, j] = 1 / ((k + i) XOR j)`` over GF(2^8)
    (polynomial 0x11d) -- exactly ISA-L's ``gf_gen_cauchy1_matrix`` -- so parity bytes
    are the same whichever backend computes them, and the same as ISA-L's own.

    ``backend``: ``"auto"`` (CUDA tensors -> ``"torch"``; host memory -> ``"isal"`` when
    libisal loads, else ``"numpy"``), or one of ``"numpy"``, ``"torch"``, ``"isal"``.
    Asking for ``"isal"`` without the library raises :class:`ErasureError`.

    Shards are buffers of equal length: bytes-like objects, numpy arrays or torch
    tensors (any dtype, C-contiguous; viewed as bytes, never copied). Results are flat
    ``uint8`` numpy arrays, or ``uint8`` tensors on the shards' device when the shards
    are torch tensors. Instances are safe to share between threads.
    """

    def __init__(self, k: int, m: int, backend: str = "auto") -> None:
        integral = all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in (k, m))
        if not integral or k < 1 or m < 1 or k + m > gf.MAX_SHARDS:
            raise ErasureError(
                f"RS(k, m) needs integers k >= 1, m >= 1, k + m <= {gf.MAX_SHARDS}; got k={k!r}, m={m!r}"
            )
        k, m = int(k), int(m)
        if backend not in BACKENDS:
            raise ErasureError(f"unknown erasure backend {backend!r}; choose from {', '.join(BACKENDS)}")
        if backend == "isal" and not isal.available():
            raise ErasureError(
                "erasure backend 'isal' needs Intel ISA-L (libisal.so.2, Debian/Ubuntu package libisal2), "
                "which could not be loaded; use backend='auto' or 'numpy'"
            )
        self.k = k
        self.m = m
        self.backend = backend
        self._generator = gf.generator_matrix(k, m)
        self._generator.flags.writeable = False
        self._decode_rows: OrderedDict[tuple[tuple[int, ...], tuple[int, ...]], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ReedSolomon(k={self.k}, m={self.m}, backend={self.backend!r})"

    @property
    def n(self) -> int:
        """Total number of shards, ``k + m``."""
        return self.k + self.m

    @property
    def generator(self) -> np.ndarray:
        """The ``(k + m) x k`` systematic generator matrix (read-only ``uint8``)."""
        return self._generator

    @property
    def parity_matrix(self) -> np.ndarray:
        """The ``m x k`` Cauchy part of the generator (read-only ``uint8``)."""
        return self._generator[self.k :]

    # -- public API -------------------------------------------------------------------

    def encode(
        self,
        data_shards: Sequence[Any | None],
        out: Sequence[Any] | None = None,
        which: Sequence[int] | None = None,
    ) -> list[ByteView]:
        """Compute the parity shards of ``k`` equally long data shards.

        ``which``: the parity shards to compute, as indices ``0 .. m-1`` (default: all
        ``m``). ``out``: optional writable buffers of the same length, one per computed
        parity shard, to write the parity into (on the same device as the data for CUDA).
        A data shard given as ``None`` stands for all zeros and costs nothing (at least one
        must be given). Returns flat byte views of the computed parity, in ``which`` order.
        """
        if len(data_shards) != self.k:
            raise ErasureError(
                f"RS({self.k},{self.m}).encode needs {self.k} data shards, got {len(data_shards)}"
            )
        rows = list(range(self.m)) if which is None else [int(u) for u in which]
        if any(not 0 <= u < self.m for u in rows) or len(set(rows)) != len(rows):
            raise ErasureError(f"encode which= needs distinct parity indices in 0..{self.m - 1}, got {list(which or [])}")
        if out is not None and len(out) != len(rows):
            raise ErasureError(f"encode out= needs {len(rows)} parity buffers, got {len(out)}")
        cols = [j for j, s in enumerate(data_shards) if s is not None]
        if not cols:
            raise ErasureError("encode needs at least one data shard that is not None (None stands for zeros)")
        views = [as_bytes(data_shards[j], f"data shard {j}") for j in cols]
        nbytes = self._common_length(views, cols)
        outs = self._outputs(views, out, len(rows), nbytes, "parity out")
        self._run(self.parity_matrix[np.ix_(rows, cols)], views, outs, nbytes)
        return outs

    def decode(self, shards: Sequence[Any], out: Sequence[Any | None] | None = None) -> list[ByteView]:
        """Rebuild the ``k`` data shards from ``k + m`` shards with ``None`` for the lost ones.

        At most ``m`` may be lost. Present data shards come back as zero-copy views; lost
        ones are computed into ``out[j]`` when ``out`` (length ``k``) gives a buffer for
        them, else into new arrays. Returns the ``k`` data shards as flat byte views.
        """
        if len(shards) != self.n:
            raise ErasureError(
                f"RS({self.k},{self.m}).decode needs {self.n} shards (None for lost ones), got {len(shards)}"
            )
        lost = [i for i, s in enumerate(shards) if s is None]
        if len(lost) > self.m:
            raise ErasureError(
                f"RS({self.k},{self.m}) cannot rebuild: {len(lost)} shards are missing ({_fmt(lost, self.k)}), "
                f"at most {self.m} may be lost"
            )
        present = [i for i in range(self.n) if shards[i] is not None]
        views: dict[int, ByteView] = {i: as_bytes(shards[i], _name(i, self.k)) for i in present}
        nbytes = self._common_length([views[i] for i in present], present)
        lost_data = [j for j in lost if j < self.k]
        if out is not None and len(out) != self.k:
            raise ErasureError(
                f"decode out= needs {self.k} entries (None where no buffer is given), got {len(out)}"
            )
        result: list[ByteView | None] = [views.get(j) for j in range(self.k)]
        if lost_data:
            survivors = tuple(present[: self.k])  # data shards first, then parity, in index order
            rows = self._rebuild_rows(tuple(lost_data), survivors)
            given = [out[j] for j in lost_data] if out is not None else None
            outs = self._outputs(
                [views[i] for i in survivors], given, len(lost_data), nbytes, "decode out", lost_data
            )
            self._run(rows, [views[i] for i in survivors], outs, nbytes)
            for j, o in zip(lost_data, outs):
                result[j] = o
        return result  # type: ignore[return-value]

    def resolve_backend(self, shards: Sequence[Any]) -> str:
        """The backend that would process these shards (``"auto"`` resolved)."""
        views = [as_bytes(s, f"shard {i}") for i, s in enumerate(shards) if s is not None]
        return self._resolve(_device(views))

    # -- internals --------------------------------------------------------------------

    def _rebuild_rows(self, lost_data: tuple[int, ...], survivors: tuple[int, ...]) -> np.ndarray:
        key = (lost_data, survivors)
        with self._lock:
            rows = self._decode_rows.get(key)
            if rows is not None:
                self._decode_rows.move_to_end(key)
                return rows
        sub = self._generator[list(survivors)]
        try:
            inv = gf.mat_inv(sub)
        except ValueError:  # pragma: no cover - impossible for an MDS generator
            raise ErasureError(
                f"survivors {survivors} of RS({self.k},{self.m}) do not determine the data"
            ) from None
        rows = np.ascontiguousarray(inv[list(lost_data)])
        rows.flags.writeable = False
        with self._lock:
            self._decode_rows[key] = rows
            if len(self._decode_rows) > 256:
                self._decode_rows.popitem(last=False)
        return rows

    def _common_length(self, views: list[ByteView], idx: list[int]) -> int:
        lengths = [nbytes_of(v) for v in views]
        if len(set(lengths)) > 1:
            desc = ", ".join(f"{_name(i, self.k)}={n}" for i, n in zip(idx, lengths))
            raise ErasureError(f"RS({self.k},{self.m}) shards must have equal lengths, got {desc}")
        return lengths[0] if lengths else 0

    def _resolve(self, device: torch.device | None) -> str:
        on_gpu = device is not None and device.type != "cpu"
        if self.backend == "auto":
            if on_gpu:
                return "torch"
            return "isal" if "isal" in available_backends() else "numpy"
        if on_gpu and self.backend != "torch":
            raise ErasureError(
                f"erasure backend {self.backend!r} works on host memory; shards are on {device}"
            )
        return self.backend

    def _outputs(
        self,
        views: list[ByteView],
        given: Sequence[Any] | None,
        count: int,
        nbytes: int,
        what: str,
        labels: list[int] | None = None,
    ) -> list[ByteView]:
        """Caller-given output buffers (validated) or new ones next to the inputs."""
        device = _device(views)
        want_torch = any(isinstance(v, torch.Tensor) for v in views)
        if given is not None and len(given) != count:
            raise ErasureError(f"{what} needs {count} buffers, got {len(given)}")
        outs: list[ByteView] = []
        for i in range(count):
            buf = given[i] if given is not None else None
            if buf is None:
                if want_torch:
                    outs.append(torch.empty(nbytes, dtype=torch.uint8, device=device or "cpu"))
                else:
                    outs.append(np.empty(nbytes, dtype=np.uint8))
                continue
            label = f"{what}[{labels[i] if labels is not None else i}]"
            v = as_bytes(buf, label, writable=True)
            if nbytes_of(v) != nbytes:
                raise ErasureError(f"{label} holds {nbytes_of(v)} bytes, the shards hold {nbytes}")
            where = v.device if isinstance(v, torch.Tensor) and v.device.type != "cpu" else None
            if where != device:
                raise ErasureError(f"{label} is on {where or 'host'}, the shards are on {device or 'host'}")
            outs.append(v)
        return outs

    def _run(self, matrix: np.ndarray, inputs: list[ByteView], outputs: list[ByteView], nbytes: int) -> None:
        if nbytes == 0 or not outputs:
            return
        name = self._resolve(_device(inputs + outputs))
        be = get_backend(name)
        if name == "torch":
            be.apply(matrix, [to_torch(v) for v in inputs], [to_torch(v) for v in outputs], nbytes)
        else:
            be.apply(matrix, [to_numpy(v) for v in inputs], [to_numpy(v) for v in outputs], nbytes)


def _device(views: list[ByteView]) -> torch.device | None:
    """The accelerator device the views live on, or None for host memory (mixing is an error)."""
    devices = {v.device for v in views if isinstance(v, torch.Tensor) and v.device.type != "cpu"}
    if not devices:
        return None
    if len(devices) > 1 or any(not isinstance(v, torch.Tensor) or v.device.type == "cpu" for v in views):
        where = sorted({str(v.device) if isinstance(v, torch.Tensor) else "host" for v in views})
        raise ErasureError(f"all shards must be on one device; got {', '.join(where)}")
    return devices.pop()


def _name(i: int, k: int) -> str:
    return f"data shard {i}" if i < k else f"parity shard {i - k} (shard {i})"


def _fmt(idx: list[int], k: int) -> str:
    return ", ".join(_name(i, k) for i in idx)
