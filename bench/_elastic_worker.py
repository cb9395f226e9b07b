"""The training worker of bench/elastic.py: the same GPT + AdamW loop under each system.

    <launcher> bench/_elastic_worker.py --system stalwart|dcp|dlrover --out DIR --root DIR [...]

Every process appends JSON lines to ``OUT/ev-<pid>.jsonl``, each with a wall-clock
``t`` (``time.time()``, comparable across the processes of one host):

  start     first line of the script (before any import) and the process's creation time
            (psutil), its rank, world size, node and the pids the bench needs to kill a
            node (agent = parent, stalwart's keeper)
  imported  torch, torch.distributed and the system's library imported
  pg        the training process group is up
  model     GPT built, wrapped in DDP, AdamW constructed
  restored  the system's restore returned (``step``: the step restored, 0 for none)
  step      a training step completed (after the system's per-step checkpoint call); ``ckpt_s``:
            the seconds of that step the loop spent in checkpointing (the call, plus stalwart's
            wait before optimizer.step() for the previous snapshot's copy)
  error     the loop raised (a peer died): the time and the exception, then it re-raises

Data are plain per-rank random tokens keyed by (step, rank): the bench measures
recovery time, not training identity on a changed world (tests/elastic does that).

Only the standard library and psutil are imported before ``start`` is written; each
system's imports happen inside its own functions, so the DLRover mode runs in its own
virtual environment without stalwart installed.
"""

import time

T0 = time.time()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402

import psutil  # noqa: E402

SEED = 1234


class Events:
    """One JSON line per event in this process's own file (no interleaving between processes)."""

    def __init__(self, out: str) -> None:
        self.path = os.path.join(out, f"ev-{os.getpid()}.jsonl")

    def __call__(self, kind: str, t: float | None = None, **fields) -> None:
        rec = {"ev": kind, "t": time.time() if t is None else t, "pid": os.getpid(), **fields}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")


def env_int(name: str, default: int = 0) -> int:
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else default


# ----------------------------------------------------------------------------- common
def build_parts(args):
    """GPT (bench/_gpt.py) and AdamW, not yet wrapped."""
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _gpt import GPT, GPTConfig

    torch.manual_seed(SEED)
    cfg = GPTConfig() if not args.quick else GPTConfig(vocab=4096, seq=64, d_model=256, n_layer=4, n_head=4)
    net = GPT(cfg)
    return cfg, net, torch.optim.AdamW(net.parameters(), lr=3e-4, weight_decay=0.01)


