"""The keeper: one process per node that owns the snapshots in host memory.

It outlives trainer processes (it runs in its own session, so torchrun's process
group kill and a trainer's SIGKILL do not reach it). It:

* creates the snapshot *slots* in shared memory: ``<shm>/slot-K/rank-R.safetensors``,
  each a complete data-file image that the trainer of rank ``R`` fills in place;
* commits a slot once every local rank reported its copy done, by writing the
  slot's ``manifest.json`` (the memory tier's commit - a slot directory is then an
  ordinary stalwart checkpoint);
* persists the newest committed snapshot to the slower tiers (local disk, shared
  file system, object store) off the trainers' GIL: files are copied byte for byte,
  then the tier's manifest and ``latest``; slow tiers skip snapshots that are
  superseded before they could be written (back-pressure never grows memory);
* on a trainer's abrupt death, persists the newest complete snapshot to every
  tier, then lingers for restarted trainers (which restore from memory);
* on start, adopts committed slots left by a previous keeper;
* with several nodes, serves its snapshots' byte ranges to other nodes' restores and,
  with ``--ec k,m``, erasure-codes them across redundancy groups of ``k + m`` nodes and
  rebuilds lost nodes' snapshots (:mod:`stalwart.ckpt.redundancy`).

Run by :mod:`stalwart.ckpt.keeper_client`; ``python -m stalwart.ckpt.keeper --help``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import sys
import threading
import time
import traceback

from stalwart.ckpt.agreement import ABANDONED, COMPLETE, LIVE, SKIPPED, Attempt, Ledger
from stalwart.ckpt.pacing import Cancelled
from stalwart.ckpt.protocol import Channel
from stalwart.ckpt.redundancy import (
    DEFAULT_CHUNK,
    NODES_FILE,
    SLOT_EXTRA_FILES,
    ECConfig,
    PeerService,
    Redundancy,
    RedundancyError,
    parse_ec,
    snapshot_id,
)
from stalwart.ckpt.shm import pid_alive, reclaim_orphans, write_owner
from stalwart.ckpt.slots import Slot
from stalwart.ckpt.storelink import StoreLink, local_address
from stalwart.ckpt.tiers import Tier, TierSpec, open_tier, parse_tier
from stalwart.formats.atomic import atomic_write
from stalwart.formats.datafile import FileRecord
from stalwart.formats.layout import Layout
from stalwart.formats.manifest import MANIFEST_NAME, Manifest, rank_file_name, read_manifest

log = logging.getLogger("stalwart.keeper")


class NodeGroup:
    """Commit metadata exchange between the keepers of several nodes (a TCPStore).

    Node 0 hosts the store (or, under the launcher plugin, every keeper is a client of
    the rendezvous store, under ``prefix``); every keeper publishes the records of the
    files it wrote for a step, the first node of the step's group writes the manifest
    once all of them published. The store link reconnects after the store's host
    restarts, and a gather gives up early (naming the nodes) when a keeper it waits for
    is dead or was replaced.

    Nodes are keeper slots: stable positions in the job's keeper group. ``active`` are
    the slots whose keepers serve trainers in the current run (all of them unless the
    trainers said otherwise): memory commits wait for exactly these.
    """

    def __init__(self, node: int, nodes: int, host: str, port: int, timeout_s: float, *,
                 host_store: bool | None = None, prefix: str = "") -> None:
        self.node = node
        self.nodes = nodes
        self.timeout_s = timeout_s
        self.active: list[int] = list(range(nodes))
        self.link = StoreLink(host, port, node, nodes, timeout_s=timeout_s, host_store=host_store, prefix=prefix)

    def publish(self, key: str, obj) -> None:
        self.link.set(f"{key}/node{self.node}", json.dumps(obj))

    def gather(self, key: str, nodes: list[int] | None = None, incs: dict | None = None, timeout_s: float | None = None,
               abort=None) -> dict[int, object]:
        """Every node's value of ``key`` (``nodes``: the active ones by default), by node."""
        nodes = list(self.active if nodes is None else nodes)
        parts = self.link.gather(key, nodes, incs=incs, timeout_s=timeout_s or self.timeout_s, abort=abort)
        return dict(zip(nodes, parts, strict=True))


