"""``OffloadAdamW``: a ``torch.optim.Optimizer`` whose state lives in host memory it
allocates itself, updated per subgroup by the native host kernel or on the device.

CPU parameters are updated in place by the host kernel (bf16/fp16 parameters through
fp32 master weights kept here). CUDA parameters get fp32 masters and both moments in
(pinned, NUMA-bound) host memory; every step a calibrated performance model places each
subgroup's update on the CPU or the GPU (see :mod:`stalwart.offload.planner` and
:mod:`stalwart.offload.device`). Both paths do the same fp32 operations in the same
order, so the placement never changes a bit of the result.

The state is an ordinary optimizer state: ``state[p]`` holds ``step``, ``exp_avg``,
``exp_avg_sq`` (and ``master`` for non-fp32 or device parameters) as fp32 tensors shaped
like the parameter (DTensors for DTensor parameters) that are views of the host
buffers. ``state_dict()`` / ``load_state_dict()`` and stalwart's checkpoint provider use
them unchanged; state put back by anyone (a checkpoint restore, ``load_state_dict``) is
copied into the buffers before the next update.
"""

from __future__ import annotations

import collections
import math
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from stalwart.errors import StalwartError
from stalwart.offload import native, planner
from stalwart.offload.calibrate import calibrate
from stalwart.offload.hostmem import HostRegion, PinError
from stalwart.offload.layout import Layout, build_layout, local_tensor
from stalwart.offload.numa import (
    SYSFS_NODES,
    BufferUse,
    Extent,
    NumaError,
    NumaPlan,
    Topology,
    plan_placement,
)
from stalwart.offload.rules import AdamRule, UpdateRule, f32

DEFAULT_SUBGROUP = 1 << 24
_DTYPES = {torch.float32: native.F32, torch.bfloat16: native.BF16, torch.float16: native.F16}


class OffloadError(StalwartError):
    """The optimizer cannot handle these parameters or this state."""


@dataclass
class StepStats:
    """One step's plan, what the model predicted and what was measured (seconds)."""

    step: int
    plan: planner.Plan
    measured: dict[str, float] = field(default_factory=dict)  # update (wall), cpu, h2d, gpu, d2h
    # (subgroup, place, elements, predicted s, measured s)
    subgroups: list[tuple[int, str, int, float, float | None]] = field(default_factory=list)

    def describe(self) -> str:
        m = self.measured
        lines = [f"step {self.step}: " + self.plan.describe().replace("\n", "\n  "),
                 f"  measured update {m.get('update', 0) * 1e3:.2f} ms"
                 + "".join(f", {k} {m[k] * 1e3:.2f} ms" for k in ("cpu", "h2d", "gpu", "d2h") if k in m),
                 "  subgroup  place      elements   predicted ms  measured ms"]
        for i, place, n, pred, meas in sorted(self.subgroups):
            ms = "-" if meas is None else f"{meas * 1e3:.3f}"
            lines.append(f"  {i:8d}  {place:9s} {n:10d}   {pred * 1e3:12.3f}  {ms:>11s}")
        return "\n".join(lines)


