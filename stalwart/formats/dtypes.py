"""Torch dtypes <-> the names stalwart stores, and zero-copy byte views of tensors.

The manifest stores torch's own dtype name (``"bfloat16"``); safetensors headers
store the safetensors code (``"BF16"``). Dtypes safetensors has no code for are
stored in safetensors as raw ``U8`` bytes while the manifest keeps the real dtype.
"""

from __future__ import annotations

import math

import torch

from stalwart.errors import FormatError

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

SUPPORTED_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name) for name in _SAFETENSORS_CODE if hasattr(torch, name)
}
_NAME_OF: dict[torch.dtype, str] = {dt: name for name, dt in SUPPORTED_DTYPES.items()}
_FROM_SAFETENSORS: dict[str, torch.dtype] = {
    code: SUPPORTED_DTYPES[name]
    for name, code in _SAFETENSORS_CODE.items()
    if code is not None and name in SUPPORTED_DTYPES
}


def dtype_name(dtype: torch.dtype) -> str:
    """The name stalwart stores for ``dtype`` (torch's own, e.g. ``"bfloat16"``)."""
    try:
        return _NAME_OF[dtype]
    except KeyError:
        raise FormatError(f"dtype {dtype} cannot be stored by stalwart") from None


def dtype_from_name(name: str) -> torch.dtype:
    """Inverse of :func:`dtype_name`; a clear error for unknown names."""
    try:
        return SUPPORTED_DTYPES[name]
    except KeyError:
        raise FormatError(f"unknown dtype {name!r} (known: {', '.join(sorted(SUPPORTED_DTYPES))})") from None


def safetensors_code(dtype: torch.dtype) -> str | None:
    """The safetensors header code for ``dtype``; None if it must be stored as raw bytes."""
    return _SAFETENSORS_CODE[dtype_name(dtype)]


def dtype_from_safetensors(code: str) -> torch.dtype:
    try:
        return _FROM_SAFETENSORS[code]
    except KeyError:
        raise FormatError(f"safetensors dtype {code!r} is not supported") from None


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def numel(shape: tuple[int, ...] | list[int]) -> int:
    return math.prod(shape)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A zero-copy, writable byte view of a contiguous CPU tensor of any supported dtype."""
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
    shape = tuple(shape)
    n = numel(shape)
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    raw = torch.frombuffer(buf, dtype=torch.uint8)
    need = n * itemsize(dtype)
    if raw.numel() != need:
        raise FormatError(f"{raw.numel()} bytes cannot hold {dtype_name(dtype)}{list(shape)} ({need} bytes)")
    return raw.view(dtype).view(shape)
