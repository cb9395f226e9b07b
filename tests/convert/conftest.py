"""Shared fixtures: real DeepSpeed checkpoints (built once per session) and helpers."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts", "ds_train.py")
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None

# name -> save job (2 DP ranks, 3 steps). The model: tied embedding/head, a frozen
# layer, a buffer, an odd bias, two AdamW param groups with different hparams.
DS_CONFIGS = {
    "z1_fp32": {"stage": 1, "dtype": "fp32"},
    "z1_bf16": {"stage": 1, "dtype": "bf16"},
    "z2_fp32": {"stage": 2, "dtype": "fp32", "hf_layout": True},  # HF Trainer: checkpoint-3/global_step3
    "z2_bf16": {"stage": 2, "dtype": "bf16", "also_save_at": [2]},
    "z3_fp32": {"stage": 3, "dtype": "fp32"},
    "z3_bf16": {"stage": 3, "dtype": "bf16", "same_hparams": True},  # see test_resume: ZeRO-3 UCP loads group 0's hparams
    "z0_fp32": {"stage": 0, "dtype": "fp32"},
    "bf16opt": {"stage": 1, "dtype": "bf16", "grad_accum_fp32": True},  # DeepSpeed's BF16_Optimizer
    "z2_fp16": {"stage": 2, "dtype": "fp16"},  # dynamic loss scaler
    "z2_elastic": {"stage": 2, "dtype": "bf16", "elastic": True},  # per-group state, padding stripped
}
MATRIX = ["z1_fp32", "z1_bf16", "z2_fp32", "z2_bf16", "z3_fp32", "z3_bf16"]
# Saved by a single rank (DP 1): partitions are whole groups, ZeRO-3 pieces whole params.
DS_CONFIGS_DP1 = {
    "z2_bf16_dp1": {"stage": 2, "dtype": "bf16"},
    "z3_fp32_dp1": {"stage": 3, "dtype": "fp32"},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ds_env() -> dict:
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".cache", "torch_extensions"))
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("OMP_NUM_THREADS", None)
    return env


def run_plan(jobs: list[dict], nproc: int, workdir: str, name: str, timeout: int = 600) -> None:
    """Run ``jobs`` in one torchrun of ``nproc`` ranks; remove any shm buffers it leaves."""
    plan = os.path.join(workdir, f"{name}.json")
    with open(plan, "w") as f:
        json.dump(jobs, f)
    port = free_port()
    before = set(glob.glob("/dev/shm/deepspeed_allreduce_buffer_*"))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}",
           SCRIPT, plan]
    try:
        res = subprocess.run(cmd, cwd=workdir, env=ds_env(), capture_output=True, text=True, timeout=timeout)
    finally:
        for f in set(glob.glob("/dev/shm/deepspeed_allreduce_buffer_*")) - before:
            if f"_{port}_" in f:
                os.unlink(f)
    if res.returncode != 0:
        tail = "\n".join((res.stdout + res.stderr).splitlines()[-40:])
        raise RuntimeError(f"torchrun {name} failed ({res.returncode}):\n{tail}")


class DSCheckpoints:
    """The session's DeepSpeed checkpoints: ``path(name)``, ``truth(name)``."""

    def __init__(self, root: str) -> None:
        self.root = root

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def truth(self, name: str) -> dict[str, torch.Tensor]:
        return torch.load(os.path.join(self.root, f"{name}.truth.pt"), weights_only=True)


@pytest.fixture(scope="session")
def ds_ckpts(tmp_path_factory) -> DSCheckpoints:
    if not HAS_DEEPSPEED:
        pytest.skip("deepspeed is not installed")
    root = str(tmp_path_factory.mktemp("ds"))
    for nproc, configs in ((2, DS_CONFIGS), (1, DS_CONFIGS_DP1)):
        jobs = [{"op": "save", "dir": os.path.join(root, n), "truth": os.path.join(root, f"{n}.truth.pt"), **cfg}
                for n, cfg in configs.items()]
        run_plan(jobs, nproc, root, f"save_dp{nproc}")
    return DSCheckpoints(root)


class DSUniversal(dict):
    """name -> root of DeepSpeed's own ds_to_universal output for that checkpoint."""

    def __init__(self, ckpts: DSCheckpoints, paths: dict[str, str]) -> None:
        super().__init__(paths)
        self.ckpts = ckpts

    def truth(self, name: str) -> dict[str, torch.Tensor]:
        return self.ckpts.truth(name)


UCP_FROM = ("z2_bf16", "z3_bf16")


@pytest.fixture(scope="session")
def ds_ucp(ds_ckpts, tmp_path_factory) -> DSUniversal:
    """DeepSpeed's ``ds_to_universal`` (with ``--inject_missing_state``) on the ZeRO-2 and ZeRO-3 checkpoints."""
    root = tmp_path_factory.mktemp("ds_ucp")
    paths = {}
    for name in UCP_FROM:
        out = root / name
        out.mkdir()
        cmd = [sys.executable, "-W", "ignore", "-m", "deepspeed.checkpoint.ds_to_universal",
               "--input_folder", os.path.join(ds_ckpts.path(name), "global_step3"),
               "--output_folder", str(out / "global_step3_universal"), "--inject_missing_state",
               "--num_extract_workers", "1", "--num_merge_workers", "1"]
        res = subprocess.run(cmd, env=ds_env(), capture_output=True, text=True, timeout=300)
        if res.returncode != 0:
            raise RuntimeError(f"ds_to_universal failed on {name}:\n{res.stderr[-3000:]}")
        (out / "latest_universal").write_text("global_step3_universal")
        paths[name] = str(out)
    return DSUniversal(ds_ckpts, paths)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (dtype, shape and every byte)."""
    if a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape):
        return False
    if a.numel() == 0:
        return True
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def tree_bytes(path: str) -> dict[str, bytes]:
    """Every file under ``path`` (or the file itself) by relative path -> content."""
    if os.path.isfile(path):
        with open(path, "rb") as f:
            return {".": f.read()}
    out = {}
    for dirpath, _, files in os.walk(path):
        for name in files:
            full = os.path.join(dirpath, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = f.read()
    return out


def leftovers(dst: str) -> list[str]:
    """Temporary siblings a failed conversion might have left next to ``dst``."""
    parent = os.path.dirname(os.path.abspath(dst))
    base = os.path.basename(os.path.abspath(dst))
    return [n for n in os.listdir(parent) if n.startswith(f".{base}.tmp-") or n.startswith(f".{base}.old-")]