class OffloadAdamW(torch.optim.Optimizer):
    """AdamW (or Adam, ``adamw=False``) with host-resident state and a native host kernel.

    Same hyper-parameters and defaults as ``torch.optim.AdamW``; ``amsgrad``,
    ``capturable`` and ``differentiable`` are not supported. Extra keywords:

    - ``subgroup_size``: elements per subgroup (the unit of placement and of host
      kernel calls; rounded up to a multiple of 1024).
    - ``threads``: host kernel threads (default: the CPUs this process may use).
    - ``numa``: ``"auto"`` (place buffers from the sysfs topology), ``"off"``, a
      :class:`~stalwart.offload.numa.NumaPlan` to use as is, or a dict of
      :func:`~stalwart.offload.numa.plan_placement` options (``local``,
      ``dram_budget``, ``reserve``) plus ``root`` (a sysfs node directory).
    - ``calibration``: a :class:`~stalwart.offload.planner.Calibration` to start from
      instead of measuring this machine.
    - ``grad_hooks``: (CUDA) copy each gradient to the host as backward produces it.
      Default: yes unless ``torch.distributed`` runs with more than one rank or the
      parameters are DTensors (then gradients are copied at ``step()``, after DDP/FSDP
      reduced them); :meth:`attach_ddp` gives DDP runs the overlap back.
    - ``resident_budget``: (CUDA) bytes of device memory that may keep subgroups'
      state between steps: ``"auto"`` (the headroom left at the peak of the last
      forward/backward) or a number.
    - ``placement``: ``"auto"`` (the planner decides every step), or fixed: ``"cpu"``,
      ``"gpu"`` or one of "cpu"/"gpu"/"resident" per subgroup (results are the same
      bits whatever the placement; this is for measurements and tests).

    :attr:`plan`, :attr:`stats` and :meth:`memory_report` show the decisions, the
    predicted and measured times, and the memory used.
    """

    def __init__(self, params, lr: float | torch.Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, amsgrad: bool = False, maximize: bool = False,
                 foreach: bool | None = None, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None, adamw: bool = True, subgroup_size: int = DEFAULT_SUBGROUP,
                 threads: int | None = None, numa: str | dict | NumaPlan = "auto",
                 calibration: planner.Calibration | None = None, grad_hooks: bool | None = None,
                 resident_budget: str | int = "auto", placement: str | list[str] = "auto") -> None:
        if amsgrad or capturable or differentiable:
            raise OffloadError("OffloadAdamW does not support amsgrad, capturable or differentiable")
        if not float(lr) >= 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not eps >= 0.0:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Invalid beta parameters: {betas}")
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=False, maximize=maximize,
                        foreach=foreach, capturable=False, differentiable=False, fused=fused)
        self._ready = False
        super().__init__(params, defaults)
        self.rule: UpdateRule = AdamRule(decoupled=adamw)
        self.subgroup_size = int(subgroup_size)
        self.placement = placement
        self._numa_spec = numa
        self.kernel = native.HostKernel(threads)
        self.device = self._param_device()
        self.calibration = calibration or calibrate(self.kernel, self.rule, self.device)
        self._gscale = 1.0
        self.history: collections.deque[tuple[int, float, float]] = collections.deque(maxlen=1000)
        self.stats: StepStats | None = None
        self._step_count = 0
        self._device_path = None
        if self.device.type == "cuda":
            from stalwart.offload.device import DevicePath

            self._device_path = DevicePath(self, grad_hooks, resident_budget)
        elif self.device.type != "cpu":
            raise OffloadError(f"parameters on {self.device} are not supported (CPU or CUDA)")
        self._build()
        self._ready = True

    # ------------------------------------------------------------ set-up

    def _param_device(self) -> torch.device:
        devices = {local_tensor(p).device for g in self.param_groups for p in g["params"]}
        if len(devices) > 1:
            raise OffloadError(f"parameters are on several devices ({sorted(map(str, devices))}); use one optimizer per device")
        return devices.pop() if devices else torch.device("cpu")

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        if getattr(self, "_ready", False):
            if self._param_device() != self.device:
                raise OffloadError("a new param group is on another device than the optimizer's parameters")
            self._build()

    @property
    def staging(self) -> bool:
        """Gradients are staged in host memory (parameters on a device)."""
        return self._device_path is not None

    def _costs(self, layout: Layout) -> list[planner.SubgroupCost]:
        state = 4 * len(self.rule.slots)
        out = []
        for sg in layout.subgroups:
            moved = state * (sg.stop - sg.start) + 4 * (sg.master[1] - sg.master[0])
            out.append(planner.SubgroupCost(sg.numel, moved, moved, sg.out_bytes if self.staging else 0, moved))
        return out

    def _build(self) -> None:
        """Lay out the parameters, allocate and bind the host buffers, point the state at
        them (carrying over any state the parameters already had)."""
        groups = [g["params"] for g in self.param_groups]
        for gi, params in enumerate(groups):
            for pi, p in enumerate(params):
                loc = local_tensor(p)
                if loc.dtype not in _DTYPES:
                    raise OffloadError(f"param group {gi}, param {pi}: dtype {loc.dtype} is not supported "
                                       "(float32, bfloat16, float16)")
                if not loc.is_contiguous():
                    raise OffloadError(f"param group {gi}, param {pi} (shape {tuple(p.shape)}) is not contiguous")
        layout = build_layout(groups, self.subgroup_size,
                              lambda p: self.staging or local_tensor(p).dtype != torch.float32, self.staging)
        self.costs = self._costs(layout)
        self.plan = self.replan()
        self.numa_plan = self._numa_plan(layout, self.plan)
        pin = self.staging
        slots = self.rule.slots
        sizes = {s: 4 * layout.total for s in slots}
        sizes["master"] = 4 * layout.master_total
        if self.staging:
            sizes["grad"] = layout.grad_total
        ranges = {s: [(4 * sg.start, 4 * sg.stop) for sg in layout.subgroups] for s in slots}
        ranges["master"] = [(4 * sg.master[0], 4 * sg.master[1]) for sg in layout.subgroups]
        ranges["grad"] = [sg.grad for sg in layout.subgroups]
        regions: dict[str, HostRegion] = {}
        for kind, size in sizes.items():
            if size:
                regions[kind] = self._allocate(kind, size, ranges[kind], pin)
        old_views = getattr(self, "_views", {})
        views: dict[int, dict[str, torch.Tensor]] = {}
        steps: list[torch.Tensor] = []
        for e in layout.entries:
            own = {s: regions[s].view(4 * e.offset, e.numel, torch.float32).view(e.shape) for s in slots}
            if e.master_offset is not None:
                own["master"] = regions["master"].view(4 * e.master_offset, e.numel, torch.float32).view(e.shape)
            views[id(e.param)] = {k: self._wrap(e.param, v) for k, v in own.items()}
            steps.append(torch.zeros((), dtype=torch.float32))
            st = self.state[e.param]
            previous = old_views.get(id(e.param), {})
            for k, v in views[id(e.param)].items():
                cur = st.get(k, previous.get(k))
                if cur is not None:
                    local_tensor(v).copy_(local_tensor(cur))
                elif k == "master":
                    local_tensor(v).copy_(local_tensor(e.param.detach()))
                st[k] = v
            if isinstance(st.get("step"), torch.Tensor):
                steps[-1].fill_(float(st["step"]))
            st["step"] = steps[-1]
        self.layout, self.regions, self._views, self._step_tensors = layout, regions, views, steps
        self._steps = [int(s) for s in steps]
        self._static_segments()
        if self._device_path is not None:
            self._device_path.build()

    def _wrap(self, param: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
        if local_tensor(param) is param:
            return view
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(view, param.device_mesh, param.placements, run_check=False,
                                  shape=param.shape, stride=param.stride())

    def replan(self, previous: list[str] | None = None) -> planner.Plan:
        """The plan for the next step: the planner's, or the fixed ``placement``."""
        cal = self._calibration_now()
        if self.placement == "auto":
            return planner.plan(self.costs, cal, previous=previous)
        places = [self.placement] * len(self.costs) if isinstance(self.placement, str) else list(self.placement)
        if len(places) != len(self.costs) or not set(places) <= set(planner.PLACES):
            raise OffloadError(f"placement must be 'auto' or one of {planner.PLACES} per subgroup "
                               f"({len(self.costs)} subgroups), not {self.placement!r}")
        if self._device_path is None and set(places) != {"cpu"}:
            raise OffloadError("placement on a device needs parameters on a CUDA device")
        return planner.fixed(self.costs, places, cal)

    def _calibration_now(self) -> planner.Calibration:
        if self._device_path is not None:
            return self._device_path.calibration_now()
        return self.calibration

    def _numa_plan(self, layout: Layout, plan: planner.Plan) -> NumaPlan | None:
        spec = self._numa_spec
        if spec in (None, "off"):
            return None
        if isinstance(spec, NumaPlan):
            return spec
        if spec != "auto" and not isinstance(spec, dict):
            raise OffloadError(f"numa must be 'auto', 'off', a NumaPlan or a dict of options, not {spec!r}")
        opts = dict(spec) if isinstance(spec, dict) else {}
        topo = Topology.from_sysfs(opts.pop("root", SYSFS_NODES))
        state_heat = {"cpu": 2.0, "gpu": 1.0, "resident": 0.5}  # CPU reads+writes count 1, DMA transfers 0.5
        uses = []
        for sg, place in zip(layout.subgroups, plan.placements):
            for kind in self.rule.slots:
                uses.append(BufferUse(f"{kind}/{sg.index}", 4 * (sg.stop - sg.start), state_heat[place]))
            if sg.master[1] > sg.master[0]:
                uses.append(BufferUse(f"master/{sg.index}", 4 * (sg.master[1] - sg.master[0]), state_heat[place]))
            if self.staging:
                uses.append(BufferUse(f"grad/{sg.index}", sg.grad[1] - sg.grad[0], 3.0 if place == "cpu" else 0.0))
        return plan_placement(uses, topo, **opts)

    def _allocate(self, kind: str, size: int, ranges: list[tuple[int, int]], pin: bool) -> HostRegion:
        extents: list[Extent] = []
        if self.numa_plan is not None:
            for i, (start, _) in enumerate(ranges):
                for e in self.numa_plan.for_buffer(f"{kind}/{i}"):
                    extents.append(Extent(kind, start + e.offset, e.length, e.nodes, e.mode, e.weights))
        try:
            return HostRegion(size, extents, pin=pin)
        except PinError as err:  # e.g. a low locked-memory limit: slower (synchronous) copies, same results
            warnings.warn(f"stalwart.offload: the {kind} buffer is not pinned: {err}", stacklevel=3)
            return HostRegion(size, extents, pin=False)
        except NumaError as err:
            if self._numa_spec != "auto":
                raise
            warnings.warn(f"stalwart.offload: NUMA binding of the {kind} buffer failed, left unbound: {err}",
                          stacklevel=3)
            self.numa_plan = None
            return HostRegion(size, [], pin=pin)

    def attach_ddp(self, ddp_model: torch.nn.Module) -> None:
        """Give a DDP run back the overlap of gradient copies with the backward pass (CUDA):
        a DDP comm hook copies each bucket's reduced gradients to the host as soon as its
        all-reduce finishes (otherwise, with more than one rank, they are copied at
        ``step()``). Replaces any comm hook the model had. Nothing to do for CPU
        parameters, which the host kernel reads in place."""
        if self._device_path is not None:
            self._device_path.attach_ddp(ddp_model)

    def _static_segments(self) -> None:
        """Segment fields that do not change between steps."""
        lay = self.layout
        segs = np.zeros(len(lay.pieces), native.SEG_DTYPE)
        s0, s1 = (self.regions[s].addr for s in self.rule.slots)
        master = self.regions["master"].addr if "master" in self.regions else 0
        grad = self.regions["grad"].addr if "grad" in self.regions else 0
        self._piece_entry = np.array([pc.entry for pc in lay.pieces], np.int64)
        self._piece_start = np.array([pc.start for pc in lay.pieces], np.int64)
        self._piece_has_master = np.zeros(len(lay.pieces), bool)
        for k, pc in enumerate(lay.pieces):
            e = lay.entries[pc.entry]
            size = e.dtype.itemsize
            segs[k]["s0"] = s0 + 4 * (e.offset + pc.start)
            segs[k]["s1"] = s1 + 4 * (e.offset + pc.start)
            segs[k]["n"] = pc.n
            segs[k]["odt"] = _DTYPES[e.dtype]
            if e.master_offset is not None:
                segs[k]["p"] = master + 4 * (e.master_offset + pc.start)
                self._piece_has_master[k] = True
            if self.staging:
                segs[k]["g"] = grad + e.grad_offset + pc.start * size
                segs[k]["gdt"] = _DTYPES[e.dtype]
                if e.dtype != torch.float32:
                    segs[k]["out"] = segs[k]["g"]  # weights out over the gradient they came from
        self._segments = segs
        self._subgroup_pieces = [np.array(sg.pieces, np.int64) for sg in lay.subgroups]
        self._itemsize = np.array([e.dtype.itemsize for e in lay.entries], np.int64)

    # ------------------------------------------------------------ state in and out

    def _adopt(self) -> None:
        """Copy state that someone else put into ``self.state`` (a checkpoint restore,
        ``load_state_dict``) into the host buffers and point the state back at them."""
        for i, e in enumerate(self.layout.entries):
            st = self.state[e.param]
            for k, own in self._views[id(e.param)].items():
                cur = st.get(k)
                if cur is own:
                    continue
                if cur is None:
                    if k == "master":
                        local_tensor(own).copy_(local_tensor(e.param.detach()))
                    else:
                        local_tensor(own).zero_()
                else:
                    src = local_tensor(cur)
                    if src.numel() != e.numel:
                        raise OffloadError(f"{e.name}: state slot {k!r} has {src.numel()} elements, expected {e.numel}")
                    local_tensor(own).copy_(src.reshape(e.shape))
                st[k] = own
            cur = st.get("step")
            if cur is not self._step_tensors[i]:
                value = float(cur) if cur is not None else 0.0
                self._step_tensors[i].fill_(value)
                self._steps[i] = int(value)
                st["step"] = self._step_tensors[i]
            extra = set(st) - set(self._views[id(e.param)]) - {"step"}
            if extra:
                raise OffloadError(f"{e.name}: optimizer state has slots {sorted(extra)} that OffloadAdamW does not use "
                                   "(state of another optimizer, e.g. amsgrad?)")
        if self._device_path is not None:
            self._device_path.invalidate_resident()

    def state_dict(self) -> dict:
        self._adopt()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        """Like ``torch.optim.Optimizer.load_state_dict`` but keeps the state in fp32 (torch
        would cast it to the parameters' dtype) and copies it into the host buffers."""
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        if any(len(g["params"]) != len(s["params"]) for g, s in zip(self.param_groups, groups)):
            raise ValueError("loaded state dict contains a parameter group that doesn't match the size of optimizer's group")
        index = {}
        for g, s in zip(self.param_groups, groups):
            index.update(zip(s["params"], g["params"]))
            for k, v in s.items():
                if k != "params":
                    g[k] = v
        for key, slots in state_dict["state"].items():
            p = index[key]
            self.state[p] = dict(slots)
        self._adopt()

    # ------------------------------------------------------------ gradients

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False) -> torch.Tensor:
        """Clip like ``torch.nn.utils.clip_grad_norm_`` over this optimizer's parameters,
        without writing the gradients: the factor is applied inside the next update.
        Returns the total norm. Sharded (DTensor) gradients are reduced over their mesh."""
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return torch.tensor(0.0)
        norm_type = float(norm_type)
        locs = [local_tensor(g) for g in grads]
        norms = torch.stack([torch.linalg.vector_norm(g, norm_type, dtype=torch.float32) for g in locs])
        sharded = any(local_tensor(g) is not g for g in grads)
        if sharded:
            import torch.distributed as dist

            if math.isinf(norm_type):
                total = norms.max()
                dist.all_reduce(total, op=dist.ReduceOp.MAX, group=grads[0].device_mesh.get_group())
            else:
                total = (norms ** norm_type).sum()
                dist.all_reduce(total, group=grads[0].device_mesh.get_group())
                total = total ** (1.0 / norm_type)
        else:
            total = torch.linalg.vector_norm(norms, norm_type)
        if error_if_nonfinite and not torch.isfinite(total):
            raise RuntimeError(f"The total norm of order {norm_type} for gradients is non-finite, so it cannot be clipped")
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        self._gscale = float(coef)
        return total

    # ------------------------------------------------------------ the update

    def _rows(self, active: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """The scalar table and each entry's row in it (-1: no update this step)."""
        gscale = f32(self._gscale)
        keys: dict[tuple[int, int], int] = {}
        rows = []
        row_of = np.full(len(self.layout.entries), -1, np.int32)
        for i in active:
            e = self.layout.entries[i]
            key = (e.group, self._steps[i] + 1)
            if key not in keys:
                keys[key] = len(rows)
                rows.append(self.rule.scalars(self.param_groups[e.group], key[1], gscale))
            row_of[i] = keys[key]
        table = np.array(rows, dtype=self.rule.scalar_dtype) if rows else np.zeros(0, self.rule.scalar_dtype)
        return table, row_of

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._adopt()
        grads: list[torch.Tensor | None] = []
        active = []
        for i, e in enumerate(self.layout.entries):
            g = e.param.grad
            if g is not None:
                g = local_tensor(g)
                if g.is_sparse:
                    raise OffloadError(f"{e.name}: sparse gradients are not supported")
                if g.shape != e.shape:
                    raise OffloadError(f"{e.name}: gradient shape {tuple(g.shape)} is not the parameter's {e.shape}")
                active.append(i)
            grads.append(g)
        table, row_of = self._rows(active)
        self._gscale = 1.0
        t0 = time.perf_counter()
        if self._device_path is not None:
            self.stats = self._device_path.step(grads, table, row_of)
        else:
            self.stats = self._cpu_step(grads, table, row_of)
        self.stats.measured["update"] = time.perf_counter() - t0
        if active:
            torch._foreach_add_([self._step_tensors[i] for i in active], 1.0)
            for i in active:
                self._steps[i] += 1
        self._step_count += 1
        self.history.append((self._step_count, self.stats.plan.predicted.makespan, self.stats.measured["update"]))
        return loss

    def _pieces_for(self, sub: int, row_of: np.ndarray) -> np.ndarray:
        idx = self._subgroup_pieces[sub]
        return idx[row_of[self._piece_entry[idx]] >= 0]

    def _cpu_step(self, grads: list[torch.Tensor | None], table: np.ndarray, row_of: np.ndarray) -> StepStats:
        lay = self.layout
        keep = []  # contiguous copies of non-contiguous gradients, alive until the kernel ran
        n_ent = len(lay.entries)
        pptr, gptr, gdt = np.zeros(n_ent, np.uint64), np.zeros(n_ent, np.uint64), np.zeros(n_ent, np.int32)
        gsize = np.zeros(n_ent, np.int64)
        for i, (e, g) in enumerate(zip(lay.entries, grads)):
            p = local_tensor(e.param)
            if not p.is_contiguous():
                raise OffloadError(f"{e.name} is no longer contiguous")
            pptr[i] = p.data_ptr()
            if g is None:
                continue
            if g.dtype not in _DTYPES:
                raise OffloadError(f"{e.name}: gradient dtype {g.dtype} is not supported")
            if not g.is_contiguous():
                g = g.contiguous()
                keep.append(g)
            gptr[i], gdt[i], gsize[i] = g.data_ptr(), _DTYPES[g.dtype], g.element_size()
        segs = self._segments.copy()
        ent, start = self._piece_entry, self._piece_start
        param_at = pptr[ent] + (start * self._itemsize[ent]).astype(np.uint64)
        segs["g"] = gptr[ent] + (start * gsize[ent]).astype(np.uint64)
        segs["gdt"] = gdt[ent]
        segs["scal"] = row_of[ent]
        # A param that is its own master is updated in place; others get their new weights written out.
        segs["p"] = np.where(self._piece_has_master, segs["p"], param_at)
        segs["out"] = np.where(self._piece_has_master, param_at, 0)
        cal = self.calibration
        stats = StepStats(self._step_count + 1, self.plan)
        done = seconds = 0.0
        for sg in lay.subgroups:
            idx = self._pieces_for(sg.index, row_of)
            n = int(segs["n"][idx].sum())
            t = time.perf_counter()
            if len(idx):
                self.kernel.step(self.rule.rule_id, np.ascontiguousarray(segs[idx]), table)
            dt = time.perf_counter() - t
            done, seconds = done + n, seconds + dt
            stats.subgroups.append((sg.index, "cpu", n, n / cal.cpu_rate, dt))
        stats.measured["cpu"] = seconds
        del keep
        self.calibration = planner.refit(cal, {"cpu": (done, seconds)})
        self.plan = self.replan()
        return stats

    # ------------------------------------------------------------ reports

    def memory_report(self) -> dict:
        """Bytes this optimizer holds in host memory (by buffer) and on the device, the
        model's own host bytes (CPU parameters and their gradients), and the total host
        bytes per parameter."""
        n = sum(e.numel for e in self.layout.entries)
        host = {k: r.size for k, r in self.regions.items()}
        model_host = 0
        if not self.staging:
            model_host = sum(e.numel * e.dtype.itemsize * 2 for e in self.layout.entries)  # weights + gradients
        device = self._device_path.device_bytes() if self._device_path is not None else {}
        total_host = sum(host.values()) + model_host
        return {"params": n, "host_bytes": host, "optimizer_host_bytes": sum(host.values()),
                "model_host_bytes": model_host, "host_bytes_per_param": total_host / n if n else 0.0,
                "device_bytes": device, "numa": self.numa_plan.bytes_by_node() if self.numa_plan else None}

    def describe(self) -> str:
        """The current plan, the last step's measurements and the NUMA placement."""
        parts = [self.plan.describe()]
        if self.stats is not None:
            parts.append(self.stats.describe())
        if self.numa_plan is not None:
            parts.append(self.numa_plan.describe())
        return "\n".join(parts)

    def close(self) -> None:
        """Stop the host kernel threads (also done when the optimizer is collected)."""
        if self._device_path is not None:
            self._device_path.close()
        self.kernel.close()


class OffloadAdam(OffloadAdamW):
    """Adam (L2 penalty added to the gradient) with the same machinery as :class:`OffloadAdamW`."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, **kwargs) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, adamw=False, **kwargs)
