"""Sender and receivers as separate processes over each transport, with real training.

After every sync each receiver's weights must equal the trainer's bit for bit
(compared here from saved files, independently of the library's own digests); a
corrupted bucket, a dropped connection and a receiver restart must end the same way,
through a full resync whose cause is logged.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import uuid

import pytest
import torch

from ._faults import FrameProxy
from ._workers import newuser_receiver, newuser_trainer, receiver_main, trainer_main, wait_for

CTX = mp.get_context("spawn")


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


def assert_same(out: str, rid: str, version: int) -> None:
    from safetensors.torch import load_file

    want = load_file(os.path.join(out, f"trainer_v{version}.safetensors"))
    got = load_file(os.path.join(out, f"{rid}_v{version}.safetensors"))
    assert want.keys() == got.keys()
    bad = [n for n in want if not bits_equal(want[n], got[n])]
    assert not bad, f"{rid} differs from the trainer at v{version}: {bad[:5]}"


def read(out: str, name: str) -> str:
    p = os.path.join(out, f"{name}.log")
    return open(p).read() if os.path.exists(p) else ""


@pytest.fixture
def procs():
    started: list[mp.Process] = []

    def start(target, *args) -> mp.Process:
        p = CTX.Process(target=target, args=args, daemon=True)
        p.start()
        started.append(p)
        return p

    try:
        yield start
    finally:
        for p in started:
            if p.is_alive():
                p.kill()
            p.join(timeout=10)


def run_versions(cfg, ctl, events, seen, rids, versions, before=None):
    """Drive syncs ``versions``; ``before(v)`` runs before each. Checks every receiver after each."""
    for v in versions:
        if before:
            before(v)
        ctl.put("go")
        ev = wait_for(events, lambda e, v=v: e[0] in ("synced", "sync_error") and e[1] == v, 90, seen)
        assert ev[0] == "synced", ev
        for rid in rids():
            wait_for(events, lambda e, v=v, rid=rid: e[0] == "recv" and e[1] == rid and e[2] == v, 60, seen)
            assert_same(cfg["out"], rid, v)


def test_tcp_bf16_training_with_corruption_drop_and_restart(tmp_path, procs):
    out = str(tmp_path)
    cfg = {"transport": "tcp", "out": out, "train_dtype": "bfloat16", "lr": 1e-5, "syncs": 6, "receivers": 2}
    ctl, events, seen = CTX.Queue(), CTX.Queue(), []
    procs(trainer_main, cfg, ctl, events)
    port = wait_for(events, lambda e: e[0] == "port", 60, seen)[1]
    proxy = FrameProxy(port)
    try:
        cfg["rport"] = {"r0": proxy.port, "r1": port, "r1b": port}
        procs(receiver_main, cfg, "r0", events, 1)
        r1 = procs(receiver_main, cfg, "r1", events, 2)
        live = ["r0", "r1"]

        def before(v):
            if v == 3:
                proxy.arm("corrupt", 3)  # r0's first bucket of v3 arrives with a flipped byte
            if v == 4:
                proxy.arm("cut", 4)  # r0's connection dies after its first bucket of v4
            if v == 5:  # r1 is killed and a new process takes its place with fresh weights
                os.kill(r1.pid, signal.SIGKILL)
                r1.join(10)
                live[1] = "r1b"
                procs(receiver_main, cfg, "r1b", events, 3)

        run_versions(cfg, ctl, events, seen, lambda: live, range(1, 7), before)
        wait_for(events, lambda e: e[0] == "trainer_done", 30, seen)
    finally:
        proxy.close()
    assert proxy.fired == ["corrupt v3 bucket 0", "cut v4 bucket 0"]
    synced = {e[1]: e[2] for e in seen if e[0] == "synced"}
    # every sync after the first is a delta to in-sync receivers; bf16 AdamW at lr 1e-5 is sparse
    assert synced[2]["full_syncs"] == 0 and 0 < synced[2]["changed"] < synced[2]["total"] // 2
    assert synced[2]["update_bytes"] < synced[2]["model_bytes"] // 4
    assert synced[3]["resyncs"] == 1 and synced[4]["resyncs"] == 1 and synced[5]["full_syncs"] == 1
    tlog, r0log = read(out, "trainer"), read(out, "r0")
    assert "payload checksum mismatch" in r0log and "marked stale" in r0log  # receiver's own account
    assert (
        "r0 at" in tlog and "reported failure: version 3 bucket 0: payload checksum mismatch" in tlog
    )  # sender logs the cause
    assert "connection lost mid-update" in r0log  # the cut, seen by the receiver
    assert "stale (connection lost mid-update" in tlog  # ... and by the sender when it came back
    assert "holds no weights from this trainer yet" in tlog  # the restarted receiver


def test_shm_fp32_dense_training_with_corruption_and_restart(tmp_path, procs):
    out = str(tmp_path)
    cfg = {
        "transport": "shm", "out": out, "train_dtype": "float32", "lr": 1e-6, "syncs": 4, "receivers": 2,
        "shm_name": f"test-{uuid.uuid4().hex[:8]}", "corrupt_version": 2,
    }  # fmt: skip
    ctl, events, seen = CTX.Queue(), CTX.Queue(), []
    procs(trainer_main, cfg, ctl, events)
    procs(receiver_main, cfg, "r0", events, 1)
    r1 = procs(receiver_main, cfg, "r1", events, 2)
    live = ["r0", "r1"]

    def before(v):
        if v == 3:
            os.kill(r1.pid, signal.SIGKILL)
            r1.join(10)
            live[1] = "r1b"
            procs(receiver_main, cfg, "r1b", events, 3)

    run_versions(cfg, ctl, events, seen, lambda: live, range(1, 5), before)
    synced = {e[1]: e[2] for e in seen if e[0] == "synced"}
    # fp32 AdamW touches (nearly) every element: dense entries, XOR+zstd smaller than raw
    assert synced[4]["changed"] > 0.9 * synced[4]["total"]
    assert synced[4]["idx"].get("dense", 0) > 0 and synced[4]["val"].get("xor_zstd", 0) > 0
    assert synced[4]["update_bytes"] <= 1.02 * synced[4]["model_bytes"]
    assert synced[2]["resyncs"] == 2  # the corrupt bucket reached both receivers through shared memory
    assert "checksum mismatch" in read(out, "r0") and "checksum mismatch" in read(out, "trainer")
    assert "holds no weights from this trainer yet" in read(out, "trainer")


def test_dist_gloo_cast_training_with_corruption(tmp_path, procs):
    out = str(tmp_path)
    cfg = {
        "transport": "dist", "out": out, "train_dtype": "float32", "wire_dtype": "bfloat16", "lr": 1e-5,
        "syncs": 4, "receivers": 2, "world": 3, "corrupt_version": 3,
    }  # fmt: skip
    ctl, events, seen = CTX.Queue(), CTX.Queue(), []
    procs(trainer_main, cfg, ctl, events)
    cfg["store_port"] = wait_for(events, lambda e: e[0] == "store_port", 60, seen)[1]
    procs(receiver_main, cfg, "r1", events, 1)
    procs(receiver_main, cfg, "r2", events, 2)
    run_versions(cfg, ctl, events, seen, lambda: ["r1", "r2"], range(1, 5))
    synced = {e[1]: e[2] for e in seen if e[0] == "synced"}
    # fp32 master weights sent as bf16: only the elements whose bf16 rounding moved are sent
    assert 0 < synced[2]["changed"] < synced[2]["total"] // 2
    assert synced[3]["resyncs"] == 2
    assert "checksum mismatch" in read(out, "r1") and "checksum mismatch" in read(out, "trainer")


def test_dist_dead_receiver_fails_sync_clearly(tmp_path, procs):
    out = str(tmp_path)
    cfg = {
        "transport": "dist", "out": out, "train_dtype": "bfloat16", "lr": 1e-5, "syncs": 3, "receivers": 2,
        "world": 3, "dist_timeout": 15,
    }  # fmt: skip
    ctl, events, seen = CTX.Queue(), CTX.Queue(), []
    procs(trainer_main, cfg, ctl, events)
    cfg["store_port"] = wait_for(events, lambda e: e[0] == "store_port", 60, seen)[1]
    procs(receiver_main, cfg, "r1", events, 1)
    r2 = procs(receiver_main, cfg, "r2", events, 2)
    run_versions(cfg, ctl, events, seen, lambda: ["r1", "r2"], [1])
    os.kill(r2.pid, signal.SIGKILL)
    r2.join(10)
    ctl.put("go")
    ev = wait_for(events, lambda e: e[0] in ("synced", "sync_error") and e[1] == 2, 60, seen)
    assert ev[0] == "sync_error"
    assert "SyncError" in ev[2] and "rank 2" in ev[2] and "baseline stays at 1" in ev[2]


@pytest.mark.parametrize(
    ("transport", "dtype", "lr"),
    [("tcp", "float32", 1e-6), ("shm", "bfloat16", 1e-5), ("dist", "float32", 1e-6)],
    ids=["tcp-fp32", "shm-bf16", "dist-fp32"],
)
def test_training_bitwise(tmp_path, procs, transport, dtype, lr):
    """The precisions not covered above, one per transport: every sync ends bit-identical."""
    out = str(tmp_path)
    cfg = {
        "transport": transport, "out": out, "train_dtype": dtype, "lr": lr, "syncs": 3, "receivers": 2, "world": 3,
        "shm_name": f"test-{uuid.uuid4().hex[:8]}",
    }  # fmt: skip
    ctl, events, seen = CTX.Queue(), CTX.Queue(), []
    procs(trainer_main, cfg, ctl, events)
    if transport == "tcp":
        port = wait_for(events, lambda e: e[0] == "port", 60, seen)[1]
        cfg["rport"] = {"r1": port, "r2": port}
    if transport == "dist":
        cfg["store_port"] = wait_for(events, lambda e: e[0] == "store_port", 60, seen)[1]
    procs(receiver_main, cfg, "r1", events, 1)
    procs(receiver_main, cfg, "r2", events, 2)
    run_versions(cfg, ctl, events, seen, lambda: ["r1", "r2"], range(1, 4))
    synced = {e[1]: e[2] for e in seen if e[0] == "synced"}
    assert all(synced[v]["full_syncs"] == 0 and synced[v]["resyncs"] == 0 for v in (2, 3))
    assert 0 < synced[3]["changed"] <= synced[3]["total"]


def test_new_user_dist_first_sync_and_sparse_bytes(tmp_path, procs):
    """A new user's first run: 0.1M-param bf16 transformer, trainer + 2 rollouts over DistTransport.

    The first sync sends each receiver only what it lacks: digests only to the rollout that
    loaded the trainer's own weights, every weight once (<= 1.02x the model) to the one that
    did not. Moving 1 % of the elements by +1.0 then costs within 1.10x of the 2-byte values +
    1-byte gaps it carries.
    """
    out = str(tmp_path)
    cfg = {"out": out, "world": 3, "dist_timeout": 60}
    events, seen = CTX.Queue(), []
    procs(newuser_trainer, cfg, events)
    cfg["store_port"] = wait_for(events, lambda e: e[0] == "store_port", 60, seen)[1]
    procs(newuser_receiver, cfg, "same", events, 1, 0)  # the trainer's initial weights (seed 0)
    procs(newuser_receiver, cfg, "other", events, 2, 1)  # different initial weights
    wait_for(events, lambda e: e[0] == "trainer_done", 120, seen)
    recv = {(e[1], e[2]): e[3] for e in seen if e[0] == "recv"}
    for rid in ("same", "other"):
        for v in (1, 2):
            if (rid, v) not in recv:
                wait_for(
                    events, lambda e, rid=rid, v=v: e[0] == "recv" and e[1] == rid and e[2] == v, 60, seen
                )
            assert_same(out, rid, v)
    recv = {(e[1], e[2]): e[3] for e in seen if e[0] == "recv"}
    synced = {e[1]: e[2] for e in seen if e[0] == "synced"}
    model = synced[1]["model_bytes"]
    assert model > 150_000 and synced[1]["receivers"] == 2 and synced[1]["full_syncs"] == 2
    # first sync: nothing resent to the rollout that holds the weights, one copy to the other
    assert recv[("same", 1)]["bytes"] < 0.01 * model
    assert 0.9 * model < recv[("other", 1)]["bytes"] <= 1.02 * model  # (equal LayerNorm inits are not resent)
    assert synced[1]["update_bytes"] <= 1.02 * model
    assert synced[1]["wire_bytes"] <= 1.02 * model + 0.01 * model  # vs 2x model for a full broadcast
    assert 0 < synced[1]["full_tensors"] < synced[1]["tensors"]
    # 1 % of the elements +1.0: within 1.10x of 3 bytes per change, frames and digests included
    ideal = 3 * synced[2]["changed"]
    assert 0.008 < synced[2]["changed"] / (model / 2) < 0.012  # 1 % of the bf16 elements
    for rid in ("same", "other"):
        assert recv[(rid, 2)]["mode"] == "delta" and recv[(rid, 2)]["bytes"] <= 1.10 * ideal
    assert synced[2]["update_bytes"] <= 1.10 * ideal
    assert synced[2]["wire_bytes"] <= 2 * 1.10 * ideal
