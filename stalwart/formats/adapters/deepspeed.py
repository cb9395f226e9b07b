"""DeepSpeed ZeRO stage 0/1/2/3 checkpoints, read without importing DeepSpeed.

What is read from where (DeepSpeed 0.19; see docs/CONVERT.md for the details):

* model-states files (``mp_rank_00_model_states.pt``, ZeRO-3:
  ``zero_pp_rank_<dp>_mp_rank_00_model_states.pt``): param names and shapes per
  group (``param_shapes``, in flat-buffer order), buffers (``module``), frozen
  params (``frozen_param_fragments``, else ``module``), tied aliases
  (``shared_params``, rank 0 only), scheduler, step, client state;
* optimizer files (``[bf16_]zero_pp_rank_<dp>_mp_rank_00_optim_states.pt``), one per
  DP rank: the fp32 master partitions and the base optimizer's state.
  ZeRO-1/2 and BF16_Optimizer: each group is one flat buffer cut into equal DP
  partitions; ``param_slice_mappings`` says where each param's fragment sits in a
  rank's partition. ZeRO-3: each param is padded to ``ceil(numel / dp)`` per rank
  and a rank's sub-group buffer concatenates its pieces in ``param_shapes`` order;
* stage 0: the module's weights and the whole torch optimizer state in the
  model-states file (fp32), or ``fp32_groups`` master copies (bf16/fp16).

fp32 masters are preferred to the low-precision module weights; frozen params
keep the dtype they were saved in. Every optimizer slot of the base optimizer is
kept (any torch optimizer): elementwise slots are cut like the masters, scalar
slots (``step``) are per group and copied to each of its params.

Layouts: a tag directory (``global_step3/``), a save directory with a ``latest``
file, or a Hugging Face Trainer ``checkpoint-N/`` holding ``global_stepN/``.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from stalwart.errors import ConversionError, FormatError
from stalwart.formats.adapters.base import (
    ConvertSource,
    Scalar,
    SourceTensor,
    infer_optimizer_class,
    match_by_shape,
    slot_name,
)
from stalwart.formats.adapters.safe_load import LazyFile, TensorRef, jsonable, pread_into
from stalwart.formats.dtypes import DTYPES, DType
from stalwart.formats.sources import register_source

if TYPE_CHECKING:
    import torch

MODEL_RE = re.compile(r"^(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt$")
OPTIM_RE = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_?optim_states\.pt$")
UNSUPPORTED_RE = re.compile(r"^(layer_\d+|expp_rank_|expert_|layer_\d+_expert_)")
STEP_DIR_RE = re.compile(r"^global_step(\d+)$")
HF_DIR_RE = re.compile(r"^checkpoint-(\d+)$")

DS_KEYS = {
    "module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "frozen_param_fragments",
    "shared_params", "lr_scheduler", "data_sampler", "random_ltd", "sparse_tensor_module_names", "skipped_steps",
    "global_steps", "global_samples", "dp_world_size", "mp_world_size", "checkpoint_parallel_dimensions", "ds_config",
    "ds_version", "universal_checkpoint_info",
}


# --------------------------------------------------------------------------- locating the tag directory


def _has_model_states(path: str) -> bool:
    try:
        return any(MODEL_RE.match(n) for n in os.listdir(path))
    except (NotADirectoryError, FileNotFoundError, PermissionError):
        return False


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read(4096).strip()
    except (OSError, UnicodeDecodeError):
        return None


def find_tag_dir(path: str) -> str | None:
    """The DeepSpeed tag directory ``path`` names, directly or through ``latest`` / HF nesting."""
    if not os.path.isdir(path):
        return None
    if _has_model_states(path):
        return path
    latest = _read_text(os.path.join(path, "latest"))
    if latest and "/" not in latest and _has_model_states(os.path.join(path, latest)):
        return os.path.join(path, latest)
    names = sorted(os.listdir(path))
    steps = [n for n in names if STEP_DIR_RE.match(n) and _has_model_states(os.path.join(path, n))]
    if len(steps) == 1:
        return os.path.join(path, steps[0])
    if len(steps) > 1:
        raise FormatError(f"{path}: holds several DeepSpeed tags ({', '.join(steps)}) and no 'latest' file; pass one of them")
    runs = [n for n in names if HF_DIR_RE.match(n) and find_tag_dir_quiet(os.path.join(path, n))]
    if len(runs) == 1:
        return find_tag_dir(os.path.join(path, runs[0]))
    if len(runs) > 1:
        runs.sort(key=lambda n: int(HF_DIR_RE.match(n).group(1)))
        raise FormatError(f"{path}: holds several Hugging Face Trainer checkpoints ({', '.join(runs)}); pass one of them")
    return None


def find_tag_dir_quiet(path: str) -> str | None:
    try:
        return find_tag_dir(path)
    except FormatError:
        return None


# --------------------------------------------------------------------------- reading helpers


class _Gather:
    """Reads a tensor concatenated from flat pieces (ref, src start, count, dst start) of
    saved tensors; also says where those bytes lie in the files (``ranges``)."""

    def __init__(self, shape: tuple[int, ...], dtype: DType, pieces: list[tuple[TensorRef, int, int, int]]) -> None:
        self.shape, self.dtype, self.pieces = tuple(shape), dtype, pieces
        for ref, _, _, _ in pieces:
            if ref.dtype != dtype:
                raise FormatError(f"{ref.where}: a fragment is {ref.dtype}, the tensor it belongs to {dtype}")

    def __call__(self) -> torch.Tensor:
        import torch

        out = torch.empty(math.prod(self.shape), dtype=self.dtype.torch)
        for ref, start, count, dst in self.pieces:
            ref.read_flat(start, count, out=out[dst : dst + count])
        return out.view(self.shape)

    def ranges(self) -> list[tuple[int, int, int]]:
        return [ref.byte_range(start, count) for ref, start, count, _ in sorted(self.pieces, key=lambda p: p[3])]


def _gather(shape: tuple[int, ...], dtype: DType, pieces: list[tuple[TensorRef, int, int, int]]) -> _Gather:
    return _Gather(shape, dtype, pieces)


def _scalar_value(v) -> Scalar:
    """A scalar optimizer slot (``step``) without building a tensor."""
    if isinstance(v, TensorRef):
        if v.numel != 1:
            raise FormatError(f"{v.where}: scalar optimizer state with {v.numel} elements")
        fd, off, n = v.byte_range(0, 1) if v.is_contiguous() else (None, 0, 0)
        if fd is None:
            raise FormatError(f"{v.where}: non-contiguous scalar optimizer state")
        raw = bytearray(n)
        pread_into(fd, memoryview(raw), off, v.where)
        return Scalar(v.dtype, raw)
    return Scalar.of(v)


def _const_reader(value: Scalar) -> Callable:
    return value.tensor


def _hparams(groups: list[dict], names: list[list[str]], where: str) -> list[dict]:
    out = []
    for g, group in enumerate(groups):
        hp, dropped = jsonable({k: v for k, v in group.items() if k != "params"})
        if dropped:
            raise FormatError(f"{where}: optimizer param group {g} holds non-JSON values at {dropped}")
        out.append({"params": list(names[g]), **(hp or {})})
    return out


# --------------------------------------------------------------------------- the source


class DeepSpeedSource(ConvertSource):
    """A DeepSpeed checkpoint tag directory as named whole tensors (see the module docstring)."""

    default_format = "deepspeed"

    def __init__(self, tag_dir: str, *, root: str | None = None) -> None:
        super().__init__(root or tag_dir)
        self.tag_dir = tag_dir
        self._files: dict[str, LazyFile] = {}
        try:
            self._scan()
            self._build()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        super().close()
        for f in self._files.values():
            f.close()
        self._files.clear()

    def _open(self, name: str) -> dict:
        f = self._files.get(name)
        if f is None:
            f = self._files[name] = LazyFile(os.path.join(self.tag_dir, name))
            self.consume(f.path)
        if not isinstance(f.obj, dict):
            raise FormatError(f"{f.path}: expected a dict, found {type(f.obj).__name__}")
        return f.obj

    # discovery ------------------------------------------------------------------
    def _scan(self) -> None:
        names = sorted(os.listdir(self.tag_dir))
        odd = [n for n in names if UNSUPPORTED_RE.match(n) and n.endswith(".pt")]
        if odd:
            raise ConversionError(
                f"{self.tag_dir}: pipeline-parallel or MoE checkpoints ({odd[0]}, ...) are not supported yet;"
                " stalwart reads pure data-parallel ZeRO checkpoints"
            )
        self.model_files: dict[int, str] = {}
        self.zero3_layout = False
        mp_ranks = set()
        for n in names:
            m = MODEL_RE.match(n)
            if m:
                mp_ranks.add(int(m.group(2)))
                if m.group(1) is not None:
                    self.zero3_layout = True
                    self.model_files[int(m.group(1))] = n
                elif int(m.group(2)) == 0:
                    self.model_files[0] = n
        if mp_ranks != {0}:
            raise ConversionError(
                f"{self.tag_dir}: model-parallel checkpoint (mp ranks {sorted(mp_ranks)}); tensor/pipeline-parallel"
                " DeepSpeed checkpoints are not supported yet"
            )
        self.optim_files: dict[int, str] = {}
        self.bf16_files = False
        for n in names:
            m = OPTIM_RE.match(n)
            if m and int(m.group(3)) == 0:
                if int(m.group(2)) in self.optim_files:
                    raise FormatError(f"{self.tag_dir}: two optimizer files for DP rank {m.group(2)}")
                self.optim_files[int(m.group(2))] = n
                self.bf16_files |= m.group(1) is not None
        if 0 not in self.model_files:
            raise FormatError(f"{self.tag_dir}: no model-states file of rank 0 (found {[n for n in names if n.endswith('.pt')][:6]})")
        self.ms0 = self._open(self.model_files[0])
        if "buffer_names" not in self.ms0 and "module" not in self.ms0:
            raise FormatError(f"{self.tag_dir}/{self.model_files[0]}: not a DeepSpeed model-states file")
        self.dp = int(self.ms0.get("dp_world_size") or 1)
        if self.optim_files:
            missing = [r for r in range(self.dp) if r not in self.optim_files]
            extra = [r for r in self.optim_files if r >= self.dp]
            if missing:
                prefix = "bf16_" if self.bf16_files else ""
                raise FormatError(
                    f"{self.tag_dir}: the checkpoint was saved by {self.dp} DP ranks but the optimizer file of rank"
                    f" {missing[0]} ({prefix}zero_pp_rank_{missing[0]}_mp_rank_00_optim_states.pt) is missing"
                )
            if extra:
                raise FormatError(f"{self.tag_dir}: optimizer files for DP ranks {extra} beyond dp_world_size={self.dp}")
        if self.zero3_layout:
            missing = [r for r in range(self.dp) if r not in self.model_files]
            if missing:
                raise FormatError(
                    f"{self.tag_dir}: ZeRO-3 checkpoint of {self.dp} DP ranks lacks the model-states file of rank"
                    f" {missing[0]} (zero_pp_rank_{missing[0]}_mp_rank_00_model_states.pt)"
                )
        self.optims = [self._open(self.optim_files[r]) for r in range(self.dp)] if self.optim_files else []
        self.osds = []
        for r, o in enumerate(self.optims):
            osd = o.get("optimizer_state_dict")
            if not isinstance(osd, dict):
                raise FormatError(f"{self.tag_dir}/{self.optim_files[r]}: no optimizer_state_dict: not a ZeRO optimizer file")
            self.osds.append(osd)
        if self.osds:
            osd0 = self.osds[0]
            if "zero_stage" in osd0:
                self.stage = int(osd0["zero_stage"])
                self.kind = f"zero{self.stage}"
            elif "single_partition_of_fp32_groups" in osd0:
                self.stage, self.kind = 1, "bf16_optimizer"
            else:
                raise FormatError(f"{self.tag_dir}/{self.optim_files[0]}: unknown optimizer file layout (keys {sorted(osd0)[:8]})")
        else:
            self.stage, self.kind = 0, "stage0"
        if (self.stage == 3) != self.zero3_layout:
            raise FormatError(f"{self.tag_dir}: ZeRO stage {self.stage} optimizer files with the model-states files of another stage")
        self._check_consistent()

    def _check_consistent(self) -> None:
        """Files from different saves (mixed steps, versions, world sizes) are refused."""
        states = [(self.model_files[r], self._open(self.model_files[r])) for r in sorted(self.model_files)]
        for key in ("global_steps", "dp_world_size", "ds_version"):
            seen = {(name, ms.get(key)) for name, ms in states}
            if len({v for _, v in seen}) > 1:
                detail = ", ".join(f"{n}: {v}" for n, v in sorted(seen))
                what = "mixed steps" if key == "global_steps" else f"inconsistent {key}"
                raise FormatError(f"{self.tag_dir}: {what} across model-states files ({detail})")
        versions = {o.get("ds_version") for o in self.optims} | {self.ms0.get("ds_version")}
        versions.discard(None)
        if len(versions) > 1:
            raise FormatError(f"{self.tag_dir}: files written by different DeepSpeed versions {sorted(versions)}")

    # building ----------------------------------------------------------------------
    def _build(self) -> None:
        ms0 = self.ms0
        module = ms0.get("module")
        if module is not None and not isinstance(module, dict):
            raise FormatError(f"{self.tag_dir}/{self.model_files[0]}: 'module' is not a state dict")
        self.module: dict = module or {}
        self.buffer_names = list(ms0.get("buffer_names") or [])
        shared = dict(ms0.get("shared_params") or {})
        # Tied tensors also show as one storage viewed twice in the module state dict.
        seen: dict[tuple, str] = {}
        for name, ref in self.module.items():
            if isinstance(ref, TensorRef) and ref.numel:
                owner = seen.setdefault(ref.alias_key(), name)
                if owner != name and name not in shared:
                    shared[name] = owner
        self.shared = shared
        self.trainable: list[str] = []
        self.groups: list[list[str]] = []
        self._pending: dict[str, tuple[tuple[int, ...], DType, Callable]] = {}
        self._slot_pending: dict[str, list[SourceTensor]] = {}
        if self.kind in ("zero1", "zero2", "bf16_optimizer"):
            self._build_zero12()
        elif self.kind == "zero3":
            self._build_zero3()
        else:
            self._build_stage0()
        self._emit()
        self._meta()

    def _param_shapes(self) -> list[dict]:
        shapes = self.ms0.get("param_shapes")
        if not isinstance(shapes, list):
            raise FormatError(f"{self.tag_dir}/{self.model_files[0]}: no param_shapes (needed for ZeRO)")
        return [dict((str(k), tuple(int(x) for x in v)) for k, v in g.items()) for g in shapes]

    def _group_scalars(self, states: list[dict], what: str) -> dict[str, Scalar]:
        """Scalar slots of one group (``step``), checked to agree across ranks."""
        out: dict[str, Scalar] = {}
        for r, st in enumerate(states):
            for slot, v in st.items():
                if isinstance(v, TensorRef) and v.shape != ():
                    continue
                if isinstance(v, (TensorRef, bool, int, float)):
                    val = _scalar_value(v)
                    if slot in out and out[slot] != val:
                        raise FormatError(
                            f"{self.tag_dir}: mixed steps: {what} slot {slot!r} is {out[slot].value()} on rank 0"
                            f" but {val.value()} on rank {r} (files from different saves?)"
                        )
                    out.setdefault(slot, val)
        return out

    def _build_zero12(self) -> None:
        shapes = self._param_shapes()
        keep_padding = self.kind == "bf16_optimizer"
        G = len(shapes)
        for r, osd in enumerate(self.osds):
            for key in ("single_partition_of_fp32_groups", "param_slice_mappings", "base_optimizer_state"):
                if key not in osd:
                    raise FormatError(f"{self.tag_dir}/{self.optim_files[r]}: missing {key!r}")
            if len(osd["single_partition_of_fp32_groups"]) != G:
                raise FormatError(f"{self.tag_dir}/{self.optim_files[r]}: {len(osd['single_partition_of_fp32_groups'])} fp32 groups, param_shapes has {G}")
            counts = osd.get("partition_count")
            if counts is not None and any(int(c) != self.dp for c in (counts if isinstance(counts, list) else [counts])):
                raise ConversionError(f"{self.tag_dir}: partition counts {counts} differ from dp={self.dp} (MoE expert groups are not supported)")
        elastic = isinstance(self.osds[0]["base_optimizer_state"], list)
        group_hparams = self.osds[0]["base_optimizer_state"].get("param_groups") if not elastic else None
        for g in range(G):
            fp32 = [osd["single_partition_of_fp32_groups"][g] for osd in self.osds]
            pads = [int((osd.get("group_paddings") or [0] * G)[g]) for osd in self.osds]
            parts = [f.numel if keep_padding else f.numel + p for f, p in zip(fp32, pads)]
            if len(set(parts)) != 1:
                raise FormatError(f"{self.tag_dir}: group {g} partitions differ in size across ranks ({parts})")
            part = parts[0]
            if elastic:
                states = [osd["base_optimizer_state"][g] for osd in self.osds]
            else:
                states = [osd["base_optimizer_state"]["state"].get(g, {}) for osd in self.osds]
            slot_len = {r: {} for r in range(self.dp)}
            for r, st in enumerate(states):
                for slot, v in st.items():
                    if isinstance(v, TensorRef) and v.shape != ():
                        want = fp32[r].numel if elastic else part
                        if v.numel != want or len(v.shape) != 1:
                            raise ConversionError(
                                f"{self.tag_dir}: optimizer slot {slot!r} of group {g} has shape {list(v.shape)}, not the"
                                f" partition's ({want},): non-elementwise optimizer state cannot be split per param"
                            )
                        slot_len[r][slot] = v
            names_g = list(shapes[g])
            slots = sorted(set().union(*(set(s) for s in slot_len.values())))
            for r in range(self.dp):
                if set(slot_len[r]) != set(slots):
                    raise FormatError(f"{self.tag_dir}: rank {r} lacks optimizer slots {sorted(set(slots) - set(slot_len[r]))} of group {g}")
            scalars = self._group_scalars(states, f"group {g}")
            maps = [osd["param_slice_mappings"][g] for osd in self.osds]
            for name in names_g:
                shape = shapes[g][name]
                numel = math.prod(shape)
                frags = []
                for r in range(self.dp):
                    addr = maps[r].get(name)
                    if addr is None or int(addr.numel) == 0:
                        continue
                    frags.append((r, int(addr.start), int(addr.numel)))
                self._check_frags(name, g, frags, numel, part)
                pos = 0
                pieces_fp32, pieces_slot = [], {s: [] for s in slots}
                for r, start, count in frags:
                    if start + count > fp32[r].numel:
                        raise FormatError(f"{self.tag_dir}: {name!r} fragment on rank {r} runs past its fp32 partition")
                    pieces_fp32.append((fp32[r], start, count, pos))
                    for s in slots:
                        pieces_slot[s].append((slot_len[r][s], start, count, pos))
                    pos += count
                self._add_trainable(name, shape, fp32[0].dtype, _gather(shape, fp32[0].dtype, pieces_fp32))
                for s in slots:
                    dtype = slot_len[0][s].dtype
                    self._add_slot(name, s, shape, dtype, _gather(shape, dtype, pieces_slot[s]))
                for s, val in scalars.items():
                    self._add_slot(name, s, (), val.dtype, _const_reader(val))
            self.groups.append(names_g)
        self._hparam_groups = group_hparams
        self._frozen_from_fragments(zero3=False)

    def _check_frags(self, name: str, g: int, frags: list, numel: int, part: int) -> None:
        total = sum(c for _, _, c in frags)
        if total != numel:
            raise FormatError(
                f"{self.tag_dir}: param {name!r} (group {g}) has {numel} elements but its fragments across"
                f" {self.dp} ranks hold {total}"
            )
        for i, (r, start, count) in enumerate(frags):
            if i > 0 and start != 0:
                raise FormatError(f"{self.tag_dir}: param {name!r} fragment on rank {r} does not start its partition")
            if i < len(frags) - 1 and start + count != part:
                raise FormatError(f"{self.tag_dir}: param {name!r} fragment on rank {r} does not end its partition")

    def _build_zero3(self) -> None:
        shapes = self._param_shapes()
        S = len(shapes)
        flats = []
        for r, osd in enumerate(self.osds):
            if "ds_zero_partition_groups" in osd:
                raise ConversionError(f"{self.tag_dir}: AutoEP expert partition groups are not supported")
            groups = osd.get("fp32_flat_groups")
            inner = osd.get("optimizer_state_dict")
            if not isinstance(groups, list) or not isinstance(inner, dict):
                raise FormatError(f"{self.tag_dir}/{self.optim_files[r]}: missing fp32_flat_groups/optimizer_state_dict")
            if len(groups) != S:
                raise FormatError(f"{self.tag_dir}/{self.optim_files[r]}: {len(groups)} sub-groups, param_shapes has {S}")
            flats.append(groups)
        inners = [osd["optimizer_state_dict"] for osd in self.osds]
        group_of_sub: dict[int, int] = {}
        for gi, group in enumerate(inners[0].get("param_groups", [])):
            for s in group.get("params", []):
                group_of_sub[int(s)] = gi
        ngroups = max(group_of_sub.values(), default=-1) + 1
        self.groups = [[] for _ in range(max(ngroups, 1))]
        for s in range(S):
            states = [inner.get("state", {}).get(s, {}) for inner in inners]
            scalars = self._group_scalars(states, f"sub-group {s}")
            slot_refs = {}
            for r, st in enumerate(states):
                for slot, v in st.items():
                    if isinstance(v, TensorRef) and v.shape != ():
                        if v.numel != flats[r][s].numel:
                            raise ConversionError(
                                f"{self.tag_dir}: optimizer slot {slot!r} of sub-group {s} has {v.numel} elements,"
                                f" the fp32 partition {flats[r][s].numel}: non-elementwise state cannot be split per param"
                            )
                        slot_refs.setdefault(slot, {})[r] = v
            slots = sorted(slot_refs)
            for slot in slots:
                if len(slot_refs[slot]) != self.dp:
                    raise FormatError(f"{self.tag_dir}: optimizer slot {slot!r} of sub-group {s} is missing on some ranks")
            off = 0
            for name, shape in shapes[s].items():
                numel = math.prod(shape)
                c = -(-numel // self.dp)
                pieces, slot_pieces = [], {k: [] for k in slots}
                for r in range(self.dp):
                    n = max(0, min(c, numel - r * c))
                    if n:
                        pieces.append((flats[r][s], off, n, r * c))
                        for k in slots:
                            slot_pieces[k].append((slot_refs[k][r], off, n, r * c))
                dtype = flats[0][s].dtype
                self._add_trainable(name, shape, dtype, _gather(shape, dtype, pieces))
                for k in slots:
                    kd = slot_refs[k][0].dtype
                    self._add_slot(name, k, shape, kd, _gather(shape, kd, slot_pieces[k]))
                for k, val in scalars.items():
                    self._add_slot(name, k, (), val.dtype, _const_reader(val))
                self.groups[group_of_sub.get(s, 0)].append(name)
                off += c
            for r in range(self.dp):
                if off != flats[r][s].numel:
                    raise FormatError(
                        f"{self.tag_dir}: sub-group {s} of rank {r} holds {flats[r][s].numel} elements, its params"
                        f" need {off} (param_shapes does not match the optimizer file)"
                    )
        self._hparam_groups = inners[0].get("param_groups")
        self._frozen_from_fragments(zero3=True)

    def _frozen_from_fragments(self, *, zero3: bool) -> None:
        fshapes = self.ms0.get("frozen_param_shapes") or {}
        self.frozen_shapes = {str(k): tuple(int(x) for x in v) for k, v in fshapes.items()}
        self.frozen_readers: dict[str, tuple[DType, Callable]] = {}
        if not self.frozen_shapes:
            return
        if zero3:
            frags = [self._open(self.model_files[r]).get("frozen_param_fragments") or {} for r in range(self.dp)]
            for name, shape in self.frozen_shapes.items():
                numel = math.prod(shape)
                c = -(-numel // self.dp)
                pieces = []
                for r in range(self.dp):
                    ref = frags[r].get(name)
                    n = max(0, min(c, numel - r * c))
                    if ref is None:
                        raise FormatError(f"{self.tag_dir}: frozen param {name!r} has no fragment on rank {r}")
                    if n:
                        pieces.append((ref, 0, n, r * c))
                dtype = pieces[0][0].dtype if pieces else DTYPES["float32"]
                self.frozen_readers[name] = (dtype, _gather(shape, dtype, pieces))
        else:
            frags = self.ms0.get("frozen_param_fragments") or {}
            for name, shape in self.frozen_shapes.items():
                ref = frags.get(name)
                if isinstance(ref, TensorRef):
                    if ref.numel != math.prod(shape):
                        raise FormatError(f"{self.tag_dir}: frozen param {name!r} fragment has {ref.numel} elements, shape {list(shape)}")
                    self.frozen_readers[name] = (ref.dtype, _gather(shape, ref.dtype, [(ref, 0, ref.numel, 0)]))

    def _build_stage0(self) -> None:
        opt = self.ms0.get("optimizer")
        params = [n for n in self.module if n not in self.buffer_names and n not in self.shared]
        cands = [(n, tuple(self.module[n].shape)) for n in params if isinstance(self.module[n], TensorRef)]
        self.frozen_shapes, self.frozen_readers = {}, {}
        if opt is None:
            self.meta.warnings.append("stage-0 checkpoint without optimizer state: weights only")
            self._hparam_groups = None
            return
        if "fp32_groups_flat" in opt:
            raise ConversionError(
                f"{self.tag_dir}: stage-0 FP16_Optimizer (fused) checkpoints are not supported: they do not record"
                " which params each flat fp32 group holds"
            )
        if "fp32_groups" in opt:
            inner = opt.get("optimizer_state_dict") or {}
            masters = [m for group in opt["fp32_groups"] for m in group]
        else:
            inner, masters = opt, None
        groups = inner.get("param_groups") or []
        state = inner.get("state") or {}
        order = [int(i) for g in groups for i in g.get("params", [])]
        wanted = []
        for k, idx in enumerate(order):
            if masters is not None:
                wanted.append(tuple(masters[k].shape))
            else:
                refs = [v for v in state.get(idx, {}).values() if isinstance(v, TensorRef) and v.shape != ()]
                wanted.append(tuple(refs[0].shape) if refs else None)
        names = match_by_shape(cands, wanted)
        if names is None:
            raise ConversionError(
                f"{self.tag_dir}: cannot tell which module tensor each of the {len(order)} optimizer params is"
                " (stage-0 checkpoints record no names; matching by shape failed)"
            )
        self.meta.warnings.append("stage-0 checkpoint: optimizer params matched to module tensors by order and shape")
        k = 0
        for g in groups:
            gnames = []
            for idx in g.get("params", []):
                name = names[k]
                ref = masters[k] if masters is not None else self.module[name]
                shape = tuple(self.module[name].shape)
                if ref.numel != math.prod(shape):
                    raise FormatError(f"{self.tag_dir}: master of {name!r} has {ref.numel} elements, the module tensor {list(shape)}")
                self._add_trainable(name, shape, ref.dtype, _gather(shape, ref.dtype, [(ref, 0, ref.numel, 0)]))
                for slot, v in state.get(int(idx), {}).items():
                    if isinstance(v, TensorRef) and v.shape != ():
                        if v.numel != ref.numel:
                            raise ConversionError(f"{self.tag_dir}: optimizer slot {slot!r} of {name!r} is not elementwise")
                        self._add_slot(name, slot, shape, v.dtype, _gather(shape, v.dtype, [(v, 0, v.numel, 0)]))
                    elif isinstance(v, (TensorRef, bool, int, float)):
                        val = _scalar_value(v)
                        self._add_slot(name, slot, (), val.dtype, _const_reader(val))
                gnames.append(name)
                k += 1
            self.groups.append(gnames)
        self._hparam_groups = groups

    def _add_trainable(self, name: str, shape, dtype, reader) -> None:
        if name in self._pending:
            raise FormatError(f"{self.tag_dir}: param {name!r} appears twice in the optimizer partitions")
        self.trainable.append(name)
        self._pending[name] = (tuple(shape), dtype, reader)

    def _add_slot(self, name: str, slot: str, shape, dtype, reader) -> None:
        self._slot_pending.setdefault(name, []).append(
            SourceTensor(slot_name(name, slot), tuple(shape), dtype, "optimizer_slot", reader, param=name, slot=slot,
                         ranges=getattr(reader, "ranges", None))
        )

    def _emit(self) -> None:
        """Add tensors in the module's order (params, frozen params, buffers), then the slots."""
        order = [n for n in self.module if n not in self.shared]
        for n in self.trainable:
            if n not in order:
                order.append(n)
        for n in self.frozen_shapes:
            if n not in order:
                order.append(n)
        skipped = []
        for name in order:
            if name in self._pending:
                shape, dtype, reader = self._pending[name]
                self.add(SourceTensor(name, shape, dtype, "param", reader, requires_grad=True,
                                      ranges=getattr(reader, "ranges", None)))
            elif name in self.frozen_readers:
                dtype, reader = self.frozen_readers[name]
                self.add(SourceTensor(name, self.frozen_shapes[name], dtype, "param", reader, requires_grad=False,
                                      ranges=getattr(reader, "ranges", None)))
            else:
                ref = self.module.get(name)
                role = "buffer" if name in self.buffer_names else "param"
                if not isinstance(ref, TensorRef):
                    continue
                want = self.frozen_shapes.get(name)
                if self.stage == 3 and role == "param":
                    skipped.append(name)  # ZeRO-3 module entries are empty placeholders
                    continue
                if want is not None and ref.numel != math.prod(want):
                    skipped.append(name)
                    continue
                reader = _gather(ref.shape, ref.dtype, [(ref, 0, ref.numel, 0)]) if ref.is_contiguous() else ref.read
                self.add(SourceTensor(name, ref.shape, ref.dtype, role, reader,
                                      requires_grad=False if role == "param" else None,
                                      ranges=getattr(reader, "ranges", None)))
        if skipped:
            self.meta.warnings.append(
                f"frozen params {skipped[:5]} are not in this checkpoint (saved with exclude_frozen_parameters?): left out"
            )
        for alias, owner in self.shared.items():
            if owner in self.tensors and alias not in self.tensors:
                self.aliases[alias] = owner
        for name in list(self.tensors):
            for st in self._slot_pending.get(name, []):
                self.add(st)

    def _meta(self) -> None:
        ms0, m = self.ms0, self.meta
        dtype = "fp32"
        cfg, _ = jsonable(ms0.get("ds_config"))
        if isinstance(cfg, dict):
            if (cfg.get("bf16") or {}).get("enabled"):
                dtype = "bf16"
            elif (cfg.get("fp16") or {}).get("enabled"):
                dtype = "fp16"
        m.format = f"deepspeed-{'zero' + str(self.stage) if self.kind != 'bf16_optimizer' else 'bf16-optimizer'}"
        steps = ms0.get("global_steps")
        m.step = int(steps) if isinstance(steps, int) else None
        m.topology = {"framework": "deepspeed", "zero_stage": self.stage, "dp": self.dp}
        info: dict = {"tag": os.path.basename(os.path.normpath(self.tag_dir)), "dtype": dtype, "optimizer_kind": self.kind}
        for key in ("ds_version", "global_samples", "skipped_steps"):
            if ms0.get(key) is not None:
                info[key] = ms0[key]
        if self.osds:
            osd0 = self.osds[0]
            for key in ("clip_grad", "dynamic_loss_scale"):
                if key in osd0:
                    info[key] = osd0[key]
            if "loss_scaler" in osd0:
                m.loss_scaler, _ = jsonable(osd0["loss_scaler"])
        elif isinstance(ms0.get("optimizer"), dict) and "cur_scale" in ms0["optimizer"]:
            scaler = {k: ms0["optimizer"][k] for k in ("dynamic_loss_scale", "cur_scale", "cur_iter", "last_overflow_iter",
                                                       "scale_factor", "scale_window") if k in ms0["optimizer"]}
            m.loss_scaler, _ = jsonable(scaler)
        if cfg is not None:
            info["ds_config"] = cfg
        m.info = info
        no_hparams = self._hparam_groups is None and bool(self.groups) and self.kind != "stage0"
        if no_hparams:
            # elastic ZeRO-1/2 checkpoints keep the per-group state but not the param groups
            self._hparam_groups = [{} for _ in self.groups]
            m.warnings.append("the optimizer's hyper-parameters are not in this checkpoint (elastic format)")
        if self._hparam_groups is not None and self.groups:
            if len(self._hparam_groups) != len(self.groups):
                raise FormatError(f"{self.tag_dir}: {len(self._hparam_groups)} optimizer param groups, {len(self.groups)} groups of params")
            groups = _hparams(self._hparam_groups, self.groups, self.tag_dir)
            slots = {t.slot for t in self.tensors.values() if t.role == "optimizer_slot"}
            opt_cfg = (cfg or {}).get("optimizer") if isinstance(cfg, dict) else None
            cls = opt_cfg.get("type") if isinstance(opt_cfg, dict) else None
            guess = None if no_hparams else infer_optimizer_class(slots, groups[0] if groups else {})
            m.optimizer = {"class": cls or guess, "param_groups": groups}
            if not cls:
                m.optimizer["class_inferred"] = True
        sched = ms0.get("lr_scheduler")
        if sched is not None:
            m.scheduler, dropped = jsonable(sched)
            if dropped:
                m.warnings.append(f"scheduler state not representable as JSON, dropped: {dropped[:8]}")
        client = {k: v for k, v in ms0.items() if k not in DS_KEYS}
        m.client, dropped = jsonable(client)
        m.client = m.client or {}
        if dropped:
            m.warnings.append(f"client state not representable as JSON, dropped: {dropped[:8]}")


