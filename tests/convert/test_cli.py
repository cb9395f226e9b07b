"""``stalwart convert`` as users run it (the installed console script, in a subprocess)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import safetensors.torch
import torch

from .conftest import same_bits

STALWART = shutil.which("stalwart") or os.path.join(os.path.dirname(sys.executable), "stalwart")


def run(*args, check=None):
    res = subprocess.run([STALWART, *args], capture_output=True, text=True, timeout=180)
    if check is not None:
        assert res.returncode == check, (res.returncode, res.stdout, res.stderr)
    return res


@pytest.fixture
def src(tmp_path):
    path = str(tmp_path / "m.pt")
    torch.manual_seed(0)
    emb = torch.randn(7, 4)
    torch.save({"model": {"module.emb.weight": emb, "module.head.weight": emb, "module.lin.weight": torch.randn(4, 4),
                          "module.steps": torch.tensor(3)}, "step": 5}, path)
    return path


def test_help_answers_questions():
    out = run("convert", "--help", check=0).stdout
    for needle in ("deepspeed", "ds-universal", "dcp", "safetensors", "torch.save", "--max-shard-size", "--dtype",
                   "--include", "--rename", "--dry-run", "--weights-only", "examples:", "allow-list", "default: 5GB",
                   "load_universal", "checkpoint-N/"):
        assert needle in out, needle
    assert "convert" in run("--help", check=0).stdout


def test_dry_run_prints_the_plan_and_writes_nothing(src, tmp_path):
    dst = str(tmp_path / "hf")
    res = run("convert", src, dst, "--to", "hf", "--dry-run", "--rename", r"^module\.=", "--dtype", "bf16", check=0)
    assert "plan:" in res.stdout and "torch-save" in res.stdout
    assert "module.lin.weight -> lin.weight" in res.stdout and "float32 -> bfloat16" in res.stdout
    assert "tied: head.weight = emb.weight" in res.stdout and "model.safetensors" in res.stdout
    assert not os.path.exists(dst)
    plan = json.loads(run("convert", src, dst, "--to", "hf", "--dry-run", "--json", check=0).stdout)
    assert plan["source_format"] == "torch-save" and plan["files"][0]["path"] == "model.safetensors"
    assert {t["name"] for t in plan["tensors"]} == {"module.emb.weight", "module.lin.weight", "module.steps"}


def test_convert_then_error_paths(src, tmp_path):
    dst = str(tmp_path / "hf")
    res = run("convert", src, dst, "--to", "hf", "--rename", r"^module\.=", "--dtype", "bf16", check=0)
    assert "converted" in res.stdout and "(hf)" in res.stdout
    sd = safetensors.torch.load_file(os.path.join(dst, "model.safetensors"))
    assert set(sd) == {"emb.weight", "lin.weight", "steps"} and sd["steps"].dtype == torch.int64
    orig = torch.load(src, weights_only=True)["model"]
    assert same_bits(sd["lin.weight"], orig["module.lin.weight"].to(torch.bfloat16))
    # again without --overwrite: one-line error, exit 2, output untouched
    res = run("convert", src, dst, "--to", "hf", check=2)
    assert res.stderr.strip().startswith("stalwart: error:") and len(res.stderr.strip().splitlines()) == 1
    assert "Traceback" not in res.stderr
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04garbage")
    res = run("convert", str(bad), str(tmp_path / "x"), "--to", "native", check=2)
    assert "bad.pt" in res.stderr and "Traceback" not in res.stderr and not os.path.exists(tmp_path / "x")
    res = run("convert", src, str(tmp_path / "y"), "--to", "nonsense")
    assert res.returncode == 2 and "invalid choice" in res.stderr


def test_json_result(src, tmp_path):
    out = json.loads(run("convert", src, str(tmp_path / "n"), "--to", "native", "--json", "--workers", "1", check=0).stdout)
    assert out["target"] == "native" and out["bytes_written"] > 0 and out["step"] == 5
