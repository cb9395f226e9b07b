"""FSDP2 (``fully_shard``, DTensor params, CPU/gloo) with OffloadAdamW under stalwart.protect().

    torchrun --nproc-per-node=2 fsdp_offload.py --out O --root R --phase save
    torchrun --nproc-per-node=1 fsdp_offload.py --out O --root R --phase restore

save: trains ``--steps`` steps next to the same FSDP2 model with torch.optim.AdamW (the
largest difference and both clip norms go to result-<rank>.json), under protect(); the
exit checkpoint holds the last step. Writes saved.json: sha1 of every full (gathered)
parameter and optimizer slot. restore: a world of a different size restores it; writes
restored.json with the same digests (taken through the optimizer's own buffers), then
trains two more steps.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import stalwart
from stalwart.ckpt import init_distributed
from stalwart.offload import OffloadAdamW

DIM = 16


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(DIM, 3 * DIM)
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(3 * DIM, 3 * DIM) for _ in range(2)])
        self.out = torch.nn.Linear(3 * DIM, 5)  # 5 rows over 2 ranks: uneven shards

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        for b in self.blocks:
            h = h + torch.tanh(b(h))
        return self.out(h)


def shard(model: torch.nn.Module, mesh) -> torch.nn.Module:
    for b in model.blocks:
        fully_shard(b, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def sha(t: torch.Tensor) -> str:
    t = t.full_tensor() if hasattr(t, "full_tensor") else t
    return hashlib.sha1(t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def digests(model, opt) -> dict[str, str]:
    names = {id(p): n for n, p in model.named_parameters()}
    out = {f"param:{n}": sha(p) for n, p in model.named_parameters()}
    for p, st in opt.state.items():
        for k, v in st.items():
            out[f"opt:{names[id(p)]}:{k}"] = sha(v) if k != "step" else repr(float(v))
    return out


def batch(step: int, rank: int) -> torch.Tensor:
    return torch.randn(8, DIM, generator=torch.Generator().manual_seed(1000 * step + rank))


def train_step(model, opt, x, ours: bool) -> float:
    opt.zero_grad()
    loss = model(x).square().mean()
    loss.backward()
    norm = opt.clip_grad_norm_(0.5) if ours else torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
    opt.step()
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--root", required=True)
    ap.add_argument("--phase", choices=["save", "restore"], required=True)
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    init_distributed("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
    torch.manual_seed(0)
    base = Net()
    model = shard(copy.deepcopy(base), mesh)
    opt = OffloadAdamW(model.parameters(), lr=1e-2, weight_decay=0.1, threads=1, subgroup_size=1024)
    tiers = ["memory", f"file://{args.root}/tier"]
    if args.phase == "save":
        ref = shard(copy.deepcopy(base), mesh)
        ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
        with stalwart.protect(model, opt, root=args.root, every=3, tiers=tiers, keeper_linger_s=0) as guard:
            for step in range(1, args.steps + 1):
                x = batch(step, rank)
                norms = (train_step(model, opt, x, True), train_step(ref, ref_opt, x, False))
                guard.step()
        diff = max((p.to_local() - q.to_local()).abs().max().item() for p, q in zip(model.parameters(), ref.parameters()))
        slots = {k: (type(v).__name__, repr(getattr(v, "placements", None))) for k, v in opt.state[model.inp.weight].items()}
        with open(os.path.join(args.out, f"result-{rank}.json"), "w") as f:
            json.dump({"diff": diff, "norms": norms, "slots": slots}, f)
        state = {**digests(model, opt), "step": args.steps}
        name = "saved.json"
    else:
        with stalwart.protect(model, opt, root=args.root, every=100, tiers=tiers, keeper_linger_s=0,
                              final_checkpoint=False) as guard:
            restored = guard.stats.restored_step
            opt.state_dict()  # state put back by the restore is copied into the host buffers
            state = {**digests(model, opt), "step": restored}
            for step in range(restored + 1, restored + 3):
                train_step(model, opt, batch(step, rank), True)
                guard.step()
        state["trained_after"] = float(opt.state[model.inp.weight]["step"])
        name = "restored.json"
    if rank == 0:
        with open(os.path.join(args.out, name), "w") as f:
            json.dump(state, f, indent=0)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
