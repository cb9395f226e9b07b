"""The streaming conversion engine behind ``stalwart convert``.

``convert(src, dst, to=...)`` opens any checkpoint format stalwart reads (the
format is detected), selects, renames and casts its tensors, and writes them in
the target format:

* **streaming** - tensors are read one at a time by ``workers`` threads (readers
  ``pread`` exactly a tensor's bytes, into recycled buffers where the target allows,
  never mapping whole files) and handed to the writer in its order; at most
  ``buffer_bytes`` of read-ahead is in flight, so peak memory is about the largest
  tensor plus that buffer, whatever the size of the checkpoint;
* **all-or-nothing** - everything is written into a temporary sibling of
  ``dst`` that is renamed into place at the end; a failure leaves nothing;
* **deterministic** - the same input gives byte-identical output, whatever the
  number of workers or their timing;
* **nothing dropped silently** - files of the source a reader does not consume, and
  state the target cannot hold, are named in the plan's warnings.

torch is imported only when a tensor has to be built (a cast, a target that stores
tensors through torch, a reader without byte ranges): converting to Hugging Face
safetensors without a cast copies bytes from file to file and never imports it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import re
import shutil
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from stalwart.errors import ConversionError, StalwartError
from stalwart.formats.adapters.base import (
    ConvertSource,
    OutState,
    OutTensor,
    PlannedFile,
    RawBytes,
    SourceMeta,
    Target,
    fill_from_ranges,
)
from stalwart.formats.atomic import fsync_dir, install_dir, temp_sibling
from stalwart.formats.convert_options import DEFAULT_BUFFER, DEFAULT_MAX_SHARD, TARGETS
from stalwart.formats.direct_io import page_cache_policy
from stalwart.formats.dtypes import DTYPES as _ALL_DTYPES
from stalwart.formats.dtypes import DType, as_dtype, tensor_bytes

if TYPE_CHECKING:
    import torch

_F32, _BF16, _F16, _F64 = (_ALL_DTYPES[n] for n in ("float32", "bfloat16", "float16", "float64"))
DTYPES = {
    "fp32": _F32, "float32": _F32, "float": _F32,
    "bf16": _BF16, "bfloat16": _BF16,
    "fp16": _F16, "float16": _F16, "half": _F16,
    "fp64": _F64, "float64": _F64,
}

Progress = Callable[[int], None]


# --------------------------------------------------------------------------- options


def parse_dtype(value: str | DType | torch.dtype | None) -> DType | None:
    """``"bf16"`` / ``torch.bfloat16`` / None -> a floating :class:`DType`."""
    if value is None:
        return None
    if not isinstance(value, str):
        dt = as_dtype(value)
        if not dt.is_floating_point:
            raise ConversionError(f"--dtype {dt} is not a floating-point dtype")
        return dt
    try:
        return DTYPES[str(value).lower().replace("torch.", "")]
    except KeyError:
        raise ConversionError(f"unknown --dtype {value!r}; use one of {', '.join(sorted(DTYPES))}") from None


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "ki": 2**10, "mi": 2**20, "gi": 2**30}


def parse_size(value: str | int) -> int:
    """``"5GB"`` (10^9, as Hugging Face counts), ``"2GiB"``, ``"500MB"`` or bytes -> bytes."""
    if isinstance(value, int):
        if value <= 0:
            raise ConversionError(f"size {value} must be positive")
        return value
    m = _SIZE_RE.match(str(value))
    unit = (m.group(2) or "").lower() if m else None
    if not m or unit not in _UNITS:
        raise ConversionError(f"cannot read size {value!r}; write e.g. 5GB, 500MB, 2GiB or a byte count")
    n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise ConversionError(f"size {value!r} must be positive")
    return n


def parse_rename(rules: Iterable[str | tuple[str, str]] | None) -> list[tuple[re.Pattern, str]]:
    """``["^module\\.=", "PATTERN=REPLACEMENT"]`` -> compiled (pattern, replacement) pairs."""
    out = []
    for rule in rules or ():
        if isinstance(rule, tuple):
            pat, repl = rule
        else:
            if "=" not in rule:
                raise ConversionError(f"rename rule {rule!r} must look like PATTERN=REPLACEMENT (regex, re.sub syntax)")
            pat, repl = rule.split("=", 1)
        try:
            out.append((re.compile(pat), repl))
        except re.error as e:
            raise ConversionError(f"rename pattern {pat!r} is not a valid regex: {e}") from None
    return out


def _compile(patterns: Sequence[str] | str | None, what: str) -> list[re.Pattern]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise ConversionError(f"--{what} pattern {p!r} is not a valid regex: {e}") from None
    return out


# --------------------------------------------------------------------------- plan and result


@dataclass
class ConversionPlan:
    """What a conversion reads and writes (``--dry-run`` prints it)."""

    source: str
    source_format: str
    destination: str
    target: str
    state: OutState
    files: list[PlannedFile]
    notes: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    not_read: list[str] = field(default_factory=list)  # source files no reader consumed

    @property
    def tensors(self) -> list[OutTensor]:
        return self.state.tensors

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.state.tensors)

    @property
    def warnings(self) -> list[str]:
        return list(self.state.meta.warnings) + self.notes


@dataclass
class ConversionResult:
    plan: ConversionPlan
    seconds: float
    bytes_written: int

    @property
    def destination(self) -> str:
        return self.plan.destination


# --------------------------------------------------------------------------- sources and targets


def _raise_open_files_limit(want: int = 65536) -> None:
    """Readers keep one descriptor per source file (a ZeRO checkpoint has one per DP rank,
    a universal one several per param): lift the soft limit towards the hard one."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = want if hard == resource.RLIM_INFINITY else min(want, hard)
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ImportError, ValueError, OSError):  # pragma: no cover - platform without rlimits
        pass


