"""The page-cache-bypassing writer produces exactly the bytes written, whatever the write sizes."""

from __future__ import annotations

import os
import random

import pytest

from stalwart.formats.direct_io import ALIGN, DirectWriter


@pytest.mark.parametrize("where", ["disk", "shm"])
def test_bytes_are_exact(tmp_path, where):
    if where == "shm":
        if not os.path.isdir("/dev/shm"):
            pytest.skip("no /dev/shm")
        path = f"/dev/shm/stalwart-test-direct-{os.getpid()}"  # tmpfs refuses O_DIRECT: the fallback path
    else:
        path = str(tmp_path / "f.bin")
    rng = random.Random(7)
    chunks = [rng.randbytes(n) for n in (1, ALIGN - 1, 3 * ALIGN + 5, 70_000, 0, 2 * 64 * 1024 + 3, 123_457)]
    try:
        with DirectWriter(path, chunk=64 * 1024) as w:
            for c in chunks:
                assert w.write(c) == len(c)
            assert w.tell() == sum(map(len, chunks))
        with open(path, "rb") as f:
            assert f.read() == b"".join(chunks)
    finally:
        if os.path.exists(path):
            os.unlink(path)


def test_abort_closes_without_raising(tmp_path):
    w = DirectWriter(str(tmp_path / "g.bin"), chunk=ALIGN)
    w.write(b"x" * (3 * ALIGN + 1))
    w.abort()
    assert w.closed
