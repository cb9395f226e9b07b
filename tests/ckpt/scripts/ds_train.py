"""A DeepSpeed training run under stalwart.protect(), launched by torchrun in tests.

    torchrun --nproc-per-node=2 ds_train.py --stage 2 --dtype bf16 --out O --root R
             [--reference REF] [--kill RANK:STEP] [--steps N] [--check] [--fused] [--offload]
    torchrun --nproc-per-node=2 ds_train.py --stage 2 --dtype bf16 --out O --plain

``--plain`` trains without stalwart. Otherwise the loop runs under ``protect(engine, ...)``;
with ``--reference`` the first attempt first trains the same engine without stalwart (the
uninterrupted reference) into REF, and with ``--kill`` that rank SIGKILLs itself right
after that step of the first attempt (torchrun restarts the workers, they restore).

Rank 0 appends "step loss attempt" lines to losses.txt (later lines win). Every rank
writes final-<rank>.json: sha1 digests of its fp32 master partitions, every inner
optimizer state tensor, its low-precision weights, frozen params and buffers, and the
engine counters, LR, LR-scheduler state and loss scale.

``--check``: after the loop, ``guard.save_now()`` and compare the newest checkpoint of the
local tier (verified first) with DeepSpeed's ``safe_get_full_fp32_param`` /
``safe_get_full_optimizer_state`` for every param, bitwise; writes check.json. With
``--steps`` equal to the restored step nothing is trained, so this compares a restored
engine (of any stage/DP size) with the checkpoint it restored from.
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

import stalwart
import stalwart.formats
from stalwart.ckpt import init_distributed

VOCAB, DIM, HID, SEQ, MICRO = 29, 12, 17, 6, 4


class Net(torch.nn.Module):
    """Tied embedding/head, a frozen layer, a buffer changed in forward, dropout, odd numels."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, DIM)
        self.l1 = torch.nn.Linear(DIM, HID)
        self.frozen = torch.nn.Linear(HID, HID)
        self.frozen.requires_grad_(False)
        self.l2 = torch.nn.Linear(HID, DIM)
        self.drop = torch.nn.Dropout(0.1)
        self.head = torch.nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("stat", torch.zeros(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.l1(self.emb(x)))
        h = self.drop(torch.tanh(self.frozen(h)))
        if self.training:
            with torch.no_grad():
                self.stat.mul_(0.5).add_(h.detach().float().mean().to(self.stat.dtype))
        return self.head(self.l2(h))


def mark(what: str) -> None:
    """Phase timestamps on stderr (for finding where a test's time goes)."""
    if os.environ.get("STALWART_TEST_TIMING"):
        import sys
        import time

        print(f"[timing] rank {os.environ.get('RANK')} attempt {os.environ.get('TORCHELASTIC_RESTART_COUNT')}"
              f" {time.time():.2f} {what}", file=sys.stderr, flush=True)


def digest(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous().reshape(-1)
    return hashlib.sha1(t.view(torch.uint8).numpy().tobytes()).hexdigest() if t.numel() else "empty"


def build(stage: int, dtype: str, fused: bool = False, offload: bool = False):
    import deepspeed

    if dtype == "fp16":
        # DeepSpeed asks oneDNN whether this CPU computes in fp16 and refuses when it does
        # not; torch runs these tiny fp16 ops anyway (slowly).
        from deepspeed.accelerator import get_accelerator

        get_accelerator().is_fp16_supported = lambda: True
    torch.manual_seed(1234)
    model = Net()
    decay = [model.emb.weight, model.l1.weight, model.l2.weight]
    no_decay = [model.l1.bias, model.l2.bias]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.9, 0.95))
    config = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
        "zero_optimization": {"stage": stage},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 0.02, "warmup_num_steps": 6}},
    }
    if dtype in ("bf16", "bf16acc"):
        config["bf16"] = {"enabled": True}
    if dtype == "bf16acc":  # fp32 gradient accumulation: ZeRO-1 then uses BF16_Optimizer
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    elif dtype == "fp16":
        config["fp16"] = {"enabled": True, "initial_scale_power": 8, "loss_scale_window": 3}
    if stage == 3:
        # small persistence threshold: some params stay partitioned between steps, some are persistent
        config["zero_optimization"].update({"stage3_param_persistence_threshold": 100, "sub_group_size": 150})
    if offload:  # ZeRO-Offload: DeepSpeed then uses DeepSpeedCPUAdam (JIT-compiles an op)
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        fused = True
    if fused:  # DeepSpeed's FusedAdam (stage 0 fp16/bf16 then uses FP16_Optimizer); JIT-compiles an op
        config["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-2, "betas": [0.9, 0.95], "weight_decay": 0.05}}
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=opt.param_groups, config=config)
    else:
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    return engine


