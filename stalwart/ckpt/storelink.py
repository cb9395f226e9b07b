"""The keepers' store link: one TCPStore shared by every keeper of a job.

It carries the keepers' small control traffic - multi-node commits, erasure-coding
generations and tasks, peer addresses - and their liveness: each keeper bumps a
heartbeat counter and records its incarnation, so the others can tell a dead or
replaced keeper from a slow one. Node 0's keeper hosts the store; the others reconnect
(and re-publish their kept keys) when it restarts. Elastic recovery uses the same link.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Sequence

from stalwart.errors import StalwartError

log = logging.getLogger("stalwart.keeper")


class GroupError(StalwartError):
    """Another keeper of the group is gone or did not answer in time."""


class StoreDown(GroupError):
    """The keepers' TCPStore (hosted by node 0's keeper) cannot be reached."""


def _td(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)


def local_address(group_host: str) -> str:
    """The address other keepers reach this one at (``STALWART_KEEPER_ADDR`` overrides)."""
    env = os.environ.get("STALWART_KEEPER_ADDR")
    if env:
        return env
    if group_host in ("localhost", "::1") or group_host.startswith("127."):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((group_host, 1))  # no packet is sent: this picks the interface routing to the store
        return s.getsockname()[0]


class StoreLink:
    """The keepers' TCPStore, made robust for background use.

    * a pool of client connections (a blocking ``wait`` on a TCPStore client blocks
      every other call on it, so concurrent threads never share one);
    * reconnects when the store is gone (node 0's keeper died) and, on reaching a *new*
      store (its ``store/id`` changed), re-publishes this keeper's kept keys;
    * a heartbeat counter ``beat/node<i>`` every ``beat_s`` and ``inc/node<i>``, this
      keeper process's incarnation, so peers can tell dead or replaced keepers;
    * :meth:`gather` waits for every node's key of a step but gives up early, naming
      them, on nodes whose heartbeat stopped or whose keeper was replaced.
    """

    def __init__(
        self,
        host: str,
        port: int,
        node: int,
        nodes: int,
        *,
        timeout_s: float = 600.0,
        op_timeout_s: float = 30.0,
        beat_s: float = 1.0,
        dead_after_s: float | None = None,
        host_store: bool | None = None,
        prefix: str = "",
    ) -> None:
        """``host_store``: host the TCPStore in this process (default: node 0 does); with
        False every keeper is a client of a store someone else hosts (the launcher's
        rendezvous store), and ``prefix`` keeps the keepers' keys apart from its own."""
        import torch.distributed as dist

        self._dist = dist
        self.host, self.port, self.node, self.nodes = host, port, node, nodes
        self.timeout_s = timeout_s
        self.op_timeout_s = op_timeout_s
        self.beat_s = beat_s
        self.dead_after_s = dead_after_s if dead_after_s is not None else float(os.environ.get("STALWART_KEEPER_DEAD_AFTER_S", "10"))
        self.inc = f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(4)}"
        self.epoch = 0  # bumped whenever a new store (another node-0 keeper) is reached
        self._store_id: str | None = None
        self._lock = threading.Lock()
        self._idle: list = []
        self._kept: dict[str, str] = {}
        self._beats: dict[int, tuple[int, float]] = {}
        self._stop = threading.Event()
        self.prefix = prefix
        hosting = node == 0 if host_store is None else host_store
        self._server = self._host_store() if hosting else None
        if not hosting:
            self._name_shared_store()
        self.keep(f"inc/node{node}", self.inc)
        self._beat_thread = threading.Thread(target=self._heartbeat, name="store-beat", daemon=True)
        self._beat_thread.start()

    # ---------------------------------------------------------------- connections
    def _host_store(self):
        deadline = time.monotonic() + 60
        while True:
            try:
                server = self._dist.TCPStore(self.host, self.port, self.nodes, True, timeout=_td(self.op_timeout_s),
                                             wait_for_workers=False)
                break
            except Exception as e:  # the port may still be held by a dying predecessor
                if time.monotonic() > deadline:
                    raise StoreDown(f"cannot host the keepers' store on port {self.port}: {e}") from None
                time.sleep(0.5)
        self._scoped(server).set("store/id", self.inc)
        self._store_id = self.inc
        return server

    def _name_shared_store(self) -> None:
        """A store someone else hosts: the first keeper to arrive names it, so that a
        restarted store (a new id) is noticed like a restarted keeper-hosted one."""
        deadline = time.monotonic() + 60
        while True:
            try:
                c = self._scoped(self._dist.TCPStore(self.host, self.port, self.nodes, False, timeout=_td(self.op_timeout_s)))
                c.compare_set("store/id", "", self.inc)
                return
            except Exception as e:
                if time.monotonic() > deadline:
                    raise StoreDown(f"the store at {self.host}:{self.port} is unreachable: {e}") from None
                time.sleep(0.5)

    def new_client(self):
        """A fresh client connection (raises when the store cannot be reached)."""
        c = self._scoped(self._dist.TCPStore(self.host, self.port, self.nodes, False, timeout=_td(self.op_timeout_s)))
        sid = c.get("store/id").decode()
        republish = False
        with self._lock:
            if self._store_id is None:
                self._store_id = sid
            elif sid != self._store_id:
                self._store_id = sid
                self.epoch += 1
                self._beats.clear()
                republish = True
            kept = dict(self._kept)
        if republish:
            log.warning("the keepers' store was restarted (node 0's keeper is new): re-joining")
            for k, v in kept.items():
                c.set(k, v)
        return c

    def _scoped(self, client):
        return self._dist.PrefixStore(self.prefix, client) if self.prefix else client

    def _take(self):
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return self.new_client()

    def _give(self, c) -> None:
        with self._lock:
            self._idle.append(c)

    def call(self, fn: Callable, retry_s: float | None = None):
        """``fn(client)``; on a network error retries on a new connection for ``retry_s``."""
        deadline = time.monotonic() + (self.op_timeout_s if retry_s is None else retry_s)
        while True:
            try:
                c = self._take()
            except Exception as e:  # cannot connect (yet)
                last: Exception = e
            else:
                try:
                    out = fn(c)
                except self._dist.DistNetworkError as e:
                    last = e  # the connection is dead: drop it
                except BaseException:
                    self._give(c)
                    raise
                else:
                    self._give(c)
                    return out
            if self._stop.is_set() or time.monotonic() > deadline:
                first = str(last).splitlines()[0] if str(last) else type(last).__name__
                raise StoreDown(f"the keepers' store at {self.host}:{self.port} is unreachable ({first})")
            time.sleep(0.5)

    def close(self, join_s: float = 0.0) -> None:
        """Stop the heartbeat; with ``join_s``, wait that long for its thread to end (a process
        about to exit must not leave it inside a store call: the C++ client aborts the process)."""
        self._stop.set()
        if join_s and self._beat_thread is not threading.current_thread():
            self._beat_thread.join(join_s)

    # ---------------------------------------------------------------- key/value
    def set(self, key: str, value: str) -> None:
        self.call(lambda c: c.set(key, value))

    def keep(self, key: str, value: str) -> None:
        """Set ``key`` and set it again on every new store this keeper reaches."""
        with self._lock:
            self._kept[key] = value
        with contextlib.suppress(StoreDown):
            self.set(key, value)

    def get(self, key: str) -> str | None:
        """The value of ``key``, or None when it does not exist."""

        def fn(c):
            return c.get(key).decode() if c.check([key]) else None

        return self.call(fn)

    def add(self, key: str, amount: int) -> int:
        return int(self.call(lambda c: c.add(key, amount)))

    def check(self, key: str) -> bool:
        return bool(self.call(lambda c: c.check([key])))

    def delete(self, key: str) -> None:
        with contextlib.suppress(Exception):
            self.call(lambda c: c.delete_key(key), retry_s=1.0)

    def wait(self, keys: list[str], timeout_s: float) -> bool:
        """Whether all ``keys`` exist within ``timeout_s`` (False on timeout)."""

        def fn(c):
            try:
                c.wait(keys, _td(max(timeout_s, 0.01)))
                return True
            except self._dist.DistNetworkError:
                raise
            except self._dist.DistStoreError:
                return False

        return self.call(fn, retry_s=max(self.op_timeout_s, timeout_s))

    # ---------------------------------------------------------------- liveness
    def _heartbeat(self) -> None:
        key = f"beat/node{self.node}"
        while not self._stop.wait(self.beat_s):
            try:
                self.call(lambda c: c.add(key, 1), retry_s=self.beat_s * 3)
            except Exception as e:  # the store is down: keep trying
                log.debug("heartbeat: %s", e)

    def dead(self, nodes: Sequence[int], incs: dict[int, str | None] | None = None) -> list[int]:
        """Nodes whose keeper's heartbeat has not moved for ``dead_after_s`` (as seen from
        here), or whose current incarnation differs from ``incs[node]``."""
        out = []
        now = time.monotonic()
        for i in nodes:
            if incs is not None and i in incs and self.get(f"inc/node{i}") != incs[i]:
                out.append(i)
                continue
            v = self.add(f"beat/node{i}", 0)
            with self._lock:
                prev = self._beats.get(i)
                if prev is None or prev[0] != v:
                    self._beats[i] = (v, now)
                elif now - prev[1] > self.dead_after_s:
                    out.append(i)
        return out

    def alive(self, nodes: Sequence[int]) -> list[int]:
        """Nodes whose heartbeat moved within ``dead_after_s`` (call repeatedly: one look
        at a counter cannot tell)."""
        now = time.monotonic()
        out = []
        for i in nodes:
            v = self.add(f"beat/node{i}", 0)
            with self._lock:
                prev = self._beats.get(i)
                if prev is None:
                    self._beats[i] = (v, now - self.dead_after_s - 1)  # unknown: must move to count
                elif prev[0] != v:
                    self._beats[i] = (v, now)
                    out.append(i)
                elif now - prev[1] <= self.dead_after_s:
                    out.append(i)
        return out

    def gather(
        self,
        key: str,
        nodes: Sequence[int],
        *,
        incs: dict[int, str | None] | None = None,
        timeout_s: float | None = None,
        abort: Callable[[list[int]], str | None] | None = None,
    ) -> list:
        """Every node's JSON value of ``key`` (``<key>/node<i>``), in ``nodes`` order.

        Raises :class:`GroupError` naming the nodes that did not publish when their
        keeper is dead or was replaced (by ``incs``, or since this call started), when
        ``abort(missing_nodes)`` returns a reason, or after ``timeout_s``.
        """
        keys = [f"{key}/node{i}" for i in nodes]
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        seen = dict(incs) if incs else {}
        while not self.wait(keys, min(2.0, max(0.05, deadline - time.monotonic()))):
            missing = [i for i, k in zip(nodes, keys, strict=True) if not self.check(k)]
            if not missing:
                break
            for i in missing:
                seen.setdefault(i, self.get(f"inc/node{i}"))
            dead = self.dead(missing, seen)
            if dead:
                raise GroupError(f"{key}: the keeper of node(s) {', '.join(map(str, dead))} is gone or was replaced")
            why = abort(missing) if abort is not None else None
            if why:
                raise GroupError(f"{key}: {why}")
            if time.monotonic() > deadline:
                raise GroupError(f"{key}: node(s) {', '.join(map(str, missing))} did not report within the timeout")
        return [json.loads(self.call(lambda c, k=k: c.get(k)).decode()) for k in keys]

