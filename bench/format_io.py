"""Format I/O benchmark: stalwart vs torch.save/torch.load vs safetensors, in one run.

    python bench/format_io.py [--gib 1.0] [--repeats 3] [--dir DIR]

Prints, on a ~1 GiB state (16 fp32 tensors):
  * write and read GB/s (median of --repeats) of stalwart (checksums on) against
    torch.save/torch.load and safetensors save_file/load_file, each with and
    without fsync, and the ratio stalwart / safetensors;
  * for resharded loads (ZeRO-3 over 4 ranks -> DP 3; TP dim-0 4 -> 3; TP column
    slices), bytes read / bytes needed, over all target ranks;
  * for a simulated ZeRO-3 source of 10,000 ranks x 1,000 tensors: manifest size
    and one target rank's read-plan time.
Targets (issue 2): write >= 0.9x safetensors; resharded reads <= 1.05x needed;
manifest < 10 MB; one rank's plan < 1 s.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch
from safetensors.torch import load_file, save_file

import stalwart.formats as F
from stalwart.formats.datafile import FileRecord
from stalwart.formats.layout import Layout, Mesh, Shard, Sharded, TensorSpec, ZeroParam
from stalwart.formats.manifest import Manifest
from stalwart.formats.planner import plan_reads


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_state(gib: float) -> dict[str, torch.Tensor]:
    n = 16
    per = int(gib * 2**30 / 4 / n)
    state = {f"layers.{i}.weight": torch.empty(per, dtype=torch.float32) for i in range(n)}
    g = torch.Generator().manual_seed(0)
    for t in state.values():
        t.normal_(generator=g)  # also pre-faults the pages (first touch is slow here)
    return state


def _remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


def io_table(state, base: str, repeats: int) -> list[tuple[str, float, float]]:
    """Write/read GB/s per method. Methods are interleaved within each repeat and the
    page cache is flushed (os.sync) before every timed write, so no method pays for
    another's dirty pages; reads run with the page cache hot for every method."""
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    p_st, p_pt, p_sw = (os.path.join(base, n) for n in ("s.safetensors", "t.pt", "sw"))

    def st_write(fsync):
        save_file(state, p_st)
        if fsync:
            fsync_path(p_st)

    def pt_write(fsync):
        torch.save(state, p_pt)
        if fsync:
            fsync_path(p_pt)

    methods = {
        "safetensors": (p_st, st_write, lambda: load_file(p_st)),
        "torch.save/load": (p_pt, pt_write, lambda: torch.load(p_pt, weights_only=True)),
        "stalwart (checksums)": (p_sw, lambda fsync: F.save(state, p_sw, fsync=fsync), lambda: F.load(p_sw)),
    }
    rows = []
    for fsync in (False, True):
        tag = "fsync" if fsync else "no fsync"
        wt = {m: [] for m in methods}
        rt = {m: [] for m in methods}
        for _ in range(repeats):
            for name, (path, write, read) in methods.items():
                _remove(path)
                os.sync()
                gc.collect()
                t0 = time.perf_counter()
                write(fsync)
                wt[name].append(time.perf_counter() - t0)
                gc.collect()
                t0 = time.perf_counter()
                loaded = read()
                for t in loaded.values():
                    t.sum()  # touch every byte: lazy loaders pay here
                rt[name].append(time.perf_counter() - t0)
                del loaded
        for name in methods:
            rows.append((f"{name}, {tag}", nbytes / statistics.median(wt[name]) / 1e9, nbytes / statistics.median(rt[name]) / 1e9))
    for path, _, _ in methods.values():
        _remove(path)
    return rows


