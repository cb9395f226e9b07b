"""The elastic data pipeline keeps the training the same at any data-parallel degree."""

from __future__ import annotations

import json
import multiprocessing

import numpy as np
import pytest
import torch

from stalwart.elastic import (
    ElasticBatchError,
    ElasticLoader,
    ElasticSampler,
    GlobalBatch,
    micro_batch_rng,
    sample_generator,
    sample_seed,
)

SEED = 1234


class IndexNoise(torch.utils.data.Dataset):
    """Sample i is (i, 3 noise values drawn from its own (seed, epoch, i) stream)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.epoch = 0
        self.epochs_seen: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.epochs_seen.append(epoch)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return i, torch.rand(3, generator=sample_generator(SEED, self.epoch, i))


class Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter(range(10))


def _loader(n=100, g=24, m=2, *, rank=0, dp=1, **kw) -> ElasticLoader:
    kw.setdefault("seed", SEED)
    return ElasticLoader(IndexNoise(n), g, m, dp_rank=rank, dp_size=dp, **kw)


def _steps(loaders, its, n_steps):
    """Advance each rank's iterator by n complete global steps; return {(epoch, step): position-ordered indices}."""
    out: dict[tuple[int, int], dict[int, list[int]]] = {}
    dp = loaders[0].dp_size
    for r, it in enumerate(its):
        done = 0
        while done < n_steps:
            mb = next(it)
            k = mb.j * dp + r
            out.setdefault((mb.epoch, mb.step), {})[k] = mb.indices
            assert mb.data[0].tolist() == mb.indices
            done += mb.last
    return {key: [i for k in sorted(mbs) for i in mbs[k]] for key, mbs in out.items()}


# --------------------------------------------------------------------------- global batch
def test_global_batch_split_and_errors():
    b = GlobalBatch(48, 4, 3)
    assert (b.accumulation, b.micro_batches_per_step, b.loss_scale) == (4, 12, 0.25)
    assert b.valid_dp_sizes() == [1, 2, 3, 4, 6, 12]
    with pytest.raises(ElasticBatchError, match=r"cannot be kept at 5 data-parallel ranks.*DP degrees that keep it: 1, 2, 3, 4, 6, 12$"):
        GlobalBatch(48, 4, 5)
    with pytest.raises(ElasticBatchError, match="not a multiple of the micro-batch 5"):
        GlobalBatch(48, 5, 1)
    for bad in [(0, 1, 1), (8, -1, 1), (8, 2, 0), (8.0, 2, 1), (True, 1, 1)]:
        with pytest.raises(ElasticBatchError, match="must be a positive integer"):
            GlobalBatch(*bad)


# --------------------------------------------------------------------------- order
@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 17, 1000, 4097])
def test_order_is_a_permutation_of_seed_and_epoch_only(n):
    s = ElasticSampler(n, 1, 1, seed=7)
    o0 = s.order(0)
    assert sorted(o0.tolist()) == list(range(n))
    assert np.array_equal(ElasticSampler(n, 1, 1, seed=7).order(0), o0)  # nothing but (seed, epoch)
    assert np.array_equal(s.indices(0, [n - 1, 0]), o0[[n - 1, 0]])  # random access agrees
    if n >= 16:
        assert not np.array_equal(s.order(1), o0)
        assert not np.array_equal(ElasticSampler(n, 1, 1, seed=8).order(0), o0)
        assert not np.array_equal(o0, np.arange(n))
    assert np.array_equal(ElasticSampler(n, 1, 1, seed=7, shuffle=False).order(3), np.arange(n))


