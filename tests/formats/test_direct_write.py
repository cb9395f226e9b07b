"""Large data files bypass the page cache (O_DIRECT) for their page-aligned bulk, written
in any order on worker threads; the bytes and checksums are those of the buffered path."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import stalwart.formats as F
from stalwart.formats import datafile, direct_io
from stalwart.formats.datafile import DataFileWriter


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a": torch.randn(3 << 20, generator=g),  # 12 MiB
        "b": torch.randint(0, 255, (5 << 20,), dtype=torch.uint8, generator=g)[3:],  # odd size and offsets
        "c": torch.randn(1234, 7, generator=g).to(torch.bfloat16),
    }


def _specs(state):
    return [(n, t.dtype, tuple(t.shape)) for n, t in state.items()]


def _reference(tmp_path, state, block_size=65536):
    path = str(tmp_path / "ref.safetensors")
    w = DataFileWriter(path, _specs(state), mode="cache", workers=0, block_size=block_size)
    for n, t in state.items():
        w.write(n, t)
    return path, w.close(fsync=False)


def test_fsynced_save_of_a_large_state_round_trips_and_verifies(tmp_path):
    state = _state()
    direct = F.save(state, str(tmp_path / "direct"), fsync=True)
    buffered = F.save(state, str(tmp_path / "buffered"), fsync=False)
    for path in (direct, buffered):
        out = F.load(path)
        assert all(torch.equal(out[k], v) for k, v in state.items())
        assert F.verify(path).ok
    files = sorted(p.name for p in (tmp_path / "direct").iterdir() if p.suffix == ".safetensors")
    for name in files:  # identical files whichever way they went to disk
        assert (tmp_path / "direct" / name).read_bytes() == (tmp_path / "buffered" / name).read_bytes()


@pytest.mark.parametrize("mode,workers", [("direct", 2), ("auto", 2), ("direct", 0)])
def test_writes_in_any_order_and_parts_give_the_same_file(tmp_path, mode, workers):
    state = _state(1)
    ref_path, ref_record = _reference(tmp_path, state, block_size=4096)
    path = str(tmp_path / "x.safetensors")
    w = DataFileWriter(path, _specs(state), mode=mode, workers=workers, block_size=4096)
    assert w.direct == (mode == "direct")  # 17 MiB: over DIRECT_MIN_BYTES; "auto" starts on the page cache
    w.write("b", state["b"])  # not the file's order
    a = datafile.tensor_bytes(state["a"])
    half = len(a) // 2 // 4096 * 4096 + 4096 * 3
    w.write_at("a", half, a[half:])  # the second part first, starting mid-page in the file
    w.write_at("a", 0, a[:half])
    w.write("c", state["c"])
    record = w.close(fsync=True)
    assert record.to_json() == {**ref_record.to_json(), "path": record.path}
    with open(path, "rb") as f1, open(ref_path, "rb") as f2:
        assert f1.read() == f2.read()


def test_small_files_stay_buffered_and_inline(tmp_path):
    w = DataFileWriter(str(tmp_path / "s.safetensors"), [("x", torch.float32, (10,))], mode="direct")
    assert not w.direct and datafile.DIRECT_MIN_BYTES > 40 and not w._io._threads
    w.write("x", torch.ones(10))
    w.close(fsync=True)


def test_a_failed_write_raises_and_leaves_no_file(tmp_path, monkeypatch):
    state = _state(2)
    path = tmp_path / "x.safetensors"
    real = direct_io.pwrite_all
    calls = []

    def failing(fd, data, offset):
        calls.append(offset)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data, offset)

    monkeypatch.setattr(direct_io, "pwrite_all", failing)
    w = DataFileWriter(str(path), _specs(state), mode="direct")
    with pytest.raises(OSError, match="No space left"):
        for n, t in state.items():
            w.write(n, t)
        w.close(fsync=True)
    w.abort()
    assert not path.exists()


def test_staging_buffers_are_reused_not_reallocated(tmp_path):
    state = _state(3)
    for i in range(2):
        w = DataFileWriter(str(tmp_path / f"{i}.safetensors"), _specs(state), mode="direct")
        for n, t in state.items():
            w.write(n, t)
        w.close(fsync=False)
        if i == 0:
            kept = {id(b) for b in direct_io._staging}
    assert 0 < len(direct_io._staging) <= direct_io.KEEP_STAGING
    assert {id(b) for b in direct_io._staging} == kept
    assert all(np.frombuffer(b, dtype=np.uint8).size == direct_io.CHUNK for b in direct_io._staging)
    assert os.path.getsize(tmp_path / "1.safetensors") == w.size


@pytest.mark.parametrize("floor,cached_pieces", [(1 << 60, 3), (0, 6)])
def test_auto_mode_leaves_the_page_cache_once_it_falls_behind(tmp_path, monkeypatch, floor, cached_pieces):
    # floor 2^60 B/s: every page-cache piece is too slow, the third in a row switches the
    # rest to O_DIRECT; floor 0: the page cache always keeps up and writes all six pieces.
    monkeypatch.setattr(direct_io, "CACHE_FLOOR", floor)
    state = {"a": torch.randn(12 << 20, generator=torch.Generator().manual_seed(4))}  # 48 MiB: 6 pieces
    ref_path, _ = _reference(tmp_path, state)
    real = direct_io.pwrite_all
    big_cached = []

    def spy(fd, data, offset):
        if fd == w._fd and len(memoryview(data)) >= 1 << 20:
            big_cached.append(offset)
        real(fd, data, offset)

    monkeypatch.setattr(direct_io, "pwrite_all", spy)
    w = DataFileWriter(str(tmp_path / "x.safetensors"), _specs(state), mode="auto", workers=1)
    assert not w.direct
    w.write("a", state["a"])
    w.close(fsync=False)
    assert len(big_cached) == cached_pieces
    assert (tmp_path / "x.safetensors").read_bytes() == Path(ref_path).read_bytes()