def reshard_table(state, base: str) -> list[tuple[str, int, int]]:
    rows = []
    src = Layout.zero(state, 4, 3)
    path = os.path.join(base, "zero3")
    F.save(state, path, layout=src, fsync=False)
    with F.open(path) as ckpt:
        for label, target in (
            ("ZeRO-3 dp4 -> dp3", Layout.zero(state, 3, 3)),
            ("ZeRO-3 dp4 -> dp7", Layout.zero(state, 7, 3)),
        ):
            need = read = 0
            for rank in range(target.world_size):
                plan = ckpt.plan(target, rank)
                ckpt.execute(plan)
                need += plan.needed_bytes
                read += plan.planned_bytes
            rows.append((label, need, read))
    shutil.rmtree(path)
    mats = {f"m{i}": t.view(4096, -1) for i, t in enumerate(list(state.values())[:4])}
    for label, dim, k_src, k_dst in (("TP dim0 tp4 -> tp3", 0, 4, 3), ("TP dim1 tp4 -> tp3", 1, 4, 3)):
        def tp(k, dim=dim):
            return Layout(Mesh(("tp",), (k,)), [TensorSpec(n, tuple(t.shape), t.dtype, Sharded((Shard(dim, "tp"),))) for n, t in mats.items()])
        path = os.path.join(base, "tp")
        F.save(mats, path, layout=tp(k_src), fsync=False)
        need = read = 0
        with F.open(path) as ckpt:
            target = tp(k_dst)
            for rank in range(k_dst):
                plan = ckpt.plan(target, rank)
                ckpt.execute(plan)
                need += plan.needed_bytes
                read += plan.planned_bytes
        rows.append((label, need, read))
        shutil.rmtree(path)
    return rows


def scale_row() -> tuple[float, float, float, int]:
    ranks, tensors = 10_000, 1_000
    shapes = [(4096, 4096), (1024, 4096), (11008, 4096), (4096,)]
    specs = [TensorSpec(f"layers.{i // 10}.p{i % 10}", shapes[i % len(shapes)], torch.bfloat16, ZeroParam(), role="param") for i in range(tensors)]
    layout = Layout(Mesh(("dp",), (ranks,)), specs)
    files = [FileRecord(f"rank-{r:05d}.safetensors", 10**9, 4096, "0" * 32, r) for r in range(ranks)]
    raw = Manifest(layout, files, step=1).dumps()
    t0 = time.perf_counter()
    import json

    parsed = Manifest.from_json(json.loads(raw), "sim")
    parse = time.perf_counter() - t0
    target = Layout(Mesh(("dp",), (8_192,)), [TensorSpec(s.name, s.shape, s.dtype, ZeroParam()) for s in specs])
    t0 = time.perf_counter()
    plan = plan_reads(parsed.layout, target, 4_321)
    planning = time.perf_counter() - t0
    return len(raw) / 1e6, parse, planning, len(plan.reads)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=1.0, help="state size in GiB (default 1)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir on the local disk)")
    args = ap.parse_args()
    base = tempfile.mkdtemp(prefix="stalwart-bench-", dir=args.dir)
    try:
        state = make_state(args.gib)
        print(f"state: {len(state)} fp32 tensors, {sum(t.numel() * 4 for t in state.values()) / 2**30:.2f} GiB; median of {args.repeats}; torch {torch.__version__}")
        rows = io_table(state, base, args.repeats)
        print(f"\n{'write / read':36s} {'write GB/s':>11s} {'read GB/s':>10s}")
        for name, w, r in rows:
            print(f"{name:36s} {w:11.2f} {r:10.2f}")
        ok = True
        for tag in ("no fsync", "fsync"):
            st = next(w for n, w, _ in rows if n == f"safetensors, {tag}")
            sw = next(w for n, w, _ in rows if n == f"stalwart (checksums), {tag}")
            pt = next(w for n, w, _ in rows if n == f"torch.save/load, {tag}")
            passed = sw >= 0.9 * st
            ok &= passed
            print(f"stalwart write / safetensors ({tag}): {sw / st:.2f}x  (target >= 0.9x: {'met' if passed else 'MISSED'});  / torch.save: {sw / pt:.2f}x")
        print(f"\n{'resharded load':24s} {'needed MB':>10s} {'read MB':>9s} {'read/needed':>12s}")
        for label, need, read in reshard_table(state, base):
            ratio = read / need
            ok &= ratio <= 1.05
            print(f"{label:24s} {need / 1e6:10.1f} {read / 1e6:9.1f} {ratio:12.4f}  (target <= 1.05: {'met' if ratio <= 1.05 else 'MISSED'})")
        mb, parse, planning, nreads = scale_row()
        print("\nsimulated ZeRO-3, 10,000 ranks x 1,000 tensors -> target dp 8192, rank 4321:")
        print(f"  manifest {mb:.2f} MB (target < 10: {'met' if mb < 10 else 'MISSED'}), parse {parse:.3f} s,"
              f" plan {planning:.3f} s for {nreads} reads (target < 1 s: {'met' if planning < 1 else 'MISSED'})")
        ok &= mb < 10 and planning < 1
        return 0 if ok else 1
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
