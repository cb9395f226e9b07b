"""Plain ``torch.save`` files: a model state dict, or ``{model, optimizer, ...}``.

Reading goes through the restricted unpickler (:mod:`.safe_load`): zip files
lazily (tensors are read with ``pread`` when converted), legacy non-zip files
through ``torch.load(weights_only=True)``. Recognised layouts:

* a flat state dict ``{fqn: tensor}`` (tied tensors share a storage);
* a dict with a model state dict under ``model`` / ``state_dict`` /
  ``model_state_dict`` / ``module``, optionally an optimizer state dict under
  ``optimizer`` / ``optim`` / ``optimizer_state_dict`` (torch's format: ``state``
  by param index or FQN, ``param_groups``), ``step`` / ``global_step`` /
  ``iteration``, ``lr_scheduler`` / ``scheduler``; other tensors are kept as
  role ``other``, other values as client state.

Optimizer state indexed by position is matched to names through the groups'
``param_names`` (torch >= 2.6 records them) or else by order and shape.

Writing streams a real torch.save zip (torch's own ``PyTorchFileWriter``, records
in torch.save's order): the pickle holds placeholders for the tensors, whose
bytes are then written one record at a time, so memory stays bounded. Weights
only: a plain state dict (``model.load_state_dict`` takes it). Otherwise
``{"model", "optimizer" (param groups with ``param_names``), "step",
"lr_scheduler", "stalwart": {...}}``.
"""

from __future__ import annotations

import collections
import contextlib
import io
import math
import os
import pickle
import sys
from typing import TYPE_CHECKING

from stalwart.errors import ConversionError, FormatError
from stalwart.formats.adapters.base import (
    ConvertSource,
    OutState,
    PlannedFile,
    Scalar,
    SourceTensor,
    Target,
    infer_optimizer_class,
    match_by_shape,
    slot_name,
)
from stalwart.formats.adapters.safe_load import (
    LazyFile,
    StandIn,
    TensorRef,
    is_zip_file,
    jsonable,
    torch_load,
)
from stalwart.formats.direct_io import DirectWriter
from stalwart.formats.dtypes import DType, as_dtype
from stalwart.formats.sources import register_source

if TYPE_CHECKING:
    import torch

MODEL_KEYS = ("model", "state_dict", "model_state_dict", "module")
OPTIM_KEYS = ("optimizer", "optim", "optimizer_state_dict")
STEP_KEYS = ("step", "global_step", "iteration")
SCHED_KEYS = ("lr_scheduler", "scheduler")
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


# --------------------------------------------------------------------------- reading


def _is_torch_tensor(v) -> bool:
    torch = sys.modules.get("torch")  # a torch tensor exists only if torch was imported
    return torch is not None and isinstance(v, torch.Tensor)


def _is_tensor(v) -> bool:
    return isinstance(v, TensorRef) or _is_torch_tensor(v)


def _info(v) -> tuple[DType, tuple[int, ...]]:
    return as_dtype(v.dtype), tuple(v.shape)


def _reader(v):
    if isinstance(v, TensorRef):
        return v.read
    if isinstance(v, Scalar):
        return v.tensor
    t = v.detach().contiguous()
    return lambda: t.clone()


def _ranges(v):
    if isinstance(v, TensorRef) and v.is_contiguous():
        return lambda: [v.byte_range()]
    return None


def _alias_key(v) -> tuple | None:
    if isinstance(v, TensorRef):
        return v.alias_key() if v.numel else None
    if v.numel() == 0:
        return None
    return (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()), v.dtype)


def _is_state_dict(d) -> bool:
    return isinstance(d, dict) and bool(d) and all(_is_tensor(v) for v in d.values())


def _is_optimizer(d) -> bool:
    return isinstance(d, dict) and isinstance(d.get("state"), dict) and isinstance(d.get("param_groups"), list)


