"""DeepSpeed engines (ZeRO stage 0-3; fp32, bf16, fp16): each rank stores its own partitions.

``stalwart.protect(engine, None, root=...)`` (or ``protect(engine, engine.optimizer, ...)``)
uses this provider. Nothing is gathered: every rank hands the snapshot views of the
flat buffers DeepSpeed already keeps, described with DeepSpeed's exact geometry, so the
stored checkpoint is an ordinary reshardable stalwart checkpoint.

What is stored (names are ``engine.module`` FQNs):

* ``<fqn>`` (role ``param``): the **fp32 master** (the optimizer's high-precision
  copy; its dtype is the master dtype DeepSpeed uses), placed as DeepSpeed holds it:

  - ZeRO-1/2 (``DeepSpeedZeroOptimizer``) and ``BF16_Optimizer``:
    :class:`~stalwart.formats.layout.ZeroFlat` members of one :class:`ZeroGroup` per
    optimizer param group (``g<i>``) - members in flat-buffer order (round-robin
    reordered if ``round_robin_gradients``), ``paddings`` = DeepSpeed's per-param
    alignment paddings (``round_robin_bit16_padding``), alignment
    ``nccl_start_alignment_factor * dp``. Each rank's local tensors are views into its
    ``single_partition_of_fp32_groups[i]`` (``fp32_groups_flat_partition[i]``);
  - ZeRO-3: :class:`~stalwart.formats.layout.ZeroParam` (``ceil(numel / dp)`` per rank;
    the last rank's padding is not stored), views into the sub-group buffers
    ``fp32_partitioned_groups_flat[sg]`` (sub-groups are walked in order);
  - stage 0: replicated (``FP16_Optimizer``'s ``fp32_groups_flat`` and
    ``FP16_UnfusedOptimizer``'s per-param fp32 copies for fp16/bf16; for fp32 the engine's
    optimizer is the torch one and the module parameters are the masters).
* ``optim.<fqn>.<slot>`` (role ``optimizer_slot``): every tensor slot of the inner torch
  optimizer. Elementwise slots (``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``, ...: as
  long as the flat master) follow their param's placement exactly; scalar tensor slots
  (``step``: one per flat buffer in DeepSpeed) are stored replicated under every member.
  Non-tensor slots and the param groups' hyper-parameters (``lr`` as the scheduler left
  it, betas, ...) go to ``objects["optimizer"]``, in the same form as
  :class:`~stalwart.ckpt.providers.optimizer.OptimizerProvider` writes it.
* frozen (and zero-element) params: ``<fqn>`` in their own (low-precision) dtype,
  replicated, except under ZeRO-3, whose ``ds_tensor`` partitions are stored as
  ``ZeroParam`` (as DeepSpeed's own ``frozen_param_fragments``).
* persistent buffers: DeepSpeed does not keep them in sync across DP ranks (BatchNorm
  statistics diverge), so ``<fqn>`` holds rank 0's copy (what DeepSpeed's own checkpoint
  keeps, and what a resharded restore loads everywhere) and
  ``__deepspeed__.rank_buffer.<fqn>`` (a leading DP dimension, one row per rank) every
  rank's own, restored when the topology is unchanged.
* ``objects["deepspeed"]``: ``global_steps``, ``global_samples``, ``skipped_steps``,
  ``micro_steps``, the loss scaler's state (``cur_scale``, ``cur_iter``,
  ``last_overflow_iter``, hysteresis, ...), the engine's ``lr_scheduler`` state, the
  ZeRO stage, dp size, master and model dtypes. RNG streams are the guard's
  :class:`~stalwart.ckpt.providers.rng.RNGProvider` (DeepSpeed on CPU/CUDA keeps no RNG of
  its own); the data position is the guard's ``resume(loader)``.

**Low-precision weights are not stored.** After every optimizer step DeepSpeed sets each
bf16/fp16 weight to the master cast to the model dtype (``bit16_partitions[rank].copy_(fp32)``
then an all-gather; ZeRO-3 ``fp16_partitioned_groups_flat.copy_(fp32)``), and at
initialisation the master is the exact upcast of the lp weight, so at any step boundary
``lp == master.to(lp_dtype)`` bit for bit. Restore therefore writes the masters and then
rebuilds the lp weights the way DeepSpeed itself does: ``update_lp_params()`` (ZeRO-1/2,
BF16_Optimizer: copy into this rank's bit16 partition + all-gather over DP), for ZeRO-3
``checkpoint_event_prologue()`` / copy into the fp16 sub-group buffers + unflatten /
``checkpoint_event_epilogue()`` (re-gathers persistent params), and for ``FP16_Optimizer``
the same unflatten-and-copy its ``step()`` ends with. Storing the lp copy too would add
``2 bytes x params`` per snapshot for no information.

A snapshot must be taken at a gradient-accumulation boundary (``guard.step()`` right after
the ``engine.step()`` that applied the update): partially accumulated gradients are not
state stalwart keeps, and collecting mid-accumulation raises an error.

DeepSpeed's CPU Adam kernels (``DeepSpeedCPUAdam`` for ZeRO-Offload, ``FusedAdam``'s CPU
build) keep ``beta^t`` in C++ state that a restore cannot set; restore replays the step
sequence on a one-element dummy so the kernel continues bit for bit
(:meth:`DeepSpeedProvider._replay_cpu_adam`).

The loop waits for the snapshot copy only right before the inner torch optimizer's
``step()`` mutates the masters and slots (:meth:`DeepSpeedProvider.step_hook_target`), so
the copy overlaps the whole forward/backward, gradient reduction and clipping.

Restoring into another topology (DP size, ZeRO stage) reshards through the targets the
live engine describes; RNG streams and per-rank buffers then fall back to what a
resharded restore can give (the guard's RNG provider skips, buffers take rank 0's).

Not supported (refused with a clear error): model/pipeline/sequence parallelism (the
checkpoint mesh is pure DP), MoE expert groups, NVMe swapping, ZeRO-3 partial optimizer
offload, ZenFlow, param groups partitioned over different DP groups.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch

from stalwart.ckpt.providers.base import (
    Collected,
    Item,
    RestoreContext,
    StateProvider,
    copy_into,
    per_rank_spec,
)
from stalwart.errors import LayoutError, StalwartError
from stalwart.formats.geometry import Box
from stalwart.formats.layout import (
    Explicit,
    Fragment,
    Mesh,
    Placement,
    Replicated,
    TensorSpec,
    ZeroFlat,
    ZeroGroup,
    ZeroParam,
)
from stalwart.formats.tree import decode_value, encode_value

_DEFAULT_SCALAR_SLOTS = ("step",)
RANK_BUFFER_PREFIX = "__deepspeed__.rank_buffer."
_SCALER_TYPES = (bool, int, float, str, type(None))


@dataclass
class _Member:
    """One trainable param's share of a flat master buffer on this rank."""

    fqn: str
    param: torch.nn.Parameter
    shape: tuple[int, ...]
    start: int  # element offset of this rank's piece in the flat buffer
    length: int  # elements of the param this rank holds (0: none)


