"""The per-keeper redundancy agent: generations of a group, encode tasks, recovery of lost nodes."""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from stalwart.ckpt.pacing import Pacer
from stalwart.ckpt.redundancy.coding import encode_rounds, encode_shared
from stalwart.ckpt.redundancy.config import (
    HOST_ID,
    NODES_FILE,
    PARITY_BLOCK,
    PARITY_FILE,
    PARITY_META,
    PARITY_SPARE,
    ECConfig,
    RedundancyError,
    check_topology,
    group_members,
    read_text,
    snapshot_id,
)
from stalwart.ckpt.redundancy.geometry import Geometry, NodeBytes
from stalwart.ckpt.redundancy.rebuild import plan_rebuild, rebuild_rounds
from stalwart.ckpt.redundancy.transport import GlooTransport
from stalwart.ckpt.slots import Slot, SlotStore
from stalwart.ckpt.storelink import GroupError, StoreLink
from stalwart.errors import StalwartError
from stalwart.formats import checksum as ck

log = logging.getLogger("stalwart.keeper")


PG_TIMEOUT_S = 120.0  # one gloo transfer (a dead peer fails at once: its sockets close)
JOIN_TIMEOUT_S = 60.0
READY_WAIT_S = 30.0  # for this keeper's own memory commit of the step to encode
DONE_TIMEOUT_S = 600.0


@dataclass
class Session:
    """One generation of a redundancy group: its members' incarnations and gloo group."""

    prefix: str
    gen: int
    incs: dict[int, str]
    joins: list[dict]
    pg: Any
    client: Any
    can_share: bool = False  # this member can read every member's shared memory in place
    seq: int = 0
    checked: float = field(default_factory=time.monotonic)

    def close(self) -> None:
        self.pg = None
        self.client = None


@dataclass
class _Held:
    """A slot pinned for EC work and its memory maps (released in ``finally``)."""

    slot: Slot
    data: NodeBytes | None = None
    parity: torch.Tensor | None = None
    tmp: str | None = None


