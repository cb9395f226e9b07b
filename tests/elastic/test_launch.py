"""Elastic recovery on a changed world through ``--rdzv-backend=stalwart`` (issue 13).

Four torchrun agents on loopback stand for four nodes (one rank each), with a keeper per
node and RS(3, 1) redundancy across them. A whole node (agent, worker, keeper) is
SIGKILLed mid-training: the other three continue at world size 3 from memory - their own
keepers, each other's, and the lost node's snapshot rebuilt from parity - with no
checkpoint file read; later a fourth node joins and the job grows back to four. The run
must be the same training as an uninterrupted four-node run: every global step consumes
the same samples with the same per-sample random draws, and its loss matches within 1e-5
(relative, fp32); the final weights match within the same bound.
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from .harness import Job

STEPS = 24
KILL_AT = 8
JOIN_AT = 15
ARGS = ("--steps", str(STEPS), "--global-batch", "12", "--micro-batch", "1")


def run_reference(tmp, framework: str) -> Job:
    with Job(tmp, "elastic_train.py", *ARGS, "--framework", framework, nnodes="4:4") as job:
        for _ in range(4):
            job.start_agent()
        job.wait_done(300)
    return job


def run_elastic(tmp, framework: str, replace: bool = False, slow_steps: float = 0.3) -> Job:
    # a replacement must arrive while the survivors' round is still open: a longer last call
    conf = "last_call_timeout=15" if replace else None
    with Job(tmp, "elastic_train.py", *ARGS, "--framework", framework, "--step-sleep", str(slow_steps),
             nnodes="3:4", rdzv_conf=conf) as job:
        for _ in range(4):
            job.start_agent()
        job.wait_for(lambda: job.progress() >= KILL_AT, 240, f"step {KILL_AT}")
        job.kill_node(2)
        if replace:
            job.start_agent()
        else:
            job.wait_for(lambda: job.progress() >= JOIN_AT, 240, f"step {JOIN_AT} at world size 3")
            job.start_agent()
        job.wait_done(300)
        job.left_behind = job.shm_left(timeout=30)
    return job


def compare(ref: Job, got: Job, bitwise: bool) -> None:
    want, have = ref.steps(), got.steps()
    assert sorted(have) == list(range(1, STEPS + 1)), f"steps run: {sorted(have)}"
    for step in range(1, STEPS + 1):
        w, h = want[step], have[step]
        if h["ranks"] < h["world"]:  # a rank killed after the step completed, before writing its line
            pairs = set(zip(w["samples"], w["draws"], strict=True))
            assert set(zip(h["samples"], h["draws"], strict=True)) <= pairs, f"step {step}: other samples or draws"
        else:
            assert h["samples"] == w["samples"], f"step {step} consumed other samples (world {h['world']})"
            assert h["draws"] == w["draws"], f"step {step}: per-sample random draws differ"
        if bitwise:
            assert h["loss"] == w["loss"], f"step {step}: loss {h['loss']!r} != {w['loss']!r}"
        else:
            assert h["loss"] == pytest.approx(w["loss"], rel=1e-5), f"step {step} (world {h['world']})"
    a = load_file(os.path.join(ref.out, "final.safetensors"))
    b = load_file(os.path.join(got.out, "final.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        if bitwise:
            assert torch.equal(a[name], b[name]), name
        else:
            assert torch.allclose(a[name], b[name], rtol=1e-5, atol=1e-7), name


def check_recovery_from_memory(job: Job, worlds: set[int]) -> None:
    restores = [r for r in job.restores() if r["step"] > 0]
    assert restores, "nothing was restored"
    for r in restores:
        assert r["restored_from"] == "memory", r
        assert set(r["sources"]) <= {"own memory", "peer memory", "ec rebuilt"}, f"a checkpoint file was read: {r}"
        assert not r["fallbacks"], r["fallbacks"]
    assert {s["world"] for s in job.steps().values()} == worlds
    assert any("ec rebuilt" in r["sources"] for r in restores), "the lost node's snapshot was not rebuilt from parity"
    assert not job.left_behind, f"keepers' shared memory left behind (the lost node's must be reclaimed): {job.left_behind}"


@pytest.mark.timeout(900)
def test_ddp_node_lost_continues_from_memory_then_grows_back(tmp_path):
    ref = run_reference(tmp_path / "ref", "ddp")
    got = run_elastic(tmp_path / "elastic", "ddp")
    check_recovery_from_memory(got, {3, 4})
    compare(ref, got, bitwise=False)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ddp_replaced_node_is_bitwise_equal(tmp_path):
    ref = run_reference(tmp_path / "ref", "ddp")
    got = run_elastic(tmp_path / "elastic", "ddp", replace=True)
    check_recovery_from_memory(got, {4})
    compare(ref, got, bitwise=True)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("framework", ["fsdp2", pytest.param("deepspeed", marks=pytest.mark.deepspeed)])
def test_node_lost_then_back_other_frameworks(tmp_path, framework):
    ref = run_reference(tmp_path / "ref", framework)
    got = run_elastic(tmp_path / "elastic", framework)
    check_recovery_from_memory(got, {3, 4})
    compare(ref, got, bitwise=False)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_more_nodes_lost_than_parity_covers_falls_back_to_disk(tmp_path):
    ref = run_reference(tmp_path / "ref", "ddp")
    with Job(tmp_path / "elastic", "elastic_train.py", *ARGS, "--framework", "ddp", "--step-sleep", "0.3",
             "--disk-every", "4", nnodes="2:4") as got:
        for _ in range(4):
            got.start_agent()
        got.wait_for(lambda: got.progress() >= KILL_AT + 2, 240, f"step {KILL_AT + 2}")
        got.kill_node(1)
        got.kill_node(2)  # two nodes lost, RS(3, 1) covers one
        got.wait_done(300)
    restores = [r for r in got.restores() if r["step"] > 0]
    assert restores, "nothing was restored"
    for r in restores:
        assert r["restored_from"] != "memory" and r["step"] % 4 == 0, r
        assert set(r["sources"]) == {r["restored_from"]}, r
        said = [f for f in r["fallbacks"] if f"continuing from step {r['step']} in {r['restored_from']}" in f]
        assert said and "lost (more than m=1)" in said[0], r["fallbacks"]
        print(said[0])
    assert {s["world"] for s in got.steps().values()} == {2, 4}
    compare(ref, got, bitwise=False)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_losing_the_store_ends_the_job_promptly_and_cleanly(tmp_path):
    # as documented (docs/ELASTIC.md): the rendezvous store is the job's single point of failure
    with Job(tmp_path, "elastic_train.py", *ARGS, "--framework", "ddp", "--step-sleep", "0.3", "--redundancy", "1,1",
             nnodes="2:2") as job:
        for _ in range(2):
            job.start_agent()
        job.wait_for(lambda: job.progress() >= 5, 240, "step 5")
        job.store.kill()
        job.wait_done(120)  # no agent, worker or keeper waits on the lost store for long
        assert all(a.returncode != 0 for a in job.agents)
        assert "RendezvousConnectionError" in job.tail(200) or "connection" in job.tail(200).lower()
        assert not job.shm_left(timeout=60), "keepers must leave with their agents"
