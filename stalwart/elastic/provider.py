"""The elastic loader's position in every snapshot: a small rank-independent JSON object.

:meth:`stalwart.elastic.ElasticLoader.stalwart_provider` makes one when the loop calls
``guard.resume(loader)``; the guard stores its state with each snapshot (rank 0's objects)
and hands the restored step's back, so iteration continues at the next global step at
any data-parallel degree.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping

import torch

from stalwart.ckpt.providers.base import Collected, RestoreContext, StateProvider
from stalwart.elastic.data import ElasticBatchError, ElasticLoader, GlobalBatch
from stalwart.formats.layout import Mesh

KEY = "elastic_data"


class ElasticDataProvider(StateProvider):
    """State provider of one :class:`ElasticLoader` (``source``)."""

    name = KEY

    def __init__(self, loader: ElasticLoader) -> None:
        self.source = loader

    def collect(self, mesh: Mesh, rank: int) -> Collected:
        return Collected(objects={KEY: self.source.state_dict()})

    def targets(self, ctx: RestoreContext) -> Collected:
        return Collected()

    def restore(self, tensors: Mapping[str, torch.Tensor], ctx: RestoreContext) -> None:
        state = ctx.objects.get(KEY)
        if state is None:
            if ctx.step:
                warnings.warn(f"step {ctx.step} was saved without an elastic loader's position: the loader starts at"
                              " the beginning of its data", stacklevel=2)
            return
        self.source.load_state_dict(state)


def check_node_range(loader: ElasticLoader, nodes: int, nnodes: str | None = None) -> None:
    """Refuse, before training starts, a global batch that some node count the launcher may
    re-form the job at cannot keep (``STALWART_NNODES``, ``MIN:MAX``, set by the plugin).

    ``nodes`` is the current node count; the data-parallel ranks per node are assumed to stay
    what they are now (``loader.dp_size / nodes``)."""
    nnodes = nnodes if nnodes is not None else os.environ.get("STALWART_NNODES")
    if not nnodes or nodes < 1 or loader.dp_size % nodes:
        return
    lo, hi = (int(x) for x in nnodes.split(":"))
    per_node = loader.dp_size // nodes
    g, m = loader.sampler.global_batch, loader.sampler.micro_batch
    bad = []
    for n in range(lo, hi + 1):
        try:
            GlobalBatch(g, m, n * per_node)
        except ElasticBatchError:
            bad.append(n)
    if bad:
        good = [n for n in range(lo, hi + 1) if n not in bad]
        raise ElasticBatchError(
            f"--nnodes={lo}:{hi} with {per_node} data-parallel rank(s) per node cannot keep the global batch {g}"
            f" (micro-batch {m}) at {', '.join(map(str, bad))} node(s)"
            + (f"; node counts that keep it: {', '.join(map(str, good))}" if good else "; no node count in the range keeps it")
            + ". Change --nnodes, the global batch or the micro-batch.")
