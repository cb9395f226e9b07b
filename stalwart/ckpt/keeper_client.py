"""Trainer side of the keeper: find this node's keeper or start one, and talk to it."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

from stalwart.ckpt.protocol import Channel, KeeperGone, connect
from stalwart.ckpt.redundancy import ECConfig
from stalwart.ckpt.tiers import TierSpec
from stalwart.errors import StalwartError

SHM_BASE = os.environ.get("STALWART_SHM_BASE", "/dev/shm")


def shm_dir_for(root: str, node: int | str) -> str:
    """The shared-memory directory of a job (identified by its root) on one node (its rank,
    or under the launcher plugin its stable node identity)."""
    key = hashlib.sha1(f"{os.path.abspath(root)}#node{node}".encode()).hexdigest()[:16]
    return os.path.join(SHM_BASE, f"stalwart-{key}")


def plugin_env() -> dict:
    """What the launcher plugin told this worker about its node's keeper (empty without it)."""
    env = os.environ
    if not env.get("STALWART_NODE_ID"):
        return {}
    return {"node_id": env["STALWART_NODE_ID"], "prefix": env.get("STALWART_KEEPER_PREFIX", ""),
            "agent_pid": env.get("STALWART_AGENT_PID"), "shared_store": env.get("STALWART_KEEPER_SHARED_STORE") == "1"}


