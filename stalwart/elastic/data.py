"""Elastic data pipeline: the same training at any data-parallel degree.

When a job continues on fewer (or more) data-parallel ranks, three things must stay
as they were for the run to remain the same training:

* **The global batch.** ``global_batch = micro_batch * accumulation * dp_size``; the
  accumulation is recomputed for the new DP degree (:class:`GlobalBatch`), and the
  per-micro-batch loss is scaled so the summed gradient has the same scale
  (:attr:`GlobalBatch.loss_scale`).
* **The data order.** The data position is a global sample index. An epoch's order is
  a permutation that depends only on ``(seed, epoch)``; global step ``t`` consumes
  permutation positions ``[t·G, (t+1)·G)``, split into micro-batches of ``m``
  consecutive positions that are dealt round-robin to the ranks
  (:class:`ElasticSampler`). Every micro-batch's sample set, and so every step's, is
  the same at any DP degree; only which rank runs it changes.
* **Sample-tied randomness.** Augmentation and noise draw from per-sample streams keyed
  by ``(seed, epoch, sample index)`` (:func:`sample_seed`, :func:`sample_generator`),
  and dropout inside the model draws from a micro-batch stream keyed by its first
  sample (:func:`micro_batch_rng`), which forks torch's RNG and restores it afterwards.

:class:`ElasticLoader` puts these together around a map-style dataset and a torch
``DataLoader`` (workers, prefetch, pinning all work). Its :meth:`~ElasticLoader.state_dict`
is small rank-independent JSON; :meth:`~ElasticLoader.load_state_dict` resumes at the next
global step at any DP degree, and :meth:`~ElasticLoader.set_world` re-plans between steps.

Everything here is pure torch (no ``torch.distributed`` calls); the caller says which
rank of how many it is. A typical loop (DDP)::

    loader = ElasticLoader(dataset, global_batch=256, micro_batch=8,
                           dp_rank=dist.get_rank(), dp_size=dist.get_world_size(), epochs=3)
    for mb in loader:
        ctx = contextlib.nullcontext() if mb.last else ddp_model.no_sync()
        with ctx, mb.rng():
            loss = loss_fn(ddp_model(mb.data[0]), mb.data[1])   # mean over the micro-batch
            (loss * mb.loss_scale).backward()
        if mb.last:
            optimizer.step(); optimizer.zero_grad()
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from stalwart.errors import StalwartError

if TYPE_CHECKING:  # pragma: no cover
    from stalwart.ckpt.providers.base import StateProvider

__all__ = [
    "ElasticBatchError",
    "ElasticLoader",
    "ElasticSampler",
    "GlobalBatch",
    "MicroBatch",
    "micro_batch_rng",
    "sample_generator",
    "sample_seed",
]

STATE_FORMAT = "stalwart.elastic.data"
STATE_VERSION = 1

_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
# Domain tags keep the streams derived from one seed apart.
_TAG_SAMPLE = 0x5A3D_0001
_TAG_MICRO = 0x5A3D_0002
_TAG_PERM = 0x5A3D_0003
_TAG_WORKER = 0x5A3D_0004
_FEISTEL_ROUNDS = 6
_STEP_CACHE = 4


class ElasticBatchError(StalwartError):
    """A batch configuration, DP degree or saved data position that cannot be used as asked."""


# --------------------------------------------------------------------------- hashing
def _mix64(z: int) -> int:
    """SplitMix64's finaliser: a bijection on 64-bit integers with full avalanche."""
    z &= _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


_U30, _U27, _U31 = np.uint64(30), np.uint64(27), np.uint64(31)
_C1, _C2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix64_np(z: np.ndarray) -> np.ndarray:
    """:func:`_mix64` on a uint64 array (wrapping multiplication)."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> _U30)) * _C1
        z = (z ^ (z >> _U27)) * _C2
    return z ^ (z >> _U31)


def _hash(*parts: int) -> int:
    """A 64-bit hash of a tuple of integers (negative ones taken modulo 2**64)."""
    h = 0x6A09E667F3BCC909
    for p in parts:
        h = _mix64(((h + _GOLDEN) & _M64) ^ (int(p) & _M64))
    return h


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of sample ``index``'s random stream in ``epoch``: a 63-bit integer.

    A hash (SplitMix64 chained over the triple) of ``(seed, epoch, index)`` only, so a
    sample's augmentation or noise is the same whichever rank, worker or micro-batch
    processes it, and differs between epochs. Non-negative and below ``2**63``, so it
    fits any signed 64-bit seed argument.
    """
    return _hash(_TAG_SAMPLE, seed, epoch, index) >> 1


