"""One rank of the erasure-coding overhead benchmark (launched by ``bench/erasure.py``).

Every rank is its own "node" (``STALWART_LOCAL_WORLD_SIZE=1``: one keeper per rank),
trains the GPT of ``bench/async_ckpt.py`` under DDP and, depending on ``--mode``:

* ``none``: no checkpointing (the baseline);
* ``memory``: ``stalwart.protect(every=1, tiers=["memory"])``: a memory snapshot every step;
* ``ec``: the same plus ``redundancy=(k, m)``: every snapshot the keepers get to is
  erasure-coded across the ranks' keepers in the background.

Rank 0 writes ``--out`` (JSON): the per-step wall times of the measured steps (the
slowest rank's, so a straggler counts) and, for ``ec``, its keeper's erasure-coding
status (steps encoded / skipped, last encode time, parity bytes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _gpt import GPT, GPTConfig

import stalwart
from stalwart.ckpt.dist import init_distributed
from stalwart.ckpt.redundancy import ECConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=("none", "memory", "ec"), required=True)
    ap.add_argument("--root", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--ec", default="4,2", help="k,m")  # not --k/--m: torchrun's parser takes those as its own prefixes
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args()

    init_distributed("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    cfg = GPTConfig(d_model=args.d_model, n_layer=args.layers, n_head=args.heads, seq=args.seq)
    model = DistributedDataParallel(GPT(cfg))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    g = torch.Generator().manual_seed(100 + rank)
    batches = [(torch.randint(0, cfg.vocab, (args.batch, cfg.seq), generator=g),
                torch.randint(0, cfg.vocab, (args.batch, cfg.seq), generator=g)) for _ in range(4)]

    if args.mode == "none":
        guard_cm = contextlib.nullcontext(None)
    else:
        k, m = (int(x) for x in args.ec.split(","))
        ec = ECConfig(k, m) if args.mode == "ec" else None
        guard_cm = stalwart.protect(model, opt, root=args.root, every=1, tiers=["memory"], slots=3,
                                    redundancy=ec, resume=False, final_checkpoint=False, keeper_linger_s=5)
    times: list[float] = []
    status: dict | None = None
    with guard_cm as guard:
        t_prev = time.perf_counter()
        for i in range(args.warmup + args.steps):
            x, y = batches[i % len(batches)]
            model(x, y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if guard is not None:
                guard.step()
            now = time.perf_counter()
            if i >= args.warmup:
                times.append(now - t_prev)
            t_prev = now
        if guard is not None and args.mode == "ec":
            status = guard.redundancy_status()
    slowest = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    if rank == 0:
        params = sum(p.numel() for p in model.module.parameters())
        with open(args.out, "w") as f:
            json.dump({"mode": args.mode, "step_s": slowest.tolist(), "params": params, "ec": status}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
