"""Dtypes by name, torch dtypes <-> the names stalwart stores, and byte views of tensors.

The manifest stores torch's own dtype name (``"bfloat16"``); safetensors headers
store the safetensors code (``"BF16"``). Dtypes safetensors has no code for are
stored in safetensors as raw ``U8`` bytes while the manifest keeps the real dtype.

:class:`DType` names a dtype without importing torch: the format readers and the
converter describe tensors with it, so tools that only move bytes (``stalwart
convert --to hf``, ``inspect``, ``verify``) start without torch. ``DType.torch`` gives
torch's dtype when a tensor is built. torch is imported on first use, not here.
"""

from __future__ import annotations

import math
import sys
from functools import cache, lru_cache
from typing import TYPE_CHECKING

from stalwart.errors import FormatError

if TYPE_CHECKING:
    import torch

# torch name -> safetensors dtype code (None: stored as raw U8 bytes in safetensors).
_SAFETENSORS_CODE: dict[str, str | None] = {
    "bool": "BOOL",
    "uint8": "U8",
    "int8": "I8",
    "int16": "I16",
    "uint16": "U16",
    "int32": "I32",
    "uint32": "U32",
    "int64": "I64",
    "uint64": "U64",
    "float16": "F16",
    "bfloat16": "BF16",
    "float32": "F32",
    "float64": "F64",
    "complex64": "C64",
    "complex32": None,
    "complex128": None,
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "float8_e4m3fnuz": "F8_E4M3FNUZ",
    "float8_e5m2fnuz": "F8_E5M2FNUZ",
    "float8_e8m0fnu": "F8_E8M0",
    "float4_e2m1fn_x2": None,
}
# name -> (bytes per element, kind: b bool, u unsigned, i signed, f floating, c complex)
_LAYOUT: dict[str, tuple[int, str]] = {
    "bool": (1, "b"), "uint8": (1, "u"), "int8": (1, "i"), "int16": (2, "i"), "uint16": (2, "u"),
    "int32": (4, "i"), "uint32": (4, "u"), "int64": (8, "i"), "uint64": (8, "u"), "float16": (2, "f"),
    "bfloat16": (2, "f"), "float32": (4, "f"), "float64": (8, "f"), "complex32": (4, "c"), "complex64": (8, "c"),
    "complex128": (16, "c"), "float8_e4m3fn": (1, "f"), "float8_e5m2": (1, "f"), "float8_e4m3fnuz": (1, "f"),
    "float8_e5m2fnuz": (1, "f"), "float8_e8m0fnu": (1, "f"), "float4_e2m1fn_x2": (1, "f"),
}


class DType:
    """A tensor dtype by name (torch's names), usable without importing torch.

    Compares equal to the torch dtype of the same name (``DType("float32") ==
    torch.float32``), so code holding either kind can compare them; hashing is by name.
    """

    __slots__ = ("itemsize", "kind", "name")

    def __init__(self, name: str) -> None:
        if name not in _LAYOUT:
            raise FormatError(f"unknown dtype {name!r} (known: {', '.join(sorted(_LAYOUT))})")
        self.name = name
        self.itemsize, self.kind = _LAYOUT[name]

    @property
    def is_floating_point(self) -> bool:
        return self.kind == "f"

    @property
    def is_complex(self) -> bool:
        return self.kind == "c"

    @property
    def torch(self) -> torch.dtype:
        """torch's dtype of this name (imports torch)."""
        return _torch_dtype(self.name)

    @property
    def safetensors_code(self) -> str | None:
        return _SAFETENSORS_CODE.get(self.name)

    def __eq__(self, other) -> bool:
        if isinstance(other, DType):
            return other.name == self.name
        if _is_torch_dtype(other):
            return str(other) == "torch." + self.name
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.name)

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"DType({self.name!r})"

    def __reduce__(self):
        return (as_dtype, (self.name,))


DTYPES: dict[str, DType] = {name: DType(name) for name in _LAYOUT}
_FROM_CODE: dict[str, DType] = {code: DTYPES[name] for name, code in _SAFETENSORS_CODE.items() if code is not None}


def _is_torch_dtype(obj) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.dtype)


