"""An FSDP2 (``fully_shard``) training run on CPU/gloo under stalwart.protect().

    torchrun --nproc-per-node=2 fsdp_train.py --out O --root R [--reference REF] [--kill RANK:STEP] [--steps N]

With ``--reference``, the first attempt first trains the same model without stalwart
(the uninterrupted reference) into REF. With ``--kill``, that rank SIGKILLs itself right
after that step of the first attempt. Rank 0 appends "step loss attempt" lines to
losses.txt (later lines win); every rank writes final-<rank>.json with sha1 digests of
its local parameter and optimizer shards and of the full (gathered) tensors.
"""

from __future__ import annotations

import argparse
import faulthandler
import hashlib
import json
import os
import signal

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import stalwart
from stalwart.ckpt import init_distributed

VOCAB, DIM, SEQ = 37, 16, 8


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(DIM, 3 * DIM)  # 48 rows: even shards; fc2's 16x48 too
        self.fc2 = torch.nn.Linear(3 * DIM, DIM)
        self.norm = torch.nn.LayerNorm(DIM)
        self.drop = torch.nn.Dropout(0.1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.drop(self.fc2(torch.relu(self.fc1(self.norm(h)))))


class Net(torch.nn.Module):
    """Tied embedding/head, odd row counts (uneven shards), two FSDP units + the root."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, DIM)
        self.blocks = torch.nn.ModuleList([Block(), Block()])
        self.out = torch.nn.Linear(DIM, 5)  # 5 rows over 2 ranks: 3 + 2
        self.head = torch.nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h) + self.out(h).sum(-1, keepdim=True)


def digest(t: torch.Tensor) -> str:
    t = t.detach().contiguous().reshape(-1)
    return hashlib.sha1(t.view(torch.uint8).numpy().tobytes()).hexdigest()


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def build(mesh):
    torch.manual_seed(1234)
    model = Net()
    for b in model.blocks:
        fully_shard(b, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.7)
    return model, opt, sched


def loader_for(rank: int, world: int):
    g = torch.Generator().manual_seed(7)
    data = torch.utils.data.TensorDataset(torch.randint(0, VOCAB, (256, SEQ + 1), generator=g))
    sampler = torch.utils.data.DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=3)
    return torch.utils.data.DataLoader(data, batch_size=4, sampler=sampler)


def train_step(model, opt, sched, x: torch.Tensor) -> torch.Tensor:
    logits = model(x[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), x[:, 1:].reshape(-1))
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()
    return loss.detach()


def log_loss(out: str, step: int, loss: torch.Tensor, attempt: int) -> None:
    avg = loss.clone()
    dist.all_reduce(avg)
    if dist.get_rank() == 0:
        with open(os.path.join(out, "losses.txt"), "a") as f:
            f.write(f"{step} {avg.item()!r} {attempt}\n")


def dump(out: str, model, opt, info: dict) -> None:
    state: dict = dict(info)
    names = {id(p): n for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        state[f"param:{n}"] = digest(local(p))
        state[f"param-full:{n}"] = digest(full(p))
        state[f"placement:{n}"] = repr(getattr(p, "placements", None))
    for p, st in opt.state.items():
        for k, v in st.items():
            state[f"opt:{names[id(p)]}:{k}"] = digest(local(v)) if isinstance(v, torch.Tensor) else repr(v)
            if hasattr(v, "full_tensor"):
                state[f"opt-full:{names[id(p)]}:{k}"] = digest(full(v))
    state["lr"] = repr(opt.param_groups[0]["lr"])
    with open(os.path.join(out, f"final-{dist.get_rank()}.json"), "w") as f:
        json.dump(state, f, indent=0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default=None)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=14)
    ap.add_argument("--kill", default=None, help="RANK:STEP to SIGKILL in the first attempt")
    ap.add_argument("--reference", default=None, help="first attempt: also train a reference without stalwart into DIR")
    args = ap.parse_args()
    faulthandler.register(signal.SIGUSR1, all_threads=True)

    init_distributed("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    os.makedirs(args.out, exist_ok=True)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
    if args.reference and attempt == 0:  # the uninterrupted run without stalwart, before the protected one
        os.makedirs(args.reference, exist_ok=True)
        model, opt, sched = build(mesh)
        for step, (x,) in enumerate(loader_for(rank, world), start=1):
            if step > args.steps:
                break
            log_loss(args.reference, step, train_step(model, opt, sched, x), attempt)
        dump(args.reference, model, opt, {"attempt": attempt})
        del model, opt, sched

    model, opt, sched = build(mesh)
    loader = loader_for(rank, world)
    info: dict = {"attempt": attempt}
    kill_rank, kill_step = (int(v) for v in args.kill.split(":")) if args.kill else (-1, -1)
    tiers = ["memory", {"url": f"local:{args.root}/local", "every": 5}]
    with stalwart.protect(model, opt, root=args.root, every=1, tiers=tiers, scheduler=sched,
                          keeper_linger_s=30, preempt_deadline_s=4) as guard:
        info["restored_step"] = guard.stats.restored_step
        info["restored_from"] = guard.stats.restored_from
        for (x,) in guard.resume(loader):
            if guard.step_count >= args.steps:
                break
            loss = train_step(model, opt, sched, x)
            guard.step()
            log_loss(args.out, guard.step_count, loss, attempt)
            if attempt == 0 and rank == kill_rank and guard.step_count == kill_step:
                os.kill(os.getpid(), signal.SIGKILL)
    dump(args.out, model, opt, info)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
