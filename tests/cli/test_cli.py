"""The stalwart command, run as users run it (a subprocess of the installed console script)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import stalwart.formats as F
from stalwart.formats.layout import Layout

STALWART = shutil.which("stalwart") or os.path.join(os.path.dirname(sys.executable), "stalwart")


def run(*args, check=None):
    res = subprocess.run([STALWART, *args], capture_output=True, text=True, timeout=120)
    if check is not None:
        assert res.returncode == check, (res.returncode, res.stdout, res.stderr)
    return res


@pytest.fixture
def root(tmp_path):
    tensors = {"model.emb": torch.randn(32, 8), "model.head": None, "model.b": torch.arange(5), "optim.m": torch.zeros(32, 8)}
    tensors["model.head"] = tensors["model.emb"]
    r = str(tmp_path / "run")
    F.save({"w": torch.zeros(2)}, r, step=1)
    layout = Layout.zero({k: v for k, v in tensors.items() if k != "model.head"}, 2, 3)
    F.save(tensors, r, step=2, layout=layout, objects={"lr": 0.1})
    return r


def test_help_everywhere():
    assert "inspect" in run("--help", check=0).stdout
    for cmd in ("inspect", "verify", "diff"):
        out = run(cmd, "--help", check=0).stdout
        assert "usage: stalwart " + cmd in out


def test_inspect_table_and_json(root):
    out = run("inspect", root, check=0).stdout
    assert "model.emb = model.head" in out and "zero3" in out and "steps: 1  2*" in out
    info = json.loads(run("inspect", root, "--json", check=0).stdout)
    assert info["step"] == 2 and info["topology"]["dp"] == 2
    emb = next(t for t in info["tensors"] if t["name"] == "model.emb")
    assert emb["shape"] == [32, 8] and emb["fragments"] == 2 and emb["aliases"] == ["model.head"]
    assert [s["step"] for s in info["steps"]] == [1, 2]


def test_verify_ok_then_corrupt(root):
    assert "OK" in run("verify", root, check=0).stdout
    step = os.path.join(root, "step-00000002")
    f = os.path.join(step, "rank-00001.safetensors")
    with open(f, "r+b") as fh:
        fh.seek(-3, 2)
        fh.write(b"\xff\xff\xff")
    res = run("verify", root, check=1)
    assert "FAILED" in res.stdout and "rank-00001.safetensors" in res.stdout and "checksum mismatch" in res.stdout


def test_diff(root, tmp_path):
    a = os.path.join(root, "step-00000002")
    b = str(tmp_path / "b")
    state = F.load(a)
    F.save(state, b)
    assert "4 tensors equal" in run("diff", a, b, check=0).stdout  # different layouts, same tensors
    state["model.b"] = state["model.b"] + 1
    del state["optim.m"]
    F.save(state, str(tmp_path / "c"))
    res = run("diff", a, str(tmp_path / "c"), "--json", check=1)
    diff = json.loads(res.stdout)
    by_name = {d["tensor"]: d for d in diff["different"]}
    assert by_name["model.b"]["max_abs_diff"] == "1"
    assert by_name["optim.m"]["status"] == "missing in B"


def test_user_errors_are_one_line_no_traceback(tmp_path):
    for args in (["inspect", str(tmp_path / "nope")], ["verify", str(tmp_path)], ["diff", str(tmp_path), str(tmp_path)]):
        res = run(*args, check=2)
        assert "Traceback" not in res.stderr
        assert res.stderr.strip().startswith("stalwart: error:") and res.stderr.strip().count("\n") == 0, res.stderr
    res = run("inspect", check=2)
    assert "Traceback" not in res.stderr and "stalwart: error:" in res.stderr
