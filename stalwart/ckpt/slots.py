"""A keeper's snapshot slots, and what the keeper's background agents may use of it.

The keeper (:mod:`stalwart.ckpt.keeper`) owns the slots; its background agents (erasure
coding, peer reads: :mod:`stalwart.ckpt.redundancy`) see it only through
:class:`SlotStore`, so they never import the keeper.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class Slot:
    index: int
    dir: str
    step: int | None = None
    attempt: int = 0  # see stalwart.ckpt.agreement
    done: dict[int, dict] = field(default_factory=dict)  # rank -> file record (json) for ``step``
    complete: bool = False
    persisting: bool = False
    objects: dict = field(default_factory=dict)
    pins: int = 0  # erasure coding, rebuilding or peer reads in progress: never reused meanwhile
    protected: bool = False  # every keeper of the redundancy group holds its parity of ``step``
    sid: str | None = None  # identity of the snapshot's bytes (redundancy.snapshot_id)
    records: list = field(default_factory=list)  # every node's file records of ``step``
    owners: dict = field(default_factory=dict)  # rank -> node holding its file (multi-node)
    incs: dict = field(default_factory=dict)  # node -> incarnation of the keeper that committed it
    rebuilt: bool = False  # decoded from the redundancy group's survivors (not copied by a trainer)
    manifest: Any = None  # the committed Manifest, kept parsed: persisting does not read it back
    stale: bool = False  # holds an older plan's snapshot/files while read; emptied and resized when released

    @property
    def pinned(self) -> bool:
        return self.persisting or self.pins > 0


class SlotStore(Protocol):
    """The keeper as its background agents see it. ``cond`` guards every slot field."""

    cond: threading.Condition
    slots: list[Slot]
    shm_dir: str
    stopping: bool
    node_id: str | None  # the launcher's node identity (a stand-in's own), None outside the plugin
    standin: bool  # holds a lost node's place in the group: no trainers, so no data of new steps

    def uncommit(self, slot: Slot, reason: str | None = None) -> None:
        """Empty ``slot`` (its files and state); an unfinished snapshot in it is abandoned."""

    def adopt_slot(self, slot: Slot) -> None:
        """Take ``slot``'s directory, which holds a manifest, as a complete memory snapshot."""
