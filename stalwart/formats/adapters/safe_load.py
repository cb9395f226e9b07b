"""Reading pickled checkpoint files (torch.save, DeepSpeed, DCP) without arbitrary unpickling.

Pickle runs whatever callable a file names, so stalwart never unpickles with an
open ``find_class``. Every global a file may name is on one explicit allow-list:

* torch's tensor/storage rebuild helpers, ``torch.Size``, dtypes, ``torch.device``
  (the lazy reader resolves them to stand-ins: a tuple, :class:`~stalwart.formats.dtypes.DType`,
  a string, so reading a file's structure never imports torch);
* plain containers and values (``collections.OrderedDict``, ``set``, ``slice``,
  ``_codecs.encode`` for bytes, ``copyreg._reconstructor``);
* numpy arrays and scalars (client state often holds them);
* ``argparse.Namespace`` (Megatron-DeepSpeed's ``args``);
* **stand-ins** for DeepSpeed's pickled classes, registered under DeepSpeed's
  dotted names so DeepSpeed need not be installed or imported:
  ``LossScaler``/``DynamicLossScaler`` (attribute holders), ``ZeroStageEnum``
  (an ``int``), ``fragment_address`` (``numel``, ``start``), ``SubparamShape``
  (``patterns``, ``shape``, ``partition_dim``);
* for DCP's ``.metadata`` only: DCP's own metadata dataclasses.

Anything else is a :class:`~stalwart.errors.FormatError` naming the class and the
file. Two readers share the list:

* :func:`torch_load` - ``torch.load(weights_only=True, mmap=True)`` with the
  stand-ins registered through ``torch.serialization.safe_globals``; whole
  tensors, used for legacy (non-zip) files and as a reference;
* :func:`open_lazy` - a restricted :class:`pickle.Unpickler` over the zip's
  ``data.pkl`` that returns :class:`TensorRef` leaves instead of tensors. A ref
  knows the file offset of its bytes (torch stores them uncompressed), so
  converters read exactly the elements they need with ``pread`` into buffers they
  own: bounded memory, parallel reads, no page cache mapped into the process.
"""

from __future__ import annotations

import _codecs
import _compat_pickle
import argparse
import collections
import copyreg
import io
import math
import os
import pickle
import re
import struct
import sys
import threading
import zipfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from stalwart.errors import FormatError
from stalwart.formats.dtypes import DTYPES, DType, as_dtype, itemsize, tensor_bytes

if TYPE_CHECKING:
    import torch

# --------------------------------------------------------------------------- stand-ins


class StandIn:
    """An attribute holder standing in for a pickled class stalwart does not import."""

    pickled_as: str = ""

    def __init__(self, *args, **kwargs) -> None:
        if args:
            self.__dict__["args"] = list(args)
        self.__dict__.update(kwargs)

    def __setstate__(self, state) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots)
            for part in state:
                if isinstance(part, dict):
                    self.__dict__.update(part)
        elif isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["state"] = state

    def to_json(self) -> dict:
        return {"class": self.pickled_as, **self.__dict__}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.__dict__})"


class LossScaler(StandIn):
    pickled_as = "deepspeed.runtime.fp16.loss_scaler.LossScaler"


class DynamicLossScaler(StandIn):
    pickled_as = "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"


class FragmentAddress(StandIn):
    """DeepSpeed's ``fragment_address(numel, start)`` (``start`` relative to a rank's partition)."""

    pickled_as = "deepspeed.utils.tensor_fragment.fragment_address"

    def __init__(self, numel: int = 0, start: int = 0) -> None:
        super().__init__(numel=numel, start=start)


class SubparamShape(StandIn):
    pickled_as = "deepspeed.checkpoint.universal_checkpoint.SubparamShape"


class ZeroStageEnum(int):
    """DeepSpeed's ``ZeroStageEnum`` (pickled as ``ZeroStageEnum(value)``): just the stage number."""

    pickled_as = "deepspeed.runtime.zero.config.ZeroStageEnum"

    def __new__(cls, value: int = 0) -> ZeroStageEnum:
        return super().__new__(cls, int(value))


