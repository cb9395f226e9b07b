"""The native host kernel: bitwise equal to the rule's torch-op reference (same operations,
same order, same fp32 scalars) for every gradient/output dtype and flag combination,
across segment and thread boundaries; the build cache and its errors."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from stalwart.offload import native
from stalwart.offload.rules import ADAM_DECOUPLED, ADAM_L2, GSCALE, AdamRule

CODES = {torch.float32: native.F32, torch.bfloat16: native.BF16, torch.float16: native.F16}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def make_segments(sizes, gdtype, odtype, seed, rows, alias=False):
    """Random problems of the given sizes; returns host tensors and the segment table."""
    g = torch.Generator().manual_seed(seed)
    probs = []
    segs = np.zeros(len(sizes), native.SEG_DTYPE)
    for i, n in enumerate(sizes):
        p = torch.randn(n, generator=g)
        grad = (torch.randn(n, generator=g) * 0.05).to(gdtype)
        m = torch.randn(n, generator=g) * 0.01
        v = torch.rand(n, generator=g) * 1e-3
        if i % 3 == 0 and n > 2:
            grad[:2] = 0.0  # zero gradients (sign of zero must survive identically)
            v[:2] = 0.0
        out = None
        if odtype is not None:
            out = grad if alias else torch.empty(n, dtype=odtype)
        probs.append([p, grad, m, v, out, grad.clone()])
        segs[i] = (p.data_ptr(), grad.data_ptr(), m.data_ptr(), v.data_ptr(), out.data_ptr() if out is not None else 0,
                   n, CODES[gdtype], CODES[odtype] if odtype else 0, i % rows, 0)
    return probs, segs


def reference(rule, probs, table):
    out = []
    for i, (p, _, m, v, o, grad0) in enumerate(probs):
        P, M, V = p.clone(), m.clone(), v.clone()
        rule.apply([P], [grad0], [[M, V]], [table[i % len(table)]])
        out.append((P, M, V, None if o is None else P.to(o.dtype)))
    return out


GROUPS = [
    {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1},
    {"lr": 3e-2, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.0},
    {"lr": 5e-4, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.01, "maximize": True},
]


@pytest.mark.parametrize("decoupled", [True, False])
@pytest.mark.parametrize("gdtype,odtype,alias", [
    (torch.float32, None, False), (torch.bfloat16, torch.bfloat16, False), (torch.float16, torch.float16, False),
    (torch.bfloat16, torch.bfloat16, True), (torch.float16, torch.float16, True), (torch.float32, torch.float32, False),
    (torch.float32, torch.bfloat16, False),
])
def test_kernel_bitwise_equals_reference(decoupled, gdtype, odtype, alias):
    rule = AdamRule(decoupled)
    table = np.array([rule.scalars(GROUPS[0], 1), rule.scalars(GROUPS[1], 7, gscale=0.37),
                      rule.scalars(GROUPS[2], 1000, gscale=0.5)])
    assert table["flags"][0] & (ADAM_DECOUPLED if decoupled else ADAM_L2)
    assert table["flags"][1] == GSCALE and table["flags"][2] & GSCALE  # wd 0: no decay flag; maximize: gscale -0.5
    sizes = [1, 15, 1023, 1025, 40_000, 70_001, 3]  # odd sizes: vector tails, blocks, thread split (>32k total)
    probs, segs = make_segments(sizes, gdtype, odtype, seed=hash((decoupled, str(gdtype), alias)) % 1000, rows=3,
                                alias=alias)
    expected = reference(rule, probs, table)
    kernel = native.HostKernel(threads=2)
    kernel.step(rule.rule_id, segs, table)
    kernel.close()
    for (p, _, m, v, o, _), (p_ref, m_ref, v_ref, o_ref) in zip(probs, expected):
        assert torch.equal(bits(p), bits(p_ref)) and torch.equal(bits(m), bits(m_ref))
        assert torch.equal(bits(v), bits(v_ref))
        if o is not None:
            assert torch.equal(bits(o), bits(o_ref))


def test_kernel_same_bits_for_any_thread_count():
    rule = AdamRule()
    table = np.array([rule.scalars(GROUPS[0], 3)])
    results = []
    for threads in (1, 2, 3):
        probs, segs = make_segments([100_000, 33_333], torch.bfloat16, torch.bfloat16, seed=5, rows=1)
        native.HostKernel(threads).step(rule.rule_id, segs, table)
        results.append([bits(t).clone() for pr in probs for t in pr[:4]])
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_kernel_rejects_bad_segments():
    rule = AdamRule()
    table = np.array([rule.scalars(GROUPS[0], 1)])
    probs, segs = make_segments([64], torch.float32, None, seed=1, rows=1)
    kernel = native.HostKernel(1)
    bad = segs.copy()
    bad["s0"] = 0
    with pytest.raises(ValueError, match="null pointer"):
        kernel.step(rule.rule_id, bad, table)
    bad = segs.copy()
    bad["scal"] = 4
    with pytest.raises(ValueError, match="scalar row"):
        kernel.step(rule.rule_id, bad, table)
    kernel.close()
    with pytest.raises(RuntimeError, match="closed"):
        kernel.step(rule.rule_id, segs, table)
    assert torch.equal(probs[0][0], probs[0][0])


def test_build_is_cached_by_source_and_flags(tmp_path, monkeypatch):
    """A fresh cache dir builds once (seconds); the next lookup loads the same file."""
    monkeypatch.setenv("STALWART_OFFLOAD_CACHE", str(tmp_path))
    calls = []
    real = native._compile
    monkeypatch.setattr(native, "_compile", lambda *a: calls.append(a) or real(*a))
    first = native.library_path.__wrapped__()
    second = native.library_path.__wrapped__()
    assert first == second and first.startswith(str(tmp_path)) and len(calls) == 1
    assert "-ffp-contract=off" in calls[0][1]
    assert [f for f in os.listdir(tmp_path) if f.endswith(".so")] == [os.path.basename(first)]


def test_missing_compiler_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("STALWART_OFFLOAD_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "no-such-cc")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(native.NativeBuildError, match="no C compiler found"):
        native.library_path.__wrapped__()