class Keeper:
    def __init__(
        self,
        shm_dir: str,
        tiers: list[TierSpec],
        *,
        num_slots: int,
        linger_s: float,
        node: int = 0,
        group: NodeGroup | None = None,
        commit_timeout_s: float = 120.0,
        agent_pid: int | None = None,
        standin: bool = False,
        node_id: str | None = None,
    ) -> None:
        self.shm_dir = shm_dir
        self.commit_timeout_s = commit_timeout_s  # how long a memory commit waits for the other nodes
        self.agent_pid = agent_pid  # the launcher agent this keeper lives as long as (None: trainers decide)
        self.standin = standin  # holds a lost node's place in the redundancy group: no trainers, no tiers
        self.node_id = node_id
        self._retire_checked, self._retire_seen = 0.0, False
        self._announced_memory = False
        self._peers_checked = 0.0
        self.tier_specs = [t for t in tiers if t.kind != "memory"]
        self.tiers: list[Tier] = [open_tier(t) for t in self.tier_specs]
        self.linger_s = linger_s
        self.node = node
        self.group = group
        self.cond = threading.Condition()
        self.slots = [Slot(i, os.path.join(shm_dir, f"slot-{i}")) for i in range(num_slots)]
        self.file_sizes: dict[int, int] = {}  # rank -> bytes of its slot file
        self.local_ranks: set[int] = set()
        self.layout_json: dict | None = None
        self.plan_sig: str | None = None
        self.topology: dict = {}
        self.connected: dict[int, Channel] = {}
        self.pids: dict[int, int | None] = {}  # rank -> the process connected as that rank
        self.clean_bye: set[int] = set()
        self.ever_connected = False
        self.last_disconnect = time.monotonic()
        self.persisted: dict[str, set[int]] = {t.name: set(t.committed_steps()) for t in self.tiers}
        self.errors: dict[tuple[str, int], str] = {}
        self.forced: int | None = None  # a step to persist to every tier regardless of 'every'
        self.ledger = Ledger()  # every snapshot decision of the current run (agreement between local ranks)
        self.cancel: set[int] = set()  # slots whose tier copy should stop (superseded; a final snapshot needs them)
        self.stopping = False
        self.session: str | None = None  # the trainers' run (keys of the multi-node exchange)
        self.redundancy: Redundancy | None = None
        self.peer: PeerService | None = None
        for s in self.slots:
            os.makedirs(s.dir, exist_ok=True)
        self._adopt()

    # ------------------------------------------------------------------ state
    def _adopt(self) -> None:
        """Committed slots left by an earlier keeper are snapshots we still hold."""
        for s in self.slots:
            if not os.path.exists(os.path.join(s.dir, MANIFEST_NAME)):
                continue
            try:
                self.adopt_slot(s)
            except Exception as e:  # a damaged slot is dropped, not fatal
                log.warning("dropping slot %s: %s", s.dir, e)
                self.uncommit(s)

    def adopt_slot(self, s: Slot) -> None:
        """Take a slot directory with a manifest as a complete memory snapshot."""
        m = read_manifest(s.dir)
        s.step, s.complete, s.manifest = m.step, True, m
        s.records = [f.to_json() for f in m.files]
        s.done = {f.rank: f.to_json() for f in m.files if f.rank is not None and os.path.exists(os.path.join(s.dir, f.path))}
        s.objects = m.objects
        s.sid = snapshot_id(s.records)
        with contextlib.suppress(FileNotFoundError, ValueError), open(os.path.join(s.dir, NODES_FILE)) as f:
            s.owners = {int(r): int(n) for r, n in json.load(f).items()}
        self.layout_json = {"mesh": m.layout.mesh.to_json(), "groups": m.layout.to_json()["groups"], "tensors": m.layout.to_json()["tensors"]}
        log.info("adopted memory snapshot of step %s in %s", s.step, s.dir)

    def memory_steps(self) -> list[dict]:
        return sorted(
            ({"step": s.step, "dir": s.dir} for s in self.slots if s.complete),
            key=lambda d: -d["step"],
        )

    def status(self) -> dict:
        return {
            "memory": self.memory_steps(),
            "tiers": {name: sorted(steps) for name, steps in self.persisted.items()},
            "errors": [{"tier": t, "step": s, "error": e} for (t, s), e in self.errors.items()],
            "slots": len(self.slots),
            "pool_bytes": len(self.slots) * sum(self.file_sizes.values()),
            **({"ec": self.redundancy.status()} if self.redundancy is not None else {}),
            "peers_hold": self._peers_hold(),
        }

    def _peers_hold(self) -> bool:
        """Whether any keeper of the job ever committed a memory snapshot (worth waiting for a rebuild)."""
        if self.group is None or self._announced_memory:
            return self._announced_memory
        now = time.monotonic()
        if now - self._peers_checked > 2.0:  # called under the lock: at most one store round trip per 2 s
            self._peers_checked = now
            with contextlib.suppress(Exception):
                self._announced_memory = self.group.link.check("memory/ever")
        return self._announced_memory

    def uncommit(self, slot: Slot, reason: str | None = None) -> None:
        """Empty a slot; an unfinished attempt in it is abandoned (with ``reason``)."""
        if slot.step is not None and not slot.complete:
            att = self.ledger.get(slot.step, slot.attempt)
            if att is not None and att.slot == slot.index:
                self.ledger.finish(att, ABANDONED, reason or "its slot was reclaimed")
        self.cancel.discard(slot.index)
        if self.redundancy is not None:  # first: it may set the slot's parity buffer aside for reuse
            self.redundancy.forget(slot)
        for name in (MANIFEST_NAME, *SLOT_EXTRA_FILES):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(slot.dir, name))
        slot.step, slot.attempt, slot.complete, slot.done, slot.objects = None, 0, False, {}, {}
        slot.protected, slot.sid, slot.records, slot.owners, slot.incs = False, None, [], {}, {}
        slot.rebuilt, slot.manifest = False, None
        if slot.stale and not slot.pinned:  # an older plan's snapshot, no longer read: the current plan's files
            self._size_files(slot, list(self.file_sizes))
            slot.stale = False

    def _size_files(self, slot: Slot, ranks) -> None:
        """Give ``ranks``' files in ``slot`` the current plan's sizes (created if missing)."""
        for rank in ranks:
            fd = os.open(os.path.join(slot.dir, rank_file_name(rank)), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                if os.fstat(fd).st_size != self.file_sizes[rank]:
                    os.ftruncate(fd, self.file_sizes[rank])
            finally:
                os.close(fd)

    # ------------------------------------------------------------------ ops
    def _conflict(self, rank: int, pid) -> str | None:
        """Why a hello of ``rank`` from process ``pid`` must be refused: another live process
        of that rank is connected, i.e. two jobs share this keeper (lock held)."""
        other = self.pids.get(rank)
        if rank in self.connected and other and pid and int(other) != int(pid) and pid_alive(int(other)):
            return (f"rank {rank} of another job (pid {other}) is connected to the keeper of {self.shm_dir}: two jobs"
                    " use the same root= on this host; give each job its own root")
        return None

    def op_hello(self, msg: dict) -> dict:
        rank = int(msg["rank"])
        with self.cond:
            announced = {int(r) for r in msg["local_ranks"]}
            if set(self.connected) - {rank} <= announced:
                # a (re)started job says which ranks this node serves now: ranks of an earlier
                # world that are not connected any more will never deliver a copy again
                self.local_ranks = announced
            else:  # trainers of two worlds at once (a restart still in flight): keep waiting for all
                self.local_ranks |= announced
            self.ever_connected = True
            self.clean_bye.discard(rank)
            self.ledger.rank_joined(rank)
            return {"pid": os.getpid(), **self.status(), "shm_dir": self.shm_dir}

    def op_plan(self, msg: dict) -> dict:
        """(Re)size this rank's slot files for a new plan; drops memory snapshots of an older plan."""
        rank = int(msg["rank"])
        size = int(msg["file_size"])
        with self.cond:
            # never under a reader: a slot still read (a peer's rebuild or restore, coding) keeps the old
            # plan's snapshot and files until it is released, marked stale (see _free_slot); the new
            # plan does not wait for it (a survivor's first snapshot after a node loss did, for the
            # whole rebuild of the lost node's share)
            if msg.get("sig") != self.plan_sig or self.file_sizes.get(rank) != size:
                for s in self.slots:
                    if s.persisting and s.index not in self.cancel:
                        # the old layout's snapshot must not hold the new one up (a multi-node tier commit
                        # can wait minutes for a node that went elsewhere); it is dropped by this plan anyway
                        log.warning("a new snapshot layout: stopping the tier copy of step %s", s.step)
                        self.cancel.add(s.index)
            if self.peer is not None:
                self.peer.purge()  # snapshots again: restores (and their peer views) are over
            if self.group is not None and msg.get("active"):
                active = sorted(int(n) for n in msg["active"])
                if self.node not in active or active[-1] >= self.group.nodes:
                    raise RedundancyError(f"keeper slot {self.node}: the trainers' active slots {active} do not fit"
                                          f" a group of {self.group.nodes} (a keeper of another job?)")
                self.group.active = active
            self.session = msg.get("session") or self.session
            if msg.get("sig") != self.plan_sig:
                for s in self.slots:
                    if s.pinned:
                        s.stale = True
                    elif s.step is not None:
                        self.uncommit(s)
                self.plan_sig = msg.get("sig")
            self.layout_json = msg["layout"]
            self.topology = msg.get("topology", {})
            resized = self.file_sizes.get(rank) != size
            self.file_sizes[rank] = size
            for s in self.slots:
                if s.stale or (s.pinned and resized and s.step is not None and rank in s.done):
                    s.stale = True  # its files are resized when it is released
                    continue
                if resized and s.step is not None and rank in s.done:
                    self.uncommit(s)  # its copy of this rank's file is about to change size
                self._size_files(s, [rank])
            return {"slots": [s.dir for s in self.slots], "pool_bytes": len(self.slots) * sum(self.file_sizes.values())}

    def op_acquire(self, msg: dict) -> dict:
        """The slot a local rank writes snapshot ``step`` into: one recorded decision per attempt.

        A loop snapshot (attempt 0) is decided when the first local rank asks, and every
        other rank gets the same answer (see :mod:`stalwart.ckpt.agreement`). Never reused
        for it: a pinned slot (being persisted, erasure-coded or read by a peer), the newest
        complete snapshot (memory always keeps one), the newest EC-protected one, and a slot
        another rank is still filling (the request waits for that copy instead: the caller
        would wait at its next collective anyway). With nothing left, the step is skipped.
        Complete snapshots of this step or later belong to an abandoned run (the trainers
        restarted from an earlier step): dropped.

        A *must* snapshot (``must``: final, ``save_now``, preemption) never skips: it
        answers ``complete`` when an attempt of the step already completed, joins the
        attempt being filled, or opens the next attempt and waits (up to ``timeout``) for a
        slot, stopping the persistence of snapshots older than the newest complete one.
        """
        step, rank = int(msg["step"]), int(msg["rank"])
        must = bool(msg.get("must"))
        timeout = float(msg.get("timeout", 30.0))
        deadline = time.monotonic() + timeout
        with self.cond:
            if self.ledger.start_session(msg.get("session")):
                self._drop_unfinished("the trainers started a new run")
            try:
                if must:
                    return self._acquire_must(step, rank, timeout, deadline)
                return self._acquire_loop(step, rank, deadline)
            finally:
                self._check_blockers()
                self.cond.notify_all()

    def _give(self, att: Attempt, rank: int) -> dict:
        att.given.add(rank)
        self.ledger.note(rank, att.step, att.number)
        return {"slot": att.slot, "attempt": att.number}

    def _refuse(self, att: Attempt, rank: int) -> dict:
        self.ledger.note(rank, att.step, att.number)
        return {"slot": None, "attempt": att.number, "state": att.state, "reason": att.describe()}

    def _acquire_loop(self, step: int, rank: int, deadline: float) -> dict:
        while True:
            att = self.ledger.get(step, 0)
            if att is not None:
                return self._give(att, rank) if att.state == LIVE else self._refuse(att, rank)
            for s in self.slots:
                if s.complete and s.step >= step and not s.pinned:
                    log.info("dropping the memory snapshot of step %s: the trainers restarted from an earlier step", s.step)
                    self.uncommit(s)
            chosen = self._free_slot()
            if chosen is not None:
                return self._give(self._open(chosen, step, 0), rank)
            filling = [s for s in self.slots if s.step is not None and not s.complete and s.step < step]
            if not filling or time.monotonic() > deadline:
                why = ("the copy of an earlier step did not finish in time" if filling
                       else "every slot is being persisted or holds the newest snapshot")
                att = self.ledger.record(Attempt(step, 0, SKIPPED, reason=why))
                self._announce_skip(step, 0)
                return self._refuse(att, rank)
            self.cond.wait(0.2)

    def _acquire_must(self, step: int, rank: int, timeout: float, deadline: float) -> dict:
        while True:
            done = self.ledger.complete(step) or next(
                (Attempt(step, s.attempt, COMPLETE, s.index) for s in self.slots if s.complete and s.step == step), None)
            if done is not None:
                self.ledger.note(rank, step, done.number)
                return {"slot": None, "attempt": done.number, "state": COMPLETE, "complete": True}
            live = self.ledger.live(step)
            if live is not None and rank not in live.given:
                return self._give(live, rank)
            if live is None:
                if self.ledger.get(step, 0) is None:  # no loop snapshot of this step will be taken now
                    self.ledger.record(Attempt(step, 0, SKIPPED, reason="superseded by a final snapshot"))
                    self._announce_skip(step, 0)
                chosen = self._free_slot(must=True)
                if chosen is not None:
                    return self._give(self._open(chosen, step, self.ledger.next_number(step)), rank)
            if time.monotonic() > deadline:
                if live is not None:
                    return {"slot": None, "attempt": live.number, "state": LIVE,
                            "reason": f"{live.describe()}: still waiting for another rank's copy after {timeout:.0f}s"}
                number = self.ledger.next_number(step)
                att = self.ledger.record(Attempt(step, number, ABANDONED, reason=f"no snapshot slot became free within {timeout:.0f}s"))
                self._announce_skip(step, number)
                return self._refuse(att, rank)
            self.cond.wait(0.2)  # our own attempt resolving, or a slot being released

    def _free_slot(self, must: bool = False) -> Slot | None:
        """A slot a new snapshot may overwrite (see :meth:`op_acquire`), emptied; or None.

        For a must snapshot, slots being persisted with a snapshot older than the newest
        complete one are asked to stop (their tier copy is superseded) and freed when they do.
        """
        for s in self.slots:  # an older plan's snapshot that is no longer read: emptied and resized
            if s.stale and not s.pinned:
                self.uncommit(s)
        newest = max((s for s in self.slots if s.complete), key=lambda s: s.step, default=None)
        protected = max((s for s in self.slots if s.protected), key=lambda s: s.step, default=None)
        for s in self.slots:  # a copy of a step older than a complete one can never be needed
            if s.step is not None and not s.complete and not s.pinned and newest is not None and s.step <= newest.step:
                self.uncommit(s, f"a newer step ({newest.step}) completed first")
        usable = [s for s in self.slots
                  if not s.pinned and s is not newest and s is not protected and (s.step is None or s.complete)]
        if usable:
            empty = [s for s in usable if s.step is None]
            chosen = empty[0] if empty else min(usable, key=lambda s: s.step)
            self.uncommit(chosen)
            return chosen
        if must and newest is not None:
            for s in self.slots:
                if s.persisting and s is not newest and s.complete and s.step < newest.step and s.index not in self.cancel:
                    log.info("stopping the persistence of step %s: a final snapshot needs its slot", s.step)
                    self.cancel.add(s.index)
        return None

    def _open(self, slot: Slot, step: int, number: int) -> Attempt:
        slot.step, slot.attempt = step, number
        log.debug("step %s (attempt %s) -> slot %s", step, number, slot.index)
        return self.ledger.record(Attempt(step, number, LIVE, slot.index))

    def _announce_skip(self, step: int, number: int) -> None:
        """Tell the other nodes this node will not commit ``step`` (attempt ``number``)."""
        if self.group is not None:
            threading.Thread(target=self._publish_skip, args=(step, number), daemon=True).start()

    def _check_blockers(self) -> None:
        """Abandon every unfinished copy that can no longer complete (called with the lock held)."""
        for s in self.slots:
            if s.step is None or s.complete or s.pinned:
                continue
            att = self.ledger.get(s.step, s.attempt)
            why = self.ledger.blocker(att, self.local_ranks, set(s.done)) if att is not None else None
            if why:
                log.warning("abandoning the snapshot of step %s: %s", s.step, why)
                self.uncommit(s, why)

    def _drop_unfinished(self, why: str) -> None:
        for s in self.slots:
            if s.step is not None and not s.complete and not s.pinned:
                self.uncommit(s, why)

    def op_done(self, msg: dict) -> dict:
        rank, step, index = int(msg["rank"]), int(msg["step"]), int(msg["slot"])
        number = int(msg.get("attempt", 0))
        with self.cond:
            slot = self.slots[index] if 0 <= index < len(self.slots) else None
            if (slot is None or slot.step != step or slot.attempt != number or slot.complete or self.layout_json is None
                    or rank not in self.file_sizes):
                att = self.ledger.get(step, number)
                why = att.describe() if att is not None else "its slot was reused"
                log.debug("stale done: step %s (attempt %s) slot %s rank %s: %s", step, number, index, rank, why)
                return {"committed": False, "stale": True, "reason": why}
            slot.done[rank] = msg["record"]
            if msg.get("objects") is not None:
                slot.objects = msg["objects"]
            if set(slot.done) >= self.local_ranks:
                if self.group is None:
                    self._commit_memory(slot, [slot.done[r] for r in sorted(slot.done)], slot.objects)
                    self.cond.notify_all()
                else:  # waits for the other nodes: never while holding the lock
                    threading.Thread(target=self._commit_memory_multinode, args=(slot, step, number), daemon=True).start()
            return {"committed": slot.complete}

    def _manifest(self, slot: Slot, records: list[dict]) -> Manifest:
        # parsed once per plan, not per commit (0.8 s for 45,000 tensors, under the lock)
        cached = getattr(self, "_layout_parsed", None)
        if cached is None or cached[0] is not self.layout_json:
            cached = self._layout_parsed = (self.layout_json, Layout.from_json(self.layout_json))
        return Manifest(
            layout=cached[1],
            files=sorted((FileRecord.from_json(r) for r in records), key=lambda f: f.rank),
            step=slot.step,
            objects=slot.objects,
            topology=self.topology,
        )

    def _commit_memory(self, slot: Slot, records: list[dict], objects: dict) -> None:
        """Write the slot's manifest (called with the lock held)."""
        slot.objects = objects
        slot.records = records
        slot.sid = snapshot_id(records)
        manifest = self._manifest(slot, records)
        atomic_write(os.path.join(slot.dir, MANIFEST_NAME), manifest.dumps(), fsync=False)
        slot.complete, slot.manifest = True, manifest
        self.ledger.finish(self.ledger.get(slot.step, slot.attempt), COMPLETE)
        for other in self.slots:  # an older copy of the same step (an earlier run's) is superseded
            if other is not slot and other.complete and other.step == slot.step and not other.pinned:
                self.uncommit(other)
        log.debug("memory commit of step %s in slot %s", slot.step, slot.index)

    def _key(self, kind: str, step: int) -> str:
        """A key of the multi-node exchange, within the trainers' run (see guard's session)."""
        return f"{kind}/{self.session}/{step}" if self.session else f"{kind}/{step}"

    @staticmethod
    def _mem_id(step: int, number: int) -> str:
        """The exchange key of a memory commit: the step, plus the attempt for must snapshots."""
        return str(step) if number == 0 else f"{step}.{number}"

    def _publish_skip(self, step: int, number: int = 0) -> None:
        """Tell the other nodes this node skipped ``step``: they abandon their copies of it."""
        with contextlib.suppress(Exception):
            self.group.publish(self._key("mem", self._mem_id(step, number)), {"skipped": True, "inc": self.group.link.inc})

    def _commit_memory_multinode(self, slot: Slot, step: int, number: int = 0) -> None:
        with self.cond:
            local = [slot.done[r] for r in sorted(slot.done)]
            objects = slot.objects
        key = self._key("mem", self._mem_id(step, number))
        try:
            self.group.publish(key, {"records": local, "objects": objects, "inc": self.group.link.inc})
            self._publish_latest("mem", step)
            since: dict[int, float] = {}
            parts = self.group.gather(key, timeout_s=self.commit_timeout_s,
                                      abort=lambda missing: self._went_past("mem", step, missing, since))
            skipped = [i for i, p in parts.items() if p.get("skipped")]
            if skipped:
                raise RedundancyError(f"node(s) {', '.join(map(str, skipped))} skipped it")
        except Exception as e:
            log.log(logging.DEBUG if "skipped it" in str(e) else logging.ERROR,
                    "memory commit of step %s: the other nodes did not report (%s)", step, e)
            with self.cond:
                if slot.step == step and slot.attempt == number and not slot.complete and not slot.pinned:
                    self.uncommit(slot, f"the other nodes did not commit it ({e})")  # ranks waiting go on
                    self.cond.notify_all()
            return
        with self.cond:
            if slot.step != step or slot.attempt != number or slot.complete:
                return  # overwritten meanwhile
            records = [r for p in parts.values() for r in p["records"]]
            objects = next((p["objects"] for p in parts.values() if p["objects"]), objects)
            slot.owners = {int(r["rank"]): node for node, p in parts.items() for r in p["records"]}
            slot.incs = {node: p.get("inc") for node, p in parts.items()}
            atomic_write(os.path.join(slot.dir, NODES_FILE), json.dumps(slot.owners).encode(), fsync=False)
            self._commit_memory(slot, records, objects)
            self.cond.notify_all()
        if not self._announced_memory:  # a keeper that starts later knows the job has memory worth rebuilding
            with contextlib.suppress(Exception):
                self.group.link.set("memory/ever", "1")
                self._announced_memory = True

    def _publish_latest(self, kind: str, step: int) -> None:
        """This node's newest step of ``kind`` (memory commit or a tier): see :meth:`_went_past`."""
        self.group.link.set(f"{self._key(kind, 'latest')}/node{self.node}", str(step))

    def _went_past(self, kind: str, step: int, nodes: list[int], since: dict[int, float] | None = None) -> str | None:
        """A node among ``nodes`` (those that did not publish ``step``) that published a
        newer step of ``kind`` instead, so ``step`` can never complete there; or None.

        With ``since``, a node must be seen past the step twice at least a second apart
        (memory commits run on concurrent threads, so one node may publish two steps out
        of order); tier persistence is sequential and needs no second look."""
        now = time.monotonic()
        for i in nodes:
            if kind == "mem" and since is not None:
                if self.group.link.check(f"{self._key(kind, 'left')}/node{i}"):
                    # a second's grace: that node may still publish what its trainers reported before leaving
                    if now - since.setdefault(-1 - i, now) >= 1.0:
                        return f"node {i}'s trainers all left"
                    continue
                since.pop(-1 - i, None)
            latest = self.group.link.get(f"{self._key(kind, 'latest')}/node{i}")
            if latest is None or int(latest) <= step:
                if since is not None:
                    since.pop(i, None)
                continue
            if since is not None and now - since.setdefault(i, now) < 1.0:
                continue
            return f"node {i} went on to step {latest} without it"
        return None

    def op_abandon(self, msg: dict) -> dict:
        with self.cond:
            slot = self.slots[int(msg["slot"])]
            if slot.step == int(msg["step"]) and not slot.complete:
                self.uncommit(slot, f"rank {msg.get('rank')} abandoned it")
                self.cond.notify_all()
        return {}

    def op_flush(self, msg: dict) -> dict:
        """Persist the newest complete snapshot to every tier (preemption, shutdown)."""
        with self.cond:
            newest = max((s.step for s in self.slots if s.complete), default=None)
            if newest is not None:
                self.forced = newest if self.forced is None else max(self.forced, newest)
                self.cond.notify_all()
            return {"step": newest}

    def op_wait(self, msg: dict) -> dict:
        """Block until ``step`` is on the given tiers (all by default) or failed there."""
        step = int(msg["step"])
        names = msg.get("tiers") or [t.name for t in self.tiers]
        deadline = time.monotonic() + float(msg.get("timeout", 300))
        with self.cond:
            if msg.get("force"):
                self.forced = step if self.forced is None else max(self.forced, step)
                self.cond.notify_all()
            while True:
                pending = [n for n in names if step not in self.persisted.get(n, set()) and (n, step) not in self.errors
                           and not any(x > step for x in self.persisted.get(n, set()))]
                if not pending:
                    break
                in_memory = any(s.step == step for s in self.slots)  # complete, or still being copied
                if not in_memory:
                    why = self.ledger.reason_for(step) or f"step {step} is not in memory (skipped or superseded)"
                    return {"done": False, "pending": pending, "abandoned": True, "error": why, **self.status()}
                left = deadline - time.monotonic()
                if left <= 0:
                    return {"done": False, "pending": pending, **self.status()}
                self.cond.wait(min(left, 1.0))
            failed = {n: self.errors[(n, step)] for n in names if (n, step) in self.errors}
            return {"done": True, "failed": failed, **self.status()}

    def op_status(self, msg: dict) -> dict:
        with self.cond:
            return self.status()

    def op_peer_view(self, msg: dict) -> dict:
        """A directory holding memory step ``step`` with other nodes' byte ranges fetched."""
        if self.peer is None:
            raise RedundancyError("reading other nodes' memory needs a multi-node keeper group")
        return {"dir": self.peer.view(int(msg["step"]), msg.get("reads") or {}, int(msg.get("rank", 0)))}

    def op_release_view(self, msg: dict) -> dict:
        if self.peer is not None:
            self.peer.release(str(msg["dir"]))
        return {}

    def op_bye(self, msg: dict) -> dict:
        rank = int(msg["rank"])
        with self.cond:
            if msg.get("clean"):
                self.clean_bye.add(rank)
            at = msg.get("step")
            self.ledger.rank_left(rank, f"left protect() at step {at}" if at is not None else "left protect()")
            self._check_blockers()
            self.cond.notify_all()
        return {}

    # ------------------------------------------------------------------ persistence
    def _pending_work(self) -> tuple[Slot, list[Tier], bool] | None:
        complete = sorted((s for s in self.slots if s.complete and s.index not in self.cancel), key=lambda s: -s.step)
        for slot in complete:
            forced = self.forced is not None and slot.step == self.forced
            todo = []
            for tier in self.tiers:
                held = self.persisted[tier.name]
                if slot.step in held or (tier.name, slot.step) in self.errors:
                    continue
                if held and max(held) > slot.step:
                    continue  # the tier already holds something newer
                if forced or tier.qualifies(slot.step):
                    todo.append(tier)
            if todo:
                return slot, todo, forced
            if forced:
                self.forced = None
        return None

    def persist_loop(self) -> None:
        while True:
            with self.cond:
                work = None
                while not self.stopping:
                    work = self._pending_work()
                    if work is not None:
                        break
                    self.cond.wait(1.0)
                if work is None:
                    return
                slot, todo, forced = work
                slot.persisting = True
                step = slot.step
                records = [FileRecord.from_json(slot.done[r]) for r in sorted(slot.done)]
                manifest_base = slot.manifest or read_manifest(slot.dir)
                incs = dict(slot.incs)
                holders = sorted(set(slot.owners.values())) or list(self.group.active if self.group else [self.node])
            try:
                for tier in todo:
                    if slot.index in self.cancel:
                        break
                    self._persist(tier, slot, step, records, manifest_base, incs, holders)
            finally:
                with self.cond:
                    slot.persisting = False
                    if forced and self.forced == step and self._pending_work() is None:
                        self.forced = None
                    self.cond.notify_all()

    def _persist(self, tier: Tier, slot: Slot, step: int, local: list[FileRecord], base: Manifest, incs: dict,
                 holders: list[int]) -> None:
        t0 = time.perf_counter()
        try:
            stored = tier.put_files(step, slot.dir, local, cancelled=lambda: slot.index in self.cancel)
            if self.group is not None:
                key = self._key(tier.name, step)
                self.group.publish(key, [r.to_json() for r in stored])
                self._publish_latest(tier.name, step)
                if self.node != holders[0]:  # the first node that holds the step writes the tier's manifest
                    with self.cond:
                        self.persisted[tier.name].add(step)
                    return
                # gives up early when a node's keeper that held this step died or was replaced, or
                # persisted a newer step instead; nodes persist the same steps at about the same time
                parts = self.group.gather(key, holders, incs=incs or None, timeout_s=120 + 2 * (time.perf_counter() - t0),
                                          abort=lambda missing: self._went_past(tier.name, step, missing)
                                          or ("stopped: its slot is needed" if slot.index in self.cancel else None))
                stored = [FileRecord.from_json(r) for part in parts.values() for r in part]
            manifest = Manifest(base.layout, sorted(stored, key=lambda f: f.rank), step, base.objects, None, base.topology, base.block_size)
            tier.commit(step, manifest)
            nbytes = sum(r.size for r in local)
            dt = time.perf_counter() - t0
            log.info("step %s -> %s: %.1f MB in %.2fs (%.2f GB/s)", step, tier.name, nbytes / 1e6, dt, nbytes / dt / 1e9 if dt else 0)
            with self.cond:
                self.persisted[tier.name] = set(tier.committed_steps())
                self.persisted[tier.name].add(step)
        except Cancelled:
            log.info("persisting step %s to %s stopped: a newer snapshot needs its slot", step, tier.name)
            with contextlib.suppress(Exception):
                tier.discard(step)
        except Exception as e:
            log.error("persisting step %s to %s failed: %s\n%s", step, tier.name, e, traceback.format_exc())
            with self.cond:
                self.errors[(tier.name, step)] = f"{type(e).__name__}: {e}"

    # ------------------------------------------------------------------ connections
    def serve_client(self, conn: socket.socket) -> None:
        chan = Channel(conn)
        rank = None
        delay = _reply_delays()
        try:
            while True:
                msg = chan.recv()
                if msg is None:
                    break
                op = msg.get("op")
                if op == "hello":
                    rank = int(msg["rank"])
                    with self.cond:
                        why = self._conflict(rank, msg.get("pid"))
                        if why is None:
                            self.connected[rank] = chan
                            self.pids[rank] = msg.get("pid")
                    if why is not None:
                        chan.send({"ok": False, "error": why})
                        rank = None
                        continue
                    self._mark_trainers_gone(False)
                handler = getattr(self, f"op_{op}", None)
                if handler is None:
                    chan.send({"ok": False, "error": f"unknown op {op!r}"})
                    continue
                try:
                    reply = handler(msg)
                    delay()
                    chan.send({"ok": True, **reply})
                except Exception as e:
                    log.error("op %s failed: %s\n%s", op, e, traceback.format_exc())
                    chan.send({"ok": False, "error": f"{type(e).__name__}: {e}"})
        except Exception as e:  # a broken client must not take the keeper down
            log.warning("client connection error: %s", e)
        finally:
            chan.close()
            if rank is not None:
                self._disconnected(rank, chan)

    def _disconnected(self, rank: int, chan: Channel | None = None) -> None:
        with self.cond:
            if chan is not None and rank in self.connected and self.connected[rank] is not chan:
                return  # a restarted trainer of this rank reconnected before this connection's handler ended
            self.connected.pop(rank, None)
            self.last_disconnect = time.monotonic()
            if rank not in self.clean_bye:
                log.warning("rank %s disconnected without saying goodbye: persisting the newest complete snapshot", rank)
                self.ledger.rank_left(rank, "disconnected")
                self._drop_unfinished(f"rank {rank} disconnected")  # an unfinished copy is garbage
                newest = max((s.step for s in self.slots if s.complete), default=None)
                if newest is not None:
                    self.forced = newest if self.forced is None else max(self.forced, newest)
            self.cond.notify_all()
            gone = not self.connected
        if gone:
            self._mark_trainers_gone(True)

    def _mark_trainers_gone(self, gone: bool) -> None:
        """Tell the other keepers that this node's trainers all left (or one is back): a memory
        commit of the run waiting for this node's report stops waiting (see :meth:`_went_past`)."""
        if self.group is None:
            return
        key = f"{self._key('mem', 'left')}/node{self.node}"
        with contextlib.suppress(Exception):
            if gone:
                self.group.link.set(key, "1")
            else:
                self.group.link.delete(key)

    def retired(self) -> bool:
        """A stand-in is retired when its slot's own node came back (the launcher says so)."""
        if not self.standin or self.group is None:
            return False
        now = time.monotonic()
        if now - self._retire_checked < 1.0:
            return self._retire_seen
        self._retire_checked = now
        with contextlib.suppress(Exception):
            self._retire_seen = self.group.link.get(f"standin/{self.node}/retire") == self.node_id
        return self._retire_seen

    def idle_exit_due(self) -> bool:
        """Whether to exit now. A launcher-managed keeper (``agent_pid``) lives as long as its
        node's agent, across any number of trainer restarts; otherwise the keeper leaves once
        every local rank said a clean goodbye, or ``linger_s`` after an abrupt disconnect."""
        with self.cond:
            if self.agent_pid is not None:
                if pid_alive(self.agent_pid) and not self.retired():
                    return False
                return not (any(s.persisting for s in self.slots) or self._pending_work() is not None) or self.retired()
            if self.connected or not self.ever_connected:
                return False
            busy = any(s.persisting for s in self.slots) or self._pending_work() is not None
            if busy:
                return False
            if self.local_ranks and self.clean_bye >= self.local_ranks:
                return True
            return time.monotonic() - self.last_disconnect > self.linger_s


def _reply_delays():
    """Fault injection for stress tests: ``STALWART_KEEPER_FAULTS=delay:SEED:MAX_MS`` delays
    half of the replies by a random 0..MAX_MS (per connection, seeded); unset: no delay."""
    spec = os.environ.get("STALWART_KEEPER_FAULTS", "")
    if not spec.startswith("delay:"):
        return lambda: None
    import random

    _, seed, max_ms = spec.split(":")
    rnd = random.Random(int(seed) * 131 + threading.get_ident() % 997)

    def delay() -> None:
        if rnd.random() < 0.5:
            time.sleep(rnd.uniform(0, float(max_ms)) / 1000)

    return delay


def _serve(keeper: Keeper, sock_path: str) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(sock_path)
    server.bind(sock_path)
    server.listen(64)
    server.settimeout(0.5)
    persister = threading.Thread(target=keeper.persist_loop, name="persist", daemon=True)
    persister.start()
    started = time.monotonic()
    try:
        while True:
            try:
                conn, _ = server.accept()
            except TimeoutError:
                if keeper.idle_exit_due():
                    break
                if keeper.agent_pid is None and not keeper.ever_connected and time.monotonic() - started > max(keeper.linger_s, 60):
                    log.info("no trainer connected; exiting")
                    break
                continue
            threading.Thread(target=keeper.serve_client, args=(conn,), daemon=True).start()
    finally:
        with keeper.cond:
            keeper.stopping = True
            keeper.cond.notify_all()
        persister.join(timeout=600)
        server.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock_path)


