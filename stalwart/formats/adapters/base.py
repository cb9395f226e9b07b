"""What every foreign-format reader gives the converter: named whole tensors plus state.

A :class:`ConvertSource` is a :class:`~stalwart.formats.sources.TensorSource` that
also knows, for each tensor, what it is (param, buffer, optimizer slot of which
param, frozen or not), which names are tied aliases of which, and the training
state around it (optimizer param groups and hyper-parameters, scheduler, loss
scaler, step, client state). Names follow the native convention: params and
buffers by their plain FQN, optimizer slots as ``optim.<fqn>.<slot>``.

Tensors are read one at a time (:meth:`ConvertSource.read`) and readers must be
thread-safe: the converter reads several at once. Dtypes are
:class:`~stalwart.formats.dtypes.DType` s and nothing here imports torch until a
tensor is built, so tools that only move bytes never import it.

Nothing is dropped silently: a reader records every file it reads
(:meth:`ConvertSource.consume`); :meth:`ConvertSource.not_read` lists the files in
the source directory that no reader consumed, and the converter reports them.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from stalwart.errors import FormatError
from stalwart.formats.adapters.safe_load import pread_into
from stalwart.formats.dtypes import DTYPES, DType, as_dtype, itemsize, tensor_bytes
from stalwart.formats.sources import TensorInfo, TensorSource

if TYPE_CHECKING:
    import torch

Reader = Callable[[], "torch.Tensor"]
Ranges = Callable[[], list[tuple[int, int, int]]]


def slot_name(fqn: str, slot: str) -> str:
    """The native name of optimizer slot ``slot`` of param ``fqn``."""
    return f"optim.{fqn}.{slot}"


@dataclass
class SourceTensor:
    """One logical tensor of a source checkpoint and how to read it."""

    name: str
    shape: tuple[int, ...]
    dtype: DType
    role: str  # param | buffer | optimizer_slot | other
    reader: Reader = field(repr=False)
    param: str | None = None  # optimizer slots: the param they belong to
    slot: str | None = None
    requires_grad: bool | None = None  # params: False for frozen ones
    # Where the tensor's bytes lie in the source files, when they lie there as they are
    # (contiguous, this dtype, little-endian): (fd, offset, nbytes) pieces in order. Lets
    # the converter read into buffers it reuses, or copy file to file in the kernel.
    ranges: Ranges | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.dtype = as_dtype(self.dtype)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)


class Scalar:
    """A 0-d value (an optimizer's ``step``) held as its dtype and little-endian bytes, so
    scalars can be compared and carried without building a tensor."""

    _FORMATS = {"int64": "<q", "int32": "<i", "float64": "<d", "float32": "<f", "bool": "<?", "float16": "<e"}

    def __init__(self, dtype: DType, raw: bytes) -> None:
        self.dtype, self.raw = as_dtype(dtype), bytes(raw)
        if len(self.raw) != self.dtype.itemsize:
            raise FormatError(f"a {self.dtype} scalar needs {self.dtype.itemsize} bytes, got {len(self.raw)}")

    @classmethod
    def of(cls, value) -> Scalar:
        """From a Python bool / int / float (stored as torch would: bool, int64, float64)."""
        if isinstance(value, bool):
            return cls(DTYPES["bool"], struct.pack("<?", value))
        if isinstance(value, int):
            return cls(DTYPES["int64"], struct.pack("<q", value))
        if isinstance(value, float):
            return cls(DTYPES["float64"], struct.pack("<d", value))
        raise FormatError(f"unsupported scalar {type(value).__name__}")

    def value(self):
        """The Python value (for messages); bytes in hex for dtypes struct cannot decode."""
        fmt = self._FORMATS.get(self.dtype.name)
        if fmt is None:
            if self.dtype.name == "bfloat16":
                return struct.unpack("<f", b"\0\0" + self.raw)[0]
            return self.raw.hex()
        return struct.unpack(fmt, self.raw)[0]

    def tensor(self) -> torch.Tensor:
        import torch

        return torch.frombuffer(bytearray(self.raw), dtype=self.dtype.torch).reshape(()).clone()

    def __eq__(self, other) -> bool:
        return isinstance(other, Scalar) and self.dtype == other.dtype and self.raw == other.raw

    def __hash__(self) -> int:
        return hash((self.dtype, self.raw))


class RawBytes:
    """A tensor that was not read: its bytes' places in the source files (see ``SourceTensor.ranges``).

    Targets that store tensors as raw bytes stream them from the source files straight
    into their output (no intermediate tensor); others call :meth:`read`.
    """

    def __init__(self, ranges: list[tuple[int, int, int]], dtype: DType, shape: tuple[int, ...], where: str) -> None:
        self.ranges, self.dtype, self.shape, self.where = ranges, as_dtype(dtype), tuple(shape), where
        self.nbytes = sum(n for _, _, n in ranges)
        if self.nbytes != math.prod(self.shape) * itemsize(dtype):
            raise FormatError(f"{where}: byte ranges hold {self.nbytes} bytes, {dtype}{list(shape)} needs more")

    def read(self) -> torch.Tensor:
        import torch

        out = torch.empty(self.shape, dtype=self.dtype.torch)
        fill_from_ranges(self.ranges, tensor_bytes(out), self.where)
        return out


def fill_from_ranges(ranges: list[tuple[int, int, int]], buf: memoryview, where: str) -> None:
    """Read the concatenation of ``ranges`` into ``buf``."""
    view = memoryview(buf).cast("B")
    pos = 0
    for fd, off, n in ranges:
        pread_into(fd, view[pos : pos + n], off, where)
        pos += n


@dataclass
class SourceMeta:
    """Everything but the tensors."""

    format: str
    step: int | None = None
    optimizer: dict | None = None  # {"class": str | None, "param_groups": [{"params": [fqn, ...], **hparams}]}
    scheduler: dict | None = None
    loss_scaler: dict | None = None
    client: dict = field(default_factory=dict)
    topology: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    extra_objects: dict = field(default_factory=dict)
    # State the reader found but could not read (e.g. optimizer state it cannot name): a
    # conversion that would write such state fails instead of dropping it silently.
    unread_state: list[str] = field(default_factory=list)


class ConvertSource(TensorSource):
    """Base of the format readers; subclasses fill :attr:`tensors`, :attr:`aliases` and :attr:`meta`."""

    default_format = ""

    def __init__(self, path: str) -> None:
        self.path = path
        self.tensors: dict[str, SourceTensor] = {}
        self.aliases: dict[str, str] = {}  # alias -> owner (owner is in tensors)
        self.meta = SourceMeta(self.default_format)
        self._closers: list[Callable[[], None]] = []
        self.consumed: set[str] = set()  # real paths of the files a reader used

    # building ---------------------------------------------------------------
    def add(self, t: SourceTensor) -> None:
        if t.name in self.tensors:
            raise FormatError(f"{self.path}: tensor {t.name!r} appears twice")
        self.tensors[t.name] = t

    def on_close(self, fn: Callable[[], None]) -> None:
        self._closers.append(fn)

    def consume(self, *paths: str) -> None:
        """Record files (or whole directories) this reader takes in."""
        for p in paths:
            self.consumed.add(os.path.realpath(p))

    def not_read(self) -> list[str]:
        """Files under the source directory that no reader consumed (relative paths).

        A directory none of whose files was consumed is listed once (``global_step1/``);
        hidden files and directories (``.cache``, ``.git``) are skipped; a consumed
        directory covers everything below it.
        """
        root = self.path
        if not os.path.isdir(root):
            return []
        consumed = self.consumed
        prefixes = {os.path.dirname(p) for p in consumed}
        touched: set[str] = set()  # directories holding something consumed, and their parents
        for d in prefixes | consumed:
            while d and d not in touched:
                touched.add(d)
                parent = os.path.dirname(d)
                if parent == d:
                    break
                d = parent
        out: list[str] = []

        def walk(real_dir: str, rel: str) -> None:
            try:
                entries = sorted(os.scandir(real_dir), key=lambda e: e.name)
            except OSError:
                return
            for e in entries:
                if e.name.startswith("."):
                    continue
                full = os.path.realpath(e.path)
                relp = os.path.join(rel, e.name) if rel else e.name
                if full in consumed:
                    continue
                if e.is_dir():
                    if full in touched:
                        walk(full, relp)
                    else:
                        out.append(relp + "/")
                else:
                    out.append(relp)

        walk(os.path.realpath(root), "")
        return out

    # TensorSource --------------------------------------------------------------
    @property
    def format_name(self) -> str:  # type: ignore[override]
        """The detected format, e.g. ``deepspeed-zero3`` (shown by ``stalwart diff``)."""
        return self.meta.format

    def infos(self) -> dict[str, TensorInfo]:
        out = {n: TensorInfo(n, t.shape, t.dtype, t.role) for n, t in self.tensors.items()}
        for alias, owner in self.aliases.items():
            t = self.tensors[owner]
            out[alias] = TensorInfo(alias, t.shape, t.dtype, t.role)
        return out

    def read(self, name: str) -> torch.Tensor:
        name = self.aliases.get(name, name)
        t = self.tensors.get(name)
        if t is None:
            raise FormatError(f"{self.path}: no tensor named {name!r}")
        out = t.reader()
        if tuple(out.shape) != t.shape or as_dtype(out.dtype) != t.dtype:
            raise FormatError(
                f"{self.path}: tensor {name!r} read as {out.dtype}{list(out.shape)}, expected {t.dtype}{list(t.shape)}"
            )
        return out

    def raw(self, name: str) -> RawBytes | None:
        """The tensor's bytes in place (None when the format cannot give them, e.g. checksummed)."""
        t = self.tensors[self.aliases.get(name, name)]
        if t.ranges is None:
            return None
        return RawBytes(t.ranges(), t.dtype, t.shape, self.path)

    def objects(self) -> dict:
        m = self.meta
        out: dict = {"source": {"format": m.format, **m.info}}
        if m.step is not None:
            out["step"] = m.step
        for key in ("optimizer", "scheduler", "loss_scaler"):
            if getattr(m, key) is not None:
                out[key] = getattr(m, key)
        if m.client:
            out["client"] = m.client
        return out

    def close(self) -> None:
        while self._closers:
            self._closers.pop()()


# --------------------------------------------------------------------------- the write side


@dataclass
class OutTensor:
    """A tensor the converter writes: its output name and dtype, and what to read for it."""

    name: str
    source: str  # name in the source
    shape: tuple[int, ...]
    dtype: DType  # output dtype
    src_dtype: DType
    role: str
    param: str | None = None
    slot: str | None = None
    requires_grad: bool | None = None

    def __post_init__(self) -> None:
        self.dtype, self.src_dtype = as_dtype(self.dtype), as_dtype(self.src_dtype)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)


