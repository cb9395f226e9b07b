"""Train a tiny model with DeepSpeed (CPU, gloo) and save / resume checkpoints; run under torchrun.

The model has everything a converter must get right: an embedding tied to the
output head, a frozen layer, a persistent buffer, an odd-sized bias and two
optimizer param groups with different hyper-parameters (AdamW + StepLR).

One torchrun invocation runs a JSON list of jobs (engines are rebuilt per job):

* ``{"op": "save", "stage", "dtype", "dir", "truth", ...}``: train ``steps`` steps
  from a fixed seed, save ``dir/global_step<N>`` (or the Hugging Face Trainer layout
  ``dir/checkpoint-N/global_stepN`` with ``hf_layout``; extra tags at
  ``also_save_at`` steps), then write ``truth``: every fp32 master weight and
  optimizer slot as DeepSpeed itself reports them (``safe_get_full_fp32_param``,
  ``safe_get_full_optimizer_state``, the base optimizer's ``step``), frozen params
  and buffers, and ``zero_to_fp32``'s own output;
* ``{"op": "resume", "stage", "dtype", "dir", "tag", "universal", "out"}``: build a
  fresh engine, load the checkpoint, dump what was loaded (same keys as the truth)
  and the losses of ``steps`` more steps into ``out``.

Data is a function of the global step only, so runs at different DP degrees see
the same global batch (DP x gradient accumulation x micro-batch = 4).
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
from torch import nn

GLOBAL_BATCH = 4
SEQ = 6
VOCAB = 13


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 10)
        self.frozen = nn.Linear(10, 10)
        self.l1 = nn.Linear(10, 7)
        self.l2 = nn.Linear(7, 10)
        self.head = nn.Linear(10, VOCAB, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("buf", torch.tensor([0.5, -0.25, 2.0]))
        for p in self.frozen.parameters():
            p.requires_grad_(False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.frozen(self.emb(ids))
        h = torch.tanh(self.l1(h)) * self.buf.sum()
        return self.head(torch.tanh(self.l2(h)))


def batch(step: int, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples ``first .. first+count-1`` of the global batch of ``step``."""
    rows = []
    for i in range(first, first + count):
        g = torch.Generator().manual_seed(1000 * step + i)
        rows.append(torch.randint(0, VOCAB, (SEQ + 1,), generator=g))
    ids = torch.stack(rows)
    return ids[:, :-1], ids[:, 1:]


