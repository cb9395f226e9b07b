"""The trainer's side: :class:`WeightSyncSender`.

One ``sync()``:

1. waits until ``num_receivers`` receivers are connected;
2. receivers that hold the baseline version get a *delta* stream, all others (new,
   restarted, stale) a *full* stream; each stream is BEGIN, BUCKET..., END. A full
   BEGIN carries every tensor's digest and each receiver answers which tensors it
   lacks (NEED), so weights a receiver already holds (loaded from the same checkpoint,
   or kept through a trainer restart or a failed update) are not sent again;
3. an encoder thread fills bounded buckets into the transport's send buffers while
   the calling thread sends the previous one (double buffering);
4. each receiver applies, checks the whole-model digest and acknowledges; a receiver
   that reports a corrupt or partial update, or that dropped and came back, gets a
   full sync of the same version (each cause logged to ``stalwart.sync``);
5. once every receiver acknowledged, the baseline advances (changed chunks only).

If receivers are missing at the end (gone for longer than ``reconnect_timeout``, or
``max_resyncs`` exhausted) ``sync()`` raises :class:`~stalwart.sync.errors.SyncError`
and the baseline does not advance; receivers that did acknowledge the version keep
it and are sent a full sync next time.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections import Counter

import numpy as np
import torch

from stalwart.sync.baseline import Baseline
from stalwart.sync.codec import ENTRY_OVERHEAD, Encoder
from stalwart.sync.errors import ProtocolError, SyncError, TransportError
from stalwart.sync.schema import Schema
from stalwart.sync.source import ModelLike, Source
from stalwart.sync.stats import SyncStats
from stalwart.sync.stream import Chunk, StreamResult, digest_all, encode_stream, plan_chunks
from stalwart.sync.transports.base import Peer, Transport
from stalwart.sync.wire import (
    HEADER_SIZE,
    Begin,
    Kind,
    bin_digest,
    pack_begin,
    pack_end,
    pack_header,
    parse_json,
    parse_need,
    verify_payload,
)

log = logging.getLogger("stalwart.sync")

_DONE = object()
COMMIT_LOG_FRACTION = 0.25  # default: sparse bf16 changes up to 5 % density are logged, not re-read


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class WeightSyncSender:
    """Pushes a model's weights to rollout receivers, sending only the bits that changed.

    Args:
        model: the trainer's model (``nn.Module``), a mapping of name -> tensor, or a
            callable returning one (e.g. a gathered full state dict). It must not be
            modified while ``sync()`` runs.
        transport: :class:`DistTransport`, :class:`ShmTransport` or :class:`TcpTransport`.
        num_receivers: receivers that must hold each version before ``sync()`` returns
            (default: every other rank for ``DistTransport``, else 1). More may connect.
        dtype: send floating-point tensors in this dtype (e.g. ``torch.bfloat16`` for
            rollout engines fed from fp32 master weights); default: as they are.
        bucket_bytes: size of one bucket (frame); two are allocated (double buffering).
        chunk_words: words compared and encoded at a time (bounds scratch memory).
        baseline: ``"host"`` (CPU memory) or ``"device"`` (next to each tensor).
        pin_baseline: pin a host baseline (faster copies from CUDA).
        compression: ``"auto"``, ``"always"`` or ``"off"`` (XOR+zstd for changed values).
        include_buffers: also sync persistent buffers of an ``nn.Module``.
        connect_timeout: how long ``sync()`` waits for ``num_receivers`` to be connected.
        ack_timeout: how long a receiver may take to apply, verify and acknowledge.
        reconnect_timeout: how long to wait for a receiver that dropped to come back.
        max_resyncs: full resyncs per receiver within one ``sync()`` before giving up.
        start_version: versions continue after this (pass the last one on a restart).
        commit_log_fraction: memory (as a fraction of the model's wire bytes) for keeping
            sparse changes (8-byte index + new word each) for the baseline, instead of
            re-reading their chunks at the commit.
    """

    def __init__(
        self,
        model: ModelLike,
        transport: Transport,
        *,
        num_receivers: int | None = None,
        dtype: torch.dtype | None = None,
        bucket_bytes: int = 16 << 20,
        chunk_words: int = 1 << 20,
        baseline: str = "host",
        pin_baseline: bool = False,
        compression: str = "auto",
        zstd_level: int = 1,
        include_buffers: bool = True,
        connect_timeout: float = 300.0,
        ack_timeout: float = 300.0,
        reconnect_timeout: float = 60.0,
        max_resyncs: int = 3,
        start_version: int = 0,
        commit_log_fraction: float = COMMIT_LOG_FRACTION,
    ) -> None:
        self.commit_log_fraction = float(commit_log_fraction)
        if baseline not in ("host", "device"):
            raise ValueError(f"baseline must be 'host' or 'device', got {baseline!r}")
        if bucket_bytes < 1 << 16:
            raise ValueError("bucket_bytes must be at least 64 KiB")
        self.transport = transport
        self.bucket_bytes = int(bucket_bytes)
        self.chunk_words = max(
            1, min(int(chunk_words), (self.bucket_bytes - HEADER_SIZE - ENTRY_OVERHEAD) // 8)
        )
        self.baseline_where = baseline
        self.pin_baseline = pin_baseline
        self.connect_timeout = float(connect_timeout)
        self.ack_timeout = float(ack_timeout)
        self.reconnect_timeout = float(reconnect_timeout)
        self.max_resyncs = int(max_resyncs)
        self.version = int(start_version)
        self.session = uuid.uuid4().hex[:16]
        self.source = Source(
            model, dtype=dtype, include_buffers=include_buffers, chunk_words=self.chunk_words
        )
        self.encoder = Encoder(self.chunk_words, compression=compression, zstd_level=zstd_level)
        self.baseline: Baseline | None = None
        self.link = transport.open_sender(frame_bytes=self.bucket_bytes, buffers=2)
        self.num_receivers = num_receivers
        self._closed = False
        self._chunks: tuple[Schema, list[Chunk]] | None = None
        self._digests: list[bytes] | None = None  # per-tensor digests of the version being synced
        self._full_words = 0

    # -- public ------------------------------------------------------------------------

    @property
    def baseline_version(self) -> int | None:
        """The version every receiver acknowledged last (what deltas are computed from)."""
        return self.baseline.version if self.baseline is not None else None

    def close(self) -> None:
        """Close the transport end (receivers see the connection end). Idempotent."""
        if not self._closed:
            self._closed = True
            self.link.close()

    def __enter__(self) -> WeightSyncSender:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def sync(self) -> SyncStats:
        """Bring every receiver to the model's current weights; returns what it cost."""
        if self._closed:
            raise SyncError("sender is closed")
        t0 = time.perf_counter()
        schema = self.source.refresh()
        if self.baseline is not None and self.baseline.schema is not schema:
            log.warning(
                "weight sync: the model's tensors changed (names, shapes or dtypes); every receiver gets a full sync"
            )
            self.baseline = None
        self.version += 1
        v = self.version
        self._digests = None
        self._full_words = 0
        st = SyncStats(version=v, tensors=len(schema), total_elements=schema.numel, model_bytes=schema.nbytes)
        need = self.num_receivers
        if need is None:
            need = 1 if self.link.dynamic_peers else 0
        peers = self.link.wait_peers(need, self.connect_timeout)
        if not self.link.dynamic_peers and need == 0:
            need = len(peers)
        if len(peers) < need:
            raise SyncError(
                f"version {v}: only {len(peers)} of {need} receivers connected to {self.link.name} after {self.connect_timeout:g} s"
            )
        acked: set[Peer] = set()
        resyncs: Counter = Counter()
        to_delta = [p for p in peers if self._delta_ok(p, schema)]
        to_full = []
        for p in peers:
            if p not in to_delta:
                to_full.append(p)
                st.causes.append(f"{p.name}: {self._full_reason(p)}")
                log.info("weight sync v%d: full sync for %s: %s", v, p.name, self._full_reason(p))
        dirty = None  # (chunks to re-read, sparse change log) from a complete delta stream
        delta_ran = False
        reconnect_deadline: float | None = None
        while True:
            sent: list[Peer] = []
            if to_delta:
                got, dirty = self._stream(v, "delta", to_delta, schema, st)
                delta_ran = True
                sent += got
            if to_full:
                got, _ = self._stream(v, "full", to_full, schema, st)
                sent += got
                st.full_syncs += len(got)
            to_delta = []
            to_full = []
            t_ack = time.perf_counter()
            for p in sent:
                ok, cause = self._collect_ack(p, v, st)
                if ok:
                    acked.add(p)
                elif cause is not None:
                    to_full.append(p)
            st.ack_s += time.perf_counter() - t_ack
            # Receivers that (re)connected meanwhile: HELLO tells whether they hold v.
            for p in self.link.peers():
                if p in acked or p in to_full:
                    continue
                h = p.hello
                if h.get("session") == self.session and h.get("version") == v and not h.get("stale"):
                    acked.add(p)
                    log.info("weight sync v%d: %s reconnected holding v%d (its ACK was lost)", v, p.name, v)
                else:
                    to_full.append(p)
                    st.causes.append(f"{p.name}: {self._full_reason(p)}")
                    log.warning(
                        "weight sync v%d: %s (re)joined: %s; sending a full sync",
                        v,
                        p.name,
                        self._full_reason(p),
                    )
            for p in list(to_full):
                resyncs[p.hello.get("receiver_id", p.id)] += 1
                if resyncs[p.hello.get("receiver_id", p.id)] > self.max_resyncs:
                    self.link.drop(p, f"still failing after {self.max_resyncs} resyncs")
                    to_full.remove(p)
            if to_full:
                st.resyncs += len(to_full)
                continue
            # Every connected receiver holds v (or is being resynced above). A receiver that
            # acknowledged and then left (e.g. shut down) did hold v.
            if len(acked) >= need:
                break
            if not self.link.dynamic_peers:
                raise SyncError(
                    f"version {v}: {need - len(acked)} receivers failed on {self.link.name} and cannot reconnect"
                    f" ({'; '.join(st.causes[-3:]) or 'see log'}); the baseline stays at {self.baseline_version}"
                )
            log.warning(
                "weight sync v%d: %d of %d receivers hold v%d; waiting up to %g s for the others to reconnect",
                v, len(acked), need, v, self.reconnect_timeout,
            )  # fmt: skip
            if reconnect_deadline is None:  # one budget per sync, so a flapping receiver cannot stall it
                reconnect_deadline = time.monotonic() + self.reconnect_timeout
            while True:
                left = reconnect_deadline - time.monotonic()
                if left <= 0:
                    raise SyncError(
                        f"version {v}: only {len(acked)} of {need} receivers hold it after waiting"
                        f" {self.reconnect_timeout:g} s for reconnections ({'; '.join(st.causes[-3:]) or 'see log'});"
                        f" the baseline stays at {self.baseline_version}"
                    )
                connected_acked = sum(1 for p in self.link.peers() if p in acked)
                now = self.link.wait_peers(connected_acked + 1, min(left, 1.0))
                if any(p not in acked for p in now):
                    break
        if not delta_ran:
            st.changed_elements = self._full_words  # no baseline to diff against: the words full syncs sent
        t_c = time.perf_counter()
        self._commit(v, schema, dirty)
        st.commit_s = time.perf_counter() - t_c
        st.receivers = len(acked)
        self._digests = None
        st.total_s = time.perf_counter() - t0
        log.debug("weight sync %s", st.summary())
        return st

    # -- per-receiver decisions ----------------------------------------------------------

    def _delta_ok(self, p: Peer, schema: Schema) -> bool:
        h = p.hello
        return (
            self.baseline is not None
            and self.baseline.version is not None
            and h.get("session") == self.session
            and h.get("version") == self.baseline.version
            and not h.get("stale")
        )

    def _full_reason(self, p: Peer) -> str:
        h = p.hello
        if h.get("stale"):
            return f"stale ({h.get('cause') or 'partial or corrupt update'})"
        if h.get("version") is None:
            return "holds no weights from this trainer yet"
        if h.get("session") != self.session:
            return f"holds v{h.get('version')} from another sender session"
        if self.baseline is None or self.baseline.version is None:
            return "no baseline yet"
        return f"holds v{h.get('version')}, baseline is v{self.baseline.version}"

    def _collect_ack(self, p: Peer, v: int, st: SyncStats) -> tuple[bool, str | None]:
        try:
            fr = self.link.recv_reply(p, self.ack_timeout)
            verify_payload(fr.header, fr.payload, f"ACK from {p.name}")
            if fr.header.kind != Kind.ACK:
                raise SyncError(f"{p.name}: expected ACK, got {fr.header.describe()}")
            ack = parse_json(fr.payload, f"ACK from {p.name}")
        except TransportError as e:
            st.causes.append(f"{p.name}: lost ({e})")
            log.warning("weight sync v%d: %s lost before acknowledging: %s", v, p.name, e)
            self.link.drop(p, str(e))
            return False, None
        except Exception as e:
            st.causes.append(f"{p.name}: bad ACK ({e})")
            log.warning("weight sync v%d: bad ACK from %s: %s; dropping it", v, p.name, e)
            self.link.drop(p, f"bad ACK: {e}")
            return False, None
        st.apply_s = max(st.apply_s, float(ack.get("apply_s", 0.0)))
        st.verify_s = max(st.verify_s, float(ack.get("verify_s", 0.0)))
        p.hello.update(
            version=ack.get("version"),
            session=ack.get("session"),
            stale=bool(ack.get("stale")),
            cause=ack.get("cause"),
            unmapped=ack.get("unmapped"),
        )
        if ack.get("ok") and fr.header.version == v and ack.get("version") == v:
            return True, None
        cause = str(ack.get("cause") or "no cause given")
        if ack.get("fatal"):
            raise SyncError(f"version {v}: {p.name} cannot apply this model: {cause}")
        st.causes.append(f"{p.name}: {cause}")
        log.warning(
            "weight sync v%d: %s reported %s: %s; sending a full sync",
            v,
            p.name,
            "stale" if ack.get("stale") else "failure",
            cause,
        )
        return False, cause

    # -- streams ---------------------------------------------------------------------------

    def _plan(self, schema: Schema) -> list[Chunk]:
        if self._chunks is None or self._chunks[0] is not schema:
            device_baseline = self.baseline_where == "device"
            tensors = self.source.tensors

            def key(i: int):  # small tensors share chunks on the host; a device baseline keeps them apart
                return i if device_baseline and tensors[i].device.type != "cpu" else None

            self._chunks = (schema, plan_chunks(schema, self.chunk_words, key))
        return self._chunks[1]

    def _stream(self, v: int, mode: str, peers: list[Peer], schema: Schema, st: SyncStats):
        """Send one update stream to ``peers``; returns (peers that got END, changed chunks or None)."""
        begin = Begin(
            mode, self.baseline.version if mode == "delta" else None, self.session, schema.digest, len(schema)
        )
        chunks = self._plan(schema)
        if mode == "full":
            if self._digests is None:
                t = time.perf_counter()
                self._digests = digest_all(schema, self.source, self.chunk_words)
                st.encode_s += time.perf_counter() - t
            begin.digests = b"".join(self._digests)
        payload = pack_begin(begin, schema.json_text)
        live = self._send_small(Kind.BEGIN, v, 0, payload, peers, st, v)
        sent = {p: HEADER_SIZE + len(payload) for p in live}
        bucket_peers = live
        if mode == "full":
            live, need = self._collect_needs(live, v, schema, st)
            bucket_peers = [p for p in live if need[p].any()]
            union = np.zeros(len(schema), dtype=np.bool_)
            for p in bucket_peers:
                union |= need[p]
            st.full_tensors = max(st.full_tensors, int(union.sum()))
            if not union.all():
                chunks = plan_chunks(schema, self.chunk_words, only=union) if union.any() else []
        res = StreamResult()
        self._send_buckets(v, mode, chunks, bucket_peers, schema, st, res, sent)
        live = [p for p in live if sent[p] is not None]
        st.buckets += res.buckets
        if mode == "full":
            self._full_words = max(self._full_words, res.changed)
        st.index_encodings.update(res.idx_kinds)
        st.value_encodings.update(res.val_kinds)
        dirty = None
        if mode == "delta":
            st.changed_elements = res.changed
            if res.complete:
                dirty = (res.dirty, res.log)
                self._digests = res.digests
        if not live:
            return [], dirty
        if mode == "delta":  # receivers hash what they hold; they need digests only of tensors they ignore
            blind: set[int] = set()
            for p in live:
                blind.update(int(i) for i in p.hello.get("unmapped") or ())
            extra = [(i, self._digests[i]) for i in sorted(blind) if i < len(schema) and res.covered[i]]
        else:
            extra = []
        end_payload = pack_end(bin_digest(b"".join(self._digests)), extra)
        got = [p for p in live if p in bucket_peers]
        rest = [p for p in live if p not in bucket_peers]  # needed nothing: sent no bucket
        live = self._send_small(Kind.END, v, res.buckets, end_payload, got, st, v) if got else []
        live += self._send_small(Kind.END, v, 0, end_payload, rest, st, v) if rest else []
        for p in live:
            st.update_bytes = max(st.update_bytes, sent[p] + HEADER_SIZE + len(end_payload))
        return live, dirty

    def _collect_needs(self, peers: list[Peer], v: int, schema: Schema, st: SyncStats):
        """Each receiver's answer to a full BEGIN: which tensors it lacks."""
        live, need = [], {}
        t = time.perf_counter()
        for p in peers:
            try:
                fr = self.link.recv_reply(p, self.ack_timeout)
                verify_payload(fr.header, fr.payload, f"NEED from {p.name}")
                if fr.header.kind != Kind.NEED or fr.header.version != v:
                    raise ProtocolError(f"{p.name}: expected NEED of v{v}, got {fr.header.describe()}")
                need[p] = parse_need(fr.payload, len(schema), f"NEED from {p.name}")
                live.append(p)
                log.info(
                    "weight sync v%d: %s lacks %d of %d tensors (the others match the trainer's digests)",
                    v, p.name, int(need[p].sum()), len(schema),
                )  # fmt: skip
            except TransportError as e:
                st.causes.append(f"{p.name}: lost ({e})")
                log.warning("weight sync v%d: %s lost before answering a full sync: %s", v, p.name, e)
                self.link.drop(p, str(e))
            except Exception as e:
                st.causes.append(f"{p.name}: bad NEED ({e})")
                log.warning("weight sync v%d: bad NEED from %s: %s; dropping it", v, p.name, e)
                self.link.drop(p, f"bad NEED: {e}")
        st.ack_s += time.perf_counter() - t
        return live, need

    def _send_buckets(
        self, v: int, mode: str, chunks: list[Chunk], peers: list[Peer], schema: Schema, st: SyncStats,
        res: StreamResult, sent: dict,
    ) -> list[Peer]:  # fmt: skip
        """Encode ``chunks`` on a worker thread and send each bucket to ``peers`` as it is ready.

        Adds each bucket's bytes to ``sent[peer]``; a peer that drops gets ``sent[peer] = None``.
        Returns the peers still connected.
        """
        live = list(peers)
        if not chunks and mode == "full":
            res.complete = True
            return live
        q: queue.Queue = queue.Queue(maxsize=2)
        cancel = threading.Event()

        def work() -> None:
            try:
                acquire = lambda: self.link.acquire(self.ack_timeout)  # noqa: E731
                it = encode_stream(
                    v, mode, schema, self.source, self.baseline, self.encoder, chunks, acquire, self.link.release,
                    res, cancel, self._log_budget(schema),
                )  # fmt: skip
                for item in it:
                    q.put(item)
                q.put(_DONE)
            except BaseException as e:
                q.put(_Failure(e))

        th = threading.Thread(target=work, name="stalwart-sync-encoder", daemon=True)
        th.start()
        failure: BaseException | None = None
        try:
            while True:
                item = q.get()
                if item is _DONE:
                    break
                if isinstance(item, _Failure):
                    failure = item.exc
                    break
                buf, nbytes = item
                if not live:
                    self.link.release(buf)
                    continue
                t = time.perf_counter()
                failed = self.link.send_buffer(buf, nbytes, live)
                st.send_s += time.perf_counter() - t
                st.wire_bytes += nbytes * (len(live) - len(failed))
                for p in live:
                    if p not in failed:
                        sent[p] += nbytes
                if failed:
                    for p in failed:
                        sent[p] = None
                    live = self._lost(failed, v, st, live)
                    if not live:
                        cancel.set()
        except BaseException:
            cancel.set()  # stop the encoder and give its buffers back before propagating
            while th.is_alive() or not q.empty():
                try:
                    item = q.get(timeout=0.1)
                except queue.Empty:
                    continue
                if isinstance(item, tuple):
                    self.link.release(item[0])
            raise
        th.join()
        if failure is not None:
            cancel.set()
            raise SyncError(f"version {v}: encoding failed: {failure}") from failure
        st.encode_s += res.encode_s
        return live

    def _send_small(
        self, kind: Kind, v: int, count: int, payload: bytes, peers: list[Peer], st: SyncStats, ver: int
    ) -> list[Peer]:
        hdr = pack_header(kind, v, 0, count, payload)
        t = time.perf_counter()
        failed = self.link.send_frame(hdr, payload, peers)
        st.send_s += time.perf_counter() - t
        live = [p for p in peers if p not in failed]
        st.wire_bytes += (len(hdr) + len(payload)) * len(live)
        if failed:
            live = self._lost(failed, ver, st, peers)
        return live

    def _lost(self, failed: dict, v: int, st: SyncStats, live: list[Peer]) -> list[Peer]:
        for p, e in failed.items():
            st.causes.append(f"{p.name}: dropped during v{v} ({e})")
            log.warning("weight sync v%d: %s dropped mid-update: %s", v, p.name, e)
            self.link.drop(p, str(e))
        return [p for p in live if p not in failed]

    # -- baseline ---------------------------------------------------------------------------

    def _log_budget(self, schema: Schema) -> int:
        # sparse changes kept for the commit instead of re-reading (and re-casting) their chunks
        return int(self.commit_log_fraction * schema.nbytes)

    def _commit(self, v: int, schema: Schema, dirty) -> None:
        if self.baseline is None:
            devs = [
                t.device if self.baseline_where == "device" else torch.device("cpu")
                for t in self.source.tensors
            ]
            self.baseline = Baseline(schema, devs, pin=self.pin_baseline)
            dirty = None
        if dirty is None:
            self.baseline.commit(self.source, v, None, self.chunk_words)
        else:
            self.baseline.commit(self.source, v, dirty[0], self.chunk_words, dirty[1])
