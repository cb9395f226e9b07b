"""DCP through stalwart's StorageWriter / StorageReader, 2 ranks under torchrun (gloo).

    torchrun --nproc-per-node=2 dcp_worker.py --dir D --zero3 Z3 --zero2 Z2 --out O

* saves DTensors (``Shard(0)`` of a 5x6 fp32 and a 7-element bf16, a ``Replicate``), a
  plain 0-d int64 tensor and non-tensor values with ``dcp.save(..., storage_writer=
  StorageWriter(D))``;
* loads them back as ``Shard(1)``, as ``Replicate`` and into plain tensors, and loads
  the single-process checkpoints Z3 (ZeRO-3 layout) and Z2 (ZeRO-1/2 flat groups with
  alignment paddings) written by ``stalwart.formats.save`` into ``Shard(0)`` / ``Shard(1)``
  DTensors through ``StorageReader``;
* flips one byte of a data file and checks that ``dcp.load`` refuses it.

Each rank writes O/rank-<r>.json: {check: true/false or a message}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

import stalwart
import stalwart.formats
from stalwart.ckpt import StorageReader, StorageWriter, init_distributed


def source() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return {
        "a": torch.randn(5, 6, generator=g),
        "b": torch.arange(7, dtype=torch.float32).mul(1.37).to(torch.bfloat16),
        "r": torch.randn(3, 4, generator=g),
        "c": torch.tensor(41, dtype=torch.int64),
    }


def same(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Bitwise: dtype, shape and every byte."""
    x, y = x.detach().contiguous(), y.detach().contiguous()
    return x.dtype == y.dtype and x.shape == y.shape and bytes(x.reshape(-1).view(torch.uint8).numpy()) == bytes(
        y.reshape(-1).view(torch.uint8).numpy())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--zero3", required=True)
    ap.add_argument("--zero2", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    init_distributed("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("dp",))
    src = source()
    res: dict = {}

    def dt(t: torch.Tensor, placement) -> torch.Tensor:
        return distribute_tensor(t.clone(), mesh, [placement])

    sd = {
        "model": {"a": dt(src["a"], Shard(0)), "b": dt(src["b"], Shard(0)), "r": dt(src["r"], Replicate())},
        "c": src["c"].clone(),
        "extra": {"step": 7, "name": "run-3", "ratios": [0.5, 0.25]},
    }
    dcp.save(sd, storage_writer=StorageWriter(args.dir))
    dist.barrier()
    if rank == 0:
        report = stalwart.formats.verify(args.dir)
        res["verify"] = report.ok or report.problems
        with stalwart.formats.open(args.dir) as ckpt:
            kinds = {n: t.placement.kind for n, t in ckpt.tensors.items()}
            res["placements"] = kinds
            flat = stalwart.formats.load(args.dir)
            res["native_load"] = all(same(flat[f"model.{k}"], src[k]) for k in ("a", "b", "r")) and same(flat["c"], src["c"])
        res["files"] = sorted(os.listdir(args.dir))

    # reshard: Shard(0) saved -> Shard(1) / Replicate / plain tensors
    for tag, placement in (("shard1", Shard(1)), ("replicate", Replicate())):
        want = {k: placement if src[k].dim() > 1 or isinstance(placement, Replicate) else Shard(0) for k in ("a", "b", "r")}
        tgt = {
            "model": {k: dt(torch.zeros_like(src[k]), want[k]) for k in ("a", "b", "r")},
            "c": torch.zeros((), dtype=torch.int64),
            "extra": {"step": 0, "name": "", "ratios": [0.0, 0.0]},
        }
        dcp.load(tgt, storage_reader=StorageReader(args.dir))
        ok = all(same(tgt["model"][k].full_tensor(), src[k]) for k in ("a", "b", "r"))
        ok = ok and all(tgt["model"][k].placements == (want[k],) for k in ("a", "b", "r"))
        res[f"load_{tag}"] = ok and same(tgt["c"], src["c"]) and tgt["extra"] == sd["extra"]
    plain = {"model": {k: torch.zeros_like(src[k]) for k in ("a", "b", "r")}}
    dcp.load(plain, storage_reader=StorageReader(args.dir))
    res["load_plain"] = all(same(plain["model"][k], src[k]) for k in ("a", "b", "r"))

    # native checkpoints written with ZeRO layouts, loaded through DCP
    for tag, path in (("zero3", args.zero3), ("zero2", args.zero2)):
        with stalwart.formats.open(path) as ckpt:
            names = list(ckpt.tensors)
            kinds = sorted({t.placement.kind for t in ckpt.tensors.values()})
            truth = {n: ckpt.read(n) for n in names}
        for ptag, placement in (("s0", Shard(0)), ("s1", Shard(1))):
            tgt = {n: (dt(torch.zeros_like(t), placement) if t.dim() >= 2 or ptag == "s0" else torch.zeros_like(t))
                   for n, t in truth.items()}
            dcp.load(tgt, storage_reader=StorageReader(path))
            full = {n: (t.full_tensor() if hasattr(t, "full_tensor") else t) for n, t in tgt.items()}
            res[f"{tag}_{ptag}"] = all(same(full[n], truth[n]) for n in names) and kinds == [f"zero_{'param' if tag == 'zero3' else 'flat'}"]

    # a flipped byte must be refused (CheckpointException derives from BaseException)
    bad = args.dir + "-bad"
    if rank == 0:
        shutil.copytree(args.dir, bad)
        with stalwart.formats.open(bad) as ckpt:  # one byte inside rank 1's piece of model.a
            _, header = ckpt._open_rank(1)
            at = header.data_start + header.entries["model.a"].begin + 5
        with open(os.path.join(bad, "rank-00001.safetensors"), "r+b") as f:
            f.seek(at)
            byte = f.read(1)
            f.seek(at)
            f.write(bytes([byte[0] ^ 0x40]))
    dist.barrier()
    tgt = {"model": {k: dt(torch.zeros_like(src[k]), Shard(0)) for k in ("a", "b", "r")}}
    try:
        dcp.load(tgt, storage_reader=StorageReader(bad))
        res["corrupt_refused"] = False
    except BaseException as e:
        res["corrupt_refused"] = "checksum" in repr(e).lower() or type(e).__name__
    with open(os.path.join(args.out, f"rank-{rank}.json"), "w") as f:
        json.dump(res, f, default=str)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
