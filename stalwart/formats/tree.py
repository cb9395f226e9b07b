"""Nested state <-> flat named tensors + a JSON structure record.

``save`` accepts what ``torch.save`` users pass: nested dicts and lists of tensors,
numbers, strings, bools, None and bytes. Tensors are stored under dotted names
(``model.layer.0.weight``); everything else, and the exact nesting (including
integer keys, tuples and key order), is recorded in a JSON tree so ``load`` rebuilds
the same structure. Nothing is ever pickled: other types are a clear error.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping

import torch

from stalwart.errors import FormatError


def flatten(state, *, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict]:
    """Return (tensors by dotted name, structure tree)."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _flatten(state, prefix, tensors, ())
    return tensors, tree


INLINE_TENSOR_MAX = 64


def encode_value(obj) -> dict:
    """Small state (hyper-parameters, scheduler state) as an exact JSON tree.

    Like :func:`flatten`, but tensors of at most 64 elements are stored inline
    (dtype, shape, values) instead of being split out; bigger ones are an error.
    """
    inline: dict[str, torch.Tensor] = {}
    tree = _flatten(obj, "v", inline, ())
    return _inline(tree, inline)


def _inline(tree: dict, tensors: dict[str, torch.Tensor]) -> dict:
    t = tree.get("t")
    if t == "tensor":
        x = tensors[tree["name"]]
        if x.numel() > INLINE_TENSOR_MAX:
            raise FormatError(f"a {list(x.shape)} tensor cannot be stored inline as a small value")
        x = x.detach().cpu()
        values = x.reshape(-1).view(torch.uint8).tolist() if x.dtype.itemsize == 1 and not x.dtype.is_floating_point else None
        if values is None:
            values = [repr(float(v)) if x.dtype.is_floating_point else int(v) for v in x.reshape(-1).tolist()] if not x.dtype.is_complex else None
        if values is None:
            raise FormatError("complex tensors cannot be stored inline")
        return {"t": "inline", "dtype": str(x.dtype).replace("torch.", ""), "shape": list(x.shape), "v": values}
    if t == "dict":
        return {**tree, "v": [_inline(v, tensors) for v in tree["v"]]}
    if t in ("list", "tuple"):
        return {**tree, "v": [_inline(v, tensors) for v in tree["v"]]}
    return tree


def decode_value(tree: Mapping):
    """Inverse of :func:`encode_value`."""
    return unflatten(tree, {})


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _flatten(obj, name: str, tensors: dict, path: tuple):
    if isinstance(obj, torch.Tensor):
        if not name:
            raise FormatError("a bare tensor cannot be saved; pass a dict such as {'weight': t}")
        if name in tensors:
            raise FormatError(f"two entries flatten to the same name {name!r}; rename one of them")
        tensors[name] = obj
        return {"t": "tensor", "name": name}
    if isinstance(obj, Mapping):
        keys, values = [], []
        for k, v in obj.items():
            if isinstance(k, bool) or not isinstance(k, (str, int)):
                raise FormatError(f"key {k!r} at {'/'.join(map(str, path)) or '<root>'}: only str and int keys can be stored")
            keys.append([k, "int" if isinstance(k, int) else "str"])
            values.append(_flatten(v, _join(name, str(k)), tensors, (*path, k)))
        return {"t": "dict", "k": keys, "v": values}
    if isinstance(obj, (list, tuple)) and not isinstance(obj, torch.Size):
        return {
            "t": "tuple" if isinstance(obj, tuple) else "list",
            "v": [_flatten(v, _join(name, str(i)), tensors, (*path, i)) for i, v in enumerate(obj)],
        }
    if isinstance(obj, torch.Size):
        return {"t": "size", "v": list(obj)}
    if obj is None or isinstance(obj, (bool, int, str)):
        return {"t": "value", "v": obj}
    if isinstance(obj, float):
        if math.isfinite(obj):
            return {"t": "value", "v": obj}
        return {"t": "float", "v": repr(obj)}
    if isinstance(obj, (bytes, bytearray)):
        return {"t": "bytes", "v": base64.b64encode(bytes(obj)).decode("ascii")}
    where = "/".join(map(str, path)) or "<root>"
    raise FormatError(
        f"cannot store a {type(obj).__name__} at {where}: stalwart stores tensors and JSON-able values"
        " (dict, list, tuple, str, int, float, bool, None, bytes) and never pickles"
    )


def unflatten(tree: Mapping, tensors: Mapping[str, torch.Tensor], *, missing_ok: bool = False):
    """Rebuild the saved structure from ``tree``; tensors are taken from ``tensors``."""
    t = tree.get("t")
    if t == "tensor":
        name = tree["name"]
        if name not in tensors:
            if missing_ok:
                return None
            raise FormatError(f"tensor {name!r} named in the structure is missing")
        return tensors[name]
    if t == "dict":
        out = {}
        for (k, kind), v in zip(tree["k"], tree["v"]):
            key = int(k) if kind == "int" else str(k)
            value = unflatten(v, tensors, missing_ok=missing_ok)
            if missing_ok and value is None and v.get("t") == "tensor":
                continue
            out[key] = value
        return out
    if t in ("list", "tuple"):
        items = [unflatten(v, tensors, missing_ok=missing_ok) for v in tree["v"]]
        return tuple(items) if t == "tuple" else items
    if t == "size":
        return torch.Size(tree["v"])
    if t == "value":
        return tree["v"]
    if t == "float":
        return float(tree["v"])
    if t == "bytes":
        return base64.b64decode(tree["v"])
    if t == "inline":
        from stalwart.formats.dtypes import dtype_from_name

        dtype = dtype_from_name(tree["dtype"])
        if dtype.is_floating_point:
            data = torch.tensor([float(v) for v in tree["v"]], dtype=torch.float64).to(dtype)
        elif dtype.itemsize == 1:
            data = torch.tensor(tree["v"], dtype=torch.uint8).view(dtype)
        else:
            data = torch.tensor(tree["v"], dtype=torch.int64).to(dtype)
        return data.reshape(tree["shape"])
    raise FormatError(f"unknown structure node {t!r}")


def is_flat_tensor_dict(tree: Mapping) -> bool:
    return tree.get("t") == "dict" and all(v.get("t") == "tensor" for v in tree["v"])