STAND_INS: dict[str, type] = {
    c.pickled_as: c for c in (LossScaler, DynamicLossScaler, FragmentAddress, SubparamShape, ZeroStageEnum)
}
# Older DeepSpeed releases pickled the same classes from other modules.
STAND_INS["deepspeed.runtime.zero.stage2.ZeroStageEnum"] = ZeroStageEnum
STAND_INS["deepspeed.runtime.fp16.loss_scaler.LossScalerBase"] = LossScaler


# --------------------------------------------------------------------------- the allow-list

_BUILTINS = {
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "builtins.slice": slice,
    "builtins.complex": complex,
    "builtins.bytearray": bytearray,
    "builtins.list": list,
    "builtins.dict": dict,
    "builtins.tuple": tuple,
    "builtins.int": int,
    "builtins.float": float,
    "builtins.str": str,
    "builtins.bool": bool,
    "builtins.object": object,
    "collections.OrderedDict": collections.OrderedDict,
    "collections.defaultdict": collections.defaultdict,
    "_codecs.encode": _codecs.encode,
    "copyreg._reconstructor": copyreg._reconstructor,
    "argparse.Namespace": argparse.Namespace,
}


def _size(dims=()) -> tuple:
    """``torch.Size`` as the lazy reader sees it: a tuple of ints."""
    return tuple(int(d) for d in dims)


def _device(kind, index=None) -> str:
    """``torch.device`` as the lazy reader sees it: its string (``"cuda:0"``)."""
    kind = str(kind)
    return kind if index is None or ":" in kind else f"{kind}:{int(index)}"


_BUILTINS["torch.Size"] = _size
_BUILTINS["torch.device"] = _device


def _numpy_globals() -> dict[str, Any]:
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        return {}
    out: dict[str, Any] = {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out[f"{mod}._reconstruct"] = _np_reconstruct
        out[f"{mod}.scalar"] = _np_scalar
    return out


def _np_reconstruct(cls, shape, dtype):
    import numpy as np

    if cls is not np.ndarray:
        raise FormatError(f"numpy array subclass {cls!r} is not on stalwart's allow-list")
    return np.ndarray.__new__(cls, shape, dtype)


def _np_scalar(dtype, data=None):
    import numpy as np

    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise FormatError(f"numpy scalar of dtype {dtype!r} is not on stalwart's allow-list")
    return np.frombuffer(data if data is not None else b"", dtype=dtype, count=1)[0]


def _numpy_dtype_class(module: str, name: str):
    if module == "numpy.dtypes" and name.endswith("DType"):
        import numpy.dtypes as npd

        cls = getattr(npd, name, None)
        if cls is not None and name not in ("ObjectDType", "VoidDType"):
            return cls
    return None


def _torch_dtype(module: str, name: str) -> DType | None:
    if module == "torch":
        return DTYPES.get(name)
    return None


# torch's legacy typed-storage class names (torch.save still pickles them) -> element dtype
_STORAGE_DTYPES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128", "UntypedStorage": "uint8",
}


def allowed_names() -> list[str]:
    """Every dotted global name the restricted unpicklers accept (for docs and error messages)."""
    return sorted({*_BUILTINS, *_numpy_globals(), *STAND_INS, *_TORCH_REBUILD_NAMES, "torch.<dtype>", "torch.<X>Storage"})


_TORCH_REBUILD_NAMES = (
    "torch._utils._rebuild_tensor",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_tensor_v3",
    "torch._utils._rebuild_parameter",
    "torch._utils._rebuild_parameter_with_state",
    "torch._tensor._rebuild_from_type",
    "torch._tensor._rebuild_from_type_v2",
    "torch.Tensor",
    "torch.nn.parameter.Parameter",
    "torch.storage.UntypedStorage",
)

