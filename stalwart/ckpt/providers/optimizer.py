"""Any torch optimizer: every per-param state slot, hyper-parameters, param groups."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from stalwart.ckpt.providers.base import Collected, Item, RestoreContext, StateProvider
from stalwart.ckpt.providers.module import _is_dtensor, dtensor_placement, unwrap
from stalwart.errors import LayoutError
from stalwart.formats.layout import Mesh, Replicated, TensorSpec
from stalwart.formats.tree import decode_value, encode_value


def slot_name(fqn: str, slot: str, prefix: str = "") -> str:
    return f"{prefix}optim.{fqn}.{slot}"


class OptimizerProvider(StateProvider):
    """Stores ``optim.<param>.<slot>`` for every tensor slot of every param (exp_avg,
    exp_avg_sq, max_exp_avg_sq, momentum_buffer, step, ...) under the param's own
    placement (slots shaped like their param) or replicated (scalars such as
    ``step``); hyper-parameters and non-tensor slots go to the ``optimizer`` object.
    """

    name = "optimizer"

    def __init__(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module, prefix: str = "") -> None:
        self.optimizer = optimizer
        self.model = unwrap(model)
        self.prefix = prefix
        self._fqn_cache: dict[int, str] = {}
        self._cache: tuple | None = None

    def _fqns(self) -> dict[int, str]:
        """Param identity -> name; rebuilt only when the optimizer holds a param it has not seen."""
        known = self._fqn_cache
        if all(id(p) in known for g in self.optimizer.param_groups for p in g["params"]):
            return known
        out: dict[int, str] = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            out.setdefault(id(p), name)
        self._fqn_cache = out
        return out

    def _groups(self, fqns: dict[int, str]) -> list[dict]:
        groups = []
        for g in self.optimizer.param_groups:
            names = []
            for p in g["params"]:
                if id(p) not in fqns:
                    raise LayoutError("the optimizer holds a parameter that is not part of the model")
                names.append(fqns[id(p)])
            groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": names})
        return groups

    def collect(self, mesh: Mesh, rank: int) -> Collected:
        fqns = self._fqns()
        fingerprint = (mesh, tuple((id(p), k, id(v)) for p, st in self.optimizer.state.items() for k, v in st.items()))
        if self._cache is not None and self._cache[0] == fingerprint:
            items = self._cache[1]
        else:
            items = self._items(mesh, fqns)
            self._cache = (fingerprint, items)
        scalars: dict[str, dict] = {}
        for p, state in self.optimizer.state.items():
            fqn = fqns.get(id(p))
            if fqn is not None:
                for slot, value in state.items():
                    if not isinstance(value, torch.Tensor):
                        scalars.setdefault(fqn, {})[slot] = value
        objects = {
            "optimizer": {
                "class": type(self.optimizer).__name__,
                "param_groups": encode_value(self._groups(fqns)),
                "scalars": encode_value(scalars),
            }
        }
        return Collected(items=items, objects=objects)

    def _items(self, mesh: Mesh, fqns: dict[int, str]) -> list[Item]:
        """One item per tensor slot (rebuilt only when the optimizer's state tensors change)."""
        out: list[Item] = []
        for p, state in self.optimizer.state.items():
            fqn = fqns.get(id(p))
            if fqn is None:
                continue
            for slot, value in state.items():
                if isinstance(value, torch.Tensor):
                    if _is_dtensor(value):
                        shape, placement, local = dtensor_placement(value, mesh)
                    else:
                        shape, placement, local = tuple(value.shape), Replicated(), value
                    spec = TensorSpec(slot_name(fqn, slot, self.prefix), shape, value.dtype, placement,
                                      role="optimizer_slot", param=fqn, slot=slot)
                    out.append(Item(spec, local, lazy=True))
        return out

    def targets(self, ctx: RestoreContext) -> Collected:
        """Slots the checkpoint holds for current params, placed like the param is now."""
        out = Collected()
        params = {n: p for n, p in self.model.named_parameters()}
        for name, spec in ctx.saved.items():
            if spec.role != "optimizer_slot" or spec.param not in params or not name.startswith(self.prefix + "optim."):
                continue
            p = params[spec.param]
            if _is_dtensor(p) and spec.shape == tuple(p.shape):
                _, placement, local = dtensor_placement(p.data, ctx.mesh)
                local = torch.empty(local.shape, dtype=spec.dtype)
            else:
                placement, local = Replicated(), torch.empty(spec.shape, dtype=spec.dtype)
            out.items.append(Item(TensorSpec(name, spec.shape, spec.dtype, placement, role="optimizer_slot",
                                             param=spec.param, slot=spec.slot), local, lazy=True))
        return out

    def restore(self, tensors: Mapping[str, torch.Tensor], ctx: RestoreContext) -> None:
        saved = ctx.objects.get("optimizer")
        if saved is None:
            raise LayoutError("the checkpoint has no optimizer state")
        if saved.get("class") != type(self.optimizer).__name__:
            raise LayoutError(f"the checkpoint holds {saved.get('class')} state; the optimizer is {type(self.optimizer).__name__}")
        groups = decode_value(saved["param_groups"])
        scalars = decode_value(saved["scalars"])
        if len(groups) != len(self.optimizer.param_groups):
            raise LayoutError(f"the checkpoint has {len(groups)} param groups; the optimizer has {len(self.optimizer.param_groups)}")
        params = dict(self.model.named_parameters())
        fqns = self._fqns()
        for live, stored in zip(self.optimizer.param_groups, groups):
            names = [fqns[id(p)] for p in live["params"]]
            if names != stored["params"]:
                raise LayoutError("the optimizer's param groups list other parameters than the checkpoint's")
            for k, v in stored.items():
                if k != "params":
                    live[k] = v
        capturable = {id(p): bool(g.get("capturable") or g.get("fused")) for g in self.optimizer.param_groups for p in g["params"]}
        self.optimizer.state.clear()
        # Fill the state in the optimizer's own parameter order (as its first step did).
        position = {id(p): i for i, p in enumerate(q for g in self.optimizer.param_groups for q in g["params"])}
        ordered = sorted(tensors.items(), key=lambda kv: (position.get(id(params[ctx.saved[kv[0]].param]), 1 << 30), kv[0]))
        for name, local in ordered:
            spec = ctx.saved[name]
            p = params[spec.param]
            on_param_device = spec.slot != "step" or capturable.get(id(p), False)
            device = (p.to_local() if _is_dtensor(p) else p).device if on_param_device else torch.device("cpu")
            value = local.to(device=device, copy=True)  # own the memory: loaded tensors may alias files
            if _is_dtensor(p) and spec.shape == tuple(p.shape):
                from torch.distributed.tensor import DTensor

                value = DTensor.from_local(value, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
            self.optimizer.state[p][spec.slot] = value
        for fqn, slots in scalars.items():
            if fqn in params:
                self.optimizer.state[params[fqn]].update(slots)
