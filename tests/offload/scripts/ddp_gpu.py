"""DDP on one CUDA device with two processes (gloo), OffloadAdamW with the comm hook
(``attach_ddp``: reduced gradients copied to the host as each bucket finishes) and without
(gradients copied at step()). Writes result-<rank>.json with sha1 of both runs' final
weights and state, and how many gradients the comm hook copied.

    torchrun --nproc-per-node=2 ddp_gpu.py --out DIR
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


def sha(model, opt) -> str:
    h = hashlib.sha1()
    for t in [*model.parameters(), *(v for st in opt.state.values() for v in st.values() if v.dim())]:
        h.update(t.detach().reshape(-1).cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    dev = torch.device("cuda", 0)
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(64, 512), torch.nn.GELU(), torch.nn.Linear(512, 64)).to(dev, torch.bfloat16)
    result = {}
    for mode in ("attached", "step_time_copies"):
        model = DDP(copy.deepcopy(base), bucket_cap_mb=0.05)
        opt = OffloadAdamW(model.parameters(), lr=1e-2, subgroup_size=8192, threads=2, placement="cpu")
        hosted = 0
        if mode == "attached":
            opt.attach_ddp(model)
        g = torch.Generator().manual_seed(10 + rank)
        for _ in range(5):
            x = torch.randn(8, 64, generator=g).to(dev, torch.bfloat16)
            model(x).float().square().mean().backward()
            hosted += len(opt._device_path._hosted)
            opt.step()
            opt.zero_grad(set_to_none=True)
        result[mode] = sha(model, opt)
        if mode == "attached":
            result["hosted_by_hook"] = hosted
    with open(os.path.join(args.out, f"result-{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
