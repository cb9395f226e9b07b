"""In-process recovery (``stalwart.elastic.run``): the survivors of a failure keep their processes.

The same simulated multi-node jobs as ``test_launch.py`` (torchrun agents on loopback,
``--rdzv-backend=stalwart``, a keeper per node, RS(3, 1)), with the training function
run by :func:`stalwart.elastic.inprocess.run`. A whole node is SIGKILLed mid-training:
the survivors' workers must be the same processes afterwards, continue at world size 3
from the step their own tensors hold (no checkpoint file read), and the run must be the
same training as the uninterrupted one (samples, per-sample draws, loss within 1e-5).
"""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

from stalwart.ckpt.guard import KEPT_SOURCE

from .harness import Job
from .test_launch import ARGS, JOIN_AT, KILL_AT, compare, run_reference

IN_PROCESS = ("--in-process", "--hang-timeout", "30")
SLOW_FORWARD = 8.0


def first_step_after(job: Job, t: float, world: int) -> dict:
    return next(r for r in job.step_log() if r["t"] > t and r["world"] == world)


@pytest.mark.timeout(900)
def test_ddp_node_lost_survivors_keep_their_processes(tmp_path):
    ref = run_reference(tmp_path / "ref", "ddp")
    # the step after KILL_AT has a slow first forward (50 module calls, SLOW_FORWARD s in all): the node is
    # killed while the survivors are inside it, and they must abandon it at once, not at its collective
    with Job(tmp_path / "inproc", "elastic_train.py", *ARGS, "--framework", "ddp", "--step-sleep", "0.3", *IN_PROCESS,
             "--slow-step", str(KILL_AT + 1), "--slow-forward", str(SLOW_FORWARD), nnodes="3:4") as job:
        for _ in range(4):
            job.start_agent()
        job.wait_for(lambda: job.progress() >= KILL_AT, 240, f"step {KILL_AT}")
        before = {slot: job.worker_pid(slot) for slot in (0, 1, 3)}
        time.sleep(1.0)  # into step KILL_AT + 1's slow forward
        killed_at = time.time()
        job.kill_node(2)
        job.wait_for(lambda: job.progress() >= JOIN_AT, 240, f"step {JOIN_AT} at world size 3")
        job.start_agent()
        job.wait_done(300)
    compare(ref, job, bitwise=False)
    log = job.step_log()
    shrunk = [r for r in log if r["world"] == 3]
    assert shrunk, "no step ran at world size 3"
    assert {r["pid"] for r in shrunk} == set(before.values()), "the survivors' workers were restarted"
    first = first_step_after(job, killed_at, 3)
    print(f"SIGKILL of a node -> survivors' first completed step: {first['t'] - killed_at:.2f} s (step {first['step']})")
    assert first["t"] - killed_at < SLOW_FORWARD - 2, "the survivors finished the slow forward before noticing the loss"
    recovered = [r for r in job.restores() if r["epoch"] > 0]
    assert len(recovered) == 3, recovered
    for r in recovered:
        assert r["recoveries"] and r["recoveries"][-1]["why"].startswith("PeerLost"), \
            f"the survivor was not interrupted in its forward: {r['recoveries']}"
        assert r["recoveries"][-1]["lost"] == [2], r["recoveries"]
        assert r["restored_from"] in ("memory", KEPT_SOURCE) and not r["fallbacks"], r
        assert KEPT_SOURCE in r["sources"], f"the live tensors were copied back instead of kept: {r}"
        assert set(r["sources"]) <= {KEPT_SOURCE, "own memory", "peer memory"}, f"a checkpoint file was read: {r}"
        assert r["step"] >= KILL_AT - 1, f"more than one step lost: {r}"
    assert {s["world"] for s in job.steps().values()} == {3, 4}


@pytest.mark.slow  # a variant of the DDP scenario above; its restore waits on the stand-in's rebuild
@pytest.mark.timeout(900)
def test_fsdp2_node_lost_survivors_reshard_in_process(tmp_path):
    """FSDP2: the survivors keep their processes; their shards of the lost node's share come
    from the other keepers' memory and the parity (no checkpoint file), resharded to world 3."""
    ref = run_reference(tmp_path / "ref", "fsdp2")
    with Job(tmp_path / "inproc", "elastic_train.py", *ARGS, "--framework", "fsdp2", "--step-sleep", "0.3", *IN_PROCESS,
             "--slow-step", str(KILL_AT + 1), "--slow-forward", str(SLOW_FORWARD), nnodes="3:4") as job:
        for _ in range(4):
            job.start_agent()
        job.wait_for(lambda: job.progress() >= KILL_AT, 240, f"step {KILL_AT}")
        before = {slot: job.worker_pid(slot) for slot in (0, 1, 3)}
        time.sleep(1.0)  # into step KILL_AT + 1's slow forward
        killed_at = time.time()
        job.kill_node(2)
        job.wait_done(300)
    compare(ref, job, bitwise=False)
    shrunk = [r for r in job.step_log() if r["world"] == 3]
    assert shrunk and {r["pid"] for r in shrunk} == set(before.values()), "the survivors' workers were restarted"
    first = first_step_after(job, killed_at, 3)
    # no time bound: FSDP2's restore waits for the stand-in to rebuild the lost shard (2-3 s here, more
    # on a loaded host); the interruption itself is asserted below (PeerLost, not the forward's end)
    print(f"FSDP2: SIGKILL of a node -> survivors' first completed step: {first['t'] - killed_at:.2f} s")
    recovered = [r for r in job.restores() if r["epoch"] > 0]
    assert len(recovered) == 3, recovered
    for r in recovered:
        assert r["recoveries"][-1]["why"].startswith("PeerLost"), r["recoveries"]
        assert r["restored_from"] == "memory" and not r["fallbacks"], r
        assert "ec rebuilt" in r["sources"] or "peer memory" in r["sources"], r
        assert set(r["sources"]) <= {"own memory", "peer memory", "ec rebuilt"}, f"a checkpoint file was read: {r}"
        assert r["step"] >= KILL_AT - 1, f"more than one step lost: {r}"


