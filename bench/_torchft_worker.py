"""The torchft replica of bench/elastic.py: the same GPT + AdamW loop as bench/_elastic_worker.py
under torchft's Manager, its DDP wrapper and its reconfigurable ProcessGroupGloo.

    <torchft venv>/bin/python bench/_torchft_worker.py --out DIR --replica N --lighthouse http://HOST:PORT [...]

One process is one replica group (group world size 1), as one simulated node of the bench.
It runs in torchft's own virtual environment (no stalwart imported) and writes the same
events as bench/_elastic_worker.py to ``OUT/ev-<pid>.jsonl``:

  start     first line, before any import (rank = the replica's number, world = 2)
  imported  torch and torchft imported
  model     GPT built, torchft Manager up (heartbeating to the Lighthouse), DDP wrapped, AdamW
  pg        torchft reconfigured the gloo group for a new quorum (``world``: its size,
            ``quorum``: the quorum id); written from the Manager's quorum thread
  restored  this replica healed: it received the live peers' state (``step``: the step it got)
  step      a step torchft committed (``world``: the replicas that took part)
  error     a step torchft did not commit (a collective failed or too few replicas): the
            loop goes on, as torchft intends; the step is redone after the next quorum

Data: per-replica random tokens keyed by (step, replica), as in bench/_elastic_worker.py.
"""

import time

T0 = time.time()

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

import psutil  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _elastic_worker import Events, batch, build_parts  # noqa: E402  (stdlib + psutil only at import)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--replica", type=int, required=True)
    ap.add_argument("--lighthouse", required=True)
    ap.add_argument("--steps", type=int, default=10_000)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--timeout", type=float, default=30.0, help="Manager timeout and gloo PG timeout (s)")
    ap.add_argument("--quorum-timeout", type=float, default=30.0)
    ap.add_argument("--connect-timeout", type=float, default=10.0)
    ap.add_argument("--heartbeat-interval", type=float, default=0.1, help="Manager -> Lighthouse heartbeat (s)")
    args = ap.parse_args()
    ev = Events(args.out)
    ev("start", t=T0, created=psutil.Process().create_time(), agent_pid=os.getppid(), rank=args.replica, world=2,
       node=args.replica, slot=-1, restart=0, round=-1)

    from datetime import timedelta

    import torch
    from torch.distributed import TCPStore
    from torchft import DistributedDataParallel, Manager, ProcessGroupGloo

    ev("imported")

    class EventPG(ProcessGroupGloo):
        """torchft's gloo group, with an event each time a new quorum reconfigures it."""

        def configure(self, store_addr, replica_id, rank, world_size, *rest, **kw):
            super().configure(store_addr, replica_id, rank, world_size, *rest, **kw)
            ev("pg", rank=args.replica, world=world_size, quorum=rest[0] if rest else None)

    class DDP(DistributedDataParallel):
        """torchft's DDP wrapper with one fix to its gradient hook's failure path. In torchft 0.2.0 a
        failed allreduce (a peer died) makes ``_ManagedWork.wait()`` report the error to the Manager and
        return False without building its future chain, so the stock hook's ``assert fut._fut`` raises
        AssertionError in the survivor's backward and kills it. Here the hook hands back the bucket
        unchanged in that case, as ``Manager.allreduce`` promises (the error is tracked, the step is not
        committed); a successful allreduce goes through torchft's own path unchanged."""

        @staticmethod
        def _comm_hook(state, bucket):
            work = state.allreduce(bucket.buffer())
            if work.wait() and getattr(work.get_future(), "_fut", None) is not None:
                return work.get_future()._fut
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer())
            return fut

    cfg, net, opt = build_parts(args)
    # the replica group's own store (torchft expects one per group, as torchrun would host)
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    timeout = timedelta(seconds=args.timeout)
    pg = EventPG(timeout=timeout)

    healed = {}

    def load(sd) -> None:  # torchft calls this with the state a live peer sent (healing)
        net.load_state_dict(sd["model"])
        opt.load_state_dict(sd["optim"])
        healed["t"] = time.time()

    def save():
        return {"model": net.state_dict(), "optim": opt.state_dict()}

    manager = Manager(pg=pg, min_replica_size=1, load_state_dict=load, state_dict=save,
                      replica_id=f"bench_replica_{args.replica}", rank=0, world_size=1, store_addr="127.0.0.1",
                      store_port=store.port, lighthouse_addr=args.lighthouse, timeout=timeout,
                      quorum_timeout=timedelta(seconds=args.quorum_timeout),
                      connect_timeout=timedelta(seconds=args.connect_timeout),
                      heartbeat_interval=timedelta(seconds=args.heartbeat_interval))
    model = DDP(manager, net)
    ev("model")
    torch.manual_seed(args.replica)
    while manager.current_step() < args.steps:
        step = manager.current_step() + 1
        x, y = batch(cfg, step, args.replica, args.batch)
        manager.start_quorum()  # what torchft's OptimizerWrapper.zero_grad does
        opt.zero_grad(set_to_none=True)
        loss = model(x, y)
        loss.backward()
        committed = manager.should_commit()  # what torchft's OptimizerWrapper.step does
        if committed:
            opt.step()
        if "t" in healed:  # this replica was recovered from a live peer during this step's quorum
            ev("restored", t=healed.pop("t"), step=manager.current_step() - (1 if committed else 0),
               source="torchft heal (live peer)")
        if committed:
            ev("step", step=manager.current_step(), loss=float(loss.detach()), world=manager.num_participants(),
               rank=args.replica, ckpt_s=0.0)
        else:
            err = manager.errored()
            ev("error", step=step, error=(f"{type(err.original_exception).__name__}: "
                                          f"{str(err.original_exception).splitlines()[0][:200]}" if err else
                                          f"not committed (participants {manager.num_participants()})"))
    manager.shutdown(wait=False)


if __name__ == "__main__":
    main()
