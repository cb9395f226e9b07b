"""DDP (gloo, CPU) with OffloadAdamW next to the same DDP model with torch.optim.AdamW.

    torchrun --nproc-per-node=2 ddp_offload.py --out DIR [--steps N]

Each rank writes result-<rank>.json: sha1 of its final parameters and optimizer state
(replicas must agree bitwise), the largest difference to the torch.optim.AdamW run, and the
two clip norms of the last step.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from stalwart.offload import OffloadAdamW


def sha(tensors) -> str:
    h = hashlib.sha1()
    for t in tensors:
        h.update(t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=12)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    base = torch.nn.Sequential(torch.nn.Linear(24, 96), torch.nn.GELU(), torch.nn.Linear(96, 24))
    ours, ref = DDP(base), DDP(copy.deepcopy(base))
    opt = OffloadAdamW(ours.parameters(), lr=1e-2, weight_decay=0.1, threads=1, subgroup_size=2048)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own data: gradients differ before reduction
    norms = None
    for _ in range(args.steps):
        x = torch.randn(16, 24, generator=g)
        for model, o in ((ours, opt), (ref, ref_opt)):
            o.zero_grad()
            model(x).square().mean().backward()
        norms = (opt.clip_grad_norm_(0.5).item(), torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5).item())
        opt.step()
        ref_opt.step()
    diff = max((p - q).abs().max().item() for p, q in zip(ours.parameters(), ref.parameters()))
    state = [v for st in opt.state.values() for v in st.values()]
    result = {"params": sha(ours.parameters()), "state": sha(state), "diff": diff, "norms": norms,
              "steps": opt.state[next(ours.parameters())]["step"].item()}
    with open(os.path.join(args.out, f"result-{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