@dataclass
class _Flat:
    """One flat master buffer (the inner optimizer's param) and the params it holds."""

    master: torch.Tensor
    group_index: int  # index into the inner optimizer's param_groups
    members: list[_Member]
    kind: str  # "zero_flat" | "zero_param" | "replicated"
    gid: str | None = None  # ZeRO-1/2 group id

    def member_placement(self, m: _Member) -> Placement:
        if self.kind == "zero_flat":
            return ZeroFlat(self.gid, m.fqn)
        return ZeroParam() if self.kind == "zero_param" else Replicated()

    def view(self, t: torch.Tensor, m: _Member) -> torch.Tensor:
        """This rank's local tensor of member ``m`` inside flat tensor ``t`` (the master or a slot)."""
        piece = t.reshape(-1).narrow(0, m.start, m.length)
        return piece.view(m.shape) if self.kind == "replicated" else piece


@dataclass
class _Geometry:
    kind: str  # zero12 | bf16 | zero3 | fp16 | unfused | torch
    dp: int
    rank: int
    flats: list[_Flat]
    groups: dict[str, ZeroGroup] = field(default_factory=dict)
    owned: set[int] = field(default_factory=set)  # ids of params held by a flat buffer


def _shape(p: torch.nn.Parameter) -> tuple[int, ...]:
    return tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)