class Redundancy:
    """A keeper's part of its redundancy group (a background thread).

    Member 0 of the group leads: it starts a *generation* once every member's keeper is
    alive (``ec/g<g>/cur`` = generation number + the members' incarnations); members
    publish their inventory and build a fresh gloo group under the generation's store
    prefix, so a re-formed group never meets stale addresses. The leader's first task
    of a generation is recovery (rebuild the newest EC-protected step that some members
    lost, or report why it cannot be); then it issues one encode task at a time for the
    newest memory-committed step (steps are skipped when encoding is slower than
    snapshots). Any member's failure (a dead peer, a replaced keeper, a gloo error) ends
    the generation; the leader starts the next one.
    """

    def __init__(self, keeper: SlotStore, link: StoreLink, cfg: ECConfig, node: int, nodes: int, bind_host: str) -> None:
        from stalwart.ckpt.erasure import ReedSolomon

        check_topology(cfg.k, cfg.m, nodes)
        self.keeper, self.link, self.cfg = keeper, link, cfg
        self.node, self.nodes = node, nodes
        self.members = group_members(node, cfg.n)
        self.me = self.members.index(node)
        self.group = node // cfg.n
        self.bind_host = bind_host
        self.rs = ReedSolomon(cfg.k, cfg.m)
        self.meta: dict[int, dict] = {}  # slot index -> parity metadata (parity.json)
        self._parity_maps: dict[int, torch.Tensor] = {}  # slot index -> mapping of its parity.bin
        self._spares: dict[int, torch.Tensor] = {}  # slot index -> mapping of its parity.spare
        self.state = "forming"
        self.settled = False
        self.generation: int | None = None
        self.recovery_error: str | None = None
        self.member_ids: list[str | None] = []  # the members' node identities in the current generation
        self.errors: list[str] = []
        self.rebuilt: list[int] = []
        self.encoded = 0
        self.parity_reused = 0  # steps whose parity went into a set-aside buffer
        self.skipped = 0
        self.last_skip: str | None = None
        self._last_skip_why: str | None = None
        self.last_encode_s: float | None = None
        self.mode: str | None = None  # how the last step was coded: "gloo" or "shared-memory"
        self.last_encode_cpu_s: float | None = None  # CPU time of this keeper's coding thread for it
        self._last_gen: tuple[int, int] = (-1, 0)
        self._attempted: tuple[int, str] | None = None
        self._verified: set[tuple[int, int, str]] = set()
        with keeper.cond:
            self._load_parity()

    # ---------------------------------------------------------------- keeper hooks
    def start(self) -> None:
        threading.Thread(target=self.run, name="ec", daemon=True).start()

    def forget(self, slot: Slot) -> None:
        """The slot's snapshot is about to go (called by the keeper, lock held, before it
        removes the slot's files): its parity file is set aside, still mapped, for the
        slot's next step."""
        self.meta.pop(slot.index, None)
        buf = self._parity_maps.pop(slot.index, None)
        self._drop_spare(slot)
        cap = self.cfg.max_parity_memory
        if buf is not None and cap is not None:  # kept only while parity + set-aside fit the cap
            held = sum(int(m["size"]) for m in self.meta.values()) + sum(t.numel() for t in self._spares.values())
            if held + buf.numel() > cap:
                buf = None
        if buf is not None:
            try:
                os.replace(os.path.join(slot.dir, PARITY_FILE), os.path.join(slot.dir, PARITY_SPARE))
                self._spares[slot.index] = buf
            except OSError:
                pass

    def _drop_spare(self, slot: Slot) -> None:
        """Free the slot's set-aside parity file (its mapping first: a mapped file keeps its memory)."""
        self._spares.pop(slot.index, None)
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(slot.dir, PARITY_SPARE))

    def status(self) -> dict:
        """Called with the keeper's lock held."""
        slots = self.keeper.slots
        parity = sum(int(m["size"]) for m in self.meta.values())
        data = sum(int(m["data_bytes"]) for m in self.meta.values())
        return {
            "k": self.cfg.k, "m": self.cfg.m, "group": self.members, "member": self.me, "generation": self.generation,
            "state": self.state, "settled": self.settled, "member_ids": list(self.member_ids),
            "protected": sorted(s.step for s in slots if s.protected and s.step is not None),
            "parity_bytes": parity, "spare_parity_bytes": sum(t.numel() for t in self._spares.values()),
            "parity_reused": self.parity_reused,
            "overhead": self.cfg.overhead, "parity_per_data_byte": parity / data if data else None,
            "max_parity_memory": self.cfg.max_parity_memory, "encoded": self.encoded, "skipped": self.skipped,
            "last_skip": self.last_skip, "mode": self.mode, "last_encode_cpu_s": self.last_encode_cpu_s,
            "last_encode_s": self.last_encode_s, "codec": self.rs.resolve_backend([]), "rebuilt": list(self.rebuilt),
            "recovery_error": self.recovery_error,
            "errors": self.errors[-10:],
        }

    def _load_parity(self) -> None:
        """Parity of adopted slots (a restarted keeper on a node that kept its memory)."""
        for s in self.keeper.slots:
            with contextlib.suppress(FileNotFoundError):  # a previous keeper's set-aside buffer
                os.remove(os.path.join(s.dir, PARITY_SPARE))
            path = os.path.join(s.dir, PARITY_META)
            if not (s.complete and os.path.exists(path)):
                continue
            try:
                with open(path) as f:
                    meta = json.load(f)
                ok = (meta["step"], meta["sid"], meta["member"], meta["group"]) == (s.step, s.sid, self.me, self.group)
            except (OSError, ValueError, KeyError):
                ok = False
            if ok and os.path.getsize(os.path.join(s.dir, PARITY_FILE)) == int(meta["size"]):
                self.meta[s.index] = meta
            else:
                for name in (PARITY_FILE, PARITY_META):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(os.path.join(s.dir, name))

    def _stopping(self) -> bool:
        return self.keeper.stopping

    def _error(self, msg: str) -> None:
        log.error("%s", msg)
        self.errors.append(msg)
        del self.errors[:-20]

    # ---------------------------------------------------------------- main loop
    def run(self) -> None:
        _lower_priority(self.cfg.nice)
        backoff = 0.5
        while not self._stopping():
            session = None
            try:
                session = self._open()
                if session is None:
                    continue
                backoff = 0.5
                if self.me == 0:
                    self._lead(session)
                else:
                    self._follow(session)
            except Exception as e:
                if self._stopping():
                    break
                why = str(e).splitlines()[0] if str(e) else type(e).__name__
                log.warning("redundancy group %s: generation %s ended: %s", self.group, self.generation, why)
                log.debug("%s", traceback.format_exc())
                self.state, self.settled = "forming", False
                if session is not None:
                    with contextlib.suppress(Exception):
                        self.link.set(f"{session.prefix}/failed", f"node {self.node}: {why}")
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                if session is not None:
                    session.close()

    def _open(self) -> Session | None:
        self.state = "forming"
        if self.me == 0:
            self._new_generation()
        cur = self._await_generation()
        if cur is None:
            return None
        gen, incs = cur["gen"], dict(zip(self.members, cur["incs"], strict=True))
        # no store epoch in the key: a new store starts empty, and a keeper that restarted
        # the store counts epochs from 0 while the survivors count theirs from 1
        prefix = f"ec/g{self.group}/gen{gen}"
        self.link.set(f"{prefix}/join/node{self.node}", json.dumps(self._inventory()))
        joins = self.link.gather(f"{prefix}/join", self.members, incs=incs, timeout_s=JOIN_TIMEOUT_S,
                                 abort=lambda _: self._over(prefix, gen))
        pg, client = self._form_pg(prefix)
        self.generation = gen
        self.member_ids = [j.get("node_id") for j in joins]
        log.info("redundancy group %s (nodes %s): generation %s formed", self.group, self.members, gen)
        return Session(prefix, gen, incs, joins, pg, client, can_share=self._can_share(joins))

    def _new_generation(self) -> None:
        """Leader: wait until every member's keeper is alive, then announce a generation."""
        shown = 0.0
        while not self._stopping():
            incs = [self.link.get(f"inc/node{i}") for i in self.members]
            alive = set(self.link.alive(self.members))
            if all(incs) and alive == set(self.members):
                break
            if time.monotonic() - shown > 30:
                missing = [i for i, v in zip(self.members, incs, strict=True) if not v or i not in alive]
                log.info("redundancy group %s: waiting for the keepers of node(s) %s", self.group, missing)
                shown = time.monotonic()
            time.sleep(0.1)
        else:
            return
        gen = self.link.add(f"ec/g{self.group}/gen", 1)
        self.link.set(f"ec/g{self.group}/cur", json.dumps({"gen": gen, "incs": incs}))

    def _await_generation(self) -> dict | None:
        while not self._stopping():
            raw = self.link.get(f"ec/g{self.group}/cur")
            if raw:
                cur = json.loads(raw)
                key = (self.link.epoch, int(cur["gen"]))
                if key > self._last_gen and cur["incs"][self.me] == self.link.inc:
                    self._last_gen = key
                    return cur
            time.sleep(0.25)
        return None

    def _form_pg(self, prefix: str):
        import torch.distributed as dist

        client = self.link.new_client()
        store = dist.PrefixStore(f"{prefix}/pg", client)
        cls = dist.ProcessGroupGloo
        if hasattr(cls, "_Options"):
            opts = cls._Options()
            opts._timeout = datetime.timedelta(seconds=PG_TIMEOUT_S)
            opts._devices = [cls.create_device(hostname=self.bind_host)]
            return cls(store, self.me, self.cfg.n, opts), client
        return cls(store, self.me, self.cfg.n, datetime.timedelta(seconds=PG_TIMEOUT_S)), client  # pragma: no cover

    def _over(self, prefix: str, gen: int) -> str | None:
        """Why generation ``gen`` is over (a member failed, a newer one began), or None."""
        failed = self.link.get(f"{prefix}/failed")
        if failed:
            return f"a member failed ({failed})"
        raw = self.link.get(f"ec/g{self.group}/cur")
        if raw and int(json.loads(raw)["gen"]) != gen:
            return "the leader started a new generation"
        return None

    def _check(self, session: Session) -> None:
        """Raise when the generation is over: a member died or was replaced, someone failed,
        or the leader announced a newer generation."""
        if time.monotonic() - session.checked < 0.25:  # a few store reads: cheap, and recovery waits on it
            return
        session.checked = time.monotonic()
        others = [i for i in self.members if i != self.node]
        dead = self.link.dead(others, session.incs)
        if dead:
            raise GroupError(f"the keeper of node(s) {', '.join(map(str, dead))} is gone or was replaced")
        why = self._over(session.prefix, session.gen)
        if why:
            raise GroupError(why)

    def _lead(self, session: Session) -> None:
        self._run_task(session, self._recovery_task(session))
        while not self._stopping():
            self._check(session)
            task = self._encode_task()
            if task is None:
                with self.keeper.cond:
                    self.keeper.cond.wait(0.5)
                continue
            self._run_task(session, task)

    def _follow(self, session: Session) -> None:
        while not self._stopping():
            key = f"{session.prefix}/task/{session.seq}"
            if not self.link.wait([key], 1.0):
                self._check(session)
                continue
            self._execute(session, json.loads(self.link.get(key) or "{}"))

    def _run_task(self, session: Session, task: dict) -> None:
        self.link.set(f"{session.prefix}/task/{session.seq}", json.dumps(task))
        self._execute(session, task)

    def _execute(self, session: Session, task: dict) -> None:
        try:
            if task.get("op") == "recover":
                self._recover(session, task)
            elif task.get("op") == "encode":
                self._encode(session, task)
            else:
                raise RedundancyError(f"unknown task {task!r}")
        finally:
            old = session.seq - 2
            if old >= 0:
                for name in ("ready", "done"):
                    self.link.delete(f"{session.prefix}/t{old}/{name}/node{self.node}")
                if self.me == 0:
                    self.link.delete(f"{session.prefix}/task/{old}")
            session.seq += 1

    def _barrier(self, session: Session, name: str, payload: dict, timeout_s: float) -> list[dict]:
        key = f"{session.prefix}/t{session.seq}/{name}"
        self.link.set(f"{key}/node{self.node}", json.dumps(payload))
        return self.link.gather(key, self.members, incs=session.incs, timeout_s=timeout_s,
                                abort=lambda _: self._over(session.prefix, session.gen))

    # ---------------------------------------------------------------- slots
    def _find(self, step: int, sid: str) -> Slot | None:
        for s in self.keeper.slots:
            if s.complete and s.step == step and s.sid == sid:
                return s
        return None

    def _release(self, held: _Held | None, keep_tmp: bool = False) -> None:
        if held is None:
            return
        held.data = None
        held.parity = None
        if held.tmp and not keep_tmp:
            with contextlib.suppress(FileNotFoundError):
                os.remove(held.tmp)
        with self.keeper.cond:
            held.slot.pins -= 1
            self.keeper.cond.notify_all()

    def _geometry(self, slot: Slot) -> Geometry:
        files = []
        for node in self.members:
            mine = [r for r in slot.records if slot.owners.get(int(r["rank"])) == node]
            files.append(tuple(sorted((int(r["rank"]), str(r["path"]), int(r["size"])) for r in mine)))
        return Geometry(self.cfg.k, self.cfg.m, tuple(files))

    def _check_files(self, slot: Slot, geo: Geometry) -> None:
        recs = {int(r["rank"]): r for r in slot.records}
        for rank, path, size in geo.files[self.me]:
            r = recs.get(rank)
            if r is None or r["path"] != path or int(r["size"]) != size or not os.path.exists(os.path.join(slot.dir, path)):
                raise RedundancyError(f"rank {rank}'s file {path} ({size} bytes) is not in this keeper's snapshot")

    # ---------------------------------------------------------------- encoding
    def _encode_task(self) -> dict | None:
        """Leader: the newest memory-committed step not yet tried, if any."""
        with self.keeper.cond:
            ready = [s for s in self.keeper.slots if s.complete and s.sid and s.owners and s.step is not None]
            if not ready:
                return None
            slot = max(ready, key=lambda s: s.step)
            key = (slot.step, slot.sid)
            if self._attempted is not None and (slot.step < self._attempted[0] or key == self._attempted):
                return None
            self._attempted = key
            if slot.protected:
                return None
            geo = self._geometry(slot)
        return {"op": "encode", "step": key[0], "sid": key[1], "geometry": geo.to_json()}

    def _make_room(self, need: int, keep: Slot) -> str | None:
        """Drop older parity so ``need`` more bytes fit under the cap (lock held)."""
        cap = self.cfg.max_parity_memory
        if cap is None:
            return None
        if need > cap:
            return f"its parity ({need} bytes) exceeds max_parity_memory ({cap} bytes)"
        for s in self.keeper.slots:  # set-aside buffers protect nothing: freed before any parity
            if s is not keep and s.index in self._spares:
                self._drop_spare(s)
        held = {i: int(m["size"]) for i, m in self.meta.items()}
        by_age = sorted((s for s in self.keeper.slots if s.index in held and s is not keep and not s.pins),
                        key=lambda s: (s.protected, s.step))
        for s in by_age:
            if sum(held.values()) + need <= cap:
                break
            log.info("max_parity_memory: dropping the parity of step %s to protect a newer one", s.step)
            self._parity_maps.pop(s.index, None)
            for name in (PARITY_FILE, PARITY_META):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(s.dir, name))
            self.meta.pop(s.index, None)
            s.protected = False
            held.pop(s.index)
        if sum(held.values()) + need > cap:
            return f"max_parity_memory ({cap} bytes) is held by parity that is in use"
        return None

    def _prepare_encode(self, step: int, sid: str, geo: Geometry) -> tuple[_Held | None, str | None]:
        if self.keeper.standin:
            return None, (f"it stands in for a lost node and holds no data of step {step}: memory snapshots are"
                          " not erasure-coded until the node is replaced (disk tiers still protect them)")
        deadline = time.monotonic() + READY_WAIT_S
        with self.keeper.cond:
            slot = self._find(step, sid)
            while slot is None and time.monotonic() < deadline and not self._stopping():
                self.keeper.cond.wait(0.2)
                slot = self._find(step, sid)
            if slot is None:
                return None, f"step {step} is not (or no longer) complete in its memory"
            need = geo.parity_bytes(self.me)
            why = self._make_room(need, slot)
            if why:
                return None, why
            slot.pins += 1
        held = _Held(slot)
        try:
            self._check_files(slot, geo)
            held.data = NodeBytes.map_files([(os.path.join(slot.dir, p), s) for _, p, s in geo.files[self.me]])
            held.tmp = os.path.join(slot.dir, PARITY_FILE + ".tmp")
            held.parity = self._parity_buffer(slot, held.tmp, need)
        except Exception as e:
            self._release(held)
            return None, f"{type(e).__name__}: {e}"
        return held, None

    def _parity_buffer(self, slot: Slot, path: str, need: int) -> torch.Tensor:
        """A mapped file of ``need`` bytes at ``path`` for a step's parity: the slot's
        set-aside buffer when it has the size (every byte is overwritten), else a new file."""
        with self.keeper.cond:
            spare = self._spares.get(slot.index)
            if spare is not None and spare.numel() == need and need:
                os.replace(os.path.join(slot.dir, PARITY_SPARE), path)
                self._spares.pop(slot.index)
                self.parity_reused += 1
                return spare
            self._drop_spare(slot)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, need)
        finally:
            os.close(fd)
        return torch.from_file(path, shared=True, size=need, dtype=torch.uint8) if need else torch.empty(0, dtype=torch.uint8)

    def _encode(self, session: Session, task: dict) -> None:
        step, sid, geo = int(task["step"]), str(task["sid"]), Geometry.from_json(task["geometry"])
        held, why = self._prepare_encode(step, sid, geo)
        meta = None
        try:
            ready = self._barrier(session, "ready", {"ok": held is not None, "why": why, "share": session.can_share,
                                                     "dir": held.slot.dir if held else None},
                                  READY_WAIT_S + JOIN_TIMEOUT_S)
            bad = [f"node {self.members[i]}: {r['why']}" for i, r in enumerate(ready) if not r["ok"]]
            if bad:
                self._note_skip(step, "; ".join(bad))
                return
            self.state = "encoding"
            t0, c0 = time.perf_counter(), time.thread_time()
            peers = self._shared_peers(ready, geo)
            if peers is not None:  # one machine's shared memory: read the peers' files in place
                peers[self.me] = held.data
                self.mode = "shared-memory"
                encode_shared(geo, self.me, peers, held.parity, self.rs, self.cfg.chunk, self._stopping)
                del peers
            else:
                self.mode = "gloo"
                encode_rounds(geo, self.me, held.data, held.parity, GlooTransport(session.pg), self.rs, self.cfg.chunk,
                              Pacer(self.cfg.rate), self._stopping)
            meta = self._finish_parity(held, step, sid, geo)
            dt = time.perf_counter() - t0
            self.last_encode_cpu_s = time.thread_time() - c0
            with self.keeper.cond:
                self.meta[held.slot.index] = meta  # installed while pinned: the slot still holds this step
                self._parity_maps[held.slot.index] = held.parity
            self.state = "idle"
            # pinned until every member is done: peers may be reading this slot's files in place
            done = self._barrier(session, "done", {"ok": True}, DONE_TIMEOUT_S)
        finally:
            self._release(held)
            self.state = "idle"
        with self.keeper.cond:
            slot = held.slot
            if self.meta.get(slot.index) is meta and slot.complete and slot.step == step:
                slot.protected = all(r["ok"] for r in done)
            self.encoded += 1
            self.last_encode_s = dt
            self.keeper.cond.notify_all()
        log.debug("step %s EC-protected (%.3fs)", step, dt)

    def _can_share(self, joins: list[dict]) -> bool:
        """Whether every member's keeper keeps its memory on this machine, readable here."""
        return self.cfg.shared and all(
            j.get("host") == HOST_ID and j.get("shm") and os.access(j["shm"], os.R_OK | os.X_OK) for j in joins)

    def _shared_peers(self, ready: list[dict], geo: Geometry) -> list[NodeBytes | None] | None:
        """Every other member's data mapped from its slot directory when every member can
        read every member's memory in place (the same decision on all members, from the
        barrier's payloads); None: code over the network."""
        if not all(r.get("share") and r.get("dir") for r in ready):
            return None
        try:
            return [None if q == self.me else NodeBytes.map_files(
                [(os.path.join(ready[q]["dir"], path), size) for _, path, size in geo.files[q]])
                for q in range(geo.n)]
        except (OSError, RuntimeError) as e:  # the others read in place too: end the generation
            raise RedundancyError(f"reading the peers' snapshots in place failed: {e}") from e

    def _note_skip(self, step: int, why: str) -> None:
        """A step left unprotected: counted, reported in the status, logged once per reason."""
        self.skipped += 1
        self.last_skip = f"step {step} is not EC-protected: {why}"
        if self.me == 0 and why != self._last_skip_why:
            log.warning("%s", self.last_skip)
        self._last_skip_why = why

    def _finish_parity(self, held: _Held, step: int, sid: str, geo: Geometry) -> dict:
        sums = ck.block_checksums(held.parity.numpy(), PARITY_BLOCK) if held.parity.numel() else ck.block_checksums(b"")
        meta = {
            "v": 1, "step": step, "sid": sid, "group": self.group, "member": self.me, "members": self.members,
            "geometry": geo.to_json(), "size": held.parity.numel(), "data_bytes": geo.length(self.me),
            "block_size": PARITY_BLOCK, "checksums": ck.pack_checksums(sums),
        }
        from stalwart.formats.atomic import atomic_write

        os.replace(held.tmp, os.path.join(held.slot.dir, PARITY_FILE))
        held.tmp = None
        atomic_write(os.path.join(held.slot.dir, PARITY_META), json.dumps(meta).encode(), fsync=False)
        return meta

    # ---------------------------------------------------------------- recovery
    def _parity_intact(self, slot: Slot, meta: dict) -> bool:
        key = (slot.index, int(meta["step"]), str(meta["sid"]))
        if key in self._verified:
            return True
        try:
            size = int(meta["size"])
            path = os.path.join(slot.dir, PARITY_FILE)
            if os.path.getsize(path) != size:
                return False
            if size:
                buf = torch.from_file(path, shared=False, size=size, dtype=torch.uint8)
                ck.verify_blocks(buf.numpy(), ck.unpack_checksums(meta["checksums"]), 0, int(meta["block_size"]), path)
        except (OSError, ValueError, KeyError, StalwartError) as e:
            log.warning("parity of step %s in %s is damaged: %s", meta.get("step"), slot.dir, e)
            return False
        self._verified.add(key)
        return True

    def _inventory(self) -> dict:
        """What this keeper holds: complete snapshots and whether their parity is intact."""
        with self.keeper.cond:
            entries = [(s, self.meta.get(s.index)) for s in self.keeper.slots if s.complete and s.sid and s.step is not None]
            for s, _ in entries:
                s.pins += 1
        try:
            out = []
            for s, meta in entries:
                ok = meta is not None and self._parity_intact(s, meta)
                out.append({"step": s.step, "sid": s.sid, "parity": ok, "geometry": meta["geometry"] if ok else None,
                            "holders": sorted(set(s.owners.values()))})
        finally:
            with self.keeper.cond:
                for s, _ in entries:
                    s.pins -= 1
                self.keeper.cond.notify_all()
        return {"inc": self.link.inc, "slots": out, "host": HOST_ID, "shm": self.keeper.shm_dir,
                "node_id": self.keeper.node_id}

    def _loss_message(self, step: int, lost: Sequence[int], geo: Geometry | None, detail: str | None) -> str:
        nodes = ", ".join(str(self.members[p]) for p in lost)
        ranks = sorted(r for p in lost for r, _, _ in geo.files[p]) if geo is not None else []
        who = f"node{'s' if len(lost) > 1 else ''} {nodes}" + (f" (rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))})" if ranks else "")
        if len(lost) > self.cfg.m:
            return f"step {step}: {who} lost (more than m={self.cfg.m}); cannot rebuild from memory"
        return f"step {step}: {who} lost and {detail}; cannot rebuild from memory"

    def _recovery_task(self, session: Session) -> dict:
        """Leader: from every member's inventory, what to rebuild (or why not)."""
        n = self.cfg.n
        data_at: dict[tuple[int, str], set[int]] = {}
        parity_at: dict[tuple[int, str], set[int]] = {}
        geos: dict[tuple[int, str], dict] = {}
        # the members whose nodes took part in a step (an elastic job's smaller world leaves some out:
        # a member that never held a step has not lost it)
        part_of: dict[tuple[int, str], set[int]] = {}
        for p, join in enumerate(session.joins):
            for e in join["slots"]:
                key = (int(e["step"]), str(e["sid"]))
                data_at.setdefault(key, set()).add(p)
                holders = {self.members.index(h) for h in e.get("holders") or () if h in self.members}
                part_of.setdefault(key, set()).update(holders or range(n))
                if e["parity"]:
                    parity_at.setdefault(key, set()).add(p)
                    geos.setdefault(key, e["geometry"])
        newest_full = max((key[0] for key, ps in data_at.items() if ps >= part_of[key]), default=None)
        newer = sorted((key for key in data_at if newest_full is None or key[0] > newest_full), key=lambda kk: -kk[0])
        for key in newer:
            if key not in parity_at:
                continue
            lost = sorted(part_of[key] - data_at[key])
            geo = Geometry.from_json(geos[key])
            try:
                plan_rebuild(geo, lost, sorted(parity_at[key]), self.members)
            except RedundancyError as e:
                return {"op": "recover", "plan": "report", "error": self._loss_message(key[0], lost, geo, str(e))}
            donors = sorted(data_at[key] & parity_at[key]) or sorted(data_at[key])
            return {"op": "recover", "plan": "rebuild", "step": key[0], "sid": key[1], "lost": lost,
                    "parity": sorted(parity_at[key]), "geometry": geos[key], "donor": donors[0]}
        if newer:
            key = newer[0]
            lost = sorted(part_of[key] - data_at[key])
            # members that hold snapshots but not this one are usually still committing it (the group
            # formed while training ran): said without alarm; an empty keeper (a replacement) lost it
            behind = all(p < len(session.joins) and session.joins[p]["slots"] for p in lost)
            return {"op": "recover", "plan": "report", "behind": behind,
                    "error": self._loss_message(key[0], lost, None, "no member holds parity of it")}
        return {"op": "recover", "plan": "none"}

    def _recover(self, session: Session, task: dict) -> None:
        plan = task["plan"]
        if plan == "none":
            self.recovery_error = None
        elif plan == "report":
            self.recovery_error = task["error"]
            if task.get("behind"):
                log.info("%s (the node(s) may still be committing it)", task["error"])
            else:
                log.error("%s", task["error"])
        else:
            self.state = "rebuilding"
            self._rebuild(session, task)
        self.settled = True
        self.state = "idle"

    def _pin_source(self, step: int, sid: str, geo: Geometry, need_parity: bool) -> _Held:
        with self.keeper.cond:
            slot = self._find(step, sid)
            if slot is None:
                raise RedundancyError(f"step {step} is no longer in its memory")
            meta = self.meta.get(slot.index)
            slot.pins += 1
        held = _Held(slot)
        try:
            self._check_files(slot, geo)
            held.data = NodeBytes.map_files([(os.path.join(slot.dir, p), s) for _, p, s in geo.files[self.me]])
            if need_parity:
                if meta is None or (meta["step"], meta["sid"]) != (step, sid):
                    raise RedundancyError(f"its parity of step {step} is gone")
                size = int(meta["size"])
                held.parity = torch.from_file(os.path.join(slot.dir, PARITY_FILE), shared=True, size=size, dtype=torch.uint8)
        except BaseException:
            self._release(held)
            raise
        return held

    def _pin_target(self, step: int, geo: Geometry) -> _Held:
        with self.keeper.cond:
            complete = [s for s in self.keeper.slots if s.complete]
            newest = max(complete, key=lambda s: s.step) if complete else None
            free = [s for s in self.keeper.slots if not s.pinned and s is not newest and (s.step is None or s.complete)]
            if not free:  # never a slot a trainer is filling, nor the newest snapshot
                raise RedundancyError("no snapshot slot is free to rebuild into")
            slot = min(free, key=lambda s: (s.step is not None, s.protected, s.step or 0))
            self.keeper.uncommit(slot)
            slot.step = step
            slot.pins += 1
        held = _Held(slot)
        try:
            held.data = NodeBytes.map_files([(os.path.join(slot.dir, p), s) for _, p, s in geo.files[self.me]], create=True)
        except BaseException:
            self._release(held)
            raise
        return held

    def _rebuild(self, session: Session, task: dict) -> None:
        step, sid, geo = int(task["step"]), str(task["sid"]), Geometry.from_json(task["geometry"])
        lost, parity_ok, donor = list(task["lost"]), list(task["parity"]), int(task["donor"])
        plan = plan_rebuild(geo, lost, parity_ok, self.members)
        senders = {geo.holder(j, s) for j, sp in plan.stripes.items() for s in sp.chosen}
        held = None
        payload: dict = {"ok": True}
        try:
            if self.me in lost:
                held = self._pin_target(step, geo)
            else:
                held = self._pin_source(step, sid, geo, need_parity=self.me in senders and self.me in parity_ok)
            if self.me == donor:
                payload["manifest"] = read_text(os.path.join(held.slot.dir, "manifest.json"))
                payload["nodes"] = read_text(os.path.join(held.slot.dir, NODES_FILE))
        except Exception as e:
            payload = {"ok": False, "why": f"{type(e).__name__}: {e}"}
        ok, why = True, None
        try:
            ready = self._barrier(session, "ready", payload, JOIN_TIMEOUT_S)
            bad = [f"node {self.members[i]}: {r['why']}" for i, r in enumerate(ready) if not r["ok"]]
            if bad:
                self.recovery_error = f"step {step}: rebuilding from memory failed ({'; '.join(bad)})"
                self._error(self.recovery_error)
                return
            t0 = time.perf_counter()
            rebuild_rounds(geo, plan, self.me, held.data, held.parity, GlooTransport(session.pg), self.rs,
                           self.cfg.chunk, self._stopping)
            if self.me in lost:
                try:
                    self._install(held, step, sid, geo, ready[donor].get("manifest"), ready[donor].get("nodes"))
                except Exception as e:
                    ok, why = False, f"{type(e).__name__}: {e}"
            dt = time.perf_counter() - t0
        finally:
            if held is not None and self.me in lost:
                with self.keeper.cond:
                    if not held.slot.complete:  # a half-rebuilt slot is garbage
                        self.keeper.uncommit(held.slot)
            self._release(held)
        done = self._barrier(session, "done", {"ok": ok, "why": why}, DONE_TIMEOUT_S)
        bad = [f"node {self.members[i]}: {r['why']}" for i, r in enumerate(done) if not r["ok"]]
        if bad:
            self.recovery_error = f"step {step}: the rebuilt snapshot does not verify ({'; '.join(bad)})"
            self._error(self.recovery_error)
            return
        self.recovery_error = None
        if self.me in lost:
            self.rebuilt.append(step)
            log.warning("rebuilt the memory snapshot of step %s (nodes %s lost it) from the group's survivors in %.2fs",
                        step, [self.members[p] for p in lost], dt)

    def _install(self, held: _Held, step: int, sid: str, geo: Geometry, manifest_text: str | None, nodes_text: str | None) -> None:
        """Verify the rebuilt files against the donor's manifest, then commit the slot."""
        from stalwart.formats.atomic import atomic_write
        from stalwart.formats.datafile import read_header, verify_file
        from stalwart.formats.manifest import MANIFEST_NAME, Manifest

        if not manifest_text:
            raise RedundancyError("the donor sent no manifest")
        obj = json.loads(manifest_text)
        manifest = Manifest.from_json(obj, "rebuilt manifest")
        if snapshot_id([f.to_json() for f in manifest.files]) != sid:
            raise RedundancyError(f"the donor's manifest is not the one of step {step}'s snapshot")
        slot = held.slot
        held.data = None  # unmap before reading back through the file system
        for rank, path, _ in geo.files[self.me]:
            record = manifest.file_of_rank(rank)
            full = os.path.join(slot.dir, path)
            fd = os.open(full, os.O_RDONLY)
            try:
                verify_file(fd, read_header(fd, full, record))
            finally:
                os.close(fd)
        if nodes_text:
            atomic_write(os.path.join(slot.dir, NODES_FILE), nodes_text.encode(), fsync=False)
        atomic_write(os.path.join(slot.dir, MANIFEST_NAME), manifest_text.encode(), fsync=False)
        with self.keeper.cond:
            self.keeper.adopt_slot(slot)
            slot.rebuilt = True
            self.keeper.cond.notify_all()


def _lower_priority(nice: int) -> None:
    """Run this thread (and the gloo threads it starts, which inherit it) at a lower CPU
    priority: coding uses the cycles training leaves idle and never competes with it
    (Linux: ``nice`` is per thread)."""
    if nice <= 0 or not hasattr(os, "setpriority"):
        return
    with contextlib.suppress(OSError):
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
