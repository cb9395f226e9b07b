"""Shared helpers for the checkpoint-engine tests: launching workers, cleaning up keepers."""

from __future__ import annotations

import contextlib
import glob
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

WORKERS = os.path.join(os.path.dirname(__file__), "workers")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: str, *args: str, nproc: int = 2, max_restarts: int = 0, timeout: float = 240, env=None) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}",
        "--monitor-interval=0.1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--nnodes=1",
        script if os.path.isabs(script) or os.sep in script else os.path.join(WORKERS, script), *args,
    ]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return run_group(cmd, timeout, full_env)


def run_group(cmd: list[str], timeout: float, env=None) -> subprocess.CompletedProcess:
    """Run a command in its own process group; on timeout kill it and every descendant
    (torchrun starts its workers in sessions of their own: killing the group misses them)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate()
        raise AssertionError(f"timed out after {timeout}s: {' '.join(cmd)}\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (keepers run in their own session and are
    not descendants once detached; they exit when their trainers are gone)."""
    import psutil

    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def shm_base() -> str:
    """This test session's private shared-memory base (see tests/conftest.py)."""
    return os.environ["STALWART_SHM_BASE"]


def stalwart_shm_dirs() -> set[str]:
    return {d for d in glob.glob(os.path.join(shm_base(), "stalwart-*")) if os.path.isdir(d)}


def start_locks() -> set[str]:
    return set(glob.glob(os.path.join(shm_base(), "stalwart-*.start")))


def kill_keepers(dirs, remove: bool = True) -> None:
    """SIGKILL the keepers serving the given shared-memory dirs; with ``remove``, also
    delete what they leave (tests must not leave anything behind)."""
    dirs = [d for d in dirs if os.path.isdir(d)]
    for d in dirs:
        try:
            with open(os.path.join(d, "keeper.pid")) as f:
                pid = int(f.read().strip())
            os.kill(pid, signal.SIGKILL)
        except (FileNotFoundError, ValueError, ProcessLookupError):
            pass
    if not remove:
        return
    deadline = time.monotonic() + 5
    for d in dirs:
        while os.path.exists(d) and time.monotonic() < deadline:
            import shutil

            shutil.rmtree(d, ignore_errors=True)
        for extra in (d + ".start",):
            if os.path.exists(extra):
                os.remove(extra)


@pytest.fixture
def no_leftovers():
    """Fails the test if it leaves keepers or /dev/shm segments behind; cleans them regardless."""
    before = stalwart_shm_dirs() | start_locks()
    yield
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        left = (stalwart_shm_dirs() | start_locks()) - before
        if not left:
            return
        time.sleep(0.2)
    kill_keepers([d for d in left if not d.endswith(".start")])
    for d in left:
        if d.endswith(".start") and os.path.exists(d):
            os.remove(d)
    pytest.fail(f"test left shared memory behind: {sorted(left)}")
