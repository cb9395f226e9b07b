"""Frames on the wire: a fixed 64-byte header, then the payload.

Every message between a sender and a receiver, on every transport, is a frame::

    offset size  field
    0      4     magic b"STWS"
    4      1     wire format version (2)
    5      1     kind (HELLO, BEGIN, BUCKET, END, ACK, ...; see ``Kind``)
    6      2     flags (0; reserved)
    8      8     sync version (u64; 0 where none applies)
    16     4     seq: bucket index within an update (BUCKET), 0 otherwise
    20     4     count: entries in a bucket / buckets in an update (END)
    24     8     payload length in bytes
    32     16    XXH3-128 of the payload
    48     16    XXH3-128 of header bytes 0..48

All integers are little-endian. JSON payloads (HELLO, ACK) are UTF-8 JSON objects;
BEGIN, NEED, BUCKET and END payloads are binary (BEGIN, NEED and END below, BUCKET in
:mod:`stalwart.sync.bucket` and :mod:`stalwart.sync.codec`). Nothing is ever pickled.
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass

import numpy as np
import zstandard

from stalwart.formats.checksum import digest
from stalwart.sync.errors import IntegrityError, ProtocolError

MAGIC = b"STWS"
WIRE_VERSION = 2
HEADER = struct.Struct("<4sBBHQIIQ16s16s")
HEADER_SIZE = HEADER.size  # 64
_SIGNED = 48  # header bytes covered by the header digest
assert HEADER_SIZE == 64


class Kind(enum.IntEnum):
    """Frame kinds. 1..15 belong to the sync protocol, 16.. to transports."""

    HELLO = 1  # receiver -> sender: who I am, which version I hold, am I stale
    BEGIN = 2  # sender -> receiver: an update starts (mode, base version, schema)
    BUCKET = 3  # sender -> receiver: encoded entries
    END = 4  # sender -> receiver: bucket count, whole-model and per-tensor digests
    ACK = 5  # receiver -> sender: applied and verified, or stale with a cause
    BYE = 6  # either way: orderly close
    NEED = 7  # receiver -> sender, answering a full BEGIN: the tensors whose digests differ
    SLOT = 16  # shm: a frame waits in shared-memory slot ``seq``
    RELEASE = 17  # shm: receiver is done with slot ``seq``
    WELCOME = 18  # shm: sender -> receiver: shared-memory segment geometry


def bin_digest(data) -> bytes:
    """XXH3-128 of ``data`` as 16 raw bytes (the hex form of :func:`stalwart.formats.checksum.digest`)."""
    return bytes.fromhex(digest(data))


@dataclass(frozen=True, slots=True)
class FrameHeader:
    kind: int
    version: int
    seq: int
    count: int
    payload_len: int
    payload_digest: bytes
    flags: int = 0

    def describe(self) -> str:
        try:
            name = Kind(self.kind).name
        except ValueError:
            name = f"kind {self.kind}"
        return f"{name} v{self.version} seq {self.seq}"


def pack_header(
    kind: int,
    version: int = 0,
    seq: int = 0,
    count: int = 0,
    payload=b"",
    *,
    flags: int = 0,
    payload_len: int | None = None,
    payload_digest: bytes | None = None,
    out=None,
) -> bytes:
    """Build a 64-byte header for ``payload`` (or for an explicit length/digest).

    With ``out`` (a writable buffer of at least 64 bytes) the header is written there
    and ``b""`` is returned; otherwise the header bytes are returned.
    """
    if payload_len is None:
        payload_len = len(memoryview(payload).cast("B"))
    if payload_digest is None:
        payload_digest = bin_digest(payload)
    body = HEADER.pack(
        MAGIC, WIRE_VERSION, int(kind), flags, version, seq, count, payload_len, payload_digest, b"\0" * 16
    )
    signed = body[:_SIGNED] + bin_digest(body[:_SIGNED])
    if out is not None:
        memoryview(out).cast("B")[:HEADER_SIZE] = signed
        return b""
    return signed


def parse_header(raw, where: str = "") -> FrameHeader:
    """Decode and check a 64-byte header; raises :class:`ProtocolError` if it is not one."""
    mv = memoryview(raw).cast("B")
    if len(mv) < HEADER_SIZE:
        raise ProtocolError(f"{where}: short frame header ({len(mv)} of {HEADER_SIZE} bytes)")
    magic, wv, kind, flags, version, seq, count, plen, pdig, hdig = HEADER.unpack_from(mv, 0)
    if magic != MAGIC:
        raise ProtocolError(f"{where}: not a stalwart sync frame (magic {bytes(magic)!r})")
    if bin_digest(mv[:_SIGNED]) != hdig:
        raise ProtocolError(
            f"{where}: frame header failed its checksum (kind {kind}, version {version}, seq {seq})"
        )
    if wv != WIRE_VERSION:
        raise ProtocolError(f"{where}: wire format version {wv}, this build speaks {WIRE_VERSION}")
    return FrameHeader(kind, version, seq, count, plen, bytes(pdig), flags)


def verify_payload(hdr: FrameHeader, payload, what: str) -> None:
    """Raise :class:`IntegrityError` if ``payload`` does not match the header's digest."""
    mv = memoryview(payload).cast("B")
    if len(mv) != hdr.payload_len:
        raise IntegrityError(f"{what}: payload is {len(mv)} bytes, header says {hdr.payload_len}")
    got = bin_digest(mv)
    if got != hdr.payload_digest:
        raise IntegrityError(
            f"{what}: payload checksum mismatch (expected xxh3-128 {hdr.payload_digest.hex()}, found {got.hex()})"
        )


