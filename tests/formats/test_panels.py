"""Panels: tensors sharded along a dim other than 0 store their shards as panels along
it, so a reshard along it reads contiguous bytes; old (v1) checkpoints still load."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import stalwart.formats as F
from stalwart.errors import ChecksumError, FormatError
from stalwart.formats.layout import Layout, Mesh, Replicated, Shard, Sharded, TensorSpec

from .strategies import random_tensor, same_bits

DATA = os.path.join(os.path.dirname(__file__), "data")


def _tp(shapes: dict[str, tuple[int, ...]], k: int, dim: int, dtype=torch.float32) -> Layout:
    return Layout(Mesh(("tp",), (k,)), [TensorSpec(n, s, dtype, Sharded((Shard(dim, "tp"),))) for n, s in shapes.items()])


def _manifest(path: str) -> dict:
    with open(os.path.join(path, "manifest.json")) as f:
        return json.load(f)


def _file_meta(path: str) -> dict:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(json.loads(f.read(n))["__metadata__"]["stalwart"])


def _reads(path: str, target: Layout) -> tuple[int, int]:
    need = got = 0
    with F.open(path) as ckpt:
        for rank in range(target.world_size):
            plan = ckpt.plan(target, rank)
            out = ckpt.execute(plan)
            for name in out:
                assert torch.equal(out[name], target.split(name, _STATE[name], rank))
            need += plan.needed_bytes
            got += plan.planned_bytes
    return need, got


_STATE = {"w": torch.randn(256, 1024, generator=torch.Generator().manual_seed(0))}


@pytest.mark.parametrize("k_src,k_dst", [(4, 3), (3, 4), (2, 5)])
def test_column_reshards_read_only_the_bytes_they_need(tmp_path, k_src, k_dst):
    # 4 KiB checksum blocks against 1-4 KiB local rows: row-major storage would read
    # whole rows; panels (8 fp32 columns, 8 KiB each here) make every reshard a few
    # contiguous ranges.
    src = _tp({"w": (256, 1024)}, k_src, 1)
    path = str(tmp_path / "c")
    F.save(_STATE, path, layout=src, fsync=False, block_size=4096)
    need, got = _reads(path, _tp({"w": (256, 1024)}, k_dst, 1))
    assert got <= 1.05 * need
    # the same reshard from row-major storage is what the order avoids
    old = str(tmp_path / "rowmajor")
    F.save(_STATE, old, layout=src, fsync=False, block_size=4096, storage_panels=False)
    need_old, got_old = _reads(old, _tp({"w": (256, 1024)}, k_dst, 1))
    assert need_old == need and got_old >= 1.2 * need


def test_stored_entries_are_plain_safetensors_of_the_panels(tmp_path):
    g = torch.Generator().manual_seed(1)
    state = {"w": torch.randn(6, 512, generator=g), "v": torch.randn(4, 5, 300, generator=g).to(torch.bfloat16),
             "b": torch.arange(10)}
    layout = Layout(Mesh(("tp",), (2,)), [
        TensorSpec("w", (6, 512), torch.float32, Sharded((Shard(1, "tp"),))),
        TensorSpec("v", (4, 5, 300), torch.bfloat16, Sharded((Shard(2, "tp"),))),
        TensorSpec("b", (10,), torch.int64, Replicated()),
    ])
    path = F.save(state, str(tmp_path / "c"), layout=layout, fsync=False)
    manifest = _manifest(path)
    assert manifest["version"] == 2
    # 32-byte panel rows: 8 fp32, 16 bf16 columns
    assert manifest["tensors"]["w"]["panels"] == {"dim": 1, "width": 8}
    assert manifest["tensors"]["v"]["panels"] == {"dim": 2, "width": 16}
    assert "panels" not in manifest["tensors"]["b"]
    for rank in range(2):
        file = os.path.join(path, f"rank-{rank:05d}.safetensors")
        plain = load_file(file)  # any safetensors reader sees the bytes as stored
        w = state["w"][:, 256 * rank : 256 * rank + 256]
        assert torch.equal(plain["w"], w.reshape(6, 32, 8).permute(1, 0, 2))  # 32 panels of [6, 8]
        v = layout.split("v", state["v"], rank)  # 150 columns: 9 panels of 16, then 6
        assert plain["v"].shape == (4 * 5 * 150,)
        assert torch.equal(plain["v"], torch.cat([v[..., c : c + 16].reshape(-1) for c in range(0, 150, 16)]))
        assert _file_meta(file)["v"] == 2
    back = F.load(path)
    assert all(torch.equal(back[n], t) for n, t in state.items())
    assert F.verify(path).ok
    # without panels nothing needs version 2
    plain_path = F.save(state, str(tmp_path / "rm"), layout=layout, fsync=False, storage_panels=False)
    assert _manifest(plain_path)["version"] == 1
    assert _file_meta(os.path.join(plain_path, "rank-00000.safetensors"))["v"] == 1


def test_version_1_checkpoint_written_before_panels_still_loads(tmp_path):
    # Written by the previous release (row-major shards, 16-byte checksum blocks).
    path = os.path.join(DATA, "v1_tp_columns")
    g = torch.Generator().manual_seed(11)
    state = {"w": torch.randn(6, 10, generator=g), "v": torch.randn(4, 5, 3, generator=g).to(torch.bfloat16),
             "b": torch.arange(10, dtype=torch.int64)}
    assert _manifest(path)["version"] == 1
    back = F.load(path)
    assert all(torch.equal(back[n], t) for n, t in state.items())
    target = Layout(Mesh(("tp",), (3,)), [
        TensorSpec("w", (6, 10), torch.float32, Sharded((Shard(1, "tp"),))),
        TensorSpec("v", (4, 5, 3), torch.bfloat16, Sharded((Shard(2, "tp"),))),
        TensorSpec("b", (10,), torch.int64, Sharded((Shard(0, "tp"),))),
    ])
    for rank in range(3):
        got = F.load(path, layout=target, rank=rank)
        for n, t in state.items():
            assert torch.equal(got[n], target.split(n, t, rank))
    assert F.verify(path).ok


def test_manifest_and_file_disagreeing_on_the_arrangement_is_refused(tmp_path):
    path = F.save(_STATE, str(tmp_path / "c"), layout=_tp({"w": (256, 1024)}, 2, 1), fsync=False)
    manifest = _manifest(path)
    del manifest["tensors"]["w"]["panels"]  # the bytes still verify; only their arrangement is wrong
    with open(os.path.join(path, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    with pytest.raises(FormatError, match="'w' is stored as panels of width 8 along dim 1, the manifest says row-major"):
        F.load(path)
    report = F.verify(path)
    assert not report.ok and any("as panels" in p for p in report.problems)
    manifest["tensors"]["w"]["panels"] = {"dim": 2, "width": 8}
    with open(os.path.join(path, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    with pytest.raises(FormatError, match=r"panels of width 8 along dim 2 do not fit shape \[256, 1024\]"):
        F.open(path)


def test_every_byte_of_a_column_reshard_is_verified(tmp_path):
    path = F.save(_STATE, str(tmp_path / "c"), layout=_tp({"w": (256, 1024)}, 4, 1), fsync=False, block_size=4096)
    with F.open(path) as ckpt:
        header = ckpt._open_rank(1)[1]
        entry = header.entries["w"]
    # rank 1 of tp 3 needs columns 342..683: local columns 86..255 of source rank 1,
    # in its panels 10..31 (8 columns, 8 KiB each); flip a byte in column 200 (panel 25).
    at = header.data_start + entry.begin + 25 * 8 * 256 * 4 + 5 * 8 * 4 + 1  # panel 25, row 5, column 200
    with open(os.path.join(path, "rank-00001.safetensors"), "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x40]))
    target = _tp({"w": (256, 1024)}, 3, 1)
    with pytest.raises(ChecksumError, match=r"rank-00001\.safetensors entry 'w'"):
        F.load(path, layout=target, rank=1)
    # rank 0 reads other columns of the same file: its blocks do not cover the flipped byte
    assert torch.equal(F.load(path, layout=target, rank=0)["w"], _STATE["w"][:, :342])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_any_column_reshard_reads_at_most_a_panel_and_a_block_more_per_end(tmp_path_factory, data):
    # Random shapes, dtypes, split dims, tp degrees and block sizes: every read is whole
    # checksum blocks (so every byte read is verified), the load is bitwise right, and
    # from each source shard it reads at most one partial panel plus one block beyond
    # what it needs at each end of the columns it needs.
    ndim = data.draw(st.integers(2, 3))
    shape = tuple(data.draw(st.integers(1, 96)) for _ in range(ndim))
    dim = data.draw(st.integers(1, ndim - 1))
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float8_e4m3fn, torch.float64]))
    k_src, k_dst = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 5))
    block = data.draw(st.sampled_from([16, 256, 4096]))
    state = {"w": random_tensor(shape, dtype, 0)}
    path = F.save(state, str(tmp_path_factory.mktemp("c") / "c"), layout=_tp({"w": shape}, k_src, dim, dtype),
                  fsync=False, block_size=block)
    target = _tp({"w": shape}, k_dst, dim, dtype)
    with F.open(path) as ckpt:
        panels = ckpt.tensors["w"].panels
        assert (panels is not None) == (math.prod(shape[:dim]) > 1)
        panel_bytes = 0 if panels is None else math.prod(shape) // shape[dim] * panels[1] * dtype.itemsize
        for rank in range(k_dst):
            plan = ckpt.plan(target, rank)
            for r in plan.reads:
                assert r.start % block == 0 and (r.stop % block == 0 or r.stop == r.entry_nbytes)
            sources = len({r.rank for r in plan.reads})
            assert plan.planned_bytes - plan.needed_bytes <= sources * 2 * (panel_bytes + block)
            want = target.split("w", state["w"], rank)  # None: too few columns for every rank
            got = ckpt.execute(plan)
            assert same_bits(got["w"], want) if want is not None else "w" not in got