@pytest.mark.parametrize("drop_last", [True, False])
def test_each_step_holds_the_same_samples_at_any_dp(drop_last):
    g, m, n = 24, 2, 100  # 4 full steps + 4 left over (2 micro-batches when drop_last=False)
    s = ElasticSampler(n, g, m, seed=SEED, drop_last=drop_last)
    degrees = [1, 2, 3, 4, 6] if drop_last else [1, 2]
    assert s.steps_per_epoch == (4 if drop_last else 5)
    for epoch in (0, 1):
        order = s.order(epoch).tolist()
        for step in range(s.steps_per_epoch):
            reference = s.step_indices(epoch, step)
            assert reference == order[step * g : step * g + s.step_samples(step)]
            for dp in degrees:
                by_k: dict[int, list[int]] = {}
                for r in range(dp):
                    mbs = s.micro_batches(epoch, step, r, dp)
                    if step < 4:
                        assert len(mbs) == g // (m * dp) and all(len(mb) == m for mb in mbs)
                    for j, mb in enumerate(mbs):
                        start = step * g + (j * dp + r) * m  # rank r's j-th micro-batch starts here
                        assert mb == order[start : start + m]
                        by_k[j * dp + r] = mb
                assert [i for k in sorted(by_k) for i in by_k[k]] == reference
    if not drop_last:
        with pytest.raises(ElasticBatchError, match="fewer than the 3 data-parallel ranks"):
            s.plan(3)


@pytest.mark.parametrize("dp", [1, 2, 3, 4])
def test_every_sample_exactly_once_per_epoch(dp):
    loader = _loader(100, 24, 1, rank=0, dp=dp, drop_last=False)
    ranks = [loader] + [_loader(100, 24, 1, rank=r, dp=dp, drop_last=False) for r in range(1, dp)]
    for epoch in range(2):
        seen = [i for lo in ranks for mb in lo for i in mb.indices]
        assert sorted(seen) == list(range(100)), epoch
    assert all(lo.state_dict()["epoch"] == 2 for lo in ranks)
    kept = _loader(100, 24, 1)  # drop_last=True: the order's last 4 samples are left out
    assert sorted(i for mb in kept for i in mb.indices) == sorted(kept.sampler.order(0)[:96].tolist())


# --------------------------------------------------------------------------- resume / re-plan
def test_resume_and_replan_at_other_dp_continue_the_uninterrupted_run():
    n, g, m, epochs = 100, 24, 2, 3
    full = [_loader(n, g, m, rank=r, dp=4, epochs=epochs) for r in range(4)]
    reference = _steps(full, [iter(lo) for lo in full], epochs * 4)
    assert len(reference) == epochs * 4

    got = {}
    first = [_loader(n, g, m, rank=r, dp=4, epochs=epochs) for r in range(4)]
    got.update(_steps(first, [iter(lo) for lo in first], 3))  # killed after step 3
    states = [lo.state_dict() for lo in first]
    assert all(st == states[0] for st in states)  # rank-independent
    state = json.loads(json.dumps(states[0]))

    # ... restarted at DP 3
    second = [_loader(n, g, m, rank=r, dp=3, epochs=epochs) for r in range(3)]
    for lo in second:
        lo.load_state_dict(state)
        assert (lo.accumulation, lo.loss_scale) == (4, 0.25)
    its = [iter(lo) for lo in second]
    got.update(_steps(second, its, 3))  # crosses into epoch 1

    # ... rank 2 leaves between steps: the others re-plan in place at DP 2
    for r in range(2):
        second[r].set_world(r, 2)
    assert second[0].accumulation == 6
    got.update(_steps(second[:2], its[:2], 1))

    # ... and the world grows to 6 (new ranks load the saved position)
    state = second[0].state_dict()
    assert state["epoch"] == 1 and state["steps"] == 3
    third = [_loader(n, g, m, rank=r, dp=6, epochs=epochs) for r in range(6)]
    for lo in third:
        lo.load_state_dict(state)
    its = [iter(lo) for lo in third]
    got.update(_steps(third, its, epochs * 4 - 7))
    assert all(next(it, None) is None for it in its)  # ends after `epochs`
    assert got == reference


def test_micro_batch_size_may_change_on_resume_and_epochs_none_runs_one_epoch():
    a = _loader(100, 24, 2, rank=0, dp=1)
    steps = [mb.step for mb in a]
    assert steps == [s for s in range(4) for _ in range(12)]
    assert a.epoch == 1 and a.step == 0 and a.dataset.epochs_seen == [0]
    b = _loader(100, 24, 4, rank=0, dp=1)
    b.load_state_dict(a.state_dict())
    mbs = list(b)
    assert {mb.epoch for mb in mbs} == {1} and b.dataset.epochs_seen == [1]
    assert [i for mb in mbs if mb.step == 2 for i in mb.indices] == a.sampler.step_indices(1, 2)