def loader_for(rank: int, world: int):
    g = torch.Generator().manual_seed(7)
    data = torch.utils.data.TensorDataset(torch.randint(0, VOCAB, (512, SEQ + 1), generator=g))
    sampler = torch.utils.data.DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=3)
    return torch.utils.data.DataLoader(data, batch_size=MICRO, sampler=sampler)


def train_step(engine, x: torch.Tensor) -> torch.Tensor:
    logits = engine(x[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, VOCAB), x[:, 1:].reshape(-1))
    engine.backward(loss)
    engine.step()
    return loss.detach()


def final_state(engine) -> dict:
    """Everything this rank holds, as digests (the masters' and slots' padding included)."""
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    if hasattr(opt, "single_partition_of_fp32_groups"):
        masters = opt.single_partition_of_fp32_groups
    elif hasattr(opt, "fp32_groups_flat_partition"):
        masters = opt.fp32_groups_flat_partition
    elif hasattr(opt, "fp32_partitioned_groups_flat"):
        masters = opt.fp32_partitioned_groups_flat
    else:
        masters = [p for g in inner.param_groups for p in g["params"]]
    out: dict = {}
    rank = dist.get_rank()

    def real(i: int, t: torch.Tensor) -> torch.Tensor:
        # ZeRO-3 pads each param's partition on the last rank with uninitialised memory
        # (torch.empty in partition_parameters.py) that no computation reads: leave it out.
        if not hasattr(opt, "fp32_partitioned_groups_flat"):
            return t
        pieces, offset = [], 0
        for p in opt.fp16_groups[i]:
            c = p.partition_numel()
            pieces.append(t.narrow(0, offset, max(0, min(c, p.ds_numel - rank * c))))
            offset += c
        return torch.cat(pieces)

    for i, m in enumerate(masters):
        out[f"master:{i}"] = digest(real(i, m))
        for k, v in inner.state.get(m, {}).items():
            out[f"slot:{i}:{k}"] = digest(real(i, v) if v.numel() == m.numel() else v) if isinstance(v, torch.Tensor) else repr(v)
    for name, p in engine.module.named_parameters():
        if hasattr(p, "ds_tensor"):
            out[f"lp:{name}"] = digest(p.ds_tensor.narrow(0, 0, max(0, min(p.partition_numel(), p.ds_numel - rank * p.partition_numel()))))
        else:
            out[f"lp:{name}"] = digest(p.data)
        if hasattr(p, "ds_tensor") and p.data.numel():
            out[f"lp-full:{name}"] = digest(p.data)  # persistent ZeRO-3 params stay gathered
    for name, b in engine.module.named_buffers():
        out[f"buf:{name}"] = digest(b)
    out["wrapper"] = type(opt).__name__
    out["lr"] = [repr(g["lr"]) for g in inner.param_groups]
    out["global_steps"] = engine.global_steps
    out["global_samples"] = engine.global_samples
    out["skipped_steps"] = engine.skipped_steps
    out["loss_scale"] = repr(float(getattr(opt, "loss_scale", 1.0)))
    out["sched"] = repr(engine.lr_scheduler.state_dict()) if engine.lr_scheduler is not None else None
    return out


