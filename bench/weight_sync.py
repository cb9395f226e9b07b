"""Sparse weight sync vs a full-weight broadcast over the same transport.

For synthetic update densities (0.1 %, 1 %, 5 %, 20 %, 100 % of bf16 elements moved by
1-2 ulp, plus 100 % random bits as the incompressible worst case) and for real
fine-tuning deltas (a small transformer trained with AdamW at RL-like learning rates,
fp32 master weights sent as bf16, and as fp32), one trainer process syncs one
receiver process. Each row reports, per sync (median of --reps):

* wire bytes of the sparse update vs the full broadcast of the same weights;
* wall time of ``sender.sync()`` (encode, send, receiver apply + digest check, ACK,
  baseline commit) vs a plain full-weight broadcast over the same transport (TCP:
  raw ``sendall``/``recv_into`` of every tensor; dist: ``dist.broadcast`` of every
  tensor; shm: copy into a shared segment and out again);
* encode and apply throughput in GB/s of model bytes per core: the same library code
  (encode incl. digests, bucket checksums and baseline commit; apply incl. checksum
  checks and the digest check of every tensor) run on one thread of the benchmark
  process, timed in that thread's CPU seconds (``torch.set_num_threads(1)``; numpy
  and zstd are single-threaded here). Measured on the unpaced runs only ("-"
  elsewhere: the deltas are the same).

A third part tries it as a new user would (``--newuser``): a 0.1 M-parameter bf16
transformer, one trainer and two rollout processes over ``DistTransport`` (gloo), one
rollout loaded with the trainer's own initial weights and one with different ones. It
reports the first sync's bytes per receiver against a full broadcast, and a change of
1 % of the elements by +1.0 (values that do not compress) against the 3 bytes per
change of 2-byte values plus 1-byte gaps.

    python bench/weight_sync.py                  # TCP, 64 M-param synthetic model + fine-tuning
    python bench/weight_sync.py --transport all  # also shm and torch.distributed (gloo)
    python bench/weight_sync.py --newuser-only   # only the new-user run (about 20 s)
    python bench/weight_sync.py --against ee3ba1d --reps 6   # encode+apply vs an earlier revision
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time
import uuid

import numpy as np
import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from stalwart.sync import (  # noqa: E402
    DistTransport,
    ShmTransport,
    SyncStats,
    TcpTransport,
    WeightSyncReceiver,
    WeightSyncSender,
)
from stalwart.sync.adapters import Destination, ModelAdapter  # noqa: E402
from stalwart.sync.baseline import Baseline  # noqa: E402
from stalwart.sync.codec import Decoder, Encoder, words_np  # noqa: E402
from stalwart.sync.names import NameMapper  # noqa: E402
from stalwart.sync.sender import COMMIT_LOG_FRACTION  # noqa: E402
from stalwart.sync.source import Source  # noqa: E402
from stalwart.sync.stream import StreamResult, apply_bucket, encode_stream, plan_chunks  # noqa: E402
from stalwart.sync.transports._stream import Pacer, send_all  # noqa: E402
from stalwart.sync.transports.base import SendBuffer  # noqa: E402
from stalwart.sync.wire import HEADER_SIZE, parse_header  # noqa: E402

CTX = mp.get_context("spawn")
GB = 1e9


# ---------------------------------------------------------------- models


def synthetic_spec(layers: int, d: int) -> list[tuple[str, tuple[int, ...]]]:
    ff = int(d * 2.75) // 64 * 64
    spec = []
    for i in range(layers):
        p = f"layers.{i}."
        spec += [(p + n, (d, d)) for n in ("q", "k", "v", "o")]
        spec += [(p + "gate", (ff, d)), (p + "up", (ff, d)), (p + "down", (d, ff))]
        spec += [(p + "norm1", (d,)), (p + "norm2", (d,))]
    return spec


def make_tensors(spec, dtype, seed) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: (torch.randn(s, generator=g) * 0.02).to(dtype) for n, s in spec}


class TinyLM(torch.nn.Module):
    def __init__(self, vocab=8192, d=384, layers=4) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d)
        layer = torch.nn.TransformerEncoderLayer(d, max(1, d // 64), 4 * d, dropout=0.0, batch_first=True)
        self.body = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = torch.nn.Linear(d, vocab)

    def forward(self, tok):
        return self.head(self.body(self.emb(tok)))


def perturb(
    tensors: dict[str, torch.Tensor],
    density: float,
    rng: np.random.Generator,
    random_bits: bool,
    plus: float = 0.0,
) -> None:
    """Move ``density`` of all elements (bf16) by 1-2 ulp, to random bits, or (``plus``) by that value."""
    for t in tensors.values():
        w = words_np(t)
        n = len(w)
        if plus:
            idx = np.flatnonzero(rng.random(n) < density)
            ti = torch.from_numpy(idx)
            flat = t.view(-1)
            flat[ti] = flat[ti] + plus
            continue
        if density >= 1.0:
            if random_bits:
                w[:] = rng.integers(-32768, 32767, size=n, dtype=np.int16)
            else:
                w += rng.integers(1, 3, size=n, dtype=np.int16)
            continue
        k = rng.binomial(n, density)
        idx = rng.integers(0, n, size=k)
        w[idx] += rng.integers(1, 3, size=k, dtype=np.int16)


# ---------------------------------------------------------------- receiver process


def receiver_proc(conn, threads: int) -> None:
    torch.set_num_threads(threads)
    r = tensors = None
    raw = None
    while True:
        cmd = conn.recv()
        op = cmd[0]
        if op == "open":
            _, kind, arg, spec = cmd
            tensors = {n: torch.zeros(s, dtype=getattr(torch, dt)) for n, s, dt in spec}
            if kind == "dist":
                store = torch.distributed.TCPStore(
                    "127.0.0.1", arg["store"], 2, False, timeout=datetime.timedelta(seconds=60)
                )
                torch.distributed.init_process_group("gloo", store=store, rank=1, world_size=2)
                transport = DistTransport(src=0, timeout=600)
            elif kind == "tcp":
                transport = TcpTransport("127.0.0.1", arg["port"])
                raw = arg["raw_port"]
            else:
                transport = ShmTransport(arg["name"])
                raw = arg["raw_name"]
            r = WeightSyncReceiver(tensors, transport, receiver_id="bench")
            conn.send("ok")
        elif op == "recv":
            st = r.receive()
            conn.send((st.version, st.apply_s, st.verify_s))
        elif op == "full":
            kind = cmd[1]
            t0 = time.perf_counter()
            if kind == "tcp":
                with socket.create_connection(("127.0.0.1", raw)) as s:
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    for t in tensors.values():
                        mv = memoryview(words_np(t)).cast("B")
                        got = 0
                        while got < len(mv):
                            got += s.recv_into(mv[got:], len(mv) - got)
                    s.sendall(b"k")
            elif kind == "dist":
                for t in tensors.values():
                    torch.distributed.broadcast(t, src=0)
                torch.distributed.barrier()
            else:
                from multiprocessing import shared_memory

                conn.send("ready")
                conn.recv()
                shm = shared_memory.SharedMemory(raw)
                off = 0
                buf = np.frombuffer(shm.buf, dtype=np.uint8)
                for t in tensors.values():
                    b = words_np(t).view(np.uint8)
                    b[:] = buf[off : off + b.size]
                    off += b.size
                del buf, b
                shm.close()
            conn.send(time.perf_counter() - t0)
        elif op == "close":
            r.close()
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
            conn.send("ok")
        elif op == "quit":
            return


# ---------------------------------------------------------------- sender side


class Session:
    """One receiver process, one sender, and the raw full-broadcast baseline over the same transport."""

    def __init__(
        self,
        kind: str,
        tensors: dict,
        dtype: torch.dtype | None,
        compression: str,
        bucket_bytes: int,
        rate: float | None,
    ) -> None:
        self.kind = kind
        self.rate = rate
        self.tensors = tensors
        self.conn, child = CTX.Pipe()
        self.proc = CTX.Process(target=receiver_proc, args=(child, 1), daemon=True)
        self.proc.start()
        wire_dt = {
            n: (dtype if dtype is not None and t.is_floating_point() else t.dtype) for n, t in tensors.items()
        }
        spec = [(n, tuple(t.shape), str(wire_dt[n]).replace("torch.", "")) for n, t in tensors.items()]
        self.model_bytes = sum(
            t.numel() * torch.empty((), dtype=wire_dt[n]).element_size() for n, t in tensors.items()
        )
        self.raw_sock = None
        self.shm = None
        if kind == "tcp":
            transport = TcpTransport("127.0.0.1", 0, max_rate=rate)
            self.raw_sock = socket.create_server(("127.0.0.1", 0))
            arg = {"raw_port": self.raw_sock.getsockname()[1]}
        elif kind == "shm":
            from multiprocessing import shared_memory

            name = f"bench-{uuid.uuid4().hex[:8]}"
            transport = ShmTransport(name)
            self.shm = shared_memory.SharedMemory(create=True, size=self.model_bytes)
            arg = {"name": name, "raw_name": self.shm.name}
        else:
            store = torch.distributed.TCPStore(
                "127.0.0.1", 0, 2, True, timeout=datetime.timedelta(seconds=60), wait_for_workers=False
            )
            arg = {"store": store.port}
            self.conn.send(("open", kind, arg, spec))
            torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=2)
            transport = DistTransport(src=0, timeout=600)
        self.sender = WeightSyncSender(
            tensors,
            transport,
            num_receivers=1,
            dtype=dtype,
            compression=compression,
            bucket_bytes=bucket_bytes,
        )
        if kind == "tcp":
            arg["port"] = transport.port
        if kind != "dist":
            self.conn.send(("open", kind, arg, spec))
        assert self.conn.recv() == "ok"

    def sync(self):
        self.conn.send(("recv",))
        st = self.sender.sync()
        v, _apply_s, _verify_s = self.conn.recv()
        assert v == st.version
        return st

    def full(self) -> float:
        """Wall time of a plain full-weight broadcast of the same (wire-dtype) weights."""
        src = self.sender.source  # the weights as sent (cast outside the timed part, favouring the baseline)
        order = [
            src.schema.index[n] for n in self.tensors
        ]  # the receiver's order (the sender lists small ones last)
        flat = [words_np(src.tensors[i].to(src.schema[i].dtype).contiguous()) for i in order]
        self.conn.send(("full", self.kind))
        if self.kind == "tcp":
            c, _ = self.raw_sock.accept()
            with c:
                c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                c.settimeout(600)
                pacer = Pacer(self.rate) if self.rate else None
                t0 = time.perf_counter()
                for f in flat:
                    send_all(c, [f], "full broadcast", 600, pacer)
                assert c.recv(1) == b"k"
                dt = time.perf_counter() - t0
        elif self.kind == "dist":
            t0 = time.perf_counter()
            for f, i in zip(flat, order):  # same dtype as the receiver's tensors (gloo matches by type)
                torch.distributed.broadcast(torch.from_numpy(f).view(src.schema[i].dtype), src=0)
            torch.distributed.barrier()
            dt = time.perf_counter() - t0
        else:
            assert self.conn.recv() == "ready"
            t0 = time.perf_counter()
            buf = np.frombuffer(self.shm.buf, dtype=np.uint8)
            off = 0
            for f in flat:
                b = f.view(np.uint8)
                buf[off : off + b.size] = b
                off += b.size
            del buf
            self.conn.send("go")
        self.conn.recv()
        if self.kind == "shm":
            dt = time.perf_counter() - t0
        return dt

    def close(self) -> None:
        self.conn.send(("close",))
        self.conn.recv()
        self.sender.close()
        self.conn.send(("quit",))
        self.proc.join(30)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        if self.raw_sock is not None:
            self.raw_sock.close()
        if self.shm is not None:
            self.shm.close()
            self.shm.unlink()


class IsolatedCodec:
    """The sender's and a receiver's per-sync work, run back to back on this one thread.

    Same library code as a real sync (``encode_stream`` incl. tensor digests and bucket
    checksums, baseline commit; ``apply_bucket`` incl. checksum checks, then the digest
    check of every tensor), minus the transport, so the numbers are per core and not
    disturbed by the other process sharing this machine's two cores.
    """

    def __init__(
        self, tensors, dtype, compression: str, bucket_bytes: int, chunk_words: int = 1 << 20
    ) -> None:
        self.cw = chunk_words
        self.source = Source(tensors, dtype=dtype, include_buffers=True, chunk_words=chunk_words)
        schema = self.source.refresh()
        self.baseline = Baseline(schema, [torch.device("cpu")] * len(schema))
        self.baseline.commit(self.source, 0, None, chunk_words)
        self.recv = {}
        for i, spec in enumerate(schema):
            t = torch.empty(spec.shape, dtype=spec.dtype)
            words_np(t)[:] = self.baseline.words[i].numpy()
            self.recv[spec.name] = t
        self.dest = Destination(schema, ModelAdapter(self.recv), NameMapper())
        self.encoder = Encoder(chunk_words, compression=compression)
        self.chunks = plan_chunks(schema, chunk_words)
        self.buf = SendBuffer(np.zeros(bucket_bytes, np.uint8))
        self.version = 0

    def measure(self) -> tuple[float, float]:
        """CPU seconds (this thread) to (encode, apply) the current delta; leaves both sides at the new weights.

        CPU time rather than wall time: this machine's two cores are shared with the
        receiver process and with whatever else runs, and time spent descheduled is not
        the codec's cost.
        """
        clock = time.thread_time
        self.version += 1
        schema = self.source.refresh()
        res = StreamResult()
        frames = []
        it = encode_stream(
            self.version, "delta", schema, self.source, self.baseline, self.encoder, self.chunks, lambda: self.buf,
            lambda b: None, res, None, int(COMMIT_LOG_FRACTION * schema.nbytes),
        )  # fmt: skip
        enc = 0.0
        while True:
            t = clock()
            item = next(it, None)
            enc += clock() - t
            if item is None:
                break
            frames.append(bytes(item[0].data[: item[1]]))  # the "send" (not counted)
        t = clock()
        self.baseline.commit(self.source, self.version, res.dirty, self.cw, res.log)
        enc += clock() - t
        t = clock()
        dec, touched = Decoder(), set()
        self.dest.begin_digests()
        for f in frames:
            a = np.frombuffer(f, dtype=np.uint8)
            apply_bucket(parse_header(a[:HEADER_SIZE]), a[HEADER_SIZE:], self.dest, dec, "bucket", touched)
        for i, got in enumerate(self.dest.finish_digests()):
            if got != res.digests[i]:
                raise AssertionError(f"isolated codec: {schema[i].name} differs after apply")
        return enc, clock() - t


def med(xs):
    return statistics.median(xs)


def row(
    label: str, sess: Session, stats: list, fulls: list[float], codec: list[tuple[float, float]] | None
) -> dict:
    mb = sess.model_bytes
    if codec:  # isolated, per core
        enc = med([c[0] for c in codec])
        app = med([c[1] for c in codec])
    else:  # not measured for this row
        enc = app = float("nan")
    return {
        "case": label,
        "changed": med([s.density for s in stats]),
        "wire": int(med([s.wire_bytes for s in stats])),
        "per_change": med([s.wire_bytes / max(1, s.changed_elements) for s in stats]),
        "full": mb,
        "t_sync": med([s.total_s for s in stats]),
        "t_full": med(fulls),
        "enc": mb / enc / GB,
        "app": mb / app / GB,
        "both": mb / (enc + app) / GB,
        "enc_idx": dict(stats[-1].index_encodings),
        "enc_val": dict(stats[-1].value_encodings),
    }


def print_table(title: str, rows: list[dict], mb: int) -> None:
    print(f"\n## {title}  (model {mb / 1e6:.1f} MB as sent, medians)")
    hdr = (
        f"| {'case':<26} | {'changed':>8} | {'wire bytes':>12} | {'full bytes':>12} | {'bytes vs full':>13} "
        f"| {'B/change':>8} "
        f"| {'sync s':>7} | {'full s':>7} | {'time vs full':>12} | {'encode GB/s':>11} | {'apply GB/s':>10} "
        f"| {'enc+apply GB/s':>14} |"
    )
    print(hdr)
    print("|" + "|".join("-" * (len(c)) for c in hdr.split("|")[1:-1]) + "|")
    for r in rows:
        ratio = r["full"] / r["wire"]
        rs = f"{ratio:.1f}x fewer" if ratio >= 1 else f"{1 / ratio:.3f}x of full"
        tr = r["t_full"] / r["t_sync"]
        ts = f"{tr:.2f}x faster" if tr >= 1 else f"{1 / tr:.2f}x slower"

        def g(x, width):
            return f"{x:>{width}.2f}" if x == x else f"{'-':>{width}}"

        print(
            f"| {r['case']:<26} | {100 * r['changed']:>7.2f}% | {r['wire']:>12,} | {r['full']:>12,} | {rs:>13} "
            f"| {r['per_change']:>8.2f} "
            f"| {r['t_sync']:>7.3f} | {r['t_full']:>7.3f} | {ts:>12} | {g(r['enc'], 11)} | {g(r['app'], 10)} "
            f"| {g(r['both'], 14)} |"
        )


def link_name(kind: str, rate: float | None) -> str:
    return (
        f"{kind}, link paced to {rate * 8 / 1e9:g} Gb/s"
        if rate
        else f"{kind} (loopback, no pacing)"
        if kind == "tcp"
        else kind
    )


def synthetic(kind: str, args, rate: float | None) -> None:
    spec = synthetic_spec(args.layers, args.d)
    tensors = make_tensors(spec, torch.bfloat16, 0)
    sess = Session(kind, tensors, None, args.compression, args.bucket_mb << 20, rate)
    iso = IsolatedCodec(tensors, None, args.compression, args.bucket_mb << 20) if rate is None else None
    rng = np.random.default_rng(0)
    rows = []
    try:
        first = sess.sync()  # full sync: receiver starts with zeros
        rows.append(row("first sync (full)", sess, [first], [sess.full()], None))
        cases = [(0.001, False, 0.0), (0.01, False, 0.0), (0.01, False, 1.0)]  # (+1.0 before the random bits)
        cases += [(d, False, 0.0) for d in (0.05, 0.2, 1.0)] + [(1.0, True, 0.0)]
        for density, rnd, plus in cases:
            stats, fulls, codec = [], [], []
            for _ in range(args.reps):
                perturb(tensors, density, rng, rnd, plus)
                if iso is not None:
                    codec.append(iso.measure())
                stats.append(sess.sync())
                fulls.append(sess.full())
            label = f"{100 * density:g}% " + ("random bits" if rnd else f"+{plus:g}" if plus else "+-1-2 ulp")
            rows.append(row(label, sess, stats, fulls, codec))
            if args.verbose:
                print(label, rows[-1]["enc_idx"], rows[-1]["enc_val"], flush=True)
    finally:
        sess.close()
    print_table(f"synthetic bf16 deltas over {link_name(kind, rate)}", rows, sess.model_bytes)


def finetune(kind: str, args, rate: float | None) -> None:
    torch.manual_seed(0)
    model = TinyLM(d=args.ft_d, layers=args.ft_layers)
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, 8192, (64, 4, 65), generator=g)
    all_rows = []
    for wire in ("bf16", "fp32"):
        for lr in (1e-6, 1e-5):
            torch.manual_seed(0)
            model = TinyLM(d=args.ft_d, layers=args.ft_layers)
            opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
            dtype = torch.bfloat16 if wire == "bf16" else None
            params = dict(model.named_parameters())  # live views: the sender reads them each sync
            sess = Session(kind, params, dtype, args.compression, args.bucket_mb << 20, rate)
            iso = (
                IsolatedCodec(params, dtype, args.compression, args.bucket_mb << 20) if rate is None else None
            )
            stats, fulls, codec = [], [], []
            try:
                sess.sync()
                for step in range(args.ft_steps):
                    tok = data[step % len(data)]
                    out = model(tok[:, :-1])
                    loss = torch.nn.functional.cross_entropy(out.reshape(-1, 8192), tok[:, 1:].reshape(-1))
                    loss.backward()
                    opt.step()
                    opt.zero_grad()
                    if iso is not None:
                        codec.append(iso.measure())
                    stats.append(sess.sync())
                    fulls.append(sess.full())
            finally:
                sess.close()
            label = f"AdamW lr {lr:g}, fp32->{wire}"
            all_rows.append(row(label, sess, stats, fulls, codec))
            if args.verbose:
                print(label, all_rows[-1]["enc_idx"], all_rows[-1]["enc_val"], flush=True)
    nparams = sum(p.numel() for p in model.parameters())
    print_table(
        f"real fine-tuning deltas ({nparams / 1e6:.1f} M-param transformer, 1 step per sync) over {link_name(kind, rate)}",
        all_rows, sess.model_bytes,
    )  # fmt: skip


# ---------------------------------------------------------------- as a new user tries it


class NewUserLM(torch.nn.Module):
    """About 0.1 M parameters: the model a new user tries the library with first."""

    def __init__(self, vocab=128, d=64, layers=2) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d)
        layer = torch.nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=True)
        self.body = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(d)
        self.head = torch.nn.Linear(d, vocab)


def newuser_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return NewUserLM().to(torch.bfloat16)


def newuser_rollout(conn, port: int, rank: int, seed: int, syncs: int) -> None:
    torch.set_num_threads(1)
    store = torch.distributed.TCPStore("127.0.0.1", port, 3, False, timeout=datetime.timedelta(seconds=60))
    torch.distributed.init_process_group("gloo", store=store, rank=rank, world_size=3)
    r = WeightSyncReceiver(
        newuser_model(seed), DistTransport(src=0, timeout=120), receiver_id=f"rollout{rank}"
    )
    for _ in range(syncs):
        st = r.receive()
        conn.send((st.version, st.mode, st.bytes_received))
    r.close()
    torch.distributed.destroy_process_group()


def newuser(args) -> None:
    """Trainer (this process, rank 0) and two rollout processes over DistTransport (gloo)."""
    syncs = 1 + args.reps
    store = torch.distributed.TCPStore(
        "127.0.0.1", 0, 3, True, timeout=datetime.timedelta(seconds=60), wait_for_workers=False
    )
    conns, procs = [], []
    for rank, seed in ((1, 0), (2, 1)):  # rank 1: the trainer's own initial weights; rank 2: others
        a, b = CTX.Pipe()
        p = CTX.Process(target=newuser_rollout, args=(b, store.port, rank, seed, syncs), daemon=True)
        p.start()
        conns.append(a)
        procs.append(p)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=3)
    model = newuser_model(0)
    nparams = sum(p.numel() for p in model.parameters())
    sender = WeightSyncSender(model, DistTransport(src=0, timeout=120))
    g = torch.Generator().manual_seed(7)
    stats: list[SyncStats] = []
    got: list[list] = []
    try:
        for v in range(1, syncs + 1):
            if v > 1:
                with torch.no_grad():
                    for p in model.parameters():
                        p[torch.rand(p.shape, generator=g) < 0.01] += 1.0
            stats.append(sender.sync())
            got.append([c.recv() for c in conns])
    finally:
        sender.close()
        for p in procs:
            p.join(60)
        torch.distributed.destroy_process_group()
    mb = stats[0].model_bytes
    print(
        f"\n## as a new user tries it: {nparams / 1e6:.2f} M-param bf16 transformer ({mb:,} bytes),"
        f" trainer + 2 rollouts over DistTransport (gloo)"
    )
    print(
        "| sync | receiver | bytes | full broadcast bytes | vs full | 3 B/change (2-byte value + 1-byte gap) | vs that |"
    )
    print("|---|---|---|---|---|---|---|")
    for (_, mode, nb), who in zip(got[0], ("same initial weights", "other initial weights")):
        print(f"| first ({mode}) | {who} | {nb:,} | {mb:,} | {nb / mb:.4f}x | - | - |")
    first = stats[0]
    print(
        f"| first (total) | both | {first.wire_bytes:,} | {first.broadcast_bytes:,} |"
        f" {first.wire_bytes / first.broadcast_bytes:.4f}x | - | - |"
    )
    per = [nb for row in got[1:] for (_, _, nb) in row]
    changed = [s.changed_elements for s in stats[1:]]
    b, c = med(per), med(changed)
    print(
        f"| 1 % +1.0 (median of {len(changed)}) | each | {int(b):,} | {mb:,} | {mb / b:.1f}x fewer | {3 * int(c):,}"
        f" ({int(c):,} changed) | {b / (3 * c):.3f}x |"
    )


# ---------------------------------------------------------------- against an earlier version of the code

# Runs in a fresh interpreter with one source tree first on sys.path, so the tree's own
# bench/weight_sync.py (IsolatedCodec, models, perturbations) and stalwart are the ones
# measured. Prints one JSON line: model bytes and per-sync (encode, apply) CPU seconds.
_CODEC_DRIVER = r"""
import json, sys
root, case, reps = sys.argv[1], sys.argv[2], int(sys.argv[3])
sys.path[:0] = [root, root + "/bench"]
import numpy as np, torch
torch.set_num_threads(1)
import weight_sync as ws
out = []
if case == "real":
    torch.manual_seed(0)
    model = ws.TinyLM(d=384, layers=4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.01)
    params = dict(model.named_parameters())
    iso = ws.IsolatedCodec(params, torch.bfloat16, "auto", 16 << 20)
    data = torch.randint(0, 8192, (64, 4, 65), generator=torch.Generator().manual_seed(1))
    mb = sum(p.numel() * 2 for p in params.values())
    for i in range(reps + 1):
        tok = data[i % 64]
        loss = torch.nn.functional.cross_entropy(model(tok[:, :-1]).reshape(-1, 8192), tok[:, 1:].reshape(-1))
        loss.backward(); opt.step(); opt.zero_grad()
        out.append(iso.measure())
