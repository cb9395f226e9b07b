"""torch.distributed: point-to-point sends inside a process group kept for weight sync.

Use a group separate from training (``dist.new_group(ranks=[trainer, *rollouts],
backend="gloo" or "nccl", timeout=...)``) so sync traffic never interleaves with
training collectives. The sender is global rank ``src``; every other rank of the group
is a receiver. Each frame is two messages to each receiver: the 64-byte header, then
the payload. With NCCL the frames are staged through one device buffer per send
buffer (payloads are built and decoded on the host).

Collective backends have no notion of reconnecting, and their timeouts are fatal to
the connection (gloo closes the pair): a receiver that dies or stalls fails the sync
with a :class:`~stalwart.sync.errors.TransportError` naming its rank, and the group has
to be rebuilt. A receiver that reports a corrupt or partial update is resynced over
the same group as usual. ``WeightSyncReceiver.receive`` blocks (up to the transport
timeout) until the sender's next sync: polling needs TCP or shared memory.
"""

from __future__ import annotations

import datetime
import threading
import time
from collections.abc import Sequence

import torch
import torch.distributed as dist

from stalwart.sync.errors import PeerDisconnectedError, ProtocolError, SyncTimeoutError, TransportError
from stalwart.sync.transports.base import Peer, ReceiverLink, SendBuffer, SenderLink, Transport
from stalwart.sync.wire import HEADER_SIZE, Frame, Kind, parse_header, parse_json, verify_payload

MAX_REPLY_BYTES = 1 << 20


def _wrap(e: Exception, what: str) -> TransportError:
    text = str(e)
    if "imed out" in text or "timeout" in text.lower():
        return SyncTimeoutError(f"{what}: {text.splitlines()[0][:300]}")
    return PeerDisconnectedError(f"{what}: {text.splitlines()[0][:300]}")


class DistTransport(Transport):
    """Frames over ``torch.distributed`` send/recv.

    Args:
        group: the process group to use (None: the default group).
        src: global rank of the sender (the trainer process that calls ``sync()``).
        timeout: seconds any one send or receive may take before the sync fails.
    """

    def __init__(self, group=None, src: int = 0, *, timeout: float = 600.0) -> None:
        self.group = group
        self.src = int(src)
        self.timeout = float(timeout)

    def __repr__(self) -> str:
        return f"DistTransport(src={self.src})"

    def _ctx(self) -> tuple[list[int], str, torch.device]:
        if not dist.is_available() or not dist.is_initialized():
            raise TransportError(
                "dist transport: torch.distributed is not initialized (call init_process_group first)"
            )
        g = self.group if self.group is not None else dist.group.WORLD
        ranks = dist.get_process_group_ranks(g)
        if self.src not in ranks:
            raise TransportError(
                f"dist transport: sender rank {self.src} is not in the group (ranks {ranks})"
            )
        backend = str(dist.get_backend(g)).lower()
        dev = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        return ranks, backend, dev

    def open_sender(self, *, frame_bytes: int, buffers: int = 2) -> SenderLink:
        ranks, backend, dev = self._ctx()
        me = dist.get_rank()
        if me != self.src:
            raise TransportError(f"dist transport: the sender must run on rank {self.src}, this is rank {me}")
        return _DistSenderLink(self, [r for r in ranks if r != self.src], backend, dev, frame_bytes, buffers)

    def open_receiver(self) -> ReceiverLink:
        ranks, backend, dev = self._ctx()
        me = dist.get_rank()
        if me == self.src:
            raise TransportError(f"dist transport: rank {me} is the sender, it cannot also receive")
        if me not in ranks:
            raise TransportError(f"dist transport: rank {me} is not in the sync group (ranks {ranks})")
        return _DistReceiverLink(self, backend, dev)


