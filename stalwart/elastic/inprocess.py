"""In-process recovery: the survivors of a failure keep their processes.

:func:`run` calls the user's training function. Launched by stalwart's rendezvous
(``stalwart run`` or ``torchrun --rdzv-backend=stalwart``), a failure of another
node does not end the surviving workers: the exception that reaches :func:`run` (a
collective that lost its peer, a timed-out collective) makes every survivor

1. destroy its process group (its sockets close, so peers still blocked in a
   collective fail at once and join too);
2. join the next *epoch* of the job's membership in the rendezvous store; the epoch
   closes when every member of the previous one has joined or is gone (its process
   refuses connections on its liveness port - it exited, while its host is up - or its
   heartbeat stopped for ``dead_after_s`` - its host is down - or its process was
   replaced), or after ``hang_timeout_s`` for members that are alive but never join
   (hung: a stopped process still accepts connections);
3. re-form the default process group with the epoch's members (ranks follow keeper
   slots, as in a restart), on a fresh store prefix, with ``hang_timeout_s`` as the
   collectives' timeout, so a stopped or stuck peer costs at most that long;
4. call the training function again. Its ``protect()`` finds the node's keeper alive
   and restores the newest complete step from memory; the model and optimizer tensors
   the process still holds unchanged since that step's snapshot are kept, not copied
   (see :class:`stalwart.ckpt.Guard`).

Survivors that are computing when a member fails do not wait for their next collective
to notice: each worker's watchdog probes the next members' liveness ports (once per
``BEAT_S``) and watches the store for a member that began a recovery; once the current
epoch is over it *trips*, and the next module call (forward) or gradient of a
parameter-holding module's output (backward) of any ``torch.nn.Module`` in the process
raises :class:`PeerLost`. These points lie before the optimizer step, where the tensors
still hold the last snapshot, so the interrupted step is simply redone (code between
``optimizer.step()`` and ``guard.step()`` that calls a module is interrupted too; the
step is then restored from its snapshot). ``STALWART_INTERRUPT=0`` turns this off
(failures are then noticed at the next collective).

Objects built *outside* the training function (the model, the optimizer, the data
set) are kept across recoveries; everything the function builds (the DDP/FSDP wrapper,
``protect()``, the loader's iteration) is built again on the new group.

Errors that are not the job's (an exception of the user's code with every member still
alive) are retried ``max_attempts`` times in process, then raised as they are. A worker
left out of an epoch (it joined too late, or hung) ends its own process; its agent
restarts it and the job grows back at the next restart. Without stalwart's rendezvous
(plain ``torchrun``, a single process) :func:`run` calls the function once: recovery
is then the launcher's restart.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import gc
import json
import logging
import os
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from stalwart.errors import StalwartError

log = logging.getLogger("stalwart.elastic")

T = TypeVar("T")

#: ``STALWART_IN_PROCESS=0`` turns in-process recovery off (restart-based recovery only).
ENV_SWITCH = "STALWART_IN_PROCESS"
#: ``STALWART_INTERRUPT=0``: a failure is noticed at the next collective, not in forward/backward.
ENV_INTERRUPT = "STALWART_INTERRUPT"
PROBE_FANOUT = 4  # members probed per beat by each watchdog (the next ones in member order)
DEFAULT_HANG_TIMEOUT_S = 60.0
DEFAULT_DEAD_AFTER_S = 1.0
BEAT_S = 0.1
_POLL_S = 0.02
PROBE_TIMEOUT_S = 0.2  # a connect that neither completes nor is refused in this long proves nothing

_COMM_WORDS = ("gloo", "nccl", "connection", "broken pipe", "timed out", "timeout", "peer", "socket", "process group")


class RecoveryError(StalwartError):
    """The job cannot continue in process (a member's fatal error, too few members)."""


class PeerLost(RuntimeError):
    """Raised inside the training function's forward or backward when another member of the
    job failed (or began a recovery) while this one was computing: the step is abandoned
    at once instead of at the next collective, and :func:`run` recovers."""


@dataclass(frozen=True)
class Recovery:
    """One in-process recovery of this worker (see :func:`history`)."""

    epoch: int  # the epoch re-formed
    why: str  # the exception that ended the attempt ("PeerLost: ...", a collective's error, the user's)
    lost: tuple[int, ...]  # members of the previous epoch left out
    rank: int
    world: int
    seconds: float  # from the exception reaching run() to the re-formed group


_HISTORY: collections.deque[Recovery] = collections.deque(maxlen=1000)


def history() -> list[Recovery]:
    """This process's in-process recoveries so far (the last 1000), oldest first (for logging
    and tests)."""
    return list(_HISTORY)


def enabled() -> bool:
    """Whether this worker runs under stalwart's rendezvous with in-process recovery on."""
    env = os.environ
    return bool(env.get("STALWART_RDZV_PREFIX")) and bool(env.get("STALWART_KEEPER_GROUP")) and env.get(ENV_SWITCH, "1") != "0"


def is_comm_error(e: BaseException) -> bool:
    """Whether ``e`` came from a collective or the store (a peer failed), not the user's code."""
    if isinstance(e, dist.DistError | PeerLost):
        return True
    if isinstance(e, RuntimeError | ConnectionError | TimeoutError):
        text = str(e).lower()
        return any(w in text for w in _COMM_WORDS)
    return False


def run(fn: Callable[..., T], *args, hang_timeout_s: float | None = None, max_attempts: int = 3,
        dead_after_s: float | None = None, min_nodes: int | None = None, **kwargs) -> T:
    """Run ``fn(*args, **kwargs)`` with in-process recovery (see the module docstring).

    ``hang_timeout_s`` (default 60 s, ``STALWART_HANG_TIMEOUT_S``) bounds every collective
    and the wait for members that neither join a recovery nor die; ``dead_after_s``
    (default 1 s, ``STALWART_DEAD_AFTER_S``) is how long a member's heartbeat must be
    silent to count as dead when its host does not answer (a member that exited on a live
    host is seen at once: its liveness port refuses connections); ``max_attempts`` bounds in-process retries of errors raised
    with every member alive; ``min_nodes`` (default: the launcher's ``--nnodes`` minimum)
    is the fewest nodes the job continues on. The default process group is created here
    (gloo); ``fn`` must not create it.
    """
    from stalwart.ckpt.dist import init_distributed

    if not enabled():
        init_distributed("gloo")
        return fn(*args, **kwargs)
    hang = float(hang_timeout_s if hang_timeout_s is not None else os.environ.get("STALWART_HANG_TIMEOUT_S", DEFAULT_HANG_TIMEOUT_S))
    dead = float(dead_after_s if dead_after_s is not None else os.environ.get("STALWART_DEAD_AFTER_S", DEFAULT_DEAD_AFTER_S))
    group = Membership.from_env(hang, dead, min_nodes)
    hooks = []
    try:
        group.form()
        if os.environ.get(ENV_INTERRUPT, "1") != "0":
            hooks = group.tripwire.install()
        attempts = 0
        while True:
            try:
                out = fn(*args, **kwargs)
                group.finished()
                with contextlib.suppress(Exception):
                    if dist.is_initialized():
                        dist.destroy_process_group()
                return out
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as e:
                comm = is_comm_error(e)
                summary = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                tb = traceback.format_exc()
                # drop every frame of the failed attempt: its DDP reducer's hooks, its guard, its tensors
                traceback.clear_frames(e.__traceback__)
                del e
                gc.collect()
                t = time.monotonic()
                lost = group.recover(summary, comm)
                _HISTORY.append(Recovery(group.epoch, summary, tuple(group.lost), group.members.index(group.me),
                                         len(group.members), time.monotonic() - t))
                if not lost:
                    attempts += 1
                    if attempts > max_attempts:
                        group.give_up(summary)
                        log.error("stalwart: giving up after %d in-process attempts:\n%s", max_attempts, tb)
                        raise RecoveryError(f"{summary} (still failing after {max_attempts} in-process attempts"
                                            f" with every member alive)") from None
                    log.warning("stalwart: attempt %d of %d after an error with every member alive: %s", attempts,
                                max_attempts, summary)
    finally:
        for h in hooks:
            h.remove()
        group.close()


class Tripwire:
    """Raises :class:`PeerLost` in this process's forward and backward once the current
    epoch is over (see the module docstring). The watchdog trips it; the hooks
    only compare two integers until then. A trip for an epoch the process already left
    (it recovered meanwhile) is ignored."""

    def __init__(self, current: Callable[[], int]) -> None:
        self._current = current
        self._over = -1  # the epoch known to be over
        self.why = ""

    def trip(self, epoch: int, why: str) -> None:
        self.why = why
        self._over = epoch

    @property
    def tripped(self) -> bool:
        return self._over == self._current()

    def check(self) -> None:
        if self._over == self._current():
            raise PeerLost(f"the step was abandoned: {self.why}")

    def _pre(self, module, args) -> None:
        self.check()

    def _post(self, module, args, output) -> None:
        # backward is checked where parameters' gradients are computed (the costly part)
        if module._parameters and isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(self._grad)

    def _grad(self, grad) -> None:
        self.check()

    def install(self) -> list:
        """Global module hooks (every ``nn.Module`` of the process); returns their handles."""
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        return [register_module_forward_pre_hook(self._pre), register_module_forward_hook(self._post)]


class Membership:
    """This worker's view of the job's members and their epochs (see the module docstring).

    Members are numbered ``slot * local_world + local_rank`` (keeper slot of their node,
    local rank); their order is the ranks' order. Keys live in the rendezvous store under
    ``<rendezvous prefix>/inproc/r<round>/``.
    """

    def __init__(self, host: str, port: int, prefix: str, round_: int, slot: int, max_slots: int, local_rank: int,
                 local_world: int, active: list[int], node_id: str, hang_s: float, dead_s: float, min_nodes: int) -> None:
        from stalwart.ckpt.storelink import StoreLink

        self.host, self.port, self.prefix, self.round = host, port, prefix, round_
        self.slot, self.max_slots, self.local_rank, self.local_world = slot, max_slots, local_rank, local_world
        self.node_id = node_id
        self.hang_s, self.dead_s, self.min_nodes = hang_s, dead_s, min_nodes
        self.me = slot * local_world + local_rank
        self.members = [s * local_world + r for s in sorted(active) for r in range(local_world)]
        self.epoch = 0
        self.recoveries = 0
        self.lost: list[int] = []  # members the last recovery left out
        self.link = StoreLink(host, port, node=self.me, nodes=max_slots * local_world, host_store=False,
                              prefix=f"{prefix}/inproc/r{round_}", beat_s=BEAT_S, dead_after_s=dead_s)
        self.incs: dict[int, str | None] = {}
        self.probe_at: dict[int, tuple[str, int]] = {}  # member -> its liveness port
        self._probed: dict[int, float] = {}  # member -> when its port was last tried (once per beat)
        self._listener = _liveness_listener(host, port)
        self._raw = None
        self._recovering = threading.Event()
        self._stop = threading.Event()
        self._watch = threading.Thread(target=self._watchdog, name="stalwart-inproc", daemon=True)
        self.tripwire = Tripwire(lambda: self.epoch)
        # (epoch, fd -> inode) of the current process group's connections
        self._group_sockets: tuple[int, dict[int, int]] = (-1, {})
        self._sever_lock = threading.Lock()

    @classmethod
    def from_env(cls, hang_s: float, dead_s: float, min_nodes: int | None) -> Membership:
        env = os.environ
        host, port = env["STALWART_KEEPER_GROUP"].rsplit(":", 1)
        local_world = int(env.get("LOCAL_WORLD_SIZE", "1"))
        active = [int(s) for s in env["STALWART_ACTIVE_SLOTS"].split(",")]
        if min_nodes is None:
            min_nodes = int(env.get("STALWART_NNODES", "1:1").split(":")[0])
        return cls(host, int(port), env["STALWART_RDZV_PREFIX"], int(env["STALWART_RDZV_ROUND"]),
                   int(env["STALWART_KEEPER_SLOT"]), int(env["STALWART_KEEPER_SLOTS"]), int(env.get("LOCAL_RANK", "0")),
                   local_world, active, env.get("STALWART_NODE_ID", ""), hang_s, dead_s, min_nodes)

    # ---------------------------------------------------------------- keys
    def _key(self, epoch: int, name: str) -> str:
        return f"e{epoch}/{name}"

    # ---------------------------------------------------------------- groups
    def form(self) -> None:
        """Epoch 0: the rendezvous round's members; the first process group."""
        self.link.set(self._key(0, f"join/node{self.me}"), self._join_record("start", True))
        # for this node's agent, which ends its workers when the others re-form without them
        self.link.set(f"slot{self.slot}/local_world", str(self.local_world))
        self.link.set(f"slot{self.slot}/local{self.local_rank}", str(os.getpid()))
        ip, port = self._listener.getsockname()[:2]
        self.link.set(f"probe/node{self.me}", f"{ip}:{port}")
        self._await_incs(self.members)
        self._init_group()
        self._watch.start()

    def _join_record(self, why: str, comm: bool) -> str:
        return json.dumps({"pid": os.getpid(), "node_id": self.node_id, "slot": self.slot, "why": why, "comm": comm})

    def _await_incs(self, members: list[int]) -> None:
        """Every member's incarnation (set when its link started): a replaced process is a lost member."""
        deadline = time.monotonic() + self.hang_s
        for i in members:
            while True:
                v = self.link.get(f"inc/node{i}")
                if v is not None or time.monotonic() > deadline:
                    self.incs[i] = v
                    break
                time.sleep(_POLL_S)

    def _init_group(self) -> None:
        from stalwart.ckpt.dist import set_job_store

        rank, world = self.members.index(self.me), len(self.members)
        self._publish_env(rank, world)
        client = self.link.new_client()
        set_job_store(dist.PrefixStore(f"{self.prefix}/inproc/r{self.round}/job", client))
        store = dist.PrefixStore(f"{self.prefix}/inproc/r{self.round}/pg/e{self.epoch}", client)
        before = _sockets()
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=self.hang_s))
        with self._sever_lock:
            self._group_sockets = (self.epoch, {fd: ino for fd, ino in _sockets().items() if before.get(fd) != ino})

    def _sever(self, epoch: int | None = None) -> int:
        """Shut down the current process group's connections (gloo has no abort that does):
        every collective blocked on them - here or at a peer - fails at once. Destroying the
        group is not enough when something still holds it (FSDP2's device mesh does), and a
        peer blocked waiting for this member would sit out its whole timeout. The sockets
        are shut down through duplicates; gloo still owns and closes its descriptors."""
        with self._sever_lock:
            of, sockets = self._group_sockets
            if epoch is not None and epoch != of:  # the watchdog's view is stale: that group is gone
                return 0
            self._group_sockets = (of, {})
        store = (self.host, self.port)
        done = 0
        for fd, ino in sockets.items():
            try:
                dup = os.dup(fd)
            except OSError:
                continue
            try:
                if os.fstat(dup).st_ino != ino:  # gloo closed it and the number was reused
                    os.close(dup)
                    continue
                sock = socket.socket(fileno=dup)
            except OSError:
                os.close(dup)
                continue
            with sock, contextlib.suppress(OSError):
                if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.getpeername()[:2] != store:
                    sock.shutdown(socket.SHUT_RDWR)
                    done += 1
        return done

    def _publish_env(self, rank: int, world: int) -> None:
        """What :func:`stalwart.ckpt.dist.where_am_i` and the keeper client read."""
        slots = sorted({i // self.local_world for i in self.members})
        from stalwart.launchers.membership import Membership as Round

        previous = self._round_membership()
        nodes = [previous.slots[s] for s in slots] if previous is not None else []
        os.environ.update({
            "RANK": str(rank), "WORLD_SIZE": str(world), "GROUP_RANK": str(slots.index(self.slot)),
            "STALWART_ACTIVE_SLOTS": ",".join(map(str, slots)), "STALWART_INPROC_EPOCH": str(self.epoch),
        })
        if previous is not None and self.epoch > 0:
            m = Round(previous.round, tuple(nodes), {s: previous.slots[s] for s in slots}, previous.max_slots)
            os.environ["STALWART_SLOT_IDS"] = ",".join(m.keeper_ids())
            if rank == 0:  # the agents' stand-in keepers follow this (vacant slots), and so does the next round
                self._set_raw(f"{self.prefix}/membership", json.dumps({**m.to_json(), "epoch": self.epoch}))

    def _raw_client(self):
        if self._raw is None:
            self._raw = dist.TCPStore(self.host, self.port, is_master=False, timeout=datetime.timedelta(seconds=30))
        return self._raw

    def _check_restart(self) -> None:
        from stalwart.launchers.membership import restart_key

        if self._raw_client().check([restart_key(self.prefix, self.round)]):
            raise RecoveryError("the launcher restarts every worker (a node joins the job): leaving for the restart")

    def _set_raw(self, key: str, value: str) -> None:
        self._raw_client().set(key, value)

    def _round_membership(self):
        from stalwart.launchers.membership import Membership as Round

        c = self._raw_client()
        key = f"{self.prefix}/membership"
        if not c.check([key]):
            return None
        return Round.from_json(json.loads(c.get(key).decode()))

    # ---------------------------------------------------------------- recovery
    def recover(self, why: str, comm: bool) -> bool:
        """After a failed attempt: re-form with the live members. Returns whether a member was lost."""
        self._recovering.set()
        try:
            self._sever()
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
            before = list(self.members)
            target = self.epoch + 1
            while True:
                self._check_fatal(target)
                self._check_restart()
                decided = self._decide(target, why, comm)
                if self.me not in decided:
                    raise RecoveryError(f"member {self.me} (node {self.node_id}) was left out of epoch {target}"
                                        " (it joined after the others re-formed, or was taken for hung)")
                nodes = len({i // self.local_world for i in decided})
                if nodes < self.min_nodes:
                    raise RecoveryError(f"only {nodes} node(s) left, fewer than the job's minimum {self.min_nodes}")
                self.epoch, self.members = target, decided
                self.link.set("epoch", str(target))
                try:
                    self._init_group()
                    break
                except Exception as e:  # a member died while the group formed: the next epoch
                    log.warning("stalwart: epoch %d did not form (%s); re-forming", target, str(e).splitlines()[0][:200])
                    with contextlib.suppress(Exception):
                        dist.destroy_process_group()
                    target += 1
            lost = sorted(set(before) - set(self.members))
            self.lost = lost
            self.recoveries += 1
            log.warning("stalwart: in-process recovery %d: epoch %d, rank %d of %d%s (%s)", self.recoveries, self.epoch,
                        self.members.index(self.me), len(self.members),
                        f", lost member(s) {lost}" if lost else "", why)
            return bool(lost)
        finally:
            self._recovering.clear()

    def finished(self) -> None:
        """The training function returned: this member's exit is not a failure."""
        with contextlib.suppress(Exception):
            self.link.set(f"done/node{self.me}", "1")

    def _decide(self, target: int, why: str, comm: bool) -> list[int]:
        """The members of epoch ``target``: those that joined, once every other member of
        the current epoch is gone, or after ``hang_s`` for those alive that never join."""
        self.link.set(self._key(target, "begun"), f"member {self.me}: {why}")  # trips the others' forward/backward
        self.link.set(self._key(target, f"join/node{self.me}"), self._join_record(why, comm))
        key = self._key(target, "members")
        give_up_at = time.monotonic() + self.hang_s
        while True:
            raw = self.link.get(key)
            if raw is not None:
                return json.loads(raw)
            self._check_fatal(target)
            self._check_restart()
            joined = [i for i in self.members if self.link.check(self._key(target, f"join/node{i}"))]
            missing = [i for i in self.members if i not in joined]
            gone = self.link.dead(missing, self.incs) if missing else []
            gone += [i for i in missing if i not in gone and self._exited(i)]
            if len(gone) == len(missing) or time.monotonic() > give_up_at:
                proposal = json.dumps(joined)
                self.link.call(lambda c, p=proposal: c.compare_set(key, "", p))
                continue
            time.sleep(_POLL_S)

    def _exited(self, member: int) -> bool:
        """Whether ``member``'s process is known to have exited: its liveness port refuses
        connections (its host answered: the process is gone). A stopped or busy process
        still accepts (the kernel completes the handshake), and a host that does not answer
        proves nothing: those wait for the heartbeat (``dead_after_s``) or ``hang_timeout_s``."""
        now = time.monotonic()
        if now - self._probed.get(member, -BEAT_S) < BEAT_S:
            return False
        self._probed[member] = now
        where = self.probe_at.get(member)
        if where is None:
            raw = self.link.get(f"probe/node{member}")
            if raw is None:
                return False
            host, port = raw.rsplit(":", 1)
            where = self.probe_at[member] = (host, int(port))
        try:
            with socket.create_connection(where, timeout=PROBE_TIMEOUT_S):
                return False
        except ConnectionRefusedError:
            return True
        except OSError:
            return False

    def _check_fatal(self, target: int) -> None:
        msg = self.link.get(self._key(target, "fatal"))
        if msg:
            raise RecoveryError(f"another member gave up: {msg}")

    def give_up(self, why: str) -> None:
        """Tell the other members (waiting in the next epoch) that this one gives up."""
        with contextlib.suppress(Exception):
            self.link.set(self._key(self.epoch + 1, "fatal"), f"member {self.me}: {why}")
        with contextlib.suppress(Exception):
            dist.destroy_process_group()

    # ---------------------------------------------------------------- liveness
    def _watchdog(self) -> None:
        """Keep the other members' heartbeat clocks current (so a death is seen ``dead_after_s``
        after it happens, not after the first look), trip the :class:`Tripwire` once the current
        epoch is over, and end this process when the others re-formed without it (it was taken
        for hung: a stuck collective, a stopped process)."""
        while not self._stop.wait(BEAT_S):
            _drain(self._listener)
            try:
                epoch, members = self.epoch, list(self.members)
                others = [i for i in members if i != self.me]
                if others:
                    self.link.dead(others, self.incs)
                if self._recovering.is_set():
                    continue
                if not self.tripwire.tripped:
                    why = self._epoch_over(epoch, others)
                    if why and not self._recovering.is_set():
                        self.tripwire.trip(epoch, why)
                        self._sever(epoch)  # a collective this process is blocked in fails now too
                        log.info("stalwart: epoch %d is over (%s): abandoning the step", epoch, why)
                raw = self.link.get("epoch")
                if raw is not None and int(raw) > self.epoch:
                    decided = self.link.get(self._key(int(raw), "members"))
                    if decided is not None and self.me not in json.loads(decided):
                        log.error("stalwart: the job re-formed without this worker (member %d; it did not join epoch %s"
                                  " within the hang timeout): exiting", self.me, raw)
                        os.kill(os.getpid(), signal.SIGKILL)
            except Exception as e:  # the store may be briefly unreachable
                log.debug("in-process watchdog: %s", e)

    def _epoch_over(self, epoch: int, others: list[int]) -> str | None:
        """Why epoch ``epoch`` cannot go on (None: it can): a member began a recovery (it saw
        a failure first), or a member that did not finish exited (its liveness port refuses).
        A silent heartbeat alone does not trip (a busy host can stall a live member's
        heartbeat; a collective then fails or times out instead). Each watchdog probes only
        the next :data:`PROBE_FANOUT` members; the first to notice tells the rest through the
        recovery it begins."""
        begun = self.link.get(self._key(epoch + 1, "begun"))
        if begun:
            return f"a recovery began ({begun})"
        after = [i for i in others if i > self.me] + [i for i in others if i < self.me]
        for i in after[:PROBE_FANOUT]:
            if self._exited(i) and not self.link.check(f"done/node{i}"):
                return f"member {i} exited"
        return None

    def close(self) -> None:
        self._stop.set()
        if self._watch.is_alive():
            self._watch.join(5.0)
        self.link.close(join_s=5.0)
        self._listener.close()
        self._raw = None


def _sockets() -> dict[int, int]:
    """This process's socket descriptors and their inodes (Linux; empty elsewhere)."""
    out = {}
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return out
    for name in names:
        try:
            link = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if link.startswith("socket:["):
            out[int(name)] = int(link[8:-1])
    return out


def _liveness_listener(store_host: str, store_port: int) -> socket.socket:
    """A listening socket that only proves this process is alive: a connection to it is
    accepted (by the kernel, even while the process is stopped) until the process exits,
    then refused. Bound on the address this host reaches the store from."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect((store_host, store_port))  # no packet: only picks the route's local address
        ip = probe.getsockname()[0]
    except OSError:
        ip = "127.0.0.1"
    finally:
        probe.close()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((ip, 0))
    sock.listen(128)
    sock.setblocking(False)
    return sock


def _drain(listener: socket.socket) -> None:
    """Close the probes' connections (they only needed the handshake)."""
    while True:
        try:
            conn, _ = listener.accept()
        except (BlockingIOError, OSError):
            return
        conn.close()


__all__ = ["DEFAULT_DEAD_AFTER_S", "DEFAULT_HANG_TIMEOUT_S", "Membership", "PeerLost", "Recovery", "RecoveryError", "Tripwire",
           "enabled", "history", "is_comm_error", "run"]