else:
    tensors = ws.make_tensors(ws.synthetic_spec(5, 1024), torch.bfloat16, 0)
    iso = ws.IsolatedCodec(tensors, None, "auto", 16 << 20)
    rng = np.random.default_rng(0)
    mb = sum(t.numel() * 2 for t in tensors.values())
    for i in range(reps + 1):
        ws.perturb(tensors, 1.0 if case == "random" else float(case), rng, case == "random")
        out.append(iso.measure())
print(json.dumps({"model_bytes": mb, "syncs": out[1:]}))
"""


_AGAINST_LABELS = {"random": "100% random bits (64M-param bf16)", "real": "real AdamW lr 1e-6, fp32->bf16"}


def against(rev: str, rounds: int, reps: int, which: list[str]) -> None:
    """Encode + apply throughput of this tree and of git revision ``rev``, alternating runs."""
    import json
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="stalwart-against-") as old:
        arch = subprocess.run(["git", "-C", _ROOT, "archive", rev, "stalwart", "bench"], capture_output=True)
        if arch.returncode:
            raise SystemExit(f"cannot read revision {rev!r}: {arch.stderr.decode().strip()}")
        subprocess.run(["tar", "-x", "-C", old], input=arch.stdout, check=True)
        cases = [
            (c, _AGAINST_LABELS.get(c) or f"{100 * float(c):g}% +-1-2 ulp (64M-param bf16)") for c in which
        ]
        got: dict = {}
        for _ in range(rounds):
            for case, _label in cases:
                for who, root in (("before", old), ("now", _ROOT)):
                    r = subprocess.run(
                        [sys.executable, "-c", _CODEC_DRIVER, root, case, str(reps)],
                        capture_output=True,
                        text=True,
                    )
                    if r.returncode:
                        raise SystemExit(f"{who} ({root}) failed on {case}:\n{r.stderr[-2000:]}")
                    res = json.loads(r.stdout.strip().splitlines()[-1])
                    mb = res["model_bytes"]
                    got.setdefault((case, who), []).extend(mb / (e + a) / GB for e, a in res["syncs"])
    print(
        f"\n## encode + apply GB/s per core, this tree against {rev} (alternating runs, {rounds} x {reps} syncs each)"
    )
    print("| case | before median (min-max) | now median (min-max) | now / before |")
    print("|---|---|---|---|")
    for case, label in cases:
        b, n = got[(case, "before")], got[(case, "now")]
        print(
            f"| {label} | {med(b):.2f} ({min(b):.2f}-{max(b):.2f}) | {med(n):.2f} ({min(n):.2f}-{max(n):.2f})"
            f" | {med(n) / med(b):.2f}x |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--transport", default="tcp", choices=["tcp", "shm", "dist", "all"])
    ap.add_argument("--layers", type=int, default=5, help="synthetic model layers")
    ap.add_argument(
        "--d", type=int, default=1024, help="synthetic model width (5 x 1024: 64 M params, 128 MB bf16)"
    )
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--ft-d", type=int, default=384)
    ap.add_argument("--ft-layers", type=int, default=4)
    ap.add_argument("--ft-steps", type=int, default=4)
    ap.add_argument("--compression", default="auto", choices=["auto", "always", "off"])
    ap.add_argument("--bucket-mb", type=int, default=16)
    ap.add_argument("--skip-finetune", action="store_true")
    ap.add_argument(
        "--link-gbps", default="0,1", help="TCP: comma-separated link rates to emulate by pacing both the sync and the"
        " full broadcast (0 = loopback, unpaced)",
    )  # fmt: skip
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--newuser-only", action="store_true", help="only the new-user DistTransport run")
    ap.add_argument(
        "--against", metavar="REV", help="only compare encode + apply throughput with git revision REV"
    )
    ap.add_argument("--rounds", type=int, default=3, help="--against: alternating rounds")
    ap.add_argument(
        "--cases",
        default="0.01,0.05,real",
        help="--against: densities, 'real' (fine-tuning), 'random' (random bits)",
    )
    ap.add_argument("--skip-newuser", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    kinds = ["tcp", "shm", "dist"] if args.transport == "all" else [args.transport]
    t0 = time.perf_counter()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"# weight sync benchmark: {', '.join(kinds)}; torch {torch.__version__}, {os.cpu_count()} CPUs,"
        f" 1 thread per process; load average at start {load}"
    )
    if args.against:
        against(args.against, args.rounds, args.reps, args.cases.split(","))
        print(f"\ntotal {time.perf_counter() - t0:.0f} s")
        return
    if not args.skip_newuser:
        newuser(args)
    if args.newuser_only:
        print(f"\ntotal {time.perf_counter() - t0:.0f} s")
        return
    for kind in kinds:
        rates = [float(g) * 1e9 / 8 or None for g in args.link_gbps.split(",")] if kind == "tcp" else [None]
        for rate in rates:
            synthetic(kind, args, rate)
            if not args.skip_finetune and kind == kinds[0]:
                finetune(kind, args, rate)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
