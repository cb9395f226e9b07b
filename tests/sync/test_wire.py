"""Frame headers: every field round-trips, any flipped bit is caught."""

from __future__ import annotations

import json

import pytest
import torch

from stalwart.formats.checksum import digest
from stalwart.sync.errors import IntegrityError, ProtocolError
from stalwart.sync.schema import Schema, TensorSpec
from stalwart.sync.wire import HEADER_SIZE, Kind, bin_digest, pack_header, parse_header, verify_payload


def test_header_roundtrip_and_every_bit_is_checked():
    payload = b"x" * 1000
    raw = pack_header(Kind.BUCKET, 2**40 + 3, 17, 5, payload)
    assert len(raw) == HEADER_SIZE
    h = parse_header(raw)
    assert (h.kind, h.version, h.seq, h.count, h.payload_len) == (Kind.BUCKET, 2**40 + 3, 17, 5, 1000)
    verify_payload(h, payload, "t")
    for bit in range(0, HEADER_SIZE * 8, 7):
        bad = bytearray(raw)
        bad[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(ProtocolError):
            parse_header(bytes(bad), "t")
    with pytest.raises(IntegrityError, match="checksum mismatch"):
        verify_payload(h, b"y" + payload[1:], "bucket 3")
    with pytest.raises(IntegrityError, match="999 bytes, header says 1000"):
        verify_payload(h, payload[1:], "bucket 3")


def test_digest_is_the_formats_checksum():
    data = bytes(range(256)) * 10
    assert bin_digest(data).hex() == digest(data)


def test_schema_json_roundtrip_and_digest():
    s = Schema(
        [
            TensorSpec("a.b", torch.bfloat16, (3, 4)),
            TensorSpec("c", torch.float8_e4m3fn, ()),
            TensorSpec("z", torch.complex128, (2,)),
        ]
    )
    t = Schema.from_json(json.loads(s.json_text))
    assert t.digest == s.digest and [x for x in t] == [x for x in s]
    assert s[2].words == 4 and s[1].words == 1 and s.nbytes == 24 + 1 + 32
    with pytest.raises(ProtocolError):
        Schema.from_json([{"name": "a", "dtype": "nope", "shape": [1]}])


def test_begin_need_end_roundtrip_and_malformed_payloads():
    import numpy as np

    from stalwart.sync.wire import Begin, pack_begin, pack_end, pack_need, parse_begin, parse_end, parse_need

    s = Schema([TensorSpec("a", torch.bfloat16, (3, 4)), TensorSpec("b", torch.float32, (2,))])
    digests = bytes(range(32))
    full = Begin("full", None, "0123456789abcdef", s.digest, 2, digests=digests)
    b = parse_begin(pack_begin(full, s.json_text), "t")
    assert (b.mode, b.base_version, b.session, b.schema_digest, b.tensors, b.digests) == (
        "full", None, "0123456789abcdef", s.digest, 2, digests,
    )  # fmt: skip
    assert Schema.from_json(b.schema).digest == s.digest
    delta = pack_begin(Begin("delta", 7, "0123456789abcdef", s.digest, 2))
    assert len(delta) == 40 and parse_begin(delta, "t").base_version == 7
    for bad in (delta[:39], delta + b"x", pack_begin(full, s.json_text)[:-1], b"\x09" + delta[1:]):
        with pytest.raises(ProtocolError):
            parse_begin(bad, "t")
    need = np.array([True, False, False, True, True, False, False, False, True])
    assert np.array_equal(parse_need(pack_need(need), 9, "t"), need)
    with pytest.raises(ProtocolError, match="does not cover"):
        parse_need(pack_need(need), 8, "t")
    model, extra = parse_end(pack_end(b"m" * 16, [(1, b"d" * 16)]), 2, "t")
    assert model == b"m" * 16 and extra == {1: b"d" * 16}
    with pytest.raises(ProtocolError, match="tensor 5 of 2"):
        parse_end(pack_end(b"m" * 16, [(5, b"d" * 16)]), 2, "t")
    with pytest.raises(ProtocolError):
        parse_end(pack_end(b"m" * 16, [(1, b"d" * 16)])[:-1], 2, "t")