_REFUSED_HINTS = {
    "torch._utils._rebuild_sparse_tensor": "sparse tensors",
    "torch._utils._rebuild_qtensor": "quantized tensors",
    "torch._utils._rebuild_nested_tensor": "nested tensors",
    "torch._utils._rebuild_meta_tensor_no_storage": "meta tensors (no data)",
    "torch._utils._rebuild_wrapper_subclass": "tensor subclasses (DTensor, ...)",
}


def _refuse(module: str, name: str, where: str) -> FormatError:
    key = f"{module}.{name}"
    hint = _REFUSED_HINTS.get(key)
    what = f" ({hint} are not supported)" if hint else ""
    return FormatError(
        f"{where}: the pickle needs {key}{what}, which is not on stalwart's allow-list; stalwart never runs"
        " arbitrary pickled code. If this class is harmless data, report it so it can be added"
    )


# --------------------------------------------------------------------------- torch.load route


def torch_load(path: str, *, mmap: bool = True) -> Any:
    """``torch.load(weights_only=True)`` with DeepSpeed's classes replaced by stand-ins."""
    import torch

    allowed: list = [(cls, name) for name, cls in STAND_INS.items()]
    allowed.append(argparse.Namespace)
    where = path
    try:
        with torch.serialization.safe_globals(allowed):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError as e:
                if mmap and "mmap" in str(e):  # legacy (non-zip) files cannot be mapped
                    return torch.load(path, map_location="cpu", weights_only=True)
                raise
    except pickle.UnpicklingError as e:
        m = re.search(r"GLOBAL ([\w.]+) was not an allowed global", str(e)) or re.search(
            r"Unsupported global: GLOBAL ([\w.]+)", str(e)
        )
        if m:
            module, _, name = m.group(1).rpartition(".")
            raise _refuse(module, name, where) from None
        raise FormatError(f"{where}: cannot be read safely: {str(e).splitlines()[0]}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise FormatError(f"{where}: not a readable torch.save file ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


# --------------------------------------------------------------------------- lazy zip route


class _FileSlice(io.RawIOBase):
    """A read-only, seekable view of bytes ``[base, base + size)`` of an open file (pread based)."""

    def __init__(self, fd: int, base: int, size: int) -> None:
        super().__init__()
        self.fd, self.base, self.size, self.pos = fd, base, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            self.pos = offset
        elif whence == io.SEEK_CUR:
            self.pos += offset
        else:
            self.pos = self.size + offset
        return self.pos

    def readinto(self, b) -> int:
        n = max(0, min(len(b), self.size - self.pos))
        if n == 0:
            return 0
        data = os.pread(self.fd, n, self.base + self.pos)
        b[: len(data)] = data
        self.pos += len(data)
        return len(data)


class Archive:
    """A torch.save zip archive inside a file (the whole file, or one DCP entry)."""

    def __init__(self, path: str, fd: int, base: int = 0, size: int | None = None) -> None:
        self.path = path
        self.fd = fd
        self.base = base
        self.size = os.fstat(fd).st_size - base if size is None else size
        self.where = path if base == 0 else f"{path} (entry at byte {base})"
        try:
            self.zip = zipfile.ZipFile(_FileSlice(fd, base, self.size))
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
            raise FormatError(f"{self.where}: truncated or not a torch.save zip file ({_first_line(e)})") from None
        names = [i.filename for i in self.zip.infolist()]
        pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") <= 1]
        if not pkl:
            raise FormatError(f"{self.where}: zip file without data.pkl: not a torch.save file")
        self.prefix = pkl[0][: -len("data.pkl")]
        self._infos = {i.filename: i for i in self.zip.infolist()}
        self._offsets: dict[str, int] = {}
        order = self._infos.get(self.prefix + "byteorder")
        if order is not None and self.zip.read(order).strip() != b"little":
            raise FormatError(f"{self.where}: big-endian torch.save files are not supported")

    def read_record(self, name: str) -> bytes:
        try:
            return self.zip.read(self.prefix + name)
        except KeyError:
            raise FormatError(f"{self.where}: record {name!r} is missing (truncated file?)") from None
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise FormatError(f"{self.where}: record {name!r} is unreadable ({_first_line(e)})") from None

    def record_offset(self, name: str, nbytes: int) -> int:
        """Absolute file offset of the (uncompressed) bytes of record ``name``."""
        full = self.prefix + name
        off = self._offsets.get(full)
        if off is not None:
            return off
        info = self._infos.get(full)
        if info is None:
            raise FormatError(f"{self.where}: tensor data record {name!r} is missing (truncated file?)")
        if info.compress_type != zipfile.ZIP_STORED:
            raise FormatError(f"{self.where}: record {name!r} is compressed; torch.save never compresses tensors")
        if info.file_size < nbytes:
            raise FormatError(f"{self.where}: record {name!r} holds {info.file_size} bytes, {nbytes} expected")
        head = os.pread(self.fd, 30, self.base + info.header_offset)
        if len(head) < 30 or head[:4] != b"PK\x03\x04":
            raise FormatError(f"{self.where}: bad local header for record {name!r}")
        n, e = struct.unpack("<HH", head[26:30])
        off = self.base + info.header_offset + 30 + n + e
        if off + info.file_size > self.base + self.size:
            raise FormatError(f"{self.where}: record {name!r} runs past the end of the file (truncated)")
        self._offsets[full] = off
        return off


@dataclass(frozen=True)
class _StorageRef:
    archive: Archive
    key: str
    dtype: DType
    numel: int

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)


