"""Name mapping between the trainer's tensors and the receiver's (rollout engine's) tensors.

The trainer sends tensors under its own names (the *wire schema*). A receiver maps
each wire tensor onto one or more *segments* of its own tensors: a segment says that
wire words ``[src_off, src_off + length)`` live in receiver tensor ``target`` from
word ``dst_off`` on. Slices along dimension 0 of a contiguous tensor are contiguous,
so fused projections (``q``, ``k``, ``v`` -> ``qkv_proj``; ``gate``, ``up`` ->
``gate_up_proj``) and their splits are plain segments, and sparse updates land in
the fused tensor directly.

Rules, in the order given:

* :class:`Prefix` / :class:`Rename` rewrite names (every matching rule applies, in order);
* :class:`Ignore` drops wire tensors the receiver does not hold;
* :class:`Fuse` puts several wire tensors side by side (dim 0) in one receiver tensor;
* :class:`Split` cuts one wire tensor (dim 0) into several receiver tensors;
* otherwise the (renamed) wire name must be a receiver tensor of the same shape.

Dtypes must match exactly (the codec is bitwise); convert on the sender with
``WeightSyncSender(..., dtype=torch.bfloat16)``.
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from stalwart.sync.codec import itemsize, word_size
from stalwart.sync.errors import SchemaError
from stalwart.sync.schema import Schema, TensorSpec

log = logging.getLogger("stalwart.sync")


@dataclass(frozen=True, slots=True)
class Segment:
    """Wire words ``[src_off, src_off + length)`` go to words ``[dst_off, dst_off + length)`` of ``target``."""

    target: str
    src_off: int
    dst_off: int
    length: int


class Prefix:
    """Rename: replace a leading ``old`` with ``new`` (e.g. ``Prefix("module.", "")``)."""

    def __init__(self, old: str, new: str = "") -> None:
        self.old, self.new = old, new

    def rename(self, name: str) -> str:
        return self.new + name[len(self.old) :] if name.startswith(self.old) else name

    def __repr__(self) -> str:
        return f"Prefix({self.old!r}, {self.new!r})"


class Rename:
    """Rename with a regular expression (``re.sub(pattern, repl, name)``)."""

    def __init__(self, pattern: str, repl: str) -> None:
        self.pattern, self.repl = re.compile(pattern), repl

    def rename(self, name: str) -> str:
        return self.pattern.sub(self.repl, name)

    def __repr__(self) -> str:
        return f"Rename({self.pattern.pattern!r}, {self.repl!r})"


class Ignore:
    """Wire tensors whose (renamed) name matches ``pattern`` are not applied (nor verified)."""

    def __init__(self, pattern: str) -> None:
        self.pattern = re.compile(pattern)

    def __repr__(self) -> str:
        return f"Ignore({self.pattern.pattern!r})"


class Fuse:
    """Several wire tensors stacked along dim 0 into one receiver tensor.

    ``pattern`` must have a named group ``part`` whose value is one of ``order``;
    ``target`` is formatted with the pattern's named groups. Example (vLLM layout)::

        Fuse(r"^(?P<pre>.*)\\.(?P<part>q|k|v)_proj\\.(?P<kind>weight|bias)$",
             "{pre}.qkv_proj.{kind}", order=("q", "k", "v"))
    """

    def __init__(self, pattern: str, target: str, order: Sequence[str]) -> None:
        self.pattern = re.compile(pattern)
        if "part" not in self.pattern.groupindex:
            raise ValueError(f"Fuse pattern {pattern!r} needs a named group 'part'")
        self.target, self.order = target, tuple(order)

    def __repr__(self) -> str:
        return f"Fuse({self.pattern.pattern!r}, {self.target!r}, {self.order})"


class Split:
    """One wire tensor cut along dim 0 into several receiver tensors (e.g. fused ``qkv`` -> ``q``, ``k``, ``v``).

    ``targets`` are formatted with the pattern's named groups; their row counts come
    from the receiver's tensors.
    """

    def __init__(self, pattern: str, targets: Sequence[str]) -> None:
        self.pattern, self.targets = re.compile(pattern), tuple(targets)

    def __repr__(self) -> str:
        return f"Split({self.pattern.pattern!r}, {self.targets})"


Rule = Prefix | Rename | Ignore | Fuse | Split


def _words_per_row(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for d in shape[1:]:
        n *= d
    return n * itemsize(dtype) // word_size(dtype)


class NameMapper:
    """Maps the wire schema onto a receiver's tensors (see the module docstring).

    Args:
        rules: applied as described above.
        strict: a wire tensor with no receiver tensor (and no :class:`Ignore`) is an
            error; otherwise it is skipped with a warning.
    """

    def __init__(self, *rules: Rule, strict: bool = True) -> None:
        self.rules = list(rules)
        self.strict = strict

    def __repr__(self) -> str:
        return f"NameMapper({', '.join(map(repr, self.rules))})"

    @staticmethod
    def hf_to_vllm(*extra: Rule, strict: bool = True) -> NameMapper:
        """Hugging Face Llama/Qwen/Mistral-style names -> vLLM's fused ``qkv_proj`` / ``gate_up_proj`` (TP=1)."""
        return NameMapper(
            *extra,
            Fuse(
                r"^(?P<pre>.*)\.(?P<part>q|k|v)_proj\.(?P<kind>weight|bias)$",
                "{pre}.qkv_proj.{kind}",
                ("q", "k", "v"),
            ),
            Fuse(
                r"^(?P<pre>.*)\.(?P<part>gate|up)_proj\.(?P<kind>weight|bias)$",
                "{pre}.gate_up_proj.{kind}",
                ("gate", "up"),
            ),
            strict=strict,
        )

    def rename(self, name: str) -> str:
        for r in self.rules:
            if isinstance(r, Prefix | Rename):
                name = r.rename(name)
        return name

    def map_schema(self, schema: Schema, targets: Mapping[str, torch.Tensor]) -> list[list[Segment]]:
        """Segments for every wire tensor (empty list: not applied). Raises :class:`SchemaError`."""
        renamed = [self.rename(s.name) for s in schema]
        by_name: dict[str, TensorSpec] = {}
        for n, s in zip(renamed, schema):
            if n in by_name:
                raise SchemaError(f"name rules map both {by_name[n].name!r} and {s.name!r} to {n!r}")
            by_name[n] = s
        out: list[list[Segment]] = []
        problems: list[str] = []
        for n, spec in zip(renamed, schema):
            try:
                out.append(self._map_one(n, spec, by_name, targets))
            except SchemaError as e:
                if self.strict:
                    problems.append(str(e))
                else:
                    log.warning("weight sync: %s; skipped", e)
                    out.append([])
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise SchemaError(
                "cannot map trainer tensors onto the receiver: " + "; ".join(problems[:5]) + more
            )
        self._check_coverage(schema, out, targets)
        return out

    def _target(
        self, targets: Mapping[str, torch.Tensor], name: str, spec: TensorSpec, wire_name: str
    ) -> torch.Tensor:
        t = targets.get(name)
        if t is None:
            near = [k for k in targets if k.rsplit(".", 1)[-1] == name.rsplit(".", 1)[-1]][:3]
            hint = f" (receiver has e.g. {near})" if near else ""
            raise SchemaError(f"trainer tensor {wire_name!r} -> {name!r}: no such receiver tensor{hint}")
        if t.dtype != spec.dtype:
            raise SchemaError(
                f"trainer tensor {wire_name!r} is {spec.dtype} but receiver tensor {name!r} is {t.dtype}"
                " (send the receiver's dtype: WeightSyncSender(..., dtype=...))"
            )
        if not t.is_contiguous():
            raise SchemaError(f"receiver tensor {name!r} is not contiguous")
        return t

    def _map_one(self, name: str, spec: TensorSpec, by_name: dict[str, TensorSpec], targets) -> list[Segment]:
        for r in self.rules:
            if isinstance(r, Ignore) and r.pattern.search(name):
                return []
        for r in self.rules:
            if isinstance(r, Fuse):
                m = r.pattern.search(name)
                if m:
                    return self._fuse(r, m, name, spec, by_name, targets)
            elif isinstance(r, Split):
                m = r.pattern.search(name)
                if m:
                    return self._split(r, m, spec, targets)
        t = self._target(targets, name, spec, spec.name)
        if tuple(t.shape) != spec.shape:
            raise SchemaError(
                f"trainer tensor {spec.name!r} has shape {list(spec.shape)}, receiver {name!r} has {list(t.shape)}"
            )
        return [Segment(name, 0, 0, spec.words)]

    def _fuse(self, r: Fuse, m: re.Match, name: str, spec: TensorSpec, by_name, targets) -> list[Segment]:
        part = m.group("part")
        if part not in r.order:
            raise SchemaError(f"trainer tensor {spec.name!r}: part {part!r} not in {r.order}")
        tname = r.target.format(**m.groupdict())
        t = self._target(targets, tname, spec, spec.name)
        s, e = m.span("part")
        rows = 0
        offset_rows = None
        for p in r.order:
            other = by_name.get(name[:s] + p + name[e:])
            if other is None:
                raise SchemaError(f"fusing into {tname!r}: trainer sends no {name[:s] + p + name[e:]!r}")
            if other.shape[1:] != tuple(t.shape[1:]) or len(other.shape) != t.dim():
                raise SchemaError(
                    f"fusing {other.name!r} {list(other.shape)} into {tname!r} {list(t.shape)}: trailing dims differ"
                )
            if p == part:
                offset_rows = rows
            rows += other.shape[0] if other.shape else 1
        if rows != (t.shape[0] if t.dim() else 1):
            raise SchemaError(
                f"fused parts {r.order} of {tname!r} have {rows} rows, receiver tensor has {t.shape[0]}"
            )
        wpr = _words_per_row(spec.shape, spec.dtype)
        return [Segment(tname, 0, offset_rows * wpr, spec.words)]

    def _split(self, r: Split, m: re.Match, spec: TensorSpec, targets) -> list[Segment]:
        groups = m.groupdict()
        segs = []
        row = 0
        wpr = _words_per_row(spec.shape, spec.dtype)
        for tmpl in r.targets:
            tname = tmpl.format(**groups)
            t = self._target(targets, tname, spec, spec.name)
            if tuple(t.shape[1:]) != spec.shape[1:]:
                raise SchemaError(
                    f"splitting {spec.name!r} {list(spec.shape)} into {tname!r} {list(t.shape)}: trailing dims differ"
                )
            n = t.shape[0]
            segs.append(Segment(tname, row * wpr, 0, n * wpr))
            row += n
        if row != spec.shape[0]:
            raise SchemaError(
                f"split targets of {spec.name!r} have {row} rows, the trainer tensor has {spec.shape[0]}"
            )
        return segs

    @staticmethod
    def _check_coverage(
        schema: Schema, segs: list[list[Segment]], targets: Mapping[str, torch.Tensor]
    ) -> None:
        # Group receiver names by storage so tied weights (aliases) count once.
        def key(t: torch.Tensor):
            return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype)

        covered: dict[tuple, list[tuple[int, int, str]]] = {}
        for i, ss in enumerate(segs):
            for s in ss:
                k = key(targets[s.target])
                covered.setdefault(k, []).append((s.dst_off, s.dst_off + s.length, schema[i].name))
        for ranges in covered.values():
            ranges.sort()
            for (_a0, a1, an), (b0, _b1, bn) in itertools.pairwise(ranges):
                if b0 < a1:
                    raise SchemaError(
                        f"trainer tensors {an!r} and {bn!r} both map onto the same receiver words [{b0}, {a1})"
                    )
        missing = []
        seen = set()
        for name, t in targets.items():
            k = key(t)
            if k in seen:
                continue
            seen.add(k)
            words = t.numel() * itemsize(t.dtype) // word_size(t.dtype)
            got = sum(b - a for a, b, _ in covered.get(k, []))
            if got < words and t.numel():
                missing.append(name)
        if missing:
            log.warning(
                "weight sync: %d receiver tensors are not (fully) covered by the trainer's update, e.g. %s",
                len(missing), missing[:5],
            )  # fmt: skip
