"""A small GPT trained with DDP under stalwart.protect(): copy this loop.

    torchrun --nproc-per-node=2 examples/train_gpt.py --root runs/gpt --steps 60

A character-level GPT learns the Zen of Python. Everything a restart needs is
checkpointed every step into host memory (the keeper process) and every 10 steps
to disk; kill any rank at any time and re-launch (or let torchrun's
``--max-restarts`` do it): training continues exactly where it was, bitwise.

``--kill RANK:STEP`` makes one rank SIGKILL itself at that step (for the demo);
``--out DIR`` records losses and final-state digests for comparisons.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import hashlib
import io
import json
import os
import signal

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import stalwart
from stalwart.ckpt import init_distributed

with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints it
    import this
TEXT = codecs.decode(this.s, "rot13")  # the Zen of Python: the training text


class GPT(torch.nn.Module):
    """A minimal decoder-only transformer with tied input/output embeddings."""

    def __init__(self, vocab: int, dim: int = 64, heads: int = 4, layers: int = 2, ctx: int = 32) -> None:
        super().__init__()
        self.tok = torch.nn.Embedding(vocab, dim)
        self.pos = torch.nn.Parameter(torch.zeros(ctx, dim))
        layer = torch.nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.1, batch_first=True, norm_first=True)
        self.blocks = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(dim)
        self.head = torch.nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied: stalwart stores it once
        self.register_buffer("causal", torch.nn.Transformer.generate_square_subsequent_mask(ctx), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        h = self.tok(x) + self.pos[:t]
        return self.head(self.norm(self.blocks(h, mask=self.causal[:t, :t], is_causal=True)))


def dataset(ctx: int) -> tuple[torch.utils.data.Dataset, int]:
    chars = sorted(set(TEXT))
    ids = torch.tensor([chars.index(c) for c in TEXT])
    windows = ids.unfold(0, ctx + 1, 3)  # overlapping (input, next-char) windows
    return torch.utils.data.TensorDataset(windows), len(chars)


def digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, help="checkpoint root (host-memory keeper id + default tier)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--every", type=int, default=1, help="snapshot into host memory every N steps")
    ap.add_argument("--tiers", default=None, help="JSON list of tiers (default: memory + local disk every 10)")
    ap.add_argument("--kill", default=None, help="RANK:STEP - that rank SIGKILLs itself at that step (first attempt only)")
    ap.add_argument("--out", default=None, help="write losses and final digests here")
    args = ap.parse_args()

    init_distributed("gloo")  # like init_process_group, but safe across torchrun restarts
    rank = dist.get_rank()
    torch.manual_seed(0)
    data, vocab = dataset(ctx=32)
    model = DDP(GPT(vocab))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    sampler = torch.utils.data.DistributedSampler(data, shuffle=True, seed=0)
    loader = torch.utils.data.DataLoader(data, batch_size=16, sampler=sampler, drop_last=True)
    tiers = json.loads(args.tiers) if args.tiers else ["memory", {"url": f"local:{args.root}/disk", "every": 10}]
    kill_rank, kill_step = (int(v) for v in args.kill.split(":")) if args.kill else (-1, -1)
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    log = None
    if args.out and rank == 0:
        os.makedirs(args.out, exist_ok=True)
        log = open(os.path.join(args.out, "losses.txt"), "a")  # noqa: SIM115 - closed at the end

    with stalwart.protect(model, opt, root=args.root, every=args.every, tiers=tiers, scheduler=sched,
                          keeper_linger_s=30, preempt_deadline_s=5) as guard:
        if rank == 0 and guard.stats.restored_step is not None:
            print(f"[attempt {attempt}] restored step {guard.stats.restored_step} from {guard.stats.restored_from}", flush=True)
        for (window,) in guard.resume(loader, epochs=1000):
            if guard.step_count >= args.steps:
                break
            x, y = window[:, :-1], window[:, 1:]
            loss = torch.nn.functional.cross_entropy(model(x).reshape(-1, vocab), y.reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()  # waits here only if the previous snapshot is still being copied
            sched.step()
            opt.zero_grad()
            guard.step()  # snapshot: small state now, params + optimizer in the background
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            mean /= dist.get_world_size()
            if log is not None:
                log.write(f"{guard.step_count} {mean.item()!r} {attempt}\n")
                log.flush()
            if attempt == 0 and rank == kill_rank and guard.step_count == kill_step:
                os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no goodbye: a hard crash
        if rank == 0 and args.out:
            state = {f"param:{n}": digest(p) for n, p in model.module.named_parameters()}
            names = {id(p): n for n, p in model.module.named_parameters()}
            for p, st in opt.state.items():
                for k, v in st.items():
                    state[f"opt:{names[id(p)]}:{k}"] = digest(v) if isinstance(v, torch.Tensor) else repr(v)
            state["lr"] = repr(opt.param_groups[0]["lr"])
            state.update(restored_from=guard.stats.restored_from, restored_step=guard.stats.restored_step, attempt=attempt,
                         blocking_s=guard.stats.blocking_s, snapshots=guard.stats.snapshots, pool_bytes=guard.stats.pool_bytes)
            with open(os.path.join(args.out, "final.json"), "w") as f:
                json.dump(state, f)
    if log is not None:
        log.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
