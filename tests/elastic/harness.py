"""Simulated multi-node jobs on one host: a rendezvous store, one torchrun agent per "node".

Each agent runs ``--nproc-per-node=1`` under ``--rdzv-backend=stalwart``; its worker
starts the node's keeper. A node is lost by SIGKILLing its agent, its worker and its
keeper together (what a machine failure does). Shared memory lives under a private
``STALWART_SHM_BASE`` that the test checks and removes.
"""

from __future__ import annotations

import contextlib
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

import psutil

WORKERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workers")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXTENSIONS = os.environ.get("TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".cache", "torch_extensions"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class Job:
    """A store and agents for one simulated multi-node job; a context manager that kills
    everything it started on exit."""

    def __init__(self, tmp, script: str, *args: str, nnodes: str = "3:4", rdzv_conf: str | None = None,
                 env: dict | None = None, max_restarts: int = 5) -> None:
        self.tmp = str(tmp)
        self.out = os.path.join(self.tmp, "out")
        self.root = os.path.join(self.tmp, "root")
        os.makedirs(self.out, exist_ok=True)
        self.script = script if os.path.isabs(script) else os.path.join(WORKERS, script)
        self.args = [*args, "--root", self.root, "--out", self.out]
        self.nnodes = nnodes
        self.rdzv_conf = rdzv_conf
        self.max_restarts = max_restarts
        self.port = free_port()
        self.shm = os.path.join("/dev/shm", f"swel-{uuid.uuid4().hex[:10]}")
        os.makedirs(self.shm)
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "STALWART_SHM_BASE": self.shm,
                    "TORCH_EXTENSIONS_DIR": EXTENSIONS, "STALWART_KEEPER_DEAD_AFTER_S": "3",
                    "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
        self.store: subprocess.Popen | None = None
        self.agents: list[subprocess.Popen] = []
        self.logs: list[str] = []

    def __enter__(self) -> Job:
        self.store = subprocess.Popen([sys.executable, "-m", "stalwart.cli", "store", "--port", str(self.port)],
                                      env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        line = self.store.stderr.readline()
        if "listening" not in line:
            raise AssertionError(f"the rendezvous store did not start: {line}")
        return self

    def start_agent(self) -> subprocess.Popen:
        i = len(self.agents)
        log = os.path.join(self.tmp, f"agent{i}.log")
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={self.nnodes}", "--nproc-per-node=1",
               "--rdzv-backend=stalwart", f"--rdzv-endpoint=127.0.0.1:{self.port}", "--rdzv-id=elastic-test",
               "--monitor-interval=0.1", f"--max-restarts={self.max_restarts}"]
        if self.rdzv_conf:
            cmd.append(f"--rdzv-conf={self.rdzv_conf}")
        with open(log, "w") as f:
            proc = subprocess.Popen([*cmd, self.script, *self.args], env=self.env, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.agents.append(proc)
        self.logs.append(log)
        return proc

    def progress(self) -> int:
        p = read_json(os.path.join(self.out, "progress"))
        return int(p["step"]) if p else 0

    def wait_for(self, cond, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{self.tail()}")
            if all(a.poll() is not None for a in self.agents):
                raise AssertionError(f"every agent exited while waiting for {what}\n{self.tail()}")
            time.sleep(0.1)

    def kill_node(self, slot: int) -> list[int]:
        """SIGKILL the agent, worker and keeper of the node holding keeper ``slot``."""
        info = read_json(os.path.join(self.out, f"node-{slot}.json"))
        if not info:
            raise AssertionError(f"no node holds slot {slot}")
        victims = []
        with contextlib.suppress(psutil.NoSuchProcess):
            agent = psutil.Process(info["agent_pid"])
            victims += [agent, *agent.children(recursive=True)]
        with contextlib.suppress(psutil.NoSuchProcess, TypeError, ValueError):
            victims.append(psutil.Process(int(info["keeper_pid"])))
        for p in victims:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGKILL)
        self.killed = [p.pid for p in victims]
        return self.killed

    def worker_pid(self, slot: int) -> int:
        info = read_json(os.path.join(self.out, f"node-{slot}.json"))
        if not info:
            raise AssertionError(f"no node holds slot {slot}")
        return int(info["pid"])

    def step_log(self) -> list[dict]:
        """Every rank's step records, as written (one per rank per step run, re-runs included)."""
        out = []
        for path in glob.glob(os.path.join(self.out, "log-*.jsonl")):
            with open(path) as f:
                out += [json.loads(line) for line in f]
        return sorted(out, key=lambda r: r["t"])

    def wait_done(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for a in self.agents:
            left = deadline - time.monotonic()
            try:
                a.wait(timeout=max(left, 0.1))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"the job did not finish within {timeout:.0f}s\n{self.tail()}") from None

    def tail(self, n: int = 40) -> str:
        out = []
        for log in self.logs:
            with contextlib.suppress(OSError), open(log) as f:
                lines = [ln for ln in f.read().splitlines() if ln.strip() and "FutureWarning" not in ln]
            out.append(f"--- {os.path.basename(log)}\n" + "\n".join(lines[-n:]))
        for err in glob.glob(os.path.join(self.root, ".stalwart", "*.err")):
            with contextlib.suppress(OSError), open(err) as f:
                text = f.read().strip()
            if text:
                out.append(f"--- {os.path.basename(err)}\n{text[-2000:]}")
        return "\n".join(out)

    def steps(self) -> dict[int, dict]:
        """Per global step: world, samples and their draws (in sample order) and the loss, as
        run by the newest rendezvous round that ran it (a step re-run after a restore wins)."""
        by_step: dict[int, list[dict]] = {}
        for path in glob.glob(os.path.join(self.out, "log-*.jsonl")):
            with open(path) as f:
                for line in f:
                    r = json.loads(line)
                    by_step.setdefault(r["step"], []).append(r)
        out: dict[int, dict] = {}
        for step, rs in by_step.items():
            newest = max(r["round"] for r in rs)
            rs = list({r["rank"]: r for r in rs if r["round"] == newest}.values())
            pairs = sorted((s, d) for r in rs for s, d in zip(r["samples"], r["draws"], strict=True))
            out[step] = {"world": rs[0]["world"], "ranks": len(rs), "samples": [s for s, _ in pairs],
                         "draws": [d for _, d in pairs], "loss": next(r["loss"] for r in rs if r["rank"] == 0)}
        return out

    def shm_left(self, timeout: float) -> list[str]:
        """Keeper directories still in this job's shared memory after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            left = [d for d in os.listdir(self.shm) if d.startswith("stalwart-") and not d.endswith(".start")]
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.2)

    def restores(self) -> list[dict]:
        return [read_json(p) for p in sorted(glob.glob(os.path.join(self.out, "restore-*.json")))]

    def __exit__(self, *exc) -> None:
        for a in self.agents:
            with contextlib.suppress(psutil.NoSuchProcess):
                p = psutil.Process(a.pid)
                for c in [p, *p.children(recursive=True)]:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        c.kill()
        for d in glob.glob(os.path.join(self.shm, "stalwart-*")):
            pid = read_json(os.path.join(d, "owner.json")) or {}
            with contextlib.suppress(ProcessLookupError, TypeError, ValueError):
                os.kill(int(pid.get("keeper_pid")), signal.SIGKILL)
        if self.store is not None:
            self.store.kill()
            self.store.wait()
        shutil.rmtree(self.shm, ignore_errors=True)
