"""``stalwart inspect`` and ``verify`` read every format ``convert`` reads; nothing in a
source directory goes unreported; the byte-moving commands start without torch."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zipfile

import pytest
import safetensors.torch
import torch

from stalwart.cli import main
from stalwart.formats.convert import convert

from .conftest import HAS_DEEPSPEED, same_bits


def run_here(capsys, *args) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(list(args))
    return rc, capsys.readouterr().out


def _model():
    torch.manual_seed(0)
    return {"emb.weight": torch.randn(16, 8), "lin.weight": torch.randn(8, 8), "lin.bias": torch.randn(8),
            "steps": torch.tensor(3)}


@pytest.fixture(scope="module")
def formats(tmp_path_factory) -> dict[str, str]:
    """One small checkpoint per format, each directory with a stray file in it."""
    root = tmp_path_factory.mktemp("formats")
    sd = _model()
    m = torch.nn.Linear(8, 8)
    opt = torch.optim.AdamW(m.parameters(), lr=0.1)
    m(torch.randn(2, 8)).sum().backward()
    opt.step()
    pt = str(root / "ckpt.pt")
    torch.save({"model": m.state_dict(), "optimizer": opt.state_dict(), "step": 1}, pt)
    out = {"torch": pt}
    out["hf"] = str(root / "hf")
    os.makedirs(out["hf"])
    safetensors.torch.save_file(sd, os.path.join(out["hf"], "model.safetensors"))
    out["hf-bin"] = str(root / "hfbin")
    os.makedirs(out["hf-bin"])
    torch.save(sd, os.path.join(out["hf-bin"], "pytorch_model.bin"))
    for to in ("native", "dcp", "ds-universal"):
        out[to] = str(root / to)
        convert(pt, out[to], to=to)
    for path in out.values():
        if os.path.isdir(path):
            with open(os.path.join(path, "NOTES.txt"), "w") as f:
                f.write("not a checkpoint file\n")
    return out


EXPECT = {"torch": "torch-save", "hf": "hf-safetensors", "hf-bin": "hf-bin", "dcp": "dcp", "ds-universal": "ds-universal"}


@pytest.mark.parametrize("fmt", sorted(EXPECT))
def test_inspect_and_verify_every_format(formats, fmt, capsys):
    path = formats[fmt]
    rc, out = run_here(capsys, "inspect", path, "--json")
    info = json.loads(out)
    assert rc == 0 and info["format"] == EXPECT[fmt]
    names = {t["name"] for t in info["tensors"]}
    assert ("lin.weight" in names) or ("weight" in names)
    if os.path.isdir(path):
        assert info["not_read"] == ["NOTES.txt"]
    rc, out = run_here(capsys, "verify", path)
    assert rc == 0 and out.startswith("OK"), out
    if fmt in ("torch", "hf-bin", "ds-universal"):
        assert "checksums match" in out  # zip records' CRC-32s
    if os.path.isdir(path):
        assert "NOTES.txt" in out


def test_native_inspect_verify_unchanged(formats, capsys):
    rc, out = run_here(capsys, "verify", formats["native"])
    assert rc == 0 and "every checksum matches" in out
    rc, out = run_here(capsys, "inspect", formats["native"], "--json")
    assert rc == 0 and json.loads(out)["step"] == 1


def test_every_reader_reports_files_it_does_not_read(formats, tmp_path):
    for fmt in ("hf", "hf-bin", "dcp", "ds-universal"):
        plan = convert(formats[fmt], str(tmp_path / fmt), to="native", dry_run=True)
        assert plan.not_read == ["NOTES.txt"], fmt
        assert any("NOTES.txt" in w for w in plan.warnings), fmt


def _flip_tensor_byte(path: str) -> None:
    with zipfile.ZipFile(path) as zf:
        zi = next(z for z in zf.infolist() if "/data/" in z.filename)
    with open(path, "r+b") as f:
        f.seek(zi.header_offset + 26)
        n, e = struct.unpack("<HH", f.read(4))
        f.seek(zi.header_offset + 30 + n + e + 1)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))


def test_verify_finds_corruption(formats, tmp_path, capsys):
    pt = str(tmp_path / "bad.pt")
    shutil.copy(formats["torch"], pt)
    _flip_tensor_byte(pt)
    rc, out = run_here(capsys, "verify", pt)
    assert rc == 1 and "Bad CRC-32" in out and "bad.pt" in out
    hf = str(tmp_path / "hf")
    shutil.copytree(formats["hf"], hf)
    st = os.path.join(hf, "model.safetensors")
    os.truncate(st, os.path.getsize(st) - 10)
    rc, out = run_here(capsys, "verify", hf)
    assert rc == 1 and "truncated" in out
    dcp = str(tmp_path / "dcp")
    shutil.copytree(formats["dcp"], dcp)
    os.unlink(os.path.join(dcp, "__0_0.distcp"))
    rc, out = run_here(capsys, "verify", dcp)
    assert rc == 1 and "__0_0.distcp" in out and "missing" in out


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed")
def test_deepspeed_inspect_verify_and_a_missing_rank(ds_ckpts, tmp_path, capsys):
    src = ds_ckpts.path("z2_bf16")
    rc, out = run_here(capsys, "inspect", src, "--json")
    info = json.loads(out)
    assert rc == 0 and info["format"] == "deepspeed-zero2" and info["topology"]["dp"] == 2
    assert any(t["role"] == "optimizer_slot" for t in info["tensors"])
    assert "global_step2/" in info["not_read"]  # the older tag in the save directory is named, not silently skipped
    rc, out = run_here(capsys, "verify", src)
    assert rc == 0 and "checksums match" in out, out
    broken = str(tmp_path / "ds")
    shutil.copytree(src, broken)
    tag = os.path.join(broken, "global_step3")
    os.unlink(os.path.join(tag, "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"))
    rc, out = run_here(capsys, "verify", broken)
    assert rc == 1 and "rank 1" in out and "missing" in out


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed")
def test_byte_moving_commands_never_import_torch(ds_ckpts, formats, tmp_path):
    """convert --to hf, inspect, verify and --help of DeepSpeed / HF / torch.save checkpoints
    run without importing torch (it is ~1-2 s of a conversion's start-up)."""
    ds = ds_ckpts.path("z2_bf16")
    hf_out = str(tmp_path / "hf_out")
    calls = [["--help"], ["convert", "--help"], ["inspect", ds], ["verify", ds, "-q"],
             ["convert", ds, hf_out, "--to", "hf", "-q"], ["inspect", hf_out], ["verify", hf_out],
             ["inspect", formats["torch"]], ["verify", formats["torch"]], ["diff", "--help"]]
    code = (
        "import json, sys\n"
        "from stalwart.cli import main\n"
        "out = []\n"
        f"for args in {calls!r}:\n"
        "    try:\n"
        "        rc = main(args)\n"
        "    except SystemExit as e:\n"
        "        rc = e.code\n"
        "    out.append([args[0], rc, 'torch' in sys.modules])\n"
        "print('RESULT', json.dumps(out))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("RESULT"))
    results = json.loads(line[len("RESULT "):])
    assert [r[1] for r in results] == [0] * len(calls), results
    assert not any(r[2] for r in results), results
    # the torch-free output is the same as zero_to_fp32's weights (bitwise, via the fp32 masters)
    truth = ds_ckpts.truth("z2_bf16")
    got = safetensors.torch.load_file(os.path.join(hf_out, "model.safetensors"))
    ref = {k[len("zero_to_fp32."):]: v for k, v in truth.items() if k.startswith("zero_to_fp32.")}
    common = [k for k in ref if k in got and got[k].dtype == ref[k].dtype]
    assert len(common) >= 3
    assert all(same_bits(got[k], ref[k]) for k in common)


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed")
def test_trainer_checkpoint_with_deepspeed_reads_trainer_files(ds_ckpts, tmp_path):
    """A Trainer checkpoint-N/ written with DeepSpeed: the tag plus Trainer's own files."""
    src = ds_ckpts.path("z2_fp32")  # run dir holding checkpoint-3/{global_step3, latest, trainer_state.json, rng_state_0.pth}
    plan = convert(src, str(tmp_path / "n"), to="native", dry_run=True)
    assert plan.source_format == "deepspeed-zero2" and plan.not_read == []
    objects = plan.state.meta.extra_objects
    assert objects["trainer_state"]["global_step"] == 3 and "rank0" in objects["rng"]
    assert "base64" in objects["rng"]["rank0"]["torch"]