class KeeperClient:
    """A connection to the node's keeper, starting it (in its own session) when absent."""

    def __init__(
        self,
        root: str,
        tiers: list[TierSpec],
        *,
        rank: int,
        local_ranks: list[int],
        node: int = 0,
        nodes: int = 1,
        slots: int = 2,
        linger_s: float = 300.0,
        group_addr: str | None = None,
        start_timeout_s: float = 60.0,
        ec: ECConfig | None = None,
        reply_timeout_s: float = 60.0,
        commit_timeout_s: float = 120.0,
    ) -> None:
        self.root = root
        self.tiers = tiers
        self.rank = rank
        self.local_ranks = local_ranks
        self.node = node
        self.nodes = nodes
        self.slots = slots
        self.linger_s = linger_s
        self.group_addr = group_addr
        self.start_timeout_s = start_timeout_s
        self.reply_timeout_s = reply_timeout_s  # beyond a request's own ``timeout``: then the keeper is gone
        self.commit_timeout_s = commit_timeout_s
        self.ec = ec  # erasure coding across the keepers (passed to a keeper this client starts)
        self.plugin = plugin_env()
        self.shm_dir = shm_dir_for(root, self.plugin["node_id"] if self.plugin else node)
        self.sock_path = os.path.join(self.shm_dir, "keeper.sock")
        self.chan: Channel | None = None
        self.bg: Channel | None = None  # background requests (copy done): never queued behind a blocking one
        self.started_here = False
        self.proc: subprocess.Popen | None = None

    # ------------------------------------------------------------------ lifecycle
    def _try_connect(self) -> Channel | None:
        try:
            return connect(self.sock_path, timeout=5.0)
        except (FileNotFoundError, ConnectionRefusedError, OSError):
            return None

    def _log_dir(self) -> str:
        return os.path.join(self.root, ".stalwart") if "://" not in self.root else self.shm_dir

    def _spawn(self) -> None:
        log_dir = self._log_dir()
        os.makedirs(log_dir, exist_ok=True)
        cmd = [
            sys.executable, "-m", "stalwart.ckpt.keeper",
            "--shm-dir", self.shm_dir,
            "--tiers", json.dumps([t.to_json() for t in self.tiers]),
            "--slots", str(self.slots),
            "--linger", str(self.linger_s),
            "--node", str(self.node),
            "--nodes", str(self.nodes),
            "--commit-timeout", str(self.commit_timeout_s),
            "--log-file", os.path.join(log_dir, f"keeper-node{self.node}.log"),
        ]
        if self.group_addr:
            cmd += ["--group-addr", self.group_addr]
        if self.plugin:  # the launcher's agent owns this node: the keeper lives as long as the agent
            cmd += ["--node-id", self.plugin["node_id"], "--group-prefix", self.plugin["prefix"]]
            if self.plugin["agent_pid"]:
                cmd += ["--agent-pid", self.plugin["agent_pid"]]
            if self.plugin["shared_store"]:
                cmd += ["--shared-store"]
        if self.ec is not None:
            cmd += ["--ec", f"{self.ec.k},{self.ec.m}", "--ec-chunk", str(self.ec.chunk), "--ec-nice", str(self.ec.nice)]
            if not self.ec.shared:
                cmd += ["--ec-no-shared"]
            if self.ec.max_parity_memory is not None:
                cmd += ["--max-parity-memory", str(self.ec.max_parity_memory)]
            if self.ec.rate:
                cmd += ["--ec-rate", str(self.ec.rate)]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC_", "CUDA_VISIBLE"))}
        # a keeper that dies before its log is set up (bad arguments, no store) says why here
        with open(os.path.join(log_dir, f"keeper-node{self.node}.err"), "ab") as err:
            self.proc = subprocess.Popen(
                cmd, start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=err, close_fds=True, env=env,
            )
        self.started_here = True

    def _start_lock_path(self) -> str:
        # beside the shared-memory directory: an exiting keeper removes the directory
        return self.shm_dir + ".start"

    def _connect_once(self) -> Channel | None:
        chan = self._try_connect()
        if chan is not None:
            return chan
        os.makedirs(os.path.dirname(self.shm_dir), exist_ok=True)  # the shm base may be new (or removed)
        fd = os.open(self._start_lock_path(), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            chan = self._try_connect()
            if chan is None:
                self._spawn()
                deadline = time.monotonic() + self.start_timeout_s
                while chan is None and time.monotonic() < deadline:
                    time.sleep(0.05)
                    chan = self._try_connect()
                    if chan is None and self.proc is not None and self.proc.poll() not in (None, 0):
                        raise StalwartError(
                            f"the keeper for {self.shm_dir} exited at start with status {self.proc.returncode}"
                            f" (see {os.path.join(self._log_dir(), f'keeper-node{self.node}.err')})")
        finally:
            os.close(fd)
        return chan

    def connect(self) -> dict:
        """Connect (starting the keeper if needed) and say hello; returns the keeper's status.

        A keeper that is just exiting may accept and then close the connection; the
        hello is then retried against its successor.
        """
        deadline = time.monotonic() + self.start_timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            chan = self._connect_once()
            if chan is None:
                break
            try:
                reply = chan.call("hello", reply_timeout=self.reply_timeout_s, rank=self.rank,
                                  local_ranks=self.local_ranks, pid=os.getpid())
            except KeeperGone as e:
                last = e
                chan.close()
                time.sleep(0.1)
                continue
            self.chan = chan
            return reply
        raise StalwartError(
            f"could not start or reach the keeper at {self.sock_path} within {self.start_timeout_s:.0f}s"
            + (f" ({last})" if last else "")
        )

    def _reply_timeout(self, kwargs: dict) -> float:
        return float(kwargs.get("timeout") or 0.0) + self.reply_timeout_s

    def call(self, op: str, **kwargs) -> dict:
        """A request on the control connection; bounded by its own ``timeout`` plus ``reply_timeout_s``."""
        if self.chan is None:
            raise KeeperGone("not connected to a keeper")
        return self.chan.call(op, reply_timeout=self._reply_timeout(kwargs), **kwargs)

    def begin(self, op: str, **kwargs) -> Callable[[], dict]:
        """:meth:`call` in two halves (see :meth:`Channel.begin`): the returned function,
        which must be called, reads the reply."""
        if self.chan is None:
            raise KeeperGone("not connected to a keeper")
        return self.chan.begin(op, reply_timeout=self._reply_timeout(kwargs), **kwargs)

    def call_background(self, op: str, **kwargs) -> dict:
        """A request from a background thread, on its own connection."""
        if self.bg is None:
            chan = self._try_connect()
            if chan is None:
                raise KeeperGone("the keeper is not reachable")
            self.bg = chan
        try:
            return self.bg.call(op, reply_timeout=self._reply_timeout(kwargs), **kwargs)
        except KeeperGone:
            self.bg = None
            raise

    def close(self, clean: bool, step: int | None = None) -> None:
        if self.bg is not None:
            self.bg.close()
            self.bg = None
        if self.chan is None:
            return
        with contextlib.suppress(StalwartError, OSError):
            self.chan.call("bye", reply_timeout=self.reply_timeout_s, rank=self.rank, clean=clean, step=step)
        self.chan.close()
        self.chan = None

    def keeper_pid(self) -> int | None:
        try:
            with open(os.path.join(self.shm_dir, "keeper.pid")) as f:
                return int(f.read().strip())
        except (FileNotFoundError, ValueError):
            return None