def stage0_master(opt, p: torch.nn.Parameter) -> tuple[torch.Tensor, dict]:
    """(fp32 master, its optimizer state) of ``p`` under a stage-0 engine, shaped like ``p``."""
    if isinstance(opt, torch.optim.Optimizer):  # fp32: the engine's optimizer is the torch one
        return p.data, opt.state[p]
    inner = opt.optimizer
    if hasattr(opt, "fp32_groups"):  # FP16_UnfusedOptimizer: one fp32 copy per param
        for lps, masters in zip(opt.fp16_groups, opt.fp32_groups):
            for lp, master in zip(lps, masters):
                if lp is p:
                    return master, inner.state[master]
    for i, lps in enumerate(opt.fp16_groups):  # FP16_Optimizer: one flat fp32 buffer per group
        offset = 0
        for lp in lps:
            if lp is p:
                flat = opt.fp32_groups_flat[i]
                cut = lambda t, o=offset: t.narrow(0, o, p.numel()).view(p.shape)  # noqa: E731
                state = inner.state[flat]
                return cut(flat), {k: cut(v) for k, v in state.items() if torch.is_tensor(v) and v.numel() == flat.numel()}
            offset += lp.numel()
    raise KeyError("parameter without a master")


def check(engine, path: str, out: str) -> None:
    """Compare the provider's checkpoint at ``path`` with DeepSpeed's own full-state getters."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    rank = dist.get_rank()
    report = {"problems": [], "compared": 0}
    ckpt = None
    if rank == 0:
        res = stalwart.formats.verify(path)
        report["verify_ok"] = res.ok
        report["problems"] += res.problems
        ckpt = stalwart.formats.open(path)
        report["step"] = ckpt.step
    slots = ("exp_avg", "exp_avg_sq")
    opt = engine.optimizer
    if hasattr(opt, "_hp_optimizer_states_linked"):
        # DeepSpeed 0.19.8 links the optimizer-state fragments of every group right after the
        # *first* group's step, when later groups have no state yet: safe_get_full_optimizer_state
        # then fails for params of group >= 1. Link again now that every group has state.
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        full = safe_get_full_fp32_param(p)  # collective
        states = {s: safe_get_full_optimizer_state(p, s) for s in slots}
        if full is None:  # stage 0 keeps no fragment mapping: find the master by hand
            full, st = stage0_master(opt, p)
            states = {s: st[s] for s in slots}
        if rank != 0:
            continue
        for key, want in [(name, full)] + [(f"optim.{name}.{s}", v) for s, v in states.items()]:
            got = ckpt.read(key)
            if got.dtype != want.dtype or got.shape != want.shape or digest(got) != digest(want):
                report["problems"].append(f"{key}: checkpoint {got.dtype}{list(got.shape)} differs from DeepSpeed's")
            report["compared"] += 1
    if rank == 0:
        for name, p in engine.module.named_parameters():
            if not p.requires_grad:  # frozen: compare with the module's own (gathered) lp weight
                import deepspeed

                with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_tensor")):
                    want = p.data.clone()
                got = ckpt.read(name)
                if got.dtype != want.dtype or digest(got) != digest(want):
                    report["problems"].append(f"frozen {name} differs")
                report["compared"] += 1
        report["aliases"] = ckpt.aliases()
        report["roles"] = sorted({t.role for t in ckpt.tensors.values()})
        report["placements"] = sorted({t.placement.kind for t in ckpt.tensors.values()})
        ckpt.close()
        with open(os.path.join(out, "check.json"), "w") as f:
            json.dump(report, f)
    else:
        import deepspeed

        for _name, p in engine.module.named_parameters():
            if not p.requires_grad:
                with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_tensor")):
                    pass
    dist.barrier()


def run_plain(args, out: str, rank: int, world: int, attempt: int) -> None:
    """The uninterrupted reference: no stalwart."""
    engine = build(args.stage, args.dtype, args.fused, args.offload)
    loader = loader_for(rank, world)
    for step, (x,) in enumerate(loader, start=1):
        if step > args.steps:
            break
        log_loss(out, step, train_step(engine, x), attempt)
    state = {**final_state(engine), "attempt": attempt}
    with open(os.path.join(out, f"final-{rank}.json"), "w") as f:
        json.dump(state, f, indent=0)


def log_loss(out: str, step: int, loss: torch.Tensor, attempt: int) -> None:
    avg = loss.float().clone()
    dist.all_reduce(avg)
    if dist.get_rank() == 0:
        with open(os.path.join(out, "losses.txt"), "a") as f:
            f.write(f"{step} {avg.item()!r} {attempt}\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", type=int, default=2)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "bf16acc", "fp16", "fp32"])
    ap.add_argument("--root", default=None)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--kill", default=None, help="RANK:STEP to SIGKILL in the first attempt")
    ap.add_argument("--plain", action="store_true", help="no stalwart (the reference run)")
    ap.add_argument("--reference", default=None, help="first attempt: also train a reference without stalwart into DIR")
    ap.add_argument("--check", action="store_true", help="compare the final snapshot with DeepSpeed's getters")
    ap.add_argument("--fused", action="store_true", help="DeepSpeed's FusedAdam from the config")
    ap.add_argument("--offload", action="store_true", help="ZeRO-Offload (DeepSpeedCPUAdam)")
    args = ap.parse_args()
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # tests dump a hung worker's stacks with it

    mark("start")
    init_distributed("gloo")
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    os.makedirs(args.out, exist_ok=True)
    mark("dist ready")
    if args.plain:
        run_plain(args, args.out, rank, world, attempt)
        dist.barrier()
        dist.destroy_process_group()
        return
    if args.reference and attempt == 0:
        # the uninterrupted run, in this process before the protected one (saves a launch)
        os.makedirs(args.reference, exist_ok=True)
        run_plain(args, args.reference, rank, world, attempt)
        mark("reference done")
    engine = build(args.stage, args.dtype, args.fused, args.offload)
    mark("engine ready")
    loader = loader_for(rank, world)
    info: dict = {"attempt": attempt}
    kill_rank, kill_step = (int(v) for v in args.kill.split(":")) if args.kill else (-1, -1)
    tiers = ["memory", {"url": f"local:{args.root}/local", "every": 4}]
    # both spellings work: protect(engine, None, ...) and protect(engine, engine.optimizer, ...)
    optimizer = engine.optimizer if args.stage == 1 else None
    with stalwart.protect(engine, optimizer, root=args.root, every=1, tiers=tiers,
                          keeper_linger_s=30, preempt_deadline_s=4) as guard:
        mark("protect entered")
        inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
        info["wait_hook"] = len(getattr(inner, "_optimizer_step_pre_hooks", {})) == 1
        info["restored_step"] = guard.stats.restored_step
        info["restored_from"] = guard.stats.restored_from
        for (x,) in guard.resume(loader):
            if guard.step_count >= args.steps:
                break
            loss = train_step(engine, x)
            guard.step()
            log_loss(args.out, guard.step_count, loss, attempt)
            if attempt == 0 and rank == kill_rank and guard.step_count == kill_step:
                os.kill(os.getpid(), signal.SIGKILL)
        if args.check:
            guard.save_now()  # the final state, in every tier
    mark("loop done")
    state = final_state(engine)
    state.update(info)
    with open(os.path.join(args.out, f"final-{rank}.json"), "w") as f:
        json.dump(state, f, indent=0)
    if args.check:
        check(engine, os.path.join(args.root, "local"), args.out)
        mark("check done")
    dist.barrier()
    dist.destroy_process_group()
    mark("exit")


if __name__ == "__main__":
    main()