def test_position_counts_complete_steps_and_breaking_mid_step_replays_it():
    lo = _loader(100, 24, 2, rank=1, dp=2)
    it = iter(lo)
    first = [next(it) for _ in range(6)]  # step 0 complete (6 micro-batches per rank)
    assert first[-1].last and lo.step == 1
    partial = next(it)
    assert partial.step == 1 and not partial.last and lo.step == 1
    with pytest.raises(ElasticBatchError, match="middle of global step 1"):
        lo.set_world(0, 1)
    it.close()
    again = next(iter(lo))  # a new iteration restarts step 1 from its first micro-batch
    assert (again.step, again.j, again.indices) == (1, 0, partial.indices)


# --------------------------------------------------------------------------- randomness
def test_sample_seeds():
    s = sample_seed(SEED, 2, 17)
    assert s == sample_seed(SEED, 2, 17) and 0 <= s < 2**63
    seeds = {sample_seed(SEED, e, i) for e in range(3) for i in range(1000)}
    assert len(seeds) == 3000
    assert sample_seed(-1, 0, 0) == sample_seed(-1, 0, 0) != sample_seed(1, 0, 0)  # any integer seed
    a = torch.rand(4, generator=sample_generator(SEED, 2, 17))
    assert torch.equal(a, torch.rand(4, generator=sample_generator(SEED, 2, 17)))


def _rng_run(dp: int, outer_seed: int):
    """Per micro-batch in-model draws at DP dp, and the outer stream around them."""
    torch.manual_seed(outer_seed)
    draws, outer = {}, []
    drop = torch.nn.Dropout(0.5)
    for r in range(dp):
        for mb in _loader(48, 24, 2, rank=r, dp=dp, epochs=2):
            with mb.rng() as key:
                draws[(mb.epoch, *mb.indices)] = (key, torch.rand(3), drop(torch.ones(8)))
            outer.append(torch.rand(1))  # what the loop itself draws
    return draws, torch.cat(outer), torch.get_rng_state()


def test_micro_batch_rng_is_the_same_at_any_dp_and_leaves_the_outer_stream_alone():
    base, _, _ = _rng_run(1, 0)
    assert len(base) == 48
    for dp in (2, 4):
        draws, _, _ = _rng_run(dp, outer_seed=dp)  # the outer RNG differs; the draws must not
        assert draws.keys() == base.keys()
        for key, (seed, rand, mask) in draws.items():
            assert seed == base[key][0] and torch.equal(rand, base[key][1]) and torch.equal(mask, base[key][2])
    # the outer stream is exactly what it is when nothing is drawn inside the blocks
    _, outer, state = _rng_run(4, 99)
    torch.manual_seed(99)
    assert torch.equal(outer, torch.rand(len(outer)))
    assert torch.equal(state, torch.get_rng_state())

    torch.manual_seed(5)
    before = torch.get_rng_state()
    with micro_batch_rng(SEED, 0, 3) as k1:
        x = torch.rand(2)
    assert torch.equal(torch.get_rng_state(), before)
    with micro_batch_rng(SEED, 1, 3) as k2, micro_batch_rng(SEED, 0, 4) as k3:
        pass
    assert len({k1, k2, k3}) == 3 and k1 != sample_seed(SEED, 0, 3)
    with micro_batch_rng(SEED, 0, 3, devices=["cpu"]):
        assert torch.equal(torch.rand(2), x)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_micro_batch_rng_forks_the_cuda_generator():
    torch.cuda.manual_seed(3)
    before = torch.cuda.get_rng_state()
    with micro_batch_rng(SEED, 0, 7):
        a = torch.rand(4, device="cuda")
    assert torch.equal(torch.cuda.get_rng_state(), before)
    with micro_batch_rng(SEED, 0, 7, devices=[torch.cuda.current_device()]):
        assert torch.equal(torch.rand(4, device="cuda"), a)


