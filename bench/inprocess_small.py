"""In-process recovery of a small model: SIGKILL of a whole node -> the survivors' first step.

The DDP (or, with ``--framework fsdp2``, FSDP2) job of ``tests/elastic`` (``tests/elastic/workers/elastic_train.py`` through
``tests/elastic/harness.py``): four simulated nodes (torchrun agents on loopback, one rank
and one keeper each, RS(3, 1)), ``stalwart.elastic.run``, a small MLP, ``--step-sleep``
seconds per step. In each trial, after step 6 or 10 (chosen by the trial's seed) plus a
random fraction of a step, node 2 (agent + worker + keeper) is SIGKILLed; the time from the
kill to the first step the three survivors complete is measured, with the step they
restored and where from (``kept in process``, memory, or nothing: training started over).

    PYTHONPATH=. .venv/bin/python bench/inprocess_small.py --trials 7 [--dead-after 0.5]

Prints one line per trial and min / median / max. Run under ``flock /work/.bench.lock``
on a shared machine: the figure is dominated by CPU contention.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests", "elastic"))

from harness import Job  # noqa: E402

STEPS = 40


def trial(seed: int, args) -> dict:
    rnd = random.Random(seed)
    kill_after = rnd.choice((6, 10))
    env = {"STALWART_DEAD_AFTER_S": str(args.dead_after)} if args.dead_after is not None else {}
    with tempfile.TemporaryDirectory(prefix="inproc-small-") as tmp, Job(
            tmp, "elastic_train.py", "--steps", str(STEPS), "--global-batch", "12", "--micro-batch", "1",
            "--framework", args.framework, "--step-sleep", str(args.step_sleep), "--in-process", "--hang-timeout", "30",
            nnodes="3:4", env=env) as job:
        for _ in range(4):
            job.start_agent()
        job.wait_for(lambda: job.progress() >= kill_after, 300, f"step {kill_after}")
        time.sleep(rnd.uniform(0, args.step_sleep + 0.02))  # a random moment within the next step
        at_kill = job.progress()
        killed_at = time.time()
        job.kill_node(2)

        def first():
            return next((r for r in job.step_log() if r["t"] > killed_at and r["world"] == 3), None)

        job.wait_for(lambda: first() is not None, 120, "a step at world size 3")
        step = first()
        job.wait_for(lambda: len([r for r in job.restores() if r["epoch"] > 0]) >= 3, 30, "the survivors' restores")
        restores = [r for r in job.restores() if r["epoch"] > 0]
        started = {r["pid"] for r in job.restores() if r["epoch"] == 0}
    restored = min(r["step"] for r in restores)
    sources = sorted({r["restored_from"] or "nothing" for r in restores})
    return {"seed": seed, "kill_after": at_kill, "first_step_s": step["t"] - killed_at, "restored": restored,
            "from": "+".join(sources), "started_over": restored == 0,
            "same_pids": {r["pid"] for r in restores} <= started}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0, help="first trial's seed (trial i uses seed + i)")
    ap.add_argument("--dead-after", type=float, default=None,
                    help="STALWART_DEAD_AFTER_S for the job (default: stalwart's default)")
    ap.add_argument("--step-sleep", type=float, default=0.05)
    ap.add_argument("--framework", default="ddp", choices=["ddp", "fsdp2"],
                    help="fsdp2: the survivors reshard from memory (own, peers, parity) instead of keeping tensors")
    args = ap.parse_args()
    from stalwart.elastic.inprocess import DEFAULT_DEAD_AFTER_S

    dead = args.dead_after if args.dead_after is not None else DEFAULT_DEAD_AFTER_S
    print(f"in-process recovery, small {args.framework.upper()} model, 4 nodes -> 3, dead_after_s {dead}, {args.step_sleep} s sleep per step",
          flush=True)
    rows = []
    for i in range(args.trials):
        r = trial(args.seed + i, args)
        rows.append(r)
        print(f"seed {r['seed']:3d}: killed after step {r['kill_after']:2d}, restored step {r['restored']:2d} from"
              f" {r['from']:<16s} first step after the kill {r['first_step_s']:.2f} s"
              f"{'  STARTED OVER' if r['started_over'] else ''}{'' if r['same_pids'] else '  SURVIVORS RESTARTED'}",
              flush=True)
    times = [r["first_step_s"] for r in rows]
    lost = [r["kill_after"] - r["restored"] for r in rows]
    print(f"first step after the kill: min {min(times):.2f} s, median {statistics.median(times):.2f} s,"
          f" max {max(times):.2f} s over {len(rows)} trials; steps lost {lost};"
          f" started over: {sum(r['started_over'] for r in rows)};"
          f" survivors kept their processes: {sum(r['same_pids'] for r in rows)} of {len(rows)}")


if __name__ == "__main__":
    main()
