"""protect() snapshots OffloadAdamW through the ordinary optimizer provider (its state is
plain host tensors): SIGKILL mid-run, restart, restore from the keeper's memory, and the run
ends bitwise equal to an uninterrupted one (weights, moments, fp32 masters, steps, LR)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.ckpt.scripts._harness import REPO, isolated_shm
from tests.offload.scripts.protect_offload import train

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts", "protect_offload.py")


def run(*args: str, shm: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "STALWART_SHM_BASE": shm, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=env, timeout=240)


def test_sigkill_then_resume_bitwise(tmp_path):
    root = str(tmp_path / "root")
    with isolated_shm() as shm:
        killed = run("--root", root, "--kill-at", "6", shm=shm)
        assert killed.returncode == -9, killed.stderr[-3000:]
        resumed = run("--root", root, shm=shm)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = train(root, reference=True), json.loads(resumed.stdout.splitlines()[-1])
    assert 1 <= got.pop("restored") <= 6 and expected.pop("restored") is None  # newest complete snapshot
    assert any(k.endswith(":master") for k in got) and any(k.endswith(":exp_avg_sq") for k in got)
    assert got == expected