def build(args):
    """GPT (bench/_gpt.py) wrapped in DDP, and AdamW."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    cfg, net, opt = build_parts(args)
    return cfg, DDP(net), opt


def batch(cfg, step: int, rank: int, size: int):
    import torch

    g = torch.Generator().manual_seed(SEED * 1_000_003 + step * 1009 + rank)
    x = torch.randint(0, cfg.vocab, (size, cfg.seq), generator=g)
    y = torch.randint(0, cfg.vocab, (size, cfg.seq), generator=g)
    return x, y


def train(args, ev, cfg, model, opt, start: int, after_step, stalled=lambda: 0.0) -> None:
    """The loop; ``after_step(step)`` is the system's per-step checkpoint call and ``stalled()``
    the system's own count of seconds the loop waited elsewhere (stalwart's optimizer pre-hook)."""
    import torch.distributed as dist

    rank = dist.get_rank()
    try:
        for step in range(start + 1, args.steps + 1):
            x, y = batch(cfg, step, rank, args.batch)
            before = stalled()
            loss = model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            t = time.perf_counter()
            after_step(step)
            ckpt_s = time.perf_counter() - t + stalled() - before
            ev("step", step=step, loss=float(loss.detach()), world=dist.get_world_size(), rank=rank, ckpt_s=ckpt_s)
    except BaseException as e:
        ev("error", error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300])
        raise


# ----------------------------------------------------------------------------- stalwart
def run_stalwart(args, ev) -> None:
    import torch  # noqa: F401
    import torch.distributed as dist

    import stalwart
    from stalwart.ckpt import init_distributed

    ev("imported")
    k, m = (int(v) for v in args.redundancy.split(",")) if args.redundancy else (0, 0)
    tiers = ["memory", {"url": f"local:{os.path.join(args.root, 'disk')}", "every": args.disk_every}]
    kwargs = {"redundancy": (k, m)} if k else {}

    def protected(cfg, model, opt) -> None:
        with stalwart.protect(model, opt, root=args.root, every=1, tiers=tiers, slots=3, **kwargs) as guard:
            ev("restored", step=guard.step_count, source=guard.stats.restored_from, bytes=guard.stats.restore_sources,
               fallbacks=guard.stats.fallbacks, keeper_pid=guard.client.keeper_pid())
            train(args, ev, cfg, model, opt, guard.step_count, lambda step: guard.step(), lambda: guard.stats.blocking_s)

    if args.in_process:  # stalwart.elastic.run: the GPT and AdamW are built once, the survivors keep them
        from torch.nn.parallel import DistributedDataParallel as DDP

        from stalwart.elastic import run

        cfg, net, opt = build_parts(args)
        ev("built")

        def attempt() -> None:
            ev("pg", rank=dist.get_rank(), world=dist.get_world_size())
            model = DDP(net)
            ev("model")
            protected(cfg, model, opt)

        run(attempt, hang_timeout_s=args.hang_timeout, dead_after_s=args.dead_after)
        return
    init_distributed("gloo")  # on a store prefix named after the rendezvous round (restart-safe)
    ev("pg", rank=dist.get_rank(), world=dist.get_world_size())
    cfg, model, opt = build(args)
    ev("model")
    protected(cfg, model, opt)


# ----------------------------------------------------------------------------- torchrun + DCP
def run_dcp(args, ev) -> None:
    import torch  # noqa: F401
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    ev("imported")
    # a plain env:// group: TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (set by the bench) makes every
    # rendezvous round publish a fresh store, so a restarted group never meets stale addresses
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    ev("pg", rank=rank, world=dist.get_world_size())
    cfg, model, opt = build(args)
    ev("model")
    ckpt = os.path.join(args.root, "dcp")
    pointer = os.path.join(ckpt, "latest")
    start = 0
    if os.path.exists(pointer):
        with open(pointer) as f:
            start = int(f.read())
        msd, osd = get_state_dict(model, opt)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=os.path.join(ckpt, f"step-{start}"))
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    ev("restored", step=start, source="dcp" if start else None)

    def save(step: int) -> None:
        if step % args.disk_every:
            return
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=os.path.join(ckpt, f"step-{step}"))
        dist.barrier()
        if rank == 0:  # commit: the pointer names the newest complete checkpoint; keep two
            with open(pointer + ".tmp", "w") as f:
                f.write(str(step))
                f.flush()
                os.fsync(f.fileno())
            os.replace(pointer + ".tmp", pointer)
            for name in os.listdir(ckpt):
                if name.startswith("step-") and int(name[5:]) < step - args.disk_every:
                    shutil.rmtree(os.path.join(ckpt, name), ignore_errors=True)

    train(args, ev, cfg, model, opt, start, save)


# ----------------------------------------------------------------------------- DLRover
def run_dlrover(args, ev) -> None:
    import torch  # noqa: F401
    import torch.distributed as dist
    from dlrover.trainer.torch.flash_checkpoint.ddp import DdpCheckpointer, StorageType

    ev("imported")
    dist.init_process_group("gloo")
    ev("pg", rank=dist.get_rank(), world=dist.get_world_size())
    cfg, model, opt = build(args)
    ev("model")
    ckpt = DdpCheckpointer(os.path.join(args.root, "dlrover"))
    state = ckpt.load_checkpoint()
    start = 0
    if state:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        start = int(state["step"])
    ev("restored", step=start, source="dlrover" if start else None)

    def save(step: int) -> None:
        state = {"model": model.state_dict(), "optim": opt.state_dict(), "step": step}
        kind = StorageType.DISK if step % args.disk_every == 0 else StorageType.MEMORY
        ckpt.save_checkpoint(step, state, storage_type=kind)

    train(args, ev, cfg, model, opt, start, save)


SYSTEMS = {"stalwart": run_stalwart, "dcp": run_dcp, "dlrover": run_dlrover}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--system", required=True, choices=sorted(SYSTEMS))
    ap.add_argument("--out", required=True)
    ap.add_argument("--root", required=True)
    ap.add_argument("--steps", type=int, default=10_000)
    ap.add_argument("--batch", type=int, default=2, help="sequences per rank per step")
    ap.add_argument("--disk-every", type=int, default=10, help="steps between disk checkpoints")
    ap.add_argument("--redundancy", default="1,1", help="stalwart: k,m ('' for none)")
    ap.add_argument("--quick", action="store_true", help="a small GPT (smoke runs)")
    ap.add_argument("--in-process", action="store_true", help="stalwart: in-process recovery (stalwart.elastic.run)")
    ap.add_argument("--hang-timeout", type=float, default=None, help="stalwart --in-process: hang_timeout_s")
    ap.add_argument("--dead-after", type=float, default=None, help="stalwart --in-process: dead_after_s")
    args = ap.parse_args()
    ev = Events(args.out)
    me = psutil.Process()
    ev("start", t=T0, created=me.create_time(), agent_pid=os.getppid(), rank=env_int("RANK"),
       world=env_int("WORLD_SIZE", 1), node=env_int("GROUP_RANK"), slot=env_int("STALWART_KEEPER_SLOT", -1),
       restart=env_int("TORCHELASTIC_RESTART_COUNT"), round=env_int("STALWART_RDZV_ROUND", -1))
    SYSTEMS[args.system](args, ev)


if __name__ == "__main__":
    main()