@dataclass
class OutState:
    """Everything a target writes: tensors (model tensors first, then slots), aliases, state."""

    tensors: list[OutTensor]
    aliases: dict[str, str]  # alias -> owner (an output name)
    meta: SourceMeta
    weights_only: bool = False
    created: str = ""  # ISO time recorded where a format has one (deterministic: the source's)

    def model(self) -> list[OutTensor]:
        return [t for t in self.tensors if t.role != "optimizer_slot"]

    def slots(self) -> list[OutTensor]:
        return [t for t in self.tensors if t.role == "optimizer_slot"]

    def aliases_of(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for alias, owner in self.aliases.items():
            out.setdefault(owner, []).append(alias)
        return out


@dataclass
class PlannedFile:
    path: str  # relative to the output
    nbytes: int
    tensors: int = 0


class Target:
    """A format the converter writes. Subclasses implement :meth:`plan` and :meth:`write`.

    ``write`` consumes ``stream`` - (OutTensor, tensor) pairs in the order of
    :meth:`order` - and writes everything under ``out`` (a fresh temporary
    directory, or a temporary file path when :attr:`single_file`).
    """

    name = ""
    description = ""
    single_file = False
    keeps_optimizer = True
    accepts_raw = False  # write() takes RawBytes payloads (copies them file to file)
    sync_writes = True  # done with a tensor's memory once it asks for the next one

    def __init__(self, **options) -> None:
        self.options = options

    def order(self, state: OutState) -> list[OutTensor]:
        return list(state.tensors)

    def plan(self, state: OutState) -> list[PlannedFile]:
        raise NotImplementedError

    def notes(self, state: OutState) -> list[str]:
        """What this target leaves out or changes (shown by --dry-run and in warnings)."""
        return []

    def write(self, out: str, state: OutState, stream, *, fsync: bool = True) -> None:
        raise NotImplementedError


def check_unique_slots(src: ConvertSource) -> None:
    """Every slot's param must be a tensor of the source (catches misnamed optimizer state)."""
    for t in src.tensors.values():
        if t.role == "optimizer_slot" and t.param not in src.tensors:
            raise FormatError(f"{src.path}: optimizer slot {t.name!r} belongs to {t.param!r}, which has no tensor")


def infer_optimizer_class(slots: set[str], hparams: dict) -> str | None:
    """Best guess of the torch optimizer class from its slot names and hyper-parameters."""
    if {"exp_avg", "exp_avg_sq"} <= slots:
        return "AdamW" if hparams.get("decoupled_weight_decay") else "Adam"
    if "momentum_buffer" in slots:
        return "SGD"
    if "square_avg" in slots:
        return "RMSprop"
    if "sum" in slots:
        return "Adagrad"
    return None


def match_by_shape(
    candidates: list[tuple[str, tuple[int, ...]]], wanted: list[tuple[int, ...] | None]
) -> list[str] | None:
    """Assign each optimizer param (in order) to the next model tensor of its shape.

    ``candidates`` are (name, shape) of the model's unique tensors in order;
    ``wanted`` the shape of each optimizer param's state (None when it has none,
    which then takes the next candidate). Returns the names, or None when the
    shapes cannot be matched in order.
    """
    out = []
    i = 0
    for shape in wanted:
        while i < len(candidates) and shape is not None and candidates[i][1] != shape:
            i += 1
        if i >= len(candidates):
            return None
        out.append(candidates[i][0])
        i += 1
    return out


__all__ = [
    "ConvertSource",
    "OutState",
    "OutTensor",
    "PlannedFile",
    "RawBytes",
    "Scalar",
    "SourceMeta",
    "SourceTensor",
    "Target",
    "check_unique_slots",
    "infer_optimizer_class",
    "match_by_shape",
    "slot_name",
]
