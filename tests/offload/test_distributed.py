"""OffloadAdamW under real torch.distributed on CPU: DDP with gloo (2 processes; the update
uses the reduced gradients, replicas stay bitwise identical, and the run tracks
torch.optim.AdamW), and FSDP2 (DTensor shards; state sharded like the parameters; protect()
saves it at world size 2 and restores it at world size 1)."""

from __future__ import annotations

import json
import os

from tests.ckpt.scripts._harness import failure, isolated_shm, torchrun

SCRIPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts")


def load(path) -> dict:
    with open(path) as f:
        return json.load(f)


def results(out, n):
    return [load(os.path.join(out, f"result-{r}.json")) for r in range(n)]


def test_ddp_two_processes(tmp_path):
    with isolated_shm() as shm:
        res = torchrun(os.path.join(SCRIPTS, "ddp_offload.py"), "--out", str(tmp_path), shm_base=shm)
    assert res.returncode == 0, failure(res)
    r0, r1 = results(tmp_path, 2)
    assert r0["params"] == r1["params"] and r0["state"] == r1["state"]  # reduced gradients on both ranks
    assert r0["steps"] == 12.0
    assert r0["diff"] < 1e-5 and r1["diff"] < 1e-5  # vs torch.optim.AdamW on the same DDP model
    assert abs(r0["norms"][0] - r0["norms"][1]) < 1e-6


def test_fsdp2_sharded_state_and_protect_restore_at_another_world_size(tmp_path):
    out, root = tmp_path / "out", tmp_path / "root"
    out.mkdir()
    script = os.path.join(SCRIPTS, "fsdp_offload.py")
    with isolated_shm() as shm:
        res = torchrun(script, "--out", str(out), "--root", str(root), "--phase", "save", shm_base=shm)
        assert res.returncode == 0, failure(res)
        res = torchrun(script, "--out", str(out), "--root", str(root), "--phase", "restore", shm_base=shm, nproc=1)
        assert res.returncode == 0, failure(res)
    for r in results(out, 2):
        assert r["diff"] < 1e-5  # vs torch.optim.AdamW on the same FSDP2 model
        assert abs(r["norms"][0] - r["norms"][1]) < 1e-5  # clip norm reduced over the shards
        assert r["slots"]["exp_avg"] == ["DTensor", "(Shard(dim=0),)"] and "master" not in r["slots"]  # fp32: own master
    saved, restored = load(out / "saved.json"), load(out / "restored.json")
    assert restored["step"] == saved["step"] == 6
    keys = [k for k in saved if k.startswith(("param:", "opt:"))]
    assert len(keys) > 20 and all(restored[k] == saved[k] for k in keys), [k for k in keys if restored[k] != saved[k]]
    assert restored["trained_after"] == 8.0
