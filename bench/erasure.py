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

Sections: (1) codec throughput -- this file. (2) Step-time overhead of protected
snapshots every step -- arrives with the keeper / redundancy-group half of issue 5,
which this codec does not include; it is not measured here.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

CODES = ((4, 2), (8, 2), (10, 4))
TARGET_NUMPY_GBPS = 2.0  # RS(4,2) encode, pure numpy/torch, one core
TARGET_VS_ZFEC = 3.0
TARGET_ISAL_RATIO = 0.8


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=64, help="data bytes per code, MiB (>= 64 for the claim)")
    ap.add_argument(
        "--repeat", type=int, default=5, help="timed runs per measurement (best and median shown)"
    )
    ap.add_argument("--cpu", type=int, default=0, help="pin to this CPU (-1: do not pin)")
    ap.add_argument("--small-kib", type=int, default=16, help="reedsolo input size, KiB")
    ap.add_argument("--codes", default=",".join(f"{k}+{m}" for k, m in CODES), help="e.g. 4+2,8+2,10+4")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()

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
    print(
        "(step-time overhead of protected snapshots: not measured here; it needs the keeper, issue 5 part 2)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"mib": args.mib, "repeat": args.repeat, "cpu": args.cpu, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
