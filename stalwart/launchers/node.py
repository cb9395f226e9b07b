"""What a launcher agent does for its node besides rendezvous: host housekeeping and
stand-in keepers.

* On start, shared memory left on this host by keepers whose node is gone (a killed
  node, an OOM kill) is reclaimed (:func:`stalwart.ckpt.shm.reclaim_orphans`).
* With erasure coding, every vacant keeper slot gets a *stand-in* keeper, run by the
  agent :meth:`Membership.standin_host` names: it takes the lost node's place in the
  redundancy group, so the group forms, rebuilds the lost node's snapshots from the
  survivors' parity and serves them to the restoring workers. A stand-in holds no data
  of new steps (memory snapshots are not erasure-coded while the job is below its node
  count) and is retired when a node claims its slot: the claiming agent asks it to go
  and waits until it has, before its own workers start the slot's keeper.

The node's own keeper is started by its first worker's ``protect()`` (which holds the
job's checkpoint configuration) and, launched with the agent's pid, lives as long as
the agent: across every worker restart, until the agent exits.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

from stalwart.ckpt.shm import read_owner, reclaim_orphans
from stalwart.launchers.membership import Membership, standin_id

log = logging.getLogger("stalwart.launchers")

STANDIN_HANDOVER_S = 15.0


def _shm_base() -> str:
    return os.environ.get("STALWART_SHM_BASE", "/dev/shm")


class NodeServices:
    """Per-agent services (see the module docstring). ``store`` is the rendezvous store;
    ``prefix`` the keepers' key space in it (a stand-in's store link uses the same)."""

    def __init__(self, node_id: str, store, store_addr: str, prefix: str, reconcile_s: float = 1.0,
                 membership_key: str | None = None, on_lost=None) -> None:
        self.node_id = node_id
        self.store = store
        self.store_addr = store_addr
        self.prefix = prefix
        self.reconcile_s = reconcile_s
        self.membership: Membership | None = None
        self.membership_key = membership_key  # where in-process recoveries publish the round's current members
        self._epoch = 0
        self.on_lost = on_lost  # called by the agent of the epoch's lowest live slot with the round's lost node ids
        self.standins: dict[int, tuple[str, subprocess.Popen]] = {}  # slot -> (stand-in node id, process)
        self._standby: subprocess.Popen | None = None  # a keeper process, imports done, waiting for its arguments
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        reclaim_orphans(_shm_base())  # logs what it reclaims

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    # ---------------------------------------------------------------- rounds
    def before_workers(self, membership: Membership, slot: int) -> None:
        """Called by the rendezvous handler once a round formed, before the workers start."""
        with self._lock:
            previous = self.membership
            self.membership = membership
            self._epoch = 0
        if previous is not None and slot in previous.vacant:
            self._take_over_from_standin(slot)
        self.reconcile()
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="stalwart-standins", daemon=True)
            self._thread.start()

    def _take_over_from_standin(self, slot: int) -> None:
        """This node claims a slot a stand-in holds: ask it to leave, wait until it has."""
        standin = self._get(self.key(f"standin/{slot}/id"))
        if not standin:
            return
        if self._get(self.key(f"standin/{slot}/gone")) == standin:
            return
        self.store.set(self.key(f"standin/{slot}/retire"), standin)
        deadline = time.monotonic() + STANDIN_HANDOVER_S
        while time.monotonic() < deadline:
            if self._get(self.key(f"standin/{slot}/gone")) == standin:
                log.info("stalwart: stand-in %s left keeper slot %s", standin, slot)
                return
            time.sleep(0.1)
        log.warning("stalwart: the stand-in keeper of slot %s did not leave within %.0fs; starting this node's keeper"
                    " anyway (the redundancy group re-forms around it)", slot, STANDIN_HANDOVER_S)

    # ---------------------------------------------------------------- stand-ins
    def _follow_epochs(self) -> None:
        """Adopt the members of the round's newest in-process epoch (survivors that re-formed
        without a restart, :mod:`stalwart.elastic.inprocess`): its vacant slots need stand-ins."""
        if self.membership_key is None or self.membership is None:
            return
        raw = self._get(self.membership_key)
        if not raw:
            return
        obj = json.loads(raw)
        epoch = int(obj.get("epoch", 0))
        with self._lock:
            previous = self.membership
            if previous is None or int(obj["round"]) != previous.round or epoch <= self._epoch:
                return
            self.membership, self._epoch = Membership.from_json(obj), epoch
            log.info("stalwart: round %s epoch %s: nodes %s", obj["round"], epoch, list(self.membership.nodes))
            lost = [n for n in previous.nodes if n not in self.membership.nodes]
            first = self.membership.slots[self.membership.active[0]] == self.node_id
        if self.node_id in lost:
            self._fence_workers(previous)
        if lost and first and self.on_lost is not None:
            self.on_lost(lost)

    def _fence_workers(self, previous: Membership) -> None:
        """The others re-formed without this node (its workers were taken for hung: stopped,
        stuck): kill them, so that torchrun restarts them and the node joins again."""
        slot = previous.slot_of(self.node_id)
        keys = f"{self.membership_key.rsplit('/', 1)[0]}/inproc/r{previous.round}/slot{slot}"
        for local_rank in range(int(self._get(f"{keys}/local_world") or 0)):
            raw = self._get(f"{keys}/local{local_rank}")
            if not raw:
                continue
            pid = int(raw)
            log.error("stalwart: the job re-formed without this node: killing its worker (pid %s)", pid)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        # the others gave this node's keeper slot to a stand-in: this node comes back as a new one (its keeper
        # leaves too, as with a lost node; its restarted workers start a fresh keeper that takes the slot back)
        for d in glob.glob(os.path.join(_shm_base(), "stalwart-*")):
            owner = read_owner(d) or {}
            if owner.get("agent_pid") == os.getpid() and owner.get("node_id") == self.node_id and owner.get("keeper_pid"):
                log.error("stalwart: ... and its keeper (pid %s)", owner["keeper_pid"])
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(int(owner["keeper_pid"]), signal.SIGKILL)

    def _loop(self) -> None:
        while not self._stop.wait(self.reconcile_s):
            try:
                self._follow_epochs()
                self.reconcile()
            except Exception as e:  # the store may be briefly unreachable during a re-form
                log.debug("stand-in reconcile: %s", e)

    def reconcile(self) -> None:
        """Run a stand-in for every vacant slot this node is responsible for, and only those."""
        with self._lock:
            m = self.membership
            if m is None or self._stop.is_set():
                return
            mine = {v for v in m.vacant if m.standin_host(v) == self.node_id}
            for v, (sid, proc) in list(self.standins.items()):
                if v not in mine or proc.poll() is not None:
                    if proc.poll() is None:
                        self.store.set(self.key(f"standin/{v}/retire"), sid)
                    del self.standins[v]
            if not mine - set(self.standins) and self._standby is not None:
                return
            config = self._get(self.key("config"))
            if not config or not json.loads(config).get("ec"):
                return  # no keeper configured yet, or no erasure coding: nothing to stand in for
            for v in sorted(mine - set(self.standins)):
                self.standins[v] = self._spawn_standin(v, json.loads(config))
            if self._standby is None or self._standby.poll() is not None:
                # imports at the lowest CPU priority: this runs while the survivors take their first steps
                self._standby = self._start_keeper_process([], stdin=subprocess.PIPE, module="stalwart.launchers.standby")

    def _spawn_standin(self, slot: int, config: dict) -> tuple[str, subprocess.Popen]:
        from stalwart.ckpt.keeper import standin_args

        sid = standin_id(slot, self.node_id)
        shm = os.path.join(_shm_base(), "stalwart-" + hashlib.sha1(f"{self.prefix}#{sid}".encode()).hexdigest()[:16])
        args = ["--shm-dir", shm, "--node", str(slot), "--group-addr", self.store_addr, "--shared-store",
                "--group-prefix", self.prefix, "--agent-pid", str(os.getpid()), "--node-id", sid, *standin_args(config)]
        log_dir = os.environ.get("STALWART_LOG_DIR")
        if log_dir:
            args += ["--log-file", os.path.join(log_dir, f"keeper-standin-{slot}.log")]
        self.store.set(self.key(f"standin/{slot}/id"), sid)
        proc, self._standby = self._standby, None
        try:
            # the standby has imported torch and the keeper already: seconds off a recovery
            proc.stdin.write(json.dumps(args) + "\n")
            proc.stdin.close()
        except (AttributeError, OSError, ValueError):  # none yet, or it died
            proc = self._start_keeper_process(args, stdin=subprocess.DEVNULL)
        log.warning("stalwart: keeper slot %s has no live node: started stand-in keeper %s (pid %s)", slot, sid, proc.pid)
        return sid, proc

    @staticmethod
    def _start_keeper_process(args: list[str], stdin, module: str = "stalwart.ckpt.keeper") -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC_", "CUDA_VISIBLE"))}
        return subprocess.Popen([sys.executable, "-m", module, *args], start_new_session=True,
                                stdin=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True,
                                env=env, text=True)

    def _get(self, key: str) -> str | None:
        with contextlib.suppress(Exception):
            if self.store.check([key]):
                return self.store.get(key).decode()
        return None

    def shutdown(self) -> None:
        """The agent is leaving: retire this node's stand-ins (its own keeper follows the agent's exit)."""
        self._stop.set()
        with self._lock:
            for v, (sid, proc) in self.standins.items():
                with contextlib.suppress(Exception):
                    self.store.set(self.key(f"standin/{v}/retire"), sid)
                with contextlib.suppress(Exception):
                    proc.wait(timeout=5)
            self.standins.clear()
            if self._standby is not None:
                with contextlib.suppress(Exception):
                    self._standby.stdin.close()  # end of input: it leaves without starting a keeper
                self._standby = None
