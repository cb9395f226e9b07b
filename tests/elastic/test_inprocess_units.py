"""In-process recovery's single-process parts: error classification, store prefixes, and a
guard entered again in the same process keeping the tensors that hold the restored step."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import stalwart
from stalwart.ckpt.dist import attempt_tag
from stalwart.ckpt.guard import _LIVE, KEPT_SOURCE
from stalwart.elastic.inprocess import enabled, is_comm_error


def test_attempt_tag_names_the_in_process_epoch(monkeypatch):
    monkeypatch.setenv("STALWART_RDZV_ROUND", "3")
    monkeypatch.delenv("STALWART_INPROC_EPOCH", raising=False)
    assert attempt_tag() == "3"
    monkeypatch.setenv("STALWART_INPROC_EPOCH", "0")
    assert attempt_tag() == "3"
    monkeypatch.setenv("STALWART_INPROC_EPOCH", "2")
    assert attempt_tag() == "3.2"


def test_peer_failures_are_told_from_user_errors():
    assert is_comm_error(dist.DistBackendError("x"))
    assert is_comm_error(RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:4786"))
    assert is_comm_error(RuntimeError("Timed out waiting 30000ms for recv operation to complete"))
    assert not is_comm_error(ValueError("injected failure at step 4"))
    assert not is_comm_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"))


def test_enabled_only_under_stalwarts_rendezvous(monkeypatch):
    for name in ("STALWART_RDZV_PREFIX", "STALWART_KEEPER_GROUP", "STALWART_IN_PROCESS"):
        monkeypatch.delenv(name, raising=False)
    assert not enabled()
    monkeypatch.setenv("STALWART_RDZV_PREFIX", "stalwart/job")
    monkeypatch.setenv("STALWART_KEEPER_GROUP", "127.0.0.1:29400")
    assert enabled()
    monkeypatch.setenv("STALWART_IN_PROCESS", "0")
    assert not enabled()


def _train_step(model, opt, guard=None) -> None:
    model(torch.randn(4, 8)).square().mean().backward()
    opt.step()
    opt.zero_grad()
    if guard is not None:
        guard.step()


@pytest.mark.timeout(120)
def test_a_guard_entered_again_keeps_the_live_tensors_of_the_restored_step(tmp_path, monkeypatch):
    monkeypatch.setenv("STALWART_INPROC_EPOCH", "1")  # what stalwart.elastic.run exports
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    root = str(tmp_path / "ckpt")
    _LIVE.clear()
    with pytest.raises(RuntimeError), stalwart.protect(model, opt, root=root, every=1, tiers=["memory"]) as guard:
        for _ in range(3):
            _train_step(model, opt, guard)
        model(torch.randn(4, 8)).sum().backward()  # the failed attempt: partial gradients, no optimizer step
        raise RuntimeError("Connection closed by peer")
    weights = [p.detach().clone() for p in model.parameters()]
    storages = [p.data_ptr() for p in model.parameters()]
    with stalwart.protect(model, opt, root=root, every=1, tiers=["memory"]) as guard:
        assert guard.step_count == 3
        assert KEPT_SOURCE in guard.stats.restore_sources, guard.stats.restore_sources
        assert all(p.grad is None for p in model.parameters()), "the failed attempt's gradients survived the restore"
        assert [p.data_ptr() for p in model.parameters()] == storages
        assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))
        _train_step(model, opt)  # an optimizer step after the snapshot: the tensors move past step 3
    # entered again after the tensors moved on: step 3 is copied back from memory
    with stalwart.protect(model, opt, root=root, every=1, tiers=["memory"]) as guard:
        assert guard.step_count == 3
        assert KEPT_SOURCE not in guard.stats.restore_sources, guard.stats.restore_sources
        assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))
    _LIVE.clear()


@pytest.mark.timeout(120)
def test_tensors_that_moved_past_the_snapshot_are_copied_back(tmp_path, monkeypatch):
    monkeypatch.setenv("STALWART_INPROC_EPOCH", "1")
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    root = str(tmp_path / "ckpt")
    _LIVE.clear()
    with pytest.raises(RuntimeError), stalwart.protect(model, opt, root=root, every=1, tiers=["memory"]) as guard:
        for _ in range(2):
            _train_step(model, opt, guard)
        saved = [p.detach().clone() for p in model.parameters()]
        _train_step(model, opt)  # stepped, failed before guard.step(): the live tensors hold no snapshot
        raise RuntimeError("Connection closed by peer")
    with stalwart.protect(model, opt, root=root, every=1, tiers=["memory"]) as guard:
        assert guard.step_count == 2
        assert KEPT_SOURCE not in guard.stats.restore_sources, guard.stats.restore_sources
        assert all(torch.equal(a, b) for a, b in zip(saved, model.parameters(), strict=True))
    _LIVE.clear()


@pytest.mark.timeout(120)
def test_a_step_no_snapshot_committed_is_kept_from_the_live_tensors(tmp_path, monkeypatch):
    """The survivors' tensors hold a step whose snapshot never committed (a node died before its
    share did, and no parity held the step before): the live step is kept with its buffers,
    scheduler, data position and RNG as of that step's guard.step(), instead of starting over."""
    monkeypatch.setenv("STALWART_INPROC_EPOCH", "1")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    batches = [torch.randn(4, 8) for _ in range(10)]
    _LIVE.clear()
    with pytest.raises(RuntimeError), stalwart.protect(model, opt, root=str(tmp_path / "a"), every=1, scheduler=sched,
                                                       tiers=["memory"]) as guard:
        for i, x in enumerate(guard.resume(batches)):
            model(x).square().mean().backward()
            opt.step()
            sched.step()
            opt.zero_grad()
            guard.step()
            if i == 2:
                break
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        weights = [p.detach().clone() for p in model.parameters()]
        rng = torch.get_rng_state()
        torch.rand(3)  # the failed attempt: RNG advanced, BatchNorm statistics updated, partial gradients
        model(torch.randn(4, 8)).sum().backward()
        assert not torch.equal(buffers["1.running_mean"], model[1].running_mean)
        raise RuntimeError("Connection closed by peer")
    # a keeper that holds no snapshot of step 3 (its commit never happened): before, a restore found
    # nothing and training started over from step 0
    with stalwart.protect(model, opt, root=str(tmp_path / "b"), every=1, scheduler=sched, tiers=["memory"]) as guard:
        assert guard.step_count == 3, guard.stats
        assert guard.stats.restored_from == KEPT_SOURCE and KEPT_SOURCE in guard.stats.restore_sources, guard.stats
        assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))
        assert all(torch.equal(buffers[n], b) for n, b in model.named_buffers()), "buffers not those of step 3"
        assert all(p.grad is None for p in model.parameters()), "the failed attempt's gradients survived the restore"
        assert torch.equal(torch.get_rng_state(), rng), "RNG streams not those of step 3"
        assert sched.last_epoch == 3
        nxt = next(iter(guard.resume(batches)))
        assert torch.equal(nxt, batches[3]), "the data position is not that of step 3"
    _LIVE.clear()


