"""torch DCP through stalwart's StorageWriter / StorageReader.

Two ranks (gloo, torchrun) save DTensors with ``dcp.save(..., storage_writer=StorageWriter)``
and load them back resharded (``Shard(0)`` -> ``Shard(1)`` / ``Replicate`` / plain), load
``stalwart.formats.save`` checkpoints written with ZeRO-3 and ZeRO-1/2 layouts through
``StorageReader``, and see a flipped byte refused; every comparison is bitwise. In one
process: the rule/explicit placement choice, ``stalwart verify`` on a DCP-written
directory, and a ``protect()`` snapshot read back with ``dcp.load(no_dist=True)``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
import torch.distributed.checkpoint as dcp

import stalwart.formats as sf
from stalwart.ckpt import StorageReader, StorageWriter
from stalwart.ckpt.dcp_storage import _placement
from stalwart.formats import Box, Layout, Mesh, TensorSpec, ZeroFlat, ZeroGroup

from .scripts._harness import REPO, failure, isolated_shm, torchrun


def _bitwise(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.contiguous(), b.contiguous()
    return a.dtype == b.dtype and a.shape == b.shape and bytes(a.reshape(-1).view(torch.uint8).numpy()) == bytes(
        b.reshape(-1).view(torch.uint8).numpy())


def _zero_checkpoints(tmp_path) -> tuple[str, str]:
    g = torch.Generator().manual_seed(3)
    t = {"w1": torch.randn(7, 5, generator=g), "w2": torch.randn(3, 9, generator=g).to(torch.bfloat16),
         "bias": torch.randn(11, generator=g)}
    z3 = sf.save(t, str(tmp_path / "z3"), layout=Layout.zero(t, 2, 3))
    t2 = {"w1": t["w1"], "bias": t["bias"], "w3": torch.randn(4, 6, generator=g)}
    group = ZeroGroup(("w1", "bias", "w3"), 4, (3, 1, 0))  # DeepSpeed-style alignment and per-param paddings
    specs = [TensorSpec(n, tuple(v.shape), v.dtype, ZeroFlat("g0", n)) for n, v in t2.items()]
    z2 = sf.save(t2, str(tmp_path / "z2"), layout=Layout(Mesh(("dp",), (2,)), specs, {"g0": group}))
    return z3, z2


def test_dcp_two_ranks_reshard_and_native_layouts(tmp_path):
    z3, z2 = _zero_checkpoints(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    ckpt = str(tmp_path / "dcp")
    with isolated_shm() as shm:
        res = torchrun("dcp_worker.py", "--dir", ckpt, "--zero3", z3, "--zero2", z2, "--out", str(out), shm_base=shm)
    assert res.returncode == 0, failure(res)
    for rank in (0, 1):
        with open(out / f"rank-{rank}.json") as f:
            got = json.load(f)
        for key in ("load_shard1", "load_replicate", "load_plain", "zero3_s0", "zero3_s1", "zero2_s0", "zero2_s1"):
            assert got[key] is True, (rank, key, got)
        assert got["corrupt_refused"] is True, got
        if rank == 0:
            assert got["verify"] is True, got["verify"]
            assert got["native_load"] is True
            assert got["files"] == ["manifest.json", "rank-00000.safetensors", "rank-00001.safetensors"]
            kinds = got["placements"]
            assert kinds["model.a"] == kinds["model.b"] == "sharded"  # Shard(0) chunks stored as a rule
            assert kinds["model.r"] == "explicit"  # replicated: DCP writes it once
    # the command line verifies the DCP-written directory too
    cli = subprocess.run([sys.executable, "-m", "stalwart.cli", "verify", ckpt], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert cli.returncode == 0, cli.stdout + cli.stderr
    flipped = ckpt + "-bad"
    cli = subprocess.run([sys.executable, "-m", "stalwart.cli", "verify", flipped], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert cli.returncode == 1, "stalwart verify must fail on the corrupted copy"


def test_placement_rule_or_explicit():
    # torch.chunk slices of dim 1 over ranks 0..2 (7 columns: 3, 3, 1) -> a rule
    frags = {0: Box((0, 0), (4, 3)), 1: Box((0, 3), (4, 3)), 2: Box((0, 6), (4, 1))}
    p = _placement((4, 7), frags, 3)
    assert p.kind == "sharded" and p.shards[0].dim == 1
    # 2 rows over 4 ranks: ranks 2, 3 hold nothing
    p = _placement((2, 5), {0: Box((0, 0), (1, 5)), 1: Box((1, 0), (1, 5))}, 4)
    assert p.kind == "sharded" and p.shards[0].dim == 0
    # uneven, not torch.chunk -> explicit fragments
    p = _placement((6,), {0: Box((0,), (2,)), 1: Box((2,), (4,))}, 2)
    assert p.kind == "explicit"
    # written once (a replicated value) -> explicit
    assert _placement((3, 3), {1: Box((0, 0), (3, 3))}, 2).kind == "explicit"


def test_single_process_roundtrip_and_overwrite(tmp_path):
    """no_dist save/load; saving again over a checkpoint replaces it (the old manifest goes first)."""
    path = str(tmp_path / "c")
    g = torch.Generator().manual_seed(1)
    sd = {"w": torch.randn(4, 3, generator=g), "n": torch.tensor(3), "meta": {"epoch": 2}}
    dcp.save(sd, storage_writer=StorageWriter(path), no_dist=True)
    sd2 = {"w": torch.randn(2, 2, generator=g), "meta": {"epoch": 5}}
    dcp.save(sd2, storage_writer=StorageWriter(path), no_dist=True)
    assert sf.verify(path).ok
    with sf.open(path) as ck:
        assert set(ck.tensors) == {"w", "meta.epoch"}
    tgt = {"w": torch.zeros(2, 2), "meta": {"epoch": 0}}
    dcp.load(tgt, storage_reader=StorageReader(path), no_dist=True)
    assert _bitwise(tgt["w"], sd2["w"]) and tgt["meta"] == {"epoch": 5}


def test_reads_a_protect_snapshot(tmp_path, monkeypatch):
    """A checkpoint written by protect() (keeper, memory + local tiers) loads through DCP."""
    import stalwart
    from stalwart.ckpt import keeper_client

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    root = str(tmp_path / "root")
    with isolated_shm() as shm:
        monkeypatch.setattr(keeper_client, "SHM_BASE", shm)
        with stalwart.protect(model, opt, root=root, tiers=["memory", f"local:{root}/local"], keeper_linger_s=1,
                              resume=False) as guard:
            for _ in range(2):
                model(torch.randn(4, 6)).sum().backward()
                opt.step()
                opt.zero_grad()
                guard.step()
    path = os.path.join(root, "local")
    tgt = {"0.weight": torch.zeros(5, 6), "2.bias": torch.zeros(3), "optim.0.weight.exp_avg_sq": torch.zeros(5, 6)}
    dcp.load(tgt, storage_reader=StorageReader(path), no_dist=True)
    assert _bitwise(tgt["0.weight"], model[0].weight.detach())
    assert _bitwise(tgt["2.bias"], model[2].bias.detach())
    assert _bitwise(tgt["optim.0.weight.exp_avg_sq"], opt.state[model[0].weight]["exp_avg_sq"])
