"""The NVIDIA resiliency-ext rank of bench/elastic.py: the same GPT + AdamW loop as
bench/_elastic_worker.py, run by ``nvidia_resiliency_ext.inprocess.Wrapper`` (in-process restart).

    RANK=i WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=P <nvrx venv>/bin/python bench/_nvrx_worker.py --out DIR --pg-port Q [...]

It runs in its own virtual environment (no stalwart imported). The GPT and AdamW are built once,
outside the wrapped function; each (re)start of the wrapped function creates the gloo group at the
world size the Wrapper assigned (its default rank assignment: the dead rank dropped, the others
shifted down), wraps the GPT in DDP again and trains on from the last step this process completed
(the survivor's own in-memory replica: nvrx restarts the function, it does not checkpoint).
Events, as bench/_elastic_worker.py writes them to ``OUT/ev-<pid>.jsonl``:

  start     first line, before any import
  imported  torch and nvidia_resiliency_ext.inprocess imported
  pg        the wrapped function (re)started and created the gloo group (``iteration``: nvrx's restart count)
  model     DDP wrapped
  step      a training step completed
  error     the wrapped function raised (a peer died); nvrx restarts it
"""

import time

T0 = time.time()

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

import psutil  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _elastic_worker import Events, batch, build_parts, env_int  # noqa: E402  (stdlib + psutil only at import)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--pg-port", type=int, required=True, help="port of the store the training gloo group uses")
    ap.add_argument("--steps", type=int, default=10_000)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--hang-timeout", type=float, default=30.0, help="soft timeout and gloo PG timeout (s)")
    ap.add_argument("--dead-after", type=float, default=1.0, help="heartbeat timeout (s)")
    ap.add_argument("--interval", type=float, default=0.1,
                    help="heartbeat, monitor thread/process and progress watchdog intervals (s)")
    ap.add_argument("--last-call-wait", type=float, default=0.1)
    ap.add_argument("--monitor-pidfile", default=None,
                    help="absolute path ('{rank}' filled in) where nvrx's monitor daemon writes its pid")
    args = ap.parse_args()
    ev = Events(args.out)
    rank0 = env_int("RANK")
    ev("start", t=T0, created=psutil.Process().create_time(), agent_pid=os.getppid(), rank=rank0,
       world=env_int("WORLD_SIZE", 1), node=rank0, slot=-1, restart=0, round=-1)

    from datetime import timedelta
    from typing import Optional

    import torch.distributed as dist
    from nvidia_resiliency_ext import inprocess
    from torch.nn.parallel import DistributedDataParallel as DDP

    ev("imported")
    cfg, net, opt = build_parts(args)
    ev("built")
    hang = timedelta(seconds=args.hang_timeout)
    # the training group's store, hosted by rank 0 (which the bench never kills); one prefix per restart
    base = dist.TCPStore(os.environ["MASTER_ADDR"], args.pg_port, env_int("WORLD_SIZE"), is_master=rank0 == 0,
                         multi_tenant=True, wait_for_workers=True)
    done = {"step": 0}  # the last step this process completed: what a restarted function trains on from
    every = timedelta(seconds=args.interval)

    @inprocess.Wrapper(
        heartbeat_interval=every, heartbeat_timeout=timedelta(seconds=args.dead_after),
        monitor_thread_interval=every, monitor_process_interval=every, progress_watchdog_interval=every,
        soft_timeout=hang, hard_timeout=hang + timedelta(seconds=5), barrier_timeout=hang + timedelta(seconds=10),
        completion_timeout=hang + timedelta(seconds=10), last_call_wait=timedelta(seconds=args.last_call_wait),
        monitor_process_pidfile=args.monitor_pidfile,
    )
    def train(call_wrapper: Optional[inprocess.CallWrapper] = None) -> None:  # noqa: UP045 (nvrx matches Optional)
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        store = dist.PrefixStore(f"iter{call_wrapper.iteration}", base)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=hang)
        ev("pg", rank=rank, world=world, iteration=call_wrapper.iteration)
        model = DDP(net)
        ev("model")
        try:
            for step in range(done["step"] + 1, args.steps + 1):
                opt.zero_grad(set_to_none=True)  # drop what a failed step left in .grad
                x, y = batch(cfg, step, rank0, args.batch)
                loss = model(x, y)
                loss.backward()
                opt.step()
                done["step"] = step
                ev("step", step=step, loss=float(loss.detach()), world=world, rank=rank, ckpt_s=0.0)
        except BaseException as e:
            ev("error", error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300])
            raise

    train()


if __name__ == "__main__":
    main()
