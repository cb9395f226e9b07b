"""A single-process CPU run of a bf16 model with OffloadAdamW (fp32 masters) under
stalwart.protect(): LR scheduler, clipping, SIGKILL at a chosen step.

    python protect_offload.py --root R [--kill-at K] [--steps N] [--reference]

Prints one JSON line at the end: the restored step and sha1 digests of every parameter,
optimizer slot (exp_avg, exp_avg_sq, master, step) and the LR. ``--reference`` trains
without stalwart.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal

import torch

import stalwart
from stalwart.offload import OffloadAdamW


def digest(model, opt, sched) -> dict[str, str]:
    out = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        out[f"param:{n}"] = hashlib.sha1(p.detach().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
    for p, st in opt.state.items():
        for k, v in st.items():
            out[f"opt:{names[id(p)]}:{k}"] = hashlib.sha1(v.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
    out["lr"] = repr(sched.get_last_lr())
    return out


def train(root: str, steps: int = 10, kill_at: int = -1, reference: bool = False) -> dict:
    """The run; returns the restored step and the digests."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(48, 160), torch.nn.GELU(), torch.nn.Linear(160, 48)).to(torch.bfloat16)
    opt = OffloadAdamW(model.parameters(), lr=1e-2, weight_decay=0.1, threads=1, subgroup_size=4096)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(8, 48, generator=g).to(torch.bfloat16) for _ in range(steps)]

    def one(x):
        model(x).float().square().mean().backward()
        opt.clip_grad_norm_(0.5)
        opt.step()
        sched.step()
        opt.zero_grad()

    restored = None
    if reference:
        for x in data:
            one(x)
    else:
        with stalwart.protect(model, opt, root=root, every=1, scheduler=sched, keeper_linger_s=20) as guard:
            restored = guard.stats.restored_step
            for x in guard.resume(data):
                one(x)
                guard.step()
                if guard.step_count == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
    return {"restored": restored, **digest(model, opt, sched)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--kill-at", type=int, default=-1)
    ap.add_argument("--reference", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(json.dumps(train(args.root, args.steps, args.kill_at, args.reference)), flush=True)


if __name__ == "__main__":
    main()