def test_a_killed_member_is_told_from_a_stopped_one_by_its_liveness_port():
    """A killed process's liveness port refuses connections at once (no heartbeat wait); a
    stopped one still accepts them (left to the hang timeout)."""
    import signal
    import subprocess
    import sys
    import time

    from stalwart.elastic.inprocess import BEAT_S, Membership

    code = ("import time; from stalwart.elastic.inprocess import _liveness_listener as listen;"
            " s = listen('127.0.0.1', 9); print(s.getsockname()[1], flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        member = Membership.__new__(Membership)  # only the probe's state
        member.probe_at, member._probed = {1: ("127.0.0.1", port)}, {}
        assert not member._exited(1)
        proc.send_signal(signal.SIGSTOP)
        time.sleep(BEAT_S * 1.5)
        assert not member._exited(1), "a stopped process is not taken for dead"
        proc.kill()
        proc.wait(10)
        time.sleep(BEAT_S * 1.5)
        assert member._exited(1), "a killed process is seen at once"
    finally:
        proc.kill()
        proc.wait(10)


def test_the_tripwire_abandons_forward_and_backward_of_the_epoch_it_tripped_for():
    from stalwart.elastic.inprocess import PeerLost, Tripwire

    epoch = [0]
    wire = Tripwire(lambda: epoch[0])
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    x = torch.randn(3, 4)
    handles = wire.install()
    try:
        model(x).sum().backward()  # not tripped: nothing happens
        loss = model(x).sum()  # a graph built before the trip
        wire.trip(0, "member 2 exited")
        assert is_comm_error(PeerLost("x"))
        with pytest.raises(PeerLost, match="member 2 exited"):
            loss.backward()
        with pytest.raises(PeerLost):
            model(x)
        epoch[0] = 1  # recovered meanwhile: a trip for epoch 0 is stale
        model(x).sum().backward()
        wire.trip(1, "a recovery began")
    finally:
        for h in handles:
            h.remove()
    model(x).sum().backward()  # hooks removed: the trip no longer reaches the model


def test_severing_the_group_ends_a_peers_wait_even_while_the_group_is_still_referenced():
    """gloo closes its connections only when the group is freed; a member entering recovery
    shuts them down itself, so a peer blocked on it fails at once. Its own descriptors stay
    gloo's, and a stale request (another epoch's) severs nothing."""
    import os
    import socket
    import threading

    from stalwart.elastic.inprocess import Membership, _sockets

    listener = socket.create_server(("127.0.0.1", 0))
    peer = socket.create_connection(listener.getsockname())
    before = _sockets()
    mine, _ = listener.accept()  # "gloo's" connection, opened during the group's set-up
    member = Membership.__new__(Membership)
    member.host, member.port = "127.0.0.1", 9
    member._sever_lock = threading.Lock()
    member._group_sockets = (3, {fd: ino for fd, ino in _sockets().items() if before.get(fd) != ino})
    assert list(member._group_sockets[1]) == [mine.fileno()]
    try:
        member._sever(epoch=2)  # the watchdog's stale view
        mine.sendall(b"x")
        assert peer.recv(1) == b"x"
        member._sever(epoch=3)
        peer.settimeout(5)
        assert peer.recv(1) == b"", "the peer did not see the connection end"
        os.fstat(mine.fileno())  # the descriptor itself is still open (gloo closes it)
        assert member._group_sockets == (3, {})
    finally:
        for s in (mine, peer, listener):
            s.close()
