"""Reclaiming keepers' shared memory left behind by nodes that are gone (issue 13)."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time

from stalwart.ckpt.shm import OWNER_FILE, boot_id, pid_alive, reclaim_orphans


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _keeper_dir(base, name: str, owner: dict | None, size: int = 4096) -> str:
    path = os.path.join(base, f"stalwart-{name}")
    os.makedirs(os.path.join(path, "slot-0"))
    with open(os.path.join(path, "slot-0", "rank-00000.bin"), "wb") as f:
        f.write(b"\0" * size)
    if owner is not None:
        record = {"node_id": name, "boot": boot_id(), "keeper_pid": _dead_pid(), "since": time.time(), **owner}
        with open(os.path.join(path, OWNER_FILE), "w") as f:
            json.dump(record, f)
    open(path + ".start", "w").close()
    return path


def test_zombies_are_not_alive():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while True:  # exited but not reaped: a zombie
        with open(f"/proc/{p.pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                break
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert not pid_alive(p.pid)
    assert pid_alive(os.getpid())
    p.wait()
    assert not pid_alive(p.pid)


def test_reclaims_only_what_nobody_can_adopt(tmp_path):
    base = str(tmp_path)
    gone = _keeper_dir(base, "gone-node", {"agent_pid": _dead_pid()}, size=1 << 20)
    rebooted = _keeper_dir(base, "before-reboot", {"agent_pid": os.getpid(), "boot": "another-boot"})
    agent_alive = _keeper_dir(base, "agent-alive", {"agent_pid": os.getpid()})  # may restart the keeper and adopt it
    unmanaged = _keeper_dir(base, "unmanaged", None)  # protect()'s own keeper: a restarted trainer adopts it
    fresh = _keeper_dir(base, "no-agent-fresh", {"agent_pid": None})
    stale = _keeper_dir(base, "no-agent-stale", {"agent_pid": None, "since": time.time() - 7200})
    held = _keeper_dir(base, "keeper-running", {"agent_pid": _dead_pid()})
    mine = _keeper_dir(base, "mine", {"agent_pid": _dead_pid()})
    fd = os.open(held, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a live keeper holds its directory's lock
    try:
        removed = reclaim_orphans(base, stale_s=3600, keep=mine)
        assert reclaim_orphans(base, stale_s=3600, keep=mine) == []  # nothing more to take
    finally:
        os.close(fd)
    assert sorted(removed) == sorted([gone, rebooted, stale])
    for path in removed:
        assert not os.path.exists(path) and not os.path.exists(path + ".start")
    for path in (agent_alive, unmanaged, fresh, held, mine):
        assert os.path.isdir(path) and os.path.exists(path + ".start")
    assert reclaim_orphans(base, stale_s=3600, keep=mine) == [held]  # its keeper is gone now
    assert reclaim_orphans(os.path.join(base, "missing")) == []