class TorchSaveSource(ConvertSource):
    """A ``torch.save`` file (see the module docstring)."""

    default_format = "torch"

    def __init__(self, path: str, param_order: str | None = None) -> None:
        super().__init__(path)
        self.consume(path)
        self.param_order = param_order
        self.used_options = {"param_order"}
        if is_zip_file(path):
            lf = LazyFile(path)
            self.on_close(lf.close)
            obj = lf.obj
        else:
            obj = torch_load(path, mmap=False)
        self.meta.format = "torch-save"
        try:
            self._interpret(obj)
        except BaseException:
            self.close()
            raise

    def _interpret(self, obj) -> None:
        if not isinstance(obj, dict):
            raise FormatError(f"{self.path}: holds a {type(obj).__name__}, not a state dict or a dict of state")
        if _is_state_dict(obj):
            self._add_model(obj, {})
            return
        model_key = next((k for k in MODEL_KEYS if _is_state_dict(obj.get(k))), None)
        if model_key is None:
            flat = {k: v for k, v in obj.items() if _is_tensor(v)}
            if not flat:
                raise FormatError(
                    f"{self.path}: no state dict found (keys {sorted(map(str, obj))[:8]}); expected tensors or one of"
                    f" {list(MODEL_KEYS)} holding them"
                )
            model_key, model = None, flat
        else:
            model = obj[model_key]
        extra = obj.get("stalwart") if isinstance(obj.get("stalwart"), dict) else {}
        self._add_model(model, extra)
        optim_key = next((k for k in OPTIM_KEYS if _is_optimizer(obj.get(k))), None)
        if optim_key is not None:
            self._add_optimizer(obj[optim_key])
        used = {model_key, optim_key, "stalwart"}
        step = next((obj[k] for k in STEP_KEYS if isinstance(obj.get(k), int) and not isinstance(obj.get(k), bool)), None)
        if step is not None:
            self.meta.step = int(step)
            used.update(k for k in STEP_KEYS if k in obj)
        sched_key = next((k for k in SCHED_KEYS if isinstance(obj.get(k), dict)), None)
        if sched_key is not None:
            self.meta.scheduler, dropped = jsonable(obj[sched_key])
            used.add(sched_key)
            if dropped:
                self.meta.warnings.append(f"scheduler state not representable as JSON, dropped: {dropped[:8]}")
        client = {}
        for k, v in obj.items():
            if k in used or (model_key is None and _is_tensor(v)):
                continue
            if _is_tensor(v):
                dtype, shape = _info(v)
                self.add(SourceTensor(str(k), shape, dtype, "other", _reader(v), ranges=_ranges(v)))
            else:
                client[k] = v
        if isinstance(extra.get("client"), dict):
            client = {**extra["client"], **client}
        self.meta.client, dropped = jsonable(client)
        self.meta.client = self.meta.client or {}
        if dropped:
            self.meta.warnings.append(f"values not representable as JSON, dropped: {dropped[:8]}")
        for key in ("loss_scaler",):
            if extra.get(key) is not None:
                setattr(self.meta, key, extra[key])
        if isinstance(extra.get("source"), dict):
            self.meta.info = {"origin": extra["source"]}
        if isinstance(extra.get("topology"), dict):
            self.meta.topology = extra["topology"]

    def _add_model(self, model: dict, extra: dict) -> None:
        buffers = set(extra.get("buffers") or [])
        frozen = set(extra.get("frozen") or [])
        seen: dict[tuple, str] = {}
        for name, v in model.items():
            name = str(name)
            key = _alias_key(v)
            if key is not None and key in seen:
                self.aliases[name] = seen[key]
                continue
            if key is not None:
                seen[key] = name
            dtype, shape = _info(v)
            role = "buffer" if name in buffers else "param"
            self.add(SourceTensor(name, shape, dtype, role, _reader(v),
                                  requires_grad=(name not in frozen) if role == "param" else None, ranges=_ranges(v)))

    def _add_optimizer(self, osd: dict) -> None:
        groups = osd["param_groups"]
        state = osd["state"]
        ids = [p for g in groups for p in g.get("params", [])]
        names = optimizer_param_names(osd)
        if names is None and self.param_order is not None:
            from stalwart.formats.adapters.param_order import model_param_order, read_param_order

            names, config = read_param_order(self.param_order)
            if config is not None:
                names = model_param_order(config)[0]
            self.meta.warnings.append(f"optimizer params named from --param-order {self.param_order}")
        if names is None:
            cands = [(n, t.shape) for n, t in self.tensors.items() if t.role == "param"]
            wanted = []
            for p in ids:
                refs = [v for v in (state.get(p) or {}).values() if _is_tensor(v) and tuple(v.shape) != ()]
                wanted.append(tuple(refs[0].shape) if refs else None)
            matched = match_by_shape(cands, wanted)
            if matched is None:
                raise ConversionError(
                    f"{self.path}: cannot tell which model tensor each of the {len(ids)} optimizer params is"
                    " (the optimizer state has no param_names; matching by order and shape failed)"
                )
            names = matched
            self.meta.warnings.append("optimizer params matched to model tensors by order and shape (no param_names)")
        add_optimizer_state(self, osd, names, self.path)


