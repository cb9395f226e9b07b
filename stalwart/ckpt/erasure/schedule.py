"""XOR schedules: evaluate a GF(2) matrix-vector product with few XORs of whole arrays.

The bulk backends compute ``out[r] = XOR of inp[c] for every c with bits[r, c] == 1``
where every ``inp``/``out`` is a large array (one bit plane of one shard). Done naively
that costs ``ones - rows`` XORs. Paar's greedy common-subexpression elimination
(C. Paar, "Optimized arithmetic for Reed-Solomon encoders", ISIT 1997) repeatedly
replaces the pair of symbols that occurs in the most rows by a new temporary, which
roughly halves the XOR count for Cauchy bit matrices (RS(4, 2): 248 -> 122).

A :class:`Program` is a list of steps over three register files -- ``IN`` (read-only
inputs), ``OUT`` (the outputs) and ``TMP`` (scratch planes, reused once dead) -- that
any array library can run.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

IN, OUT, TMP = 0, 1, 2
#: ``(XOR3, dst, a, b)``: dst = a ^ b
XOR3 = "xor3"
#: ``(IXOR, dst, a)``: dst ^= a
IXOR = "ixor"
#: ``(COPY, dst, a)``: dst = a
COPY = "copy"
#: ``(ZERO, dst)``: dst = 0
ZERO = "zero"

Reg = tuple[int, int]  # (file, index)

#: Most symbols (inputs + temps) the pair elimination tracks: bounds its table to
#: MAX_SYMBOLS^2 int32 (6 MiB) and its time to well under a second per matrix.
MAX_SYMBOLS = 1280


@dataclass(frozen=True)
class Program:
    """A straight-line XOR program computing ``rows`` outputs from ``cols`` inputs."""

    rows: int
    cols: int
    n_tmp: int
    steps: tuple[tuple, ...]

    @property
    def xor_count(self) -> int:
        """Number of XOR steps (each one pass over a plane)."""
        return sum(1 for s in self.steps if s[0] in (XOR3, IXOR))

    def run_bits(self, inputs: np.ndarray) -> np.ndarray:
        """Evaluate on a ``(cols, n)`` array of integers (used by tests to check a program)."""
        regs = {IN: list(inputs), OUT: [None] * self.rows, TMP: [None] * self.n_tmp}
        for step in self.steps:
            op, dst = step[0], step[1]
            if op == XOR3:
                val = regs[step[2][0]][step[2][1]] ^ regs[step[3][0]][step[3][1]]
            elif op == IXOR:
                val = regs[dst[0]][dst[1]] ^ regs[step[2][0]][step[2][1]]
            elif op == COPY:
                val = regs[step[2][0]][step[2][1]].copy()
            else:
                val = np.zeros_like(inputs[0])
            regs[dst[0]][dst[1]] = val
        return np.stack(regs[OUT])


def _paar(bits: np.ndarray, rng: np.random.Generator | None) -> tuple[list[set[int]], list[tuple[int, int]]]:
    """Greedy pair elimination. Returns each row's symbols and the pair that defines each temp.

    Symbols ``0..cols-1`` are inputs, ``cols + t`` is temp ``t``. Ties between equally
    frequent pairs go to the first pair, or to a random one when ``rng`` is given. The
    pair co-occurrence counts are kept up to date incrementally.
    """
    cols = bits.shape[1]
    rows = [set(np.flatnonzero(r).tolist()) for r in bits]
    # every new temp removes at least two ones; the symbol count is capped so the pair
    # table stays small (wide codes, k + m >~ 40, then keep some naive XOR chains)
    cap = min(cols + int(bits.sum()) // 2 + 1, MAX_SYMBOLS)
    if cap <= cols:
        return rows, []
    co = np.zeros((cap, cap), dtype=np.int32)
    members: list[set[int]] = [set() for _ in range(cap)]
    for ri, r in enumerate(rows):
        idx = np.fromiter(r, dtype=np.intp, count=len(r))
        co[np.ix_(idx, idx)] += 1
        for s in r:
            members[s].add(ri)
    np.fill_diagonal(co, 0)
    pairs: list[tuple[int, int]] = []
    n = cols
    while n < cap:
        view = co[:n, :n]
        best = int(view.max()) if n else 0
        if best < 2:
            break
        if rng is None:
            flat = int(view.argmax())
        else:
            cand = np.flatnonzero(view == best)
            flat = int(cand[rng.integers(len(cand))])
        u, v = divmod(flat, n)
        t = n
        n += 1
        both = members[u] & members[v]
        for ri in both:
            r = rows[ri]
            r.discard(u)
            r.discard(v)
            others = np.fromiter(r, dtype=np.intp, count=len(r))
            co[u, others] -= 1
            co[others, u] -= 1
            co[v, others] -= 1
            co[others, v] -= 1
            co[t, others] += 1
            co[others, t] += 1
            r.add(t)
            members[t].add(ri)
        members[u] -= both
        members[v] -= both
        co[u, v] = co[v, u] = 0
        pairs.append((u, v))
    _inline_single_use(rows, pairs, cols)
    return rows, pairs


def _inline_single_use(rows: list[set[int]], pairs: list[tuple[int, int]], cols: int) -> None:
    """Replace temps used by exactly one row (and nothing else) by their two parts.

    Same XOR count, no scratch plane, and a row never ends up as a lone temp (a copy).
    """
    while True:
        uses: dict[int, int] = {}
        for r in rows:
            for s in r:
                uses[s] = uses.get(s, 0) + 1
        for u, v in pairs:
            uses[u] = uses.get(u, 0) + 1
            uses[v] = uses.get(v, 0) + 1
        target = None
        for t in range(len(pairs)):
            sym = cols + t
            if uses.get(sym, 0) == 1:
                target = next(((sym, r) for r in rows if sym in r), None)
                if target is not None:
                    break
        if target is None:
            return
        sym, r = target
        r.discard(sym)
        for part in pairs[sym - cols]:
            if part in r:  # x ^ x cancels
                r.discard(part)
            else:
                r.add(part)


def _restarts(rows: int, cols: int) -> int:
    """Randomised Paar restarts worth paying for once per matrix (about 0.1-0.3 s at most)."""
    size = rows * cols
    if size <= 1024:
        return 16
    if size <= 4096:
        return 2
    return 0


@functools.lru_cache(maxsize=512)
def _compile(bits_bytes: bytes, rows: int, cols: int) -> Program:
    bits = np.frombuffer(bits_bytes, dtype=np.uint8).reshape(rows, cols)
    row_syms, pairs = _paar(bits, None)
    cost = _cost(row_syms, pairs)
    rng = np.random.default_rng(0x11D)  # fixed seed: the same matrix always gets the same program
    for _ in range(_restarts(rows, cols)):
        cand = _paar(bits, rng)
        c = _cost(*cand)
        if c < cost:
            row_syms, pairs, cost = cand[0], cand[1], c

    # temps actually reachable from the rows (inlining can orphan some), and the
    # remaining uses of every symbol by rows and by reachable temps
    needed: set[int] = set()
    todo = [s for r in row_syms for s in r if s >= cols]
    while todo:
        t = todo.pop()
        if t not in needed:
            needed.add(t)
            todo.extend(x for x in pairs[t - cols] if x >= cols)
    uses: dict[int, int] = {}
    for r in row_syms:
        for s in r:
            uses[s] = uses.get(s, 0) + 1
    for t in needed:
        for x in pairs[t - cols]:
            uses[x] = uses.get(x, 0) + 1

    steps: list[tuple] = []
    where: dict[int, Reg] = {c: (IN, c) for c in range(cols)}
    free: list[int] = []
    n_tmp = 0

    def release(sym: int) -> None:
        if sym >= cols:
            uses[sym] -= 1
            if uses[sym] == 0:
                free.append(where.pop(sym)[1])

    def materialise(sym: int) -> Reg:
        """Compute a temp (and, first, the temps it is made of) into a free slot."""
        nonlocal n_tmp
        stack = [sym]
        while stack:
            top = stack[-1]
            if top in where:
                stack.pop()
                continue
            u, v = pairs[top - cols]
            pending = [x for x in (u, v) if x not in where]
            if pending:
                stack.extend(pending)
                continue
            if free:
                slot = free.pop()
            else:
                slot = n_tmp
                n_tmp += 1
            reg = (TMP, slot)
            steps.append((XOR3, reg, where[u], where[v]))
            release(u)
            release(v)
            where[top] = reg
            stack.pop()
        return where[sym]

    for r, syms in enumerate(row_syms):
        dst = (OUT, r)
        order = sorted(syms)
        if not order:
            steps.append((ZERO, dst))
            continue
        regs = [materialise(s) for s in order]
        if len(regs) == 1:
            steps.append((COPY, dst, regs[0]))
        else:
            steps.append((XOR3, dst, regs[0], regs[1]))
            for reg in regs[2:]:
                steps.append((IXOR, dst, reg))
        for s in order:
            release(s)
    return Program(rows=rows, cols=cols, n_tmp=n_tmp, steps=tuple(steps))


def _cost(rows: list[set[int]], pairs: list[tuple[int, int]]) -> int:
    return len(pairs) + sum(max(0, len(r) - 1) for r in rows)


def compile_xor_program(bits: np.ndarray) -> Program:
    """The XOR program for a 0/1 matrix (``rows`` outputs x ``cols`` inputs); cached by content."""
    bits = np.ascontiguousarray(bits, dtype=np.uint8)
    if bits.ndim != 2:
        raise ValueError(f"bit matrix must be 2-D, got shape {bits.shape}")
    if bits.size and int(bits.max()) > 1:
        raise ValueError("bit matrix entries must be 0 or 1")
    return _compile(bits.tobytes(), bits.shape[0], bits.shape[1])
