"""Bitwise resume under torchrun: SIGKILL a rank at a random step, torchrun restarts the
workers, they restore (from the keeper's memory) and end exactly like an uninterrupted run.

The training script is the shipped example, examples/train_gpt.py (DDP, dropout,
shuffling DistributedSampler, LR scheduler, tied embeddings, grad clipping)."""

from __future__ import annotations

import glob
import json
import os
import random
import time

import pytest

from .conftest import kill_keepers, stalwart_shm_dirs, torchrun

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "train_gpt.py")
STEPS = 20


def losses(out: str) -> dict[int, str]:
    got = {}
    with open(os.path.join(out, "losses.txt")) as f:
        for line in f:
            step, loss, _ = line.split()
            got[int(step)] = loss  # a restarted attempt re-logs steps: the last one wins
    return got


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    base = tmp_path_factory.mktemp("ref")
    res = torchrun(EXAMPLE, "--root", str(base / "root"), "--out", str(base / "out"), "--steps", str(STEPS))
    assert res.returncode == 0, res.stderr[-3000:]
    with open(base / "out" / "final.json") as f:
        return json.load(f), losses(str(base / "out"))


@pytest.mark.parametrize("seed", [11, 12])
def test_sigkill_a_rank_then_resume_bitwise(tmp_path, reference, seed, no_leftovers):
    ref_state, ref_losses = reference
    rnd = random.Random(seed)
    kill = f"{rnd.randint(0, 1)}:{rnd.randint(3, STEPS - 2)}"
    out = tmp_path / "out"
    res = torchrun(EXAMPLE, "--root", str(tmp_path / "root"), "--out", str(out), "--steps", str(STEPS),
                   "--kill", kill, max_restarts=1)
    assert res.returncode == 0, res.stderr[-3000:]
    with open(out / "final.json") as f:
        state = json.load(f)
    assert state["attempt"] == 1, "the run must have been restarted"
    assert state["restored_step"] is not None and state["restored_step"] >= 1, state
    for key, value in ref_state.items():
        if key.startswith(("param:", "opt:")) or key == "lr":
            assert state[key] == value, f"{key} differs after resuming (kill {kill})"
    assert losses(str(out)) == ref_losses, f"loss sequence differs after resuming (kill {kill})"


def test_resume_from_disk_after_the_keeper_is_gone(tmp_path, reference, no_leftovers):
    """A crash with no restart; the keeper flushes the newest snapshot to disk and is then
    killed too: a fresh launch restores from the local tier."""
    ref_state, ref_losses = reference
    root, out = str(tmp_path / "root"), str(tmp_path / "out")
    res = torchrun(EXAMPLE, "--root", root, "--out", out, "--steps", str(STEPS), "--kill", "1:9")
    assert res.returncode != 0
    deadline = time.monotonic() + 30
    while not glob.glob(os.path.join(root, "disk", "step-*", "manifest.json")) and time.monotonic() < deadline:
        time.sleep(0.2)  # the keeper persists the newest complete snapshot on the crash
    kill_keepers(stalwart_shm_dirs())
    res = torchrun(EXAMPLE, "--root", root, "--out", out, "--steps", str(STEPS))
    assert res.returncode == 0, res.stderr[-3000:]
    with open(os.path.join(out, "final.json")) as f:
        state = json.load(f)
    assert state["restored_from"].startswith("local:") and 1 <= state["restored_step"] <= 9, state
    assert all(state[k] == v for k, v in ref_state.items() if k.startswith(("param:", "opt:")))
    assert losses(out) == ref_losses
