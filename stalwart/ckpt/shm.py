"""Host housekeeping of keepers' shared-memory directories: who owns one, and reclaiming
those whose owner is gone.

A keeper started by the launcher plugin records its owner in ``owner.json``: the node
identity it serves, the launcher agent's pid, and this machine's boot id. When a node
dies but its host survives (an OOM kill, or several simulated nodes on one host), the
directory - possibly gigabytes of snapshots - is left behind. :func:`reclaim_orphans`
removes every directory whose keeper is gone (its lock is free) and whose agent is
gone too (or that names no agent and was abandoned longer than ``stale_s``), so
repeated failures do not eat host memory. A directory whose keeper still runs, or
whose agent still lives (it may restart the keeper and adopt the snapshots), is kept.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import time

from stalwart.formats.atomic import atomic_write

log = logging.getLogger("stalwart.keeper")

OWNER_FILE = "owner.json"


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "?"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie - dead, not yet reaped by its parent - does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def write_owner(shm_dir: str, node_id: str | None, agent_pid: int | None, job: str | None = None) -> None:
    record = {"node_id": node_id, "agent_pid": agent_pid, "boot": boot_id(), "job": job, "keeper_pid": os.getpid(),
              "since": time.time()}
    atomic_write(os.path.join(shm_dir, OWNER_FILE), json.dumps(record).encode(), fsync=False)


def read_owner(shm_dir: str) -> dict | None:
    try:
        with open(os.path.join(shm_dir, OWNER_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _keeper_gone(path: str) -> bool:
    """True if no keeper holds ``path``'s lock (it is dead or never started)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    finally:
        os.close(fd)


def orphan_reason(path: str, stale_s: float) -> str | None:
    """Why the keeper directory ``path`` is an orphan, or None when it may still be needed."""
    if not _keeper_gone(path):
        return None
    owner = read_owner(path)
    if owner is None:
        return None  # not a launcher-managed keeper: a restarted trainer may still adopt it
    if owner.get("boot") not in (None, "?", boot_id()):
        return f"left before a reboot (node {owner.get('node_id')})"
    agent = owner.get("agent_pid")
    if agent is not None:
        return None if pid_alive(int(agent)) else f"its node's agent (pid {agent}) and keeper are gone (node {owner.get('node_id')})"
    age = time.time() - float(owner.get("since", 0))
    return f"its keeper is gone and nothing claimed it for {age:.0f}s" if age > stale_s else None


def reclaim_orphans(base: str, stale_s: float = 3600.0, keep: str | None = None) -> list[str]:
    """Remove the keeper directories under ``base`` whose owners are gone; returns what was removed."""
    removed = []
    try:
        names = os.listdir(base)
    except OSError:
        return removed
    for name in names:
        path = os.path.join(base, name)
        if not name.startswith("stalwart-") or not os.path.isdir(path) or path == keep:
            continue
        why = orphan_reason(path, stale_s)
        if why is None:
            continue
        size = 0
        with contextlib.suppress(OSError):
            for root, _, files in os.walk(path):
                size += sum(os.path.getsize(os.path.join(root, f)) for f in files)
        shutil.rmtree(path, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path + ".start")
        log.warning("reclaimed %s (%.1f MiB of shared memory): %s", path, size / 2**20, why)
        removed.append(path)
    return removed
