"""``stalwart run`` as a user runs it: its help, its errors, and the copyable example to the end."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

from .harness import REPO

STALWART = shutil.which("stalwart") or os.path.join(os.path.dirname(sys.executable), "stalwart")
EXAMPLE = os.path.join(REPO, "examples", "train_elastic.py")


def stalwart(*args, timeout=60, env=None):
    return subprocess.run([STALWART, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def test_help_explains_every_default_it_changes():
    res = stalwart("run", "--help")
    assert res.returncode == 0, res.stderr
    for default in ("--rdzv-backend=stalwart", "--monitor-interval=0.1", "--max-restarts=10", "last_call_timeout=1",
                    "keep_alive_interval=1", "close_timeout=10", "--nnodes defaults to 1", "docs/ELASTIC.md"):
        assert default in res.stdout, default
    assert "--nproc-per-node" in res.stdout  # torchrun's own options follow


def test_missing_script_is_a_one_line_error():
    for args in (("run",), ("run", "--nnodes=1", "--nproc-per-node=2")):
        res = stalwart(*args)
        assert res.returncode == 2
        assert res.stderr.strip().count("\n") == 0 and "no training script given" in res.stderr, res.stderr
        assert "Traceback" not in res.stderr


def test_the_example_runs_on_one_node(tmp_path):
    shm = tmp_path / "shm"
    shm.mkdir()
    res = stalwart("run", "--nproc-per-node=2", EXAMPLE, "--root", str(tmp_path / "run"), "--steps", "6",
                   "--width", "32", "--global-batch", "8", "--micro-batch", "2", timeout=240,
                   env={"STALWART_SHM_BASE": str(shm)})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "world size 2: starting at step 0" in res.stdout
    assert "done: 6 steps, world size 2" in res.stdout, res.stdout
    deadline = time.monotonic() + 30  # the node's keeper leaves with its agent, and takes its memory along
    while [d for d in os.listdir(shm) if d.startswith("stalwart-")] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [d for d in os.listdir(shm) if d.startswith("stalwart-")], os.listdir(shm)


def test_workers_are_forked_from_the_warm_agent_unless_told_otherwise(tmp_path, monkeypatch):
    from stalwart.launchers.run import build_argv

    monkeypatch.chdir(tmp_path)
    argv = build_argv(["--nproc-per-node=2", "train.py", "--lr", "1"])
    assert "--run-path" in argv and "--start-method=fork" in argv
    assert argv[-3:] == [str(tmp_path / "train.py"), "--lr", "1"]  # runpy needs an absolute path
    for opt in (["--start-method=spawn"], ["--start_method", "forkserver"], ["-m"], ["--no-python"]):
        argv = build_argv([*opt, "train.py"])
        assert "--run-path" not in argv and argv[-1] == "train.py", argv
    assert "--run-path" not in build_argv(["./launch.sh"])