@dataclass
class TensorRef:
    """A tensor in a pickled file, not yet read: where its bytes are and how to view them."""

    storage: _StorageRef
    storage_offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: DType
    requires_grad: bool = False
    is_param: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)

    @property
    def where(self) -> str:
        return self.storage.archive.where

    def is_contiguous(self) -> bool:
        expect = 1
        for n, s in zip(reversed(self.shape), reversed(self.stride)):
            if n != 1 and s != expect:
                return False
            expect *= n
        return True

    def alias_key(self) -> tuple:
        """Equal for refs that view the same bytes the same way (tied tensors)."""
        return (id(self.storage.archive), self.storage.key, self.storage_offset, self.shape, self.stride, self.dtype)

    def _file_offset(self, element: int) -> int:
        base = self.storage.archive.record_offset(f"data/{self.storage.key}", self.storage.nbytes)
        return base + element * itemsize(self.dtype)

    def byte_range(self, start: int = 0, count: int | None = None) -> tuple[int, int, int]:
        """(fd, file offset, byte count) of flat elements ``[start, start+count)`` of a contiguous ref."""
        count = self.numel - start if count is None else count
        self._check_flat(start, count)
        return self.storage.archive.fd, self._file_offset(self.storage_offset + start), count * itemsize(self.dtype)

    def _check_flat(self, start: int, count: int) -> None:
        if not self.is_contiguous():
            raise FormatError(f"{self.where}: flat reads need a contiguous tensor")
        if start < 0 or count < 0 or start + count > self.numel:
            raise FormatError(f"{self.where}: elements [{start}, {start + count}) outside a tensor of {self.numel}")
        if self.storage_offset + self.numel > self.storage.numel:
            raise FormatError(f"{self.where}: tensor runs past its storage record (corrupt file)")

    def read_flat(self, start: int = 0, count: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Flat elements ``[start, start+count)`` (1-D), read into ``out`` when given."""
        import torch

        count = self.numel - start if count is None else count
        fd, off, nbytes = self.byte_range(start, count)
        if out is None:
            out = torch.empty(count, dtype=self.dtype.torch)
        elif out.numel() != count or as_dtype(out.dtype) != self.dtype or not out.is_contiguous():
            raise ValueError("read_flat: out has the wrong size, dtype or layout")
        if nbytes:
            pread_into(fd, tensor_bytes(out), off, self.where)
        return out

    def read(self) -> torch.Tensor:
        """The whole tensor (a fresh contiguous CPU tensor)."""
        import torch

        if self.is_contiguous():
            return self.read_flat().view(self.shape)
        if self.numel == 0:
            return torch.empty(self.shape, dtype=self.dtype.torch)
        lo = self.storage_offset
        hi = lo + sum((n - 1) * s for n, s in zip(self.shape, self.stride)) + 1
        if min(self.stride, default=0) < 0 or hi > self.storage.numel:
            raise FormatError(f"{self.where}: tensor view runs outside its storage (corrupt file)")
        span = torch.empty(hi - lo, dtype=self.dtype.torch)
        pread_into(self.storage.archive.fd, tensor_bytes(span), self._file_offset(lo), self.where)
        return span.as_strided(self.shape, self.stride).contiguous()


def pread_into(fd: int, buf: memoryview, offset: int, where: str) -> None:
    """Fill ``buf`` from ``fd`` at ``offset``; a short file is a clear error."""
    view = memoryview(buf).cast("B")
    pos = offset
    while view:
        got = os.preadv(fd, [view], pos)
        if got == 0:
            raise FormatError(f"{where}: file ends at byte {pos} inside tensor data (truncated)")
        view = view[got:]
        pos += got


def _lazy_rebuild_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    if not isinstance(storage, _StorageRef):
        raise FormatError("malformed pickle: a tensor without a storage record")
    return TensorRef(storage, int(storage_offset), tuple(int(x) for x in size), tuple(int(x) for x in stride),
                     storage.dtype, bool(requires_grad))


def _lazy_rebuild_v1(storage, storage_offset, size, stride):
    return _lazy_rebuild_v2(storage, storage_offset, size, stride)


def _lazy_rebuild_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    if not isinstance(storage, _StorageRef) or not isinstance(dtype, DType):
        raise FormatError("malformed pickle: bad _rebuild_tensor_v3 arguments")
    typed = _StorageRef(storage.archive, storage.key, dtype, storage.nbytes // itemsize(dtype))
    return TensorRef(typed, int(storage_offset), tuple(int(x) for x in size), tuple(int(x) for x in stride), dtype,
                     bool(requires_grad))


def _lazy_parameter(data, requires_grad, backward_hooks, state=None):
    if isinstance(data, TensorRef):
        data.requires_grad = bool(requires_grad)
        data.is_param = True
    return data


class _TensorType:
    """What ``torch.Tensor`` / ``torch.nn.Parameter`` resolve to while reading lazily."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


_TENSOR_TYPES = {name: _TensorType(name) for name in ("torch.Tensor", "torch.nn.parameter.Parameter")}


def _lazy_from_type(func, new_type, args, state):
    if not isinstance(new_type, _TensorType):
        raise FormatError(f"tensor subclass {new_type!r} is not on stalwart's allow-list")
    return func(*args)


class _StorageType:
    """What ``torch.FloatStorage`` & co. resolve to while unpickling: just a dtype."""

    def __init__(self, dtype: DType) -> None:
        self.dtype = dtype


_LAZY_TORCH = {
    "torch._utils._rebuild_tensor": _lazy_rebuild_v1,
    "torch._utils._rebuild_tensor_v2": _lazy_rebuild_v2,
    "torch._utils._rebuild_tensor_v3": _lazy_rebuild_v3,
    "torch._utils._rebuild_parameter": _lazy_parameter,
    "torch._utils._rebuild_parameter_with_state": _lazy_parameter,
    "torch._tensor._rebuild_from_type_v2": _lazy_from_type,
    "torch._tensor._rebuild_from_type": _lazy_from_type,
    **_TENSOR_TYPES,
    "torch.storage.UntypedStorage": _StorageType(DTYPES["uint8"]),
}


class _RestrictedUnpickler(pickle.Unpickler):
    """``find_class`` answers only from the allow-list; storages become lazy refs."""

    def __init__(self, file, archive: Archive | None, where: str, extra: dict[str, Any] | None = None) -> None:
        super().__init__(file)
        self.archive = archive
        self.where = where
        self.extra = extra or {}
        self._storages: dict[str, _StorageRef] = {}

    def find_class(self, module: str, name: str):
        # Protocol-2 pickles (torch.save's) name Python 2 modules (__builtin__, copy_reg).
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        key = f"{module}.{name}"
        for table in (self.extra, _LAZY_TORCH if self.archive is not None else {}, _BUILTINS, STAND_INS):
            if key in table:
                return table[key]
        obj = _torch_dtype(module, name)
        if obj is not None:
            return obj
        if self.archive is not None and module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(DTYPES[_STORAGE_DTYPES[name]])
        np_globals = _numpy_globals() if module.startswith("numpy") else {}
        if key in np_globals:
            return np_globals[key]
        obj = _numpy_dtype_class(module, name)
        if obj is not None:
            return obj
        raise _refuse(module, name, self.where)

    def persistent_load(self, pid):
        if self.archive is None:
            raise FormatError(f"{self.where}: unexpected persistent reference in pickle")
        try:
            typename, storage_type, key, _location, numel = pid
        except (TypeError, ValueError):
            raise FormatError(f"{self.where}: malformed storage reference {pid!r}") from None
        if typename != "storage" or not isinstance(storage_type, _StorageType):
            raise FormatError(f"{self.where}: unsupported persistent reference {typename!r}")
        key = str(key)
        ref = self._storages.get(key)
        if ref is None:
            dtype = storage_type.dtype
            count = int(numel)
            ref = self._storages[key] = _StorageRef(self.archive, key, dtype, count)
        return ref


class LazyFile:
    """An open torch.save file whose tensors are :class:`TensorRef` s. Close it (or use ``with``)."""

    def __init__(self, path: str, *, base: int = 0, size: int | None = None, fd: int | None = None) -> None:
        self.path = path
        self._own_fd = fd is None
        try:
            self.fd = os.open(path, os.O_RDONLY) if fd is None else fd
        except FileNotFoundError:
            raise FormatError(f"{path}: file is missing") from None
        except IsADirectoryError:
            raise FormatError(f"{path} is a directory, expected a torch.save file") from None
        try:
            self.archive = Archive(path, self.fd, base, size)
            raw = self.archive.read_record("data.pkl")
            self.obj = _RestrictedUnpickler(io.BytesIO(raw), self.archive, self.archive.where).load()
        except FormatError:
            self.close()
            raise
        except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError, IndexError) as e:
            self.close()
            raise FormatError(f"{path}: malformed pickle ({_first_line(e)})") from None

    def close(self) -> None:
        if self._own_fd and getattr(self, "fd", -1) >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> LazyFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def is_zip_file(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def open_lazy(path: str) -> LazyFile:
    """Open a torch.save zip file lazily (see :class:`LazyFile`)."""
    return LazyFile(path)


def materialize(obj: Any) -> Any:
    """Replace every :class:`TensorRef` in a (small) structure by its tensor."""
    if isinstance(obj, TensorRef):
        return obj.read()
    if isinstance(obj, dict):
        return type(obj)((k, materialize(v)) for k, v in obj.items()) if isinstance(obj, collections.OrderedDict) else {
            k: materialize(v) for k, v in obj.items()
        }
    if isinstance(obj, list):
        return [materialize(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(materialize(v) for v in obj)
    return obj


# --------------------------------------------------------------------------- DCP metadata


def _dcp_metadata_globals() -> dict[str, Any]:
    """DCP's metadata classes, and real torch values (dtypes, sizes) for them to hold."""
    import torch
    from torch.distributed.checkpoint import filesystem, metadata

    out: dict[str, Any] = {}
    for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    ):
        if hasattr(metadata, name):
            out[f"torch.distributed.checkpoint.metadata.{name}"] = getattr(metadata, name)
    out["torch.distributed.checkpoint.filesystem._StorageInfo"] = filesystem._StorageInfo
    for name in ("strided", "sparse_coo", "contiguous_format", "channels_last", "preserve_format"):
        out[f"torch.{name}"] = getattr(torch, name)
    for name in DTYPES:
        if isinstance(getattr(torch, name, None), torch.dtype):
            out[f"torch.{name}"] = getattr(torch, name)
    out["torch.Size"] = torch.Size
    out["torch.device"] = torch.device
    out["torch.serialization._get_layout"] = _get_layout
    import pathlib

    for name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"):
        out[f"pathlib.{name}"] = getattr(pathlib, name)
        out[f"pathlib._local.{name}"] = getattr(pathlib, name)
    return out


def _get_layout(name: str) -> torch.layout:
    """``torch.layout`` objects pickle as ``torch.serialization._get_layout("torch.strided")``."""
    import torch

    obj = getattr(torch, str(name).replace("torch.", ""), None)
    if not isinstance(obj, torch.layout):
        raise FormatError(f"unknown torch layout {name!r}")
    return obj


def load_dcp_metadata(path: str):
    """Unpickle a DCP ``.metadata`` file allowing only DCP's metadata classes and plain values."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise FormatError(f"{path}: file is missing") from None
    try:
        return _RestrictedUnpickler(io.BytesIO(raw), None, path, _dcp_metadata_globals()).load()
    except FormatError:
        raise
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise FormatError(f"{path}: malformed DCP metadata ({_first_line(e)})") from None


def load_small(path: str, base: int = 0, size: int | None = None, fd: int | None = None) -> Any:
    """Unpickle a small torch.save blob (e.g. a DCP bytes entry) with tensors materialized."""
    with LazyFile(path, base=base, size=size, fd=fd) as lf:
        return materialize(lf.obj)


# --------------------------------------------------------------------------- JSON


def to_jsonable(obj: Any, path: str = "", dropped: list[str] | None = None) -> Any:
    """A JSON-able copy of ``obj``; what cannot be represented is left out and its path
    appended to ``dropped`` (tensors, arbitrary objects)."""
    dropped = [] if dropped is None else dropped
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, ZeroStageEnum):
        return int(obj)
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else repr(obj)
    if isinstance(obj, StandIn):
        return to_jsonable(obj.to_json(), path, dropped)
    if isinstance(obj, argparse.Namespace):
        return to_jsonable(vars(obj), path, dropped)
    if isinstance(obj, DType):
        return obj.name
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Size):
        return list(obj)
    if torch is not None and isinstance(obj, torch.dtype):
        return str(obj).replace("torch.", "")
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            sub = f"{path}.{k}" if path else str(k)
            if not isinstance(k, (str, int, float, bool)) and k is not None:
                dropped.append(sub)
                continue
            before = len(dropped)
            val = to_jsonable(v, sub, dropped)
            if val is _DROP:
                if len(dropped) == before:
                    dropped.append(sub)
                continue
            out[str(k)] = val
        return out
    if isinstance(obj, (list, tuple, set, frozenset)):
        out_list = []
        for i, v in enumerate(obj):
            val = to_jsonable(v, f"{path}[{i}]", dropped)
            if val is _DROP:
                return _DROP
            out_list.append(val)
        return out_list
    try:
        import numpy as np

        if isinstance(obj, np.generic) and obj.dtype.kind in "biuf":
            return to_jsonable(obj.item(), path, dropped)
    except ImportError:  # pragma: no cover
        pass
    dropped.append(path or "<root>")
    return _DROP


class _Drop:
    def __repr__(self) -> str:
        return "<dropped>"


_DROP = _Drop()


def jsonable(obj: Any) -> tuple[Any, list[str]]:
    """(JSON-able copy of ``obj`` or None, paths that were dropped)."""
    dropped: list[str] = []
    out = to_jsonable(obj, "", dropped)
    return (None if out is _DROP else out), dropped


__all__ = [
    "STAND_INS",
    "DynamicLossScaler",
    "FragmentAddress",
    "LazyFile",
    "LossScaler",
    "StandIn",
    "SubparamShape",
    "TensorRef",
    "ZeroStageEnum",
    "allowed_names",
    "is_zip_file",
    "jsonable",
    "load_dcp_metadata",
    "load_small",
    "materialize",
    "open_lazy",
    "torch_load",
]