def optimizer_param_names(osd: dict) -> list[str] | None:
    """The param names of a torch optimizer state dict, when it records them (FQN keys, or
    ``param_names``, which torch >= 2.6 saves for optimizers built from named params)."""
    ids = [p for g in osd["param_groups"] for p in g.get("params", [])]
    named = [n for g in osd["param_groups"] for n in (g.get("param_names") or [])]
    if ids and all(isinstance(p, str) for p in ids):
        return [str(p) for p in ids]
    if named and len(named) == len(ids):
        return [str(n) for n in named]
    return None


def add_optimizer_state(src: ConvertSource, osd: dict, names: list[str], where: str) -> None:
    """Add the slots of torch optimizer state dict ``osd`` to ``src`` as ``optim.<name>.<slot>``
    and its param groups (by name) to ``src.meta.optimizer``; ``names`` are the params in
    the order of the groups' ``params`` lists. Every slot's shape is checked against its param."""
    groups = osd["param_groups"]
    state = osd["state"]
    ids = [p for g in groups for p in g.get("params", [])]
    if len(names) != len(ids):
        raise ConversionError(f"{where}: the optimizer holds {len(ids)} params, {len(names)} names were given for them")
    missing = [n for n in names if n not in src.tensors]
    if missing:
        raise FormatError(f"{where}: optimizer state names params {missing[:5]} that the model state lacks")
    name_of = dict(zip(ids, names))
    slots = set()
    for pid, name in name_of.items():
        p = src.tensors[name]
        for slot, v in (state.get(pid) or {}).items():
            slots.add(slot)
            if _is_tensor(v):
                dtype, shape = _info(v)
                if shape not in ((), p.shape) and math.prod(shape) != math.prod(p.shape):
                    raise ConversionError(
                        f"{where}: optimizer slot {slot!r} of param {pid} has shape {list(shape)}, but the param it is"
                        f" mapped to, {name!r}, has shape {list(p.shape)}: the param order is wrong"
                    )
                src.add(SourceTensor(slot_name(name, slot), shape, dtype, "optimizer_slot", _reader(v), name, slot,
                                     ranges=_ranges(v)))
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                t = Scalar.of(v)
                src.add(SourceTensor(slot_name(name, slot), (), t.dtype, "optimizer_slot", _reader(t), name, slot))
            else:
                raise ConversionError(f"{where}: optimizer state {slot!r} of {name!r} is a {type(v).__name__}")
        if p.requires_grad is None:
            p.requires_grad = True
    out_groups = []
    k = 0
    for g in groups:
        hp, dropped = jsonable({key: v for key, v in g.items() if key not in ("params", "param_names")})
        if dropped:
            raise FormatError(f"{where}: optimizer param group holds non-JSON values at {dropped}")
        n = len(g.get("params", []))
        out_groups.append({"params": names[k : k + n], **(hp or {})})
        k += n
    src.meta.optimizer = {"class": infer_optimizer_class(slots, out_groups[0] if out_groups else {}),
                          "class_inferred": True, "param_groups": out_groups}


def _is_torch_file(path: str) -> bool:
    if not os.path.isfile(path) or path.endswith((".safetensors", ".json")):
        return False
    if is_zip_file(path):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return False
    return head[:2] == b"\x80\x02"  # legacy torch.save: a protocol-2 pickle of the magic number


