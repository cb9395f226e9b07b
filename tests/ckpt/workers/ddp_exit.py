"""The scenario of issue 12: a small DDP job under protect() with every=1 that must exit.

Each rank trains an MLP with AdamW, StepLR and a DistributedSampler loader through
``guard.resume(loader)``, snapshots every step, and leaves ``protect()`` at the end;
the script then meets the other ranks in a final barrier. Optional faults:

* ``--delays SEED:MAX_MS`` - random per-rank sleeps before/after ``guard.step()`` and in
  the copy thread (the keeper's replies are delayed through ``STALWART_KEEPER_FAULTS``);
* ``--lag RANK:MS`` - a straggler: that rank sleeps MS before and after every ``guard.step()``;
* ``--kill-at STEP`` - this run's rank ``--kill-rank`` SIGKILLs itself at that step.

Rank 0 writes ``result.json`` in ``--out``: the step each rank ended at, the newest
committed step on the file tier, and a digest of the final state.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import time

import torch
import torch.distributed as dist
from state_digest import digest  # beside this script
from torch.nn.parallel import DistributedDataParallel as DDP

import stalwart
from stalwart.ckpt import init_distributed


def install_delays(spec: str, rank: int) -> None:
    """Random sleeps around guard.step() and inside the copy thread (test-only monkeypatches)."""
    from stalwart.ckpt import guard as guard_mod
    from stalwart.ckpt import snapshot as snapshot_mod

    seed, max_ms = (int(x) for x in spec.split(":"))
    rnd = random.Random(seed * 1000 + rank)
    lock_free_rnd = random.Random(seed * 7919 + rank)

    def pause(r: random.Random) -> None:
        if r.random() < 0.5:
            time.sleep(r.uniform(0, max_ms) / 1000)

    step = guard_mod.Guard.step

    def delayed_step(self):
        pause(rnd)
        step(self)
        pause(rnd)

    guard_mod.Guard.step = delayed_step
    copy_entry = snapshot_mod.Copier._copy_entry

    def delayed_copy(*args, **kwargs):
        pause(lock_free_rnd)
        return copy_entry(*args, **kwargs)

    snapshot_mod.Copier._copy_entry = staticmethod(delayed_copy)
    copy_small = snapshot_mod.Copier._copy_small

    def delayed_small(*args, **kwargs):
        pause(lock_free_rnd)
        return copy_small(*args, **kwargs)

    snapshot_mod.Copier._copy_small = staticmethod(delayed_small)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--tier-rate", type=float, default=None, help="bytes/s cap of the file tier (a slow tier)")
    ap.add_argument("--delays", default=None)
    ap.add_argument("--lag", default=None)
    ap.add_argument("--kill-at", type=int, default=-1)
    ap.add_argument("--kill-rank", type=int, default=1)
    ap.add_argument("--exit-timeout", type=float, default=None)
    ap.add_argument("--log-losses", action="store_true", help="append each step's loss and input sum per rank")
    args = ap.parse_args()

    init_distributed("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if args.delays:
        install_delays(args.delays, rank)
    lag_rank, lag_ms = (int(x) for x in args.lag.split(":")) if args.lag else (-1, 0)
    torch.manual_seed(0)
    w = args.width
    model = DDP(torch.nn.Sequential(torch.nn.Linear(w, 4 * w), torch.nn.GELU(), torch.nn.Linear(4 * w, w)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(args.steps * world * 4, w, generator=g))
    sampler = torch.utils.data.distributed.DistributedSampler(data, shuffle=True, seed=3)
    loader = torch.utils.data.DataLoader(data, batch_size=4, sampler=sampler)
    tier = {"url": f"file://{os.path.join(args.root, 'disk')}", "keep_last": 2}
    if args.tier_rate:
        tier["max_rate"] = args.tier_rate
    kwargs = {"timeouts": {"persist_s": args.exit_timeout}} if args.exit_timeout else {}
    losses = []
    t_exit = None
    with stalwart.protect(model, opt, root=args.root, every=1, scheduler=sched, tiers=["memory", tier],
                          keeper_linger_s=5, fixed_ddp_buckets=True, **kwargs) as guard:
        for (x,) in guard.resume(loader, epochs=1):
            loss = model(x).pow(2).mean()
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
            if rank == lag_rank:
                time.sleep(lag_ms / 1000)
            guard.step()
            if rank == lag_rank:
                time.sleep(lag_ms / 1000)
            losses.append(loss.item())
            if args.log_losses:
                os.makedirs(args.out, exist_ok=True)
                with open(os.path.join(args.out, f"losses-{rank}.txt"), "a") as f:
                    parts = {k: [v[k] for v in opt.state.values()] for k in ("step", "exp_avg", "exp_avg_sq")}
                    desc = " ".join(f"{k}={sum(float(t.double().sum()) for t in ts)!r}" for k, ts in parts.items())
                    f.write(f"{guard.step_count} {loss.item()!r} {x.sum().item()!r} {digest(model.module, opt)[:12]}"
                            f" lr={opt.param_groups[0]['lr']!r} {desc}\n")
            if guard.step_count == args.kill_at and rank == args.kill_rank and attempt == 0:
                os.kill(os.getpid(), signal.SIGKILL)
        t_exit = time.monotonic()
        stats = guard.stats
    exit_s = time.monotonic() - t_exit
    end = torch.tensor([guard.step_count, guard.last_snapshot_step or -1], dtype=torch.int64)
    ends = [torch.zeros_like(end) for _ in range(world)]
    dist.all_gather(ends, end)
    dist.barrier()
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "result.json"), "w") as f:
            json.dump({"steps": [int(e[0]) for e in ends], "final": [int(e[1]) for e in ends],
                       "exit_s": exit_s, "skipped": stats.skipped, "snapshots": stats.snapshots,
                       "restored_step": stats.restored_step, "attempt": attempt,
                       "digest": digest(model.module, opt), "fallbacks": stats.fallbacks}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