def build(args, universal: bool):
    import deepspeed

    if args.dtype == "fp16":
        # DeepSpeed asks oneDNN whether this CPU computes in fp16 and refuses when it
        # does not; torch runs these tiny fp16 ops anyway (slowly), which is all a
        # checkpoint-format test needs.
        from deepspeed.accelerator import get_accelerator

        get_accelerator().is_fp16_supported = lambda: True
    torch.manual_seed(1234)
    model = Net()
    lr1 = 0.01 if args.same_hparams else 0.02
    wd1 = 0.01 if args.same_hparams else 0.0
    groups = [
        {"params": [model.emb.weight, model.l1.weight, model.l1.bias], "lr": 0.01, "weight_decay": 0.01},
        {"params": [model.l2.weight, model.l2.bias], "lr": lr1, "weight_decay": wd1},
    ]
    opt = torch.optim.AdamW(groups, lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    dp = dist.get_world_size()
    gas = max(1, GLOBAL_BATCH // (dp * args.micro))
    zero: dict = {"stage": args.stage}
    if args.stage == 3:
        zero["sub_group_size"] = args.sub_group_size
    if args.elastic:
        zero["elastic_checkpoint"] = True
    config = {
        "train_batch_size": GLOBAL_BATCH,
        "train_micro_batch_size_per_gpu": args.micro,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": 1.0,
        "zero_optimization": zero,
        "bf16": {"enabled": args.dtype == "bf16"},
        "fp16": {"enabled": args.dtype == "fp16", "initial_scale_power": 8},
        "steps_per_print": 10**9,
        "checkpoint": {"load_universal": universal},
    }
    if args.grad_accum_fp32:
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=config)
    return engine, gas


def train(engine, gas: int, steps: int, micro: int) -> list[float]:
    rank, dp = dist.get_rank(), dist.get_world_size()
    losses = []
    for _ in range(steps):
        step = engine.global_steps
        local = []
        for m in range(gas):
            x, y = batch(step, (m * dp + rank) * micro, micro)
            out = engine(x)
            loss = nn.functional.cross_entropy(out.float().reshape(-1, VOCAB), y.reshape(-1))
            engine.backward(loss)
            engine.step()
            local.append(loss.item())
        every = [None] * dp
        dist.all_gather_object(every, local)
        losses.append([v for r in every for v in r])
    return losses


def truth(engine) -> dict[str, torch.Tensor]:
    """What DeepSpeed says the full state is (collective: every rank must call it)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    out: dict[str, torch.Tensor] = {}
    opt = engine.optimizer
    if hasattr(opt, "_hp_optimizer_states_linked"):
        # DeepSpeed 0.19.8 links the hp optimizer-state fragments after the *first*
        # param group's step only, so params of later groups have none; relink
        # with its own function before asking it for the state.
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()
    base = getattr(opt, "optimizer", opt)
    steps = {float(s["step"]) for s in base.state.values() if "step" in s}
    name_of = {id(p): n for n, p in engine.module.named_parameters()}
    slots = ("exp_avg", "exp_avg_sq")
    trainable = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    if safe_get_full_fp32_param(trainable[0][1]) is not None:  # ZeRO 1-3, BF16_Optimizer
        for name, p in trainable:
            out[name] = safe_get_full_fp32_param(p).detach().clone()
            for slot in slots:
                out[f"optim.{name}.{slot}"] = safe_get_full_optimizer_state(p, slot).detach().clone()
    elif hasattr(opt, "fp32_groups"):  # stage 0, FP16_UnfusedOptimizer: one fp32 master per param
        for lp_group, hp_group in zip(opt.fp16_groups, opt.fp32_groups):
            for lp, hp in zip(lp_group, hp_group):
                name = name_of[id(lp)]
                out[name] = hp.detach().clone()
                for slot in slots:
                    out[f"optim.{name}.{slot}"] = base.state[hp][slot].detach().clone()
    elif hasattr(opt, "fp32_groups_flat"):  # stage 0, FP16_Optimizer: one flat fp32 master per group
        for lp_group, flat in zip(opt.fp16_groups, opt.fp32_groups_flat):
            off = 0
            for lp in lp_group:
                name, n = name_of[id(lp)], lp.numel()
                out[name] = flat[off : off + n].view(lp.shape).detach().clone()
                for slot in slots:
                    out[f"optim.{name}.{slot}"] = base.state[flat][slot][off : off + n].view(lp.shape).clone()
                off += n
    else:  # stage 0 fp32: the module's params are the masters
        for name, p in trainable:
            out[name] = p.detach().clone()
            for slot in slots:
                out[f"optim.{name}.{slot}"] = base.state[p][slot].detach().clone()
    out["__step__"] = torch.tensor(sorted(steps))
    if engine.zero_optimization_partition_weights():
        import deepspeed

        frozen = [p for p in engine.module.parameters() if not p.requires_grad]
        with deepspeed.zero.GatheredParameters(frozen):
            for name, p in engine.module.named_parameters():
                if not p.requires_grad:
                    out[name] = p.detach().clone()
    else:
        for name, p in engine.module.named_parameters():
            if not p.requires_grad:
                out[name] = p.detach().clone()
    for name, b in engine.module.named_buffers():
        out[name] = b.detach().clone()
    out["__global_steps__"] = torch.tensor(engine.global_steps)
    out["__lr__"] = torch.tensor([g["lr"] for g in base.param_groups], dtype=torch.float64)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("plan", help="JSON list of jobs, run in order in this one process group")
    plan_path = ap.parse_args().plan
    with open(plan_path) as f:
        jobs = json.load(f)

    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    for job in jobs:
        args = Job(job)
        if job["op"] == "save":
            save(args, rank)
        elif job["op"] == "resume":
            engine, gas = build(args, universal=bool(job.get("universal")))
            engine.load_checkpoint(job["dir"], tag=job.get("tag"))
            state = truth(engine)
            losses = train(engine, gas, args.steps, args.micro)
            base = getattr(engine.optimizer, "optimizer", engine.optimizer)
            after = sorted({float(s["step"]) for s in base.state.values() if "step" in s})
            if rank == 0:
                state["__losses__"] = torch.tensor(losses, dtype=torch.float64)
                state["__step_after__"] = torch.tensor(after)
                torch.save(state, job["out"])
            dist.barrier()
            del engine
        else:
            raise SystemExit(f"unknown op {job['op']!r}")
    dist.barrier()
    dist.destroy_process_group()


class Job:
    """A job's settings with the defaults of the test model."""

    def __init__(self, job: dict) -> None:
        self.stage = int(job.get("stage", 2))
        self.dtype = job.get("dtype", "bf16")
        self.steps = int(job.get("steps", 3))
        self.micro = int(job.get("micro", 2))
        self.sub_group_size = int(job.get("sub_group_size", 100))
        self.same_hparams = bool(job.get("same_hparams", False))
        self.grad_accum_fp32 = bool(job.get("grad_accum_fp32", False))
        self.elastic = bool(job.get("elastic", False))
        self.job = job


def save(args: Job, rank: int) -> None:
    job = args.job
    engine, gas = build(args, universal=False)
    also = set(job.get("also_save_at") or [])
    losses = []
    for step in range(1, args.steps + 1):
        losses += train(engine, gas, 1, args.micro)
        if step in also:
            engine.save_checkpoint(job["dir"], tag=f"global_step{step}", client_state=CLIENT_STATE)
    if job.get("hf_layout"):
        save_dir, tag = os.path.join(job["dir"], f"checkpoint-{args.steps}"), None  # tag: DeepSpeed's global_step<N>
    else:
        save_dir, tag = job["dir"], job.get("tag") or f"global_step{args.steps}"
    engine.save_checkpoint(save_dir, tag=tag, client_state=CLIENT_STATE)
    if job.get("hf_layout") and rank == 0:
        with open(os.path.join(save_dir, "trainer_state.json"), "w") as f:
            json.dump({"global_step": args.steps, "epoch": 1.0}, f)
        torch.save({"python": 1, "torch": torch.get_rng_state()}, os.path.join(save_dir, f"rng_state_{rank}.pth"))
    state = truth(engine)
    dist.barrier()
    if rank == 0 and job.get("truth"):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            ref = get_fp32_state_dict_from_zero_checkpoint(save_dir, tag=tag)
        except (ValueError, TypeError, FileNotFoundError):  # it reads neither stage 0 nor BF16_Optimizer
            ref = {}
        for k, v in ref.items():
            state[f"zero_to_fp32.{k}"] = v.detach().clone()
        state["__losses__"] = torch.tensor(losses, dtype=torch.float64)
        torch.save(state, job["truth"])
    dist.barrier()
    del engine


CLIENT_STATE = {"epoch": 1, "data_position": 12, "note": "tiny"}


if __name__ == "__main__":
    main()
