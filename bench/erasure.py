"""Erasure coding: stalwart's Reed-Solomon codec against reedsolo, zfec and raw ISA-L.

    python bench/erasure.py                    # 64 MiB per code, pinned to CPU 0, best of 5
    python bench/erasure.py --mib 256 --repeat 9 --cpu 1 --json out.json

For RS(4,2), RS(8,2) and RS(10,4) it measures GB/s of *data* bytes (k shards) for
encode (compute the m parity shards) and decode (rebuild m lost data shards from the
k survivors), with every implementation on the same buffers in one run:

- stalwart ``numpy`` / ``torch`` (CPU) -- the bit-sliced XOR path -- and ``isal``;
- raw ISA-L: ``ec_encode_data`` via ctypes with ISA-L's own matrix and inversion;
- zfec (C extension, Vandermonde code, different bytes);
- reedsolo pure Python ``RSCodec(nsym=m, nsize=k+m)`` on a small input, extrapolated.

The process pins itself to one CPU and torch to one thread, so the numbers are per
core. Buffers are pre-faulted and reused; best-of-N and median are both printed (the
development VM is shared and noisy). Parity bytes of the stalwart backends are checked
against raw ISA-L before anything is timed.

Section (2), step-time overhead of erasure-coded snapshots every step
(``--overhead``, on by default; ``--overhead-only`` skips the codec): ``k + m`` ranks
under torchrun, each its own "node" with its own keeper (STALWART_LOCAL_WORLD_SIZE=1),
three ways, each launched ``--rounds`` times in interleaved order: no checkpointing, a
memory snapshot every step, and a memory snapshot every step erasure-coded across the
keepers with RS(k, m). It prints the median step time of each, the overhead of EC
against both, and how many of the snapshots the keepers encoded (a snapshot arriving
while the previous one is being encoded is not encoded: the newest protected step lags
by the encode time). Two layouts (``--layout``, see bench/_ec_worker.py):

- ``node`` (default): rank 0 trains the GPT of bench/async_ckpt.py (110M parameters,
  AdamW) with its training thread alone on CPU 0; its snapshot copy thread, every
  keeper and the other nodes (tiny stand-in trainers that snapshot every step, so the
  group codes rank 0's whole snapshot) share CPU 1, which stands for the node's spare
  cores and copy engine. Rank 0's step time is the measured one. Needs >= 2 CPUs.
- ``shared``: every rank trains a smaller GPT under DDP and every process shares every
  core (on a 2-core machine the keepers' coding is taken from the trainers); the
  slowest rank's step counts.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch

CODES = ((4, 2), (8, 2), (10, 4))
TARGET_NUMPY_GBPS = 2.0  # RS(4,2) encode, pure numpy/torch, one core
TARGET_VS_ZFEC = 3.0
TARGET_ISAL_RATIO = 0.8
TARGET_OVERHEAD = 0.05  # EC snapshots every step, fraction of the step time
TRAIN_CPU, SPARE_CPU = 0, 1  # --layout node: rank 0's training thread / everything else (bench/_ec_worker.py)
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_ec_worker.py")


def timeit(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    """(best, median) seconds of ``repeat`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times)


# -- raw ISA-L, written against the C API directly (no stalwart code) ---------------------


class RawIsal:
    def __init__(self) -> None:
        lib = ctypes.CDLL("libisal.so.2")
        p = ctypes.c_void_p
        lib.gf_gen_cauchy1_matrix.argtypes = [p, ctypes.c_int, ctypes.c_int]
        lib.gf_invert_matrix.argtypes = [p, p, ctypes.c_int]
        lib.gf_invert_matrix.restype = ctypes.c_int
        lib.ec_init_tables.argtypes = [ctypes.c_int, ctypes.c_int, p, p]
        lib.ec_encode_data.argtypes = [ctypes.c_int] * 3 + [p, ctypes.POINTER(p), ctypes.POINTER(p)]
        self.lib = lib

    def encoder(self, k: int, m: int, data: list[np.ndarray], parity: list[np.ndarray]) -> Callable[[], None]:
        a = np.zeros((k + m, k), dtype=np.uint8)
        self.lib.gf_gen_cauchy1_matrix(a.ctypes.data, k + m, k)
        tbl = np.zeros(32 * k * m, dtype=np.uint8)
        self.lib.ec_init_tables(k, m, a[k:].ctypes.data, tbl.ctypes.data)
        src = (ctypes.c_void_p * k)(*(d.ctypes.data for d in data))
        dst = (ctypes.c_void_p * m)(*(q.ctypes.data for q in parity))
        n = len(data[0])
        return lambda: self.lib.ec_encode_data(n, k, m, tbl.ctypes.data, src, dst)

    def decoder(self, k: int, m: int, shards: list[np.ndarray], out: list[np.ndarray]) -> Callable[[], None]:
        """Rebuild data shards 0..m-1 from shards m..k+m-1 (inverting every call, as a user would)."""
        a = np.zeros((k + m, k), dtype=np.uint8)
        self.lib.gf_gen_cauchy1_matrix(a.ctypes.data, k + m, k)
        survivors = list(range(m, k + m))
        src = (ctypes.c_void_p * k)(*(shards[i].ctypes.data for i in survivors))
        dst = (ctypes.c_void_p * m)(*(o.ctypes.data for o in out))
        n = len(shards[0])

        def run() -> None:
            sub = np.ascontiguousarray(a[survivors])
            inv = np.zeros((k, k), dtype=np.uint8)
            if self.lib.gf_invert_matrix(sub.ctypes.data, inv.ctypes.data, k) != 0:
                raise RuntimeError("singular")
            rows = np.ascontiguousarray(inv[:m])
            tbl = np.zeros(32 * k * m, dtype=np.uint8)
            self.lib.ec_init_tables(k, m, rows.ctypes.data, tbl.ctypes.data)
            self.lib.ec_encode_data(n, k, m, tbl.ctypes.data, src, dst)

        return run


def reedsolo_rates(k: int, m: int, nbytes: int) -> tuple[float, float]:
    """(encode, decode) GB/s of data for reedsolo's RS(k+m, k) byte code on a small input."""
    import reedsolo

    codec = reedsolo.RSCodec(nsym=m, nsize=k + m)
    msg = bytearray(np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8).tobytes())
    t0 = time.perf_counter()
    enc = codec.encode(msg)
    t_enc = time.perf_counter() - t0
    # lose the first m data symbols of every codeword (what a lost data shard means)
    erase = [c * (k + m) + i for c in range(len(enc) // (k + m)) for i in range(m)]
    t0 = time.perf_counter()
    dec = codec.decode(enc, erase_pos=erase, only_erasures=True)[0]
    t_dec = time.perf_counter() - t0
    if bytes(dec) != bytes(msg):
        raise RuntimeError("reedsolo round trip failed")
    return nbytes / t_enc / 1e9, nbytes / t_dec / 1e9


def bench_code(k: int, m: int, total: int, repeat: int, small: int) -> list[dict]:
    from stalwart.ckpt.erasure import ReedSolomon, available_backends

    shard = total // k
    rng = np.random.default_rng(k * 100 + m)
    data = [rng.integers(0, 256, shard, dtype=np.uint8) for _ in range(k)]
    parity = [np.zeros(shard, dtype=np.uint8) for _ in range(m)]
    rebuilt = [np.zeros(shard, dtype=np.uint8) for _ in range(m)]
    rows: list[dict] = []

    def row(
        impl: str, enc: tuple[float, float] | None, dec: tuple[float, float] | None, note: str = ""
    ) -> None:
        nbytes = k * shard
        rows.append(
            {
                "code": f"RS({k},{m})",
                "impl": impl,
                "enc_best": nbytes / enc[0] / 1e9 if enc else None,
                "enc_median": nbytes / enc[1] / 1e9 if enc else None,
                "dec_best": nbytes / dec[0] / 1e9 if dec else None,
                "dec_median": nbytes / dec[1] / 1e9 if dec else None,
                "note": note,
            }
        )

    raw = None
    reference = None
    if "isal" in available_backends():
        raw = RawIsal()
        enc = raw.encoder(k, m, data, parity)
        enc()
        reference = [p.copy() for p in parity]

    for be in ("numpy", "torch", "isal"):
        if be not in available_backends():
            continue
        rs = ReedSolomon(k, m, backend=be)
        if be == "torch":
            d_in = [torch.from_numpy(x) for x in data]
            p_out = [torch.from_numpy(x) for x in parity]
            r_out = [torch.from_numpy(x) for x in rebuilt]
        else:
            d_in, p_out, r_out = data, parity, rebuilt
        rs.encode(d_in, out=p_out)
        if reference is not None and not all(np.array_equal(a, b) for a, b in zip(parity, reference)):
            raise RuntimeError(f"stalwart {be} parity differs from raw ISA-L for RS({k},{m})")
        shards = [None] * m + list(d_in[m:]) + list(p_out)
        out = list(r_out) + [None] * (k - m)
        rs.decode(shards, out=out)
        if not all(np.array_equal(a, b) for a, b in zip(rebuilt, data[:m])):
            raise RuntimeError(f"stalwart {be} failed to rebuild RS({k},{m})")
        e = timeit(lambda rs=rs, d=d_in, p=p_out: rs.encode(d, out=p), repeat)
        d = timeit(lambda rs=rs, s=shards, o=out: rs.decode(s, out=o), repeat)
        row(f"stalwart {be}", e, d)

    if raw is not None:
        every = data + parity
        e = timeit(raw.encoder(k, m, data, parity), repeat)
        dfn = raw.decoder(k, m, every, rebuilt)
        dfn()
        if not all(np.array_equal(a, b) for a, b in zip(rebuilt, data[:m])):
            raise RuntimeError("raw ISA-L decode failed")
        d = timeit(dfn, repeat)
        row("raw ISA-L", e, d)

    try:
        import zfec
    except ImportError:
        zfec = None
    if zfec is not None:
        blocks = [x.tobytes() for x in data]
        zenc = zfec.Encoder(k, k + m)
        want = list(range(k, k + m))
        zpar = zenc.encode(blocks, want)
        zdec = zfec.Decoder(k, k + m)
        have = blocks[m:] + list(zpar)
        nums = list(range(m, k + m))
        if [bytes(b) for b in zdec.decode(have, nums)] != blocks:
            raise RuntimeError("zfec round trip failed")
        e = timeit(lambda: zenc.encode(blocks, want), repeat)
        d = timeit(lambda: zdec.decode(have, nums), repeat)
        row("zfec", e, d, "Vandermonde, own bytes")

    re_enc, re_dec = reedsolo_rates(k, m, small)
    rows.append(
        {
            "code": f"RS({k},{m})",
            "impl": "reedsolo (pure Python)",
            "enc_best": re_enc,
            "enc_median": re_enc,
            "dec_best": re_dec,
            "dec_median": re_dec,
            "note": f"{small // 1024} KiB input, extrapolated",
        }
    )
    return rows


def fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}" if v >= 0.1 else f"{v:.2g}"


def report(rows: list[dict]) -> list[str]:
    lines = []
    hdr = f"{'code':8} {'implementation':24} {'enc GB/s':>9} {'(median)':>9} {'dec GB/s':>9} {'(median)':>9} {'enc/zfec':>9} {'enc/ISA-L':>9} {'dec/ISA-L':>9}  note"
    lines.append(hdr)
    lines.append("-" * len(hdr))
    for code in dict.fromkeys(r["code"] for r in rows):
        group = [r for r in rows if r["code"] == code]
        zf = next((r for r in group if r["impl"] == "zfec"), None)
        isal = next((r for r in group if r["impl"] == "raw ISA-L"), None)
        for r in group:
            vz = f"{r['enc_best'] / zf['enc_best']:.2f}x" if zf else "-"
            vi = f"{r['enc_best'] / isal['enc_best']:.2f}x" if isal else "-"
            di = f"{r['dec_best'] / isal['dec_best']:.2f}x" if isal else "-"
            lines.append(
                f"{code:8} {r['impl']:24} {fmt(r['enc_best']):>9} {fmt(r['enc_median']):>9} "
                f"{fmt(r['dec_best']):>9} {fmt(r['dec_median']):>9} {vz:>9} {vi:>9} {di:>9}  {r['note']}"
            )
    return lines


def targets(rows: list[dict]) -> list[str]:
    out = []

    def get(code: str, impl: str) -> dict | None:
        return next((r for r in rows if r["code"] == code and r["impl"] == impl), None)

    zf = get("RS(4,2)", "zfec")
    for impl in ("stalwart numpy", "stalwart torch"):
        r = get("RS(4,2)", impl)
        if r is None:
            continue
        ok = r["enc_best"] >= TARGET_NUMPY_GBPS
        out.append(
            f"{'MET ' if ok else 'MISS'} {impl} RS(4,2) encode {r['enc_best']:.2f} GB/s per core "
            f"(target >= {TARGET_NUMPY_GBPS:.1f})"
        )
        if zf:
            ratio = r["enc_best"] / zf["enc_best"]
            out.append(
                f"{'MET ' if ratio >= TARGET_VS_ZFEC else 'MISS'} {impl} RS(4,2) encode {ratio:.2f}x zfec "
                f"(target >= {TARGET_VS_ZFEC:.0f}x)"
            )
    for code in dict.fromkeys(r["code"] for r in rows):
        ours, raw = get(code, "stalwart isal"), get(code, "raw ISA-L")
        if ours and raw:
            for op in ("enc", "dec"):
                ratio = ours[f"{op}_best"] / raw[f"{op}_best"]
                out.append(
                    f"{'MET ' if ratio >= TARGET_ISAL_RATIO else 'MISS'} stalwart isal {code} {op}ode "
                    f"{ratio:.2f}x raw ISA-L (target >= {TARGET_ISAL_RATIO}x)"
                )
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(mode: str, args, workdir: str) -> dict:
    n = args.k + args.m
    out = os.path.join(workdir, f"{mode}.json")
    root = os.path.join(workdir, f"root-{mode}")
    shutil.rmtree(root, ignore_errors=True)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={n}", "--nnodes=1", "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{_free_port()}", WORKER, "--mode", mode, "--root", root, "--out", out,
        "--ec", f"{args.k},{args.m}", "--steps", str(args.steps), "--warmup", str(args.warmup),
        "--layout", args.layout, "--layers", str(args.layers), "--d-model", str(args.d_model), "--heads", str(args.heads),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STALWART_LOCAL_WORLD_SIZE": "1",
           "STALWART_KEEPER_GROUP": f"127.0.0.1:{_free_port()}"}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.setdefault("STALWART_SHM_BASE", f"/dev/shm/swbench-ec-{os.getpid()}")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"{mode}: the training job failed ({proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    with open(out) as f:
        return json.load(f)


def bench_overhead(args) -> list[str]:
    """Section (2): the step-time overhead of EC-protected snapshots every step."""
    workdir = tempfile.mkdtemp(prefix="swbench-ec-")
    modes = ("none", "memory", "ec")
    runs: dict[str, list[float]] = {m: [] for m in modes}
    ec_launches: list[list[dict]] = []  # per EC launch: every keeper's status
    params = None
    state_bytes = None
    try:
        for r in range(args.rounds):
            for mode in modes if r % 2 == 0 else modes[::-1]:
                res = _launch(mode, args, workdir)
                runs[mode] += res["step_s"]
                params = res["params"]
                state_bytes = res.get("state_bytes")
                if res.get("ec_keepers"):
                    ec_launches.append(res["ec_keepers"])
                ph = ", ".join(f"{k} {statistics.median(v) * 1e3:.0f}" for k, v in res.get("phases_s", {}).items())
                print(f"  round {r + 1} {mode:6s} median step {statistics.median(res['step_s']) * 1e3:8.1f} ms "
                      f"(rank 0's median ms: {ph})", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(os.environ.get("STALWART_SHM_BASE", f"/dev/shm/swbench-ec-{os.getpid()}"), ignore_errors=True)
    med = {m: statistics.median(v) for m, v in runs.items()}
    over_none = med["ec"] / med["none"] - 1
    over_mem = med["ec"] / med["memory"] - 1
    steps = args.warmup + args.steps
    ec_status = [s for keepers in ec_launches for s in keepers]
    # a snapshot is protected once every keeper has coded its parity of it
    covered = [min(int(s.get("encoded", 0)) for s in keepers) for keepers in ec_launches]
    parity = max((int(s.get("parity_bytes", 0)) for s in ec_status), default=0)
    last = [max(s.get("last_encode_s") or 0 for s in keepers) for keepers in ec_launches]
    group_cpu = [sum(s.get("last_encode_cpu_s") or 0 for s in keepers) for keepers in ec_launches]
    modes = sorted({str(s.get("mode")) for s in ec_status})
    codecs = sorted({str(s.get("codec")) for s in ec_status})
    n = args.k + args.m
    cpu_share = statistics.median(group_cpu) / (1 if args.layout == "node" else n) if group_cpu else float("nan")
    cpu_what = ("all keepers' coding of rank 0's snapshot" if args.layout == "node"
                else "one node's coding thread (the group's total / nodes)")
    state = f"{state_bytes / 1e9:.2f} GB of state" if state_bytes else "state size unknown"
    if args.layout == "node":
        who = (f"rank 0 = the measured node: GPT {params / 1e6:.1f}M params + AdamW ({state}), training thread "
               f"alone on CPU {TRAIN_CPU}; its copy thread, all keepers and {n - 1} stand-in nodes on "
               f"CPU {SPARE_CPU}")
        where = (f"  (CPU {SPARE_CPU} stands for the node's spare cores and copy engine; the step pays the blocking "
                 f"part and memory-bandwidth / cache contention)")
        step_of = "rank 0's"
    else:
        who = (f"GPT {params / 1e6:.1f}M params + AdamW ({state}) per rank under DDP, every process on every one of "
               f"this machine's {os.cpu_count()} cores")
        where = ("  (a keeper's coding CPU is taken from the trainers here; on a cluster it runs on its own node's "
                 "spare cores)")
        step_of = "the slowest rank's"
    lines = [
        f"step-time overhead, RS({args.k},{args.m}) over {n} ranks = nodes, layout {args.layout}: {who}; "
        f"{args.rounds} round(s) x {args.steps} measured steps",
        f"  median step ({step_of}): no checkpoint {med['none'] * 1e3:.1f} ms, memory snapshot every step "
        f"{med['memory'] * 1e3:.1f} ms ({med['memory'] / med['none'] - 1:+.1%}), EC-protected every step "
        f"{med['ec'] * 1e3:.1f} ms",
        f"  protected (coded by every keeper, {'/'.join(modes)}, codec {'/'.join(codecs)}): "
        f"{', '.join(f'{c} of {steps}' for c in covered)} snapshots per launch; the slowest keeper's last encode "
        f"{statistics.median(last) * 1e3 if last else float('nan'):.0f} ms wall; {cpu_what}: "
        f"{cpu_share * 1e3:.0f} ms CPU per snapshot = {cpu_share / med['ec'] * 100:.1f}% of one core at this step "
        f"time; parity held {parity / 1e6:.1f} MB per keeper at most",
        where,
        f"{'MET ' if over_none <= TARGET_OVERHEAD else 'MISS'} EC snapshots every step: {over_none * 100:+.1f}% step time vs "
        f"no checkpoint, {over_mem * 100:+.1f}% vs memory snapshots alone (target <= {TARGET_OVERHEAD * 100:.0f}%)",
    ]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=64, help="data bytes per code, MiB (>= 64 for the claim)")
    ap.add_argument(
        "--repeat", type=int, default=5, help="timed runs per measurement (best and median shown)"
    )
    ap.add_argument("--cpu", type=int, default=0, help="pin to this CPU (-1: do not pin)")
    ap.add_argument("--small-kib", type=int, default=16, help="reedsolo input size, KiB")
    ap.add_argument("--codes", default=",".join(f"{k}+{m}" for k, m in CODES), help="e.g. 4+2,8+2,10+4")
    ap.add_argument("--json", help="also write the rows here")
    ov = ap.add_argument_group("step-time overhead (section 2)")
    ov.add_argument("--no-overhead", dest="overhead", action="store_false", help="skip section 2")
    ov.add_argument("--overhead-only", action="store_true", help="skip section 1 (the codec)")
    ov.add_argument("--k", type=int, default=4, help="data shards (default 4)")
    ov.add_argument("--m", type=int, default=2, help="parity shards (default 2); k + m ranks are launched")
    ov.add_argument("--rounds", type=int, default=2, help="launches of each mode, interleaved (default 2)")
    ov.add_argument("--steps", type=int, default=12, help="measured steps per launch (default 12)")
    ov.add_argument("--warmup", type=int, default=5,
                    help="warm-up steps per launch (default 5: the keeper's three slots are faulted in by then)")
    ov.add_argument("--layout", choices=("node", "shared"), default="node",
                    help="node: one measured 110M-GPT node on its own core, the rest on the other (default); "
                         "shared: every rank trains under DDP on every core")
    ov.add_argument("--layers", type=int, default=None, help="GPT blocks (default 12 for node, 4 for shared)")
    ov.add_argument("--d-model", type=int, default=None, help="GPT width (default 768 for node, 512 for shared)")
    ov.add_argument("--heads", type=int, default=None, help="attention heads (default 12 for node, 8 for shared)")
    args = ap.parse_args()
    node = args.layout == "node"
    args.layers = args.layers or (12 if node else 4)
    args.d_model = args.d_model or (768 if node else 512)
    args.heads = args.heads or (12 if node else 8)
    if node and (os.cpu_count() or 1) < 2:
        ap.error("--layout node needs at least 2 CPUs")
    if args.overhead_only:
        for line in bench_overhead(args):
            print(line)
        return

    if args.cpu >= 0 and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.cpu})
    torch.set_num_threads(1)
    codes = [tuple(int(x) for x in c.split("+")) for c in args.codes.split(",")]
    pinned = f"pinned to CPU {args.cpu}" if args.cpu >= 0 else "not pinned"
    print(
        f"erasure coding, {args.mib} MiB of data per code, best of {args.repeat} (median too), {pinned}, "
        f"torch threads 1"
    )
    rows: list[dict] = []
    for k, m in codes:
        rows += bench_code(k, m, args.mib << 20, args.repeat, args.small_kib << 10)
    for line in report(rows):
        print(line)
    print()
    for line in targets(rows):
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"mib": args.mib, "repeat": args.repeat, "cpu": args.cpu, "rows": rows}, f, indent=1)
    if args.overhead:
        print()
        if hasattr(os, "sched_setaffinity"):  # section 1 pinned this process; its children need every core
            os.sched_setaffinity(0, range(os.cpu_count() or 1))
        for line in bench_overhead(args):
            print(line)


if __name__ == "__main__":
    main()
