"""The performance model and the per-subgroup placement planner (pure logic: no torch).

Every step each subgroup of the optimizer state is updated in one of three places:

- ``cpu``: its gradient went to host memory during the backward pass; the host kernel
  updates it; the updated weights go back to the device (``param_up_bytes``).
- ``gpu``: its state is uploaded (``up_bytes``), updated on the device next to its
  gradient, and downloaded again (``down_bytes``) so host memory stays the source of
  truth; needs ``device_bytes`` of scratch while it is there.
- ``resident``: like ``gpu`` but its state stays on the device between steps (no
  upload), within the resident budget; still downloaded every step.

The model of the update phase (all rates from :class:`Calibration`) runs four
resources at once and ends when the busiest one does::

    cpu  = sum_cpu(n / cpu_rate) + the last CPU subgroup's weight upload
    h2d  = sum_gpu(up / h2d_bw + latency) + sum_cpu(param_up / h2d_bw + latency)
    gpu  = sum_gpu+res(n / gpu_rate)
    d2h  = lead + sum_gpu+res(down / d2h_bw + latency)     (lead: first device result)
    makespan = max(cpu, h2d, gpu, d2h)

With one scratch slot on the device a non-resident subgroup's upload, update and
download cannot overlap the next one's, and the device chain is their sum. The plan
is the placement with the smallest predicted makespan: :func:`plan` finds it exactly
by grouping identical subgroups into classes (the model depends only on how many of
each class go where) and enumerating the counts; :func:`refit` folds measured times
back into the rates.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace

import numpy as np

PLACES = ("cpu", "gpu", "resident")


@dataclass(frozen=True)
class Calibration:
    """Rates the model plans with. Bandwidths in bytes/s, rates in elements/s, memory in
    bytes. ``free_device``: device memory the update may use for scratch;
    ``resident_budget``: device memory that may hold state between steps."""

    cpu_rate: float
    h2d_bw: float = 0.0
    d2h_bw: float = 0.0
    gpu_rate: float = 0.0
    free_device: int = 0
    resident_budget: int = 0
    latency: float = 10e-6

    @property
    def has_device(self) -> bool:
        return self.h2d_bw > 0 and self.d2h_bw > 0 and self.gpu_rate > 0


@dataclass(frozen=True)
class SubgroupCost:
    """What updating one subgroup moves and needs."""

    n: int  # elements
    up_bytes: int = 0  # H2D before a device update (state)
    down_bytes: int = 0  # D2H after a device update (state)
    param_up_bytes: int = 0  # H2D after a host update (new weights)
    device_bytes: int = 0  # device memory while on the device


@dataclass(frozen=True)
class Prediction:
    cpu: float
    h2d: float
    gpu: float
    d2h: float

    @property
    def makespan(self) -> float:
        return max(self.cpu, self.h2d, self.gpu, self.d2h)


INFEASIBLE = Prediction(math.inf, math.inf, math.inf, math.inf)


@dataclass
class Plan:
    """One step's placement (``placements[i]`` for subgroup i) and its prediction."""

    placements: list[str]
    predicted: Prediction
    calibration: Calibration
    per_subgroup: list[float] = field(default_factory=list)  # predicted busy time of each subgroup

    def count(self, place: str) -> int:
        return sum(p == place for p in self.placements)

    def describe(self) -> str:
        c = self.calibration
        p = self.predicted
        lines = [f"plan: {self.count('cpu')} cpu, {self.count('gpu')} gpu, {self.count('resident')} resident "
                 f"of {len(self.placements)} subgroups; predicted update {p.makespan * 1e3:.2f} ms "
                 f"(cpu {p.cpu * 1e3:.2f}, h2d {p.h2d * 1e3:.2f}, gpu {p.gpu * 1e3:.2f}, d2h {p.d2h * 1e3:.2f} ms)",
                 f"  calibration: cpu {c.cpu_rate / 1e6:.0f} Mparam/s"
                 + (f", gpu {c.gpu_rate / 1e6:.0f} Mparam/s, h2d {c.h2d_bw / 1e9:.1f} GB/s, d2h {c.d2h_bw / 1e9:.1f} GB/s, "
                    f"device scratch {c.free_device / 2**30:.2f} GiB, resident budget {c.resident_budget / 2**30:.2f} GiB"
                    if c.has_device else " (no device)")]
        return "\n".join(lines)


