"""Any torch optimizer: every per-param state slot, hyper-parameters, param groups."""

from __future__ import annotations

import operator
from collections.abc import Mapping

import torch

from stalwart.ckpt.providers.base import Collected, DictEntries, Item, RestoreContext, StateProvider
from stalwart.ckpt.providers.module import _is_dtensor, dtensor_placement, unwrap
from stalwart.errors import LayoutError
from stalwart.formats.layout import Mesh, Replicated, TensorSpec
from stalwart.formats.tree import decode_value, encode_value


def _plain(v) -> bool:
    """A value whose repr identifies it (compared by repr to skip encoding it again)."""
    if type(v) in (tuple, list):
        return all(map(_plain, v))
    return v is None or type(v) in (bool, int, float, str)


def slot_name(fqn: str, slot: str, prefix: str = "") -> str:
    return f"{prefix}optim.{fqn}.{slot}"


class _StateSeen:
    """The optimizer state the cached items were made from, checked cheaply at every
    snapshot (C-level maps, identity comparisons): the same params hold the same slot
    dicts with the same values, and every tensor keeps its size. A new state entry, a
    replaced tensor (load_state_dict, a reset) or one resized in place is noticed."""

    def __init__(self, mesh: Mesh, state: Mapping, items: list[Item], scalar_slots: list) -> None:
        self.mesh, self.items, self.scalar_slots = mesh, items, scalar_slots
        self.params = list(state)
        self.entries = DictEntries(state.values())
        self.tensors = [v for v in self.entries.values if isinstance(v, torch.Tensor)]
        self.sizes = list(map(torch.Tensor.numel, self.tensors))

    def unchanged(self, state: Mapping) -> bool:
        is_ = operator.is_
        return (len(state) == len(self.params) and all(map(is_, state, self.params))
                and all(map(is_, state.values(), self.entries.dicts)) and self.entries.unchanged()
                and list(map(torch.Tensor.numel, self.tensors)) == self.sizes)


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
        self._cache: _StateSeen | None = None
        self._names_cache: dict[tuple, dict] = {}  # a group's param ids -> its encoded param names
        self._names_for: dict[int, str] | None = None  # the name map _names_cache was made with
        self._hyper: tuple | None = None  # (repr of the groups' hyper-parameters, group count, their encoding)

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

    def _groups(self, fqns: dict[int, str], param_groups: list[dict] | None = None) -> list[dict]:
        groups = []
        for g in self.optimizer.param_groups if param_groups is None else param_groups:
            names = []
            for p in g["params"]:
                if id(p) not in fqns:
                    raise LayoutError("the optimizer holds a parameter that is not part of the model")
                names.append(fqns[id(p)])
            groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": names})
        return groups

    def collect(self, mesh: Mesh, rank: int) -> Collected:
        fqns = self._fqns()
        # identities of the state's values and the tensors' sizes: a new state entry, a
        # replaced tensor (load_state_dict, a reset) or one resized in place is noticed
        state = self.optimizer.state
        cache = self._cache
        if cache is not None and cache.mesh == mesh and cache.unchanged(state):
            items, scalar_slots = cache.items, cache.scalar_slots
        else:
            items = self._items(mesh, fqns)
            scalar_slots = [(p, fqns[id(p)], k) for p, st in self.optimizer.state.items() if id(p) in fqns
                            for k, v in st.items() if not isinstance(v, torch.Tensor)]
            self._cache = _StateSeen(mesh, state, items, scalar_slots)
        scalars: dict[str, dict] = {}
        for p, fqn, slot in scalar_slots:  # values may change every step; which slots exist is in the fingerprint
            scalars.setdefault(fqn, {})[slot] = self.optimizer.state[p][slot]
        objects = {
            "optimizer": {
                "class": type(self.optimizer).__name__,
                "param_groups": self._encoded_groups(fqns),
                "scalars": encode_value(scalars),
            }
        }
        return Collected(items=items, objects=objects)

    def _encoded_groups(self, fqns: dict[int, str]) -> dict:
        """``encode_value(self._groups(fqns))``, with each group's list of parameter names
        encoded once (hyper-parameters such as ``lr`` may change every step; the params rarely)."""
        groups = self.optimizer.param_groups
        hyper = [[(k, v) for k, v in g.items() if k != "params"] for g in groups]
        # hyper-parameters that are plain values are compared, not encoded again (a tensor lr is
        # encoded every time: its value can change in place)
        key = repr(hyper) if all(_plain(v) for h in hyper for _, v in h) else None
        if key is not None and self._hyper is not None and self._hyper[0] == key and self._hyper[1] == len(groups):
            tree = self._hyper[2]
        else:
            tree = encode_value([{**dict(h), "params": None} for h in hyper])
            self._hyper = (key, len(groups), tree) if key is not None else None
        tree = {**tree, "v": [{**node, "v": list(node["v"])} for node in tree["v"]]}  # the cached tree stays intact
        cache = self._names_cache
        if self._names_for is not fqns:  # parameter names were looked up again
            cache.clear()
            self._names_for = fqns
        for g, node in zip(groups, tree["v"]):
            ids = tuple(map(id, g["params"]))
            names = cache.get(ids)
            if names is None:
                if len(cache) >= 64:
                    cache.clear()
                names = cache[ids] = encode_value(self._groups(fqns, [g])[0]["params"])
            node["v"][-1] = names  # "params" is the group's last key, as in _groups
        return tree

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