def open_convert_source(path: str, **options) -> ConvertSource:
    """Open ``path`` in whatever format it is, as a :class:`ConvertSource` (``options``:
    see :func:`~stalwart.formats.sources.open_source`)."""
    from stalwart.formats.sources import NativeSource, open_source

    _raise_open_files_limit()
    src = open_source(path, **options)
    if isinstance(src, ConvertSource):
        unused = [k for k, v in options.items() if v is not None and k not in getattr(src, "used_options", ())]
        for k in unused:
            src.meta.warnings.append(f"--{k.replace('_', '-')} {options[k]}: not used (the {src.meta.format} reader"
                                     " names its optimizer params itself)")
        return src
    if isinstance(src, NativeSource):
        from stalwart.formats.adapters.native import NativeConvertSource

        src.close()
        return NativeConvertSource(path)
    src.close()
    raise ConversionError(f"{path}: format {src.format_name!r} cannot be converted")


_TARGET_CLASSES = {"native": ("native", "NativeTarget"), "hf": ("hf", "HFTarget"), "dcp": ("dcp", "DCPTarget"),
                   "ds-universal": ("ds_universal", "UniversalTarget"), "torch": ("torch_save", "TorchSaveTarget")}


def make_target(to: str, **options) -> Target:
    """The writer of format ``to`` (only its module is imported: the native one needs torch)."""
    import importlib

    if to not in _TARGET_CLASSES:
        raise ConversionError(f"unknown target format {to!r}; use one of {', '.join(TARGETS)}")
    module, cls = _TARGET_CLASSES[to]
    return getattr(importlib.import_module(f"stalwart.formats.adapters.{module}"), cls)(**options)


# --------------------------------------------------------------------------- selection


def select(
    src: ConvertSource,
    *,
    dtype: DType | None = None,
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
    rename: Iterable[str | tuple[str, str]] | None = None,
    weights_only: bool = False,
) -> tuple[OutState, list[str]]:
    """Apply filters, renames and the dtype; return the output state and what was dropped."""
    inc, exc = _compile(include, "include"), _compile(exclude, "exclude")
    rules = parse_rename(rename)

    def keep(fqn: str) -> bool:
        if inc and not any(p.search(fqn) for p in inc):
            return False
        return not any(p.search(fqn) for p in exc)

    def new_name(fqn: str) -> str:
        for pat, repl in rules:
            fqn = pat.sub(repl, fqn)
        return fqn

    model = [t for t in src.tensors.values() if t.role != "optimizer_slot"]
    kept = {t.name for t in model if keep(t.name)}
    dropped = [t.name for t in model if t.name not in kept]
    out: list[OutTensor] = []
    names: dict[str, str] = {}
    for t in model:
        if t.name not in kept:
            continue
        cast = dtype if dtype is not None and t.dtype.is_floating_point and t.role in ("param", "buffer", "other") else None
        out.append(OutTensor(new_name(t.name), t.name, t.shape, cast or t.dtype, t.dtype, t.role,
                             requires_grad=t.requires_grad))
        names[t.name] = out[-1].name
    aliases: dict[str, str] = {}
    for alias, owner in src.aliases.items():
        if not keep(alias):
            dropped.append(alias)
            continue
        if owner in names:
            aliases[new_name(alias)] = names[owner]
        else:  # the owner was filtered out: the alias becomes a tensor of its own
            t = src.tensors[owner]
            cast = dtype if dtype is not None and t.dtype.is_floating_point else None
            out.append(OutTensor(new_name(alias), owner, t.shape, cast or t.dtype, t.dtype, t.role, requires_grad=t.requires_grad))
            names[alias] = out[-1].name
    if not weights_only:
        for t in src.tensors.values():
            if t.role != "optimizer_slot":
                continue
            if t.param is not None and t.param not in names:
                dropped.append(t.name)
                continue
            param = names.get(t.param) if t.param is not None else None
            name = f"optim.{param}.{t.slot}" if param is not None and t.slot else new_name(t.name)
            out.append(OutTensor(name, t.name, t.shape, t.dtype, t.dtype, "optimizer_slot", param, t.slot))
    seen: dict[str, str] = {}
    for t in out:
        if t.name in seen:
            raise ConversionError(f"--rename maps both {seen[t.name]!r} and {t.source!r} to {t.name!r}")
        seen[t.name] = t.source
    for alias in aliases:
        if alias in seen:
            raise ConversionError(f"--rename maps the tied alias {alias!r} onto the tensor name of {seen[alias]!r}")
    meta = _select_meta(src.meta, names, weights_only)
    return OutState(out, aliases, meta, weights_only), dropped


