"""Large data files written with fsync go past the page cache (O_DIRECT) while writes
are sequential; the bytes and checksums are those of the buffered path either way."""

from __future__ import annotations

import torch

import stalwart.formats as F
from stalwart.formats import datafile
from stalwart.formats.datafile import DataFileWriter


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a": torch.randn(3 << 20, generator=g),  # 12 MiB
        "b": torch.randint(0, 255, (5 << 20,), dtype=torch.uint8, generator=g),  # odd tail below
        "c": torch.randn(1234, 7, generator=g).to(torch.bfloat16),
    }


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


def test_out_of_order_writes_leave_the_direct_stream(tmp_path, monkeypatch):
    state = _state(1)
    specs = [(n, t.dtype, tuple(t.shape)) for n, t in state.items()]
    path = str(tmp_path / "x.safetensors")
    w = DataFileWriter(path, specs, direct=True)
    assert w._direct is not None
    w.write("b", state["b"])  # skips over "a": no longer the next bytes of the file
    assert w._direct is None
    w.write("a", state["a"])
    w.write("c", state["c"])
    record = w.close(fsync=True)

    ref_path = str(tmp_path / "ref.safetensors")
    ref = DataFileWriter(ref_path, specs, direct=False)
    for n, t in state.items():
        ref.write(n, t)
    ref_record = ref.close(fsync=False)
    assert record.to_json() == {**ref_record.to_json(), "path": record.path}
    with open(path, "rb") as f1, open(ref_path, "rb") as f2:
        assert f1.read() == f2.read()


def test_small_files_stay_buffered(tmp_path):
    w = DataFileWriter(str(tmp_path / "s.safetensors"), [("x", torch.float32, (10,))], direct=True)
    assert w._direct is None and datafile.DIRECT_MIN_BYTES > 40
    w.write("x", torch.ones(10))
    w.close(fsync=True)
