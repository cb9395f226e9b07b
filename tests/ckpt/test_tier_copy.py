"""Snapshot files copied to a tier: O_DIRECT for the aligned body, buffered tail, and a
sendfile fallback where the file system refuses O_DIRECT."""

from __future__ import annotations

import os

import numpy as np
import pytest

from stalwart.ckpt import tiers


@pytest.mark.parametrize("size", [0, 100, tiers.DIRECT_MIN, tiers.DIRECT_MIN + 4097, 3 * tiers.COPY_CHUNK + 17])
def test_copy_is_exact_for_every_size(tmp_path, size):
    src = tmp_path / "src.bin"
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    src.write_bytes(data)
    dst = tmp_path / "dst.bin"
    dst.write_bytes(b"x" * (size + 5000))  # a longer stale file is truncated
    tiers._copy_file(str(src), str(dst), fsync=True)
    assert dst.read_bytes() == data


def test_file_systems_without_o_direct_fall_back(tmp_path, monkeypatch):
    size = tiers.DIRECT_MIN + 12345
    src = tmp_path / "src.bin"
    data = os.urandom(size)
    src.write_bytes(data)
    used = []

    def refuse(*a, **k):
        used.append("direct")
        raise OSError(22, "Invalid argument")  # what tmpfs answers to O_DIRECT

    monkeypatch.setattr(tiers, "_copy_direct", refuse)
    tiers._copy_file(str(src), str(tmp_path / "dst.bin"), fsync=False)
    assert used == ["direct"] and (tmp_path / "dst.bin").read_bytes() == data


def test_other_errors_are_not_swallowed(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(tiers.DIRECT_MIN))
    with pytest.raises(OSError):
        tiers._copy_file(str(src), str(tmp_path / "missing-dir" / "dst.bin"), fsync=False)