def _standin_config(args) -> dict:
    """The keeper arguments a stand-in for a lost node of this job needs (published in the store)."""
    return {"slots": args.slots, "nodes": args.nodes, "ec": args.ec, "max_parity_memory": args.max_parity_memory,
            "ec_chunk": args.ec_chunk, "ec_rate": args.ec_rate, "ec_nice": args.ec_nice, "ec_no_shared": args.ec_no_shared,
            "commit_timeout": args.commit_timeout}


def standin_args(config: dict) -> list[str]:
    """Command-line arguments of a stand-in keeper from a published :func:`_standin_config`."""
    out = ["--tiers", "[]", "--slots", str(config["slots"]), "--nodes", str(config["nodes"]),
           "--commit-timeout", str(config["commit_timeout"]), "--ec-chunk", str(config["ec_chunk"]),
           "--ec-nice", str(config["ec_nice"]), "--standin"]
    if config.get("ec"):
        out += ["--ec", config["ec"]]
    if config.get("max_parity_memory") is not None:
        out += ["--max-parity-memory", str(config["max_parity_memory"])]
    if config.get("ec_rate"):
        out += ["--ec-rate", str(config["ec_rate"])]
    if config.get("ec_no_shared"):
        out += ["--ec-no-shared"]
    return out


def _start_redundancy(keeper: Keeper, group: NodeGroup | None, args) -> None:
    """Peer reads for multi-node keepers; erasure coding with ``--ec``."""
    if group is None:
        if args.ec:
            log.error("--ec %s needs a multi-node keeper group: memory snapshots are not erasure-coded", args.ec)
        return
    bind = local_address(group.link.host)
    keeper.peer = PeerService(keeper, group.link, args.node, bind)
    if not args.ec:
        return
    try:
        k, m = parse_ec(args.ec)
        cfg = ECConfig(k, m, args.max_parity_memory, args.ec_chunk, args.ec_rate, nice=args.ec_nice, shared=not args.ec_no_shared)
        keeper.redundancy = Redundancy(keeper, group.link, cfg, args.node, args.nodes, bind)
    except RedundancyError as e:
        log.error("memory snapshots are not erasure-coded: %s", e)
        return
    keeper.redundancy.start()
    log.info("erasure coding RS(%d,%d) across nodes %s", k, m, keeper.redundancy.members)


