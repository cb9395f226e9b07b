"""A DDP training run under stalwart.protect(), launched by torchrun in tests.

    torchrun --nproc-per-node=2 ddp_train.py --root R --out O [--kill RANK:STEP] [--steps N]

Rank 0 appends "step loss" lines to O/losses.txt (a restarted attempt appends
again, later lines win) and, at the end, writes O/final.json with sha1 digests of
every parameter and optimizer-state tensor.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import stalwart
from stalwart.ckpt import init_distributed


class TinyGPT(torch.nn.Module):
    def __init__(self, vocab=64, dim=32, heads=4, layers=2, seq=16):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.pos = torch.nn.Parameter(torch.zeros(seq, dim))
        block = torch.nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.1, batch_first=True)
        self.blocks = torch.nn.TransformerEncoder(block, layers)
        self.norm = torch.nn.LayerNorm(dim)
        self.head = torch.nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight  # tied

    def forward(self, x):
        h = self.emb(x) + self.pos[: x.shape[1]]
        return self.head(self.norm(self.blocks(h)))


def digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--kill", default=None, help="RANK:STEP to SIGKILL in the first attempt")
    ap.add_argument("--every", type=int, default=1)
    ap.add_argument("--tiers", default=None, help="JSON list of tiers")
    args = ap.parse_args()

    init_distributed("gloo")
    rank = dist.get_rank()
    torch.manual_seed(1234)
    model = DDP(TinyGPT())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.9)
    g = torch.Generator().manual_seed(7)
    data = torch.utils.data.TensorDataset(torch.randint(0, 64, (512, 16), generator=g))
    sampler = torch.utils.data.DistributedSampler(data, shuffle=True, seed=3)
    loader = torch.utils.data.DataLoader(data, batch_size=8, sampler=sampler)
    tiers = json.loads(args.tiers) if args.tiers else ["memory", {"url": f"local:{args.root}/local", "every": 4}]
    kill_rank, kill_step = (int(x) for x in args.kill.split(":")) if args.kill else (-1, -1)
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    os.makedirs(args.out, exist_ok=True)
    with stalwart.protect(model, opt, root=args.root, every=args.every, tiers=tiers, scheduler=sched,
                          keeper_linger_s=20, preempt_deadline_s=4) as guard:
        for (x,) in guard.resume(loader, epochs=100):
            if guard.step_count >= args.steps:
                break
            logits = model(x[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), x[:, 1:].reshape(-1))
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
            guard.step()
            avg = loss.detach().clone()
            dist.all_reduce(avg)
            if rank == 0:
                with open(os.path.join(args.out, "losses.txt"), "a") as f:
                    f.write(f"{guard.step_count} {avg.item()!r} {attempt}\n")
            if attempt == 0 and rank == kill_rank and guard.step_count == kill_step:
                os.kill(os.getpid(), signal.SIGKILL)
        if rank == 0:
            state = {f"param:{n}": digest(p) for n, p in model.module.named_parameters()}
            for p, st in opt.state.items():
                name = next(n for n, q in model.module.named_parameters() if q is p)
                for k, v in st.items():
                    state[f"opt:{name}:{k}"] = digest(v) if isinstance(v, torch.Tensor) else repr(v)
            state["lr"] = repr(opt.param_groups[0]["lr"])
            state["restored_from"] = guard.stats.restored_from
            state["restored_step"] = guard.stats.restored_step
            state["attempt"] = attempt
            with open(os.path.join(args.out, "final.json"), "w") as f:
                json.dump(state, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