def sample_generator(seed: int, epoch: int, index: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A fresh ``torch.Generator`` on ``device`` seeded with :func:`sample_seed`.

    Use it in a dataset's ``__getitem__`` (or a collate function) for per-sample
    augmentation: ``torch.rand(3, generator=sample_generator(seed, epoch, i))``. The
    dataset needs the epoch: :class:`ElasticLoader` calls ``dataset.set_epoch(epoch)``
    when the dataset has one, in whichever process loads the samples (worker
    processes, persistent ones included), before the first sample of each epoch.
    """
    g = torch.Generator(device=device)
    g.manual_seed(sample_seed(seed, epoch, index))
    return g


def _micro_batch_seed(seed: int, epoch: int, first_index: int) -> int:
    return _hash(_TAG_MICRO, seed, epoch, first_index) >> 1


def _cuda_indices(devices: Iterable[int | str | torch.device] | None) -> list[int]:
    if devices is None:
        return [torch.cuda.current_device()] if torch.cuda.is_available() else []
    out = []
    for d in devices:
        if isinstance(d, int):
            out.append(d)
            continue
        dev = torch.device(d)
        if dev.type == "cpu":
            continue  # the CPU generator is always forked
        if dev.type != "cuda":
            raise ElasticBatchError(f"micro_batch_rng: device {dev} is not a CUDA device; only CPU and CUDA RNG are forked")
        out.append(dev.index if dev.index is not None else torch.cuda.current_device())
    return sorted(set(out))


@contextlib.contextmanager
def micro_batch_rng(
    seed: int,
    epoch: int,
    first_index: int,
    devices: Iterable[int | str | torch.device] | None = None,
) -> Iterator[int]:
    """Run the block on torch's RNG seeded for one micro-batch, then restore it.

    Forks torch's CPU generator and the default generator of each CUDA device in
    ``devices`` (default: the current CUDA device when CUDA is available, else none),
    seeds them from ``(seed, epoch, first_index)`` — ``first_index`` is the dataset
    index of the micro-batch's first sample — and on exit puts back the states they had
    on entry. Dropout and other in-model randomness thus depend on which samples are
    processed, not on which rank processes them, and the outer stream (what the loop
    draws between micro-batches) is exactly as if the block had drawn nothing.

    The micro-batch stream is separate from the samples' own streams
    (:func:`sample_seed`). Yields the seed used.
    """
    key = _micro_batch_seed(seed, epoch, first_index)
    cuda = _cuda_indices(devices)
    with torch.random.fork_rng(devices=cuda, device_type="cuda"):
        torch.random.default_generator.manual_seed(key)
        for d in cuda:
            with torch.cuda.device(d):
                torch.cuda.manual_seed(key)
        yield key


# --------------------------------------------------------------------------- global batch
def _check_positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ElasticBatchError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def _short_list(values: Sequence[int], limit: int = 12) -> str:
    if len(values) <= limit:
        return ", ".join(map(str, values))
    return ", ".join(map(str, values[:limit])) + f", … ({len(values)} in all)"


@dataclass(frozen=True)
class GlobalBatch:
    """The split of a fixed global batch over ``dp_size`` data-parallel ranks.

    ``global_batch = micro_batch * accumulation * dp_size``: each rank runs
    :attr:`accumulation` micro-batches of ``micro_batch`` samples per optimizer step.
    Raises :class:`ElasticBatchError` when the split is not whole, naming the DP
    degrees that would keep the global batch.
    """

    global_batch: int
    micro_batch: int
    dp_size: int

    def __post_init__(self) -> None:
        g = _check_positive("global_batch", self.global_batch)
        m = _check_positive("micro_batch", self.micro_batch)
        d = _check_positive("dp_size", self.dp_size)
        if g % m:
            works = _short_list([x for x in _divisors(g)])
            raise ElasticBatchError(
                f"global batch {g} is not a multiple of the micro-batch {m}; micro-batch sizes that divide it: {works}"
            )
        if (g // m) % d:
            raise ElasticBatchError(
                f"global batch {g} with micro-batch {m} cannot be kept at {d} data-parallel ranks "
                f"({g} / ({m} * {d}) is not a whole number of accumulation steps); "
                f"DP degrees that keep it: {_short_list(self.valid_dp_sizes())}"
            )

    @property
    def accumulation(self) -> int:
        """Micro-batches each rank runs per optimizer step: ``global / (micro * dp)``."""
        return self.global_batch // (self.micro_batch * self.dp_size)

    @property
    def micro_batches_per_step(self) -> int:
        """Micro-batches in one global step over all ranks: ``global / micro``."""
        return self.global_batch // self.micro_batch

    @property
    def loss_scale(self) -> float:
        """The factor each micro-batch loss is multiplied by before ``backward``: ``1 / accumulation``.

        For a loss that is the *mean* over the micro-batch's samples, under a wrapper
        that *averages* gradients over the DP ranks (DDP, FSDP/FSDP2): the rank's
        gradient is ``Σ_j scale · ∇mean_j``, the wrapper divides the sum over ranks by
        ``dp_size``, and the result is ``∇`` of the mean over all ``global_batch``
        samples — the same at every DP degree. Other reductions: a loss *summed* over
        the micro-batch's samples needs ``dp_size / global_batch`` instead; a DeepSpeed
        engine divides by its ``gradient_accumulation_steps`` inside
        ``engine.backward`` already, so give it ``accumulation`` there and do not scale.
        """
        return 1.0 / self.accumulation

    def valid_dp_sizes(self) -> list[int]:
        """Every DP degree at which this global batch and micro-batch can be kept."""
        return _divisors(self.global_batch // self.micro_batch)


# --------------------------------------------------------------------------- sampler
class ElasticSampler:
    """The order of samples and its split into micro-batches, independent of the DP degree.

    * An epoch's order is a pseudo-random permutation of ``range(num_samples)`` that
      depends only on ``(seed, epoch)`` (the identity when ``shuffle=False``). It is
      computed per position (a keyed Feistel network with cycle walking), so memory does
      not grow with the dataset and any step can be planned directly.
    * Global step ``t`` consumes positions ``[t·G, (t+1)·G)`` in order.
    * The step is cut into micro-batches ``k = 0, 1, …`` of ``m`` consecutive positions;
      micro-batch ``k`` runs on DP rank ``k mod D`` as that rank's ``j = k div D``-th
      micro-batch. So rank ``r``'s ``j``-th micro-batch starts at position
      ``t·G + (j·D + r)·m``, and each micro-batch's samples are the same at every ``D``.

    ``drop_last=True`` drops the ``num_samples mod G`` samples at the end of the order.
    ``drop_last=False`` makes them one last, partial step of ``R`` samples, cut the same
    way into ``⌈R/m⌉`` micro-batches (the last may hold fewer than ``m``) dealt round-robin,
    so ranks may run one micro-batch more than others in that step. Each of its
    micro-batches gets the loss scale ``n·D/R`` (``n`` = its samples), which makes the
    summed, rank-averaged gradient the mean over the ``R`` samples. A DP degree larger
    than ``⌈R/m⌉`` would leave a rank without data in that step (a collective it could not
    join), so it is refused by :meth:`plan` with an :class:`ElasticBatchError`.
    """

    def __init__(
        self,
        num_samples: int,
        global_batch: int,
        micro_batch: int,
        *,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = True,
    ) -> None:
        self.num_samples = _check_positive("num_samples (the dataset's length)", num_samples)
        GlobalBatch(global_batch, micro_batch, 1)  # validates the pair
        self.global_batch = int(global_batch)
        self.micro_batch = int(micro_batch)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ElasticBatchError(f"seed must be an integer, got {seed!r}")
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        full, self.tail = divmod(self.num_samples, self.global_batch)
        if self.drop_last:
            self.tail = 0
            if full == 0:
                raise ElasticBatchError(
                    f"the dataset has {self.num_samples} samples, fewer than one global batch of "
                    f"{self.global_batch} (drop_last=True would leave no step)"
                )
        self.steps_per_epoch = full + (1 if self.tail else 0)
        self._full_steps = full
        # Feistel domain: an even number of bits covering num_samples.
        bits = max(2, (self.num_samples - 1).bit_length())
        bits += bits & 1
        self._half = np.uint64(bits // 2)
        self._mask = np.uint64((1 << (bits // 2)) - 1)
        self._keys: dict[int, list[np.uint64]] = {}
        # The last few steps' orders (G indices each): the loader's batch sampler and its
        # plan both walk the current step, micro-batch by micro-batch.
        self._steps: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    # -- the permutation ------------------------------------------------------
    def _round_keys(self, epoch: int) -> list[np.uint64]:
        keys = self._keys.get(epoch)
        if keys is None:
            if len(self._keys) > 4:
                self._keys.clear()
            keys = [np.uint64(_hash(_TAG_PERM, self.seed, epoch, i)) for i in range(_FEISTEL_ROUNDS)]
            self._keys[epoch] = keys
        return keys

    def _feistel(self, x: np.ndarray, keys: list[np.uint64]) -> np.ndarray:
        left, right = x >> self._half, x & self._mask
        for k in keys:
            left, right = right, left ^ (_mix64_np(right ^ k) & self._mask)
        return (left << self._half) | right

    def indices(self, epoch: int, positions: Sequence[int] | np.ndarray) -> np.ndarray:
        """Dataset indices at the given positions of ``epoch``'s order (an int64 array)."""
        pos = np.asarray(positions, dtype=np.int64)
        if pos.size and (pos.min() < 0 or pos.max() >= self.num_samples):
            raise ElasticBatchError(f"positions must lie in [0, {self.num_samples}), got {pos.min()}…{pos.max()}")
        if not self.shuffle:
            return pos.copy()
        keys = self._round_keys(int(epoch))
        n = np.uint64(self.num_samples)
        out = self._feistel(pos.astype(np.uint64), keys)
        outside = out >= n
        while outside.any():  # cycle walking: a permutation of the domain restricted to [0, n)
            out[outside] = self._feistel(out[outside], keys)
            outside = out >= n
        return out.astype(np.int64)

    def order(self, epoch: int) -> np.ndarray:
        """The whole order of ``epoch``: ``order[p]`` is the dataset index at position ``p``.

        Allocates ``8 * num_samples`` bytes; planning steps never needs it.
        """
        return self.indices(epoch, np.arange(self.num_samples, dtype=np.int64))

    # -- steps and micro-batches ----------------------------------------------
    def _check_step(self, step: int) -> None:
        if not 0 <= step < self.steps_per_epoch:
            raise ElasticBatchError(f"step {step} is outside the epoch's {self.steps_per_epoch} steps")

    def step_samples(self, step: int) -> int:
        """Samples consumed by global step ``step``: ``global_batch``, or ``R`` for the partial last step."""
        self._check_step(step)
        return self.global_batch if step < self._full_steps else self.tail

    def micro_batch_count(self, step: int) -> int:
        """Micro-batches in global step ``step`` over all ranks."""
        return -(-self.step_samples(step) // self.micro_batch)

    def _step_order(self, epoch: int, step: int) -> np.ndarray:
        key = (int(epoch), int(step))
        cached = self._steps.get(key)
        if cached is None:
            start = step * self.global_batch
            cached = self.indices(epoch, np.arange(start, start + self.step_samples(step)))
            self._steps[key] = cached
            if len(self._steps) > _STEP_CACHE:
                self._steps.popitem(last=False)
        return cached

    def step_indices(self, epoch: int, step: int) -> list[int]:
        """The dataset indices global step ``step`` of ``epoch`` consumes, in position order."""
        return self._step_order(epoch, step).tolist()

    def plan(self, dp_size: int) -> GlobalBatch:
        """Validate ``dp_size`` for this sampler and return its :class:`GlobalBatch`."""
        batch = GlobalBatch(self.global_batch, self.micro_batch, dp_size)
        if self.tail and -(-self.tail // self.micro_batch) < dp_size:
            k = -(-self.tail // self.micro_batch)
            raise ElasticBatchError(
                f"drop_last=False: the last step's {self.tail} samples make {k} micro-batch(es) of at most "
                f"{self.micro_batch}, fewer than the {dp_size} data-parallel ranks (a rank would have no data in "
                f"that step); use drop_last=True, a smaller micro-batch or at most {k} ranks"
            )
        return batch

    def rank_micro_batches(self, step: int, rank: int, dp_size: int) -> list[int]:
        """The micro-batch numbers ``k`` (within the step) rank ``rank`` of ``dp_size`` runs, in order."""
        self.plan(dp_size)
        if not 0 <= rank < dp_size:
            raise ElasticBatchError(f"dp_rank {rank} is outside [0, {dp_size})")
        return list(range(rank, self.micro_batch_count(step), dp_size))

    def micro_batch_indices(self, epoch: int, step: int, k: int) -> list[int]:
        """Dataset indices of micro-batch ``k`` of global step ``step`` of ``epoch``."""
        start = k * self.micro_batch
        if k < 0 or start >= self.step_samples(step):
            raise ElasticBatchError(f"step {step} has no micro-batch {k}")
        return self._step_order(epoch, step)[start : start + self.micro_batch].tolist()

    def micro_batches(self, epoch: int, step: int, rank: int, dp_size: int) -> list[list[int]]:
        """Rank ``rank``'s micro-batches of global step ``step``: a list of lists of dataset indices.

        ``accumulation`` lists of ``micro_batch`` indices for a full step (fewer, and a
        shorter last one, in the partial last step of ``drop_last=False``).
        """
        return [self.micro_batch_indices(epoch, step, k) for k in self.rank_micro_batches(step, rank, dp_size)]

    def loss_scale(self, step: int, k: int, dp_size: int) -> float:
        """The loss scale of micro-batch ``k`` of ``step`` at ``dp_size`` ranks (see :attr:`GlobalBatch.loss_scale`).

        ``n·D/S`` for a micro-batch of ``n`` samples in a step of ``S``: ``1/accumulation``
        in a full step.
        """
        total = self.step_samples(step)
        n = min(self.micro_batch, total - k * self.micro_batch)
        return n * dp_size / total


# --------------------------------------------------------------------------- loader
@dataclass
class MicroBatch:
    """One micro-batch handed to a rank by :class:`ElasticLoader`.

    ``data`` is the collated batch; ``indices`` the dataset indices it holds; ``epoch`` and
    ``step`` (global step within the epoch) say where it belongs; it is this rank's
    ``j``-th of ``accumulation`` micro-batches in the step; ``last`` is True for the final
    one, after whose backward the loop steps the optimizer; ``loss_scale`` multiplies its
    (mean) loss. :meth:`rng` is the :func:`micro_batch_rng` context for it.

    In the partial last step of ``drop_last=False`` ranks may run different numbers of
    micro-batches (``accumulation`` differs by at most one); with DDP's ``no_sync()``
    around all but the ``last`` one every rank still joins exactly one gradient reduction.
    """

    data: Any
    indices: list[int]
    epoch: int
    step: int
    j: int
    accumulation: int
    last: bool
    loss_scale: float
    seed: int = field(repr=False)
    rng_devices: tuple | None = field(default=None, repr=False)

    def rng(self) -> contextlib.AbstractContextManager[int]:
        """Fork torch's RNG seeded for this micro-batch (by its first sample); restored on exit."""
        return micro_batch_rng(self.seed, self.epoch, self.indices[0], devices=self.rng_devices)

    def sample_seeds(self) -> list[int]:
        """:func:`sample_seed` of each of its samples, in order."""
        return [sample_seed(self.seed, self.epoch, i) for i in self.indices]


@dataclass(frozen=True)
class _Planned:
    epoch: int
    step: int
    j: int
    accumulation: int
    indices: list[int]
    loss_scale: float


class _EpochBatch(list):
    """A micro-batch's indices carrying its epoch to the process that loads it (pickles with it)."""

    def __init__(self, indices: list[int], epoch: int) -> None:
        super().__init__(indices)
        self.epoch = epoch


class _EpochDataset(torch.utils.data.Dataset):
    """Wraps a dataset that has ``set_epoch`` so each loading process sees the batch's epoch.

    Persistent DataLoader workers keep the dataset copy they started with; the epoch
    therefore travels with each batch of indices, and the copy is told when it changes.
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        self._epoch: int | None = None

    def set_epoch(self, epoch: int) -> None:
        if epoch != self._epoch:
            self.dataset.set_epoch(epoch)
            self._epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]

    def __getitems__(self, batch: list[int]) -> list:
        epoch = getattr(batch, "epoch", None)
        if epoch is not None:
            self.set_epoch(epoch)
        many = getattr(self.dataset, "__getitems__", None)
        return many(list(batch)) if callable(many) else [self.dataset[i] for i in batch]


def _plan(s: ElasticSampler, epoch: int, step: int, rank: int, dp: int) -> Iterator[_Planned]:
    """Rank ``rank``'s micro-batches at ``dp`` ranks from ``step`` of ``epoch`` to the epoch's end."""
    for t in range(step, s.steps_per_epoch):
        ks = s.rank_micro_batches(t, rank, dp)
        for j, k in enumerate(ks):
            yield _Planned(epoch, t, j, len(ks), s.micro_batch_indices(epoch, t, k), s.loss_scale(t, k, dp))


class _RankBatchSampler:
    """The DataLoader's batch sampler: this rank's micro-batches from the planned start on.

    The DataLoader iterates it in the main process (also with worker processes), so the
    loader sets :attr:`start` right before each ``iter(dataloader)``. It must not refer
    back to the ElasticLoader: a reference cycle through a DataLoader with persistent
    workers leaves their shutdown to the garbage collector, which waits 5 s per worker.
    """

    def __init__(self, sampler: ElasticSampler) -> None:
        self._sampler = sampler
        self.start: tuple[int, int, int, int] | None = None

    def __iter__(self) -> Iterator[list[int]]:
        if self.start is None:
            raise ElasticBatchError("iterate the ElasticLoader, not its DataLoader")
        for p in _plan(self._sampler, *self.start):
            yield _EpochBatch(p.indices, p.epoch)

    def __len__(self) -> int:
        if self.start is None:
            return 0
        _, step, rank, dp = self.start
        s = self._sampler
        return sum(len(range(rank, s.micro_batch_count(t), dp)) for t in range(step, s.steps_per_epoch))


_RESERVED_KWARGS = {
    "batch_size": "the micro-batch is micro_batch",
    "shuffle": "pass shuffle= to ElasticLoader",
    "sampler": "the ElasticLoader plans the order",
    "batch_sampler": "the ElasticLoader plans the micro-batches",
    "generator": "worker seeds come from the loader's seed so the outer RNG is never drawn",
}

_STATE_KEYS = ("epoch", "steps", "seed", "global_batch", "micro_batch", "num_samples", "shuffle", "drop_last")


class ElasticLoader:
    """A map-style dataset served as this rank's micro-batches of a fixed global batch.

    Iterating yields :class:`MicroBatch` objects: for each global step from the current
    position, this rank's micro-batches in order (see :class:`ElasticSampler` for which
    samples those are). Data comes through a torch ``DataLoader`` built once over
    ``dataset`` with this rank's batch sampler; ``collate_fn``, ``num_workers`` and any
    other ``DataLoader`` keyword (``pin_memory``, ``prefetch_factor``,
    ``persistent_workers``, ``worker_init_fn``, ``multiprocessing_context``, ``timeout``)
    pass through. The DataLoader draws its worker seeds from a private generator seeded
    from ``(seed, epoch, step, rank)``, so iterating never draws from torch's global RNG.

    ``epochs``: iteration stops when this many epochs are done (counting from epoch 0,
    so a resumed loop runs only what is left); None iterates to the end of the current
    epoch (iterate again for the next). If the dataset has ``set_epoch(epoch)`` it is
    called with each epoch before the epoch's first sample is loaded, in the main process
    and in every worker (the DataLoader then holds the dataset in a thin wrapper, which is
    what ``torch.utils.data.get_worker_info().dataset`` returns; its ``.dataset`` is yours).

    The position counts *complete* global steps: it advances when the step's last
    micro-batch (``mb.last``) is handed out, so a :meth:`state_dict` taken after the
    optimizer step resumes at the next step. Breaking out mid-step and iterating again
    replays that step from its first micro-batch.

    ``seed`` keys the order, the per-sample streams and the micro-batch streams;
    ``drop_last`` is :class:`ElasticSampler`'s; ``rng_devices`` are the CUDA devices
    :meth:`MicroBatch.rng` forks (default: the current one when CUDA is available).
    The torch ``DataLoader`` is :attr:`dataloader` (iterate the ElasticLoader, not it).
    """

    def __init__(
        self,
        dataset: Any,
        global_batch: int,
        micro_batch: int,
        *,
        dp_rank: int,
        dp_size: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        epochs: int | None = None,
        collate_fn: Callable[[list], Any] | None = None,
        num_workers: int = 0,
        rng_devices: Iterable[int | str | torch.device] | None = None,
        **loader_kwargs: Any,
    ) -> None:
        for key, why in _RESERVED_KWARGS.items():
            if key in loader_kwargs:
                raise ElasticBatchError(f"ElasticLoader does not take {key}= ({why})")
        if loader_kwargs.get("in_order") is False:
            raise ElasticBatchError("ElasticLoader needs in_order=True (micro-batches are matched to their plan in order)")
        if isinstance(dataset, torch.utils.data.IterableDataset) or not (
            hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")
        ):
            raise ElasticBatchError(
                f"ElasticLoader needs a map-style dataset (__len__ and __getitem__), got {type(dataset).__name__}"
            )
        if epochs is not None:
            epochs = _check_positive("epochs", epochs)
        self.dataset = dataset
        self._epoch_dataset = _EpochDataset(dataset) if callable(getattr(dataset, "set_epoch", None)) else None
        self.sampler = ElasticSampler(
            len(dataset), global_batch, micro_batch, seed=seed, shuffle=shuffle, drop_last=drop_last
        )
        self.epochs = epochs
        self.rng_devices = tuple(rng_devices) if rng_devices is not None else None
        self._epoch = 0
        self._step = 0
        self._in_step = False
        self._generation = 0
        self._set_world(dp_rank, dp_size)
        self._worker_gen = torch.Generator()
        self._batch_sampler = _RankBatchSampler(self.sampler)
        self.dataloader = torch.utils.data.DataLoader(
            self._epoch_dataset if self._epoch_dataset is not None else dataset,
            batch_sampler=self._batch_sampler,
            num_workers=num_workers,
            collate_fn=collate_fn,
            generator=self._worker_gen,
            **loader_kwargs,
        )

    # -- configuration ----------------------------------------------------------
    def _set_world(self, dp_rank: int, dp_size: int) -> None:
        batch = self.sampler.plan(dp_size)
        if isinstance(dp_rank, bool) or not isinstance(dp_rank, (int, np.integer)) or not 0 <= dp_rank < dp_size:
            raise ElasticBatchError(f"dp_rank must be an integer in [0, {dp_size}), got {dp_rank!r}")
        self._rank, self._dp, self._batch = int(dp_rank), int(dp_size), batch

    def stalwart_provider(self, placement) -> StateProvider:
        """For ``guard.resume(loader)``: the provider that saves and restores this loader's
        position with every snapshot (:mod:`stalwart.elastic.provider`). Checks first that
        every node count the launcher may re-form the job at keeps the global batch."""
        from stalwart.elastic.provider import ElasticDataProvider, check_node_range

        check_node_range(self, placement.num_nodes)
        return ElasticDataProvider(self)

    def set_world(self, dp_rank: int, dp_size: int) -> None:
        """Continue as DP rank ``dp_rank`` of ``dp_size``, re-planning the accumulation.

        Only between global steps (after a ``last`` micro-batch, or before iterating); a
        running iteration drops what it prefetched and continues at the next step with the
        new split. Raises :class:`ElasticBatchError` if the global batch cannot be kept at
        ``dp_size`` or a step is half done.
        """
        if self._in_step:
            raise ElasticBatchError(
                f"set_world({dp_rank}, {dp_size}) in the middle of global step {self._step} of epoch {self._epoch}: "
                "change the world only between steps (after the micro-batch with last=True)"
            )
        self._set_world(dp_rank, dp_size)
        self._generation += 1

    @property
    def dp_rank(self) -> int:
        return self._rank

    @property
    def dp_size(self) -> int:
        return self._dp

    @property
    def batch(self) -> GlobalBatch:
        """The current split of the global batch."""
        return self._batch

    @property
    def accumulation(self) -> int:
        """Micro-batches per rank in a full global step at the current DP degree."""
        return self._batch.accumulation

    @property
    def loss_scale(self) -> float:
        """The loss scale of a full step's micro-batches (:attr:`GlobalBatch.loss_scale`)."""
        return self._batch.loss_scale

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    @property
    def epoch(self) -> int:
        """The epoch of the next global step."""
        return self._epoch

    @property
    def step(self) -> int:
        """Global steps of :attr:`epoch` already consumed, i.e. the next step to run."""
        return self._step

    # -- position -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The data position as rank-independent JSON-serialisable values.

        ``epoch`` and ``steps`` (complete global steps consumed in it) plus what the
        position means: ``seed``, ``global_batch``, ``micro_batch``, ``num_samples``,
        ``shuffle``, ``drop_last``, and a ``format``/``version`` tag.
        """
        s = self.sampler
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "epoch": self._epoch,
            "steps": self._step,
            "seed": s.seed,
            "global_batch": s.global_batch,
            "micro_batch": s.micro_batch,
            "num_samples": s.num_samples,
            "shuffle": s.shuffle,
            "drop_last": s.drop_last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the next global step of a saved position, at this loader's DP degree.

        The saved ``global_batch``, ``num_samples``, ``seed``, ``shuffle`` and
        ``drop_last`` must equal this loader's (otherwise the steps would hold other
        samples): a mismatch raises :class:`ElasticBatchError` naming both values. The
        micro-batch may differ: each step keeps its samples, cut differently, so the
        per-sample streams are unchanged but the micro-batch streams (keyed by each
        micro-batch's first sample) are not.
        """
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ElasticBatchError(f"not an ElasticLoader state (expected format {STATE_FORMAT!r}): {str(state)[:120]}")
        if state.get("version") != STATE_VERSION:
            raise ElasticBatchError(
                f"ElasticLoader state version {state.get('version')!r} is not supported (this stalwart reads {STATE_VERSION})"
            )
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ElasticBatchError(f"ElasticLoader state lacks {', '.join(missing)}")
        s = self.sampler
        mine = self.state_dict()
        for key in ("global_batch", "num_samples", "seed", "shuffle", "drop_last"):
            if state[key] != mine[key]:
                raise ElasticBatchError(
                    f"the saved data position has {key}={state[key]!r} but this loader has {key}={mine[key]!r}; "
                    "resuming would not be the same training"
                )
        epoch, steps = state["epoch"], state["steps"]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (epoch, steps)):
            raise ElasticBatchError(f"the saved data position (epoch={epoch!r}, steps={steps!r}) is not two counts")
        if steps > s.steps_per_epoch:
            raise ElasticBatchError(
                f"the saved data position is step {steps} of epoch {epoch}, beyond the epoch's {s.steps_per_epoch} steps"
            )
        if steps == s.steps_per_epoch:
            epoch, steps = epoch + 1, 0
        self._epoch, self._step, self._in_step = epoch, steps, False
        self._generation += 1

    # -- iteration ------------------------------------------------------------------
    def _advance(self, step: int) -> None:
        self._step = step + 1
        if self._step == self.sampler.steps_per_epoch:
            self._epoch, self._step = self._epoch + 1, 0

    def __iter__(self) -> Iterator[MicroBatch]:
        seed = self.sampler.seed
        while self.epochs is None or self._epoch < self.epochs:
            gen = self._generation
            epoch, start = self._epoch, (self._epoch, self._step, self._rank, self._dp)
            if self._epoch_dataset is not None:
                self._epoch_dataset.set_epoch(epoch)
            self._batch_sampler.start = start
            self._worker_gen.manual_seed(_hash(_TAG_WORKER, seed, *start[:3]) >> 1)
            it = iter(self.dataloader)
            try:
                for p, data in zip(_plan(self.sampler, *start), it, strict=True):
                    last = p.j == p.accumulation - 1
                    if last:
                        self._advance(p.step)
                    self._in_step = not last
                    yield MicroBatch(
                        data, p.indices, p.epoch, p.step, p.j, p.accumulation, last, p.loss_scale, seed, self.rng_devices
                    )
                    if self._generation != gen:
                        break
            finally:
                # However the iteration ends, the next one starts at a step boundary.
                self._in_step = False
                del it
            if self._generation == gen and self.epochs is None and self._epoch != epoch:
                return
