"""The stalwart demo (``make demo``): crash a 2-rank training run and resume it bitwise.

1. Train a small GPT with DDP on 2 ranks (torchrun, gloo, CPU) under
   ``stalwart.protect()`` without interruption: the reference.
2. Train it again; at a random step one rank is SIGKILLed. torchrun restarts the
   workers (``--max-restarts=1``); they restore the newest snapshot from the
   keeper's host memory and carry on.
3. Compare every parameter, every optimizer slot, the learning rate and the loss of
   every step: they must be bitwise equal. Exit status 0 only if they are.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time

from rich.console import Console
from rich.table import Table

HERE = os.path.dirname(os.path.abspath(__file__))
console = Console(highlight=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(root: str, out: str, steps: int, kill: str | None) -> tuple[float, subprocess.CompletedProcess]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--max-restarts=1", "--monitor-interval=0.1",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--nnodes=1",
           os.path.join(HERE, "train_gpt.py"), "--root", root, "--out", out, "--steps", str(steps)]
    if kill:
        cmd += ["--kill", kill]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if res.returncode != 0:
        console.print(res.stderr[-4000:], markup=False)
        raise SystemExit(f"demo: training failed (exit {res.returncode})")
    return time.perf_counter() - t0, res


def read(out: str) -> tuple[dict, dict[int, str], list[str]]:
    with open(os.path.join(out, "final.json")) as f:
        final = json.load(f)
    losses: dict[int, str] = {}
    with open(os.path.join(out, "losses.txt")) as f:
        for line in f:
            step, loss, _ = line.split()
            losses[int(step)] = loss
    return final, losses, []


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="demo-run", help="where the runs write (default: ./demo-run, replaced)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seed", type=int, default=None, help="choose the victim rank and step (default: random)")
    args = ap.parse_args()
    rnd = random.Random(args.seed)
    kill_rank, kill_step = rnd.randint(0, 1), rnd.randint(args.steps // 4, 3 * args.steps // 4)
    shutil.rmtree(args.dir, ignore_errors=True)
    ref_dir, run_dir = os.path.join(args.dir, "reference"), os.path.join(args.dir, "crashed")

    console.print("[bold]stalwart demo[/]: a GPT-style model, DDP on 2 ranks (torchrun, gloo, CPU), under stalwart.protect()")
    console.print("  snapshots every step into host memory (keeper process), every 10 steps to local disk\n")

    console.print(f"[bold]1.[/] reference run, {args.steps} steps, no failure ...")
    t, _ = torchrun(os.path.join(ref_dir, "root"), os.path.join(ref_dir, "out"), args.steps, None)
    ref, ref_losses, _ = read(os.path.join(ref_dir, "out"))
    console.print(f"   done in {t:.1f}s; final loss {float(ref_losses[args.steps]):.4f}")

    console.print(f"\n[bold]2.[/] the same run; rank {kill_rank} is SIGKILLed at step {kill_step} ...")
    t, res = torchrun(os.path.join(run_dir, "root"), os.path.join(run_dir, "out"), args.steps, f"{kill_rank}:{kill_step}")
    got, losses, _ = read(os.path.join(run_dir, "out"))
    restored = [line for line in res.stdout.splitlines() if "restored step" in line]
    console.print(f"   rank {kill_rank} died at step {kill_step}; torchrun restarted both workers (attempt {got['attempt']})")
    for line in restored:
        console.print(f"   {line.strip()}")
    console.print(f"   finished in {t:.1f}s (including the restart); final loss {float(losses[args.steps]):.4f}")
    console.print(f"   time the loop waited for snapshots on rank 0 after the restart: {got['blocking_s'] * 1000:.1f} ms"
                  f" over {got['snapshots']} snapshots")

    console.print("\n[bold]3.[/] comparison with the reference")
    table = Table(show_edge=False, header_style="bold")
    table.add_column("what")
    table.add_column("compared", justify="right")
    table.add_column("bitwise equal")
    ok = True
    for label, prefix in (("parameters", "param:"), ("optimizer state", "opt:")):
        keys = [k for k in ref if k.startswith(prefix)]
        same = all(got.get(k) == ref[k] for k in keys)
        ok &= same and bool(keys)
        table.add_row(label, str(len(keys)), "[green]yes[/]" if same else "[red]NO[/]")
    same_lr = got["lr"] == ref["lr"]
    table.add_row("learning rate (scheduler)", "1", "[green]yes[/]" if same_lr else "[red]NO[/]")
    same_losses = losses == ref_losses
    table.add_row("loss of every step", str(len(ref_losses)), "[green]yes[/]" if same_losses else "[red]NO[/]")
    ok &= same_lr and same_losses and got["attempt"] == 1 and bool(restored)
    console.print(table)
    console.print(f"\ncheckpoints: {run_dir}/root/disk   try: [bold]stalwart inspect {run_dir}/root/disk[/]")
    if ok:
        console.print("[bold green]the crashed run ended bitwise equal to the uninterrupted one[/]")
        return 0
    console.print("[bold red]the runs differ[/]")
    return 1


if __name__ == "__main__":
    sys.exit(main())
