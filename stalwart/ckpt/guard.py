"""``stalwart.protect()``: the context manager a training loop runs under.

    with stalwart.protect(model, optimizer, root="ckpt/", every=1,
                          tiers=["memory", "local:/nvme/ckpt", "file:///lustre/run7"]) as guard:
        for batch in guard.resume(loader):
            loss = model(batch).mean()
            loss.backward()
            optimizer.step()          # waits here only if the last snapshot's copy is unfinished
            optimizer.zero_grad()
            guard.step()              # requests the next lazy snapshot

On entry the newest good checkpoint (memory first, then each tier in order; a
corrupt or partial one falls back, with a warning naming why) is restored. Every
``every`` steps, ``guard.step()`` copies small state at once and lets the params
and optimizer state drain into host memory in the background; the node's keeper
process persists them to the slower tiers. On normal exit the final state is saved
and drained; on an exception the last good snapshot is persisted and kept; on
SIGTERM (preemption) a final checkpoint is written within ``preempt_deadline_s``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from stalwart.ckpt.dist import in_process, side_group, where_am_i
from stalwart.ckpt.keeper_client import KeeperClient
from stalwart.ckpt.protocol import KeeperGone
from stalwart.ckpt.providers.base import Collected, RestoreContext, StateProvider
from stalwart.ckpt.providers.data import DataProvider, ResumableLoader, data_targets
from stalwart.ckpt.providers.module import (
    ModuleProvider,
    fix_ddp_buckets,
    is_deepspeed_engine,
    mesh_from_model,
    unwrap,
)
from stalwart.ckpt.providers.objects import StatefulProvider
from stalwart.ckpt.providers.optimizer import OptimizerProvider
from stalwart.ckpt.providers.rng import RNGProvider, unpack_rng
from stalwart.ckpt.redundancy import ECConfig, check_topology, missing_reads
from stalwart.ckpt.redundancy.peer import SOURCES_FILE
from stalwart.ckpt.snapshot import Copier, SnapshotPlan, build_plan, final_header, map_slot_file
from stalwart.ckpt.tiers import Tier, TierSpec, open_tier, parse_tiers
from stalwart.errors import StalwartError
from stalwart.formats.layout import Layout, Mesh, Replicated
from stalwart.formats.manifest import rank_file_name
from stalwart.formats.reader import Checkpoint

log = logging.getLogger("stalwart.ckpt")

#: the source name of restored state a process kept in its own tensors (in-process recovery)
KEPT_SOURCE = "kept in process"


@dataclass(frozen=True)
class _LiveMark:
    """A model whose live tensors hold exactly snapshot ``step`` (no optimizer step since)."""

    step: int
    optimizer: int  # id() of the optimizer the mark is valid with
    rng: bytes | None  # this process's RNG streams as captured by that snapshot
    taken: bool = True  # the keeper took the snapshot (False: back-pressure skipped it; the tensors still hold it)
    # What a restore of ``step`` needs besides the kept tensors, for when the snapshot never
    # committed (a node died before its keeper's share of the step was in): copies of the eager
    # items (buffers, scheduler tensors, per-rank data position; small, they change in forward),
    # the objects (scheduler, data position, step), and the layout the snapshot was planned for.
    eager: dict | None = None
    objects: dict | None = None
    saved: Mapping | None = None  # name -> TensorSpec of the snapshot's layout (the plan's, not copied)
    mesh: Mesh | None = None


#: in-process recovery (:mod:`stalwart.elastic.inprocess`): id(module) -> its live mark; set when a
#: snapshot is taken, dropped at the next optimizer step. A guard entered again in the same process
#: keeps those tensors instead of copying them back from the snapshot.
_LIVE: dict[int, _LiveMark] = {}


class Preempted(SystemExit):
    """Raised from ``guard.step()`` after the final checkpoint of a SIGTERM was written."""

    def __init__(self) -> None:
        super().__init__(143)


@dataclass
class GuardStats:
    snapshots: int = 0
    skipped: int = 0
    blocking_s: float = 0.0  # total time the training loop waited for snapshots
    step_call_s: float = 0.0  # total time spent inside guard.step()
    last_blocking_s: float = 0.0
    pool_bytes: int = 0
    restored_step: int | None = None
    restored_from: str | None = None
    restore_sources: dict = field(default_factory=dict)  # bytes this rank restored, by source (see _byte_sources)
    fallbacks: list[str] = field(default_factory=list)
    parity_bytes: int = 0  # erasure-coding parity this node's keeper holds (redundancy=)
    parity_overhead: float | None = None  # m / k
    redundancy: dict = field(default_factory=dict)  # the keeper's last erasure-coding status


@dataclass(frozen=True)
class Timeouts:
    """How long stalwart waits for each thing that can stall; every wait is bounded.

    A wait that can no longer succeed (a rank moved on without its copy, left, or died)
    ends at once with a message naming the step and the rank; these bounds only cover
    work that is still progressing slowly.
    """

    slot_s: float = 120.0  # a final / save_now snapshot waits for a free slot and for the other local ranks' copies
    persist_s: float = 300.0  # exit, save_now() and wait() wait for the step to reach every tier
    commit_s: float = 120.0  # (multi-node) a memory commit waits for the other nodes' keepers
    restore_s: float = 300.0  # restore: agreeing with the other ranks, reading other nodes' memory
    keeper_reply_s: float = 60.0  # a keeper request may take this long beyond its own wait, then the keeper is gone

    @classmethod
    def coerce(cls, value) -> Timeouts:
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            unknown = set(value) - set(cls.__dataclass_fields__)
            if unknown:
                raise StalwartError(f"timeouts: unknown keys {sorted(unknown)} (known: {sorted(cls.__dataclass_fields__)})")
            t = cls(**{k: float(v) for k, v in value.items()})
        else:
            raise StalwartError(f"timeouts must be a Timeouts or a dict, not {type(value).__name__}")
        bad = [k for k, v in t.__dict__.items() if not v > 0]
        if bad:
            raise StalwartError(f"timeouts must be positive seconds: {bad}")
        return t


@dataclass(frozen=True)
class Latest:
    step: int
    tiers: tuple[str, ...]


class Guard:
    """The handle ``protect()`` yields; see the module docstring."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer,
        *,
        root: str,
        every: int = 1,
        tiers=None,
        scheduler=None,
        extra: Mapping[str, object] | None = None,
        max_host_memory: int | None = None,
        slots: int = 2,
        keeper_linger_s: float = 300.0,
        preempt_deadline_s: float = 60.0,
        resume: bool = True,
        final_checkpoint: bool = True,
        providers: list[StateProvider] | None = None,
        redundancy=None,
        max_parity_memory: int | None = None,
        timeouts: Timeouts | Mapping | None = None,
        fixed_ddp_buckets: bool = False,
    ) -> None:
        if every < 1:
            raise StalwartError("every must be >= 1")
        self.timeouts = Timeouts.coerce(timeouts)
        self.fixed_ddp_buckets = fixed_ddp_buckets
        self.redundancy: ECConfig | None = ECConfig.coerce(redundancy, max_parity_memory)
        self.model = model
        self.optimizer = optimizer
        self.root = os.fspath(root)
        self.every = every
        self.tier_specs: list[TierSpec] = parse_tiers(tiers if tiers is not None else ["memory", f"file://{os.path.abspath(self.root)}"])
        self.tiers: list[Tier] = [open_tier(t) for t in self.tier_specs if t.kind != "memory"]
        self.max_host_memory = max_host_memory
        self.slots = slots
        self.preempt_deadline_s = preempt_deadline_s
        self.resume_on_enter = resume
        self.final_checkpoint = final_checkpoint
        self.where = where_am_i()
        self.rank = self.where.rank
        if self.redundancy is not None:
            check_topology(self.redundancy.k, self.redundancy.m, self.where.keeper_slots)
            if not os.environ.get("STALWART_KEEPER_GROUP"):
                raise StalwartError("redundancy= needs the keepers' store address: set STALWART_KEEPER_GROUP=host:port")
        self._session: str | None = None  # this run's id, agreed on entry (keeper decisions, multi-node keys)
        self._refusal: str | None = None  # why the last snapshot request was not given a slot
        self._last_sources: dict[str, int] = {}
        self.providers: list[StateProvider] = list(providers) if providers is not None else self._default_providers(
            model, optimizer, scheduler, extra
        )
        self.mesh: Mesh = self._mesh()
        self.step_count = 0
        self.last_snapshot_step: int | None = None
        self.stats = GuardStats()
        self.copier = Copier()
        self.plan: SnapshotPlan | None = None
        self.maps: dict[int, torch.Tensor] = {}  # slot index -> this rank's file in it, mapped when first given
        self._views: dict[int, tuple] = {}  # slot -> (image, mapping, entry views, checksum tables)
        self.slot_dirs: list[str] = []
        self.client = KeeperClient(
            self.root, self.tier_specs, rank=self.rank, local_ranks=self.where.local_ranks, node=self.where.keeper_slot,
            nodes=self.where.keeper_slots, slots=slots, linger_s=keeper_linger_s,
            group_addr=os.environ.get("STALWART_KEEPER_GROUP"), ec=self.redundancy,
            reply_timeout_s=self.timeouts.keeper_reply_s, commit_timeout_s=self.timeouts.commit_s,
        )
        self._loader: ResumableLoader | None = None
        self._pending_data: Mapping | None = None
        self._restored: tuple | None = None  # the restored step's tensors and context
        self._memory_loss: str | None = None  # why memory could not rebuild the newest step (erasure coding)
        self._hook_handles: list = []
        self._preempted = threading.Event()
        self._preempt_done = False
        self._keeper_lost = False
        self._old_sigterm = None
        self._wakeup: tuple[int, int] | None = None
        self._watcher: threading.Thread | None = None
        self._entered = False
        self._in_process = in_process()
        self._collected: list[Collected] | None = None  # the newest snapshot's items (in-process: for _mark_live)

    # ------------------------------------------------------------------ setup
    def _default_providers(self, model, optimizer, scheduler, extra) -> list[StateProvider]:
        if is_deepspeed_engine(model):
            from stalwart.ckpt.providers.deepspeed import DeepSpeedProvider

            out: list[StateProvider] = [DeepSpeedProvider(model)]
        else:
            out = [ModuleProvider(model)]
            if optimizer is not None:
                out.append(OptimizerProvider(optimizer, model))
        if scheduler is not None:
            out.append(StatefulProvider("scheduler", scheduler))
        for key, obj in (extra or {}).items():
            out.append(StatefulProvider(f"extra.{key}", obj))
        out.append(RNGProvider())
        return out

    def _mesh(self) -> Mesh:
        for p in self.providers:
            mesh = getattr(p, "mesh", None)
            if callable(mesh):
                return mesh(self.where.world_size)
        return mesh_from_model(unwrap(self.model), self.where.world_size)

    def _aliases(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for p in self.providers:
            if hasattr(p, "aliases"):
                out.update(p.aliases())
        return out

    def __enter__(self) -> Guard:
        status = self.client.connect()
        if self.rank == 0:
            log.info("stalwart: keeper pid %s for %s (tiers: %s)", status.get("pid"), self.root,
                     ", ".join(t.url for t in self.tier_specs))
        if self.fixed_ddp_buckets and not fix_ddp_buckets(self.model):
            warnings.warn("stalwart: fixed_ddp_buckets: the model is not DDP or already trained (its buckets were"
                          " rebuilt); the bucket layout is left as it is", stacklevel=3)
        self._install_wait_hook()
        self._install_sigterm()
        self._entered = True
        try:
            if self.resume_on_enter:
                self.restore(status)
            else:
                self._start_session()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _install_wait_hook(self) -> None:
        opt = self.optimizer
        for p in self.providers:
            hook_target = getattr(p, "step_hook_target", None)
            if callable(hook_target):
                self._hook_handles.append(hook_target(self._before_step))
                return
        if opt is not None and hasattr(opt, "register_step_pre_hook"):
            self._hook_handles.append(opt.register_step_pre_hook(lambda *_: self._before_step()))

    def _install_sigterm(self) -> None:
        """Handle SIGTERM (preemption) even while the main thread is blocked in C code.

        A Python signal handler only runs when the main thread executes bytecode; a
        rank stuck in a collective with a dead peer would never run it (and torchrun
        would wait out its grace period). The C-level handler also writes the signal
        number to a wakeup pipe, which a watcher thread reads at once.
        """
        if threading.current_thread() is not threading.main_thread():
            return
        self._old_sigterm = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, lambda signum, frame: self._on_sigterm())
        r, w = os.pipe()
        os.set_blocking(w, False)
        try:
            previous = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        except ValueError:
            previous = -1
        if previous != -1:  # someone else (e.g. asyncio) owns the wakeup fd: keep theirs
            signal.set_wakeup_fd(previous)
            os.close(r)
            os.close(w)
            return
        self._wakeup = (r, w)
        # The watcher holds only a weak reference: a thread that drops the last reference to
        # the guard would free its tensors during interpreter shutdown, which aborts.
        self._watcher = threading.Thread(target=_watch_signals, args=(r, weakref.ref(self)), name="stalwart-signals", daemon=True)
        self._watcher.start()

    def _on_sigterm(self) -> None:
        if self._preempted.is_set() or not self._entered:
            return
        self._preempted.set()
        log.warning("stalwart: SIGTERM: the next guard.step() writes a final checkpoint (deadline %.0fs)", self.preempt_deadline_s)
        threading.Thread(target=self._preempt_watchdog, daemon=True).start()

    def _remove_sigterm(self) -> None:
        if self._old_sigterm is not None:
            with contextlib.suppress(Exception):
                signal.signal(signal.SIGTERM, self._old_sigterm)
        if self._wakeup is not None:
            r, w = self._wakeup
            with contextlib.suppress(Exception):
                signal.set_wakeup_fd(-1)
            with contextlib.suppress(OSError):
                os.close(w)  # the watcher reads end-of-file and returns
            if self._watcher is not None:
                self._watcher.join(timeout=5)
                self._watcher = None
            with contextlib.suppress(OSError):
                os.close(r)
            self._wakeup = None

    def _preempt_watchdog(self) -> None:
        """If the loop does not reach guard.step() within half the deadline, persist the
        newest complete snapshot with the other half and exit."""
        start = time.monotonic()
        deadline = start + self.preempt_deadline_s
        while time.monotonic() < start + self.preempt_deadline_s / 2:
            time.sleep(0.1)
            if self._preempt_done or not self._entered:
                return
        with contextlib.suppress(Exception):
            reply = self.client.call("flush")
            if reply.get("step") is not None:
                self._call("wait", step=reply["step"], timeout=max(1.0, deadline - time.monotonic()))
        log.error("stalwart: preemption deadline: exiting after persisting the last complete snapshot")
        os._exit(143)

    # ------------------------------------------------------------------ keeper
    def _reconnect(self, why: Exception) -> None:
        log.warning("stalwart: lost the keeper (%s); starting a new one (memory snapshots not yet persisted are lost)", why)
        self.client.close(clean=False)
        self.client.connect()
        self.plan = None  # the new keeper learns the plan again on the next snapshot
        self._keeper_lost = False

    def _call(self, op: str, **kwargs) -> dict:
        """A keeper request that survives the keeper's death (a new keeper is started)."""
        if self._keeper_lost:
            self._reconnect(KeeperGone("a background request failed"))
        try:
            return self.client.call(op, **kwargs)
        except KeeperGone as e:
            self._reconnect(e)
            return self.client.call(op, **kwargs)

    # ------------------------------------------------------------------ snapshots
    def _before_step(self) -> None:
        if _LIVE:
            _LIVE.pop(id(unwrap(self.model)), None)  # the tensors move past the newest snapshot
        waited = self.copier.wait_before_mutation()
        self.stats.blocking_s += waited
        self.stats.last_blocking_s = waited

    def _collect(self) -> list[Collected]:
        return [p.collect(self.mesh, self.rank) for p in self.providers]

    def _next_plan(self, collected: list[Collected]) -> tuple[SnapshotPlan, bool]:
        """This step's plan, and whether it keeps the last one's layout (then the keeper
        already knows it: see :meth:`_install_plan`)."""
        # the cached plan is validated against this step's state, not rebuilt (see build_plan)
        plan = build_plan(collected, self.mesh, self.rank, self._aliases, previous=self.plan)
        if self.plan is not None and plan.signature == self.plan.signature:
            self.plan = plan  # same layout: keep the mapped slots, take this step's tensor references
            return plan, True
        return plan, False

    def _install_plan(self, plan: SnapshotPlan) -> None:
        """Tell the keeper about a new layout and map its slot files for it."""
        if self.max_host_memory is not None and plan.file_size * self.slots > self.max_host_memory:
            allowed = self.max_host_memory // max(plan.file_size, 1)
            raise StalwartError(
                f"one snapshot of rank {self.rank} needs {plan.file_size / 2**20:.1f} MiB; {self.slots} slots need"
                f" {plan.file_size * self.slots / 2**20:.1f} MiB but max_host_memory is {self.max_host_memory / 2**20:.1f} MiB"
                f" (fits {allowed} slot(s); pass slots={max(allowed, 1)} or raise max_host_memory)"
            )
        reply = self._call(
            "plan", rank=self.rank, file_size=plan.file_size, sig=plan.layout_signature,
            layout=plan.layout.to_json(), topology={"framework": type(unwrap(self.model)).__name__},
            session=self._session, active=list(self.where.active_slots),
        )
        self.maps = {}  # mapped when the keeper first gives the slot: a slot still read keeps its old size meanwhile
        self._views.clear()
        self.slot_dirs = reply["slots"]
        self.stats.pool_bytes = int(reply.get("pool_bytes", 0))
        if self.where.local_rank == 0:
            log.info("stalwart: host snapshot pool %s slots x %.1f MiB per rank = %.1f MiB on node %d",
                     len(self.slot_dirs), plan.file_size / 2**20, self.stats.pool_bytes / 2**20, self.where.node_rank)
        self.plan = plan

    def _acquire_early(self, step: int, request: dict) -> Callable[[], dict | None] | None:
        """Ask the keeper for ``step``'s slot before the state is collected (the keeper answers
        while this rank collects: its round trip leaves the training loop's blocking time).
        Returns the function reading the reply (None when the keeper was lost), or None
        when the request could not be sent (it is then made after collecting)."""
        if self.plan is None or self._keeper_lost or self.client.chan is None:
            return None
        try:
            pending = self.client.begin("acquire", **request)
        except KeeperGone:
            return None

        def reply() -> dict | None:
            try:
                return pending()
            except KeeperGone as e:
                self._reconnect(e)  # the new keeper learns the plan first: asked again below
                return None

        return reply

    def _objects(self, collected: list[Collected]) -> dict:
        objects: dict = {}
        for c in collected:
            objects.update(c.objects)
        objects["stalwart"] = {"step": self.step_count, "world_size": self.where.world_size}
        return objects

    def _slot_views(self, index: int, image, mapping: torch.Tensor) -> tuple[dict, dict]:
        """Each entry's destination view in slot ``index`` and its checksum table, built once
        per slot and plan (every block of a table is rewritten by each copy; a slot is
        reused only after its previous copy finished)."""
        cached = self._views.get(index)
        if cached is None or cached[0] is not image or cached[1] is not mapping:
            start = image.data_start
            dst = {n: mapping[start + e.begin : start + e.end] for n, e in image.entries.items()}
            tables = {n: np.zeros(c, dtype=np.uint64) for n, c in image.block_counts.items()}
            cached = self._views[index] = (image, mapping, dst, tables)
        return cached[2], cached[3]

    def _snapshot(self, step: int, must: bool = False) -> bool:
        """Snapshot ``step`` as the node's keeper decided for every local rank.

        A loop snapshot may be skipped (back-pressure); a *must* snapshot (final, save_now,
        preemption) joins or opens an attempt every rank fills, or finds one complete.
        Returns whether this rank's state of ``step`` is (being) captured; when not,
        ``self._refusal`` says why.
        """
        wait_s = self.timeouts.slot_s if must else min(30.0, self.timeouts.slot_s)
        request = dict(rank=self.rank, step=step, must=must, session=self._session, timeout=wait_s)
        early = None if must else self._acquire_early(step, request)
        try:
            collected = self._collect()
            self._collected = collected if self._in_process else None  # for the live mark (see _mark_live)
            plan, same = self._next_plan(collected)
        except BaseException:
            if early is not None:
                with contextlib.suppress(Exception):
                    self._give_back(step, early())
            raise
        reply = early() if early is not None else None
        if not same or self.plan is None:  # a new layout (or a new keeper): a slot given for the old one is returned
            self._give_back(step, reply)
            reply = None
            self._install_plan(plan)
        if reply is None:
            reply = self._call("acquire", **request)
        if reply.get("complete"):
            self.last_snapshot_step = step
            return True
        index = reply.get("slot")
        if index is None:
            self._refusal = reply.get("reason") or "no slot"
            if not must:
                self.stats.skipped += 1
            log.debug("snapshot of step %s not taken: %s", step, self._refusal)
            return False
        attempt = int(reply.get("attempt", 0))
        mapping = self.maps.get(index)
        if mapping is None:
            path = os.path.join(self.slot_dirs[index], rank_file_name(self.rank))
            mapping = self.maps[index] = map_slot_file(path, plan.file_size, any(t.is_cuda for _, t in plan.lazy))
        image = plan.image
        dst, tables = self._slot_views(index, image, mapping)
        block = image.block_size
        self.copier.copy_now([(n, t, dst[n]) for n, t in plan.eager], tables, block)
        objects = self._objects(collected) if self.rank == 0 else None

        def finish() -> None:
            header = final_header(image, tables)
            np.copyto(mapping[: len(header)].numpy(), np.frombuffer(header, dtype=np.uint8))
            record = image.record(rank_file_name(self.rank), header)
            try:
                reply = self.client.call_background("done", rank=self.rank, step=step, slot=index, attempt=attempt,
                                                    record=record.to_json(), objects=objects)
                if reply.get("stale"):
                    log.info("stalwart: snapshot of step %s not kept: %s", step, reply.get("reason"))
            except KeeperGone as e:  # the snapshot is lost with the keeper; the next step reconnects
                log.warning("stalwart: snapshot of step %s lost: %s", step, e)
                self._keeper_lost = True
            except StalwartError as e:  # refused (e.g. a restarted keeper): this snapshot is lost, training goes on
                log.warning("stalwart: snapshot of step %s lost: %s", step, e)

        self.copier.start(plan.lazy, dst, tables, block, finish)
        self.last_snapshot_step = step
        self.stats.snapshots += 1
        return True

    def _give_back(self, step: int, reply: dict | None) -> None:
        """Return a slot the keeper gave for ``step`` that this rank will not fill."""
        if reply is not None and reply.get("slot") is not None:
            with contextlib.suppress(StalwartError):
                self._call("abandon", rank=self.rank, step=step, slot=reply["slot"])

    def step(self) -> None:
        """Mark the end of a training step (after ``optimizer.step()``); maybe snapshot."""
        t0 = time.perf_counter()
        self.step_count += 1
        if self._preempted.is_set():
            self._final_on_preemption()
        if self.step_count % self.every == 0:
            self.copier.wait()  # the previous snapshot's background work (normally long done)
            taken = self._snapshot(self.step_count)
            if self._in_process:
                self._mark_live(taken)
        self.stats.step_call_s += time.perf_counter() - t0

    def _mark_live(self, taken: bool) -> None:
        """The live tensors hold step ``step_count`` until the next optimizer step: remember it,
        with the small state a restore of it needs besides them (even when the keeper did not
        take this snapshot, the process still holds the step)."""
        key = id(unwrap(self.model))
        collected, self._collected = self._collected, None
        if self.optimizer is None or collected is None:
            _LIVE.pop(key, None)
            return
        rng = next((p.last_blob.tobytes() for p in self.providers if isinstance(p, RNGProvider) and p.last_blob is not None),
                   None)
        eager = {i.spec.name: i.tensor.detach().to("cpu", copy=True) for c in collected for i in c.items
                 if not i.lazy and i.tensor is not None}
        _LIVE[key] = _LiveMark(self.step_count, id(self.optimizer), rng, taken, eager,
                               self._objects(collected), self.plan.layout.tensors, self.plan.layout.mesh)

    def _live_mark(self) -> _LiveMark | None:
        mark = _LIVE.get(id(unwrap(self.model))) if self._in_process else None
        return mark if mark is not None and mark.optimizer == id(self.optimizer) else None

    def _capture(self, step: int) -> str | None:
        """Make sure every rank's state of ``step`` is captured in memory (a must snapshot);
        returns None, or why it could not be."""
        self.copier.wait()
        if not self._snapshot(step, must=True):
            return self._refusal
        self.copier.wait()
        return None

    def _durable(self, step: int, timeout: float) -> str | None:
        """Wait until ``step`` is on every tier; returns None, or why it is not."""
        reply = self._call("wait", step=step, force=True, timeout=timeout)
        if reply.get("done"):
            failed = reply.get("failed") or {}
            return "; ".join(f"{tier}: {err}" for tier, err in failed.items()) or None
        if reply.get("error"):
            return reply["error"]
        return f"not on {', '.join(reply.get('pending') or ['every tier'])} after {timeout:.0f}s"

    def _persist_in_background(self, step: int) -> None:
        """Ask the keeper to persist ``step`` without waiting: under the launcher the node's
        keeper lives as long as the agent, so it finishes the job after this worker is gone."""
        self._call("wait", step=step, force=True, timeout=0.0)

    def _fall_back(self, step: int, why: str, timeout: float) -> str:
        """``step`` cannot be made durable: persist the newest complete snapshot instead; the warning."""
        newest = None
        with contextlib.suppress(StalwartError):
            newest = self._call("flush").get("step")
            if newest is not None and self._durable(newest, timeout) is not None:
                newest = None
        msg = f"stalwart: rank {self.rank}: step {step} is not durable ({why}); "
        msg += f"the newest durable step is {newest}" if newest is not None else "no newer step could be persisted"
        self.stats.fallbacks.append(msg)
        return msg

    def _final_on_preemption(self) -> None:
        deadline = time.monotonic() + self.preempt_deadline_s
        why = self._capture(self.step_count)
        step = self.step_count if why is None else self.last_snapshot_step
        if step is not None and self.client.plugin:
            # the launcher's agent stops its workers to re-form the job (or is itself stopping)
            with contextlib.suppress(StalwartError):
                self._persist_in_background(step)
        elif step is not None:
            why = why or self._durable(step, timeout=max(1.0, deadline - time.monotonic()))
            if why:
                log.error("%s", self._fall_back(step, why, timeout=max(1.0, deadline - time.monotonic())))
        self._preempt_done = True
        log.warning("stalwart: final checkpoint of step %s written after SIGTERM", step)
        raise Preempted()

    def save_now(self, timeout: float | None = None) -> int:
        """Snapshot the current state now and wait until every tier holds it; returns the step.

        Every rank must call it at the same step. Raises :class:`StalwartError` naming the
        step and the cause when it cannot be made durable (the newest complete snapshot is
        then persisted instead)."""
        timeout = self.timeouts.persist_s if timeout is None else timeout
        step = self.step_count
        why = self._capture(step) or self._durable(step, timeout)
        if why:
            raise StalwartError(self._fall_back(step, why, timeout))
        return step

    def wait(self, timeout: float | None = None) -> None:
        """Wait until the newest snapshot is copied and persisted to every tier it qualifies for."""
        self.copier.wait()
        if self.last_snapshot_step is None:
            return
        names = [t.name for t in self.tiers if t.qualifies(self.last_snapshot_step)]
        if names:
            self._call("wait", step=self.last_snapshot_step, tiers=names,
                       timeout=self.timeouts.persist_s if timeout is None else timeout)

    def redundancy_status(self) -> dict | None:
        """The node keeper's erasure-coding status (``None`` without ``redundancy=``): generation,
        state, protected steps, ``parity_bytes``, ``overhead`` (m/k), rebuilt steps, errors."""
        return self._note_redundancy(self._call("status"))

    def _note_redundancy(self, status: dict) -> dict | None:
        ec = status.get("ec")
        if ec:
            self.stats.redundancy = ec
            self.stats.parity_bytes = int(ec.get("parity_bytes", 0))
            self.stats.parity_overhead = ec.get("overhead")
        return ec

    def _group_current(self, ec: dict) -> bool:
        """Whether the keeper's redundancy generation is settled and, under the launcher, made
        of the keepers this round has (a generation formed before a node was lost still names
        it: its recovery is not this round's)."""
        if not ec.get("settled"):
            return False
        ids = self.where.slot_ids
        if not ids:
            return True
        group = ec.get("group") or []
        return all(0 <= s < len(ids) for s in group) and ec.get("member_ids") == [ids[s] for s in group]

    def _await_redundancy(self, status: dict) -> dict:
        """Before restoring: wait (bounded) until this keeper's redundancy group formed and
        rebuilt what it could; a snapshot it cannot rebuild becomes a fallback warning."""
        ec = self._note_redundancy(status)
        if not ec or self.redundancy is None:
            return status
        if not status.get("memory") and not any(status.get("tiers", {}).values()) and not status.get("peers_hold"):
            return status  # the job's first start: nothing anywhere to rebuild or restore
        deadline = time.monotonic() + self.redundancy.rebuild_wait_s
        while not self._group_current(ec) and time.monotonic() < deadline:
            time.sleep(0.1)
            status = self._call("status")
            ec = self._note_redundancy(status) or {}
        if not self._group_current(ec):
            msg = (f"stalwart: node {self.where.node_rank}'s redundancy group did not form with this round's keepers"
                   f" within {self.redundancy.rebuild_wait_s:.0f}s (state {ec.get('state')}, members"
                   f" {ec.get('member_ids')}); restoring without rebuilding")
            self.stats.fallbacks.append(msg)
            warnings.warn(msg, stacklevel=3)
        if ec.get("recovery_error"):
            self._memory_loss = ec["recovery_error"]
            msg = f"stalwart: memory snapshot not rebuilt: {ec['recovery_error']}; falling back"
            self.stats.fallbacks.append(msg)
            warnings.warn(msg, stacklevel=3)
            log.warning(msg)
        return status

    def latest(self) -> Latest | None:
        """The newest committed step and the tiers (incl. ``memory``) holding it."""
        status = self._call("status")
        holders: dict[int, list[str]] = {}
        for m in status["memory"]:
            holders.setdefault(m["step"], []).append("memory")
        for name, steps in status["tiers"].items():
            for s in steps:
                holders.setdefault(s, []).append(name)
        if not holders:
            return None
        step = max(holders)
        return Latest(step, tuple(holders[step]))

    # ------------------------------------------------------------------ data
    def resume(self, loader: Iterable, *, epochs: int | None = None, skip: str = "sampler"):
        """Continue iterating ``loader`` where the restored checkpoint left off.

        An object with a ``stalwart_provider(placement)`` method (an
        :class:`stalwart.elastic.ElasticLoader`) is bound to this job's data-parallel
        position, given its saved position, and returned: it keeps the global batch, the
        sample order and per-sample randomness at any world size. Any other iterable (a
        ``DataLoader``) is wrapped in a :class:`ResumableLoader`, which skips the batches
        already seen (see ``skip``); with ``epochs``, iteration runs from the restored epoch
        up to ``epochs``.
        """
        make = getattr(loader, "stalwart_provider", None)
        if callable(make):
            if all(getattr(p, "source", None) is not loader for p in self.providers):
                provider = make(self.where)
                self.providers.append(provider)
                if self._restored is not None:
                    provider.restore(*self._restored)
            return loader
        if self._loader is not None and self._loader.loader is loader:
            self._loader.epochs = epochs if epochs is not None else self._loader.epochs
            return self._loader
        wrapper = ResumableLoader(loader, epochs, skip)
        provider = DataProvider(wrapper)
        self.providers.append(provider)
        self._loader = wrapper
        if self._pending_data is not None:
            tensors, ctx = self._pending_data
            provider.restore(tensors, ctx)
            self._pending_data = None
        return wrapper

    @property
    def epoch(self) -> int:
        return self._loader.epoch if self._loader is not None else 0

    # ------------------------------------------------------------------ restore
    def _candidates(self, status: dict) -> list[tuple[int, int, str]]:
        """(step, tier order, tier name) of everything restorable, newest first, fastest tier first."""
        out = [(m["step"], 0, "memory") for m in status.get("memory", [])]
        for i, tier in enumerate(self.tiers, start=1):
            try:
                out += [(s, i, tier.name) for s in tier.committed_steps()]
            except Exception as e:  # an unreachable tier is a fallback problem, not fatal
                warnings.warn(f"stalwart: cannot list tier {tier.name}: {e}", stacklevel=2)
        return sorted(set(out), key=lambda c: (-c[0], c[1]))

    def _start_session(self) -> None:
        """Agree on this run's id with the other ranks (the keeper's decisions are per run)."""
        group = side_group("session", timeout_s=self.timeouts.restore_s)
        try:
            self._session = _agree_on_session(group)
        finally:
            _destroy(group)

    def restore(self, status: dict | None = None) -> int | None:
        """Restore the newest good checkpoint; returns its step (None: nothing to restore)."""
        mark = self._live_mark()
        status = status if status is not None else self._call("status")
        if mark is None:  # keeping live tensors needs no rebuilt snapshot: wait only when reading everything
            status = self._await_redundancy(status)
        group = side_group("restore", timeout_s=self.timeouts.restore_s)
        try:
            candidates = _agree_on_candidates(self._candidates(status), group)
            self._session = _agree_on_session(group)
            memory_dirs = {m["step"]: m["dir"] for m in status.get("memory", [])}
            keep = None
            if self._in_process:  # the same on every rank: all ranks kept the newest step's tensors, or none keeps
                newest = candidates[0] if candidates else None
                if _all_true(mark is not None and mark.taken and newest == (mark.step, 0, "memory"), group):
                    keep = mark
                else:
                    live = self._restore_live(mark, newest[0] if newest else None, group)
                    if live is not None:
                        return live
                    if mark is not None:
                        status = self._await_redundancy(self._call("status"))
                        memory_dirs = {m["step"]: m["dir"] for m in status.get("memory", [])}
            incompatible: str | None = None
            for step, order, name in candidates:
                ok, reason, loaded = self._try_candidate(step, order, name, memory_dirs,
                                                         keep if keep is not None and step == keep.step and not order else None)
                all_ok = _all_true(ok, group)
                if all_ok:
                    tensors, ctx, path, kept = loaded
                    self._apply(tensors, ctx, kept, keep.rng if keep is not None and kept else None)
                    if self._in_process:  # the failed attempt's partial gradients are not part of the restored step
                        unwrap(self.model).zero_grad(set_to_none=True)
                    if order:
                        self.tiers[order - 1].release(path)
                    self.step_count = step
                    self.last_snapshot_step = step
                    self.stats.restored_step, self.stats.restored_from = step, name
                    self.stats.restore_sources = dict(self._last_sources)
                    where = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in sorted(self.stats.restore_sources.items()))
                    log.warning("stalwart: rank %s restored step %s from %s (%s)", self.rank, step, name, where or "no bytes")
                    if self._memory_loss and name != "memory":
                        # name what was lost and what the job continues from, in one line
                        msg = f"stalwart: {self._memory_loss}; continuing from step {step} in {name}"
                        self.stats.fallbacks.append(msg)
                        if self.rank == 0:
                            warnings.warn(msg, stacklevel=2)
                            log.warning(msg)
                    return step
                why = reason if not ok else "failed on another rank"
                if not ok and reason.startswith("LayoutError") and incompatible is None:
                    incompatible = f"step {step} in {name}: {reason[len('LayoutError: '):]}"
                msg = f"stalwart: step {step} in {name} cannot be restored ({why}); falling back"
                self.stats.fallbacks.append(msg)
                if self.rank == 0 or not ok:
                    warnings.warn(msg, stacklevel=2)
                    log.warning(msg)
            # checkpoints exist but hold another model: starting over silently would discard them
            if candidates and not _all_true(incompatible is None, group):
                raise StalwartError(
                    f"the checkpoints under {self.root} do not fit this model ({incompatible or 'on another rank'});"
                    " use another root=, or resume=False to start over") from None
            if (candidates or status.get("peers_hold")) and self.rank == 0:
                msg = ("stalwart: no checkpoint could be restored (every step in memory and on the tiers failed, see"
                       " the warnings above) or none is left (memory snapshots are dropped when the snapshot layout"
                       " changes, e.g. a new world size, until the first snapshot of the new layout);"
                       " training starts from step 0" if candidates else
                       "stalwart: this job's keepers held memory snapshots before, but no step is left in memory or"
                       " on any tier (memory snapshots are dropped when the snapshot layout changes, e.g. a new world"
                       " size, until the first snapshot of the new layout); training starts from step 0")
                self.stats.fallbacks.append(msg)
                log.error("%s", msg)
                warnings.warn(msg, stacklevel=2)
            return None
        finally:
            _destroy(group)

    def _restore_live(self, mark: _LiveMark | None, newest: int | None, group) -> int | None:
        """In-process recovery of a step newer than every committed snapshot (a node died before
        its share of the step committed, e.g. before erasure coding caught up): when every rank's
        tensors hold that same step and are whole replicas (DDP), they are kept, and the rest of
        the step's state comes from the live mark (eager items, objects, RNG). Collective: every
        rank calls it. Returns the step, or None (nothing restored: the ordinary restore follows)."""
        newer = mark is not None and mark.eager is not None and (newest is None or mark.step > newest)
        lo, hi = _agree_range(mark.step if newer else -1, group)
        if hi < 0:
            return None  # no rank holds a step newer than the committed ones: the ordinary restore
        if lo != hi:
            if self.rank == 0:
                log.warning("stalwart: the ranks' live tensors hold different steps (%s..%s, or none on some rank) and"
                            " no snapshot of the newest one committed: restoring the newest committed step", lo, hi)
            return None
        step = hi
        objects = _agree_on_objects(mark.objects, group)  # rank 0's, as a manifest stores them
        ctx = RestoreContext(self.mesh, self.rank, step, mark.saved, objects, mark.mesh == self.mesh)
        targets = [p.targets(ctx) for p in self.providers]
        if self._loader is None:
            targets.append(data_targets(ctx))
        kept = self._kept_names(targets)
        tensors: dict[str, torch.Tensor] = {}
        missing: list[str] = []
        kept_bytes = 0
        for t in targets:
            for i in t.items:
                size = math.prod(i.spec.shape) * i.spec.dtype.itemsize
                if i.spec.name in kept:
                    kept_bytes += size
                    continue
                have = mark.eager.get(i.spec.name)
                # a copy is this rank's view of the item: usable when the item is whole, or the topology unchanged
                if (have is not None and tuple(have.shape) == tuple(i.tensor.shape)
                        and (ctx.same_topology or isinstance(i.spec.placement, Replicated))):
                    tensors[i.spec.name] = have
                    kept_bytes += have.numel() * have.element_size()
                else:
                    missing.append(i.spec.name)
        if not _all_true(not missing, group):
            msg = (f"stalwart: step {step} is held by every rank's live tensors but never committed, and rank"
                   f" {self.rank} cannot keep it ({', '.join(missing[:3]) if missing else 'another rank cannot'}"
                   f"{' ...' if len(missing) > 3 else ''}: not a whole replica); restoring the newest committed step")
            self.stats.fallbacks.append(msg)
            if self.rank == 0 or missing:
                log.warning("%s", msg)
            return None
        self._apply(tensors, ctx, kept, mark.rng)
        unwrap(self.model).zero_grad(set_to_none=True)  # the failed attempt's partial gradients
        self.step_count = step
        self.last_snapshot_step = None  # no snapshot of it exists: the next one is taken as usual
        self.stats.restored_step, self.stats.restored_from = step, KEPT_SOURCE
        self.stats.restore_sources = {KEPT_SOURCE: kept_bytes}
        log.warning("stalwart: rank %s restored step %s %s (%.1f MiB; no snapshot of it committed%s)", self.rank, step,
                    KEPT_SOURCE, kept_bytes / 2**20, f", newest committed: step {newest}" if newest is not None else "")
        return step

    def _kept_names(self, targets: list[Collected]) -> set[str]:
        """Tensors this process may keep (in-process recovery of the step its tensors hold):
        every lazy item (params, optimizer state) of a model or optimizer provider whose lazy
        items are all whole replicas (DDP), and the RNG streams (from the live mark)."""
        kept: set[str] = set()
        for p, t in zip(self.providers, targets, strict=False):
            if isinstance(p, RNGProvider):
                kept.update(i.spec.name for i in t.items)
            elif isinstance(p, ModuleProvider | OptimizerProvider):
                lazy = [i for i in t.items if i.lazy]
                if lazy and all(isinstance(i.spec.placement, Replicated) for i in lazy):
                    kept.update(i.spec.name for i in lazy)
        return kept

    def _try_candidate(self, step: int, order: int, name: str, memory_dirs: dict, keep: _LiveMark | None = None):
        path, views = None, []
        try:
            if order == 0 and step not in memory_dirs:
                if not self._has_peers():
                    raise StalwartError(f"step {step} is not in node {self.where.node_rank}'s memory")
                # this node holds none of it (it joined later, or its memory is gone): all from the peers
                path = self._peer_view(step, {})
                views.append(path)
            else:
                path = memory_dirs[step] if order == 0 else self.tiers[order - 1].fetch(step)
            with Checkpoint(path) as ckpt:
                if ckpt.step != step:
                    raise StalwartError(f"{path} holds step {ckpt.step}, not {step}")
                saved_mesh = ckpt.layout.mesh
                ctx = RestoreContext(self.mesh, self.rank, step, ckpt.tensors, ckpt.objects, saved_mesh == self.mesh)
                targets = [p.targets(ctx) for p in self.providers]
                if self._loader is None:
                    targets.append(data_targets(ctx))  # kept until resume(loader) attaches one
                kept = self._kept_names(targets) if keep is not None else set()
                kept_bytes = sum(math.prod(i.spec.shape) * i.spec.dtype.itemsize for t in targets for i in t.items
                                 if i.spec.name in kept)
                specs, groups = [], {}
                for t in targets:
                    groups.update(t.groups)
                    specs.extend(item.spec for item in t.items if item.spec.name not in kept)
                target = Layout(self.mesh, specs, groups)
                plan = ckpt.plan(target, self.rank)
                remote = missing_reads(ckpt, plan) if order == 0 else {}
                # Memory slots are overwritten by later snapshots: never alias them.
                tensors = None if remote else ckpt.execute(plan, mmap=order != 0)
            sources = {}
            if remote:  # other nodes' files: their keepers' memory, through this node's keeper
                view = self._peer_view(step, remote)
                views.append(view)
                with Checkpoint(view) as ckpt:
                    tensors = ckpt.execute(plan)
                with contextlib.suppress(OSError, ValueError), open(os.path.join(view, SOURCES_FILE)) as f:
                    sources = json.load(f)
            self._last_sources = _byte_sources(plan, name if order else None, sources, self.where.keeper_slot)
            if kept:
                self._last_sources[KEPT_SOURCE] = kept_bytes
            return True, None, (tensors, ctx, path if not views else None, kept)
        except (StalwartError, OSError, ValueError, KeyError) as e:
            if order and path is not None:
                self.tiers[order - 1].release(path)
            return False, f"{type(e).__name__}: {e}", None
        finally:
            for view in views:
                with contextlib.suppress(StalwartError):
                    self._call("release_view", dir=view)

    def _has_peers(self) -> bool:
        return self.where.keeper_slots > 1 and bool(os.environ.get("STALWART_KEEPER_GROUP"))

    def _peer_view(self, step: int, reads: dict) -> str:
        return self._call("peer_view", step=step, reads={str(r): v for r, v in reads.items()}, rank=self.rank,
                          timeout=self.timeouts.restore_s)["dir"]

    def _apply(self, tensors: dict[str, torch.Tensor], ctx: RestoreContext, kept: set[str] | None = None,
               rng: bytes | None = None) -> None:
        used: set[str] = set()
        kept = kept or set()
        for p in self.providers:
            if isinstance(p, DataProvider):
                continue
            names = {i.spec.name for i in p.targets(ctx).items}
            used |= names
            mine = {n: t for n, t in tensors.items() if n in names}
            if names and names <= kept:
                if isinstance(p, RNGProvider) and rng is not None:
                    unpack_rng(rng)
                continue  # the live tensors are the snapshot's
            if isinstance(p, ModuleProvider) and names & kept:
                p.restore(mine, ctx, keep=names & kept)
                continue
            p.restore(mine, ctx)
        # for providers attached later (guard.resume of an elastic loader): the context and what
        # nobody took (never the model's or optimizer's tensors, which would double their memory)
        self._restored = ({n: t for n, t in tensors.items() if n not in used}, ctx)
        self._pending_data = ({n: t for n, t in tensors.items() if n == DataProvider.tensor_name}, ctx)
        if self._loader is not None:
            for p in self.providers:
                if isinstance(p, DataProvider):
                    p.restore(tensors, ctx)
            self._pending_data = None

    # ------------------------------------------------------------------ exit
    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._entered:
            return
        self._entered = False
        clean = exc_type is None or (isinstance(exc, SystemExit) and isinstance(exc, Preempted))
        try:
            with contextlib.suppress(Exception):
                self.copier.wait()
            if exc_type is None:
                self._finish()
            elif not isinstance(exc, Preempted):
                with contextlib.suppress(Exception):  # keep the last good state: make it durable
                    newest = self._call("flush").get("step")
                    if newest is not None and self.client.plugin:
                        # the launcher restarts this node's workers at once (a peer failed, most often): waiting
                        # would only delay the recovery (a multi-node commit waits for the lost node's keeper)
                        self._persist_in_background(newest)
                    elif newest is not None:
                        self._durable(newest, self.timeouts.persist_s)
        finally:
            for h in self._hook_handles:
                with contextlib.suppress(Exception):
                    h.remove()
            self._remove_sigterm()
            self.maps = {}
            self._views.clear()
            self.plan = None
            self._pending_data = None
            self._restored = None
            self.client.close(clean=clean, step=self.step_count)
            self.copier.close()

    def _finish(self) -> None:
        """Normal exit: the final step, the same on every rank, captured and on every tier.

        Every rank asks the keeper for the final snapshot of its last step; the keeper's
        recorded decisions make them all join one attempt (or find it complete). When it
        cannot be captured or persisted (a rank left or died first, a tier failed), the
        newest complete snapshot is persisted instead and a warning names the step and why.
        """
        trained = self.step_count > 0 and self.step_count != self.stats.restored_step
        step, why = self.last_snapshot_step, None
        if self.final_checkpoint and trained:
            why = self._capture(self.step_count)
            step = self.step_count
        if step is None:
            return
        why = why or self._durable(step, self.timeouts.persist_s)
        if why:
            msg = self._fall_back(step, why, self.timeouts.persist_s)
            log.error("%s", msg)
            warnings.warn(msg, stacklevel=3)


