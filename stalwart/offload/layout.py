"""Where each parameter's optimizer state lives in the flat host buffers, and how the
flat space is cut into subgroups (pure bookkeeping: no memory is touched here).

Parameters are laid out one after another in optimizer order, each starting on a
64-byte boundary. The state buffers (one per slot: ``exp_avg``, ``exp_avg_sq``) share
one element space; it is cut into subgroups of ``subgroup_size`` elements, so a large
parameter may span subgroups and a subgroup may hold pieces of many parameters. Every
subgroup is a contiguous range of every buffer (one copy moves it). Master weights and
host gradient staging exist only for the parameters that need them, in the same order,
so their subgroup ranges are contiguous too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

ALIGN = 16  # elements (64 bytes of fp32)
PAGE_ELEMS = 1024  # subgroup sizes are multiples of this (4 KiB of fp32): subgroups start on pages


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (without an autograd node), else the tensor itself."""
    loc = getattr(t, "_local_tensor", None)
    return t if loc is None else loc


def _align(x: int, to: int) -> int:
    return -(-x // to) * to


@dataclass
class ParamEntry:
    index: int  # position in the optimizer's parameter order
    param: torch.Tensor
    group: int
    name: str  # for messages: "group 0, param 3 (shape ...)"
    numel: int  # local elements
    shape: tuple[int, ...]  # local shape
    dtype: torch.dtype
    offset: int  # element offset in the state buffers
    master_offset: int | None  # element offset in the master buffer (None: the param is its own master)
    grad_offset: int | None  # byte offset in the host gradient staging buffer (None: none)


@dataclass
class Piece:
    """The elements ``[start, start + n)`` of one parameter, all in one subgroup."""

    entry: int
    start: int
    n: int
    subgroup: int


@dataclass
class Subgroup:
    index: int
    start: int  # element range of the state buffers
    stop: int
    pieces: list[int] = field(default_factory=list)
    numel: int = 0  # real elements (padding excluded)
    master: tuple[int, int] = (0, 0)  # element range of the master buffer
    grad: tuple[int, int] = (0, 0)  # byte range of the gradient staging buffer
    out_bytes: int = 0  # bytes of updated weights sent to the device after a host update


@dataclass
class Layout:
    entries: list[ParamEntry]
    pieces: list[Piece]
    subgroups: list[Subgroup]
    total: int  # elements of each state buffer
    master_total: int  # elements of the master buffer
    grad_total: int  # bytes of the gradient staging buffer
    subgroup_size: int


def build_layout(groups: list[list[torch.Tensor]], subgroup_size: int, needs_master, staging: bool) -> Layout:
    """Lay out ``groups`` (the optimizer's param groups, params in order).
    ``needs_master(p)`` says whether a param needs an fp32 master copy; ``staging``
    whether gradients are staged in host memory (parameters on a device)."""
    size = max(PAGE_ELEMS, _align(int(subgroup_size), PAGE_ELEMS))
    entries: list[ParamEntry] = []
    off = moff = goff = 0
    for gi, params in enumerate(groups):
        for pi, p in enumerate(params):
            loc = local_tensor(p)
            n = loc.numel()
            name = f"param group {gi}, param {pi} (shape {tuple(p.shape)}, {str(p.dtype).replace('torch.', '')})"
            master = needs_master(p)
            entries.append(ParamEntry(len(entries), p, gi, name, n, tuple(loc.shape), loc.dtype, off,
                                      moff if master else None, goff if staging else None))
            off += _align(n, ALIGN)
            if master:
                moff += _align(n, ALIGN)
            if staging:
                goff += _align(n * loc.dtype.itemsize, 64)
    subgroups = [Subgroup(i, s, min(s + size, off)) for i, s in enumerate(range(0, off, size))]
    pieces: list[Piece] = []
    for e in entries:
        pos = 0
        while pos < e.numel:
            sg = (e.offset + pos) // size
            n = min(e.numel - pos, subgroups[sg].stop - (e.offset + pos))
            pieces.append(Piece(e.index, pos, n, sg))
            subgroups[sg].pieces.append(len(pieces) - 1)
            subgroups[sg].numel += n
            pos += n
    for sg in subgroups:
        ents = [entries[pieces[i].entry] for i in sg.pieces]
        ms = [(e.master_offset + pieces[i].start, pieces[i].n) for i, e in zip(sg.pieces, ents) if e.master_offset is not None]
        if ms:
            sg.master = (ms[0][0], ms[-1][0] + ms[-1][1])
        if staging and sg.pieces:
            first, last = pieces[sg.pieces[0]], pieces[sg.pieces[-1]]
            fe, le = entries[first.entry], entries[last.entry]
            sg.grad = (fe.grad_offset + first.start * fe.dtype.itemsize,
                       le.grad_offset + (last.start + last.n) * le.dtype.itemsize)
        sg.out_bytes = sum(pieces[i].n * e.dtype.itemsize for i, e in zip(sg.pieces, ents))
    return Layout(entries, pieces, subgroups, off, moff, goff, size)
