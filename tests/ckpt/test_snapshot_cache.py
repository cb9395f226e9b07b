"""The per-step snapshot plan is validated against the live state, never trusted stale.

``guard.step()`` keeps the last snapshot plan and each provider's items, and only checks
them each step (identities, storage pointers, sizes, structure keys). Every test here
changes the state's structure (or a tensor's storage) between snapshots in a way a
stale cache would miss, and checks the next plan, or the stored snapshot, against the
live state.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import stalwart
import stalwart.formats as sf
from stalwart.ckpt.providers.module import ModuleProvider
from stalwart.ckpt.providers.optimizer import OptimizerProvider
from stalwart.ckpt.providers.rng import RNGProvider
from stalwart.ckpt.snapshot import build_plan
from stalwart.formats.layout import Mesh
from stalwart.formats.tree import encode_value

from .scripts._harness import isolated_shm

MESH = Mesh(("dp",), (1,))


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.mid = nn.Linear(4, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("count", torch.zeros(3))


def train_step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    x = torch.randint(0, 10, (2, 3))
    model.head(model.mid(model.emb(x))).sum().backward()
    opt.step()
    opt.zero_grad()


class Planner:
    """What guard.step() does per step, without a keeper: collect, then validate/rebuild the plan."""

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        self.providers = [ModuleProvider(model), OptimizerProvider(opt, model), RNGProvider()]
        self.plan = None

    def step(self):
        collected = [p.collect(MESH, 0) for p in self.providers]
        self.plan = build_plan(collected, MESH, 0, lambda: {}, previous=self.plan)
        return self.plan, collected


def entries(plan) -> dict:
    return dict(plan.lazy + plan.eager)


def assert_plan_matches_live(plan, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Every live tensor is in the plan with its current storage and shape, and nothing else."""
    got = entries(plan)
    expect = {}
    for name, p in model.named_parameters():  # tied duplicates skipped, as stored
        expect[name] = p
    for name, b in model.named_buffers():
        expect[name] = b
    fqn = {id(p): n for n, p in model.named_parameters()}
    for p, st in opt.state.items():
        for slot, v in st.items():
            if isinstance(v, torch.Tensor):
                expect[f"optim.{fqn[id(p)]}.{slot}"] = v
    assert set(got) - {"__stalwart__.rng"} == set(expect)
    for name, live in expect.items():
        t = got[name]
        assert t.data_ptr() == live.data_ptr(), f"{name}: the plan copies another storage than the live tensor's"
        assert tuple(t.shape) == tuple(live.shape), name
        entry = plan.image.entries[name]
        assert entry.end - entry.begin == live.numel() * live.element_size(), name


def test_unchanged_state_reuses_the_plan_and_rebinds_new_tensors():
    torch.manual_seed(0)
    model = Tied()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_step(model, opt)
    planner = Planner(model, opt)
    first, _ = planner.step()
    again, collected = planner.step()
    # same structure: the plan is the same object, only the RNG blob (new every step) rebound
    assert again.signature == first.signature and again.image is first.image
    assert entries(again)["__stalwart__.rng"] is collected[2].items[0].tensor
    assert_plan_matches_live(again, model, opt)
    assert again.layout.tensors["emb.weight"].aliases == ("head.weight",)


def test_new_optimizer_state_after_the_first_step_is_planned():
    model = Tied()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    planner = Planner(model, opt)
    before, _ = planner.step()
    assert not any(n.startswith("optim.") for n in entries(before))
    train_step(model, opt)
    after, _ = planner.step()
    assert after.signature != before.signature
    assert_plan_matches_live(after, model, opt)


def test_param_group_added_and_hyperparameters_changed():
    model = Tied()
    opt = torch.optim.SGD([model.emb.weight], lr=0.1, momentum=0.9)
    planner = Planner(model, opt)
    train_step(model, opt)
    planner.step()
    opt.add_param_group({"params": [model.mid.weight, model.mid.bias], "lr": 0.01})
    train_step(model, opt)
    plan, collected = planner.step()
    assert_plan_matches_live(plan, model, opt)
    assert "optim.mid.weight.momentum_buffer" in entries(plan)
    groups = collected[1].objects["optimizer"]["param_groups"]
    provider = planner.providers[1]
    assert groups == encode_value(provider._groups(provider._fqns()))
    opt.param_groups[1]["lr"] = 0.5  # a scheduler's change: in the objects of the next snapshot
    _, collected = planner.step()
    assert collected[1].objects["optimizer"]["param_groups"] == encode_value(provider._groups(provider._fqns()))
    assert collected[1].objects["optimizer"]["param_groups"] != groups
    opt.param_groups[1]["lr"] = torch.tensor(0.25)  # a tensor lr changes in place: never cached
    _, collected = planner.step()
    opt.param_groups[1]["lr"].fill_(0.125)
    _, collected = planner.step()
    assert collected[1].objects["optimizer"]["param_groups"] == encode_value(provider._groups(provider._fqns()))


