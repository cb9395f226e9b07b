"""DeepSpeed -> native -> DeepSpeed universal, resumed by DeepSpeed itself at DP 2 and DP 1.

At the same DP the next steps' losses must be bitwise those of resuming the
original checkpoint; at another DP (global batch kept by gradient accumulation)
bitwise those of resuming DeepSpeed's own ``ds_to_universal`` output, and the
loaded fp32 masters and optimizer slots bitwise the saved ones.
"""

from __future__ import annotations

import os

import pytest
import torch

from stalwart.formats.convert import convert

from .conftest import DS_CONFIGS, run_plan, same_bits

pytestmark = pytest.mark.deepspeed

RESUMED = ("z1_fp32", "z2_bf16", "z3_bf16")
TRAINABLE = ["emb.weight", "l1.weight", "l1.bias", "l2.weight", "l2.bias"]


def _job(name: str, path: str, out: str, *, universal: bool, tag: str | None = None, stage: int | None = None) -> dict:
    cfg = DS_CONFIGS[name]
    job = {"op": "resume", "stage": stage if stage is not None else cfg["stage"], "dtype": cfg["dtype"],
           "same_hparams": cfg.get("same_hparams", False), "dir": path, "universal": universal, "out": out}
    if tag:
        job["tag"] = tag
    return job


@pytest.fixture(scope="module")
def resumed(ds_ckpts, ds_ucp, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    ours = {}
    for name in RESUMED:
        native = str(root / f"{name}.native")
        convert(ds_ckpts.path(name), native, to="native")  # DS -> native -> DS universal
        ours[name] = str(root / f"{name}.ucp")
        convert(native, ours[name], to="ds-universal")
    out = {}

    def o(key: str) -> str:
        out[key] = str(root / f"{key}.pt")
        return out[key]

    dp2 = []
    for name in RESUMED:
        dp2.append(_job(name, ds_ckpts.path(name), o(f"{name}.orig.dp2"), universal=False, tag="global_step3"))
        dp2.append(_job(name, ours[name], o(f"{name}.ours.dp2"), universal=True))
    dp2.append(_job("z3_bf16", ds_ucp["z3_bf16"], o("z3_bf16.ds.dp2"), universal=True, tag="global_step3_universal"))
    dp1 = []
    for name in ("z2_bf16", "z3_bf16"):
        dp1.append(_job(name, ours[name], o(f"{name}.ours.dp1"), universal=True))
        dp1.append(_job(name, ds_ucp[name], o(f"{name}.ds.dp1"), universal=True, tag="global_step3_universal"))
    # the same universal checkpoint, from a ZeRO-2 run, into a ZeRO-3 engine
    dp1.append(_job("z2_bf16", ours["z2_bf16"], o("z2_bf16.ours.z3engine.dp1"), universal=True, stage=3))
    run_plan(dp2, 2, str(root), "resume_dp2")
    run_plan(dp1, 1, str(root), "resume_dp1")
    return {k: torch.load(v, weights_only=True) for k, v in out.items()}


def _assert_loaded_state(loaded: dict, truth: dict, what: str) -> None:
    for p in TRAINABLE:
        assert same_bits(loaded[p], truth[p]), f"{what}: fp32 master {p}"
        for slot in ("exp_avg", "exp_avg_sq"):
            assert same_bits(loaded[f"optim.{p}.{slot}"], truth[f"optim.{p}.{slot}"]), f"{what}: {p}.{slot}"
    assert loaded["__step__"].tolist() == truth["__step__"].tolist(), what
    assert int(loaded["__global_steps__"]) == 3, what


@pytest.mark.parametrize("name", RESUMED)
def test_same_dp_resume_is_bitwise_the_original(ds_ckpts, resumed, name):
    truth = ds_ckpts.truth(name)
    orig, ours = resumed[f"{name}.orig.dp2"], resumed[f"{name}.ours.dp2"]
    _assert_loaded_state(ours, truth, f"{name} ours@dp2")
    _assert_loaded_state(orig, truth, f"{name} original@dp2")
    assert ours["__lr__"].tolist() == orig["__lr__"].tolist() == truth["__lr__"].tolist()
    if name.startswith("z3") and ours["__step_after__"].tolist() != orig["__step_after__"].tolist():
        # DeepSpeed 0.19's ZeRO-3 universal loader gives every sub-group the *same* step
        # tensor (stage3.py: state[fp32_param]['step'] = state_step), which AdamW then
        # increments once per sub-group: bias correction drifts after the first resumed
        # step. Its own ds_to_universal output resumes identically, so ours must match that.
        theirs = resumed[f"{name}.ds.dp2"]
        assert theirs["__step_after__"].tolist() == ours["__step_after__"].tolist()
        assert torch.equal(ours["__losses__"], theirs["__losses__"]), (ours["__losses__"], theirs["__losses__"])
        assert torch.equal(ours["__losses__"][0], orig["__losses__"][0])  # the first resumed step is exact
        return
    assert torch.equal(ours["__losses__"], orig["__losses__"]), (ours["__losses__"], orig["__losses__"])


@pytest.mark.parametrize("name", ["z2_bf16", "z3_bf16"])
def test_other_dp_resume_matches_deepspeeds_own_universal(ds_ckpts, resumed, name):
    truth = ds_ckpts.truth(name)
    ours, theirs = resumed[f"{name}.ours.dp1"], resumed[f"{name}.ds.dp1"]
    _assert_loaded_state(ours, truth, f"{name} ours@dp1")
    assert torch.equal(ours["__losses__"], theirs["__losses__"]), (ours["__losses__"], theirs["__losses__"])
    # and it continues the run: DP 1 x 2 micro-batches sees DP 2's global batch
    orig = resumed[f"{name}.orig.dp2"]["__losses__"]
    assert torch.equal(ours["__losses__"][0], orig[0])
    assert torch.allclose(ours["__losses__"], orig, rtol=1e-2), (ours["__losses__"], orig)


def test_zero2_checkpoint_resumes_in_a_zero3_engine(ds_ckpts, resumed):
    """Cross-stage: DeepSpeed's own UCP files are stage-specific; ours load into either."""
    _assert_loaded_state(resumed["z2_bf16.ours.z3engine.dp1"], ds_ckpts.truth("z2_bf16"), "z2 -> zero3 engine")
    assert torch.isfinite(resumed["z2_bf16.ours.z3engine.dp1"]["__losses__"]).all()


def test_universal_layout(resumed, tmp_path_factory):
    root = next(iter(tmp_path_factory.getbasetemp().glob("resume*")))
    ucp = root / "z2_bf16.ucp"
    assert (ucp / "latest_universal").read_text() == "global_step3_universal"
    tag = ucp / "global_step3_universal"
    assert {p.name for p in tag.iterdir()} == {"zero", "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"}
    assert sorted(os.listdir(tag / "zero" / "l1.bias")) == ["exp_avg.pt", "exp_avg_sq.pt", "fp32.pt", "step.pt"]
