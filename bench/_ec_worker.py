"""One rank of the erasure-coding overhead benchmark (launched by ``bench/erasure.py``).

Every rank is its own "node" (``STALWART_LOCAL_WORLD_SIZE=1``: one keeper per rank)
and, depending on ``--mode``:

* ``none``: no checkpointing (the baseline);
* ``memory``: ``stalwart.protect(every=1, tiers=["memory"])``: a memory snapshot every step;
* ``ec``: the same plus ``redundancy=(k, m)``: every snapshot the keepers get to is
  erasure-coded across the ranks' keepers in the background.

Two layouts (``--layout``):

* ``node``: rank 0 is the measured node. It trains the GPT of ``bench/async_ckpt.py``
  alone, its training thread pinned to CPU 0; everything else on the node (its
  snapshot copy thread, its keeper with the coding threads) and the other ``k + m - 1``
  nodes run on CPU 1. Those stand-in nodes train a tiny GPT and snapshot every step
  too, so the group codes rank 0's full snapshot; every rank meets the others once per
  step (a barrier, as data-parallel training does). CPU 1 plays the part of a node's
  spare cores and copy engine, so rank 0's step time shows what checkpointing costs
  the training step itself: the blocking part, memory-bandwidth and cache contention.
* ``shared``: every rank trains the same GPT under DDP and all processes share every
  core; the slowest rank's step counts.

Rank 0 writes ``--out`` (JSON): the per-step wall times of the measured steps, where
rank 0's steps went (compute, optimizer, guard.step, barrier) and, for ``ec``, every
keeper's erasure-coding status (steps encoded / skipped, last encode time and CPU,
parity bytes, codec).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _gpt import GPT, GPTConfig

import stalwart
from stalwart.ckpt.dist import init_distributed
from stalwart.ckpt.redundancy import ECConfig

TRAIN_CPU, SPARE_CPU = 0, 1


def pin_threads(main_cpu: int, other_cpu: int) -> None:
    """Pin this process's calling thread to ``main_cpu`` and every other thread to ``other_cpu``
    (threads and processes started later inherit their creator's CPU)."""
    me = threading.get_native_id()
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that just ended
            os.sched_setaffinity(int(tid), {main_cpu if int(tid) == me else other_cpu})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=("none", "memory", "ec"), required=True)
    ap.add_argument("--layout", choices=("node", "shared"), default="node")
    ap.add_argument("--root", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--ec", default="4,2", help="k,m")  # not --k/--m: torchrun's parser takes those as its own prefixes
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args()

    node_layout = args.layout == "node"
    if node_layout:
        # the keeper (spawned by protect) and the copy thread inherit CPU 1 from here
        os.sched_setaffinity(0, {SPARE_CPU})
    init_distributed("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    measured = rank == 0 or not node_layout
    if measured:
        cfg = GPTConfig(d_model=args.d_model, n_layer=args.layers, n_head=args.heads, seq=args.seq)
    else:
        cfg = GPTConfig(vocab=1024, d_model=64, n_layer=1, n_head=2, seq=args.seq)
    model = GPT(cfg) if node_layout else DistributedDataParallel(GPT(cfg))
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
    phases: dict[str, list[float]] = {"compute": [], "optimizer": [], "guard": [], "barrier": []}
    status: dict | None = None
    with guard_cm as guard:
        t_prev = time.perf_counter()
        for i in range(args.warmup + args.steps):
            x, y = batches[i % len(batches)]
            model(x, y).backward()
            t1 = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            t2 = time.perf_counter()
            if guard is not None:
                guard.step()
            t3 = time.perf_counter()
            if node_layout:
                dist.barrier()
                if i == 0:  # every thread exists now (gloo's, the copy thread)
                    pin_threads(TRAIN_CPU if rank == 0 else SPARE_CPU, SPARE_CPU)
            now = time.perf_counter()
            if i >= args.warmup:
                times.append(now - t_prev)
                for name, dt in zip(phases, (t1 - t_prev, t2 - t1, t3 - t2, now - t3)):
                    phases[name].append(dt)
            t_prev = now
        if guard is not None and args.mode == "ec":
            status = guard.redundancy_status()
    if status is not None:  # every keeper's coding, for rank 0 to report
        with open(f"{args.out}.ec{rank}", "w") as f:
            json.dump(status, f)
    dist.barrier()
    step_s = torch.tensor(times, dtype=torch.float64)
    if not node_layout:  # DDP: the slowest rank's step
        dist.all_reduce(step_s, op=dist.ReduceOp.MAX)
    if rank == 0:
        params = sum(p.numel() for p in model.parameters())
        state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        state += sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                     if isinstance(v, torch.Tensor))
        keepers = []
        for r in range(dist.get_world_size()):
            with contextlib.suppress(FileNotFoundError), open(f"{args.out}.ec{r}") as f:
                keepers.append(json.load(f))
        with open(args.out, "w") as f:
            json.dump({"mode": args.mode, "layout": args.layout, "step_s": step_s.tolist(), "params": params,
                       "state_bytes": state, "phases_s": phases, "ec": status,
                       "ec_keepers": keepers}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
