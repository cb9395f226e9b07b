"""DeepSpeed engines under stalwart.protect(): SIGKILL one rank at a random step, torchrun
restarts the workers, they restore and end bitwise equal to an uninterrupted run that
never used stalwart - every rank's fp32 master partitions, every optimizer slot (padding
included), the low-precision weights, buffers, LR, loss scale, engine counters and the
loss sequence.

The restarted run also snapshots its final state with the DeepSpeed provider and checks
that it is a valid stalwart checkpoint whose fp32 weights and Adam slots equal
DeepSpeed's own ``safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state``.
"""

from __future__ import annotations

import json
import os
import random
import shutil

import pytest

pytest.importorskip("deepspeed")

from .scripts._harness import (
    differences,
    failure,
    finals,
    isolated_shm,
    read_losses,
    relogged_losses_agree,
    torchrun,
)

pytestmark = pytest.mark.deepspeed

STEPS = 12
_SOURCES: dict[str, str] = {}  # roots of finished ZeRO-2 runs, reused by the cross-topology test
# trainable params x (fp32 + exp_avg + exp_avg_sq) + frozen params, compared by the check
COMPARED = 5 * 3 + 2


def run_killed(tmp_path, stage: int, dtype: str, seed: int, check: bool):
    """One launch: attempt 0 trains the reference without stalwart, then the protected run
    that one rank SIGKILLs; torchrun restarts both ranks, which restore and finish."""
    rnd = random.Random(seed)
    kill = f"{rnd.randint(0, 1)}:{rnd.randint(2, STEPS - 2)}"
    out, ref = str(tmp_path / "out"), str(tmp_path / "ref")
    extra = ["--check"] if check else []
    with isolated_shm() as shm:
        res = torchrun("ds_train.py", "--stage", str(stage), "--dtype", dtype, "--out", out, "--reference", ref,
                       "--root", str(tmp_path / "root"), "--steps", str(STEPS), "--kill", kill, *extra,
                       shm_base=shm, max_restarts=1)
    assert res.returncode == 0, f"kill {kill}:\n{failure(res)}"
    return kill, out, (finals(ref), read_losses(ref))


def assert_resumed_bitwise(reference, out: str, kill: str) -> None:
    ref_state, ref_losses = reference
    state = finals(out)
    for r, s in enumerate(state):
        assert s["attempt"] == 1, f"rank {r} was not restarted (kill {kill})"
        assert s["restored_step"] is not None and s["restored_step"] >= 1, s
        assert s["wait_hook"], "the guard must wait on the inner optimizer's step pre-hook"
    assert not differences(ref_state, state), f"kill {kill}: {differences(ref_state, state)}"
    assert read_losses(out) == ref_losses, f"loss sequence differs after resuming (kill {kill})"
    assert relogged_losses_agree(out), "a step re-run after the restore produced another loss"


def assert_valid_checkpoint(out: str, placement: str) -> None:
    with open(os.path.join(out, "check.json")) as f:
        report = json.load(f)
    assert report["verify_ok"], report["problems"]
    assert not report["problems"], report["problems"]
    assert report["compared"] == COMPARED, report
    assert report["step"] == STEPS, report
    assert report["aliases"] == {"head.weight": "emb.weight"}
    assert placement in report["placements"], report["placements"]
    assert {"param", "optimizer_slot", "buffer"} <= set(report["roles"])


@pytest.mark.parametrize("seed", [101, 202])
def test_zero2_bf16_sigkill_resume_bitwise(tmp_path, seed):
    kill, out, reference = run_killed(tmp_path, 2, "bf16", seed, check=seed == 101)
    assert_resumed_bitwise(reference, out, kill)
    if seed == 101:
        assert_valid_checkpoint(out, "zero_flat")
        _SOURCES["zero2"] = str(tmp_path / "root")