def json_bytes(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode("utf-8")


def parse_json(payload, what: str) -> dict:
    try:
        obj = json.loads(bytes(payload).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(f"{what}: payload is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what}: JSON payload is not an object")
    return obj


@dataclass(slots=True)
class Frame:
    """A received frame. ``payload`` may view transport memory: call the link's release after use."""

    header: FrameHeader
    payload: memoryview
    token: object = None  # transport bookkeeping (e.g. the shm slot to release)


# ---------------------------------------------------------------- BEGIN, NEED, END payloads

DIGEST_SIZE = 16
MODE_DELTA, MODE_FULL = 1, 2
MODES = {MODE_DELTA: "delta", MODE_FULL: "full"}
_BEGIN = struct.Struct("<BBHIQ8s16s")  # mode, flags, reserved, tensors, base version, session, schema digest
_U32 = struct.Struct("<I")
_MAX_SCHEMA_JSON = 256 << 20


@dataclass(slots=True)
class Begin:
    """An update's BEGIN: its mode and base, and (full syncs) the tensor list and every tensor's digest."""

    mode: str  # "delta" or "full"
    base_version: int | None
    session: str  # hex
    schema_digest: str  # hex
    tensors: int
    schema: list | None = None  # parsed JSON tensor list (full)
    digests: bytes | None = None  # DIGEST_SIZE per tensor, schema order (full)


def pack_begin(b: Begin, schema_json: str | None = None) -> bytes:
    """BEGIN payload::

    0   1   mode (1 delta, 2 full)
    1   1   flags (0)
    2   2   reserved (0)
    4   4   tensors in the schema
    8   8   base version (delta; 0 for full)
    16  8   sender session id
    24  16  schema digest (XXH3-128 of the schema's compact JSON)
    full syncs only:
    40  4   length L of the compressed schema
    44  L   zstd frame of the schema JSON ``[{name, dtype, shape}, ...]``
    44+L    16 * tensors: XXH3-128 of every tensor's bytes as sent, schema order
    """
    mode = MODE_FULL if b.mode == "full" else MODE_DELTA
    head = _BEGIN.pack(
        mode, 0, 0, b.tensors, b.base_version or 0, bytes.fromhex(b.session), bytes.fromhex(b.schema_digest)
    )
    if mode == MODE_DELTA:
        return head
    z = zstandard.ZstdCompressor(level=3).compress(schema_json.encode("utf-8"))
    return head + _U32.pack(len(z)) + z + b.digests


def parse_begin(payload, what: str) -> Begin:
    mv = memoryview(payload).cast("B")
    if len(mv) < _BEGIN.size:
        raise ProtocolError(f"{what}: BEGIN of {len(mv)} bytes")
    mode, _flags, _r, n, base, session, sdig = _BEGIN.unpack_from(mv, 0)
    if mode not in MODES:
        raise ProtocolError(f"{what}: unknown mode {mode}")
    b = Begin(MODES[mode], base if mode == MODE_DELTA else None, session.hex(), sdig.hex(), n)
    if mode == MODE_DELTA:
        if len(mv) != _BEGIN.size:
            raise ProtocolError(f"{what}: {len(mv) - _BEGIN.size} trailing bytes after a delta BEGIN")
        return b
    p = _BEGIN.size
    if len(mv) < p + 4:
        raise ProtocolError(f"{what}: full BEGIN without a schema")
    (zl,) = _U32.unpack_from(mv, p)
    p += 4
    if len(mv) != p + zl + DIGEST_SIZE * n:
        raise ProtocolError(f"{what}: full BEGIN of {len(mv)} bytes for a {zl}-byte schema and {n} digests")
    try:
        text = zstandard.ZstdDecompressor().decompress(mv[p : p + zl], max_output_size=_MAX_SCHEMA_JSON)
        b.schema = json.loads(text.decode("utf-8"))
    except (zstandard.ZstdError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(f"{what}: unreadable schema ({e})") from None
    b.digests = bytes(mv[p + zl :])
    return b


def pack_need(need: np.ndarray) -> bytes:
    """NEED payload: u32 tensor count, then a bitmap (``numpy.packbits`` order) of the tensors to send."""
    return _U32.pack(len(need)) + np.packbits(need.astype(np.bool_)).tobytes()


def parse_need(payload, tensors: int, what: str) -> np.ndarray:
    mv = memoryview(payload).cast("B")
    if len(mv) != 4 + (tensors + 7) // 8 or _U32.unpack_from(mv, 0)[0] != tensors:
        raise ProtocolError(f"{what}: NEED of {len(mv)} bytes does not cover {tensors} tensors")
    return np.unpackbits(np.frombuffer(mv[4:], dtype=np.uint8), count=tensors).astype(np.bool_)


def pack_end(model_digest: bytes, extra: list[tuple[int, bytes]]) -> bytes:
    """END payload: 16-byte whole-model digest (XXH3-128 of every tensor's digest, schema order),
    u32 m, then m times (u32 tensor id, 16-byte digest) for tensors a receiver cannot hash itself."""
    parts = [model_digest, _U32.pack(len(extra))]
    for i, d in extra:
        parts += [_U32.pack(i), d]
    return b"".join(parts)


def parse_end(payload, tensors: int, what: str) -> tuple[bytes, dict[int, bytes]]:
    mv = memoryview(payload).cast("B")
    if len(mv) < DIGEST_SIZE + 4:
        raise ProtocolError(f"{what}: END of {len(mv)} bytes")
    (m,) = _U32.unpack_from(mv, DIGEST_SIZE)
    if len(mv) != DIGEST_SIZE + 4 + m * (4 + DIGEST_SIZE):
        raise ProtocolError(f"{what}: END of {len(mv)} bytes for {m} tensor digests")
    extra = {}
    p = DIGEST_SIZE + 4
    for _ in range(m):
        (i,) = _U32.unpack_from(mv, p)
        if i >= tensors:
            raise ProtocolError(f"{what}: END has a digest for tensor {i} of {tensors}")
        extra[i] = bytes(mv[p + 4 : p + 4 + DIGEST_SIZE])
        p += 4 + DIGEST_SIZE
    return bytes(mv[:DIGEST_SIZE]), extra