def _byte_sources(plan, tier: str | None, sources: dict, own_slot: int) -> dict[str, int]:
    """Bytes this rank read, by where they came from: ``own memory``, ``peer memory``,
    ``ec rebuilt`` (decoded from the redundancy group's survivors) or the tier's name."""
    out: dict[str, int] = {}
    for read in plan.reads:
        if tier is not None:
            where = tier
        else:
            src = sources.get(str(read.rank))
            if src is None:
                where = "own memory"
            elif src.get("rebuilt"):
                where = "ec rebuilt"
            else:
                where = "own memory" if src.get("node") == own_slot else "peer memory"
        out[where] = out.get(where, 0) + (read.stop - read.start)
    return out


def _watch_signals(fd: int, guard_ref) -> None:
    """Read the signal wakeup pipe; on SIGTERM start the guard's preemption path."""
    while True:
        try:
            data = os.read(fd, 64)
        except OSError:
            return
        if not data:
            return
        if signal.SIGTERM in data:
            guard = guard_ref()
            if guard is not None:
                guard._on_sigterm()
            del guard


def _agree_on_candidates(mine: list[tuple[int, int, str]], group) -> list[tuple[int, int, str]]:
    """The union of every rank's candidates, in one order everywhere."""
    if group is None:
        return mine
    import json

    import torch.distributed as dist

    data = json.dumps(mine).encode()
    n = torch.tensor([len(data)], dtype=torch.int64)
    dist.all_reduce(n, op=dist.ReduceOp.MAX, group=group)
    buf = torch.zeros(int(n.item()) + 8, dtype=torch.uint8)
    buf[:8] = torch.tensor([len(data)], dtype=torch.int64).view(torch.uint8)
    buf[8 : 8 + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    out = [torch.empty_like(buf) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, buf, group=group)
    union = set()
    for b in out:
        length = int(b[:8].view(torch.int64).item())
        union.update(tuple(c) for c in json.loads(bytes(b[8 : 8 + length].tolist())))
    return sorted(union, key=lambda c: (-c[0], c[1]))


def _agree_range(value: int, group) -> tuple[int, int]:
    """(min, max) of ``value`` over the ranks."""
    if group is None:
        return value, value
    import torch.distributed as dist

    t = torch.tensor([value, -value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return int(t[0].item()), -int(t[1].item())


def _agree_on_objects(objects: dict, group) -> dict:
    """Rank 0's JSON objects on every rank (O(size) per rank: the others add zeros)."""
    if group is None:
        return objects
    import torch.distributed as dist

    data = json.dumps(objects).encode() if dist.get_rank() == 0 else b""  # side groups are unregistered
    n = torch.tensor([len(data)], dtype=torch.int64)
    dist.all_reduce(n, op=dist.ReduceOp.MAX, group=group)
    buf = torch.zeros(int(n.item()), dtype=torch.uint8)
    if data:
        buf[:] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    return json.loads(buf.numpy().tobytes())


def _destroy(group) -> None:
    if group is not None:
        import torch.distributed as dist

        with contextlib.suppress(Exception):
            dist.destroy_process_group(group)


def _agree_on_session(group) -> str:
    """A random id of this run, the same on every rank (rank 0's)."""
    if group is None:
        return os.urandom(7).hex()
    import torch.distributed as dist

    mine = int.from_bytes(os.urandom(7), "little") if dist.get_rank() == 0 else 0
    t = torch.tensor([mine], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)  # side groups are unregistered: no broadcast(src=)
    return f"{int(t.item()):x}"


def _all_true(ok: bool, group) -> bool:
    if group is None:
        return ok
    import torch.distributed as dist

    t = torch.tensor([1 if ok else 0], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return bool(t.item())


def protect(model: torch.nn.Module, optimizer=None, *, root: str, every: int = 1, tiers=None, scheduler=None,
            extra: Mapping[str, object] | None = None, max_host_memory: int | None = None, **kwargs) -> Guard:
    """Protect a training loop; see :class:`Guard` and the module docstring.

    ``tiers`` defaults to ``["memory", "file://<root>"]``. ``max_host_memory`` caps
    the snapshot slots of each rank in bytes. Further keyword arguments: ``slots``
    (host snapshot slots, default 2), ``keeper_linger_s``, ``preempt_deadline_s``,
    ``resume`` (restore on entry, default True), ``final_checkpoint``,
    ``redundancy=(k, m)`` (or an :class:`~stalwart.ckpt.redundancy.ECConfig`): erasure-code
    the memory snapshots across groups of ``k + m`` nodes so that losing up to ``m`` of a
    group's nodes loses no memory snapshot (needs ``STALWART_KEEPER_GROUP``; use
    ``slots=3`` to snapshot every step while the previous one is encoded), and
    ``max_parity_memory`` (bytes of parity per keeper). See docs/ERASURE.md.
    ``timeouts`` (a :class:`Timeouts` or a dict of its fields) bounds every wait: a final
    or ``save_now`` snapshot waits ``slot_s`` (120 s) for a slot, exit / ``save_now`` /
    ``wait`` wait ``persist_s`` (300 s) for the tiers; see docs/ARCHITECTURE.md.
    ``fixed_ddp_buckets=True`` (DDP) fixes the gradient-bucket layout before the first
    step, so that a restarted or re-formed job is bitwise equal to an uninterrupted one with
    three or more ranks (see :func:`~stalwart.ckpt.providers.module.fix_ddp_buckets` for
    the overlap it costs); two ranks are bitwise equal without it.
    """
    return Guard(model, optimizer, root=root, every=every, tiers=tiers, scheduler=scheduler, extra=extra,
                 max_host_memory=max_host_memory, **kwargs)


__all__ = ["Guard", "GuardStats", "Latest", "Preempted", "Timeouts", "protect"]