# --------------------------------------------------------------------------- gradients
@pytest.mark.parametrize(
    ("n", "g", "m", "drop_last", "degrees"),
    [(64, 16, 2, True, [1, 2, 4]), (40, 16, 2, False, [1, 2, 4]), (40, 12, 3, False, [1, 2])],
)
def test_scaled_micro_batch_gradients_average_to_the_global_batch_mean(n, g, m, drop_last, degrees):
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 5, generator=gen, dtype=torch.float64), torch.randn(n, generator=gen, dtype=torch.float64)
    w0 = torch.randn(5, generator=gen, dtype=torch.float64)
    s = ElasticSampler(n, g, m, seed=SEED, drop_last=drop_last)

    def grad(indices, scale=1.0):
        w = w0.clone().requires_grad_()
        ((x[indices] @ w - y[indices]).pow(2).mean() * scale).backward()
        return w.grad

    for step in range(s.steps_per_epoch):
        full = grad(s.step_indices(0, step))
        for dp in degrees:
            per_rank = []
            for r in range(dp):
                ks = s.rank_micro_batches(step, r, dp)
                per_rank.append(sum(grad(s.micro_batch_indices(0, step, k), s.loss_scale(step, k, dp)) for k in ks))
            assert torch.allclose(sum(per_rank) / dp, full, rtol=1e-12, atol=1e-14), (step, dp)


# --------------------------------------------------------------------------- data loader
@pytest.mark.parametrize("persistent", [False, True])
def test_worker_processes_give_the_same_micro_batches_and_leave_the_rng_alone(persistent):
    def run(**kw):
        torch.manual_seed(0)
        before = torch.get_rng_state()
        out = []
        lo = _loader(60, 12, 2, rank=1, dp=3, epochs=2, **kw)
        for mb in lo:
            out.append((mb.epoch, mb.step, mb.j, mb.last, mb.indices, mb.data[0].tolist(), mb.data[1]))
            if (mb.epoch, mb.step, mb.last) == (0, 2, True):
                lo.set_world(0, 2)  # prefetched micro-batches of the old plan are dropped
        assert torch.equal(torch.get_rng_state(), before)
        return out

    plain = run()
    workers = run(num_workers=2, multiprocessing_context="fork", prefetch_factor=4, persistent_workers=persistent)
    assert not multiprocessing.active_children()  # the dropped loader shut its workers down at once
    assert len(plain) == len(workers) == 3 * 2 + 2 * 3 + 5 * 3  # 3 steps of 2, then 2 + 5 steps of 3
    for a, b in zip(plain, workers):
        assert a[:6] == b[:6] and torch.equal(a[6], b[6])
        assert a[4] == a[5]


def test_bad_configurations_are_refused_clearly():
    with pytest.raises(ElasticBatchError, match="fewer than one global batch of 24"):
        ElasticSampler(10, 24, 2, seed=0)
    with pytest.raises(ElasticBatchError, match="does not take batch_size="):
        _loader(batch_size=4)
    with pytest.raises(ElasticBatchError, match="does not take generator="):
        _loader(generator=torch.Generator())
    with pytest.raises(ElasticBatchError, match="needs a map-style dataset"):
        ElasticLoader(Stream(), 4, 2, dp_rank=0, dp_size=1)
    with pytest.raises(ElasticBatchError, match=r"dp_rank must be an integer in \[0, 2\)"):
        _loader(rank=2, dp=2)
    lo = _loader(dp=2, rank=1)
    with pytest.raises(ElasticBatchError, match="cannot be kept at 5"):
        lo.set_world(0, 5)
    assert (lo.dp_rank, lo.dp_size) == (1, 2)
    state = lo.state_dict()
    for key, value, pattern in [
        ("global_batch", 48, "global_batch=48 but this loader has global_batch=24"),
        ("num_samples", 99, "num_samples=99"),
        ("seed", 1, "seed=1"),
        ("steps", 9, "beyond the epoch's 4 steps"),
        ("epoch", -1, "is not two counts"),
        ("version", 7, "version 7 is not supported"),
        ("format", "torch", "not an ElasticLoader state"),
    ]:
        with pytest.raises(ElasticBatchError, match=pattern):
            lo.load_state_dict({**state, key: value})
    with pytest.raises(ElasticBatchError, match="lacks steps"):
        lo.load_state_dict({k: v for k, v in state.items() if k != "steps"})
    assert lo.state_dict() == state  # nothing half-applied
