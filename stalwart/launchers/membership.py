"""Who is in the job: stable node identities and their keeper slots across re-forms.

torchrun renumbers nodes at every rendezvous round; stalwart's keepers cannot follow
a renumbering (their memory, their place in the erasure-coding group). So every node
(one launcher agent) has a stable *node id* for its lifetime, and every node id holds a
*keeper slot*: a position ``0 .. max_nodes-1`` in the job's keeper group. A node keeps its
slot for as long as it lives; a node that joins takes the lowest free slot, so a
replacement fills the hole its predecessor left. A slot with no live node is *vacant*;
with erasure coding on, a surviving agent runs a *stand-in* keeper there, which holds
the lost node's place in the group (rebuilds its snapshots from the survivors' parity
and serves them) until a node claims the slot again.

Pure functions; the rendezvous handler (:mod:`stalwart.launchers.rendezvous`) applies them.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from stalwart.errors import StalwartError


class MembershipError(StalwartError):
    """The nodes of a round cannot be given keeper slots (more nodes than slots, duplicates)."""


def new_node_id() -> str:
    """A node identity unique to this agent process: host, pid and a random tag."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def restart_key(prefix: str, round_: int) -> str:
    """Set when the agents restart every worker of round ``round_`` (a node joins): workers
    then leave as in a restart instead of recovering in process."""
    return f"{prefix}/r{round_}/restarting"


def standin_id(slot: int, host_node: str) -> str:
    """The node identity of the stand-in keeper that ``host_node``'s agent runs for ``slot``."""
    return f"standin-{slot}@{host_node}"


@dataclass(frozen=True)
class Membership:
    """One rendezvous round: its nodes (in rank order) and every keeper slot's holder."""

    round: int
    nodes: tuple[str, ...]  # node ids, in the order torch's rendezvous ranked them
    slots: dict[int, str]  # keeper slot -> node id (live nodes only)
    max_slots: int

    def slot_of(self, node_id: str) -> int:
        for slot, holder in self.slots.items():
            if holder == node_id:
                return slot
        raise MembershipError(f"node {node_id} holds no keeper slot in round {self.round}")

    @property
    def active(self) -> list[int]:
        """The live nodes' slots, in slot order (which is the ranks' order, see :meth:`rank_of`)."""
        return sorted(self.slot_of(n) for n in self.nodes)

    def rank_of(self, node_id: str) -> int:
        """The node's group rank: its slot's position among the live slots. A replacement
        node takes its predecessor's rank, so ranks mean the same work as before a loss."""
        return self.active.index(self.slot_of(node_id))

    @property
    def vacant(self) -> list[int]:
        return [s for s in range(self.max_slots) if s not in self.slots]

    def standin_host(self, slot: int) -> str:
        """The node (id) whose agent runs the stand-in keeper of vacant ``slot``."""
        return self.nodes[slot % len(self.nodes)]

    def keeper_ids(self) -> list[str]:
        """The node identity of the keeper in every slot this round: a live node's own, or
        for a vacant slot its stand-in's (run by :meth:`standin_host`)."""
        return [self.slots.get(s) or standin_id(s, self.standin_host(s)) for s in range(self.max_slots)]

    def to_json(self) -> dict:
        return {"round": self.round, "nodes": list(self.nodes), "slots": {str(k): v for k, v in self.slots.items()},
                "max_slots": self.max_slots}

    @staticmethod
    def from_json(obj: dict) -> Membership:
        return Membership(int(obj["round"]), tuple(obj["nodes"]), {int(k): v for k, v in obj["slots"].items()},
                          int(obj["max_slots"]))


def assign_slots(previous: dict[int, str] | None, nodes: Sequence[str], max_slots: int) -> dict[int, str]:
    """Keeper slots for a round's ``nodes``: each keeps its slot from ``previous`` if it had
    one, newcomers (in rank order) take the lowest free slots. Deterministic, so every
    agent computes the same answer from the same inputs."""
    if len(set(nodes)) != len(nodes):
        raise MembershipError(f"a node id appears twice in one round: {list(nodes)}")
    if len(nodes) > max_slots:
        raise MembershipError(f"{len(nodes)} nodes joined but the job has {max_slots} keeper slots (--nnodes max)")
    present = set(nodes)
    slots = {s: n for s, n in (previous or {}).items() if n in present and 0 <= s < max_slots}
    free = (s for s in range(max_slots) if s not in slots)
    for n in nodes:
        if n not in slots.values():
            slots[next(free)] = n
    return dict(sorted(slots.items()))
