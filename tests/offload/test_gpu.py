"""The CUDA path (skipped without a GPU; run by bench/offload_gpu.sh on a lent machine):
placement independence (CPU-only, GPU-only, resident and the planner's mixed placement give
the same bits), the trajectory against torch.optim.AdamW, gradient hooks vs copies at
step(), gradients changed after they were copied (torch's clip_grad_norm_), pinned NUMA-bound
host buffers, and DDP with the comm hook."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from stalwart.offload import OffloadAdamW
from stalwart.offload.numa import numa_maps
from tests.ckpt.scripts._harness import failure, isolated_shm, torchrun
from tests.offload.test_distributed import load

from .conftest import REPO, requires_cuda

pytestmark = [pytest.mark.gpu, requires_cuda]

SCRIPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts")


def gpt(layers: int = 2, width: int = 256):
    import sys

    sys.path.insert(0, os.path.join(REPO, "bench"))
    from _gpt import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(vocab=512, seq=64, d_model=width, n_layer=layers, n_head=4)).cuda().to(torch.bfloat16)


def data(steps: int):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 512, (4, 65), generator=g).cuda() for _ in range(steps)]


def train(model, opt, batches, clip=None):
    losses = []
    for x in batches:
        loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        if clip == "ours":
            opt.clip_grad_norm_(1.0)
        elif clip == "torch":
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def snapshot(model, opt):
    out = [p.detach().clone() for p in model.parameters()]
    for st in opt.state.values():
        out.extend(v.detach().clone() for v in st.values())
    return out


def bits_equal(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x.view(torch.uint8) if x.dim() else x, y.view(torch.uint8) if y.dim()
                                                else y) for x, y in zip(a, b))


@pytest.mark.parametrize("clip", [None, "ours"])
def test_placement_never_changes_a_bit(clip):
    base = gpt()
    batches = data(6)
    results = {}
    n_sub = None
    for placement in ("cpu", "gpu", "resident", "mixed", "auto"):
        model = copy.deepcopy(base)
        opt = OffloadAdamW(model.parameters(), lr=1e-3, weight_decay=0.1, subgroup_size=1 << 16, threads=4,
                           resident_budget=1 << 34)
        n_sub = len(opt.costs)
        if placement == "mixed":
            opt.placement = [("cpu", "gpu", "resident")[i % 3] for i in range(n_sub)]
        else:
            opt.placement = placement
        opt.plan = opt.replan()
        losses = train(model, opt, batches, clip)
        results[placement] = (losses, snapshot(model, opt))
        if placement == "mixed":
            assert {p for _, p, *_ in opt.stats.subgroups} == {"cpu", "gpu", "resident"}
    assert n_sub >= 6
    ref_losses, ref_state = results["cpu"]
    for placement, (losses, state) in results.items():
        assert losses == ref_losses, placement
        assert bits_equal(state, ref_state), placement


def test_trajectory_matches_torch_adamw_on_the_device():
    base = gpt()
    batches = data(30)
    model = copy.deepcopy(base)
    opt = OffloadAdamW(model.parameters(), lr=1e-3, weight_decay=0.1, subgroup_size=1 << 16, threads=4)
    ours = train(model, opt, batches, clip="ours")
    ref_model = copy.deepcopy(base)
    masters = [p.detach().float().clone().requires_grad_() for p in ref_model.parameters()]
    ref_opt = torch.optim.AdamW(masters, lr=1e-3, weight_decay=0.1)
    ref = []
    for x in batches:
        loss = ref_model(x[:, :-1], x[:, 1:])
        loss.backward()
        for m, p in zip(masters, ref_model.parameters()):
            m.grad, p.grad = p.grad.float(), None
        torch.nn.utils.clip_grad_norm_(masters, 1.0)
        ref_opt.step()
        ref_opt.zero_grad()
        with torch.no_grad():
            for m, p in zip(masters, ref_model.parameters()):
                p.copy_(m)
        ref.append(loss.item())
    assert max(abs(a - b) for a, b in zip(ours, ref)) < 3e-2
    assert ours[-1] < ours[0]


def test_hooks_and_step_time_copies_agree_and_in_place_clipping_is_seen():
    """Gradients copied by the hooks, or all at step(), give the same bits; clipping in place
    after the hooks copied (torch.nn.utils.clip_grad_norm_) is noticed and recopied."""
    base = gpt()
    batches = data(4)
    out = []
    for hooks in (True, False):
        model = copy.deepcopy(base)
        opt = OffloadAdamW(model.parameters(), lr=1e-3, subgroup_size=1 << 16, threads=4, grad_hooks=hooks,
                           placement="cpu")
        train(model, opt, batches, clip="torch")
        out.append(snapshot(model, opt))
    assert bits_equal(out[0], out[1])


def test_host_buffers_pinned_bound_and_bounded():
    model = gpt()
    opt = OffloadAdamW(model.parameters(), lr=1e-3, subgroup_size=1 << 16, threads=4)
    train(model, opt, data(2))
    assert all(r.pinned for r in opt.regions.values())
    assert all(f"bind:{opt.numa_plan.local}" in (numa_maps(r.addr) or "") for r in opt.regions.values())
    rep = opt.memory_report()
    assert rep["host_bytes_per_param"] <= 14.0 + 4096 * 4 / rep["params"]  # bf16: master + 2 moments + grad staging
    assert "scratch_last_step" in rep["device_bytes"]
    assert opt.stats.plan.predicted.makespan > 0 and opt.stats.measured["update"] > 0
    assert "subgroup" in opt.describe()


def test_ddp_comm_hook_two_processes(tmp_path):
    with isolated_shm() as shm:
        res = torchrun(os.path.join(SCRIPTS, "ddp_gpu.py"), "--out", str(tmp_path), shm_base=shm)
    assert res.returncode == 0, failure(res)
    r = [load(tmp_path / f"result-{i}.json") for i in range(2)]
    assert r[0]["attached"] == r[1]["attached"] == r[0]["step_time_copies"]  # replicas agree, comm hook = at step
    assert r[0]["hosted_by_hook"] > 0  # the comm hook did copy (overlap), not only step()
