"""The resumable loader: after restoring a position, iteration continues with exactly
the batches (and RNG stream) an uninterrupted run would have seen."""

from __future__ import annotations

import pytest
import torch

from stalwart.ckpt.providers.data import ResumableLoader


class Squares(torch.utils.data.Dataset):
    """Items depend on the RNG of the process that loads them (like random augmentation)."""

    def __len__(self) -> int:
        return 40

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor([i * i, int(torch.randint(0, 1000, ()).item())])


class Indexed(torch.utils.data.Dataset):
    """Items are a pure function of their index (the common, seedable case)."""

    def __len__(self) -> int:
        return 40

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor([i, i * 7 % 13])


class Counting:
    """A loader with its own state (the StatefulDataLoader protocol)."""

    def __init__(self) -> None:
        self.i = 0

    def __iter__(self):
        while self.i < 12:
            self.i += 1
            yield torch.tensor([self.i])

    def state_dict(self) -> dict:
        return {"i": self.i}

    def load_state_dict(self, sd: dict) -> None:
        self.i = sd["i"]


def _loader(kind: str):
    g = torch.Generator().manual_seed(5)
    if kind == "shuffle":
        return torch.utils.data.DataLoader(Squares(), batch_size=4, shuffle=True)
    if kind == "workers":  # skipped via the sampler: exact for index-determined items
        return torch.utils.data.DataLoader(Indexed(), batch_size=4, shuffle=True, num_workers=2)
    if kind == "workers-rng":  # per-item randomness in workers: skip="load" replays it
        return torch.utils.data.DataLoader(Squares(), batch_size=4, shuffle=True, num_workers=2)
    if kind == "generator":
        return torch.utils.data.DataLoader(Squares(), batch_size=3, shuffle=True, generator=g, drop_last=True)
    if kind == "iterable":
        return [torch.tensor([i]) for i in range(10)]
    if kind == "stateful":
        return Counting()
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["shuffle", "workers", "workers-rng", "generator", "iterable", "stateful"])
@pytest.mark.parametrize("stop", [1, 4, 6])
def test_resume_continues_the_same_batches(kind, stop):
    skip = "load" if kind == "workers-rng" else "sampler"
    torch.manual_seed(123)
    first = ResumableLoader(_loader(kind), epochs=2, skip=skip)
    seen, blob, rng = [], None, None
    for n, batch in enumerate(first, start=1):
        seen.append(batch)
        if n == stop:
            blob = first.pack().tobytes()  # what a checkpoint stores ...
            rng = torch.get_rng_state()  # ... together with the RNG at that moment
            torch.randn(7)  # the training step consumes RNG after the checkpoint
    reference = seen[stop:]

    torch.manual_seed(999)  # a fresh process: different RNG until restore
    second = ResumableLoader(_loader(kind), epochs=2, skip=skip)
    second.unpack(blob)
    torch.set_rng_state(rng)  # what the RNG provider restores
    torch.randn(7)
    rest = list(second)
    assert len(rest) == len(reference)
    assert all(torch.equal(a, b) for a, b in zip(rest, reference)), kind


def test_position_blob_has_a_fixed_size():
    loader = ResumableLoader(_loader("shuffle"))
    sizes = set()
    for _ in loader:
        sizes.add(len(loader.pack()))
    assert len(sizes) == 1
