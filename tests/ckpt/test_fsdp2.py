"""FSDP2 (``fully_shard``, DTensor ``Shard(0)`` params, uneven shards, tied weights) on two
CPU ranks (gloo) under stalwart.protect(): SIGKILL one rank, torchrun restarts, the run
ends bitwise equal to an uninterrupted run without stalwart (every rank's local parameter
and optimizer shards, the gathered tensors, the LR and the loss sequence)."""

from __future__ import annotations

import random

import pytest

from .scripts._harness import (
    differences,
    failure,
    finals,
    isolated_shm,
    read_losses,
    relogged_losses_agree,
    torchrun,
)

STEPS = 14


def _killed_run(tmp_path, seed: int) -> None:
    """One launch: attempt 0 trains the reference without stalwart, then the protected run
    that one rank SIGKILLs; torchrun restarts both ranks, which restore and finish."""
    rnd = random.Random(seed)
    kill = f"{rnd.randint(0, 1)}:{rnd.randint(2, STEPS - 2)}"
    out, ref = str(tmp_path / "out"), str(tmp_path / "ref")
    with isolated_shm() as shm:
        res = torchrun("fsdp_train.py", "--out", out, "--reference", ref, "--root", str(tmp_path / "root"),
                       "--steps", str(STEPS), "--kill", kill, shm_base=shm, max_restarts=1)
    assert res.returncode == 0, f"kill {kill}:\n{failure(res)}"
    ref_state, ref_losses = finals(ref), read_losses(ref)
    state = finals(out)
    assert all(s["attempt"] == 1 and s["restored_step"] for s in state), state[0]
    assert "Shard(dim=0)" in state[0]["placement:emb.weight"]
    assert not differences(ref_state, state), f"kill {kill}: {differences(ref_state, state)}"
    assert read_losses(out) == ref_losses, f"loss sequence differs after resuming (kill {kill})"
    assert relogged_losses_agree(out)


def test_fsdp2_sigkill_resume_bitwise(tmp_path):
    _killed_run(tmp_path, 31)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [32, 33, 34])
def test_fsdp2_sigkill_resume_bitwise_more(tmp_path, seed):
    _killed_run(tmp_path, seed)
