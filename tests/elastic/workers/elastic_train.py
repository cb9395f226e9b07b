"""An elastic training job for the launcher tests: the same training at any world size.

Run under ``torchrun --rdzv-backend=stalwart`` (one process per simulated node). Each
rank appends one JSON line per global step to ``OUT/log-<pid>.jsonl``: the samples it
processed, their per-sample random draws and its share of the step's loss; rank 0 also
writes the global loss and keeps ``OUT/progress`` (the last step done) for the test to
time its faults. Every process records where its node's agent and keeper are
(``OUT/node-<slot>.json``) so the test can kill a whole node, and what its restore read
(``OUT/restore-<pid>.json``). At the end rank 0 writes the final weights.

``--framework ddp`` (DDP, fixed bucket layout), ``fsdp2`` (fully_shard) or ``deepspeed``
(a ZeRO-2 engine whose gradient accumulation is the loader's).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time

import torch
import torch.distributed as dist

import stalwart
from stalwart.ckpt import init_distributed
from stalwart.elastic import ElasticLoader, history, sample_generator


class Tick(torch.nn.Module):
    """A slice of a slow forward (no parameters): a module call between two sleeps."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds = 0.0

    def forward(self, x):
        if self.seconds:
            time.sleep(self.seconds)
        return x


class Net(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(width, 4 * width), torch.nn.GELU(), torch.nn.Dropout(0.1),
                                        torch.nn.Linear(4 * width, width))
        self.pause = torch.nn.Sequential(*[Tick() for _ in range(50)])  # --slow-forward: a long forward pass

    def slow(self, seconds: float) -> None:
        for t in self.pause:
            t.seconds = seconds / len(self.pause)

    def forward(self, x):
        return self.body(self.pause(x))


class Noisy(torch.utils.data.Dataset):
    """Inputs plus per-sample noise from the sample's own stream (an augmentation)."""

    def __init__(self, n: int, width: int, seed: int) -> None:
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(n, width, generator=g)
        self.y = torch.randn(n, width, generator=g)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        noise = torch.randn(1, generator=sample_generator(self.seed, self.epoch, i))
        return self.x[i] + 0.01 * noise, self.y[i], noise, i


FAILED: set[int] = set()  # steps this process already failed once (--fail-every)
SLOWED: set[int] = set()  # steps whose forward this process already ran slowly (--slow-step)


def resources() -> dict:
    """What must stay bounded over many in-process recoveries."""
    import threading

    import psutil

    shm = os.environ.get("STALWART_SHM_BASE", "/dev/shm")
    return {"threads": threading.active_count(), "fds": len(os.listdir("/proc/self/fd")),
            "rss": psutil.Process().memory_info().rss, "shm": len(os.listdir(shm)) if os.path.isdir(shm) else 0}


def atomic_json(path: str, obj) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f)
    os.replace(path + ".tmp", path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--framework", default="ddp", choices=["ddp", "fsdp2", "deepspeed"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--global-batch", type=int, default=12)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--step-sleep", type=float, default=0.0, help="seconds per step (lets the test time its faults)")
    ap.add_argument("--redundancy", default="3,1")
    ap.add_argument("--disk-every", type=int, default=1000, help="steps between snapshots on the disk tier")
    ap.add_argument("--hang-timeout", type=float, default=None)
    ap.add_argument("--fail-at-step", type=int, default=0, help="raise ValueError when starting this step (a user bug)")
    ap.add_argument("--fail-rank", type=int, default=0)
    ap.add_argument("--fail-every", type=int, default=0,
                    help="raise once at every multiple of this step (a transient error: in-process recovery over and over)")
    ap.add_argument("--max-attempts", type=int, default=3)
    ap.add_argument("--slow-step", type=int, default=0,
                    help="the first forward of this step takes --slow-forward seconds (once per process)")
    ap.add_argument("--slow-forward", type=float, default=0.0)
    ap.add_argument("--in-process", action="store_true", help="stalwart.elastic.run: survivors keep their processes")
    args = ap.parse_args()
    if not args.in_process:
        init_distributed("gloo")
        train(args)
        return
    from stalwart.elastic.inprocess import run

    kept = None
    if args.framework == "ddp":  # built once per process, kept across in-process recoveries
        torch.manual_seed(0)
        net = Net(args.width)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.01)
        kept = (net, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5))
    run(train, args, kept, hang_timeout_s=args.hang_timeout, max_attempts=args.max_attempts)