@pytest.mark.timeout(900)
def test_a_second_node_lost_while_the_first_recovery_runs(tmp_path):
    """Node 2 is SIGKILLed, then node 3 50 ms later, while the survivors' recovery from the
    first loss runs (their collectives failing, the next epoch open): no hang, and the two
    survivors end in one consistent run at world size 2 (same samples, losses within
    floating-point reduction order of the uninterrupted run), in the same processes."""
    ref = run_reference(tmp_path / "ref", "ddp")
    with Job(tmp_path / "inproc", "elastic_train.py", *ARGS, "--framework", "ddp", "--step-sleep", "0.3", *IN_PROCESS,
             nnodes="2:4") as job:
        for _ in range(4):
            job.start_agent()
        job.wait_for(lambda: job.progress() >= KILL_AT, 240, f"step {KILL_AT}")
        before = {slot: job.worker_pid(slot) for slot in (0, 1)}
        job.kill_node(2)
        time.sleep(0.05)  # the survivors' collectives are failing, the epoch not yet formed
        job.kill_node(3)
        job.wait_done(300)
        assert all(a.returncode == 0 for a in job.agents[:2]), job.tail(80)
        text = job.tail(400)
    print("\n".join(sorted({line.split("stalwart: ", 1)[1] for line in text.splitlines() if "in-process recovery" in line})))
    compare(ref, job, bitwise=False)
    log = job.step_log()
    after = [r for r in log if r["world"] == 2]
    assert after and max(r["step"] for r in after) == max(r["step"] for r in log), "the run did not finish at world size 2"
    assert {r["pid"] for r in after} == set(before.values()), "the survivors' workers were restarted"


@pytest.mark.timeout(600)
def test_user_error_is_retried_a_bounded_number_of_times_then_raised(tmp_path):
    with Job(tmp_path, "elastic_train.py", *ARGS, "--framework", "ddp", "--redundancy", "1,1", *IN_PROCESS,
             "--fail-at-step", "4", "--fail-rank", "1", nnodes="2:2", max_restarts=0) as job:
        for _ in range(2):
            job.start_agent()
        job.wait_done(300)
        assert all(a.returncode != 0 for a in job.agents)
        text = job.tail(400)
    assert "ValueError: injected failure at step 4" in text
    assert "still failing after 3 in-process attempts" in text
    entries = [r for r in job.restores() if r["rank"] == 0]
    assert [r["epoch"] for r in entries] == [0, 1, 2, 3], entries
    assert len({r["pid"] for r in entries}) == 1, "rank 0 was restarted between attempts"
    assert all(r["step"] == 3 for r in entries[1:]), entries


@pytest.mark.timeout(600)
def test_many_recoveries_leak_nothing(tmp_path):
    """22 in-process recoveries in one job (a transient error on rank 1 at every even step): the
    survivors' threads, file descriptors, shared memory and RSS stay bounded."""
    with Job(tmp_path, "elastic_train.py", "--steps", "44", "--global-batch", "4", "--micro-batch", "2",
             "--framework", "ddp", "--redundancy", "1,1", *IN_PROCESS, "--fail-every", "2", "--fail-rank", "1",
             "--max-attempts", "100", nnodes="2:2", max_restarts=0) as job:
        for _ in range(2):
            job.start_agent()
        job.wait_done(500)
        assert all(a.returncode == 0 for a in job.agents), job.tail(60)
    entries = sorted((r for r in job.restores() if r["rank"] == 0), key=lambda r: r["epoch"])
    assert len(entries) >= 21 and len({r["pid"] for r in entries}) == 1, [(r["epoch"], r["pid"]) for r in entries]
    warm, last = entries[2], entries[-1]  # after the first recoveries set up what is reused
    print({k: (warm[k], last[k]) for k in ("threads", "fds", "rss", "shm")})
    assert last["threads"] <= warm["threads"], (warm, last)
    assert last["fds"] <= warm["fds"] + 2, (warm, last)
    assert last["shm"] <= warm["shm"], (warm, last)
    assert last["rss"] <= warm["rss"] + 64 * 2**20, (warm, last)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_stopped_worker_is_detected_fenced_and_replaced(tmp_path):
    hang = 5.0
    ref = run_reference(tmp_path / "ref", "ddp")
    with Job(tmp_path / "inproc", "elastic_train.py", *ARGS, "--framework", "ddp", "--step-sleep", "0.3",
             "--redundancy", "2,1", "--in-process", "--hang-timeout", str(hang), nnodes="2:3") as job:
        for _ in range(3):
            job.start_agent()
        job.wait_for(lambda: job.progress() >= KILL_AT, 240, f"step {KILL_AT}")
        victim = job.worker_pid(2)
        stopped_at = time.time()
        os.kill(victim, signal.SIGSTOP)
        job.wait_for(lambda: any(r["t"] > stopped_at and r["world"] == 2 for r in job.step_log()), 120,
                     "a step at world size 2")
        first = first_step_after(job, stopped_at, 2)
        print(f"SIGSTOP of a worker -> survivors' first completed step: {first['t'] - stopped_at:.2f} s"
              f" (hang timeout {hang:.0f} s)")
        job.wait_for(lambda: not psutil.pid_exists(victim) or psutil.Process(victim).status() == psutil.STATUS_ZOMBIE,
                     30, "the stopped worker to be gone")
        job.wait_done(300)
    assert first["t"] - stopped_at < hang + 4
    compare(ref, job, bitwise=False)
