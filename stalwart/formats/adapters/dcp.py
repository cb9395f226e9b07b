"""torch Distributed Checkpoint (DCP) directories: ``.metadata`` + ``*.distcp``.

Reading: the pickled ``.metadata`` is opened with a restricted unpickler that only
builds DCP's own metadata classes; every saved chunk (a torch.save zip inside a
``.distcp`` file, or raw bytes in DCP's safetensors variant) is read lazily and
copied into its box of the global tensor, so any sharding (FSDP2/DTensor
``Shard``, uneven, replicated) is reassembled. Keys are mapped through the
metadata's ``planner_data`` (the original nesting):

* ``(k, "state", <fqn>, <slot>)`` - optimizer state from ``get_state_dict``
  (``<k>`` is ``optim``, ``optimizer``, ...); ``(k, "param_groups", i, <hparam>)``
  its hyper-parameters; the flattened form ``(k, "state.<fqn>.<slot>")`` too;
* a leading ``model`` / ``module`` / ``state_dict`` / ``model_state_dict`` level is
  dropped from model tensor names; other tensors keep their dotted path;
* non-tensor values become client state (``step`` sets the step).

Writing produces what ``torch.distributed.checkpoint.load`` reads, using DCP's own
metadata classes: ``{"model": {fqn: tensor}, "optim": {"state": {fqn: {slot: t}},
"param_groups": [...]}, "step": N}`` - the layout of
``torch.distributed.checkpoint.state_dict.get_state_dict`` - in one
``__0_0.distcp`` file. Tied aliases get their own key pointing at the owner's
bytes (written once).
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import threading
from typing import TYPE_CHECKING

from stalwart.errors import ConversionError, FormatError
from stalwart.formats.adapters.base import (
    ConvertSource,
    OutState,
    PlannedFile,
    SourceTensor,
    Target,
    infer_optimizer_class,
    slot_name,
)
from stalwart.formats.adapters.safe_load import LazyFile, jsonable, load_dcp_metadata, load_small
from stalwart.formats.adapters.torch_save import optimizer_groups
from stalwart.formats.direct_io import DirectWriter
from stalwart.formats.sources import register_source

if TYPE_CHECKING:
    import torch

METADATA = ".metadata"
MODEL_KEYS = ("model", "module", "state_dict", "model_state_dict")
DATA_FILE = "__0_0.distcp"


# --------------------------------------------------------------------------- reading


class DCPSource(ConvertSource):
    """A DCP checkpoint directory (see the module docstring)."""

    default_format = "dcp"

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.meta.format = "dcp"
        self.md = load_dcp_metadata(os.path.join(path, METADATA))
        self.consume(os.path.join(path, METADATA))
        if not hasattr(self.md, "state_dict_metadata") or not hasattr(self.md, "storage_data"):
            raise FormatError(f"{path}/{METADATA}: not DCP metadata")
        self._fds: dict[str, int] = {}
        self._fd_lock = threading.Lock()
        self.on_close(self._close_fds)
        self._chunks: dict[str, list] = {}
        for index, info in (self.md.storage_data or {}).items():
            if getattr(info, "transform_descriptors", None):
                raise ConversionError(
                    f"{path}: entry {index.fqn!r} is stored with transforms {list(info.transform_descriptors)}"
                    " (e.g. compression), which stalwart does not read yet"
                )
            self._chunks.setdefault(index.fqn, []).append((index, info))
        self._safetensors_offsets = self._safetensors_layout()
        self._interpret()

    def _close_fds(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _fd(self, rel: str) -> int:
        with self._fd_lock:
            fd = self._fds.get(rel)
            if fd is None:
                full = os.path.join(self.path, rel)
                if os.path.isabs(rel) or ".." in rel.replace("\\", "/").split("/"):
                    raise FormatError(f"{self.path}: storage path {rel!r} points outside the checkpoint")
                try:
                    fd = self._fds[rel] = os.open(full, os.O_RDONLY)
                    self.consume(full)
                except FileNotFoundError:
                    raise FormatError(f"{self.path}: data file {rel} named by the metadata is missing") from None
            return fd

    def _safetensors_layout(self) -> dict:
        """Files written with ``SerializationFormat.SAFETENSORS``: parsed, by relative path.

        Their storage offsets are not byte offsets: each chunk is the entry named by its
        key in the file of its ``relative_path``.
        """
        from stalwart.formats.adapters.hf import SafetensorsFile

        out: dict = {}
        for chunks in self._chunks.values():
            for _, info in chunks:
                rel = info.relative_path
                if rel in out:
                    continue
                head = os.pread(self._fd(rel), 9, 0)
                if len(head) == 9 and head[8:9] == b"{":
                    sf = out[rel] = SafetensorsFile(os.path.join(self.path, rel))
                    self.on_close(sf.close)
        return out

    def _read_chunk(self, index, info, dtype, sizes: tuple[int, ...]) -> torch.Tensor:
        sf = self._safetensors_offsets.get(info.relative_path)
        if sf is not None:
            if index.fqn not in sf.entries:
                raise FormatError(f"{sf.path}: no entry {index.fqn!r}, which the DCP metadata places there")
            t = sf.reader(index.fqn)()
        else:
            fd = self._fd(info.relative_path)
            lf = LazyFile(os.path.join(self.path, info.relative_path), base=info.offset, size=info.length, fd=fd)
            ref = lf.obj
            if not hasattr(ref, "read"):
                raise FormatError(f"{self.path}: entry {index.fqn!r} does not hold a tensor")
            t = ref.read()
        if tuple(t.shape) != tuple(sizes) or str(t.dtype) != str(dtype):
            raise FormatError(f"{self.path}: chunk of {index.fqn!r} holds {t.dtype}{list(t.shape)}, metadata says {dtype}{list(sizes)}")
        return t

    def _tensor_reader(self, fqn: str, md):
        shape = tuple(int(x) for x in md.size)
        dtype = md.properties.dtype
        chunks = {tuple(int(x) for x in (idx.offset or ())): (idx, info) for idx, info in self._chunks.get(fqn, [])}

        def read() -> torch.Tensor:
            import torch

            out = torch.empty(shape, dtype=dtype)
            covered = 0
            for ch in md.chunks:
                offs = tuple(int(x) for x in ch.offsets)
                sizes = tuple(int(x) for x in ch.sizes)
                hit = chunks.get(offs)
                if hit is None:
                    raise FormatError(f"{self.path}: chunk at {list(offs)} of {fqn!r} has no stored bytes")
                part = self._read_chunk(hit[0], hit[1], dtype, sizes)
                if shape:
                    out[tuple(slice(o, o + s) for o, s in zip(offs, sizes))] = part
                else:
                    out.copy_(part)
                covered += part.numel()
            if covered < math.prod(shape):
                raise FormatError(f"{self.path}: the chunks of {fqn!r} do not cover it")
            return out

        return read

    def _bytes_value(self, fqn: str):
        chunks = self._chunks.get(fqn)
        if not chunks:
            raise FormatError(f"{self.path}: value {fqn!r} has no stored bytes")
        _, info = chunks[0]
        return load_small(os.path.join(self.path, info.relative_path), base=info.offset, size=info.length,
                          fd=self._fd(info.relative_path))

    def _interpret(self) -> None:
        mappings = self.md.planner_data if isinstance(self.md.planner_data, dict) else {}
        tensors: list[tuple[str, tuple, object]] = []
        values: list[tuple[str, tuple]] = []
        for fqn, md in self.md.state_dict_metadata.items():
            path = tuple(mappings.get(fqn, (fqn,)))
            if hasattr(md, "chunks"):
                tensors.append((fqn, path, md))
            else:
                values.append((fqn, path))
        optim_roots = {p[0] for _, p, _ in tensors if len(p) == 4 and p[1] == "state"}
        optim_roots |= {p[0] for _, p, _ in tensors if len(p) == 2 and str(p[1]).startswith("state.")}
        slots: list[tuple[str, str, str, object]] = []
        for fqn, path, md in tensors:
            if path[0] in optim_roots and len(path) == 4 and path[1] == "state":
                slots.append((fqn, str(path[2]), str(path[3]), md))
            elif path[0] in optim_roots and len(path) == 2 and str(path[1]).startswith("state."):
                body = str(path[1])[len("state."):]
                pname, _, slot = body.rpartition(".")
                slots.append((fqn, pname, slot, md))
            else:
                if path[0] in MODEL_KEYS and len(path) > 1:
                    name = ".".join(str(p) for p in path[1:])
                else:
                    name = ".".join(str(p) for p in path)
                role = "param" if path[0] in MODEL_KEYS or len(path) == 1 else "other"
                self.add(SourceTensor(name, tuple(int(x) for x in md.size), md.properties.dtype, role,
                                      self._tensor_reader(fqn, md)))
        for fqn, pname, slot, md in slots:
            if pname not in self.tensors:
                raise FormatError(f"{self.path}: optimizer state {fqn!r} names param {pname!r}, which the model state lacks")
            self.add(SourceTensor(slot_name(pname, slot), tuple(int(x) for x in md.size), md.properties.dtype,
                                  "optimizer_slot", self._tensor_reader(fqn, md), pname, slot))
            self.tensors[pname].requires_grad = True
        self._values(values, optim_roots)

    def _values(self, values: list[tuple[str, tuple]], optim_roots: set) -> None:
        groups: dict[int, dict] = {}
        flat_groups: dict[str, dict] = {}
        client: dict = {}
        extra: dict = {}
        for fqn, path in values:
            value = self._bytes_value(fqn)
            if path[0] in optim_roots and len(path) == 4 and path[1] == "param_groups":
                groups.setdefault(int(path[2]), {})[str(path[3])] = value
            elif path[0] in optim_roots and len(path) == 2 and str(path[1]).startswith("param_groups."):
                pname, _, hp = str(path[1])[len("param_groups."):].rpartition(".")
                flat_groups.setdefault(pname, {})[hp] = value
            elif path == ("stalwart",) or (path[0] == "stalwart" and len(path) == 2):
                if isinstance(value, str):
                    try:
                        extra = json.loads(value)
                    except json.JSONDecodeError:
                        extra = {}
            elif path in (("step",), ("global_step",)) and isinstance(value, int):
                self.meta.step = value
            else:
                node = client
                for p in path[:-1]:
                    node = node.setdefault(str(p), {})
                node[str(path[-1])] = value
        out_groups = []
        if groups:
            for i in sorted(groups):
                g = dict(groups[i])
                params = [str(p) for p in g.pop("params", [])]
                hp, dropped = jsonable(g)
                if dropped:
                    raise FormatError(f"{self.path}: optimizer param group {i} holds non-JSON values {dropped}")
                out_groups.append({"params": params, **(hp or {})})
        elif flat_groups:
            for pname, hps in flat_groups.items():
                hp, _ = jsonable(hps)
                hp = hp or {}
                same = next((g for g in out_groups if {k: v for k, v in g.items() if k != "params"} == hp), None)
                if same is None:
                    out_groups.append({"params": [pname], **hp})
                else:
                    same["params"].append(pname)
        if out_groups or any(t.role == "optimizer_slot" for t in self.tensors.values()):
            slots = {t.slot for t in self.tensors.values() if t.role == "optimizer_slot"}
            self.meta.optimizer = {"class": infer_optimizer_class(slots, out_groups[0] if out_groups else {}),
                                   "class_inferred": True, "param_groups": out_groups}
        for t in self.tensors.values():
            if t.role == "param" and t.requires_grad is None and self.meta.optimizer is not None:
                t.requires_grad = False
        self._apply_extra(extra)
        self.meta.client, dropped = jsonable(client)
        self.meta.client = self.meta.client or {}
        if dropped:
            self.meta.warnings.append(f"values not representable as JSON, dropped: {dropped[:8]}")

    def _apply_extra(self, extra: dict) -> None:
        if not isinstance(extra, dict):
            return
        for name in extra.get("buffers") or []:
            if name in self.tensors:
                self.tensors[name].role = "buffer"
                self.tensors[name].requires_grad = None
        for name in extra.get("frozen") or []:
            if name in self.tensors:
                self.tensors[name].requires_grad = False
        for alias, owner in (extra.get("aliases") or {}).items():
            if alias in self.tensors and owner in self.tensors:
                del self.tensors[alias]
                self.aliases[alias] = owner
        for key in ("scheduler", "loss_scaler"):
            if extra.get(key) is not None:
                setattr(self.meta, key, extra[key])
        if isinstance(extra.get("optimizer"), dict) and self.meta.optimizer is not None:
            self.meta.optimizer.pop("class_inferred", None)
            self.meta.optimizer = {**extra["optimizer"], "param_groups": self.meta.optimizer["param_groups"]}
        if isinstance(extra.get("source"), dict):
            self.meta.info = {"origin": extra["source"]}
        if isinstance(extra.get("topology"), dict):
            self.meta.topology = extra["topology"]


def _detect(path: str, options: dict) -> DCPSource | None:
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, METADATA)):
        return DCPSource(path)
    return None


register_source("dcp", _detect, priority=30)


# --------------------------------------------------------------------------- writing


def _skeleton(state: OutState) -> dict:
    """The state dict DCP sees, with meta tensors standing for the real ones."""
    import torch

    meta_t = {t.name: torch.empty(t.shape, dtype=t.dtype.torch, device="meta") for t in state.tensors}
    model: dict = {}
    aliases = state.aliases_of()
    for t in state.model():
        model[t.name] = meta_t[t.name]
        for a in aliases.get(t.name, ()):
            model[a] = meta_t[t.name]
    skel: dict = {"model": model}
    if not state.weights_only and (state.slots() or state.meta.optimizer is not None):
        osd_state: dict = {}
        for t in state.slots():
            osd_state.setdefault(t.param, {})[t.slot] = meta_t[t.name]
        groups = []
        for g in optimizer_groups(state):
            hp = {k: (tuple(v) if k == "betas" and isinstance(v, list) else v) for k, v in g.items() if k != "params"}
            groups.append({**hp, "params": list(g.get("params", []))})
        skel["optim"] = {"state": osd_state, "param_groups": groups}
    if state.meta.step is not None:
        skel["step"] = state.meta.step
    extra: dict = {"source": {"format": state.meta.format, **state.meta.info}}
    buffers = [t.name for t in state.model() if t.role == "buffer"]
    frozen = [t.name for t in state.model() if t.role == "param" and t.requires_grad is False]
    if buffers:
        extra["buffers"] = buffers
    if frozen:
        extra["frozen"] = frozen
    if state.aliases:
        extra["aliases"] = {a: f"{o}" for a, o in state.aliases.items()}
    for key in ("scheduler", "loss_scaler"):
        value = getattr(state.meta, key)
        if value is not None and not state.weights_only:
            extra[key] = value
    if state.meta.optimizer is not None and not state.weights_only:
        extra["optimizer"] = {k: v for k, v in state.meta.optimizer.items() if k != "param_groups"}
    if state.meta.topology:
        extra["topology"] = state.meta.topology
    skel["stalwart"] = json.dumps(extra, sort_keys=True, separators=(",", ":"))
    if state.meta.client:
        for k, v in state.meta.client.items():
            skel.setdefault(k, v)
    return skel


class DCPTarget(Target):
    name = "dcp"
    description = "torch Distributed Checkpoint: .metadata + __0_0.distcp (load with torch.distributed.checkpoint.load)"

    def plan(self, state: OutState) -> list[PlannedFile]:
        data = sum(t.nbytes + 1600 for t in state.tensors)
        return [PlannedFile(DATA_FILE, data, len(state.tensors)), PlannedFile(METADATA, 0)]

    def notes(self, state: OutState) -> list[str]:
        return ['dcp: load with dcp.load({"model": model.state_dict(), "optim": ...}); keys follow get_state_dict']

    def write(self, out: str, state: OutState, stream, *, fsync: bool = True) -> None:
        import torch
        from torch.distributed.checkpoint._nested_dict import flatten_state_dict
        from torch.distributed.checkpoint.filesystem import _StorageInfo
        from torch.distributed.checkpoint.metadata import (
            BytesStorageMetadata,
            ChunkStorageMetadata,
            Metadata,
            MetadataIndex,
            TensorProperties,
            TensorStorageMetadata,
        )

        flat, mappings = flatten_state_dict(_skeleton(state))
        by_path = {tuple(p): k for k, p in mappings.items()}
        key_of: dict[str, list[str]] = {}
        model_aliases = state.aliases_of()
        for t in state.tensors:
            if t.role == "optimizer_slot":
                paths = [("optim", "state", t.param, t.slot)]
            else:
                paths = [("model", n) for n in (t.name, *model_aliases.get(t.name, ()))]
            keys = [by_path[p] for p in paths if p in by_path]
            if not keys:
                raise ConversionError(f"dcp: no key for tensor {t.name!r}")
            key_of[t.name] = keys
        sd_md: dict = {}
        storage: dict = {}
        path = os.path.join(out, DATA_FILE)
        f = DirectWriter(path)
        try:
            for ot, tensor in stream:
                offset = f.tell()
                t = tensor.detach()
                if not t.is_contiguous() or t.storage_offset() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
                    t = t.clone(memory_format=torch.contiguous_format)  # torch.save stores whole storages
                torch.save(t, f)
                length = f.tell() - offset
                nd = len(ot.shape)
                for key in key_of[ot.name]:
                    sd_md[key] = TensorStorageMetadata(
                        properties=TensorProperties(dtype=ot.dtype.torch),
                        size=torch.Size(ot.shape),
                        chunks=[ChunkStorageMetadata(offsets=torch.Size([0] * nd), sizes=torch.Size(ot.shape))],
                    )
                    storage[MetadataIndex(key, torch.Size([0] * nd), 0)] = _StorageInfo(DATA_FILE, offset, length)
            for key, value in flat.items():
                if isinstance(value, torch.Tensor):
                    continue
                buf = io.BytesIO()
                torch.save(value, buf)
                offset = f.tell()
                f.write(buf.getbuffer())
                sd_md[key] = BytesStorageMetadata()
                storage[MetadataIndex(key)] = _StorageInfo(DATA_FILE, offset, f.tell() - offset)
        except BaseException:
            f.abort()
            raise
        f.close(fsync)
        ordered = {k: sd_md[k] for k in flat if k in sd_md}
        md = Metadata(state_dict_metadata=ordered, planner_data=dict(mappings), storage_data=storage, version="1.0.0")
        with open(os.path.join(out, METADATA), "wb") as f:
            pickle.dump(md, f, protocol=pickle.HIGHEST_PROTOCOL)
            f.flush()
            if fsync:
                os.fsync(f.fileno())


__all__ = ["DCPSource", "DCPTarget"]