def test_resized_and_swapped_storages_are_seen():
    model = Tied()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_step(model, opt)
    planner = Planner(model, opt)
    planner.step()
    # the same shape in a new storage: the Parameter (and its id) stays, the cached alias would not
    with torch.no_grad():
        model.mid.weight.data = torch.full_like(model.mid.weight, 7.0)
    plan, _ = planner.step()
    assert_plan_matches_live(plan, model, opt)
    assert bool((entries(plan)["mid.weight"] == 7.0).all())
    # a resized parameter and its optimizer state
    model.mid.bias.data = torch.zeros(6)
    opt.state[model.mid.bias] = {k: (torch.zeros(6) if k != "step" else v) for k, v in opt.state[model.mid.bias].items()}
    plan, _ = planner.step()
    assert_plan_matches_live(plan, model, opt)
    assert plan.layout.tensors["mid.bias"].shape == (6,)
    # optimizer state resized in place (same tensor object, same id)
    opt.state[model.mid.weight]["exp_avg"].resize_(2, 2)
    plan, _ = planner.step()
    assert plan.layout.tensors["optim.mid.weight.exp_avg"].shape == (2, 2)
    assert_plan_matches_live(plan, model, opt)


def test_replaced_added_and_reinterpreted_module_tensors_are_seen():
    model = Tied()
    model.scale = nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    planner = Planner(model, opt)
    planner.step()
    # a new Parameter object under the same name, equal in value (a one-element tensor
    # compares equal with ==: the check must be by identity)
    old = model.scale
    model.scale = nn.Parameter(torch.ones(1))
    plan, _ = planner.step()
    assert entries(plan)["scale"] is not old and entries(plan)["scale"].data_ptr() == model.scale.data_ptr()
    # a buffer replaced by an equal one, through the dict (no registration hook runs)
    model._buffers["count"] = torch.zeros(3)
    plan, _ = planner.step()
    assert entries(plan)["count"].data_ptr() == model.count.data_ptr()
    # a submodule added, and one replaced by another of the same shape
    model.extra = nn.Linear(2, 2)
    plan, _ = planner.step()
    assert {"extra.weight", "extra.bias"} <= set(entries(plan))
    model.extra = nn.Linear(2, 2)
    plan, _ = planner.step()
    assert entries(plan)["extra.weight"].data_ptr() == model.extra.weight.data_ptr()
    # the same storage seen as another dtype of the same size
    model.count.data = model.count.data.view(torch.int32)
    plan, _ = planner.step()
    assert plan.layout.tensors["count"].dtype == torch.int32


def test_optimizer_state_replaced_by_load_state_dict():
    model = Tied()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_step(model, opt)
    planner = Planner(model, opt)
    planner.step()
    opt.load_state_dict(opt.state_dict())  # new tensors for every slot, same structure
    plan, _ = planner.step()
    assert_plan_matches_live(plan, model, opt)