def _select_meta(meta: SourceMeta, names: dict[str, str], weights_only: bool) -> SourceMeta:
    m = replace(meta, warnings=list(meta.warnings), info=dict(meta.info), client=dict(meta.client))
    if weights_only:
        m.optimizer = m.scheduler = m.loss_scaler = None
        return m
    if m.optimizer is not None:
        groups = []
        for g in m.optimizer.get("param_groups") or []:
            params = [names[p] for p in g.get("params", []) if isinstance(p, str) and p in names]
            groups.append({**g, "params": params})
        m.optimizer = {**m.optimizer, "param_groups": groups}
    return m


# --------------------------------------------------------------------------- streaming


class BufferPool:
    """Read buffers that are reused, so that after the first tensors no fresh pages are
    faulted in per tensor (first touch is the slowest part of a copy on many hosts).
    Buffers coming back beyond ``limit`` bytes of free capacity are dropped."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def acquire(self, nbytes: int) -> torch.Tensor:
        import torch

        with self._lock:
            fits = [i for i, b in enumerate(self.free) if b.numel() >= nbytes]
            if fits:
                best = min(fits, key=lambda i: self.free[i].numel())
                return self.free.pop(best)
        return torch.empty(max(nbytes, 1), dtype=torch.uint8)

    def release(self, buf: torch.Tensor) -> None:
        with self._lock:
            if sum(b.numel() for b in self.free) + buf.numel() <= self.limit:
                self.free.append(buf)


def _read_one(src: ConvertSource, t: OutTensor, pool: BufferPool | None, raw_ok: bool):
    """(payload, pooled buffer or None): a tensor of ``t``'s dtype, or RawBytes when ``raw_ok``."""
    st = src.tensors[src.aliases.get(t.source, t.source)]
    if st.ranges is not None and (raw_ok or pool is not None) and st.nbytes:
        if raw_ok and st.dtype == t.dtype:
            return RawBytes(st.ranges(), st.dtype, st.shape, src.path), None
        if pool is not None:
            buf = pool.acquire(st.nbytes)
            fill_from_ranges(st.ranges(), tensor_bytes(buf[: st.nbytes]), src.path)
            x = buf[: st.nbytes].view(st.dtype.torch).view(st.shape)
            if st.dtype == t.dtype:
                return x, buf
            y = x.to(t.dtype.torch)
            pool.release(buf)
            return y, None
    x = src.read(t.source)
    if as_dtype(x.dtype) != t.dtype:
        x = x.to(t.dtype.torch)
    if not x.is_contiguous():
        x = x.contiguous()
    return x, None