class DeepSpeedProvider(StateProvider):
    """A DeepSpeed engine's model, optimizer and engine state; see the module docstring."""

    name = "deepspeed"

    def __init__(self, engine) -> None:
        self.engine = engine
        self.module: torch.nn.Module = engine.module
        self._geo: _Geometry | None = None
        self._names: dict[int, str] = {}
        for name, p in self.module.named_parameters():
            self._names.setdefault(id(p), name)

    # ------------------------------------------------------------------ geometry
    def _check_supported(self) -> None:
        import torch.distributed as dist

        e = self.engine
        world = dist.get_world_size() if dist.is_initialized() else 1
        dp = int(getattr(e, "dp_world_size", world))
        if getattr(e, "has_moe_layers", False):
            raise LayoutError("DeepSpeedProvider: MoE engines (expert groups) are not supported")
        if dp != world or int(getattr(e, "mp_world_size", 1)) != 1 or int(getattr(e, "seq_dp_world_size", dp)) != dp:
            raise LayoutError(
                f"DeepSpeedProvider supports pure data parallelism; this engine has dp={dp}, "
                f"mp={getattr(e, 'mp_world_size', 1)} over a world of {world}"
            )
        if getattr(e, "zenflow", False):
            raise LayoutError("DeepSpeedProvider: ZenFlow engines are not supported")
        opt = e.optimizer
        if getattr(opt, "swap_optimizer", False) or getattr(opt, "params_in_nvme_and_cpu", False):
            raise LayoutError("DeepSpeedProvider: NVMe-swapped optimizer state or params are not supported")
        if getattr(opt, "offload_optimizer", False) and getattr(opt, "partial_offload", 1.0) != 1.0:
            raise LayoutError("DeepSpeedProvider: ZeRO-3 partial optimizer offload is not supported")

    def _geometry(self) -> _Geometry:
        if self._geo is not None:
            return self._geo
        self._check_supported()
        import torch.distributed as dist

        opt = self.engine.optimizer
        if opt is None:
            raise LayoutError("DeepSpeedProvider needs an engine with an optimizer")
        cls = type(opt).__name__
        rank_of = lambda g: dist.get_rank(group=g) if dist.is_initialized() else 0  # noqa: E731
        size_of = lambda g: dist.get_world_size(group=g) if dist.is_initialized() else 1  # noqa: E731
        flats: list[_Flat] = []
        groups: dict[str, ZeroGroup] = {}
        if hasattr(opt, "single_partition_of_fp32_groups") and hasattr(opt, "round_robin_bit16_groups"):
            kind = "zero12"
            dp = size_of(opt.real_dp_process_group[0])
            rank = rank_of(opt.real_dp_process_group[0])
            for i, params in enumerate(opt.round_robin_bit16_groups):
                g_dp = size_of(opt.real_dp_process_group[i])
                if g_dp != dp:
                    raise LayoutError("DeepSpeedProvider: param groups partitioned over different DP groups are not supported")
                pads = list(opt.round_robin_bit16_padding[i])
                gid = f"g{i}"
                groups[gid] = ZeroGroup(tuple(self._fqn(p) for p in params), opt.nccl_start_alignment_factor * dp,
                                        tuple(pads) if any(pads) else None)
                flats.append(self._flat_members(opt.single_partition_of_fp32_groups[i], i, params, pads,
                                                int(opt.partition_size[i]), rank, dp, groups[gid], gid))
        elif hasattr(opt, "fp32_groups_flat_partition") and hasattr(opt, "bf16_groups"):
            kind = "bf16"
            dp = size_of(opt.real_dp_process_group[0])
            rank = rank_of(opt.real_dp_process_group[0])
            for i, params in enumerate(opt.bf16_groups):
                if size_of(opt.real_dp_process_group[i]) != dp:
                    raise LayoutError("DeepSpeedProvider: param groups partitioned over different DP groups are not supported")
                gid = f"g{i}"
                groups[gid] = ZeroGroup(tuple(self._fqn(p) for p in params), opt.nccl_start_alignment_factor * dp)
                part = opt.bf16_groups_flat[i].numel() // dp
                flats.append(self._flat_members(opt.fp32_groups_flat_partition[i], i, params, [0] * len(params),
                                                part, rank, dp, groups[gid], gid))
        elif hasattr(opt, "fp32_partitioned_groups_flat") and hasattr(opt, "fp16_groups"):
            kind = "zero3"
            dp = size_of(opt.dp_process_group)
            rank = rank_of(opt.dp_process_group)
            for sg, params in enumerate(opt.fp16_groups):
                if opt.sub_group_partition_counts[sg] != dp:
                    raise LayoutError("DeepSpeedProvider: ZeRO-3 sub-groups partitioned over another group than DP are not supported")
                master = opt.fp32_partitioned_groups_flat[sg]
                members, offset = [], 0
                for p in params:
                    n = p.ds_numel
                    c = p.partition_numel()
                    members.append(_Member(self._fqn(p), p, _shape(p), offset, max(0, min(c, n - rank * c))))
                    offset += c
                if offset != master.numel():
                    raise LayoutError(f"DeepSpeedProvider: ZeRO-3 sub-group {sg} holds {master.numel()} elements,"
                                      f" its params' partitions add up to {offset}")
                flats.append(_Flat(master, int(opt.sub_group_to_group_id[sg]), members, "zero_param"))
        elif hasattr(opt, "fp32_groups_flat") and hasattr(opt, "fp16_groups") and cls == "FP16_Optimizer":
            kind = "fp16"
            dp, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
            for i, params in enumerate(opt.fp16_groups):
                members, offset = [], 0
                for p in params:
                    members.append(_Member(self._fqn(p), p, tuple(p.shape), offset, p.numel()))
                    offset += p.numel()
                flats.append(_Flat(opt.fp32_groups_flat[i], i, members, "replicated"))
        elif cls == "FP16_UnfusedOptimizer":
            kind = "unfused"
            dp, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
            for i, (lps, masters) in enumerate(zip(opt.fp16_groups, opt.fp32_groups)):
                for p, master in zip(lps, masters):
                    flats.append(_Flat(master, i, [_Member(self._fqn(p), p, tuple(p.shape), 0, p.numel())], "replicated"))
        elif isinstance(opt, torch.optim.Optimizer):
            kind = "torch"
            dp, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
            for i, g in enumerate(opt.param_groups):
                for p in g["params"]:
                    if id(p) not in self._names:
                        raise LayoutError("DeepSpeedProvider: the optimizer holds a parameter that is not part of the model")
                    flats.append(_Flat(p, i, [_Member(self._fqn(p), p, tuple(p.shape), 0, p.numel())], "replicated"))
        else:
            raise LayoutError(f"DeepSpeedProvider: optimizer wrapper {cls} is not supported")
        owned = {id(m.param) for f in flats for m in f.members}
        self._geo = _Geometry(kind, dp, rank, flats, groups, owned)
        return self._geo

    def _fqn(self, p: torch.nn.Parameter) -> str:
        try:
            return self._names[id(p)]
        except KeyError:
            raise LayoutError("DeepSpeedProvider: the optimizer holds a parameter that is not part of engine.module") from None

    def _flat_members(self, master: torch.Tensor, gi: int, params, pads, partition: int, rank: int, dp: int,
                      group: ZeroGroup, gid: str) -> _Flat:
        """ZeRO-1/2 / BF16: this rank's piece of every member of a flat group buffer."""
        members = []
        offset = 0
        lo_part, hi_part = rank * partition, (rank + 1) * partition
        for p, pad in zip(params, pads):
            n = p.numel()
            lo, hi = max(offset, lo_part), min(offset + n, hi_part)
            members.append(_Member(self._fqn(p), p, tuple(p.shape), lo - lo_part if hi > lo else 0, max(0, hi - lo)))
            offset += n + pad
        aligned = -(-offset // group.alignment) * group.alignment
        if partition * dp != aligned or master.numel() != partition:
            # DeepSpeed changed how it builds flat buffers: refuse rather than store a wrong geometry
            raise LayoutError(
                f"DeepSpeedProvider: group {gid}: DeepSpeed's partition ({partition} elements x {dp}, master"
                f" {master.numel()}) does not match the layout's geometry (aligned group of {aligned} elements)"
            )
        return _Flat(master, gi, members, "zero_flat", gid)

    # ------------------------------------------------------------------ provider API
    def mesh(self, world_size: int) -> Mesh:
        """The checkpoint mesh: one ``dp`` dimension (pure data parallelism)."""
        geo = self._geometry()
        if geo.dp != world_size:
            raise LayoutError(f"DeepSpeedProvider: DP size {geo.dp} differs from the world size {world_size}")
        return Mesh(("dp",), (world_size,))

    def aliases(self) -> dict[str, str]:
        """Tied parameters (DeepSpeed's ``shared_params``): alias FQN -> owner FQN."""
        out = {}
        for name, p in self.module.named_parameters(remove_duplicate=False):
            owner = self._names.get(id(p))
            if owner is not None and owner != name:
                out[name] = owner
        return out

    def _inner(self) -> torch.optim.Optimizer:
        geo = self._geometry()
        return self.engine.optimizer if geo.kind == "torch" else self.engine.optimizer.optimizer

    def step_hook_target(self, callback):
        """Run ``callback`` right before the inner torch optimizer's ``step()`` mutates the
        fp32 masters and slots (inside ``engine.step()``); returns a handle with ``remove()``."""
        inner = self._inner()
        return inner.register_step_pre_hook(lambda *_: callback())

    def _scalar_slot(self, flat: _Flat, v) -> bool:
        if not isinstance(v, torch.Tensor):
            return False
        if v.numel() == flat.master.numel() and (flat.kind != "replicated" or v.shape == flat.master.shape):
            return False
        if v.numel() == 1:
            return True
        raise LayoutError(
            f"DeepSpeedProvider: an optimizer slot of shape {list(v.shape)} is neither elementwise"
            f" ({flat.master.numel()} elements) nor a scalar"
        )

    def _frozen(self, geo: _Geometry) -> Iterator[tuple[str, torch.Tensor, Placement, torch.Tensor]]:
        """(name, param, placement, local tensor) of params no flat buffer holds (frozen, empty)."""
        seen = set()
        for name, p in self.module.named_parameters():
            if id(p) in geo.owned or id(p) in seen:
                continue
            seen.add(id(p))
            if geo.kind == "zero3" and hasattr(p, "ds_tensor"):
                n, c = p.ds_numel, p.partition_numel()
                length = max(0, min(c, n - geo.rank * c))
                yield name, p, ZeroParam(), p.ds_tensor.reshape(-1).narrow(0, 0, length)
            else:
                yield name, p, Replicated(), p.data

    def _buffers(self) -> Iterator[tuple[str, torch.Tensor]]:
        persistent = set(self.module.state_dict(keep_vars=True).keys())
        for name, b in self.module.named_buffers():
            if b is not None and name in persistent:
                yield name, b

    def collect(self, mesh: Mesh, rank: int) -> Collected:
        geo = self._geometry()
        e = self.engine
        gas = int(e.gradient_accumulation_steps()) if hasattr(e, "gradient_accumulation_steps") else 1
        if gas > 1 and int(getattr(e, "micro_steps", 0)) % gas:
            raise StalwartError(
                f"DeepSpeed snapshot requested in the middle of gradient accumulation (micro step {e.micro_steps},"
                f" {gas} per step): call guard.step() only after the engine.step() that applied an update"
            )
        inner = self._inner()
        out = Collected(groups=dict(geo.groups))
        scalars: dict[str, dict] = {}
        scalar_slots: set[str] = set()
        for flat in geo.flats:
            state = inner.state.get(flat.master, {})
            for m in flat.members:
                placement = flat.member_placement(m)
                spec = TensorSpec(m.fqn, m.shape, flat.master.dtype, placement, role="param")
                out.items.append(Item(spec, flat.view(flat.master.detach(), m), lazy=True))
                for slot, v in state.items():
                    name = f"optim.{m.fqn}.{slot}"
                    if not isinstance(v, torch.Tensor):
                        scalars.setdefault(m.fqn, {})[slot] = v
                    elif self._scalar_slot(flat, v):
                        scalar_slots.add(slot)
                        spec = TensorSpec(name, tuple(v.shape), v.dtype, Replicated(), role="optimizer_slot", param=m.fqn, slot=slot)
                        out.items.append(Item(spec, v.detach(), lazy=True))
                    else:
                        spec = TensorSpec(name, m.shape, v.dtype, placement, role="optimizer_slot", param=m.fqn, slot=slot)
                        out.items.append(Item(spec, flat.view(v.detach(), m), lazy=True))
        for name, p, placement, local in self._frozen(geo):
            out.items.append(Item(TensorSpec(name, _shape(p), p.dtype, placement, role="param"), local.detach(), lazy=True))
        for name, b in self._buffers():
            # DeepSpeed does not keep buffers in sync across DP ranks (BatchNorm statistics
            # diverge): <fqn> holds rank 0's, as DeepSpeed's own checkpoint does, and a
            # per-rank copy restores each rank's own when the topology is unchanged.
            whole = Explicit(((0, Fragment(Box.full(tuple(b.shape)))),))
            out.items.append(Item(TensorSpec(name, tuple(b.shape), b.dtype, whole, role="buffer"), b.detach(), lazy=False))
            spec = per_rank_spec(RANK_BUFFER_PREFIX + name, mesh, tuple(b.shape), b.dtype)
            out.items.append(Item(spec, b.detach().unsqueeze(0), lazy=False))
        out.objects["optimizer"] = {
            "class": type(inner).__name__,
            "param_groups": encode_value(self._param_groups(geo, inner)),
            "scalars": encode_value(scalars),
        }
        out.objects["deepspeed"] = self._engine_state(geo, sorted(scalar_slots))
        return out

    def _param_groups(self, geo: _Geometry, inner: torch.optim.Optimizer) -> list[dict]:
        names: dict[int, list[str]] = {i: [] for i in range(len(inner.param_groups))}
        if geo.kind in ("zero12", "bf16"):
            opt = self.engine.optimizer
            groups = opt.bit16_groups if geo.kind == "zero12" else opt.bf16_groups
            for i, params in enumerate(groups):
                names[i] = [self._fqn(p) for p in params]  # the user's order, not the flat-buffer order
        else:
            for flat in geo.flats:
                names[flat.group_index].extend(m.fqn for m in flat.members)
        return [{**{k: v for k, v in g.items() if k != "params"}, "params": names[i]} for i, g in enumerate(inner.param_groups)]

    def _scalers(self) -> dict:
        out = {}
        opt = self.engine.optimizer
        for attr in ("loss_scaler", "loss_scale_config"):
            obj = getattr(opt, attr, None)
            if obj is None or not hasattr(obj, "__dict__"):
                continue
            out[attr] = {k: v for k, v in vars(obj).items() if isinstance(v, _SCALER_TYPES)}
        return out

    def _engine_state(self, geo: _Geometry, scalar_slots: list[str]) -> dict:
        e = self.engine
        sched = getattr(e, "lr_scheduler", None)
        sched_state = None
        if sched is not None and hasattr(sched, "state_dict"):
            try:
                sched_state = encode_value(sched.state_dict())
            except StalwartError as err:
                raise StalwartError(f"DeepSpeedProvider: the engine's lr_scheduler state cannot be stored: {err}") from None
        lp = next((m.param.dtype for f in geo.flats for m in f.members), None)
        return {
            "zero_stage": int(e.zero_optimization_stage()),
            "optimizer_wrapper": type(e.optimizer).__name__,
            "dp": geo.dp,
            "master_dtype": str(geo.flats[0].master.dtype).replace("torch.", "") if geo.flats else None,
            "model_dtype": str(lp).replace("torch.", "") if lp is not None else None,
            "global_steps": int(e.global_steps),
            "global_samples": int(e.global_samples),
            "skipped_steps": int(e.skipped_steps),
            "micro_steps": int(getattr(e, "micro_steps", 0)),
            "scalers": self._scalers(),
            "lr_scheduler": sched_state,
            "scalar_slots": scalar_slots,
        }

    # ------------------------------------------------------------------ restore
    def targets(self, ctx: RestoreContext) -> Collected:
        """Current-layout targets for every param, slot, frozen param and buffer the checkpoint holds."""
        geo = self._geometry()
        out = Collected(groups=dict(geo.groups))
        saved = ctx.saved
        slots_of: dict[str, list[TensorSpec]] = {}
        for spec in saved.values():
            if spec.role == "optimizer_slot" and spec.param is not None and spec.name.startswith("optim."):
                slots_of.setdefault(spec.param, []).append(spec)
        scalar_slots = set(ctx.objects.get("deepspeed", {}).get("scalar_slots", _DEFAULT_SCALAR_SLOTS))
        missing = []
        for flat in geo.flats:
            taken: set[str] = set()
            for m in flat.members:
                if m.fqn not in saved:
                    missing.append(m.fqn)
                    continue
                placement = flat.member_placement(m)
                out.items.append(Item(TensorSpec(m.fqn, m.shape, saved[m.fqn].dtype, placement, role="param"),
                                      _empty_local(flat, m, saved[m.fqn].dtype)))
                for spec in slots_of.get(m.fqn, ()):
                    if spec.slot in scalar_slots:
                        if spec.slot in taken:
                            continue  # one value per flat buffer: the first member's
                        taken.add(spec.slot)
                        out.items.append(Item(TensorSpec(spec.name, spec.shape, spec.dtype, Replicated(), role="optimizer_slot",
                                                         param=m.fqn, slot=spec.slot), torch.empty(spec.shape, dtype=spec.dtype)))
                    elif spec.shape == m.shape:
                        out.items.append(Item(TensorSpec(spec.name, m.shape, spec.dtype, placement, role="optimizer_slot",
                                                         param=m.fqn, slot=spec.slot), _empty_local(flat, m, spec.dtype)))
        for name, _p, placement, local in self._frozen(geo):
            if name not in saved:
                missing.append(name)
                continue
            spec = saved[name]
            out.items.append(Item(TensorSpec(name, spec.shape, spec.dtype, placement, role="param"),
                                  torch.empty(local.shape, dtype=spec.dtype)))
        for name, b in self._buffers():
            own = saved.get(RANK_BUFFER_PREFIX + name)
            if own is not None and ctx.same_topology:
                spec = per_rank_spec(own.name, ctx.mesh, tuple(own.shape[1:]), own.dtype)
                out.items.append(Item(spec, torch.empty((1, *own.shape[1:]), dtype=own.dtype), lazy=False))
            elif name in saved:
                spec = saved[name]
                out.items.append(Item(TensorSpec(name, spec.shape, spec.dtype, Replicated(), role="buffer"),
                                      torch.empty(tuple(b.shape), dtype=spec.dtype), lazy=False))
        if missing:
            raise LayoutError(f"the checkpoint lacks DeepSpeed params {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        return out

    @torch.no_grad()
    def restore(self, tensors: Mapping[str, torch.Tensor], ctx: RestoreContext) -> None:
        geo = self._geometry()
        inner = self._inner()
        saved_opt = ctx.objects.get("optimizer")
        if saved_opt is None:
            raise LayoutError("the checkpoint has no optimizer state")
        groups = decode_value(saved_opt["param_groups"])
        scalars = decode_value(saved_opt["scalars"])
        if len(groups) != len(inner.param_groups):
            raise LayoutError(f"the checkpoint has {len(groups)} param groups; the optimizer has {len(inner.param_groups)}")
        for live, stored in zip(self._param_groups(geo, inner), groups):
            if sorted(live["params"]) != sorted(stored["params"]):
                raise LayoutError("the optimizer's param groups list other parameters than the checkpoint's")
        for live, stored in zip(inner.param_groups, groups):
            for k, v in stored.items():
                if k != "params":
                    live[k] = v
        scalar_slots = set(ctx.objects.get("deepspeed", {}).get("scalar_slots", _DEFAULT_SCALAR_SLOTS))
        slots_of: dict[str, list[tuple[str, torch.Tensor]]] = {}
        for name, src in tensors.items():
            spec = ctx.saved[name]
            if spec.role == "optimizer_slot" and name.startswith("optim."):
                slots_of.setdefault(spec.param, []).append((spec.slot, src))
        if geo.kind == "zero3":
            self.engine.optimizer.checkpoint_event_prologue()  # release gathered params before rewriting partitions
        for flat in geo.flats:
            master = flat.master
            state = inner.state.get(master, {})
            for m in flat.members:
                if m.length:  # a member without elements on this rank has no loaded tensor
                    dst = flat.view(master, m)
                    dst.copy_(tensors[m.fqn].reshape(dst.shape))
                for slot, value in scalars.get(m.fqn, {}).items():
                    state[slot] = value
                for slot, src in slots_of.get(m.fqn, ()):
                    cur = state.get(slot)
                    if slot in scalar_slots:
                        if isinstance(cur, torch.Tensor) and cur.shape == src.shape and cur.dtype == src.dtype:
                            cur.copy_(src)
                        else:  # torch keeps a non-capturable ``step`` on the CPU; other scalars live with the master
                            device = src.device if slot == "step" else master.device
                            state[slot] = src.to(device=device, copy=True)
                        continue
                    if not (isinstance(cur, torch.Tensor) and cur.shape == master.shape and cur.dtype == src.dtype):
                        cur = state[slot] = torch.zeros(master.shape, dtype=src.dtype, device=master.device)
                    dst = flat.view(cur, m)
                    dst.copy_(src.reshape(dst.shape))
            if state:
                inner.state[master] = state
        for name, _p, _placement, local in self._frozen(geo):
            src = tensors.get(name)
            if src is not None:
                copy_into(local, src)
        for name, b in self._buffers():
            src = tensors.get(RANK_BUFFER_PREFIX + name, tensors.get(name))
            if src is not None:
                copy_into(b, src)
        self._rebuild_lp(geo)
        self._replay_cpu_adam(geo, inner)
        self._restore_engine_state(ctx.objects.get("deepspeed"))

    def _replay_cpu_adam(self, geo: _Geometry, inner: torch.optim.Optimizer) -> None:
        """Bring the hidden state of DeepSpeed's CPU Adam kernels to the restored step.

        ``DeepSpeedCPUAdam`` and ``FusedAdam``'s CPU build (``csrc/includes/cpu_adam.h``)
        keep the bias corrections ``beta^t`` in C++, multiplied by ``beta`` at every
        consecutive step and recomputed with ``pow`` after a jump; the two differ in the
        last bit, so a restored run would drift by an ulp. Replaying the step sequence
        (every flat buffer, in the optimizer's order, steps ``1..t``) on a one-element
        dummy tensor leaves the kernel exactly as the uninterrupted run left it.
        """
        kind = type(inner).__name__
        if not geo.flats or geo.flats[0].master.device.type != "cpu":
            return
        if kind == "DeepSpeedCPUAdam":
            def call(s: int, g: dict, t: list[torch.Tensor]) -> None:
                b1, b2 = g["betas"]
                inner.ds_opt_adam.adam_update(inner.opt_id, s, g["lr"], b1, b2, g["eps"], g["weight_decay"],
                                              g.get("bias_correction", True), t[0], t[1], t[2], t[3])
        elif kind == "FusedAdam" and hasattr(inner, "multi_tensor_adam"):
            def call(s: int, g: dict, t: list[torch.Tensor]) -> None:
                b1, b2 = g["betas"]
                inner.multi_tensor_adam(2048 * 32, inner._dummy_overflow_buf, [[t[1]], [t[0]], [t[2]], [t[3]]], g["lr"],
                                        b1, b2, g["eps"], s, inner.adam_w_mode, 1 if g.get("bias_correction", True) else 0,
                                        g["weight_decay"])
        else:
            return
        steps = []
        for flat in geo.flats:
            s = inner.state.get(flat.master, {}).get("step", 0)
            steps.append(int(s.item()) if isinstance(s, torch.Tensor) else int(s))
        dummy = [torch.zeros(1) for _ in range(4)]  # param, grad, exp_avg, exp_avg_sq
        for s in range(1, max(steps, default=0) + 1):
            for flat, last in zip(geo.flats, steps):
                if s <= last:
                    call(s, inner.param_groups[flat.group_index], dummy)

    def _rebuild_lp(self, geo: _Geometry) -> None:
        """Set the low-precision weights from the restored masters, as DeepSpeed's step does."""
        opt = self.engine.optimizer
        if geo.kind in ("zero12", "bf16"):
            opt.update_lp_params()
        elif geo.kind == "zero3":
            for sg in range(len(opt.fp32_partitioned_groups_flat)):
                fp32 = opt.fp32_partitioned_groups_flat[sg]
                lp = opt.fp16_partitioned_groups_flat[sg]
                if lp is None:
                    raise LayoutError("DeepSpeedProvider: ZeRO-3 params without a flat buffer (NVMe) are not supported")
                if fp32.numel():
                    lp.data.copy_(fp32.data)
                opt._unflatten_partitioned_parameters(sg)
            opt.checkpoint_event_epilogue()
        elif geo.kind == "unfused":
            for flat in geo.flats:
                flat.members[0].param.data.copy_(flat.master.data)
        elif geo.kind == "fp16":
            from torch._utils import _unflatten_dense_tensors

            for i, params in enumerate(opt.fp16_groups):
                for p, q in zip(params, _unflatten_dense_tensors(opt.fp32_groups_flat[i], params)):
                    p.data.copy_(q.data)

    def _restore_engine_state(self, state: Mapping | None) -> None:
        if state is None:
            return  # not a DeepSpeed checkpoint (e.g. converted): the engine counters stay as they are
        e = self.engine
        e.global_steps = int(state["global_steps"])
        e.global_samples = int(state["global_samples"])
        e.skipped_steps = int(state["skipped_steps"])
        if hasattr(e, "micro_steps"):
            e.micro_steps = int(state.get("micro_steps", e.micro_steps))
        for attr, values in state.get("scalers", {}).items():
            obj = getattr(e.optimizer, attr, None)
            if obj is None:
                continue
            for k, v in values.items():
                if hasattr(obj, k):
                    setattr(obj, k, v)
        sched = getattr(e, "lr_scheduler", None)
        if state.get("lr_scheduler") is not None and sched is not None:
            sched.load_state_dict(decode_value(state["lr_scheduler"]))


def _empty_local(flat: _Flat, m: _Member, dtype: torch.dtype) -> torch.Tensor:
    if flat.kind == "replicated":
        return torch.empty(m.shape, dtype=dtype)
    return torch.empty((m.length,), dtype=dtype)


__all__ = ["DeepSpeedProvider"]
