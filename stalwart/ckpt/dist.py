"""Where this process sits in the job, and process groups that survive restarts.

torchrun restarts workers in place (``--max-restarts``); a gloo group re-created on
the agent's store then often fails with ``Connection refused`` because stale peer
addresses from the previous attempt are still in the store. Building every group
on a store prefixed with ``TORCHELASTIC_RESTART_COUNT`` avoids that (16/16 restarts
here, against 1/5 without); :func:`init_distributed` does it for the user's own
group and :func:`side_group` for stalwart's.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class Placement:
    """This process's coordinates: global rank/world and node (keeper) membership."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    num_nodes: int
    restart_count: int
    keeper_slot: int = -1  # this node's position in the job's keeper group (stable across re-forms)
    keeper_slots: int = 0  # positions in the keeper group (the launcher's maximum node count)
    active_slots: tuple[int, ...] = ()  # the keeper slots serving trainers in this run, in node order
    node_id: str | None = None  # the launcher's stable identity of this node (its keeper's memory)
    slot_ids: tuple[str, ...] = ()  # the launcher: the keeper expected in every slot this round (stand-ins included)

    @property
    def local_ranks(self) -> list[int]:
        """Global ranks served by this node's keeper (torchrun numbers ranks node-major)."""
        first = self.rank - self.local_rank
        return list(range(first, first + self.local_world_size))


def _env_int(*names: str, default: int) -> int:
    for n in names:
        v = os.environ.get(n)
        if v not in (None, ""):
            return int(v)
    return default


def where_am_i() -> Placement:
    """Coordinates from torch.distributed (if initialised) and the launcher's environment.

    ``STALWART_NODE_RANK`` / ``STALWART_NUM_NODES`` / ``STALWART_LOCAL_WORLD_SIZE``
    override the node grouping (tests use them to stand several "nodes" on one host).
    """
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank = _env_int("RANK", default=0)
        world = _env_int("WORLD_SIZE", default=1)
    local_world = _env_int("STALWART_LOCAL_WORLD_SIZE", "LOCAL_WORLD_SIZE", default=world)
    local_rank = rank % local_world
    node = _env_int("STALWART_NODE_RANK", default=rank // local_world)
    nodes = _env_int("STALWART_NUM_NODES", default=max(1, world // local_world))
    slot = _env_int("STALWART_KEEPER_SLOT", default=node)
    slots = _env_int("STALWART_KEEPER_SLOTS", default=nodes)
    active = os.environ.get("STALWART_ACTIVE_SLOTS")
    active_slots = tuple(int(x) for x in active.split(",")) if active else tuple(range(nodes))
    ids = os.environ.get("STALWART_SLOT_IDS")
    return Placement(rank, world, local_rank, local_world, node, nodes, restart_count(), slot, slots, active_slots,
                     os.environ.get("STALWART_NODE_ID") or None, tuple(ids.split(",")) if ids else ())


def in_process() -> bool:
    """Whether this worker runs under in-process recovery (:func:`stalwart.elastic.inprocess.run`)."""
    return "STALWART_INPROC_EPOCH" in os.environ


def restart_count() -> int:
    """A number every worker of one (re)start of the job agrees on.

    torchrun's ``TORCHELASTIC_RESTART_COUNT`` is counted per agent: after a membership
    change the agents' workers disagree on it (and gloo then times out on stale keys).
    Under stalwart's rendezvous the round number, the same for every node, is used."""
    return _env_int("STALWART_RDZV_ROUND", "TORCHELASTIC_RESTART_COUNT", default=0)


def attempt_tag() -> str:
    """A name every worker of one formation of the job's groups agrees on: the restart
    count, plus the in-process recovery epoch (:mod:`stalwart.elastic.inprocess`) once
    survivors re-formed their groups without a restart."""
    epoch = os.environ.get("STALWART_INPROC_EPOCH", "")
    return f"{restart_count()}" if epoch in ("", "0") else f"{restart_count()}.{epoch}"


_JOB_STORE: dist.Store | None = None


def set_job_store(store: dist.Store) -> None:
    """Use ``store`` for stalwart's side groups (in-process recovery: the rendezvous store,
    which outlives any worker, instead of the one worker rank 0 may host)."""
    global _JOB_STORE
    _JOB_STORE = store


def agent_store(timeout_s: float = 60.0) -> dist.Store:
    """The job's TCPStore at MASTER_ADDR / MASTER_PORT.

    torchrun's agent hosts it when it shares its rendezvous store with the workers
    (``TORCHELASTIC_USE_AGENT_STORE=True``); otherwise worker rank 0 does, and the store
    :func:`init_distributed` created is reused for stalwart's side groups.
    """
    if _JOB_STORE is not None:
        return _JOB_STORE
    return dist.TCPStore(
        os.environ.get("MASTER_ADDR", "127.0.0.1"),
        int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def _job_store(rank: int, world: int, timeout_s: float) -> dist.Store:
    global _JOB_STORE
    if _JOB_STORE is None:
        host = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true" and rank == 0
        _JOB_STORE = dist.TCPStore(os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ["MASTER_PORT"]), world,
                                   is_master=host, timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)
    return _JOB_STORE


def init_distributed(backend: str = "gloo", timeout_s: float = 300.0) -> None:
    """``init_process_group`` that also works after torchrun restarts the workers.

    Uses the launcher's store under a prefix named after the restart count. Without
    a launcher (no ``MASTER_PORT``), a single-process group is not created.
    """
    if dist.is_initialized() or "MASTER_PORT" not in os.environ:
        return
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    store = dist.PrefixStore(f"attempt{attempt_tag()}", _job_store(rank, world, timeout_s))
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))


def side_group(name: str, timeout_s: float = 300.0):
    """A gloo group over all ranks, separate from training, built on a restart-safe store.

    Used for stalwart's own (rare, never per-step) agreements such as choosing the
    step to restore. Returns None in a single process.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    if "MASTER_PORT" not in os.environ:
        return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
    store = dist.PrefixStore(f"stalwart/{name}/attempt{attempt_tag()}", agent_store(timeout_s))
    backend_cls = dist.ProcessGroupGloo
    opts = backend_cls._Options() if hasattr(backend_cls, "_Options") else None
    rank, world = dist.get_rank(), dist.get_world_size()
    if opts is not None:
        opts._timeout = datetime.timedelta(seconds=timeout_s)
        opts._devices = [backend_cls.create_default_device()]
        return backend_cls(store, rank, world, opts)
    return backend_cls(store, rank, world, datetime.timedelta(seconds=timeout_s))
