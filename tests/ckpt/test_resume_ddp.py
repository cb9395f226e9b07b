"""Bitwise resume under torchrun: SIGKILL a rank at a random step, torchrun restarts the
workers, they restore (from the keeper's memory) and end exactly like an uninterrupted run."""

from __future__ import annotations

import json
import os
import random

import pytest

from .conftest import torchrun

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
    res = torchrun("ddp_train.py", "--root", str(base / "root"), "--out", str(base / "out"), "--steps", str(STEPS))
    assert res.returncode == 0, res.stderr[-3000:]
    with open(base / "out" / "final.json") as f:
        return json.load(f), losses(str(base / "out"))


@pytest.mark.parametrize("seed", [11, 12])
def test_sigkill_a_rank_then_resume_bitwise(tmp_path, reference, seed, no_leftovers):
    ref_state, ref_losses = reference
    rnd = random.Random(seed)
    kill = f"{rnd.randint(0, 1)}:{rnd.randint(3, STEPS - 2)}"
    out = tmp_path / "out"
    res = torchrun("ddp_train.py", "--root", str(tmp_path / "root"), "--out", str(out), "--steps", str(STEPS),
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
    """A fresh launch (no keeper alive) restores the newest step from the local tier."""
    ref_state, ref_losses = reference
    root, out = str(tmp_path / "root"), str(tmp_path / "out")
    res = torchrun("ddp_train.py", "--root", root, "--out", out, "--steps", "9")
    assert res.returncode == 0, res.stderr[-3000:]
    res = torchrun("ddp_train.py", "--root", root, "--out", out, "--steps", str(STEPS))
    assert res.returncode == 0, res.stderr[-3000:]
    with open(os.path.join(out, "final.json")) as f:
        state = json.load(f)
    assert state["restored_step"] == 9 and state["restored_from"].startswith("local:")
    assert all(state[k] == v for k, v in ref_state.items() if k.startswith(("param:", "opt:")))
    assert losses(out) == ref_losses