def test_retied_weights_change_the_aliases():
    model = Tied()
    model.other = nn.Embedding(10, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    planner = Planner(model, opt)
    plan, _ = planner.step()
    assert plan.layout.tensors["emb.weight"].aliases == ("head.weight",)
    model.head.weight = model.other.weight  # same names and shapes stored, another owner
    plan, _ = planner.step()
    # head.weight now comes first in the walk: it owns the tie, other.weight is its alias
    assert plan.layout.tensors["head.weight"].aliases == ("other.weight",)
    assert plan.layout.tensors["emb.weight"].aliases == ()


@pytest.mark.parametrize("change", ["swap", "resize", "new_state"])
def test_snapshots_after_a_change_hold_the_live_state(tmp_path, monkeypatch, change):
    """End to end (real keeper, memory + local tier): the stored step equals the live state."""
    from stalwart.ckpt import keeper_client

    torch.manual_seed(0)
    model = Tied()
    params = [model.emb.weight, model.mid.weight] if change == "new_state" else list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2)
    root = str(tmp_path / "root")
    with isolated_shm() as shm:
        monkeypatch.setattr(keeper_client, "SHM_BASE", shm)
        with stalwart.protect(model, opt, root=root, tiers=["memory", f"local:{root}/local"], keeper_linger_s=1,
                              resume=False, final_checkpoint=False) as guard:
            for _ in range(2):
                train_step(model, opt)
                guard.step()
            with torch.no_grad():
                if change == "swap":  # same shape, new storage
                    model.mid.weight.data = torch.full_like(model.mid.weight, 3.0)
                elif change == "resize":  # a grown layer, its optimizer state reset
                    model.mid.weight.data = torch.full((5, 4), 2.0)
                    model.mid.bias.data = torch.zeros(5)
                    opt.state.pop(model.mid.weight)
                    opt.state.pop(model.mid.bias)
            if change == "new_state":  # a new group: its state appears at the next optimizer step
                opt.add_param_group({"params": [model.mid.bias], "lr": 1e-3})
                train_step(model, opt)
            guard.step()
            step = guard.save_now()  # this step, captured (by the loop snapshot or a new attempt) and persisted
        ckpt = sf.open(os.path.join(root, "local"))
        try:
            assert ckpt.step == step
            live = {n: p.detach() for n, p in model.named_parameters()} | dict(model.named_buffers())
            fqn = {id(p): n for n, p in model.named_parameters()}
            live.update({f"optim.{fqn[id(p)]}.{k}": v for p, st in opt.state.items() for k, v in st.items()
                         if isinstance(v, torch.Tensor)})
            stored = {n for n in ckpt.tensors if not n.startswith("__stalwart__")}
            assert stored == set(live)
            for name, t in live.items():
                assert torch.equal(ckpt.read(name), t), f"{name}: the snapshot does not hold the live values"
        finally:
            ckpt.close()


def test_the_module_walk_matches_named_parameters_and_buffers():
    """ModuleProvider walks the modules itself (cheaper per snapshot): same names, order, tensors."""

    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(4)
            self.shared = nn.Linear(4, 4)
            self.again = self.shared  # a module under two names
            self.seq = nn.Sequential(nn.BatchNorm1d(4), self.bn, nn.Identity())
            self.register_buffer("transient", torch.zeros(2), persistent=False)
            self.register_buffer("kept", torch.ones(3))
            self.register_buffer("empty", None)
            self.register_parameter("nothing", None)
            self.tied = Tied()

    for model in (Odd(), Tied(), nn.Linear(3, 2)):
        persistent = set(model.state_dict(keep_vars=True))
        expect = [(n, id(p), "param") for n, p in model.named_parameters(remove_duplicate=False)]
        expect += [(n, id(b), "buffer") for n, b in model.named_buffers() if n in persistent]
        assert [(n, id(t), r) for n, t, r in ModuleProvider(model)._named()] == expect


def test_patched_headers_equal_rebuilt_ones():
    """A slot's header is patched into a template per snapshot: byte for byte image.header()."""
    import numpy as np

    from stalwart.ckpt.snapshot import final_header
    from stalwart.formats.datafile import FileImage

    specs = [("a", torch.float32, (16, 16)), ("big \"quoted\" ünïcode", torch.float32, (70_000,)),
             ("empty", torch.float32, (0,)), ("u16", torch.uint16, (3,)), ("b", torch.bfloat16, (5, 2))]
    image = FileImage(specs, rank=3)
    gen = np.random.default_rng(1)
    for _ in range(3):
        tables = {n: gen.integers(0, 2**64 - 1, size=c, dtype=np.uint64) for n, c in image.block_counts.items()}
        assert bytes(final_header(image, tables)) == image.header(tables)


def test_rng_blob_follows_every_numpy_generator_change():
    """The RNG blob is read from the generators' own state, not rebuilt from getstate(): every
    change is seen, including a cached gaussian consumed (which moves no generator)."""
    import random

    import numpy as np

    from stalwart.ckpt.providers.rng import pack_rng, unpack_rng

    np.random.seed(5)
    random.seed(5)
    steps = [lambda: None, lambda: np.random.rand(3), lambda: np.random.standard_normal(),
             lambda: np.random.standard_normal(), lambda: None, lambda: np.random.seed(9), lambda: None,
             lambda: np.random.standard_normal(), lambda: np.random.randint(0, 5),
             lambda: random.gauss(0, 1), lambda: random.random(), lambda: random.seed(7), lambda: random.gauss(0, 1)]
    for change in steps:
        change()
        blob = pack_rng()
        expect = (np.random.standard_normal(), np.random.rand(), random.gauss(0, 1), random.random(), torch.rand(1).item())
        unpack_rng(blob.tobytes())
        assert (np.random.standard_normal(), np.random.rand(), random.gauss(0, 1), random.random(), torch.rand(1).item()) == expect
        unpack_rng(blob.tobytes())