def _detect(path: str, options: dict) -> TorchSaveSource | None:
    if _is_torch_file(path):
        return TorchSaveSource(path, options.get("param_order"))
    return None


register_source("torch", _detect, priority=60)


# --------------------------------------------------------------------------- writing


class _StorageStub:
    def __init__(self, key: str, dtype: torch.dtype, numel: int) -> None:
        self.key, self.dtype, self.numel = key, dtype, numel


class TensorStub:
    """Stands for a tensor in a pickle written before its bytes (see :class:`StreamingTorchSave`)."""

    def __init__(self, key: str, dtype: torch.dtype | DType, shape: tuple[int, ...]) -> None:
        dtype = as_dtype(dtype).torch
        self.storage = _StorageStub(key, dtype, math.prod(shape))
        self.shape = tuple(shape)
        self.dtype = dtype

    def __reduce_ex__(self, proto):
        import torch

        stride = []
        acc = 1
        for n in reversed(self.shape):
            stride.append(acc)
            acc *= max(n, 1)
        stride = tuple(reversed(stride))
        if self.dtype in torch.storage._new_dtypes():
            return (torch._utils._rebuild_tensor_v3,
                    (self.storage, 0, self.shape, stride, False, collections.OrderedDict(), self.dtype))
        return (torch._utils._rebuild_tensor_v2, (self.storage, 0, self.shape, stride, False, collections.OrderedDict()))


class _Pickler(pickle._Pickler):
    """Protocol 2 like torch.save; tensor stubs become storage records; stand-ins pickle
    under the dotted name of the class they stand for (e.g. DeepSpeed's LossScaler)."""

    def __init__(self, file) -> None:
        super().__init__(file, protocol=2)
        self.storages: dict[str, _StorageStub] = {}

    def persistent_id(self, obj):
        import torch

        if isinstance(obj, _StorageStub):
            self.storages.setdefault(obj.key, obj)
            if obj.dtype in torch.storage._new_dtypes():
                nbytes = obj.numel * torch.empty((), dtype=obj.dtype).element_size()
                return ("storage", torch.UntypedStorage, obj.key, "cpu", nbytes)
            stype = getattr(torch, torch.storage._dtype_to_storage_type_map()[obj.dtype])
            return ("storage", stype, obj.key, "cpu", obj.numel)
        return None

    def save_global(self, obj, name=None):
        target = getattr(obj, "pickled_as", None) if isinstance(obj, type) and issubclass(obj, (StandIn, int)) else None
        if target:
            module, _, qual = target.rpartition(".")
            self.write(pickle.GLOBAL + f"{module}\n{qual}\n".encode())
            self.memoize(obj)
            return
        super().save_global(obj, name)

    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[type] = save_global


def dumps(obj) -> tuple[bytes, dict[str, _StorageStub]]:
    buf = io.BytesIO()
    p = _Pickler(buf)
    p.dump(obj)
    return buf.getvalue(), p.storages


