"""Data position: a resumable wrapper around a DataLoader (or any iterable).

The wrapper counts batches handed out in the current epoch and remembers the RNG
state at the epoch's start (the DataLoader draws its shuffle seed and worker base
seed from it). On resume it replays the epoch start under that RNG, skips the
batches already seen without loading them (for a map-style DataLoader the batch
sampler is advanced; other iterables are consumed), and hands back control with the
RNG as it was at the checkpoint, so the batch sequence continues exactly.

torchdata's ``StatefulDataLoader`` is used through its own ``state_dict`` when given.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Iterator, Mapping

import numpy as np
import torch

from stalwart.ckpt.providers.base import Collected, PerRankBlobProvider, RestoreContext, blob_targets
from stalwart.errors import StalwartError
from stalwart.formats.tree import decode_value, encode_value

_HEAD = struct.Struct("<qqqq")  # epoch, batches consumed in epoch, samples consumed in total, flags
STATEFUL_CAPACITY = 64 * 1024  # bytes reserved for a StatefulDataLoader's own state (JSON)


class _SkipBatchSampler:
    """Yields a batch sampler's batches from position ``skip`` on.

    :meth:`prime` creates the inner iterator, skips ``skip`` batches and buffers the
    next one, so any RNG the sampler draws (RandomSampler seeds itself on first use)
    is drawn at that moment; the resume code primes it right after creating the
    DataLoader iterator, which is when the original run drew it.
    """

    def __init__(self, inner, skip: int) -> None:
        self.inner = inner
        self._skip = skip
        self._it = None
        self._first = None
        self._done = False

    def prime(self) -> None:
        if self._it is not None:
            return
        self._it = iter(self.inner)
        for _ in range(self._skip):
            if next(self._it, None) is None:
                self._done = True
                return
        self._first = next(self._it, None)
        self._done = self._first is None

    def __iter__(self):
        self.prime()
        if self._done:
            return
        yield self._first
        yield from self._it

    def __len__(self) -> int:
        return max(0, len(self.inner) - self._skip)


def _rebuild_with_batch_sampler(loader: torch.utils.data.DataLoader, batch_sampler) -> torch.utils.data.DataLoader:
    kwargs = dict(
        batch_sampler=batch_sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        generator=loader.generator,
        persistent_workers=loader.persistent_workers,
        pin_memory_device=loader.pin_memory_device,
    )
    if loader.num_workers > 0:
        kwargs["prefetch_factor"] = loader.prefetch_factor
    return torch.utils.data.DataLoader(loader.dataset, **kwargs)


class ResumableLoader:
    """Iterate ``loader`` while recording the position; see the module docstring.

    ``epochs``: iterate from the current epoch up to (not including) this epoch in one
    loop; None iterates the current epoch only (call again for the next one).

    ``skip``: how a resumed epoch passes the batches already seen. ``"sampler"`` (the
    default) advances a map-style DataLoader's batch sampler without loading data;
    exact whenever batch contents depend only on their indices and the epoch's seeds.
    ``"load"`` loads and drops them (slower; also exact when worker processes draw
    their own random numbers per item). Other iterables are always consumed.
    """

    def __init__(self, loader: Iterable, epochs: int | None = None, skip: str = "sampler") -> None:
        if skip not in ("sampler", "load"):
            raise ValueError("skip must be 'sampler' or 'load'")
        self.loader = loader
        self.epochs = epochs
        self.skip = skip
        self.epoch = 0
        self.batch = 0  # batches handed out in the current epoch
        self.samples = 0
        self._epoch_rng = torch.get_rng_state()
        self._gen = getattr(loader, "generator", None)
        self._gen_state = self._gen.get_state() if isinstance(self._gen, torch.Generator) else None
        self._pending_skip = 0
        # torchdata's StatefulDataLoader (or any loader with its own state) resumes itself
        self._stateful = hasattr(loader, "state_dict") and hasattr(loader, "load_state_dict")

    # --- position as a fixed-size per-rank blob ---------------------------------
    def pack(self) -> np.ndarray:
        """The position as a byte blob whose length is fixed for this loader."""
        head = _HEAD.pack(self.epoch, self.batch, self.samples, int(self._gen_state is not None))
        rng = self._epoch_rng.numpy().tobytes()
        gen = self._gen_state.numpy().tobytes() if self._gen_state is not None else b""
        own = b""
        if self._stateful:
            own = json.dumps(encode_value(self.loader.state_dict()), separators=(",", ":")).encode()
            if len(own) > STATEFUL_CAPACITY:
                raise StalwartError(f"the data loader's state_dict is {len(own)} bytes as JSON; at most {STATEFUL_CAPACITY} are kept")
            own = struct.pack("<I", len(own)) + own + b"\0" * (STATEFUL_CAPACITY - len(own))
        blob = head + struct.pack("<II", len(rng), len(gen)) + rng + gen + own
        return np.frombuffer(blob, dtype=np.uint8).copy()

    def unpack(self, blob: bytes) -> None:
        self.epoch, self.batch, self.samples, has_gen = _HEAD.unpack_from(blob, 0)
        lr, lg = struct.unpack_from("<II", blob, _HEAD.size)
        pos = _HEAD.size + 8
        self._epoch_rng = torch.frombuffer(bytearray(blob[pos : pos + lr]), dtype=torch.uint8)
        self._gen_state = torch.frombuffer(bytearray(blob[pos + lr : pos + lr + lg]), dtype=torch.uint8) if has_gen else None
        pos += lr + lg
        if self._stateful:
            (n,) = struct.unpack_from("<I", blob, pos)
            self.loader.load_state_dict(decode_value(json.loads(blob[pos + 4 : pos + 4 + n])))
            self._pending_skip = 0  # a stateful loader resumes itself
        else:
            self._pending_skip = self.batch

    # --- iteration -------------------------------------------------------------
    def _epoch_iterator(self) -> Iterator:
        loader = self.loader
        skip = 0 if self._stateful else self._pending_skip
        self._pending_skip = 0
        set_epoch = getattr(getattr(loader, "sampler", None), "set_epoch", None)
        if callable(set_epoch):
            set_epoch(self.epoch)
        if not skip:
            # A new epoch: remember the RNG its start draws from (shuffle and worker seeds).
            self._epoch_rng = torch.get_rng_state()
            self._gen_state = self._gen.get_state() if isinstance(self._gen, torch.Generator) else None
            return iter(loader)
        # Resuming mid-epoch: replay the epoch start under its RNG, skip what was seen, and
        # leave the global RNG exactly as it was (the checkpoint restored it already).
        current = torch.get_rng_state()
        torch.set_rng_state(self._epoch_rng)
        if self._gen is not None and self._gen_state is not None:
            self._gen.set_state(self._gen_state)
        try:
            if self.skip == "sampler" and isinstance(loader, torch.utils.data.DataLoader) and loader.batch_sampler is not None:
                sampler = _SkipBatchSampler(loader.batch_sampler, skip)
                it = iter(_rebuild_with_batch_sampler(loader, sampler))  # draws the base seed, as iter(loader) did
                sampler.prime()  # then the sampler's own draw, as the first batch fetch did
            else:
                it = iter(loader)
                for _ in range(skip):  # load and drop what was already seen
                    if next(it, _END) is _END:
                        break
        finally:
            torch.set_rng_state(current)
        return it

    def __iter__(self) -> Iterator:
        while True:
            it = self._epoch_iterator()
            for batch in it:
                self.batch += 1
                self.samples += _batch_len(batch)
                yield batch
            self.epoch += 1
            self.batch = 0
            if self.epochs is None or self.epoch >= self.epochs:
                return

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]


_END = object()


def _batch_len(batch) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    if isinstance(batch, (list, tuple)) and batch:
        return _batch_len(batch[0])
    if isinstance(batch, Mapping) and batch:
        return _batch_len(next(iter(batch.values())))
    return 1


def data_targets(ctx: RestoreContext) -> Collected:
    """The saved data position of this rank (loaded even before a loader is attached)."""
    return blob_targets(ctx, DataProvider.tensor_name)


class DataProvider(PerRankBlobProvider):
    name = "data"
    tensor_name = "__stalwart__.data"
    what = "the data position"

    def __init__(self, loader: ResumableLoader) -> None:
        self.loader = loader

    def pack(self) -> np.ndarray:
        return self.loader.pack()

    def unpack(self, blob: bytes) -> None:
        self.loader.unpack(blob)