class _Ops:
    """Send/recv helpers with timeouts and errors that name the rank."""

    def __init__(self, t: DistTransport, backend: str, dev: torch.device) -> None:
        self.t = t
        self.group = t.group
        self.backend = backend
        self.dev = dev
        self.td = datetime.timedelta(seconds=t.timeout)
        self.name = f"dist ({backend})"

    def wait(self, works, what: str) -> None:
        for w in works:
            try:
                w.wait(timeout=self.td)
            except Exception as e:
                raise _wrap(e, what) from None

    def isend(self, t: torch.Tensor, dst: int, what: str):
        try:
            return dist.isend(t, dst=dst, group=self.group)
        except Exception as e:
            raise _wrap(e, what) from None

    def irecv(self, t: torch.Tensor, src: int, what: str):
        try:
            return dist.irecv(t, src=src, group=self.group)
        except Exception as e:
            raise _wrap(e, what) from None

    def to_dev(self, host: torch.Tensor) -> torch.Tensor:
        return host if self.dev.type == "cpu" else host.to(self.dev, non_blocking=False)

    def recv_frame(
        self, src: int, hdr_t: torch.Tensor, what: str, max_payload: int | None, pool: list | None = None
    ) -> Frame:
        """Receive one frame; ``pool`` (a one-element list) holds a reusable payload tensor."""
        self.wait([self.irecv(hdr_t, src, what)], what)
        raw = hdr_t.cpu().numpy().tobytes()
        hdr = parse_header(raw, what)
        if max_payload is not None and hdr.payload_len > max_payload:
            raise ProtocolError(f"{what}: {hdr.describe()} announces {hdr.payload_len} bytes")
        if hdr.payload_len == 0:
            return Frame(hdr, memoryview(b""))
        payload_t = pool[0] if pool else None
        if payload_t is None or payload_t.numel() < hdr.payload_len:
            payload_t = torch.empty(max(hdr.payload_len, 1 << 20), dtype=torch.uint8, device=self.dev)
            if pool is not None:
                pool[0] = payload_t
        view = payload_t[: hdr.payload_len]
        self.wait([self.irecv(view, src, what)], what)
        host = view.cpu() if self.dev.type != "cpu" else view
        return Frame(hdr, memoryview(host.numpy()).cast("B"))