def _own_directory(path: str, timeout_s: float = 60.0) -> bool:
    """Take the exclusive lock on ``path`` itself (held until exit).

    The lock is on the directory, which an exiting keeper removes while holding it;
    a lock obtained on a removed inode is retried. Returns False when another live
    keeper serves the directory (its socket answers).
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        os.makedirs(path, exist_ok=True)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(os.path.join(path, "keeper.sock"))
                return False
            except OSError:
                pass  # the owner is starting or exiting: wait for it
            finally:
                probe.close()
            time.sleep(0.05)
            continue
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            _LOCKS.append(fd)  # keep the descriptor (and the lock) for the process lifetime
            return True
        os.close(fd)
    raise SystemExit(f"could not lock {path} within {timeout_s:.0f}s")


_LOCKS: list[int] = []


#: a keeper started ahead of need (the launcher's next stand-in) takes only this argument and reads the
#: real ones, as a JSON list, from its stdin when it is needed (end of input: it leaves)
STANDBY_ARG = "--standby"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == [STANDBY_ARG]:
        # started ahead of need (a launcher's stand-in): imports are done; the arguments come when needed
        import stalwart.ckpt.erasure  # noqa: F401  (the codec a stand-in rebuilds with)

        line = sys.stdin.readline()
        if not line.strip():
            return 0
        argv = json.loads(line)
    ap = argparse.ArgumentParser(prog="python -m stalwart.ckpt.keeper", description="stalwart's per-node snapshot keeper")
    ap.add_argument("--shm-dir", required=True, help="shared-memory directory owned by this keeper")
    ap.add_argument("--tiers", required=True, help="JSON list of tier specs")
    ap.add_argument("--slots", type=int, default=2)
    ap.add_argument("--linger", type=float, default=300.0, help="seconds to wait for trainers after an abrupt disconnect")
    ap.add_argument("--commit-timeout", type=float, default=120.0,
                    help="seconds a memory commit waits for the other nodes' keepers before abandoning the step")
    ap.add_argument("--node", type=int, default=0)
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--group-addr", default=None, help="host:port of the keepers' store (multi-node)")
    ap.add_argument("--ec", default=None, help="k,m: erasure-code memory snapshots across groups of k+m nodes")
    ap.add_argument("--max-parity-memory", type=int, default=None, help="bytes of parity this keeper may hold")
    ap.add_argument("--ec-chunk", type=int, default=DEFAULT_CHUNK, help="bytes per erasure-coding transfer round")
    ap.add_argument("--ec-rate", type=float, default=None, help="bytes/s this keeper sends for erasure coding at most")
    ap.add_argument("--ec-nice", type=int, default=10, help="how much lower the coding threads' CPU priority is (0: same)")
    ap.add_argument("--ec-no-shared", action="store_true",
                    help="code over the network even when the whole group shares this machine's memory")
    ap.add_argument("--group-prefix", default="", help="key prefix of this job's keepers in a shared store")
    ap.add_argument("--shared-store", action="store_true",
                    help="the store at --group-addr is hosted elsewhere (the launcher's rendezvous store): only connect")
    ap.add_argument("--agent-pid", type=int, default=None,
                    help="the launcher agent of this node: live as long as it does, across trainer restarts")
    ap.add_argument("--node-id", default=None, help="the stable identity of the node this keeper serves")
    ap.add_argument("--standin", action="store_true",
                    help="hold a lost node's place in the redundancy group (no trainers, no tiers) until it is retired")
    ap.add_argument("--log-file", default=None)
    ap.add_argument("--keep-shm", action="store_true", help="do not remove the shared memory on exit")
    args = ap.parse_args(argv)

    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if args.log_file:
        os.makedirs(os.path.dirname(os.path.abspath(args.log_file)), exist_ok=True)
        handlers.append(logging.FileHandler(args.log_file))
    logging.basicConfig(level=os.environ.get("STALWART_KEEPER_LOG", "INFO"), handlers=handlers,
                        format=f"%(asctime)s keeper[node {args.node} pid {os.getpid()}] %(levelname)s %(message)s")
    if not _own_directory(args.shm_dir):
        log.info("another keeper serves %s; exiting", args.shm_dir)
        return 0
    signal.signal(signal.SIGTERM, lambda *_: None)  # stay alive for the flush; trainers' exit ends us
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if args.agent_pid is not None:
        write_owner(args.shm_dir, args.node_id, args.agent_pid, args.group_prefix or None)
        reclaim_orphans(os.path.dirname(os.path.abspath(args.shm_dir)), keep=os.path.abspath(args.shm_dir))
    tiers = [] if args.standin else [parse_tier(t) for t in json.loads(args.tiers)]
    group = None
    if args.nodes > 1:
        if not args.group_addr:
            raise SystemExit("--group-addr host:port is required with --nodes > 1")
        host, port = args.group_addr.rsplit(":", 1)
        group = NodeGroup(args.node, args.nodes, host, int(port), timeout_s=600,
                          host_store=False if args.shared_store else None, prefix=args.group_prefix)
    keeper = Keeper(args.shm_dir, tiers, num_slots=args.slots, linger_s=args.linger, node=args.node, group=group,
                    commit_timeout_s=args.commit_timeout, agent_pid=args.agent_pid, standin=args.standin,
                    node_id=args.node_id)
    if group is not None and not args.standin:  # what a stand-in for a lost node must be started with
        group.link.keep("config", json.dumps(_standin_config(args)))
    _start_redundancy(keeper, group, args)
    with open(os.path.join(args.shm_dir, "keeper.pid.tmp"), "w") as f:
        f.write(str(os.getpid()))
    os.replace(os.path.join(args.shm_dir, "keeper.pid.tmp"), os.path.join(args.shm_dir, "keeper.pid"))
    log.info("keeping %s with %d slots; tiers: %s", args.shm_dir, args.slots, ", ".join(t.url for t in tiers) or "memory only")
    try:
        _serve(keeper, os.path.join(args.shm_dir, "keeper.sock"))
        if keeper.standin and group is not None:  # tell the node that claims this slot that it may start its keeper
            with contextlib.suppress(Exception):
                group.link.set(f"standin/{args.node}/gone", args.node_id or "")
    finally:
        if not args.keep_shm:
            shutil.rmtree(args.shm_dir, ignore_errors=True)
            # the trainers' start lock: at worst a trainer starts a second keeper, which finds
            # this directory's lock taken by nobody and serves; two never run (see _own_directory)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(args.shm_dir + ".start")
        log.info("keeper exits")
    return 0


if __name__ == "__main__":
    sys.exit(main())
