"""LR schedulers and user objects with ``state_dict()`` / ``load_state_dict()``."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from stalwart.ckpt.providers.base import Collected, Item, RestoreContext, StateProvider
from stalwart.errors import LayoutError
from stalwart.formats.layout import Mesh, Replicated, TensorSpec
from stalwart.formats.tree import flatten, unflatten


class StatefulProvider(StateProvider):
    """One object with ``state_dict()``/``load_state_dict()`` (a scheduler, a user object).

    Tensors in its state become replicated items ``<key>.<path>`` (copied eagerly:
    stalwart cannot know when the object changes them); everything else goes to the
    JSON object ``<key>``, structure preserved exactly.
    """

    def __init__(self, key: str, obj) -> None:
        if not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
            raise TypeError(f"{key}: {type(obj).__name__} has no state_dict()/load_state_dict()")
        self.name = key
        self.key = key
        self.obj = obj

    def collect(self, mesh: Mesh, rank: int) -> Collected:
        tensors, tree = flatten(self.obj.state_dict(), prefix=self.key)
        out = Collected(objects={self.key: tree})
        for name, t in tensors.items():
            out.items.append(Item(TensorSpec(name, tuple(t.shape), t.dtype, Replicated()), t.detach(), lazy=False))
        return out

    def targets(self, ctx: RestoreContext) -> Collected:
        tree = ctx.objects.get(self.key)
        out = Collected()
        if tree is None:
            return out
        for name in _tensor_names(tree):
            spec = ctx.saved.get(name)
            if spec is None:
                raise LayoutError(f"{self.key}: the checkpoint lacks tensor {name!r}")
            out.items.append(Item(TensorSpec(name, spec.shape, spec.dtype, Replicated()), torch.empty(spec.shape, dtype=spec.dtype), lazy=False))
        return out

    def restore(self, tensors: Mapping[str, torch.Tensor], ctx: RestoreContext) -> None:
        tree = ctx.objects.get(self.key)
        if tree is None:
            raise LayoutError(f"the checkpoint has no state for {self.key!r}")
        self.obj.load_state_dict(unflatten(tree, tensors))


def _tensor_names(tree: Mapping) -> list[str]:
    kind = tree.get("t")
    if kind == "tensor":
        return [tree["name"]]
    if kind in ("dict", "list", "tuple"):
        return [n for child in tree["v"] for n in _tensor_names(child)]
    return []