class StreamingTorchSave:
    """Write a torch.save zip whose pickle (with :class:`TensorStub` s) is known up front.

    Records follow torch.save's order: ``data.pkl``, format records, ``byteorder``,
    then one ``data/<key>`` per tensor, written by :meth:`write` in the order of
    the stubs' keys (``"0"``, ``"1"``, ...). The file is written through a stream, so
    the archive's inner folder is ``archive`` whatever the file name: output bytes
    do not depend on temporary names. Files of at least ``DIRECT_MIN`` bytes of
    tensors are written past the page cache (:class:`.direct_io.DirectWriter`).
    """

    DIRECT_MIN = 4 * 1024 * 1024

    def __init__(self, path: str, obj) -> None:
        import torch

        self.path = path
        data, self.storages = dumps(obj)
        self.order = sorted(self.storages, key=int)
        self.next = 0
        size = sum(s.numel * s.dtype.itemsize for s in self.storages.values())
        self.file = DirectWriter(path) if size >= self.DIRECT_MIN else _PlainFile(path)
        try:
            self.zip = torch.serialization._open_zipfile_writer(self.file)
            self.writer = self.zip.file_like
            self.writer.write_record("data.pkl", data, len(data))
            self.writer.write_record(".format_version", "1", 1)
            align = getattr(torch.serialization, "_get_storage_alignment", None)
            if align is not None:
                text = str(align())
                self.writer.write_record(".storage_alignment", text, len(text))
            self.writer.write_record("byteorder", "little", len("little"))
        except BaseException:
            self.abort()
            raise

    def write(self, key: str, tensor: torch.Tensor) -> None:
        import torch

        if self.next >= len(self.order) or self.order[self.next] != key:
            raise FormatError(f"{self.path}: tensor record {key} written out of order")
        stub = self.storages[key]
        if tensor.dtype != stub.dtype or tensor.numel() != stub.numel:
            raise FormatError(f"{self.path}: record {key} expects {stub.dtype}[{stub.numel}], got {tensor.dtype}{list(tensor.shape)}")
        t = tensor.detach()
        if not t.is_contiguous() or t.storage_offset() != 0 or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone(memory_format=torch.contiguous_format)
        nbytes = t.numel() * t.element_size()
        self.writer.write_record(f"data/{key}", t.untyped_storage(), nbytes)
        self.next += 1

    def close(self, fsync: bool = True) -> None:
        if self.next != len(self.order):
            self.abort()
            raise FormatError(f"{self.path}: {len(self.order) - self.next} tensor records never written")
        self.zip.__exit__(None, None, None)
        self.writer = self.zip = None
        self.file.close(fsync)

    def abort(self) -> None:
        # Finish the zip writer while its file is open: its destructor would otherwise
        # write the end record into a closed file and abort the process.
        writer = getattr(self, "writer", None)
        if writer is not None and not self.file.closed:
            with contextlib.suppress(RuntimeError, OSError, ValueError):
                writer.write_end_of_file()
        self.writer = self.zip = None
        if not self.file.closed:
            self.file.abort()


class _PlainFile:
    """The :class:`DirectWriter` interface over an ordinary buffered file (small outputs)."""

    def __init__(self, path: str) -> None:
        self.f = open(path, "wb")  # noqa: SIM115 - closed in close()/abort()

    @property
    def closed(self) -> bool:
        return self.f.closed

    def write(self, data) -> int:
        return self.f.write(data)

    def tell(self) -> int:
        return self.f.tell()

    def flush(self) -> None:
        self.f.flush()

    def close(self, fsync: bool = False) -> None:
        self.f.flush()
        if fsync:
            os.fsync(self.f.fileno())
        self.f.close()

    def abort(self) -> None:
        self.f.close()


def _stub_tree(o, tensors: list[torch.Tensor]):
    """``o`` with every tensor replaced by a stub (the tensors appended to ``tensors``)."""
    if _is_torch_tensor(o):
        tensors.append(o.detach().contiguous())
        return TensorStub(str(len(tensors) - 1), o.dtype, tuple(o.shape))
    if isinstance(o, collections.OrderedDict):
        return collections.OrderedDict((k, _stub_tree(v, tensors)) for k, v in o.items())
    if isinstance(o, dict):
        return {k: _stub_tree(v, tensors) for k, v in o.items()}
    if isinstance(o, list):
        return [_stub_tree(v, tensors) for v in o]
    if isinstance(o, tuple):
        return tuple(_stub_tree(v, tensors) for v in o)
    return o


def save_small(obj, path: str, *, fsync: bool = False) -> None:
    """torch.save ``obj`` (tensors included) with the stand-in aware pickler, at ``path``."""
    tensors: list[torch.Tensor] = []
    w = StreamingTorchSave(path, _stub_tree(obj, tensors))
    try:
        for i, t in enumerate(tensors):
            w.write(str(i), t)
        w.close(fsync)
    except BaseException:
        w.abort()
        raise


def _betas(group: dict) -> dict:
    out = dict(group)
    if isinstance(out.get("betas"), list):
        out["betas"] = tuple(out["betas"])
    return out


