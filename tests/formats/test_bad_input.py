"""Bad input: each a clear error naming what and where; failed saves leave nothing behind."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import stalwart.formats as F
from stalwart.errors import ChecksumError, FormatError
from stalwart.formats.layout import Layout


@pytest.fixture
def ckpt(tmp_path):
    tensors = {"a": torch.randn(300, 100), "b": torch.arange(1000), "c": torch.randn(7)}
    path = str(tmp_path / "c")
    F.save(tensors, path, layout=Layout.zero(tensors, 2, 3))
    return path, tensors


def _manifest(path):
    with open(os.path.join(path, "manifest.json")) as f:
        return json.load(f)


def _write_manifest(path, obj):
    with open(os.path.join(path, "manifest.json"), "w") as f:
        json.dump(obj, f)


def test_truncated_data_file(ckpt):
    path, _ = ckpt
    f = os.path.join(path, "rank-00001.safetensors")
    os.truncate(f, os.path.getsize(f) - 100)
    with pytest.raises(FormatError, match=r"rank-00001\.safetensors is truncated"):
        F.load(path)
    report = F.verify(path)
    assert not report.ok and any("rank-00001" in p and "truncated" in p for p in report.problems)


def test_flipped_byte_in_data_names_file_entry_and_bytes(ckpt):
    path, _ = ckpt
    f = os.path.join(path, "rank-00000.safetensors")
    with open(f, "r+b") as fh:
        fh.seek(os.path.getsize(f) - 10)
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 0x40]))
    with pytest.raises(ChecksumError, match=r"rank-00000\.safetensors entry '\w+': bytes \d+\.\.\d+"):
        F.load(path)
    assert not F.verify(path).ok


def test_flipped_byte_in_header_is_caught_by_digest(ckpt):
    path, _ = ckpt
    f = os.path.join(path, "rank-00000.safetensors")
    with open(f, "r+b") as fh:
        fh.seek(20)
        byte = fh.read(1)
        fh.seek(20)
        fh.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(FormatError, match=r"rank-00000\.safetensors"):
        F.load(path)


def test_missing_data_file(ckpt):
    path, _ = ckpt
    os.remove(os.path.join(path, "rank-00001.safetensors"))
    with pytest.raises(FormatError, match=r"rank-00001\.safetensors \(rank 1\) is missing"):
        F.load(path)
    assert any("missing" in p for p in F.verify(path).problems)


@pytest.mark.parametrize("evil", ["../outside.safetensors", "/etc/passwd", "a/../../x", ""])
def test_manifest_path_outside_checkpoint_is_refused(ckpt, evil):
    path, _ = ckpt
    m = _manifest(path)
    m["files"][0]["path"] = evil
    _write_manifest(path, m)
    with pytest.raises(FormatError, match="outside the checkpoint directory"):
        F.load(path)


def test_malformed_manifest_json(ckpt):
    path, _ = ckpt
    with open(os.path.join(path, "manifest.json"), "w") as f:
        f.write('{"format": "stalwart-checkpoint", "version": 1, ')
    with pytest.raises(FormatError, match=r"manifest\.json: manifest is not valid JSON"):
        F.load(path)


def test_newer_manifest_version(ckpt):
    path, _ = ckpt
    m = _manifest(path)
    m["version"] = 99
    _write_manifest(path, m)
    with pytest.raises(FormatError, match="manifest version 99 is newer"):
        F.open(path)


def test_manifest_missing_field_and_wrong_format(ckpt):
    path, _ = ckpt
    m = _manifest(path)
    del m["files"]
    _write_manifest(path, m)
    with pytest.raises(FormatError, match="lacks the field 'files'"):
        F.open(path)
    _write_manifest(path, {"format": "something-else", "version": 1})
    with pytest.raises(FormatError, match="not a stalwart manifest"):
        F.open(path)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(FormatError, match="no such file"):
        F.load(str(tmp_path / "nope"))
    os.mkdir(tmp_path / "empty")
    with pytest.raises(FormatError, match=r"no manifest\.json and no 'latest' pointer"):
        F.load(str(tmp_path / "empty"))


def test_uncommitted_step_is_invisible(tmp_path):
    root = str(tmp_path / "run")
    F.save({"w": torch.zeros(4)}, root, step=1)
    os.makedirs(os.path.join(root, "step-00000002"))
    with open(os.path.join(root, "step-00000002", "rank-00000.safetensors"), "wb") as f:
        f.write(b"\0" * 64)
    assert torch.equal(F.load(root)["w"], torch.zeros(4))  # latest still names the committed step


def test_verify_reports_coverage_hole(ckpt):
    path, _ = ckpt
    m = _manifest(path)
    m["files"] = [f for f in m["files"] if f["rank"] != 1]
    _write_manifest(path, m)
    report = F.verify(path)
    assert any("rank 1 should store a share but has no data file" in p for p in report.problems)


def test_shape_mismatch_on_load(ckpt):
    path, tensors = ckpt
    bad = Layout.zero({"a": torch.zeros(301, 100), "b": tensors["b"], "c": tensors["c"]}, 2, 3)
    with pytest.raises(Exception, match=r"tensor 'a': checkpoint holds shape \[300, 100\], target layout wants \[301, 100\]"):
        F.load(path, layout=bad, rank=0)


def test_unsupported_objects_are_refused_before_writing(tmp_path):
    with pytest.raises(FormatError, match="never pickles"):
        F.save({"w": torch.zeros(2), "opt": object()}, str(tmp_path / "c"))
    assert os.listdir(tmp_path) == []


def test_failed_save_leaves_nothing_behind(tmp_path):
    # A real I/O failure: the file-size limit makes write() fail with EFBIG half-way.
    script = textwrap.dedent(
        f"""
        import resource, signal, sys, torch
        import stalwart.formats as F
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        try:
            F.save({{"w": torch.zeros(1 << 20)}}, {str(tmp_path / "out")!r})
        except OSError as e:
            print("failed:", e.errno)
            sys.exit(0)
        sys.exit(3)
        """
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "failed: 27" in res.stdout  # EFBIG
    assert os.listdir(tmp_path) == [], "a failed save must not leave partial output"


def test_failed_overwrite_keeps_the_old_checkpoint(tmp_path):
    path = str(tmp_path / "c")
    F.save({"w": torch.ones(3)}, path)
    with pytest.raises(FormatError):
        F.save({"w": torch.zeros(3), "x": object()}, path)
    assert torch.equal(F.load(path)["w"], torch.ones(3))
    assert sorted(os.listdir(tmp_path)) == ["c"]
