"""Helpers for the DeepSpeed / DCP / FSDP2 tests: torchrun launches, isolated keeper
shared memory, and comparing runs."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(os.path.dirname(SCRIPTS)))
# DeepSpeed JIT-compiles its CPU comm op on the first init_distributed (~1 min); keep it cached.
EXTENSIONS = os.environ.get("TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".cache", "torch_extensions"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: str, *args: str, shm_base: str, nproc: int = 2, max_restarts: int = 0, timeout: float = 300,
             ) -> subprocess.CompletedProcess:
    """Run ``scripts/<script>`` under torchrun (c10d rendezvous on a free port)."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}",
        "--monitor-interval=0.1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--nnodes=1",
        os.path.join(SCRIPTS, script), *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TORCH_EXTENSIONS_DIR": EXTENSIONS,
           "STALWART_SHM_BASE": shm_base, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def failure(res: subprocess.CompletedProcess) -> str:
    """The interesting tail of a failed launch (worker tracebacks, not DeepSpeed's info logs)."""
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if "[INFO]" not in ln and "FutureWarning" not in ln]
    return "\n".join(lines[-60:])


@contextmanager
def isolated_shm():
    """A private keeper shared-memory base (STALWART_SHM_BASE) that must be empty at the end.

    Keepers of the runs inside are expected to have exited; any left are killed by the
    pid in their ``keeper.pid`` and the test fails. A private base also keeps
    concurrently running test sessions from touching each other's keepers.
    """
    base = os.path.join("/dev/shm", f"swtest-{uuid.uuid4().hex[:12]}")
    os.makedirs(base)
    failed: list[str] = []
    try:
        yield base
    finally:
        deadline = time.monotonic() + 30
        while os.listdir(base) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = sorted(os.listdir(base))
        for d in glob.glob(os.path.join(base, "*")):
            pid_file = os.path.join(d, "keeper.pid")
            try:
                with open(pid_file) as f:
                    os.kill(int(f.read().strip()), signal.SIGKILL)
                failed.append(f"keeper of {d} still running")
            except (FileNotFoundError, NotADirectoryError, ValueError, ProcessLookupError):
                pass
        shutil.rmtree(base, ignore_errors=True)
        if left:
            failed.append(f"shared memory left behind: {left}")
    if failed:
        raise AssertionError("; ".join(failed))


def read_losses(out: str) -> dict[int, str]:
    """step -> loss repr; a restarted attempt re-logs steps and the last line wins."""
    got: dict[int, str] = {}
    with open(os.path.join(out, "losses.txt")) as f:
        for line in f:
            step, loss, _ = line.split()
            got[int(step)] = loss
    return got


def relogged_losses_agree(out: str) -> bool:
    """Steps logged by two attempts (after the restored step) got bit-identical losses."""
    seen: dict[int, str] = {}
    with open(os.path.join(out, "losses.txt")) as f:
        for line in f:
            step, loss, _ = line.split()
            if int(step) in seen and seen[int(step)] != loss:
                return False
            seen[int(step)] = loss
    return True


def finals(out: str, world: int = 2) -> list[dict]:
    res = []
    for r in range(world):
        with open(os.path.join(out, f"final-{r}.json")) as f:
            res.append(json.load(f))
    return res


def differences(ref: list[dict], got: list[dict],
                skip: tuple[str, ...] = ("attempt", "restored_step", "restored_from", "wait_hook")) -> list[str]:
    out = []
    for r, (a, b) in enumerate(zip(ref, got)):
        keys = (set(a) | set(b)) - set(skip)
        out += [f"rank {r}: {k}" for k in sorted(keys) if a.get(k) != b.get(k)]
    return out