def train(args, kept=None) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    net = Net(args.width) if kept is None else kept[0]
    seed = 7
    data = Noisy(args.steps * args.global_batch, args.width, seed)
    loader = ElasticLoader(data, args.global_batch, args.micro_batch, dp_rank=rank, dp_size=world, seed=seed, epochs=1)
    engine = None
    if args.framework == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(net)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01) if kept is None else kept[1]
    elif args.framework == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in net.body:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        model = fully_shard(net)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    else:
        import deepspeed

        config = {"train_micro_batch_size_per_gpu": args.micro_batch, "gradient_accumulation_steps": loader.accumulation,
                  "train_batch_size": args.global_batch, "zero_optimization": {"stage": 2}, "gradient_clipping": 1.0,
                  "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01, "torch_adam": True}}}
        engine, opt, _, _ = deepspeed.initialize(model=net, config=config, model_parameters=net.parameters())
        model = engine
    sched = (torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5) if kept is None else kept[2]) if engine is None else None
    k, m = (int(x) for x in args.redundancy.split(","))
    slot = int(os.environ.get("STALWART_KEEPER_SLOT", rank))
    # a re-formed group without a restart (in-process recovery) counts as a newer round
    rdzv_round = int(os.environ.get("STALWART_RDZV_ROUND", 0)) * 1000 + int(os.environ.get("STALWART_INPROC_EPOCH", 0))
    log_path = os.path.join(args.out, f"log-{os.getpid()}.jsonl")
    t0 = time.monotonic()
    with stalwart.protect(model if engine is None else engine, None if engine is not None else opt, root=args.root,
                          every=1, scheduler=sched, redundancy=(k, m), slots=3, fixed_ddp_buckets=args.framework == "ddp",
                          tiers=["memory", {"url": f"file://{os.path.join(args.root, 'disk')}", "every": args.disk_every}]) as guard:
        atomic_json(os.path.join(args.out, f"node-{slot}.json"), {"agent_pid": int(os.environ.get("STALWART_AGENT_PID", 0)),
                                                                  "keeper_pid": guard.client.keeper_pid(), "pid": os.getpid()})
        atomic_json(os.path.join(args.out, f"restore-{os.getpid()}-{os.environ.get('STALWART_INPROC_EPOCH', 0)}.json"), {
            "rank": rank, "world": world, "round": rdzv_round, "step": guard.step_count, "restored_from": guard.stats.restored_from,
            "sources": guard.stats.restore_sources, "fallbacks": guard.stats.fallbacks, "enter_s": time.monotonic() - t0,
            "pid": os.getpid(), "epoch": int(os.environ.get("STALWART_INPROC_EPOCH", 0)), **resources(),
            "recoveries": [{"why": r.why, "lost": list(r.lost), "epoch": r.epoch} for r in history()]})
        samples, draws, local_loss = [], [], 0.0
        for mb in guard.resume(loader):
            if not samples and guard.step_count + 1 == args.fail_at_step and rank == args.fail_rank:
                raise ValueError(f"injected failure at step {args.fail_at_step}")
            nxt = guard.step_count + 1
            if (not samples and args.fail_every and nxt % args.fail_every == 0 and rank == args.fail_rank
                    and nxt not in FAILED):
                FAILED.add(nxt)
                raise ValueError(f"injected transient failure at step {nxt}")
            x, y, noise, idx = mb.data
            slow = not samples and nxt == args.slow_step and nxt not in SLOWED
            if slow:
                SLOWED.add(nxt)
                net.slow(args.slow_forward)
            sync = contextlib.nullcontext() if (mb.last or args.framework != "ddp") else model.no_sync()
            with sync, mb.rng():
                try:
                    out = model(x)
                finally:
                    net.slow(0.0)
                loss = torch.nn.functional.mse_loss(out, y)
                if engine is not None:
                    engine.backward(loss)
                else:
                    (loss * mb.loss_scale).backward()
            samples += idx.tolist()
            draws += noise.reshape(-1).tolist()
            local_loss += loss.item() * mb.loss_scale
            if engine is not None:
                engine.step()
            if not mb.last:
                continue
            if engine is None:
                opt.step()
                sched.step()
                opt.zero_grad()
            # logged before guard.step(): a SIGTERM (the agents restart the workers) ends the loop there
            total = torch.tensor([local_loss], dtype=torch.float64)
            dist.all_reduce(total)
            with open(log_path, "a") as f:
                f.write(json.dumps({"step": guard.step_count + 1, "round": rdzv_round, "rank": rank, "world": world,
                                    "pid": os.getpid(), "t": time.time(),
                                    "samples": samples,
                                    "draws": draws, "loss": total.item() / world}) + "\n")
            samples, draws, local_loss = [], [], 0.0
            guard.step()
            if rank == 0:
                atomic_json(os.path.join(args.out, "progress"), {"step": guard.step_count, "world": world})
            if args.step_sleep:
                time.sleep(args.step_sleep)
        if args.framework == "fsdp2":
            state = {n: p.full_tensor() for n, p in model.named_parameters()}
        else:
            state = {n: p.detach().clone() for n, p in (engine.module if engine is not None else model.module).named_parameters()}
        if rank == 0:
            from safetensors.torch import save_file

            save_file({n: t.contiguous() for n, t in state.items()}, os.path.join(args.out, "final.safetensors"))
            atomic_json(os.path.join(args.out, "done"), {"step": guard.step_count, "world": world})
    dist.barrier()
    if not args.in_process:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
