"""``torchrun --rdzv-backend=stalwart``: torch's dynamic rendezvous with stalwart's node services.

The rendezvous state machine is torch's own (:class:`DynamicRendezvousHandler` over the
c10d TCPStore backend, exactly what ``--rdzv-backend=c10d`` runs), with defaults for
fast re-forms (a lost node drops out after ~3 s of missed keep-alives, a round closes
1 s after the minimum is reached instead of 30 s) and, at every round, what stalwart
adds on the agent side of each node (this handler runs inside torchrun's agent):

* a stable node identity and keeper slot (:mod:`stalwart.launchers.membership`), so
  restarted workers - whatever rank numbers they get - find their node's keeper and its
  memory snapshots; the keeper lives as long as the agent, across worker restarts;
* the environment the workers' ``protect()`` reads to join this node's keeper, the
  job's keeper group (over the rendezvous store) and a rendezvous-wide restart round;
* stand-in keepers for lost nodes' slots (with erasure coding) and reclaiming the
  shared memory that dead nodes' keepers left on this host (:mod:`.node`).

Registered through the ``torchrun.handlers`` entry point (see pyproject.toml). The
rendezvous store lives in the agent whose host matches ``--rdzv-endpoint`` (torch's
c10d rule); if that node dies, the job ends as it would with ``c10d`` - run the store
on a machine outside the job (``stalwart store``) to survive any node's loss.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from datetime import timedelta

from torch.distributed import PrefixStore
from torch.distributed.elastic.rendezvous import (
    RendezvousError,
    RendezvousHandler,
    RendezvousInfo,
    RendezvousParameters,
    RendezvousStoreInfo,
)

from stalwart.launchers.membership import Membership, assign_slots, new_node_id, restart_key

log = logging.getLogger("stalwart.launchers")

#: rdzv-conf defaults stalwart changes (``--rdzv-conf key=value`` overrides any of them).
FAST_DEFAULTS = {
    "last_call_timeout": 1,  # torch: 30 s - how long a round stays open once MIN nodes joined
    "keep_alive_interval": 1,  # torch: 5 s - agent heartbeat into the rendezvous state
    # torch: 3 - a node silent for interval x attempts is dropped: a lost node is noticed in 2 s
    # (torch takes whole seconds; 1 x 1 would drop live agents that a busy host stalls for a second)
    "keep_alive_max_attempt": 2,
    "close_timeout": 10,  # torch: 30 s
}


ROUND_KEYS_TIMEOUT_S = 60.0  # every node of a formed round publishes its identity at once


def handler_factory():
    """The ``torchrun.handlers`` entry point: returns the creator torch registers."""
    return create_handler


def _agent_logging() -> None:
    """torchrun configures only torch's loggers; show stalwart's agent-side events the same way
    (``LOGLEVEL``, as torchrun reads it; warnings and errors always)."""
    root = logging.getLogger("stalwart")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[stalwart %(levelname)s %(asctime)s] %(message)s"))
        root.addHandler(handler)
        root.setLevel(os.environ.get("LOGLEVEL", "WARNING").upper())


def create_handler(params: RendezvousParameters) -> StalwartRendezvousHandler:
    _agent_logging()
    from torch.distributed.elastic.rendezvous import dynamic_rendezvous
    from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import create_backend

    for key, value in FAST_DEFAULTS.items():
        if params.get(key) is None:
            params.config[key] = value
    # torch's shared bootstrap store breaks when membership changes: a node joining a later round waits
    # for a MASTER_ADDR that a rank 0 which already has its store never writes again (60 s, then it fails).
    # Without sharing, rank 0 publishes the workers' master address every round.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    backend, store = create_backend(params)
    inner = dynamic_rendezvous.create_handler(store, backend, params)
    host, port = _endpoint(params)
    return StalwartRendezvousHandler(inner, store, params.run_id, params.max_nodes, f"{host}:{port}", params.local_addr,
                                     min_nodes=params.min_nodes)


def _endpoint(params: RendezvousParameters) -> tuple[str, int]:
    from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint

    return parse_rendezvous_endpoint(params.endpoint, default_port=29400)


class StalwartRendezvousHandler(RendezvousHandler):
    """torch's dynamic rendezvous plus stalwart's per-node services (see the module docstring)."""

    def __init__(self, inner: RendezvousHandler, store, run_id: str, max_nodes: int, store_addr: str,
                 local_addr: str | None = None, min_nodes: int = 1) -> None:
        from stalwart.launchers.node import NodeServices

        self._inner = inner
        self._store = store
        self._run_id = run_id
        self._max_nodes = max_nodes
        self._store_addr = store_addr
        self._local_addr = local_addr
        self._min_nodes = min_nodes
        self.node_id = new_node_id()
        self.prefix = f"stalwart/{run_id}"
        self.membership: Membership | None = None
        self.services = NodeServices(self.node_id, store, store_addr, f"{self.prefix}/keepers",
                                     membership_key=f"{self.prefix}/membership", on_lost=self._check_in_for)
        self._round_info: tuple | None = None  # (round's store, world size, node ids checked in for)
        self._restart_flagged = False

    # ---------------------------------------------------------------- RendezvousHandler
    def get_backend(self) -> str:
        return "stalwart"

    @property
    def use_agent_store(self) -> bool:
        return self._inner.use_agent_store

    def next_rendezvous(self) -> RendezvousInfo:
        info = self._inner.next_rendezvous()
        rank, world = info.rank, info.world_size
        round_ = _round_of(self._inner)
        self._store.set(f"{self.prefix}/r{round_}/node{rank}", self.node_id)
        keys = [f"{self.prefix}/r{round_}/node{i}" for i in range(world)]
        try:
            self._store.wait(keys, timedelta(seconds=ROUND_KEYS_TIMEOUT_S))
        except Exception as e:
            missing = [i for i, k in enumerate(keys) if not self._store.check([k])]
            raise RendezvousError(f"round {round_}: node(s) of rank {missing} did not report their identity within"
                                  f" {ROUND_KEYS_TIMEOUT_S:.0f}s ({type(e).__name__})") from None
        nodes = [self._store.get(f"{self.prefix}/r{round_}/node{i}").decode() for i in range(world)]
        previous = _read_json(self._store, f"{self.prefix}/membership")
        slots = assign_slots(Membership.from_json(previous).slots if previous else None, nodes, self._max_nodes)
        membership = Membership(round_, tuple(nodes), slots, self._max_nodes)
        if rank == 0:
            self._store.set(f"{self.prefix}/membership", json.dumps(membership.to_json()))
        self.membership = membership
        slot = membership.slot_of(self.node_id)
        self.services.before_workers(membership, slot)
        os.environ.update(self.worker_env(membership, slot))
        # Ranks follow keeper slots: a replacement node takes its predecessor's rank, so data, RNG rows and the
        # order gradients are summed in are those of the uninterrupted run. The workers' master address is
        # published again by the node that is rank 0 in this order.
        group_rank = membership.rank_of(self.node_id)
        self._round_info = (info.store, world, set())
        self._restart_flagged = False
        bootstrap = RendezvousStoreInfo.build(group_rank, PrefixStore(f"{self.prefix}/r{round_}/bootstrap", self._store),
                                              local_addr=self._local_addr)
        log.info("stalwart: round %s: node %s is rank %s of %s, keeper slot %s of %s (active %s)", round_, self.node_id,
                 group_rank, world, slot, self._max_nodes, membership.active)
        return RendezvousInfo(info.store, group_rank, world, bootstrap)

    def _check_in_for(self, lost: list[str]) -> None:
        """Nodes lost while the survivors recovered in process (no new round): check them in at
        torchrun's exit barrier, which counts every node of the round and would otherwise keep
        the survivors' agents waiting ``exit_barrier_timeout`` (300 s) after the job is done."""
        if self._round_info is None:
            return
        store, world, done = self._round_info
        from torch.distributed.elastic.agent.server.api import _TERMINAL_STATE_SYNC_ID
        from torch.distributed.elastic.utils.store import _barrier_nonblocking

        for node in lost:
            if node in done:
                continue
            done.add(node)
            try:
                _barrier_nonblocking(store, world, _TERMINAL_STATE_SYNC_ID)
            except Exception as e:  # only the exit is slower
                log.warning("stalwart: could not check lost node %s in at the exit barrier: %s", node, e)

    def worker_env(self, membership: Membership, slot: int) -> dict[str, str]:
        """What this node's workers need to find their keeper and its group (read by
        :func:`stalwart.ckpt.dist.where_am_i` and :class:`~stalwart.ckpt.keeper_client.KeeperClient`)."""
        return {
            "STALWART_NODE_ID": self.node_id,
            "STALWART_KEEPER_SLOT": str(slot),
            "STALWART_KEEPER_SLOTS": str(membership.max_slots),
            "STALWART_ACTIVE_SLOTS": ",".join(map(str, membership.active)),
            "STALWART_SLOT_IDS": ",".join(membership.keeper_ids()),
            "STALWART_KEEPER_GROUP": self._store_addr,
            "STALWART_KEEPER_PREFIX": f"{self.prefix}/keepers",
            "STALWART_KEEPER_SHARED_STORE": "1",
            "STALWART_AGENT_PID": str(os.getpid()),
            "STALWART_RDZV_ROUND": str(membership.round),
            "STALWART_RDZV_PREFIX": self.prefix,
            "STALWART_NNODES": f"{self._min_nodes}:{membership.max_slots}",
        }

    def is_closed(self) -> bool:
        return self._inner.is_closed()

    def set_closed(self) -> None:
        self._inner.set_closed()

    def num_nodes_waiting(self) -> int:
        n = self._inner.num_nodes_waiting()
        if n and self.membership is not None and not self._restart_flagged:
            # torchrun restarts every worker now: workers that see a peer leave must not re-form in process
            with contextlib.suppress(Exception):
                self._store.set(restart_key(self.prefix, self.membership.round), "1")
            self._restart_flagged = True
        return n

    def get_run_id(self) -> str:
        return self._inner.get_run_id()

    def shutdown(self) -> bool:
        self.services.shutdown()
        return self._inner.shutdown()


def _round_of(inner) -> int:
    """The rendezvous round (the same number on every node of it)."""
    state = getattr(getattr(inner, "_state_holder", None), "state", None)
    if state is not None and hasattr(state, "round"):
        return int(state.round)
    raise RuntimeError("stalwart's rendezvous needs torch's DynamicRendezvousHandler (its round number)")


def _read_json(store, key: str) -> dict | None:
    if not store.check([key]):
        return None
    return json.loads(store.get(key).decode())
