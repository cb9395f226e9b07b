import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stalwart.errors import LayoutError
from stalwart.formats.datafile import to_panels
from stalwart.formats.geometry import Box
from stalwart.formats.layout import (
    Layout,
    Mesh,
    ParallelConfig,
    Shard,
    Sharded,
    TensorSpec,
    TPRule,
    ZeroFlat,
    ZeroGroup,
    layout_from_model,
)

from .strategies import layouts, random_tensor, same_bits, tensor_specs


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_split_then_assemble_is_identity_and_sources_cover_once(data):
    specs = data.draw(tensor_specs())
    layout = data.draw(layouts(specs))
    for i, (name, shape, dtype) in enumerate(specs):
        t = random_tensor(shape, dtype, i)
        locs = {r: layout.split(name, t, r) for r in range(layout.world_size)}
        locs = {r: v for r, v in locs.items() if v is not None}
        if t.numel():
            assert same_bits(layout.assemble(name, locs), t)
        count = torch.zeros(shape, dtype=torch.int32)
        for _, piece in layout.sources(name, Box.full(shape)):
            count[tuple(slice(o, o + n) for o, n in zip(piece.box.offsets, piece.box.lengths))] += 1
        assert bool((count == 1).all()), f"{name}: writer pieces must cover each element exactly once"
        panels = layout.spec(name).panels
        for r, local in locs.items():
            # stored pieces address the local shard as stored: arranged in the spec's panels
            flat = (local if panels is None else to_panels(local, *panels)).contiguous().reshape(-1)
            for piece in layout.stored(name, r).pieces:
                got = flat.as_strided(piece.box.lengths, piece.strides, piece.offset)
                box = tuple(slice(o, o + n) for o, n in zip(piece.box.offsets, piece.box.lengths))
                assert same_bits(got, t[box])
    # the layout survives JSON unchanged
    again = Layout.from_json(json.loads(json.dumps(layout.to_json())))
    assert again.to_json() == layout.to_json()



@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_manifest_dumps_with_cached_layout_text_is_the_plain_encoding(data):
    from stalwart.formats.datafile import FileRecord
    from stalwart.formats.manifest import Manifest

    layout = data.draw(layouts(data.draw(tensor_specs())))
    files = [FileRecord(f"rank-{r}.safetensors", 100 + r, 40, "d" * 32, r) for r in range(layout.world_size)]
    objects = data.draw(st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=8), max_size=3))
    for step in (1, 2):  # the second dump reuses the layout's cached encoding
        m = Manifest(layout, files, step, objects, {"t": ["a"]}, {"framework": "X"}, created="2026-12-03T00:00:00+00:00")
        plain = json.dumps(m.to_json(), separators=(",", ":"), ensure_ascii=True).encode("utf-8")
        assert m.dumps() == plain

def test_zero2_partition_matches_deepspeed():
    # formats.md 1.3: emb 13x10, l1 7x10 + bias 7 at DP=2: 207 -> 208 -> 104 per rank.
    t = {"emb.weight": torch.zeros(13, 10), "l1.weight": torch.zeros(7, 10), "l1.bias": torch.zeros(7)}
    layout = Layout.zero(t, 2, 2)
    assert [(n, s.shape) for n, s in layout.writes(0)] == [("emb.weight", (104,))]
    assert [(n, s.shape) for n, s in layout.writes(1)] == [("emb.weight", (26,)), ("l1.weight", (70,)), ("l1.bias", (7,))]


def test_zero3_partition_matches_deepspeed():
    # formats.md 1.4: 130 -> 65, 70 -> 35, 7 -> 4 (+1 pad on the last rank, not stored)
    t = {"emb.weight": torch.zeros(13, 10), "l1.weight": torch.zeros(7, 10), "l1.bias": torch.zeros(7)}
    layout = Layout.zero(t, 2, 3)
    assert [s.shape for _, s in layout.writes(0)] == [(65,), (35,), (4,)]
    assert [s.shape for _, s in layout.writes(1)] == [(65,), (35,), (3,)]


