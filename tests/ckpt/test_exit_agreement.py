"""A protected DDP run must exit, with every rank's final step durable (issue 12).

The scenario that hung: ``every=1``, a slow file tier (back-pressure skips steps), both
cores kept busy by other processes, ranks at slightly different speeds. Each run must end
within a bound, every rank must end at the same final step, the file tier's ``latest``
must be that step, and ``stalwart verify`` must pass on it.

The stress mode (``-m slow``) adds random delays around ``guard.step()``, in the copy
threads and in the keeper's replies, and random SIGKILLs of a rank (torchrun restarts the
workers): no run may hang, ``latest`` always verifies, and a resumed run ends bitwise
equal to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
import time

import pytest

from .conftest import WORKERS, free_port, run_group

STEPS = 48
RUN_BOUND_S = 150  # a hung run is killed and fails the test well before pytest's own limit


@contextlib.contextmanager
def busy_cores(seconds: float):
    """Processes that keep every core busy (bounded in time, killed at the end)."""
    code = f"import time\nend = time.time() + {seconds}\nwhile time.time() < end: pass\n"
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(os.cpu_count() or 2)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def launch(tmp, nproc: int, *args: str, max_restarts: int = 0, env=None) -> subprocess.CompletedProcess:
    """One torchrun job; a job that does not end within RUN_BOUND_S is killed and fails."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}",
        "--monitor-interval=0.1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--nnodes=1",
        os.path.join(WORKERS, "ddp_exit.py"), "--root", str(tmp / "root"), "--out", str(tmp / "out"),
        "--steps", str(STEPS), *args,
    ]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return run_group(cmd, RUN_BOUND_S, full_env)


def verify(path: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stalwart.cli", "verify", "--quiet", path], capture_output=True, text=True,
                          timeout=120)


def latest_dir(root) -> str:
    disk = os.path.join(str(root), "disk")
    with open(os.path.join(disk, "latest")) as f:
        return os.path.join(disk, f.read().strip())


def check_run(tmp, res: subprocess.CompletedProcess, nproc: int) -> dict:
    assert res.returncode == 0, res.stderr[-4000:]
    with open(tmp / "out" / "result.json") as f:
        result = json.load(f)
    assert result["steps"] == [STEPS] * nproc, result
    assert result["final"] == [STEPS] * nproc, f"every rank's final snapshot must be step {STEPS}: {result}"
    assert not result["fallbacks"], result["fallbacks"]
    latest = latest_dir(tmp / "root")
    assert latest.endswith(f"step-{STEPS:08d}") or latest.endswith(f"step-{STEPS}"), latest
    v = verify(latest)
    assert v.returncode == 0, v.stdout + v.stderr
    return result


@pytest.mark.parametrize("nproc,seed", [(2, 1), (4, 2), pytest.param(2, 3, marks=pytest.mark.slow),
                                        pytest.param(4, 4, marks=pytest.mark.slow), pytest.param(2, 5, marks=pytest.mark.slow)])
def test_every_step_under_cpu_load_with_a_slow_tier_exits_with_the_final_step_durable(tmp_path, nproc, seed, no_leftovers):
    env = {"STALWART_KEEPER_FAULTS": f"delay:{seed}:20"}
    straggler = random.Random(seed).randrange(nproc)  # a rank that reaches guard.step() later than the others
    with busy_cores(RUN_BOUND_S):
        res = launch(tmp_path, nproc, "--width", "256", "--tier-rate", "5e6", "--delays", f"{seed}:20",
                     "--lag", f"{straggler}:150", env=env)
    result = check_run(tmp_path, res, nproc)
    assert result["skipped"] > 0, "the slow tier must have made the run skip steps (the scenario of the issue)"
    assert result["exit_s"] < 60, f"leaving protect() took {result['exit_s']:.1f}s"


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_stress_random_delays_and_kills_never_hang_and_resume_bitwise(tmp_path):
    """50 runs: random delays everywhere, a random rank SIGKILLed at a random step in half
    of them (torchrun restarts the workers, which resume from memory)."""
    from .conftest import stalwart_shm_dirs

    rnd = random.Random(int(os.environ.get("STALWART_TEST_SEED", "12")))
    before = stalwart_shm_dirs()
    reference: dict[int, str] = {}
    for nproc in (2, 4):  # uninterrupted runs, no delays
        res = launch(tmp_path / f"ref{nproc}", nproc)
        reference[nproc] = check_run(tmp_path / f"ref{nproc}", res, nproc)["digest"]
    for trial in range(50):
        tmp = tmp_path / f"t{trial}"
        nproc = rnd.choice([2, 2, 4])
        args = ["--delays", f"{trial}:{rnd.choice([5, 20, 60])}"]
        if rnd.random() < 0.5:
            args += ["--tier-rate", "20e6"]
        kill = rnd.random() < 0.5
        if kill:
            args += ["--kill-at", str(rnd.randint(3, STEPS - 3)), "--kill-rank", str(rnd.randrange(nproc))]
        env = {"STALWART_KEEPER_FAULTS": f"delay:{trial}:{rnd.choice([5, 30])}"}
        res = launch(tmp, nproc, *args, max_restarts=1 if kill else 0, env=env)
        ctx = f"trial {trial} (nproc {nproc}, {' '.join(args)})"
        assert res.returncode == 0, f"{ctx}\n{res.stderr[-4000:]}"
        with open(tmp / "out" / "result.json") as f:
            result = json.load(f)
        assert result["final"] == [STEPS] * nproc, f"{ctx}: {result}"
        if kill:
            assert result["attempt"] == 1, f"{ctx}: the run was not restarted"
        v = verify(latest_dir(tmp / "root"))
        assert v.returncode == 0, f"{ctx}: {v.stdout}{v.stderr}"
        assert result["digest"] == reference[nproc], f"{ctx}: the final state differs from the uninterrupted run"
    deadline = time.monotonic() + 30
    while stalwart_shm_dirs() - before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not stalwart_shm_dirs() - before, "keepers left shared memory behind"