def optimizer_groups(state: OutState) -> list[dict]:
    """Param groups (FQN lists + hparams) covering every param with slots, in a stable order."""
    with_slots = list(dict.fromkeys(t.param for t in state.slots() if t.param is not None))
    groups = [dict(g) for g in ((state.meta.optimizer or {}).get("param_groups") or [])]
    listed = {p for g in groups for p in g.get("params", [])}
    rest = [p for p in with_slots if p not in listed]
    if rest:
        groups.append({"params": rest})
    return groups


class TorchSaveTarget(Target):
    name = "torch"
    description = "one torch.save file: a state dict, or {model, optimizer, step, lr_scheduler}"
    single_file = True

    def _layout(self, state: OutState):
        """(pickle structure with stubs, tensors in key order)."""
        order = list(state.model()) + ([] if state.weights_only else list(state.slots()))
        key = {t.name: str(i) for i, t in enumerate(order)}
        stubs = {t.name: TensorStub(key[t.name], t.dtype, t.shape) for t in order}
        model: dict = {}
        aliases = state.aliases_of()
        for t in state.model():
            if t.role == "other" and not state.weights_only:
                continue
            model[t.name] = stubs[t.name]
            for a in aliases.get(t.name, ()):
                model[a] = stubs[t.name]
        if state.weights_only:
            return model, order
        obj: dict = {"model": model}
        slots_by_param: dict[str, dict] = {}
        for t in state.slots():
            slots_by_param.setdefault(t.param, {})[t.slot] = stubs[t.name]
        if slots_by_param or state.meta.optimizer is not None:
            groups = optimizer_groups(state)
            index = 0
            osd_state: dict = {}
            out_groups = []
            for g in groups:
                params = list(g.get("params", []))
                ids = list(range(index, index + len(params)))
                for i, p in zip(ids, params):
                    if p in slots_by_param:
                        osd_state[i] = slots_by_param[p]
                hp = _betas({k: v for k, v in g.items() if k != "params"})
                out_groups.append({**hp, "params": ids, "param_names": params})
                index += len(params)
            obj["optimizer"] = {"state": osd_state, "param_groups": out_groups}
        if state.meta.step is not None:
            obj["step"] = state.meta.step
        if state.meta.scheduler is not None:
            obj["lr_scheduler"] = state.meta.scheduler
        for t in state.model():
            if t.role == "other":
                obj.setdefault(t.name, stubs[t.name])
        extra: dict = {"source": {"format": state.meta.format, **state.meta.info}}
        buffers = [t.name for t in state.model() if t.role == "buffer"]
        frozen = [t.name for t in state.model() if t.role == "param" and t.requires_grad is False]
        if buffers:
            extra["buffers"] = buffers
        if frozen:
            extra["frozen"] = frozen
        if state.meta.client:
            extra["client"] = state.meta.client
        if state.meta.loss_scaler is not None:
            extra["loss_scaler"] = state.meta.loss_scaler
        if state.meta.topology:
            extra["topology"] = state.meta.topology
        obj["stalwart"] = extra
        return obj, order

    def order(self, state: OutState) -> list:
        return self._layout(state)[1]

    def plan(self, state: OutState) -> list[PlannedFile]:
        _, order = self._layout(state)
        return [PlannedFile(".", sum(t.nbytes for t in order) + 64 * len(order) + 1024, len(order))]

    def notes(self, state: OutState) -> list[str]:
        if state.weights_only:
            return ["torch: weights only, written as a plain state dict"]
        return []

    def write(self, out: str, state: OutState, stream, *, fsync: bool = True) -> None:
        obj, order = self._layout(state)
        key = {t.name: str(i) for i, t in enumerate(order)}
        w = StreamingTorchSave(out, obj)
        try:
            for ot, tensor in stream:
                w.write(key[ot.name], tensor)
            w.close(fsync)
        except BaseException:
            w.abort()
            raise


__all__ = [
    "StreamingTorchSave",
    "TensorStub",
    "TorchSaveSource",
    "TorchSaveTarget",
    "add_optimizer_state",
    "dumps",
    "optimizer_param_names",
    "save_small",
]