def test_fused_qkv_gqa_tp_slices_each_subparam():
    q, kv, hd, hidden = 4, 2, 3, 5
    w = torch.arange((q + 2 * kv) * hd * hidden, dtype=torch.float32).view(-1, hidden)
    spec = TensorSpec("qkv", tuple(w.shape), w.dtype, Sharded((Shard(0, "tp", (q * hd, kv * hd, kv * hd), "even"),)))
    layout = Layout(Mesh(("tp",), (2,)), [spec])
    local = layout.split("qkv", w, 1)
    qs, ks, vs = w[: q * hd], w[q * hd : (q + kv) * hd], w[(q + kv) * hd :]
    expect = torch.cat([qs[q * hd // 2 :], ks[kv * hd // 2 :], vs[kv * hd // 2 :]])
    assert torch.equal(local, expect)


def test_vocab_padding_rows_are_zero_and_not_stored():
    v = torch.randn(11, 4)
    layout = Layout(Mesh(("tp",), (4,)), [TensorSpec("emb", (11, 4), v.dtype, Sharded((Shard(0, "tp", None, "padded", (12,)),)))])
    last = layout.split("emb", v, 3)
    assert last.shape == (3, 4)
    assert torch.equal(last[:2], v[9:]) and torch.equal(last[2], torch.zeros(4))
    assert sum(p.box.numel for p in layout.local("emb", 3).pieces) == 8


def test_layout_from_model_tp_and_zero():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 12), torch.nn.Linear(12, 8))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.tensor([1, 2])).sum().backward()
    opt.step()
    cfg = ParallelConfig(
        dp=2, tp=2, zero_stage=1,
        tp_rules=[TPRule(r"^0\.weight", "vocab", pad_multiple=4), TPRule(r"^1\.", "column"), TPRule(r"^2\.weight", "row")],
    )
    layout = layout_from_model(model, cfg, optimizer=opt)
    assert layout.mesh.sizes == (1, 2, 2)
    assert "optim.1.weight.exp_avg" in layout.tensors
    assert layout.spec("optim.1.weight.exp_avg").placement == layout.spec("1.weight").placement
    full = dict(model.named_parameters())
    for name in ("0.weight", "1.weight", "2.weight", "2.bias"):
        locs = {r: layout.split(name, full[name].detach(), r) for r in range(4)}
        assert torch.equal(layout.assemble(name, {r: v for r, v in locs.items() if v is not None}), full[name].detach())


def test_layout_errors_are_clear():
    with pytest.raises(LayoutError, match="not divisible"):
        spec = TensorSpec("w", (5, 2), torch.float32, Sharded((Shard(0, "tp", None, "even"),)))
        Layout(Mesh(("tp",), (2,)), [spec]).local("w", 0)
    with pytest.raises(LayoutError, match="no dimension 'tp'"):
        Layout(Mesh(("dp",), (2,)), [TensorSpec("w", (4,), torch.float32, Sharded((Shard(0, "tp"),)))])
    with pytest.raises(LayoutError, match="no tensor in the layout"):
        Layout(Mesh(("dp",), (2,)), [TensorSpec("w", (4,), torch.float32, ZeroFlat("g", "w"))], {"g": ZeroGroup(("w", "x"))})


def test_zero_group_paddings_and_alignment_shift_members():
    # buffer = [a0 a1 a2 PAD b0 b1 b2 | PAD]: members padded by (1, 0), total 7 aligned to 8, dp 2 -> 4 each
    a, b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 5.0, 6.0])
    specs = [TensorSpec("a", (3,), torch.float32, ZeroFlat("g", "a")), TensorSpec("b", (3,), torch.float32, ZeroFlat("g", "b"))]
    layout = Layout(Mesh(("dp",), (2,)), specs, {"g": ZeroGroup(("a", "b"), alignment=8, paddings=(1, 0))})
    assert torch.equal(layout.split("a", a, 0), a) and layout.split("a", a, 1) is None
    assert layout.split("b", b, 0) is None and torch.equal(layout.split("b", b, 1), b)
    unpadded = Layout(Mesh(("dp",), (2,)), specs, {"g": ZeroGroup(("a", "b"), alignment=8)})
    assert torch.equal(unpadded.split("b", b, 0), b[:1])


def test_zero_group_with_tp_members_uses_tp_local_offsets():
    # A TP-sharded and a replicated member share a flat buffer whose offsets depend on the TP rank.
    w = torch.arange(24, dtype=torch.float32).view(6, 4)
    n = torch.arange(5, dtype=torch.float32) + 100
    specs = [
        TensorSpec("w", (6, 4), torch.float32, ZeroFlat("g", "w", Sharded((Shard(0, "tp", None, "widths", None, ((4, 2),)),)))),
        TensorSpec("n", (5,), torch.float32, ZeroFlat("g", "n")),
    ]
    layout = Layout(Mesh(("dp", "tp"), (2, 2)), specs, {"g": ZeroGroup(("w", "n"), alignment=2)})
    # tp 0: w-local 16 + n 5 = 21 -> 22 -> 11 per dp rank; tp 1: 8 + 5 = 13 -> 14 -> 7
    rank = layout.mesh.rank
    assert layout.local("n", rank({"dp": 0, "tp": 0})) is None
    assert torch.equal(layout.split("n", n, rank({"dp": 1, "tp": 0})), n)
    assert torch.equal(layout.split("w", w, rank({"dp": 1, "tp": 1})), w[4:].reshape(-1)[7:])
    assert torch.equal(layout.split("n", n, rank({"dp": 1, "tp": 1})), n)
    assert layout.split("n", n, rank({"dp": 0, "tp": 1})) is None