def test_zero1_bf16_optimizer_sigkill_resume_bitwise(tmp_path):
    """ZeRO-1 with bf16 weights and fp32 gradient accumulation runs on DeepSpeed's BF16_Optimizer."""
    kill, out, reference = run_killed(tmp_path, 1, "bf16acc", 303, check=True)
    assert_resumed_bitwise(reference, out, kill)
    assert finals(out)[0]["wrapper"] == "BF16_Optimizer"
    assert_valid_checkpoint(out, "zero_flat")


def test_zero3_bf16_sigkill_resume_bitwise(tmp_path):
    """Per-param partitions over several sub-groups, persistent and partitioned params."""
    kill, out, reference = run_killed(tmp_path, 3, "bf16", 404, check=True)
    assert_resumed_bitwise(reference, out, kill)
    assert_valid_checkpoint(out, "zero_param")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stage", "dtype", "seed"),
    [(2, "bf16", s) for s in (505, 606, 707)]
    + [(0, "fp32", 11), (0, "bf16", 12), (0, "fp16", 13), (1, "fp32", 14), (1, "bf16", 15), (2, "fp32", 16),
       (2, "fp16", 17), (3, "fp32", 18), (3, "fp16", 19), (3, "bf16", 20)],
)
def test_sigkill_resume_bitwise_more(tmp_path, stage, dtype, seed):
    kill, out, reference = run_killed(tmp_path, stage, dtype, seed, check=True)
    assert_resumed_bitwise(reference, out, kill)
    assert_valid_checkpoint(out, {0: "replicated", 1: "zero_flat", 2: "zero_flat", 3: "zero_param"}[stage])


def _zero2_source(tmp_path_factory) -> str:
    """A root whose newest checkpoint a ZeRO-2 bf16 run at DP=2 wrote at step STEPS."""
    if "zero2" in _SOURCES and os.path.isdir(_SOURCES["zero2"]):
        return _SOURCES["zero2"]
    base = tmp_path_factory.mktemp("zero2-source")
    with isolated_shm() as shm:
        res = torchrun("ds_train.py", "--stage", "2", "--dtype", "bf16", "--out", str(base / "out"), "--root",
                       str(base / "root"), "--steps", str(STEPS), shm_base=shm)
    assert res.returncode == 0, failure(res)
    _SOURCES["zero2"] = str(base / "root")
    return _SOURCES["zero2"]


def restore_elsewhere(tmp_path, source: str, stage: int, dtype: str, nproc: int) -> None:
    """Restore a ZeRO-2 / DP=2 checkpoint into another engine and compare, bitwise, the
    restored engine's fp32 masters and Adam slots (DeepSpeed's getters) with it."""
    root = tmp_path / "root"
    shutil.copytree(source, root, ignore=shutil.ignore_patterns(".stalwart"))
    out = str(tmp_path / "out")
    with isolated_shm() as shm:  # --steps STEPS: restore step STEPS and train nothing
        res = torchrun("ds_train.py", "--stage", str(stage), "--dtype", dtype, "--out", out, "--root", str(root),
                       "--steps", str(STEPS), "--check", shm_base=shm, nproc=nproc)
    assert res.returncode == 0, failure(res)
    state = finals(out, world=nproc)
    assert all(s["restored_step"] == STEPS and s["restored_from"].startswith("local:") for s in state), state[0]
    with open(os.path.join(out, "check.json")) as f:
        report = json.load(f)
    assert report["verify_ok"] and not report["problems"], report["problems"]
    assert report["compared"] == COMPARED and report["step"] == STEPS
    assert report["placements"] == ["explicit", "replicated", "sharded", "zero_flat"], "compared with the ZeRO-2 source"


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "dtype", "nproc"),
                         [(3, "bf16", 2), (2, "bf16", 1), (1, "bf16acc", 2), (0, "bf16", 2), (3, "bf16", 1)])
def test_restore_zero2_checkpoint_elsewhere(tmp_path, tmp_path_factory, stage, dtype, nproc):
    restore_elsewhere(tmp_path, _zero2_source(tmp_path_factory), stage, dtype, nproc)
