"""Benchmark: `stalwart convert` against DeepSpeed's own converters, in one run.

Claim (issue 3): on a large ZeRO-2 checkpoint (>= 1 GB of fp32 weights, with Adam
state), ``stalwart convert --to hf`` is >= 3x faster than ``zero_to_fp32`` with
<= 0.5x its peak memory, and ``stalwart convert --to ds-universal`` likewise
against ``ds_to_universal``.

Setup (cached under bench-out/convert/): a 2-rank DeepSpeed ZeRO-2 bf16 run of an
MLP of ``--layers`` x Linear(``--width``, ``--width``) that takes one step and
saves. Each tool then runs as its own subprocess, alternating, ``--repeats``
times; wall time and peak RSS of the whole process tree (psutil polling every
5 ms, children included) are recorded, medians reported. Page cache is warm for
every tool (the checkpoint is read again before each run, outside the timing,
and dirty pages are synced). The baselines are
DeepSpeed 0.19.8's ``convert_zero_checkpoint_to_fp32_state_dict(...,
max_shard_size=None, safe_serialization=True)`` (what ``zero_to_fp32.py
--safe_serialization`` does for a model below its 5 GB shard size, without the
huggingface_hub dependency) and ``python -m deepspeed.checkpoint.ds_to_universal
--inject_missing_state`` (default worker counts).

Issue 11: the ``--to hf`` path must start without importing torch (it only moves
bytes); the benchmark checks that in the same run (``torch imported: no``) and times
the start-up alone (``stalwart --help``, ``stalwart inspect`` of the checkpoint)
against ``python -c "import torch"``.

Run: ``python bench/convert.py`` (default ``--layers 26 --width 4096``: 436M
params, 1.75 GB of fp32 weights, a 6.1 GB checkpoint; building it peaks at ~12 GiB
for the two ranks, the most this 24 GiB machine holds comfortably);
``--targets hf`` runs only the Hugging Face comparison. Numbers are noisy on a
shared 2-core VM: compare medians and ratios, not single runs; spreads are min-max.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import textwrap
import threading
import time

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "bench-out", "convert")
PY = sys.executable
STALWART = shutil.which("stalwart") or os.path.join(os.path.dirname(PY), "stalwart")

TRAIN = textwrap.dedent(
    """
    import os, sys, torch, deepspeed
    from torch import nn
    layers, width, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    cfg = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
           "zero_optimization": {"stage": 2}, "bf16": {"enabled": True}, "steps_per_print": 10**9}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    x = torch.randn(1, width, dtype=torch.bfloat16)
    loss = engine(x).float().pow(2).mean()
    engine.backward(loss)
    engine.step()
    engine.save_checkpoint(out, tag="global_step1")
    """
)


def build_checkpoint(layers: int, width: int) -> str:
    ckpt = os.path.join(OUT, f"z2_bf16_{layers}x{width}")
    if os.path.isfile(os.path.join(ckpt, "latest")):
        return ckpt
    shutil.rmtree(ckpt, ignore_errors=True)
    os.makedirs(OUT, exist_ok=True)
    script = os.path.join(OUT, "train.py")
    with open(script, "w") as f:
        f.write(TRAIN)
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".cache", "torch_extensions"))}
    print(f"building {ckpt} ({layers} x Linear({width}, {width}), ZeRO-2 bf16, 2 ranks) ...", flush=True)
    wall, peak = measure([PY, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29731", script,
                          str(layers), str(width), ckpt], env)
    print(f"  built in {wall:.1f} s, peak memory of the 2-rank run {peak / 2**30:.1f} GiB", flush=True)
    return ckpt


def measure(cmd: list[str], env=None) -> tuple[float, int]:
    """(wall seconds, peak RSS in bytes of the process tree)."""
    peak = 0
    done = threading.Event()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ps = psutil.Process(proc.pid)

    def poll():
        nonlocal peak
        while not done.is_set():
            try:
                procs = [ps, *ps.children(recursive=True)]
                total = 0
                for p in procs:
                    with contextlib.suppress(psutil.Error):
                        total += p.memory_info().rss
                peak = max(peak, total)
            except psutil.Error:
                pass
            time.sleep(0.005)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    _, err = proc.communicate()
    wall = time.perf_counter() - start
    done.set()
    th.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed ({proc.returncode}): {err.decode()[-2000:]}")
    return wall, peak


def tree_bytes(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(f) for f in glob.glob(os.path.join(path, "**"), recursive=True) if os.path.isfile(f))


def warm(path: str) -> None:
    buf = bytearray(16 << 20)
    for f in glob.glob(os.path.join(path, "**"), recursive=True):
        if os.path.isfile(f):
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=26)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the converted outputs")
    ap.add_argument("--targets", default="hf,ds-universal", help="comma-separated: hf, ds-universal")
    args = ap.parse_args()
    targets = set(args.targets.split(","))

    ckpt = build_checkpoint(args.layers, args.width)
    tag = os.path.join(ckpt, "global_step1")
    params = args.layers * (args.width * args.width + args.width)
    print(f"checkpoint: {tree_bytes(ckpt) / 1e9:.2f} GB on disk; {params / 1e6:.0f}M params = {params * 4 / 1e9:.2f} GB fp32 weights")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    scratch = os.path.join(OUT, "scratch")

    def out(name: str) -> str:
        return os.path.join(scratch, name)

    tools = {
        "zero_to_fp32 (hf)": [PY, "-c", "import sys; from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_fp32_state_dict as c;"
                                         " c(sys.argv[1], sys.argv[2], max_shard_size=None, safe_serialization=True)", ckpt, out("z2f")],
        "stalwart --to hf": [STALWART, "convert", ckpt, out("st_hf"), "--to", "hf", "-q"],
        "ds_to_universal": [PY, "-W", "ignore", "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", tag,
                            "--output_folder", out("ucp") + "/global_step1_universal", "--inject_missing_state"],
        "stalwart --to ds-universal": [STALWART, "convert", ckpt, out("st_ucp"), "--to", "ds-universal", "-q"],
    }
    outputs = {"zero_to_fp32 (hf)": "z2f", "stalwart --to hf": "st_hf", "ds_to_universal": "ucp",
               "stalwart --to ds-universal": "st_ucp"}
    rows = [r for r in (("hf", "zero_to_fp32 (hf)", "stalwart --to hf"),
                        ("ds-universal", "ds_to_universal", "stalwart --to ds-universal")) if r[0] in targets]
    tools = {k: v for k, v in tools.items() if any(k in r for r in rows)}
    # the start-up alone, interleaved with the same repeats
    tools["python -c 'import torch'"] = [PY, "-c", "import torch"]
    tools["stalwart --help"] = [STALWART, "--help"]
    tools["stalwart inspect"] = [STALWART, "inspect", ckpt, "--json"]
    outputs.update({k: None for k in ("python -c 'import torch'", "stalwart --help", "stalwart inspect")})
    if "hf" in targets:
        shutil.rmtree(scratch, ignore_errors=True)
        probe = subprocess.run([PY, "-c", "import sys; from stalwart.cli import main; rc = main(sys.argv[1:]);"
                                " print('torch imported:', 'yes' if 'torch' in sys.modules else 'no'); sys.exit(rc)",
                                "convert", ckpt, out("probe"), "--to", "hf", "-q"], capture_output=True, text=True, env=env)
        print(f"stalwart convert --to hf: {probe.stdout.strip().splitlines()[-1] if probe.stdout.strip() else probe.stderr[-500:]}")
    results: dict[str, list[tuple[float, int]]] = {k: [] for k in tools}
    for rep in range(args.repeats):
        for name, cmd in tools.items():
            shutil.rmtree(scratch, ignore_errors=True)
            os.makedirs(scratch)
            warm(ckpt)  # every tool starts with the checkpoint in the page cache
            os.sync()  # ... and no dirty pages of the previous tool being written back
            wall, peak = measure(cmd, env)
            results[name].append((wall, peak))
            size = tree_bytes(out(outputs[name])) if outputs[name] else 0
            print(f"  run {rep + 1}: {name:28s} {wall:7.2f} s  peak {peak / 2**20:8.0f} MiB  output {size / 1e9:.2f} GB", flush=True)
    shutil.rmtree(scratch, ignore_errors=True)

    med = {k: (statistics.median(w for w, _ in v), statistics.median(p for _, p in v)) for k, v in results.items()}

    def spread(name: str) -> str:
        walls = [w for w, _ in results[name]]
        return f"{min(walls):.2f}-{max(walls):.2f}"

    print()
    print(f"{'conversion':14s} {'tool':28s} {'wall s':>8s} {'min-max':>13s} {'peak MiB':>9s} {'speed-up':>9s} {'paired':>7s}"
          f" {'paired min-max':>15s} {'mem ratio':>9s}")
    summary = {}
    for target, base, ours in rows:
        bw, bp = med[base]
        ow, op = med[ours]
        # each repeat runs the baseline and stalwart back to back: the median of their
        # ratios is less sensitive to load that changes during the benchmark
        ratios = [b[0] / o[0] for b, o in zip(results[base], results[ours])]
        paired = statistics.median(ratios)
        print(f"{target:14s} {base:28s} {bw:8.2f} {spread(base):>13s} {bp / 2**20:9.0f}")
        print(f"{'':14s} {ours:28s} {ow:8.2f} {spread(ours):>13s} {op / 2**20:9.0f} {bw / ow:8.2f}x {paired:6.2f}x"
              f" {min(ratios):6.2f}-{max(ratios):.2f}x {op / bp:8.2f}x")
        summary[target] = {"baseline": base, "baseline_s": bw, "baseline_peak": bp, "stalwart_s": ow, "stalwart_peak": op,
                           "speedup": bw / ow, "speedup_paired": paired, "mem_ratio": op / bp,
                           "speed_target_met": min(bw / ow, paired) >= 3.0, "mem_target_met": op / bp <= 0.5}
    print()
    print("start-up alone (same repeats):")
    for name in ("python -c 'import torch'", "stalwart --help", "stalwart inspect"):
        print(f"  {name:28s} {med[name][0]:6.2f} s  ({spread(name)})  peak {med[name][1] / 2**20:6.0f} MiB")
    print()
    for target, s in summary.items():
        print(f"{target}: speed-up {s['speedup']:.2f}x of medians, {s['speedup_paired']:.2f}x median of paired runs"
              f" (target >= 3x: {'met' if s['speed_target_met'] else 'MISSED'}),"
              f" memory {s['mem_ratio']:.2f}x (target <= 0.5x: {'met' if s['mem_target_met'] else 'MISSED'})")
    with open(os.path.join(OUT, "results.json"), "w") as f:
        json.dump({"checkpoint": ckpt, "params": params, "repeats": args.repeats, "runs": results, "summary": summary}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
