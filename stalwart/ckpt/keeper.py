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
from dataclasses import dataclass, field

from stalwart.ckpt.protocol import Channel
from stalwart.ckpt.redundancy import (
    DEFAULT_CHUNK,
    NODES_FILE,
    SLOT_EXTRA_FILES,
    ECConfig,
    PeerService,
    Redundancy,
    RedundancyError,
    StoreLink,
    local_address,
    parse_ec,
    snapshot_id,
)
from stalwart.ckpt.tiers import Tier, TierSpec, open_tier, parse_tier
from stalwart.formats.atomic import atomic_write
from stalwart.formats.datafile import FileRecord
from stalwart.formats.layout import Layout
from stalwart.formats.manifest import MANIFEST_NAME, Manifest, rank_file_name, read_manifest

log = logging.getLogger("stalwart.keeper")


@dataclass
class Slot:
    index: int
    dir: str
    step: int | None = None
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

    @property
    def pinned(self) -> bool:
        return self.persisting or self.pins > 0


class NodeGroup:
    """Commit metadata exchange between the keepers of several nodes (a TCPStore).

    Node 0 hosts the store; every keeper publishes the records of the files it wrote
    for a step, node 0 writes the manifest once all nodes published. The store link
    reconnects after node 0's keeper restarts, and a gather gives up early (naming the
    nodes) when a keeper it waits for is dead or was replaced.
    """

    def __init__(self, node: int, nodes: int, host: str, port: int, timeout_s: float) -> None:
        self.node = node
        self.nodes = nodes
        self.timeout_s = timeout_s
        self.link = StoreLink(host, port, node, nodes, timeout_s=timeout_s)

    def publish(self, key: str, obj) -> None:
        self.link.set(f"{key}/node{self.node}", json.dumps(obj))

    def gather(self, key: str, incs: dict | None = None, timeout_s: float | None = None, abort=None) -> list:
        return self.link.gather(key, range(self.nodes), incs=incs, timeout_s=timeout_s or self.timeout_s, abort=abort)


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
    ) -> None:
        self.shm_dir = shm_dir
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
        self.clean_bye: set[int] = set()
        self.ever_connected = False
        self.last_disconnect = time.monotonic()
        self.persisted: dict[str, set[int]] = {t.name: set(t.committed_steps()) for t in self.tiers}
        self.errors: dict[tuple[str, int], str] = {}
        self.forced: int | None = None  # a step to persist to every tier regardless of 'every'
        self.skipped: set[int] = set()  # steps no slot was given to (decided once for all ranks)
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
                self._adopt_slot(s)
            except Exception as e:  # a damaged slot is dropped, not fatal
                log.warning("dropping slot %s: %s", s.dir, e)
                self._uncommit(s)

    def _adopt_slot(self, s: Slot) -> None:
        """Take a slot directory with a manifest as a complete memory snapshot."""
        m = read_manifest(s.dir)
        s.step, s.complete = m.step, True
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
        }

    def _uncommit(self, slot: Slot) -> None:
        if self.redundancy is not None:  # first: it may set the slot's parity buffer aside for reuse
            self.redundancy.forget(slot)
        for name in (MANIFEST_NAME, *SLOT_EXTRA_FILES):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(slot.dir, name))
        slot.step, slot.complete, slot.done, slot.objects = None, False, {}, {}
        slot.protected, slot.sid, slot.records, slot.owners, slot.incs = False, None, [], {}, {}

    # ------------------------------------------------------------------ ops
    def op_hello(self, msg: dict) -> dict:
        rank = int(msg["rank"])
        with self.cond:
            self.local_ranks.update(int(r) for r in msg["local_ranks"])
            self.ever_connected = True
            self.clean_bye.discard(rank)
            return {"pid": os.getpid(), **self.status(), "shm_dir": self.shm_dir}

    def op_plan(self, msg: dict) -> dict:
        """(Re)size this rank's slot files for a new plan; drops memory snapshots of an older plan."""
        rank = int(msg["rank"])
        size = int(msg["file_size"])
        with self.cond:
            # files are resized / snapshots dropped only for a new plan: never under a reader
            while (msg.get("sig") != self.plan_sig or self.file_sizes.get(rank) != size) and any(s.pinned for s in self.slots):
                self.cond.wait(0.5)
            if self.peer is not None:
                self.peer.purge()  # snapshots again: restores (and their peer views) are over
            self.session = msg.get("session") or self.session
            if msg.get("sig") != self.plan_sig:
                for s in self.slots:
                    if s.step is not None:
                        self._uncommit(s)
                self.plan_sig = msg.get("sig")
            self.layout_json = msg["layout"]
            self.topology = msg.get("topology", {})
            resized = self.file_sizes.get(rank) != size
            self.file_sizes[rank] = size
            for s in self.slots:
                path = os.path.join(s.dir, rank_file_name(rank))
                if resized and s.step is not None and rank in s.done:
                    self._uncommit(s)  # its copy of this rank's file is about to change size
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    if os.fstat(fd).st_size != size:
                        os.ftruncate(fd, size)
                finally:
                    os.close(fd)
            return {"slots": [s.dir for s in self.slots], "pool_bytes": len(self.slots) * sum(self.file_sizes.values())}

    def op_acquire(self, msg: dict) -> dict:
        """The slot every local rank writes snapshot ``step`` into (one decision per step).

        Never reused: a pinned slot (being persisted, erasure-coded or read by a peer),
        the newest complete snapshot (memory always keeps one), the newest EC-protected
        one, and a slot another rank is still filling (the request waits for that copy
        instead: the caller would wait at its next collective anyway). With nothing left,
        the step is skipped for every rank. Complete snapshots of this step or later
        belong to an abandoned run (the trainers restarted from an earlier step): dropped.
        """
        step = int(msg["step"])
        deadline = time.monotonic() + float(msg.get("timeout", 30.0))
        with self.cond:
            if msg.get("must"):
                self.skipped.discard(step)  # a final / save_now snapshot overrides an earlier skip
            while True:
                for s in self.slots:
                    if s.step == step and not s.complete:
                        return {"slot": s.index}
                if step in self.skipped:
                    return {"slot": None, "reason": "skipped"}
                for s in self.slots:
                    if s.complete and s.step >= step and not s.pinned:
                        log.info("dropping the memory snapshot of step %s: the trainers restarted from an earlier step", s.step)
                        self._uncommit(s)
                newest = max((s for s in self.slots if s.complete), key=lambda s: s.step, default=None)
                protected = max((s for s in self.slots if s.protected), key=lambda s: s.step, default=None)
                for s in self.slots:  # a copy of a step older than a complete one can never be needed
                    if s.step is not None and not s.complete and not s.pinned and newest is not None and s.step <= newest.step:
                        log.warning("reclaiming slot %s: its copy of step %s never completed", s.index, s.step)
                        self._uncommit(s)
                usable = [s for s in self.slots
                          if not s.pinned and s is not newest and s is not protected and (s.step is None or s.complete)]
                if usable:
                    empty = [s for s in usable if s.step is None]
                    chosen = empty[0] if empty else min(usable, key=lambda s: s.step)
                    self._uncommit(chosen)
                    chosen.step = step
                    log.debug("step %s -> slot %s (rank %s)", step, chosen.index, msg.get("rank"))
                    return {"slot": chosen.index}
                filling = [s for s in self.slots if s.step is not None and not s.complete and s.step < step]
                draining = any(s.pinned for s in self.slots)
                wait = filling or (msg.get("must") and draining)
                if not wait or time.monotonic() > deadline:
                    self.skipped.add(step)
                    if self.group is not None:
                        threading.Thread(target=self._publish_skip, args=(step,), daemon=True).start()
                    if len(self.skipped) > 1024:
                        self.skipped = set(sorted(self.skipped)[-512:])
                    reason = "every slot is being persisted or holds the newest snapshot"
                    return {"slot": None, "reason": reason}
                self.cond.wait(0.2)

    def op_done(self, msg: dict) -> dict:
        rank, step, index = int(msg["rank"]), int(msg["step"]), int(msg["slot"])
        with self.cond:
            slot = self.slots[index] if 0 <= index < len(self.slots) else None
            if slot is None or slot.step != step or self.layout_json is None or rank not in self.file_sizes:
                log.debug("stale done: step %s slot %s rank %s", step, index, rank)
                return {"committed": False, "stale": True}
            slot.done[rank] = msg["record"]
            if msg.get("objects") is not None:
                slot.objects = msg["objects"]
            if set(slot.done) >= self.local_ranks:
                if self.group is None:
                    self._commit_memory(slot, [slot.done[r] for r in sorted(slot.done)], slot.objects)
                    self.cond.notify_all()
                else:  # waits for the other nodes: never while holding the lock
                    threading.Thread(target=self._commit_memory_multinode, args=(slot, step), daemon=True).start()
            return {"committed": slot.complete}

    def _manifest(self, slot: Slot, records: list[dict]) -> Manifest:
        return Manifest(
            layout=Layout.from_json(self.layout_json),
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
        slot.complete = True
        log.debug("memory commit of step %s in slot %s", slot.step, slot.index)

    def _key(self, kind: str, step: int) -> str:
        """A key of the multi-node exchange, within the trainers' run (see guard's session)."""
        return f"{kind}/{self.session}/{step}" if self.session else f"{kind}/{step}"

    def _publish_skip(self, step: int) -> None:
        """Tell the other nodes this node skipped ``step``: they abandon their copies of it."""
        with contextlib.suppress(Exception):
            self.group.publish(self._key("mem", step), {"skipped": True, "inc": self.group.link.inc})

    def _commit_memory_multinode(self, slot: Slot, step: int) -> None:
        with self.cond:
            local = [slot.done[r] for r in sorted(slot.done)]
            objects = slot.objects
        key = self._key("mem", step)
        try:
            self.group.publish(key, {"records": local, "objects": objects, "inc": self.group.link.inc})
            self._publish_latest("mem", step)
            since: dict[int, float] = {}
            parts = self.group.gather(key, abort=lambda missing: self._went_past("mem", step, missing, since))
            skipped = [i for i, p in enumerate(parts) if p.get("skipped")]
            if skipped:
                raise RedundancyError(f"node(s) {', '.join(map(str, skipped))} skipped it")
        except Exception as e:
            log.log(logging.DEBUG if "skipped it" in str(e) else logging.ERROR,
                    "memory commit of step %s: the other nodes did not report (%s)", step, e)
            with self.cond:
                if slot.step == step and not slot.complete and not slot.pinned:
                    self._uncommit(slot)  # never completes: free it (ranks waiting in acquire go on)
                    self.cond.notify_all()
            return
        with self.cond:
            if slot.step != step or slot.complete:
                return  # overwritten meanwhile
            records = [r for p in parts for r in p["records"]]
            objects = next((p["objects"] for p in parts if p["objects"]), objects)
            slot.owners = {int(r["rank"]): node for node, p in enumerate(parts) for r in p["records"]}
            slot.incs = {node: p.get("inc") for node, p in enumerate(parts)}
            atomic_write(os.path.join(slot.dir, NODES_FILE), json.dumps(slot.owners).encode(), fsync=False)
            self._commit_memory(slot, records, objects)
            self.cond.notify_all()

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
                self._uncommit(slot)
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
        deadline = time.monotonic() + float(msg.get("timeout", 3600))
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
                    return {"done": False, "pending": pending, "error": f"step {step} is not in memory (skipped or superseded)",
                            **self.status()}
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
        with self.cond:
            if msg.get("clean"):
                self.clean_bye.add(int(msg["rank"]))
        return {}

    # ------------------------------------------------------------------ persistence
    def _pending_work(self) -> tuple[Slot, list[Tier], bool] | None:
        complete = sorted((s for s in self.slots if s.complete), key=lambda s: -s.step)
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
                manifest_base = read_manifest(slot.dir)
                incs = dict(slot.incs)
            try:
                for tier in todo:
                    self._persist(tier, slot, step, records, manifest_base, incs)
            finally:
                with self.cond:
                    slot.persisting = False
                    if forced and self.forced == step and self._pending_work() is None:
                        self.forced = None
                    self.cond.notify_all()

    def _persist(self, tier: Tier, slot: Slot, step: int, local: list[FileRecord], base: Manifest, incs: dict) -> None:
        t0 = time.perf_counter()
        try:
            stored = tier.put_files(step, slot.dir, local)
            if self.group is not None:
                key = self._key(tier.name, step)
                self.group.publish(key, [r.to_json() for r in stored])
                self._publish_latest(tier.name, step)
                if self.node != 0:
                    with self.cond:
                        self.persisted[tier.name].add(step)
                    return
                # gives up early when a node's keeper that held this step died or was replaced, or
                # persisted a newer step instead; nodes persist the same steps at about the same time
                parts = self.group.gather(key, incs=incs or None, timeout_s=120 + 2 * (time.perf_counter() - t0),
                                          abort=lambda missing: self._went_past(tier.name, step, missing))
                stored = [FileRecord.from_json(r) for part in parts for r in part]
            manifest = Manifest(base.layout, sorted(stored, key=lambda f: f.rank), step, base.objects, None, base.topology, base.block_size)
            tier.commit(step, manifest)
            nbytes = sum(r.size for r in local)
            dt = time.perf_counter() - t0
            log.info("step %s -> %s: %.1f MB in %.2fs (%.2f GB/s)", step, tier.name, nbytes / 1e6, dt, nbytes / dt / 1e9 if dt else 0)
            with self.cond:
                self.persisted[tier.name] = set(tier.committed_steps())
                self.persisted[tier.name].add(step)
        except Exception as e:
            log.error("persisting step %s to %s failed: %s\n%s", step, tier.name, e, traceback.format_exc())
            with self.cond:
                self.errors[(tier.name, step)] = f"{type(e).__name__}: {e}"

    # ------------------------------------------------------------------ connections
    def serve_client(self, conn: socket.socket) -> None:
        chan = Channel(conn)
        rank = None
        try:
            while True:
                msg = chan.recv()
                if msg is None:
                    break
                op = msg.get("op")
                if op == "hello":
                    rank = int(msg["rank"])
                    with self.cond:
                        self.connected[rank] = chan
                handler = getattr(self, f"op_{op}", None)
                if handler is None:
                    chan.send({"ok": False, "error": f"unknown op {op!r}"})
                    continue
                try:
                    reply = handler(msg)
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
                for s in self.slots:
                    if s.step is not None and not s.complete and not s.pinned:
                        self._uncommit(s)  # an unfinished copy is garbage
                newest = max((s.step for s in self.slots if s.complete), default=None)
                if newest is not None:
                    self.forced = newest if self.forced is None else max(self.forced, newest)
            self.cond.notify_all()

    def idle_exit_due(self) -> bool:
        with self.cond:
            if self.connected or not self.ever_connected:
                return False
            busy = any(s.persisting for s in self.slots) or self._pending_work() is not None
            if busy:
                return False
            if self.local_ranks and self.clean_bye >= self.local_ranks:
                return True
            return time.monotonic() - self.last_disconnect > self.linger_s


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
                if not keeper.ever_connected and time.monotonic() - started > max(keeper.linger_s, 60):
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stalwart.ckpt.keeper", description="stalwart's per-node snapshot keeper")
    ap.add_argument("--shm-dir", required=True, help="shared-memory directory owned by this keeper")
    ap.add_argument("--tiers", required=True, help="JSON list of tier specs")
    ap.add_argument("--slots", type=int, default=2)
    ap.add_argument("--linger", type=float, default=300.0, help="seconds to wait for trainers after an abrupt disconnect")
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
    tiers = [parse_tier(t) for t in json.loads(args.tiers)]
    group = None
    if args.nodes > 1:
        if not args.group_addr:
            raise SystemExit("--group-addr host:port is required with --nodes > 1")
        host, port = args.group_addr.rsplit(":", 1)
        group = NodeGroup(args.node, args.nodes, host, int(port), timeout_s=600)
    keeper = Keeper(args.shm_dir, tiers, num_slots=args.slots, linger_s=args.linger, node=args.node, group=group)
    _start_redundancy(keeper, group, args)
    with open(os.path.join(args.shm_dir, "keeper.pid.tmp"), "w") as f:
        f.write(str(os.getpid()))
    os.replace(os.path.join(args.shm_dir, "keeper.pid.tmp"), os.path.join(args.shm_dir, "keeper.pid"))
    log.info("keeping %s with %d slots; tiers: %s", args.shm_dir, args.slots, ", ".join(t.url for t in tiers) or "memory only")
    try:
        _serve(keeper, os.path.join(args.shm_dir, "keeper.sock"))
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