@cache
def _torch_dtype(name: str) -> torch.dtype:
    import torch

    obj = getattr(torch, name, None)
    if not isinstance(obj, torch.dtype):
        raise FormatError(f"dtype {name} is not available in this torch {torch.__version__}")
    return obj


def as_dtype(dtype) -> DType:
    """A :class:`DType` from a DType, a torch dtype or a name (``"float32"``, ``"torch.float32"``)."""
    if isinstance(dtype, DType):
        return dtype
    name = str(dtype).replace("torch.", "")
    try:
        return DTYPES[name]
    except KeyError:
        raise FormatError(f"dtype {dtype} cannot be stored by stalwart") from None


def dtype_from_code(code: str) -> DType:
    """The :class:`DType` of a safetensors header code (``"BF16"``)."""
    try:
        return _FROM_CODE[code]
    except KeyError:
        raise FormatError(f"safetensors dtype {code!r} is not supported") from None


@lru_cache(maxsize=1)
def _torch_tables() -> tuple[dict, dict, dict]:
    import torch

    supported = {name: getattr(torch, name) for name in _SAFETENSORS_CODE if hasattr(torch, name)}
    name_of = {dt: name for name, dt in supported.items()}
    from_st = {code: supported[name] for name, code in _SAFETENSORS_CODE.items() if code is not None and name in supported}
    return supported, name_of, from_st


def __getattr__(name: str):
    if name == "SUPPORTED_DTYPES":  # torch name -> torch dtype (built on first use: imports torch)
        return _torch_tables()[0]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def dtype_name(dtype: torch.dtype | DType) -> str:
    """The name stalwart stores for ``dtype`` (torch's own, e.g. ``"bfloat16"``)."""
    if isinstance(dtype, DType):
        return dtype.name
    try:
        return _torch_tables()[1][dtype]
    except KeyError:
        raise FormatError(f"dtype {dtype} cannot be stored by stalwart") from None


def dtype_from_name(name: str) -> torch.dtype:
    """Inverse of :func:`dtype_name`; a clear error for unknown names."""
    supported = _torch_tables()[0]
    try:
        return supported[name]
    except KeyError:
        raise FormatError(f"unknown dtype {name!r} (known: {', '.join(sorted(supported))})") from None


def safetensors_code(dtype: torch.dtype | DType) -> str | None:
    """The safetensors header code for ``dtype``; None if it must be stored as raw bytes."""
    return _SAFETENSORS_CODE[dtype_name(dtype)]


def dtype_from_safetensors(code: str) -> torch.dtype:
    try:
        return _torch_tables()[2][code]
    except KeyError:
        raise FormatError(f"safetensors dtype {code!r} is not supported") from None


def itemsize(dtype: torch.dtype | DType) -> int:
    """Bytes per element of a torch dtype or a :class:`DType`."""
    return dtype.itemsize


def numel(shape: tuple[int, ...] | list[int]) -> int:
    return math.prod(shape)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A zero-copy, writable byte view of a contiguous CPU tensor of any supported dtype."""
    import torch

    if t.device.type != "cpu":
        raise ValueError(f"tensor_bytes needs a CPU tensor, got {t.device}")
    if not t.is_contiguous():
        raise ValueError("tensor_bytes needs a contiguous tensor")
    if t.numel() == 0:
        return memoryview(bytearray(0))
    flat = t.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    return memoryview(flat.numpy()).cast("B")


def tensor_from_bytes(buf, dtype: torch.dtype, shape: tuple[int, ...] | list[int]) -> torch.Tensor:
    """A tensor of ``dtype``/``shape`` viewing ``buf`` (writable bytes-like), no copy."""
    import torch

    if isinstance(dtype, DType):
        dtype = dtype.torch
    shape = tuple(shape)
    n = numel(shape)
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    raw = torch.frombuffer(buf, dtype=torch.uint8)
    need = n * itemsize(dtype)
    if raw.numel() != need:
        raise FormatError(f"{raw.numel()} bytes cannot hold {dtype_name(dtype)}{list(shape)} ({need} bytes)")
    return raw.view(dtype).view(shape)