def stream_tensors(
    src: ConvertSource,
    order: list[OutTensor],
    *,
    workers: int = 2,
    buffer_bytes: int = DEFAULT_BUFFER,
    reuse_buffers: bool = False,
    raw_ok: bool = False,
) -> Iterator[tuple[OutTensor, torch.Tensor | RawBytes]]:
    """Yield (out tensor, data) in ``order``, reading ahead with ``workers`` threads.

    At most ``buffer_bytes`` of read-ahead (besides the tensor being consumed) is in
    flight; a tensor larger than that is read alone. With ``reuse_buffers`` a tensor's
    memory is recycled once the consumer asks for the next one (so the consumer must
    be done with it by then); with ``raw_ok`` tensors whose bytes lie in the source
    files as they are come as :class:`RawBytes` instead of being read.
    """
    pool = BufferPool(buffer_bytes) if reuse_buffers else None
    if workers <= 1:
        for t in order:
            data, buf = _read_one(src, t, pool, raw_ok)
            yield t, data
            del data
            if buf is not None:
                pool.release(buf)
        return
    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="stalwart-convert")
    queue: deque = deque()
    it = iter(order)
    inflight = 0
    pending = None
    try:
        while True:
            while True:
                if pending is None:
                    pending = next(it, None)
                if pending is None:
                    break
                if queue and (inflight + pending.nbytes > buffer_bytes or len(queue) >= 4 * workers):
                    break
                queue.append((pending, executor.submit(_read_one, src, pending, pool, raw_ok)))
                inflight += pending.nbytes
                pending = None
            if not queue:
                return
            t, fut = queue.popleft()
            data, buf = fut.result()
            inflight -= t.nbytes
            yield t, data
            del data
            if buf is not None:
                pool.release(buf)
    finally:
        for _, fut in queue:
            fut.cancel()
        executor.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------- the entry point


def _check_destination(src: str, dst: str, overwrite: bool) -> None:
    s, d = os.path.realpath(src), os.path.realpath(dst)
    if d == s or d.startswith(s.rstrip(os.sep) + os.sep) or s.startswith(d.rstrip(os.sep) + os.sep):
        raise ConversionError(f"destination {dst} overlaps the source {src}; write somewhere else")
    if os.path.lexists(dst) and not overwrite:
        if os.path.isdir(dst) and not os.listdir(dst):
            return
        raise ConversionError(f"destination {dst} exists; pass --overwrite (overwrite=True) to replace it")


def _created(src: ConvertSource) -> str:
    """A deterministic creation time: the source's own (its newest file), not the wall clock."""
    created = getattr(src, "created", "")
    if created:
        return created
    newest = 0.0
    root = src.path
    with contextlib.suppress(OSError):
        if os.path.isdir(root):
            for dirpath, _, files in os.walk(root):
                for f in files:
                    newest = max(newest, os.stat(os.path.join(dirpath, f)).st_mtime)
        else:
            newest = os.stat(root).st_mtime
    return _dt.datetime.fromtimestamp(int(newest), _dt.timezone.utc).isoformat(timespec="seconds") if newest else ""


def plan_conversion(
    src: ConvertSource,
    dst: str,
    *,
    to: str,
    dtype: str | DType | torch.dtype | None = None,
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
    rename: Iterable[str | tuple[str, str]] | None = None,
    weights_only: bool = False,
    max_shard_size: str | int = DEFAULT_MAX_SHARD,
    tag: str | None = None,
    workers: int = 2,
) -> tuple[ConversionPlan, Target]:
    target = make_target(to, max_shard_size=parse_size(max_shard_size), tag=tag, workers=workers)
    if src.meta.unread_state and target.keeps_optimizer and not weights_only:
        raise ConversionError(
            f"{src.path}: cannot convert all of its state: {'; '.join(src.meta.unread_state)}. Pass --weights-only"
            " (weights_only=True) to convert without it"
        )
    state, dropped = select(src, dtype=parse_dtype(dtype), include=include, exclude=exclude, rename=rename,
                            weights_only=weights_only or not target.keeps_optimizer)
    state.created = _created(src)
    if not state.tensors:
        raise ConversionError(f"{src.path}: nothing to convert (the filters left no tensor)")
    files = target.plan(state)
    notes = target.notes(state)
    if not target.keeps_optimizer and not weights_only:
        left = [what for what, present in (
            ("optimizer state", src.meta.optimizer is not None or any(t.role == "optimizer_slot" for t in src.tensors.values())),
            ("scheduler", src.meta.scheduler is not None), ("loss scaler", src.meta.loss_scaler is not None),
            ("RNG state", "rng" in src.meta.extra_objects)) if present]
        if left:
            notes.insert(0, f"{to}: {', '.join(left)} not written (the format holds weights only)")
    not_read = src.not_read()
    if not_read:
        shown = ", ".join(not_read[:8]) + (f" and {len(not_read) - 8} more" if len(not_read) > 8 else "")
        notes.append(f"not read (not in the output): {shown}")
    return ConversionPlan(src.path, src.meta.format, dst, to, state, files, notes, dropped, not_read), target