def _detect(path: str, options: dict) -> DeepSpeedSource | None:
    tag = find_tag_dir(path) if os.path.isdir(path) else None
    if tag is None:
        return None
    src = DeepSpeedSource(tag, root=path)
    # the pointers that led to the tag directory are read too; DeepSpeed's own
    # conversion script (zero_to_fp32.py, zero_to_torch.py: copied next to its tags) is a
    # tool, not state
    d = tag
    while os.path.realpath(d) != os.path.realpath(path) and d != os.path.dirname(d):
        d = os.path.dirname(d)
        for name in ("latest", "zero_to_fp32.py", "zero_to_torch.py"):
            if os.path.isfile(os.path.join(d, name)):
                src.consume(os.path.join(d, name))
    # a Trainer checkpoint-N/ written with DeepSpeed: Trainer's own files sit next to the tag
    trainer_dir = os.path.dirname(os.path.normpath(tag))
    if HF_DIR_RE.match(os.path.basename(trainer_dir)):
        from stalwart.formats.adapters.hf_training import read_side_state

        try:
            read_side_state(src, trainer_dir, set(os.listdir(trainer_dir)))
        except BaseException:
            src.close()
            raise
    return src


register_source("deepspeed", _detect, priority=20)

__all__ = ["DeepSpeedSource", "find_tag_dir"]
