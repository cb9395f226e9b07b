"""The rollout side: :class:`WeightSyncReceiver`.

``receive()`` waits for an update, applies its buckets in place as they arrive,
checks every bucket's checksum and, at the end, every tensor's digest against the
trainer's, then acknowledges. Whatever goes wrong (a corrupt or missing bucket, a
digest mismatch, a dropped connection, an update for a version it does not hold) is
logged with its cause; if the weights were touched the receiver marks itself *stale*,
answers with a negative ACK and waits for the full sync the sender then sends. A
receiver never reports a version whose weights it has not verified bit for bit.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections import OrderedDict

import numpy as np
from torch import nn

from stalwart.sync.adapters import Destination, ModelAdapter
from stalwart.sync.codec import Decoder
from stalwart.sync.errors import (
    IntegrityError,
    ProtocolError,
    SchemaError,
    SyncError,
    SyncTimeoutError,
    TransportError,
)
from stalwart.sync.names import NameMapper
from stalwart.sync.schema import Schema
from stalwart.sync.stats import ReceiveStats
from stalwart.sync.stream import apply_bucket
from stalwart.sync.transports.base import Transport
from stalwart.sync.wire import (
    DIGEST_SIZE,
    HEADER_SIZE,
    Begin,
    Frame,
    Kind,
    bin_digest,
    json_bytes,
    pack_header,
    pack_need,
    parse_begin,
    parse_end,
    verify_payload,
)

log = logging.getLogger("stalwart.sync")


class _Outcome:
    __slots__ = ("cause", "fatal", "ok", "stats")

    def __init__(
        self, ok: bool, stats: ReceiveStats | None = None, cause: str | None = None, fatal: bool = False
    ):
        self.ok, self.stats, self.cause, self.fatal = ok, stats, cause, fatal


class WeightSyncReceiver:
    """Applies the trainer's updates to a rollout model in place (CPU or CUDA).

    Args:
        model: an ``nn.Module`` (plain or Hugging Face), a mapping of name -> tensor, or a
            :class:`ModelAdapter` (engine hooks; see :class:`CallbackAdapter`).
        transport: the same kind of transport the sender uses, pointed at it.
        name_map: maps trainer names onto this model's (prefixes, fused QKV / gate-up).
        receiver_id: shown in the sender's logs (default: ``host:pid``).
        resync_timeout: after a failed update, how long to wait for the full resync.
    """

    def __init__(
        self,
        model: nn.Module | ModelAdapter | dict,
        transport: Transport,
        *,
        name_map: NameMapper | None = None,
        receiver_id: str | None = None,
        resync_timeout: float = 300.0,
    ) -> None:
        self.adapter = model if isinstance(model, ModelAdapter) else ModelAdapter(model)
        self.mapper = name_map or NameMapper()
        self.receiver_id = receiver_id or f"{socket.gethostname()}:{os.getpid()}"
        self.resync_timeout = float(resync_timeout)
        self.version: int | None = None
        self.session: str | None = None
        self.stale = False
        self.stale_cause: str | None = None
        self._dests: OrderedDict[str, Destination] = OrderedDict()
        self._held: Destination | None = None  # the plan of the version this receiver holds
        self._decoder = Decoder()
        self._pending: Frame | None = None
        self._in_update_dirty = False
        self._closed = False
        self.link = transport.open_receiver()
        self.link.connect(self._hello(), self.link.connect_timeout)

    # -- public ------------------------------------------------------------------------

    def receive(self, timeout: float | None = None) -> ReceiveStats | None:
        """Wait for the next update and apply it; returns its stats once verified.

        ``timeout``: seconds to wait for an update to start (None: forever); returns
        None if none started. Once an update has started, failures lead to a full
        resync within this call; ``SyncError`` is raised only if that cannot happen.
        """
        if self._closed:
            raise SyncError("receiver is closed")
        t0 = time.perf_counter()
        deadline = None if timeout is None else time.monotonic() + timeout
        causes: list[str] = []
        while True:
            try:
                fr = self._pending
                self._pending = None
                if fr is None:
                    left = None if deadline is None else max(0.0, deadline - time.monotonic())
                    fr = self.link.recv(left)
                if fr is None:
                    if causes:
                        raise SyncTimeoutError(
                            f"receiver {self.receiver_id}: no resync within {self.resync_timeout:g} s after: {causes[-1]}"
                        )
                    return None
                if fr.header.kind != Kind.BEGIN:
                    log.debug(
                        "receiver %s: skipping %s outside an update", self.receiver_id, fr.header.describe()
                    )
                    self.link.release(fr)
                    continue
                out = self._update(fr)
            except (TransportError, ProtocolError) as e:
                mid = self._in_update_dirty
                if mid:
                    self._mark_stale(f"connection lost mid-update: {e}")
                self._in_update_dirty = False
                if not self.link.can_reconnect:
                    raise
                causes.append(str(e))
                log.warning(
                    "receiver %s: %s%s; reconnecting%s", self.receiver_id, "connection lost mid-update: " if mid else "", e,
                    " (weights partially updated: marked stale, a full sync will follow)" if self.stale else "",
                )  # fmt: skip
                self.link.reconnect(self._hello(), self.link.connect_timeout)
                deadline = time.monotonic() + self.resync_timeout
                continue
            if out.ok:
                st = out.stats
                st.attempts = len(causes) + 1
                st.causes = causes
                st.total_s = time.perf_counter() - t0
                return st
            if out.fatal:
                raise SchemaError(f"receiver {self.receiver_id}: {out.cause}")
            causes.append(out.cause)
            deadline = time.monotonic() + self.resync_timeout

    def close(self) -> None:
        """Say goodbye to the sender and close the transport. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.link.can_reconnect:
                self.link.send(pack_header(Kind.BYE, self.version or 0, 0, 0, b""))
        except (TransportError, OSError):
            pass
        self.link.close()

    def __enter__(self) -> WeightSyncReceiver:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------

    def _hello(self) -> bytes:
        payload = json_bytes(
            {
                "receiver_id": self.receiver_id,
                "version": self.version,
                "session": self.session,
                "stale": self.stale,
                "cause": self.stale_cause,
                "pid": os.getpid(),
                "nonce": uuid.uuid4().hex[:8],
                "unmapped": self._unmapped(),
            }
        )
        return pack_header(Kind.HELLO, self.version or 0, 0, 0, payload) + payload

    def _unmapped(self) -> list[int] | None:
        """Tensors of the held version's schema this receiver does not hold (it cannot hash them)."""
        return self._held.unmapped if self._held is not None else None

    def _mark_stale(self, cause: str) -> None:
        self.stale = True
        self.stale_cause = cause

    def _ack(
        self, v: int, ok: bool, cause: str | None, apply_s: float, verify_s: float, fatal: bool = False
    ) -> None:
        payload = json_bytes(
            {
                "ok": ok,
                "version": self.version,
                "session": self.session,
                "stale": self.stale,
                "cause": cause,
                "fatal": fatal,
                "receiver_id": self.receiver_id,
                "apply_s": round(apply_s, 6),
                "verify_s": round(verify_s, 6),
                "unmapped": self._unmapped(),
            }
        )
        self.link.send(pack_header(Kind.ACK, v, 0, 0, payload) + payload)

    def _destination(self, info: Begin, what: str) -> tuple[Destination | None, str | None, bool]:
        dg = info.schema_digest
        dest = self._dests.get(dg)
        if dest is not None and not dest.is_current(self.adapter):
            log.warning(
                "receiver %s: model tensors were reallocated; re-resolving the weight map", self.receiver_id
            )
            try:
                fresh = Destination(dest.schema, self.adapter, self.mapper)
            except SchemaError as e:
                del self._dests[dg]
                return None, str(e), True
            fresh.expected, fresh.expected_version = dest.expected, dest.expected_version
            if self._held is dest:
                self._held = fresh
            dest = self._dests[dg] = fresh
        if dest is not None:
            self._dests.move_to_end(dg)
            return dest, None, False
        if info.schema is None:
            return (
                None,
                f"{what}: unknown tensor list {dg[:12]}… (delta for a model this receiver has not seen)",
                False,
            )
        schema = Schema.from_json(info.schema, what)
        if schema.digest != dg:
            return None, f"{what}: tensor list does not match its digest", False
        try:
            dest = Destination(schema, self.adapter, self.mapper)
        except SchemaError as e:
            return None, str(e), True
        self._dests[dg] = dest
        while len(self._dests) > 4:
            self._dests.popitem(last=False)
        return dest, None, False

    def _update(self, begin: Frame) -> _Outcome:
        hdr = begin.header
        v = hdr.version
        what = f"version {v}"
        verify_payload(hdr, begin.payload, f"BEGIN of {what}")
        info = parse_begin(begin.payload, f"BEGIN of {what}")
        self.link.release(begin)
        mode = info.mode
        session = info.session
        cause: str | None = None
        fatal = False
        dest: Destination | None = None
        if mode == "delta" and self.stale:
            cause = f"{what}: delta from v{info.base_version} but this receiver is stale ({self.stale_cause})"
        elif mode == "delta" and (self.version != info.base_version or self.session != session):
            cause = f"{what}: delta from v{info.base_version} but this receiver holds v{self.version}" + (
                "" if self.session == session else " from another sender session"
            )
        elif session == self.session and self.version is not None and v < self.version:
            cause = f"{what}: older than the v{self.version} this receiver holds"
        if cause is None:
            dest, cause, fatal = self._destination(info, what)
        if cause is None and mode == "delta" and dest.expected_version != (session, info.base_version):
            cause = f"{what}: this receiver holds no digests of v{info.base_version} to check a delta against"
        if cause is None and len(dest.schema) != info.tensors:
            cause = f"{what}: BEGIN announces {info.tensors} tensors, the tensor list has {len(dest.schema)}"
        if dest is not None:
            dest.begin_digests()
        t_apply = 0.0
        if mode == "full":  # say which tensors differ from the trainer's; only those are sent
            t = time.perf_counter()
            need = np.zeros(info.tensors, dtype=np.bool_)
            if cause is None:
                for i in range(info.tensors):
                    got = dest.tensor_digest(i)
                    need[i] = got is not None and got != info.digests[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE]
            payload = pack_need(need)
            self.link.send(pack_header(Kind.NEED, v, 0, 0, payload) + payload)
            t_apply += time.perf_counter() - t
        t_verify = 0.0
        expected = 0
        changed = 0
        nbytes = HEADER_SIZE + hdr.payload_len
        touched: set[str] = set()
        covered: set[int] = set()  # wire tensors the update may have changed
        began = False
        dirty = False
        self._in_update_dirty = False
        end: Frame | None = None
        while True:
            fr = self.link.recv(self.link.io_timeout)
            if fr is None:
                raise SyncTimeoutError(f"{self.link.name}: {what} stalled after {expected} buckets")
            k = fr.header.kind
            nbytes += HEADER_SIZE + fr.header.payload_len
            if k == Kind.BUCKET:
                if cause is None:
                    if fr.header.version != v:
                        cause = f"{what}: bucket of version {fr.header.version} inside the update"
                    elif fr.header.seq != expected:
                        cause = f"{what}: bucket {expected} missing (got bucket {fr.header.seq})"
                    else:
                        t = time.perf_counter()
                        if not began:
                            self.adapter.begin_update(v, mode)
                            began = True
                        try:
                            changed += apply_bucket(
                                fr.header, fr.payload, dest, self._decoder, f"{what} bucket {expected}", touched,
                                covered,
                            )  # fmt: skip
                            dirty = True
                        except IntegrityError as e:  # checked before anything of this bucket is applied
                            cause = str(e)
                        except (ProtocolError, ValueError, IndexError) as e:  # earlier entries are applied
                            cause = f"{what} bucket {expected}: cannot apply ({e})"
                            dirty = True
                        self._in_update_dirty = dirty
                        t_apply += time.perf_counter() - t
                expected += 1
                self.link.release(fr)
            elif k == Kind.END:
                end = fr
                break
            elif k == Kind.BEGIN:
                cause = cause or f"{what}: interrupted by a new update (v{fr.header.version}) before its END"
                self._pending = fr
                break
            else:
                self.link.release(fr)
                cause = cause or f"{what}: unexpected {fr.header.describe()} inside the update"
        trainer: list[bytes] | None = None
        if end is not None:
            try:
                verify_payload(end.header, end.payload, f"END of {what}")
                if cause is None and end.header.count != expected:
                    cause = f"{what}: END says {end.header.count} buckets, {expected} arrived"
                if cause is None:
                    t = time.perf_counter()
                    if not began and mode == "full":
                        self.adapter.begin_update(v, mode)  # nothing to apply: every tensor was held already
                        began = True
                    dest.synchronize()
                    cause, mismatch, trainer = self._verify(dest, info, bytes(end.payload), covered, what)
                    dirty = dirty or mismatch
                    t_verify = time.perf_counter() - t
            except (IntegrityError, ProtocolError) as e:
                cause = cause or str(e)
            finally:
                self.link.release(end)
        self._in_update_dirty = False
        if cause is None and began:
            try:  # the engine sees the new weights before the trainer is told they are in place
                self.adapter.end_update(v, sorted(touched))
            except Exception as e:
                cause = f"{what}: the adapter's end_update hook failed ({type(e).__name__}: {e})"
                dirty = True
        if cause is not None:
            if dirty:
                self._mark_stale(cause)
            if dirty:
                state = "weights partially updated, marked stale"
            else:
                state = "weights unchanged" + (f", still stale ({self.stale_cause})" if self.stale else "")
            log.warning(
                "receiver %s: %s not applied: %s (%s); asking for a full sync",
                self.receiver_id,
                what,
                cause,
                state,
            )
            if self._pending is None:
                self._ack(v, False, cause, t_apply, t_verify, fatal)
            return _Outcome(False, cause=cause, fatal=fatal)
        self.version = v
        self.session = session
        self.stale = False
        self.stale_cause = None
        dest.expected, dest.expected_version = trainer, (session, v)
        self._held = dest
        self._ack(v, True, None, t_apply, t_verify)
        st = ReceiveStats(v, mode, changed, nbytes, expected, t_apply, t_verify)
        return _Outcome(True, st)

    def _verify(
        self, dest: Destination, info: Begin, end_payload: bytes, covered: set[int], what: str
    ) -> tuple[str | None, bool, list[bytes] | None]:
        """(cause, weights differ, the trainer's per-tensor digests) after checking every tensor.

        A full sync's BEGIN carries every tensor's digest. A delta's END carries only the
        whole-model digest (and digests of covered tensors this receiver does not hold):
        tensors the update did not change keep the digests of the version held before, the
        others are hashed here, and the whole list must hash to the trainer's whole-model
        digest.
        """
        n = len(dest.schema)
        model, extra = parse_end(end_payload, n, f"END of {what}")
        mine = dest.finish_digests()
        if info.mode == "full":
            trainer = [info.digests[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE] for i in range(n)]
            if bin_digest(b"".join(trainer)) != model:
                return f"{what}: END's whole-model digest does not match BEGIN's tensor digests", False, None
            bad = [dest.schema[i].name for i in range(n) if mine[i] is not None and mine[i] != trainer[i]]
        else:
            before = dest.expected
            trainer = []
            for i in range(n):
                if i not in covered:
                    trainer.append(before[i])
                elif i in extra:
                    trainer.append(extra[i])
                elif mine[i] is not None:
                    trainer.append(mine[i])
                else:
                    return (
                        f"{what}: END lacks the digest of {dest.schema[i].name!r}, which this receiver ignores",
                        False,
                        None,
                    )
            bad = [dest.schema[i].name for i in range(n) if mine[i] is not None and mine[i] != trainer[i]]
            if not bad and bin_digest(b"".join(trainer)) != model:
                names = [dest.schema[i].name for i in sorted(covered)]
                more = f" and {len(names) - 5} more" if len(names) > 5 else ""
                return (
                    f"{what}: weights differ from the trainer's after applying it (whole-model digest; among the"
                    f" {len(names)} tensors it changed: {', '.join(names[:5])}{more})",
                    True,
                    None,
                )
        if bad:
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            return (
                f"{what}: weights differ from the trainer's after applying it: {', '.join(bad[:5])}{more}",
                True,
                None,
            )
        return None, False, trainer
