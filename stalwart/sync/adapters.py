"""Where a receiver writes: a plain PyTorch or Hugging Face model, a dict of tensors, or an engine.

:class:`ModelAdapter` exposes a model's parameters and buffers (aliases of tied
weights included, so either name can be targeted) and two hooks an engine adapter
can override: :meth:`~ModelAdapter.begin_update` and :meth:`~ModelAdapter.end_update`
(e.g. re-run post-load processing, or push changed tensors into an engine that keeps
its own copy; see :class:`CallbackAdapter`).

:class:`Destination` is the receiver's compiled plan for one wire schema: for each
wire tensor its segments (from :class:`~stalwart.sync.names.NameMapper`) as word views
of the receiver's tensors. It applies decoded entries in place (numpy on CPU, torch on
CUDA) and computes the digests the sender's END frame is checked against.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import nn

from stalwart.formats.checksum import StreamDigest
from stalwart.sync.codec import DecodedEntry, apply_np, apply_torch, words_torch
from stalwart.sync.names import NameMapper, Segment
from stalwart.sync.schema import Schema

_STAGE_BYTES = 16 << 20


class ModelAdapter:
    """The tensors a receiver updates in place.

    Args:
        model: an ``nn.Module`` (plain or Hugging Face) or a mapping of name -> tensor.
        include_buffers: also expose the module's buffers.
    """

    def __init__(
        self, model: nn.Module | Mapping[str, torch.Tensor], *, include_buffers: bool = True
    ) -> None:
        self.model = model
        self.include_buffers = include_buffers

    def tensors(self) -> dict[str, torch.Tensor]:
        """Name -> tensor (detached views sharing storage with the model)."""
        m = self.model
        if isinstance(m, nn.Module):
            out = {n: p.detach() for n, p in m.named_parameters(remove_duplicate=False)}
            if self.include_buffers:
                for n, b in m.named_buffers(remove_duplicate=False):
                    out.setdefault(n, b.detach())
            return out
        if isinstance(m, Mapping):
            return {str(n): t.detach() for n, t in m.items()}
        raise TypeError(f"cannot update a {type(m).__name__}: pass an nn.Module or a mapping of tensors")

    def begin_update(self, version: int, mode: str) -> None:
        """Called before the first bucket of an update is applied."""

    def end_update(self, version: int, changed: list[str]) -> None:
        """Called after an update was applied and verified, before it is acknowledged;
        ``changed`` are receiver tensor names. If it raises, the receiver reports itself
        stale and gets a full sync."""


class CallbackAdapter(ModelAdapter):
    """Keeps a mirror (``model``) updated in place and hands changed tensors to ``on_update``.

    For engines whose weights are not plain tensors the receiver may write into (tensor
    parallel shards, quantized layouts): the mirror holds the trainer-layout weights,
    and ``on_update(version, [(name, tensor), ...])`` pushes the changed ones into the
    engine, e.g. ``lambda v, items: llm_model.load_weights(items)`` (vLLM worker) or
    ``lambda v, items: engine.update_weights_from_tensor(items)`` (SGLang).
    """

    def __init__(
        self,
        model: nn.Module | Mapping[str, torch.Tensor],
        on_update: Callable[[int, list[tuple[str, torch.Tensor]]], None],
        *,
        include_buffers: bool = True,
    ) -> None:
        super().__init__(model, include_buffers=include_buffers)
        self.on_update = on_update

    def end_update(self, version: int, changed: list[str]) -> None:
        ts = self.tensors()
        self.on_update(version, [(n, ts[n]) for n in changed])


class _Seg:
    __slots__ = ("cpu", "dst_off", "length", "np", "src_off", "target", "words")

    def __init__(self, s: Segment, t: torch.Tensor) -> None:
        self.target = s.target
        self.src_off, self.dst_off, self.length = s.src_off, s.dst_off, s.length
        self.words = words_torch(t)
        self.cpu = t.device.type == "cpu"
        self.np = self.words.numpy() if self.cpu else None


class Destination:
    """A wire schema compiled against one receiver's tensors."""

    def __init__(self, schema: Schema, adapter: ModelAdapter, mapper: NameMapper) -> None:
        self.schema = schema
        targets = adapter.tensors()
        segs = mapper.map_schema(schema, targets)
        self.segs: list[list[_Seg]] = [[_Seg(s, targets[s.target]) for s in ss] for ss in segs]
        self._where = self._storage(targets, {s.target for ss in segs for s in ss})
        self.nbytes = sum(s.length * s.words.element_size() for ss in self.segs for s in ss)
        self._stage: torch.Tensor | None = None
        # the trainer's per-tensor digests of the version this receiver verified last (deltas
        # are checked against them: a delta carries only the whole-model digest)
        self.expected: list[bytes] | None = None
        self.expected_version: tuple[str, int] | None = None
        # hashing wire tensors in order as entries are applied (while their words are in cache)
        self._ordered = [sorted(ss, key=lambda g: g.src_off) for ss in self.segs]
        self._host_only = [bool(ss) and all(g.cpu for g in ss) for ss in self.segs]
        self._hpos: list[int] | None = None
        self._hd: list[StreamDigest | None] = []

    @staticmethod
    def _storage(targets: dict[str, torch.Tensor], names) -> dict[str, tuple]:
        return {
            n: (targets[n].device, targets[n].data_ptr(), tuple(targets[n].shape), targets[n].dtype)
            for n in names
        }

    def is_current(self, adapter: ModelAdapter) -> bool:
        """Whether the receiver's tensors still live where this plan writes (engines may reallocate
        weights, e.g. when sleeping and waking); if not, the plan must be rebuilt."""
        targets = adapter.tensors()
        try:
            return self._storage(targets, self._where) == self._where
        except KeyError:
            return False

    def apply(self, e: DecodedEntry, touched: set[str], changed: set[int] | None = None) -> None:
        """Apply one decoded entry; adds the receiver tensors it changed to ``touched`` and the
        wire tensors whose words it may change to ``changed``.

        An entry runs from word ``start`` of tensor ``tensor_id`` on, into the following
        tensors of the schema (each must have the entry's word size; tensors without
        words are passed over).
        """
        h = e.header
        w = 1 << h.word_log2
        t, s, pos, length = h.tensor_id, h.start, 0, h.length
        n = len(self.segs)
        several = False
        while pos < length:
            if t >= n:
                raise IndexError(
                    f"entry from tensor {h.tensor_id} runs past the last tensor ({n} in the schema)"
                )
            spec = self.schema[t]
            if spec.words == 0 and s == 0:
                t += 1
                continue
            if spec.word != w or s >= spec.words:
                raise ValueError(
                    f"entry covers word {s} of {spec.name!r} ({spec.words} words of {spec.word} bytes)"
                    f" with {w}-byte words"
                )
            take = min(spec.words - s, length - pos)
            several = several or take < length
            segs = self.segs[t]
            hit = not segs and (e.idx is None or bool(np.any((e.idx >= pos) & (e.idx < pos + take))))
            for g in segs:
                lo, hi = max(s, g.src_off), min(s + take, g.src_off + g.length)
                if lo >= hi:
                    continue
                args = (e, pos + lo - s, pos + hi - s, g.dst_off + (lo - g.src_off), several)
                if apply_np(g.np, *args) if g.cpu else apply_torch(g.words, *args):
                    touched.add(g.target)
                    hit = True
            if hit and changed is not None:
                changed.add(t)
            if self._hpos is not None and self._host_only[t]:
                if s >= self._hpos[t]:
                    self._hash_upto(t, s + take)
                else:  # out of order (never sent so): hash the whole tensor at the end
                    self._hpos[t] = -1
            pos += take
            t += 1
            s = 0

    @property
    def unmapped(self) -> list[int]:
        """Wire tensors this receiver does not hold (ignored by its name map)."""
        return [i for i, ss in enumerate(self.segs) if not ss and self.schema[i].words]

    def begin_digests(self) -> None:
        """Hash each wire tensor progressively as :meth:`apply` goes through it (in order), so
        :meth:`finish_digests` reads only what no entry touched."""
        self._hpos = [0] * len(self.segs)
        self._hd = [None] * len(self.segs)

    def _hash_upto(self, t: int, upto: int) -> None:
        lo = self._hpos[t]
        if lo < 0 or upto <= lo:
            return
        d = self._hd[t]
        if d is None:
            d = self._hd[t] = StreamDigest()
        for g in self._ordered[t]:
            a, b = max(lo, g.src_off), min(upto, g.src_off + g.length)
            if a < b:
                d.update(memoryview(g.np[g.dst_off + a - g.src_off : g.dst_off + b - g.src_off]).cast("B"))
        self._hpos[t] = upto

    def finish_digests(self) -> list[bytes | None]:
        """Every wire tensor's digest as the receiver holds it (None where not mapped)."""
        out: list[bytes | None] = []
        for t, spec in enumerate(self.schema):
            if self._hpos is not None and self._host_only[t] and self._hpos[t] >= 0:
                self._hash_upto(t, spec.words)
                d = self._hd[t] or StreamDigest()
                out.append(bytes.fromhex(d.hexdigest()))
            else:
                out.append(self.tensor_digest(t))
        self._hpos = None
        self._hd = []
        return out

    def tensor_digest(self, i: int) -> bytes | None:
        """XXH3-128 of wire tensor ``i`` as the receiver holds it (None if not mapped)."""
        ss = self.segs[i]
        if not ss:
            return None
        d = StreamDigest()
        for s in self._ordered[i]:
            if s.cpu:
                d.update(memoryview(s.np[s.dst_off : s.dst_off + s.length]).cast("B"))
            else:
                self._hash_device(d, s)
        return bytes.fromhex(d.hexdigest())

    def _hash_device(self, d: StreamDigest, s: _Seg) -> None:
        w = s.words.element_size()
        step = _STAGE_BYTES // w
        if self._stage is None:
            self._stage = torch.empty(_STAGE_BYTES, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
        for off in range(s.dst_off, s.dst_off + s.length, step):
            n = min(step, s.dst_off + s.length - off)
            host = self._stage[: n * w].view(s.words.dtype)
            host.copy_(s.words[off : off + n])
            d.update(memoryview(host.numpy()).cast("B"))

    def synchronize(self) -> None:
        for ss in self.segs:
            for s in ss:
                if not s.cpu:
                    torch.cuda.synchronize(s.words.device)
                    return