class _DistSenderLink(SenderLink):
    dynamic_peers = False

    def __init__(
        self,
        t: DistTransport,
        ranks: list[int],
        backend: str,
        dev: torch.device,
        frame_bytes: int,
        buffers: int,
    ):
        self.ops = _Ops(t, backend, dev)
        self.name = f"dist ({backend}) rank {t.src}"
        self._ranks = ranks
        self._peers: dict[int, Peer] = {}
        self._dead: dict[int, str] = {}
        self._hello_done = False
        self._cond = threading.Condition()
        pin = dev.type == "cuda"
        self._free: list[SendBuffer] = []
        for _ in range(max(1, buffers)):
            host = torch.zeros(frame_bytes, dtype=torch.uint8, pin_memory=pin)
            devbuf = torch.empty(frame_bytes, dtype=torch.uint8, device=dev) if dev.type != "cpu" else None
            self._free.append(SendBuffer(host.numpy(), (host, devbuf)))
        self._hdr_t = torch.empty(HEADER_SIZE, dtype=torch.uint8, device=dev)

    def _hellos(self) -> None:
        hdrs = {r: torch.empty(HEADER_SIZE, dtype=torch.uint8, device=self.ops.dev) for r in self._ranks}
        for r in self._ranks:
            what = f"{self.name}: HELLO from rank {r}"
            fr = self.ops.recv_frame(r, hdrs[r], what, MAX_REPLY_BYTES)
            if fr.header.kind != Kind.HELLO:
                raise ProtocolError(f"{what}: got {fr.header.describe()}")
            verify_payload(fr.header, fr.payload, what)
            hello = parse_json(fr.payload, what)
            self._peers[r] = Peer(r, f"receiver {hello.get('receiver_id', '?')} (dist rank {r})", hello)
        self._hello_done = True

    def wait_peers(self, n: int, timeout: float) -> list[Peer]:
        if not self._hello_done:
            self._hellos()
        return self.peers()

    def peers(self) -> list[Peer]:
        return [p for r, p in self._peers.items() if r not in self._dead]

    def acquire(self, timeout: float) -> SendBuffer:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._free:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SyncTimeoutError(f"{self.name}: no free send buffer within {timeout:g} s")
                self._cond.wait(left)
            return self._free.pop()

    def release(self, buf: SendBuffer) -> None:
        with self._cond:
            self._free.append(buf)
            self._cond.notify_all()

    def _send(self, t: torch.Tensor, nbytes: int, peers: Sequence[Peer]) -> dict[Peer, Exception]:
        failed: dict[Peer, Exception] = {}
        works = []
        for p in peers:
            if p.id in self._dead:
                failed[p] = PeerDisconnectedError(f"{p.name}: {self._dead[p.id]}")
                continue
            what = f"{self.name}: send to {p.name}"
            try:
                ws = [self.ops.isend(t[:HEADER_SIZE], p.id, what)]
                if nbytes > HEADER_SIZE:
                    ws.append(self.ops.isend(t[HEADER_SIZE:nbytes], p.id, what))
                works.append((p, ws, what))
            except TransportError as e:
                failed[p] = e
        for p, ws, what in works:
            try:
                self.ops.wait(ws, what)
            except TransportError as e:
                failed[p] = e
        for p, e in failed.items():
            self._dead.setdefault(p.id, str(e))
        return failed

    def send_buffer(self, buf: SendBuffer, nbytes: int, peers: Sequence[Peer]) -> dict[Peer, Exception]:
        host, devbuf = buf.token
        try:
            if devbuf is not None:
                devbuf[:nbytes].copy_(host[:nbytes], non_blocking=True)
                torch.cuda.current_stream(devbuf.device).synchronize()
                return self._send(devbuf, nbytes, peers)
            return self._send(host, nbytes, peers)
        finally:
            self.release(buf)

    def send_frame(self, header: bytes, payload: bytes, peers: Sequence[Peer]) -> dict[Peer, Exception]:
        raw = bytearray(header) + bytearray(payload)
        t = self.ops.to_dev(torch.frombuffer(raw, dtype=torch.uint8))
        return self._send(t, len(raw), peers)

    def recv_reply(self, peer: Peer, timeout: float) -> Frame:
        if peer.id in self._dead:
            raise PeerDisconnectedError(f"{peer.name}: {self._dead[peer.id]}")
        what = f"{self.name}: reply from {peer.name}"
        try:
            return self.ops.recv_frame(peer.id, self._hdr_t, what, MAX_REPLY_BYTES)
        except TransportError as e:
            self._dead.setdefault(peer.id, str(e))
            raise

    def drop(self, peer: Peer, reason: str) -> None:
        self._dead.setdefault(peer.id, reason)

    def close(self) -> None:
        self._free = []


class _DistReceiverLink(ReceiverLink):
    can_reconnect = False

    def __init__(self, t: DistTransport, backend: str, dev: torch.device) -> None:
        self.ops = _Ops(t, backend, dev)
        self.src = t.src
        self.name = f"dist ({backend}) from rank {t.src}"
        self._hdr_t = torch.empty(HEADER_SIZE, dtype=torch.uint8, device=dev)
        self._pool: list = [None]
        self._hello: bytes | None = None
        self.connect_timeout = t.timeout
        self.io_timeout = t.timeout

    def connect(self, hello: bytes, timeout: float) -> None:
        # gloo/NCCL sends complete only when the sender posts the matching receive (at its
        # first sync), so the HELLO goes out on this receiver's first recv().
        self._hello = hello

    def _flush_hello(self) -> None:
        if self._hello is not None:
            hello, self._hello = self._hello, None
            self.send(hello)

    def recv(self, timeout: float | None) -> Frame | None:
        self._flush_hello()
        # ``timeout`` is not applied: a gloo/NCCL wait that times out closes the connection
        # for good, so a receiver waits (up to the transport's timeout) for the next sync.
        return self.ops.recv_frame(self.src, self._hdr_t, f"{self.name}: frame", None, self._pool)

    def release(self, frame: Frame) -> None:
        pass

    def send(self, frame: bytes) -> None:
        raw = bytearray(frame)
        t = self.ops.to_dev(torch.frombuffer(raw, dtype=torch.uint8))
        what = f"{self.name}: send"
        ws = [self.ops.isend(t[:HEADER_SIZE], self.src, what)]
        if len(raw) > HEADER_SIZE:
            ws.append(self.ops.isend(t[HEADER_SIZE:], self.src, what))
        self.ops.wait(ws, what)

    def close(self) -> None:
        pass
