"""A single-process training run under stalwart.protect() for engine tests.

Prints one JSON line at the end: {"start": restored step, "step": final step,
"digest": sha1 of all params + optimizer state, "stats": {...}}.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import signal
import time

import psutil
import torch
from state_digest import digest  # beside this script

import stalwart


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--tiers", default=None)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--every", type=int, default=1)
    ap.add_argument("--width", type=int, default=256, help="hidden size; state ~ 3 * 4 * width^2 * 4 bytes")
    ap.add_argument("--sleep", type=float, default=0.0, help="seconds of 'compute' per step")
    ap.add_argument("--stop-at", type=int, default=-1, help="leave the loop after this step (a planned stop)")
    ap.add_argument("--kill-at", type=int, default=-1)
    ap.add_argument("--term-at", type=int, default=-1)
    ap.add_argument("--slots", type=int, default=2)
    ap.add_argument("--max-host-memory", type=int, default=None)
    ap.add_argument("--linger", type=float, default=5.0)
    ap.add_argument("--deadline", type=float, default=20.0)
    args = ap.parse_args()

    torch.manual_seed(0)
    w = args.width
    model = torch.nn.Sequential(torch.nn.Linear(w, 4 * w), torch.nn.GELU(), torch.nn.Linear(4 * w, w))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tiers = json.loads(args.tiers) if args.tiers else None
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(8, w, generator=g) for _ in range(args.steps)]
    with stalwart.protect(model, opt, root=args.root, every=args.every, tiers=tiers, slots=args.slots,
                          max_host_memory=args.max_host_memory, keeper_linger_s=args.linger,
                          preempt_deadline_s=args.deadline) as guard:
        start = guard.step_count
        rss0 = psutil.Process().memory_info().rss
        for x in guard.resume(data):
            model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            if args.sleep:
                time.sleep(args.sleep)
            guard.step()
            if guard.step_count == args.stop_at:
                break
            if guard.step_count == args.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if guard.step_count == args.term_at:
                os.kill(os.getpid(), signal.SIGTERM)
        shm_bytes = sum(os.path.getsize(f) for f in glob.glob(os.path.join(guard.client.shm_dir, "slot-*", "rank-*")))
        stats = {"shm_bytes": shm_bytes, "rss_growth": psutil.Process().memory_info().rss - rss0,
                 "snapshots": guard.stats.snapshots, "skipped": guard.stats.skipped, "pool_bytes": guard.stats.pool_bytes,
                 "restored_from": guard.stats.restored_from, "fallbacks": guard.stats.fallbacks,
                 "blocking_s": guard.stats.blocking_s, "shm": guard.client.shm_dir}
        print(json.dumps({"start": start, "step": guard.step_count, "digest": digest(model, opt), "stats": stats}), flush=True)


if __name__ == "__main__":
    main()
