"""DeepSpeed universal checkpoints (UCP): read both forms, write one both engines load.

Layout::

    <root>/latest_universal              -> "<tag>"
    <root>/<tag>/zero/<fqn>/fp32.pt      fp32 master        } ZeRO-1/2 form: {"param": tensor, "cat_dim": 0}
    <root>/<tag>/zero/<fqn>/<slot>.pt    optimizer slot     } ZeRO-3 form (ds_to_universal, TP=1): a raw flat tensor
    <root>/<tag>/zero/<fqn>/step.pt      0-d step (ZeRO-1/2 form only)
    <root>/<tag>/zero/optimizer_state.pt param groups, loss scaler, ...
    <root>/<tag>/mp_rank_00_model_states.pt            (ZeRO-1/2 engines read this)
    <root>/<tag>/zero_pp_rank_0_mp_rank_00_model_states.pt   (ZeRO-3 engines read this)

Reading takes names, shapes and groups from the model-states file, frozen params
and buffers from its ``module`` (true dtypes; ``zero/<name>/fp32.pt`` upcasts of
them are only a fallback), every ``zero/<fqn>/*.pt`` as a slot, and the step from
``step.pt`` or, in the ZeRO-3 form, ``optimizer_state.pt``.

Writing makes one checkpoint that DeepSpeed's ``load_universal_checkpoint`` loads
into a ZeRO-1/2 engine *and* into a ZeRO-3 engine, at any DP degree: per-param
files in the dict form (which both loaders accept), both model-states file names,
and an ``optimizer_state.pt`` with both schemas (``param_groups`` for ZeRO-1/2,
``optimizer_state_dict`` for ZeRO-3). Known DeepSpeed limits, not fixable in the
files: the ZeRO-3 loader applies group 0's hyper-parameters to every group and
reads only ``fp32``/``exp_avg``/``exp_avg_sq``; neither loader restores buffers or
frozen params from a UCP (they are in ``module`` for other readers).
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import re
import shutil
from collections import OrderedDict
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
from stalwart.formats.adapters.deepspeed import DS_KEYS, MODEL_RE
from stalwart.formats.adapters.safe_load import (
    STAND_INS,
    LazyFile,
    StandIn,
    TensorRef,
    jsonable,
)
from stalwart.formats.adapters.torch_save import StreamingTorchSave, TensorStub, optimizer_groups, save_small
from stalwart.formats.sources import register_source

if TYPE_CHECKING:
    import torch

UCP_VERSION = 0.4
DEFAULT_DS_VERSION = "0.19.8"
MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


# --------------------------------------------------------------------------- reading


def find_ucp_dir(path: str) -> str | None:
    if not os.path.isdir(path):
        return None
    if os.path.isdir(os.path.join(path, "zero")) and any(MODEL_RE.match(n) for n in os.listdir(path)):
        return path
    latest = os.path.join(path, "latest_universal")
    if os.path.isfile(latest):
        with open(latest, encoding="utf-8", errors="replace") as f:
            tag = f.read(4096).strip()
        cand = os.path.join(path, tag)
        if tag and "/" not in tag and os.path.isdir(os.path.join(cand, "zero")):
            return cand
        raise FormatError(f"{latest} names {tag!r}, which is not a universal checkpoint directory")
    return None


class UniversalSource(ConvertSource):
    """A DeepSpeed universal checkpoint directory (see the module docstring)."""

    default_format = "ds-universal"

    def __init__(self, tag_dir: str, *, root: str | None = None) -> None:
        super().__init__(root or tag_dir)
        self.tag_dir = tag_dir
        self.zero = os.path.join(tag_dir, "zero")
        names = sorted(os.listdir(tag_dir))
        ms_name = next((n for n in MODEL_STATES if n in names), None) or next((n for n in names if MODEL_RE.match(n)), None)
        if ms_name is None:
            raise FormatError(f"{tag_dir}: universal checkpoint without a model-states file")
        lf = LazyFile(os.path.join(tag_dir, ms_name))
        self.on_close(lf.close)
        self.consume(lf.path)
        self.ms = lf.obj if isinstance(lf.obj, dict) else {}
        opt_path = os.path.join(self.zero, "optimizer_state.pt")
        self.osd: dict = {}
        if os.path.isfile(opt_path):
            olf = LazyFile(opt_path)
            self.on_close(olf.close)
            self.consume(opt_path)
            self.osd = olf.obj if isinstance(olf.obj, dict) else {}
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _param_file(self, name: str, key: str):
        """(reader, dtype, numel) of zero/<name>/<key>.pt."""
        path = os.path.join(self.zero, name, f"{key}.pt")
        lf = LazyFile(path)
        self.on_close(lf.close)
        self.consume(path)
        obj = lf.obj
        ref = obj.get("param") if isinstance(obj, dict) else obj
        if not isinstance(ref, TensorRef):
            raise FormatError(f"{path}: holds no tensor")
        return ref

    def _build(self) -> None:
        ms = self.ms
        shapes = ms.get("param_shapes")
        if not isinstance(shapes, list):
            raise FormatError(f"{self.tag_dir}: model-states file has no param_shapes")
        shapes = [OrderedDict((str(k), tuple(int(x) for x in v)) for k, v in g.items()) for g in shapes]
        inner = self.osd.get("optimizer_state_dict") if isinstance(self.osd.get("optimizer_state_dict"), dict) else None
        zero3_form = int(self.osd.get("zero_stage") or 0) == 3 or "fp32_flat_groups" in self.osd
        hp_groups = self.osd.get("param_groups") or (inner or {}).get("param_groups")
        # Each group's 'params' lists the param_shapes entries it holds: groups (ZeRO-1/2) or sub-groups (ZeRO-3).
        group_of_entry = list(range(len(shapes)))
        for gi, g in enumerate(hp_groups or []):
            for s_idx in g.get("params", []):
                if isinstance(s_idx, int) and 0 <= s_idx < len(shapes):
                    group_of_entry[s_idx] = gi
        ngroups = max(len(hp_groups or []), max(group_of_entry, default=-1) + 1)
        groups: list[list[str]] = [[] for _ in range(ngroups)]
        module = ms.get("module") if isinstance(ms.get("module"), dict) else {}
        self._pending_slots: list[SourceTensor] = []
        trainable: dict[str, SourceTensor] = {}
        for e, entry in enumerate(shapes):
            for name, shape in entry.items():
                folder = os.path.join(self.zero, name)
                if not os.path.isdir(folder):
                    raise FormatError(f"{self.tag_dir}: param {name!r} has no directory zero/{name}/")
                files = sorted(f[:-3] for f in os.listdir(folder) if f.endswith(".pt"))
                if "fp32" not in files:
                    raise FormatError(f"{self.tag_dir}: zero/{name}/fp32.pt is missing")
                for key in files:
                    ref = self._param_file(name, key)
                    if key == "step":
                        self._pending_slots.append(SourceTensor(slot_name(name, "step"), tuple(ref.shape), ref.dtype,
                                                                "optimizer_slot", ref.read, name, "step"))
                        continue
                    if ref.numel != math.prod(shape):
                        raise FormatError(f"{self.tag_dir}: zero/{name}/{key}.pt holds {ref.numel} elements, {name!r} has shape {list(shape)}")
                    reader = _viewer(ref, shape)
                    ranges = reader.ranges if ref.is_contiguous() else None
                    if key == "fp32":
                        trainable[name] = SourceTensor(name, shape, ref.dtype, "param", reader, requires_grad=True,
                                                       ranges=ranges)
                    else:
                        self._pending_slots.append(SourceTensor(slot_name(name, key), shape, ref.dtype,
                                                                "optimizer_slot", reader, name, key, ranges=ranges))
                if zero3_form and "step" not in files and inner is not None:
                    st = (inner.get("state") or {}).get(e) or (inner.get("state") or {}).get(0) or {}
                    step = st.get("step")
                    if isinstance(step, TensorRef):
                        self._pending_slots.append(SourceTensor(slot_name(name, "step"), tuple(step.shape), step.dtype,
                                                                "optimizer_slot", step.read, name, "step"))
                groups[group_of_entry[e]].append(name)
        buffers = set(ms.get("buffer_names") or [])
        frozen = OrderedDict((str(k), tuple(int(x) for x in v)) for k, v in (ms.get("frozen_param_shapes") or {}).items())
        shared = dict(ms.get("shared_params") or {})
        order = [n for n in module if n not in shared]
        order += [n for n in trainable if n not in order]
        order += [n for n in frozen if n not in order]
        order += [n for n in buffers if n not in order]
        for name in order:
            if name in trainable:
                self.add(trainable[name])
                continue
            ref = module.get(name)
            role = "buffer" if name in buffers else "param"
            want = frozen.get(name)
            if isinstance(ref, TensorRef) and (want is None or ref.numel == math.prod(want)) and ref.numel:
                reader = _viewer(ref, tuple(ref.shape) if want is None else want)
                self.add(SourceTensor(name, reader.shape, ref.dtype, role, reader,
                                      requires_grad=False if role == "param" else None,
                                      ranges=reader.ranges if ref.is_contiguous() else None))
            elif os.path.isfile(os.path.join(self.zero, name, "fp32.pt")):
                ref = self._param_file(name, "fp32")
                shape = want or tuple(ref.shape)
                self.add(SourceTensor(name, shape, ref.dtype, role, _viewer(ref, shape),
                                      requires_grad=False if role == "param" else None))
                self.meta.warnings.append(f"{name}: read from zero/{name}/fp32.pt (an fp32 copy of the model's tensor)")
        for alias, owner in shared.items():
            if owner in self.tensors:
                self.aliases[alias] = owner
        for st in self._pending_slots:
            self.add(st)
        self._meta(groups, hp_groups, zero3_form)

    def _meta(self, groups: list[list[str]], hp_groups, zero3_form: bool) -> None:
        m, ms = self.meta, self.ms
        m.format = "ds-universal-zero3" if zero3_form else "ds-universal"
        if isinstance(ms.get("global_steps"), int):
            m.step = ms["global_steps"]
        m.topology = {"framework": "deepspeed", "universal": True, "dp": ms.get("dp_world_size")}
        info: dict = {"tag": os.path.basename(os.path.normpath(self.tag_dir))}
        for key in ("ds_version", "global_samples", "skipped_steps"):
            if ms.get(key) is not None:
                info[key] = ms[key]
        if "clip_grad" in self.osd:
            info["clip_grad"] = self.osd["clip_grad"]
        m.info = info
        if isinstance(self.osd.get("loss_scaler"), StandIn):
            m.loss_scaler, _ = jsonable(self.osd["loss_scaler"])
        slots = {t.slot for t in self.tensors.values() if t.role == "optimizer_slot"}
        if hp_groups:
            out = []
            for gi, g in enumerate(hp_groups):
                hp, dropped = jsonable({k: v for k, v in g.items() if k != "params"})
                if dropped:
                    raise FormatError(f"{self.tag_dir}: optimizer param group {gi} holds non-JSON values {dropped}")
                out.append({"params": groups[gi] if gi < len(groups) else [], **(hp or {})})
            m.optimizer = {"class": infer_optimizer_class(slots, out[0]), "class_inferred": True, "param_groups": out}
        if ms.get("lr_scheduler") is not None:
            m.scheduler, _ = jsonable(ms["lr_scheduler"])
        client = {k: v for k, v in ms.items() if k not in DS_KEYS}
        m.client, dropped = jsonable(client)
        m.client = m.client or {}
        if dropped:
            m.warnings.append(f"client state not representable as JSON, dropped: {dropped[:8]}")


class _viewer:
    """Reads a saved tensor as ``shape`` (the ZeRO-3 form stores flat tensors)."""

    def __init__(self, ref: TensorRef, shape: tuple[int, ...]) -> None:
        self.ref, self.shape = ref, tuple(shape)

    def __call__(self) -> torch.Tensor:
        return self.ref.read().reshape(self.shape)

    def ranges(self) -> list[tuple[int, int, int]]:
        return [self.ref.byte_range()]


def _detect(path: str, options: dict) -> UniversalSource | None:
    tag = find_ucp_dir(path)
    if not tag:
        return None
    src = UniversalSource(tag, root=path)
    src.consume(os.path.join(path, "latest_universal"), os.path.join(tag, MODEL_STATES[1]))
    return src


register_source("ds-universal", _detect, priority=10)


# --------------------------------------------------------------------------- writing


def _ds_version(state: OutState) -> str:
    v = state.meta.info.get("ds_version") or (state.meta.info.get("origin") or {}).get("ds_version")
    if isinstance(v, str) and v:
        return v
    try:
        return importlib.metadata.version("deepspeed")
    except importlib.metadata.PackageNotFoundError:
        return DEFAULT_DS_VERSION


def _stand_in(obj):
    """Rebuild a DeepSpeed object (e.g. the loss scaler) recorded as JSON, under its class name."""
    if isinstance(obj, dict) and isinstance(obj.get("class"), str) and obj["class"] in STAND_INS:
        cls = STAND_INS[obj["class"]]
        inst = cls.__new__(cls)
        inst.__dict__.update({k: v for k, v in obj.items() if k != "class"})
        return inst
    return None


def _safe_dirname(name: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ConversionError(f"tensor name {name!r} cannot be a directory name in a universal checkpoint")
    return name


class UniversalTarget(Target):
    name = "ds-universal"
    description = "DeepSpeed universal checkpoint (load_universal), loadable by ZeRO-1/2 and ZeRO-3 engines at any DP"

    def _tag(self, state: OutState) -> str:
        tag = self.options.get("tag")
        if not tag:
            tag = f"global_step{state.meta.step}_universal" if state.meta.step is not None else "universal"
        if "/" in tag or tag in (".", ".."):
            raise ConversionError(f"--tag {tag!r} must be a plain directory name")
        return tag

    def _split(self, state: OutState):
        """(groups of trainable params, module tensors (frozen params + buffers), slots by param)."""
        slots: dict[str, list] = {}
        for t in state.slots():
            slots.setdefault(t.param, []).append(t)
        model = {t.name: t for t in state.model()}
        groups = []
        placed: set[str] = set()
        for g in optimizer_groups(state):
            names = [p for p in g.get("params", []) if p in model and model[p].requires_grad is not False]
            groups.append({**g, "params": names})
            placed.update(names)
        if not groups:
            groups = [{"params": []}]
        for t in state.model():
            if t.role == "param" and t.requires_grad is not False and t.name not in placed:
                if not state.weights_only and state.meta.optimizer is not None:
                    continue  # a param outside every optimizer group is not trained: keep it in module
                groups[-1]["params"].append(t.name)
                placed.add(t.name)
        module = [t for t in state.model() if t.name not in placed]
        for name, ts in slots.items():
            for t in ts:
                if t.slot == "step":
                    if t.shape != ():
                        raise ConversionError(f"ds-universal: slot {t.name!r} (step) is not a scalar")
                elif t.shape != model[name].shape:
                    raise ConversionError(
                        f"ds-universal: optimizer slot {t.name!r} has shape {list(t.shape)}, its param"
                        f" {list(model[name].shape)}; universal checkpoints hold elementwise slots only"
                    )
        return groups, module, slots

    def order(self, state: OutState) -> list:
        groups, module, slots = self._split(state)
        model = {t.name: t for t in state.model()}
        out = list(module)
        for g in groups:
            for p in g["params"]:
                out.append(model[p])
                out.extend(slots.get(p, []))
        return out

    def plan(self, state: OutState) -> list[PlannedFile]:
        tag = self._tag(state)
        groups, module, slots = self._split(state)
        model = {t.name: t for t in state.model()}
        files = [PlannedFile("latest_universal", len(tag) + 1)]
        mod_bytes = sum(t.nbytes for t in module) + 4096
        files += [PlannedFile(f"{tag}/{n}", mod_bytes, len(module)) for n in MODEL_STATES]
        files.append(PlannedFile(f"{tag}/zero/optimizer_state.pt", 4096))
        for g in groups:
            for p in g["params"]:
                files.append(PlannedFile(f"{tag}/zero/{p}/fp32.pt", model[p].numel * 4 + 1024, 1))
                for s in slots.get(p, []):
                    files.append(PlannedFile(f"{tag}/zero/{p}/{s.slot}.pt", s.nbytes + 1024, 1))
        return files

    def notes(self, state: OutState) -> list[str]:
        out = []
        groups, module, slots = self._split(state)
        if module:
            out.append(f"ds-universal: {len(module)} frozen params/buffers go to the model-states 'module' (DeepSpeed's"
                       " universal loader does not restore them; the model's own values are used)")
        names = {s.slot for ts in slots.values() for s in ts}
        if names and not {"exp_avg", "exp_avg_sq"} <= names:
            out.append(f"ds-universal: slots {sorted(names)}: a ZeRO-3 engine's universal loader reads only"
                       " exp_avg/exp_avg_sq and will fail; ZeRO-1/2 engines load them")
        if len(groups) > 1 and len({tuple(sorted((k, str(v)) for k, v in g.items() if k != 'params')) for g in groups}) > 1:
            out.append("ds-universal: a ZeRO-3 engine's universal loader applies group 0's hyper-parameters to every group")
        return out

    def write(self, out: str, state: OutState, stream, *, fsync: bool = True) -> None:
        import torch

        tag = self._tag(state)
        tag_dir = os.path.join(out, tag)
        zero = os.path.join(tag_dir, "zero")
        os.makedirs(zero)
        groups, module, _ = self._split(state)
        version = _ds_version(state)
        ms_obj = self._model_states(state, groups, module, version)
        ms_path = os.path.join(tag_dir, MODEL_STATES[0])
        ms_writer = StreamingTorchSave(ms_path, ms_obj)
        module_keys = {t.name: str(i) for i, t in enumerate(module)}
        ms_open = True
        steps: dict[str, torch.Tensor] = {}
        try:
            if not module:
                ms_writer.close(fsync)
                ms_open = False
            for ot, tensor in stream:
                if ot.name in module_keys:
                    ms_writer.write(module_keys[ot.name], tensor)
                    if ms_writer.next == len(ms_writer.order):
                        ms_writer.close(fsync)
                        ms_open = False
                    continue
                if ot.role == "optimizer_slot":
                    folder = os.path.join(zero, _safe_dirname(ot.param))
                    os.makedirs(folder, exist_ok=True)
                    if ot.slot == "step":
                        steps.setdefault(ot.param, tensor.clone())  # kept past this item: not the stream's buffer
                        save_small(tensor, os.path.join(folder, "step.pt"), fsync=fsync)
                    else:
                        save_small({"param": tensor, "cat_dim": 0}, os.path.join(folder, f"{_safe_filename(ot.slot)}.pt"), fsync=fsync)
                else:
                    folder = os.path.join(zero, _safe_dirname(ot.name))
                    os.makedirs(folder, exist_ok=True)
                    fp32 = tensor if tensor.dtype == torch.float32 else tensor.float()
                    save_small({"param": fp32, "cat_dim": 0}, os.path.join(folder, "fp32.pt"), fsync=fsync)
        except BaseException:
            if ms_open:
                ms_writer.abort()
            raise
        if ms_open:
            ms_writer.close(fsync)
        shutil.copyfile(ms_path, os.path.join(tag_dir, MODEL_STATES[1]))
        save_small(self._optimizer_state(state, groups, steps, version), os.path.join(zero, "optimizer_state.pt"), fsync=fsync)
        with open(os.path.join(out, "latest_universal"), "w", encoding="utf-8") as f:
            f.write(tag)
            if fsync:
                f.flush()
                os.fsync(f.fileno())

    def _model_states(self, state: OutState, groups: list[dict], module: list, version: str) -> dict:
        import torch

        m = state.meta
        shapes = {t.name: t.shape for t in state.model()}
        mod = OrderedDict((t.name, TensorStub(str(i), t.dtype, t.shape)) for i, t in enumerate(module))
        frozen = OrderedDict((t.name, torch.Size(t.shape)) for t in module if t.role != "buffer")
        info = m.info if m.format != "stalwart" else {**(m.info.get("origin") or {}), **m.info}
        obj: dict = {
            "module": mod,
            "buffer_names": [t.name for t in module if t.role == "buffer"],
            "optimizer": None,
            "param_shapes": [OrderedDict((p, torch.Size(shapes[p])) for p in g["params"]) for g in groups],
            "frozen_param_shapes": frozen or None,
            "frozen_param_fragments": None,
            "shared_params": dict(state.aliases),
            "lr_scheduler": m.scheduler if not state.weights_only else None,
            "data_sampler": None,
            "random_ltd": None,
            "sparse_tensor_module_names": set(),
            "skipped_steps": int(info.get("skipped_steps") or 0),
            "global_steps": int(m.step or 0),
            "dp_world_size": int((m.topology or {}).get("dp") or 1),
            "mp_world_size": 1,
            "ds_version": version,
            "universal_checkpoint_info": {"universal_checkpoint_version": UCP_VERSION},
        }
        if info.get("global_samples") is not None:
            obj["global_samples"] = int(info["global_samples"])
        for k, v in (m.client or {}).items():
            obj.setdefault(k, v)
        return obj

    def _optimizer_state(self, state: OutState, groups: list[dict], steps: dict[str, torch.Tensor], version: str) -> dict:
        m = state.meta
        out_groups = []
        z3_state: dict = {}
        for i, g in enumerate(groups):
            hp = {k: (tuple(v) if k == "betas" and isinstance(v, list) else v) for k, v in g.items() if k != "params"}
            out_groups.append({**hp, "params": [i]})
            step = next((steps[p] for p in g["params"] if p in steps), None)
            if step is not None:
                z3_state[i] = {"step": step}
        obj: dict = {
            "param_groups": out_groups,
            "optimizer_state_dict": {"state": z3_state, "param_groups": out_groups},
            "ds_version": version,
            "overflow": False,
            "universal_checkpoint_info": {"universal_checkpoint_version": UCP_VERSION},
        }
        info = m.info if m.format != "stalwart" else {**(m.info.get("origin") or {}), **m.info}
        if info.get("clip_grad") is not None:
            obj["clip_grad"] = info["clip_grad"]
        scaler = _stand_in(m.loss_scaler)
        if scaler is not None:
            obj["loss_scaler"] = scaler
            obj["dynamic_loss_scale"] = bool(getattr(scaler, "dynamic", False))
        return obj


def _safe_filename(slot: str) -> str:
    if not re.match(r"^[A-Za-z0-9_.-]+$", slot) or slot in (".", ".."):
        raise ConversionError(f"optimizer slot name {slot!r} cannot be a file name")
    return slot


__all__ = ["UniversalSource", "UniversalTarget", "find_ucp_dir"]