def predict(costs: list[SubgroupCost], placements: list[str], cal: Calibration) -> Prediction:
    """The model's update-phase times for one placement."""
    classes = [(c, 1) for c in costs]
    counts = [(int(p == "cpu"), int(p == "gpu"), int(p == "resident")) for p in placements]
    cpu, h2d, gpu, d2h, bad = _model(classes, counts, cal)
    return INFEASIBLE if bad else Prediction(float(cpu), float(h2d), float(gpu), float(d2h))


def _model(classes: list[tuple[SubgroupCost, int]], counts: list[tuple], cal: Calibration):
    """The model, vectorised: ``counts[k] = (cpu, gpu, resident)`` numbers (or arrays of
    numbers) of class k's subgroups placed there. Returns (cpu, h2d, gpu, d2h, infeasible)."""
    shape = np.broadcast_shapes(*[np.shape(x) for c in counts for x in c])
    cpu, h2d, gpu, down, serial, res, slot = (np.zeros(shape) for _ in range(7))
    last_up, lead = np.full(shape, np.inf), np.full(shape, np.inf)
    bad = np.zeros(shape, bool)
    for (c, _), (nc, ng, nr) in zip(classes, counts):
        nc, ng, nr = np.asarray(nc), np.asarray(ng), np.asarray(nr)
        if cal.cpu_rate > 0:
            cpu = cpu + nc * (c.n / cal.cpu_rate)
        else:
            bad |= nc > 0
        if c.param_up_bytes and cal.h2d_bw > 0:  # (no device: the weights are updated in place)
            pu = c.param_up_bytes / cal.h2d_bw + cal.latency
            h2d = h2d + np.where(nc > 0, nc * pu, 0.0)
            last_up = np.where(nc > 0, np.minimum(last_up, pu), last_up)
        if not cal.has_device:
            bad |= (ng + nr) > 0
            continue
        comp = c.n / cal.gpu_rate
        up = c.up_bytes / cal.h2d_bw + cal.latency
        dn = c.down_bytes / cal.d2h_bw + cal.latency
        gpu = gpu + (ng + nr) * comp
        h2d = h2d + ng * up
        down = down + (ng + nr) * dn
        serial = serial + ng * (up + comp + dn)
        res = res + nr * c.device_bytes
        lead = np.where(ng > 0, np.minimum(lead, up + comp), lead)
        lead = np.where(nr > 0, np.minimum(lead, comp), lead)
        slot = np.where(ng > 0, np.maximum(slot, c.device_bytes), slot)
    bad |= res > cal.resident_budget
    slots = np.where(slot > 0, cal.free_device // np.maximum(slot, 1), np.inf)
    bad |= slots < 1
    # One scratch slot: upload, update and download of consecutive subgroups cannot overlap.
    h2d = np.where(slots == 1, np.maximum(h2d, serial), h2d)
    d2h = np.where(np.isfinite(lead), lead + down, 0.0)
    cpu = np.where(np.isfinite(last_up), cpu + last_up, cpu)
    return cpu, h2d, gpu, d2h, bad


def _classes(costs: list[SubgroupCost]) -> tuple[list[tuple[SubgroupCost, int]], list[list[int]]]:
    members: dict[SubgroupCost, list[int]] = {}
    for i, c in enumerate(costs):
        members.setdefault(c, []).append(i)
    keys = sorted(members, key=lambda c: -len(members[c]))
    return [(c, len(members[c])) for c in keys], [members[c] for c in keys]


def _options(k: int) -> list[tuple[int, int, int]]:
    return [(k - g - r, g, r) for r in range(k + 1) for g in range(k - r + 1)]


def plan(costs: list[SubgroupCost], cal: Calibration, max_combinations: int = 200_000,
         previous: list[str] | None = None) -> Plan:
    """The placement with the smallest predicted makespan (ties: the fewest bytes over
    the link). Exact for the model whenever the number of
    count combinations is at most ``max_combinations`` (always, for equal subgroups: a
    single class of k subgroups has (k+1)(k+2)/2); beyond that, classes other than the
    largest are kept on the CPU. ``previous`` keeps residency stable: subgroups already
    resident are chosen first to stay resident."""
    if not costs:
        return Plan([], Prediction(0, 0, 0, 0), cal)
    if not cal.has_device:
        placements = ["cpu"] * len(costs)
        return _finish(costs, placements, cal)
    classes, members = _classes(costs)
    head_k = classes[0][1]
    rest_opts = [_options(k) for _, k in classes[1:]]
    n_rest = math.prod(len(o) for o in rest_opts)
    if n_rest * len(_options(head_k)) > max_combinations:
        rest_opts = [[(k, 0, 0)] for _, k in classes[1:]]
    best: tuple | None = None
    g_grid, r_grid = np.meshgrid(np.arange(head_k + 1), np.arange(head_k + 1), indexing="ij")
    g_grid, r_grid = g_grid.ravel(), r_grid.ravel()
    keep = g_grid + r_grid <= head_k
    g_grid, r_grid = g_grid[keep], r_grid[keep]
    for rest in itertools.product(*rest_opts):
        counts = [(head_k - g_grid - r_grid, g_grid, r_grid), *rest]
        cpu, h2d, gpu, d2h, bad = _model(classes, counts, cal)
        span = np.where(bad, np.inf, np.maximum.reduce([cpu, h2d, gpu, d2h]))
        moved = _bytes_moved(classes, counts)
        # Ties: lowest makespan, then fewest bytes over the link (cpu < resident < gpu).
        i = np.lexsort((moved, span))[0]
        key = (float(span[i]), float(moved[i]))
        if best is None or key < best[0]:
            best = (key, (head_k - int(g_grid[i]) - int(r_grid[i]), int(g_grid[i]), int(r_grid[i])), rest)
    assert best is not None
    counts = [best[1], *best[2]]
    placements = ["cpu"] * len(costs)
    prev = previous or []
    for idx, (_, ng, nr) in zip(members, counts):
        # Resident first among those already resident, then in index order; then gpu.
        order = sorted(idx, key=lambda i: (0 if i < len(prev) and prev[i] == "resident" else 1, i))
        for i in order[:nr]:
            placements[i] = "resident"
        for i in [i for i in idx if placements[i] == "cpu"][:ng]:
            placements[i] = "gpu"
    return _finish(costs, placements, cal)


def fixed(costs: list[SubgroupCost], placements: list[str], cal: Calibration) -> Plan:
    """A plan with the given placements (and the model's prediction for them)."""
    return _finish(costs, list(placements), cal)


def _bytes_moved(classes: list[tuple[SubgroupCost, int]], counts: list[tuple]) -> np.ndarray:
    total = 0.0
    for (c, _), (nc, ng, nr) in zip(classes, counts):
        total = total + np.asarray(nc) * c.param_up_bytes + np.asarray(nr) * c.down_bytes \
            + np.asarray(ng) * (c.up_bytes + c.down_bytes)
    return np.asarray(total, dtype=float)


def _finish(costs: list[SubgroupCost], placements: list[str], cal: Calibration) -> Plan:
    pred = predict(costs, placements, cal)
    per = []
    for c, p in zip(costs, placements):
        if p == "cpu":
            per.append(c.n / cal.cpu_rate if cal.cpu_rate > 0 else math.inf)
        elif not cal.has_device:
            per.append(math.inf)
        else:
            up = c.up_bytes / cal.h2d_bw if p == "gpu" else 0.0
            per.append(up + c.n / cal.gpu_rate + c.down_bytes / cal.d2h_bw)
    return Plan(placements, pred, cal, per)


def refit(cal: Calibration, measured: dict[str, tuple[float, float]], weight: float = 0.5) -> Calibration:
    """Fold measurements into the rates: ``measured[k] = (amount, seconds)`` for k in
    ``cpu`` (elements), ``gpu`` (elements), ``h2d`` / ``d2h`` (bytes). An exponential
    moving average with ``weight`` on the new measurement; a missing or zero-time entry
    leaves the rate as it was."""
    fields = {"cpu": "cpu_rate", "gpu": "gpu_rate", "h2d": "h2d_bw", "d2h": "d2h_bw"}
    new = {}
    for key, attr in fields.items():
        amount, seconds = measured.get(key, (0.0, 0.0))
        if amount > 0 and seconds > 0:
            old = getattr(cal, attr)
            rate = amount / seconds
            new[attr] = rate if old <= 0 else (1 - weight) * old + weight * rate
    return replace(cal, **new)
