"""Data-parallel training with one rank per "node" under ``stalwart.protect(redundancy=(k, m))``.

Gradients are averaged with one ``all_reduce`` per parameter rather than by DDP: DDP
rebuilds its gradient buckets after its first iteration, so a restarted DDP job sums
the ranks' gradients in a different order at its first step; with more than two ranks
floating-point addition order shows, and a resumed run would not be bitwise equal to
an uninterrupted one (a property of DDP, not of the restore).

Launched by torchrun with ``STALWART_LOCAL_WORLD_SIZE=1`` (every rank is its own node
with its own keeper and shared-memory directory: intra-node mode) and
``STALWART_KEEPER_GROUP``. Writes into ``--out``:

* ``pid-rank<r>``: this trainer's pid;
* ``rank<r>.log``: ``step digest`` after every step (sha1 of params + optimizer state);
* ``restored-rank<r>.json``: right after entering ``protect()``: the restored step, the
  digest of the restored state and the guard's stats (restore source, fallbacks, the
  keeper's erasure-coding status);
* ``progress.json`` (rank 0): the last step and the newest EC-protected step;
* ``result-rank<r>.json`` at a normal end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import torch
import torch.distributed as dist
from state_digest import digest  # beside this script

import stalwart
from stalwart.ckpt.dist import init_distributed
from stalwart.ckpt.redundancy import ECConfig


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiers", required=True)
    ap.add_argument("--ec", default="4,2")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--slots", type=int, default=3)
    ap.add_argument("--linger", type=float, default=60.0)
    ap.add_argument("--rebuild-wait", type=float, default=120.0)
    ap.add_argument("--max-parity-memory", type=int, default=None)
    ap.add_argument("--no-shared", action="store_true", help="code over gloo even when all nodes share this machine")
    args = ap.parse_args()

    init_distributed("gloo")
    rank = dist.get_rank()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"pid-rank{rank}"), "w") as f:
        f.write(str(os.getpid()))
    torch.manual_seed(0)
    w = args.width
    model = torch.nn.Sequential(torch.nn.Linear(w, 2 * w), torch.nn.GELU(), torch.nn.Linear(2 * w, w))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    world = dist.get_world_size()
    g = torch.Generator().manual_seed(100 + rank)
    data = [torch.randn(4, w, generator=g) for _ in range(args.steps)]
    k, m = (int(x) for x in args.ec.split(","))
    ec = ECConfig(k, m, args.max_parity_memory, chunk=64 * 1024, rebuild_wait_s=args.rebuild_wait, shared=not args.no_shared)
    with open(os.path.join(args.out, f"rank{rank}.log"), "a") as log, stalwart.protect(
        model, opt, root=args.root, every=1, tiers=json.loads(args.tiers), slots=args.slots, keeper_linger_s=args.linger,
        redundancy=ec,
    ) as guard:
        start = guard.step_count
        write_json(os.path.join(args.out, f"restored-rank{rank}.json"),
                   {"start": start, "digest": digest(model, opt), "stats": dataclasses.asdict(guard.stats),
                    "shm": guard.client.shm_dir})
        for x in guard.resume(data):
            model(x).pow(2).mean().backward()
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad.div_(world)
            opt.step()
            opt.zero_grad()
            if args.sleep:
                time.sleep(args.sleep)
            guard.step()
            log.write(f"{guard.step_count} {digest(model, opt)}\n")
            log.flush()
            if rank == 0:
                ec_status = guard.redundancy_status() or {}
                protected = ec_status.get("protected") or [None]
                write_json(os.path.join(args.out, "progress.json"), {"step": guard.step_count, "protected": protected[-1],
                                                                     "generation": ec_status.get("generation"),
                                                                     "mode": ec_status.get("mode")})
        result = {"start": start, "step": guard.step_count, "digest": digest(model, opt)}
    result["stats"] = dataclasses.asdict(guard.stats)
    write_json(os.path.join(args.out, f"result-rank{rank}.json"), result)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