def convert(
    src: str,
    dst: str,
    *,
    to: str,
    dtype: str | DType | torch.dtype | None = None,
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
    rename: Iterable[str | tuple[str, str]] | None = None,
    weights_only: bool = False,
    max_shard_size: str | int = DEFAULT_MAX_SHARD,
    dry_run: bool = False,
    workers: int = 2,
    progress: Progress | None = None,
    overwrite: bool = False,
    fsync: bool = False,
    tag: str | None = None,
    buffer_bytes: int = DEFAULT_BUFFER,
    on_plan: Callable[[ConversionPlan], object] | None = None,
    param_order: str | None = None,
) -> ConversionPlan | ConversionResult:
    """Convert checkpoint ``src`` (any supported format, detected) into ``dst`` in format ``to``.

    ``to``: ``native`` | ``hf`` | ``dcp`` | ``ds-universal`` | ``torch``. ``dtype`` casts
    floating-point params and buffers (optimizer slots keep theirs); ``include`` /
    ``exclude`` are regexes searched in source param/buffer names (slots follow their
    param); ``rename`` rules ``PATTERN=REPLACEMENT`` apply ``re.sub`` to names in order;
    ``weights_only`` drops optimizer state. ``max_shard_size`` bounds Hugging Face
    shards. ``tag`` names the DeepSpeed universal tag directory. ``fsync`` makes the
    output durable against power loss before it is renamed into place (off by default,
    like the tools it replaces: the output is derived data, and the rename alone already
    makes it all-or-nothing for the process). With ``dry_run`` nothing
    is read or written and the :class:`ConversionPlan` is returned; otherwise a
    :class:`ConversionResult`. Raises :class:`~stalwart.errors.StalwartError` subclasses
    for bad input; a failed conversion leaves nothing at ``dst``. ``param_order`` names
    the params of optimizer state indexed by position (HF Trainer ``optimizer.pt``,
    Accelerate ``optimizer.bin``): a file with one name per line in optimizer order, or
    the model's ``config.json`` (the order is rebuilt with transformers).
    """
    if to not in TARGETS:
        raise ConversionError(f"unknown target format {to!r}; use one of {', '.join(TARGETS)}")
    if workers < 1:
        raise ConversionError(f"workers must be >= 1, got {workers}")
    _check_destination(src, dst, overwrite or dry_run)
    started = time.perf_counter()
    with open_convert_source(src, param_order=param_order) as source:
        plan, target = plan_conversion(source, dst, to=to, dtype=dtype, include=include, exclude=exclude,
                                       rename=rename, weights_only=weights_only, max_shard_size=max_shard_size, tag=tag,
                                       workers=workers)
        if on_plan is not None:
            on_plan(plan)
        if dry_run:
            return plan
        with page_cache_policy(sum(t.nbytes for t in plan.state.tensors), fsync=fsync):
            written = _write(source, dst, plan, target, workers=workers, progress=progress, fsync=fsync,
                             buffer_bytes=buffer_bytes)
    return ConversionResult(plan, time.perf_counter() - started, written)


def _write(source: ConvertSource, dst: str, plan: ConversionPlan, target: Target, *, workers: int,
           progress: Progress | None, fsync: bool, buffer_bytes: int) -> int:
    order = target.order(plan.state)
    written = 0

    def counted() -> Iterator[tuple[OutTensor, torch.Tensor | RawBytes]]:
        nonlocal written
        for t, data in stream_tensors(source, order, workers=workers, buffer_bytes=buffer_bytes,
                                      reuse_buffers=target.sync_writes, raw_ok=target.accepts_raw):
            yield t, data
            written += t.nbytes
            if progress is not None:
                progress(t.nbytes)

    if target.single_file:
        parent = os.path.dirname(os.path.abspath(dst)) or "."
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(dst))}.tmp-{uuid.uuid4().hex[:12]}")
        try:
            target.write(tmp, plan.state, counted(), fsync=fsync)
            if os.path.isdir(dst):
                shutil.rmtree(dst)
            os.replace(tmp, dst)
            if fsync:
                fsync_dir(parent)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return written
    if os.path.isdir(dst) and not os.listdir(dst):
        os.rmdir(dst)
    tmp = temp_sibling(dst)
    try:
        target.write(tmp, plan.state, counted(), fsync=fsync)
        if fsync:
            fsync_dir(tmp)
        install_dir(tmp, dst, fsync=fsync)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return written


__all__ = [
    "TARGETS",
    "ConversionPlan",
    "ConversionResult",
    "StalwartError",
    "convert",
    "open_convert_source",
    "parse_dtype",
    "parse_rename",
    "parse_size",
    "plan_conversion",
    "select",
    "stream_tensors",
]
