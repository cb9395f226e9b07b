"""An elastic training job: the same training at any number of nodes. Copy this loop.

    # every node (here: two terminals on one machine, one rank each)
    stalwart store --port 29400 &                      # optional: a store no node's loss can take down
    stalwart run --nnodes=1:2 --nproc-per-node=1 --rdzv-endpoint=127.0.0.1:29400 \\
        examples/train_elastic.py --root runs/elastic --steps 200

Kill one node (its `stalwart run`, with `kill -9` on the process group) in mid-training:
the other continues from memory at the smaller world size, with the same global batch,
the same samples per step and the same per-sample randomness - in the same process
(in-process recovery, ``stalwart.elastic.run``), keeping the model and optimizer it
holds; start the node again and the job grows back (the workers restart once). Nothing
in this script depends on the world size, and under plain ``torchrun`` it runs
unchanged with restart-based recovery.

What it shows:

* ``stalwart.elastic.run(train, ...)`` - the training function is called again after a
  failure; the model, optimizer and data set built outside it are kept, the DDP wrapper,
  the loader's iteration and ``protect()`` are built again on the re-formed group;

* ``ElasticLoader`` - a map-style dataset served as this rank's micro-batches of a fixed
  global batch; the accumulation follows the data-parallel degree, ``mb.loss_scale``
  keeps the gradient's scale, ``mb.last`` says when to step the optimizer;
* ``mb.rng()`` - dropout draws from the micro-batch's own stream, so it does not depend
  on which rank runs it; ``sample_generator`` gives each sample its own augmentation noise;
* ``protect(..., redundancy=...)`` - every step's state in host memory, erasure-coded
  across the nodes when there are enough of them (``--redundancy k,m``);
* ``fixed_ddp_buckets=True`` - bitwise-equal results when a lost node is replaced.
"""

from __future__ import annotations

import argparse
import contextlib

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import stalwart
import stalwart.elastic
from stalwart.elastic import ElasticLoader, sample_generator


class Regression(torch.utils.data.Dataset):
    """A synthetic regression task; each sample is augmented with noise from its own stream."""

    def __init__(self, n: int, width: int, seed: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, width, generator=g)
        self.w = torch.randn(width, width, generator=g) / width**0.5
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:  # called by the loader before each epoch
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        noise = torch.randn(self.x.shape[1], generator=sample_generator(self.seed, self.epoch, i))
        x = self.x[i] + 0.05 * noise
        return x, torch.tanh(x @ self.w)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, help="checkpoint root (tiers under it)")
    ap.add_argument("--steps", type=int, default=200, help="global steps (the job ends after them)")
    ap.add_argument("--global-batch", type=int, default=48)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--redundancy", default=None, help="k,m: erasure-code memory snapshots across the nodes")
    ap.add_argument("--width", type=int, default=256)
    args = ap.parse_args()

    # built once per process: in-process recovery keeps them (protect() restores their state)
    torch.manual_seed(0)  # the same initial weights (and RNG state) on every rank
    net = torch.nn.Sequential(torch.nn.Linear(args.width, 4 * args.width), torch.nn.GELU(), torch.nn.Dropout(0.1),
                              torch.nn.Linear(4 * args.width, args.width))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    data = Regression(args.steps * args.global_batch, args.width, seed=1)
    # creates the process group (gloo), calls train(); under stalwart's rendezvous, again after a failure
    stalwart.elastic.run(train, args, net, opt, sched, data)


def train(args, net, opt, sched, data) -> None:
    """One attempt: everything that depends on the group is built here."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model = DDP(net)
    loader = ElasticLoader(data, args.global_batch, args.micro_batch, dp_rank=rank, dp_size=world, seed=1, epochs=1)
    redundancy = tuple(int(x) for x in args.redundancy.split(",")) if args.redundancy else None

    with stalwart.protect(model, opt, root=args.root, every=1, scheduler=sched, redundancy=redundancy,
                          fixed_ddp_buckets=True,
                          tiers=["memory", {"url": f"file://{args.root}/disk", "every": 50}]) as guard:
        if rank == 0:
            print(f"world size {world}: starting at step {guard.step_count}"
                  f" (restored from {guard.stats.restored_from or 'nothing'}; {loader.accumulation} micro-batches"
                  f" of {args.micro_batch} per rank per step)", flush=True)
        for mb in guard.resume(loader):
            x, y = mb.data
            # all but the step's last micro-batch accumulate locally; the last one reduces gradients
            with contextlib.nullcontext() if mb.last else model.no_sync(), mb.rng():
                loss = torch.nn.functional.mse_loss(model(x), y)
                (loss * mb.loss_scale).backward()
            if not mb.last:
                continue
            opt.step()
            sched.step()
            opt.zero_grad()
            guard.step()
            if rank == 0 and guard.step_count % 20 == 0:
                print(f"step {guard.step_count}  world {world}  loss {loss.item():.4f}", flush=True)
        if rank == 0:
            print(f"done: {guard.step_count} steps, world size {world}", flush=True)


if __name__ == "__main__":
    main()
