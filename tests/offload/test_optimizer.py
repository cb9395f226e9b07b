"""OffloadAdamW on CPU parameters: bitwise equal to the rule's reference, trajectory equal to
torch.optim.AdamW within the stated tolerance (100 steps of a small transformer with weight
decay, bf16 weights with fp32 masters, clipping and a LR scheduler), an ordinary state_dict,
memory reported and bounded, bad input refused clearly."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from stalwart.offload import OffloadAdam, OffloadAdamW, OffloadError
from stalwart.offload.rules import AdamRule, f32

V, D, T = 50, 32, 16

# The tolerance OffloadAdamW promises against torch.optim.AdamW (docs/OFFLOAD.md): same
# formula, rounding differs (no fused ops, sqrt correctly rounded, 1/sqrt(bc2) multiplied).
FP32_TOL = {"loss": 1e-5, "param_rel": 1e-5}  # fp32 weights, 100 steps
BF16_TOL = {"loss": 3e-3, "param_rel": 3e-2}  # bf16 weights + fp32 masters vs AdamW on fp32 masters, 100 steps


class TinyTransformer(torch.nn.Module):
    """Two encoder layers without biases (a key bias has an exactly-zero true gradient, so
    Adam would amplify rounding noise in it into lr-sized steps: not a fair comparison)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(V, D)
        layer = torch.nn.TransformerEncoderLayer(D, 4, 64, dropout=0.0, batch_first=True, bias=False)
        self.enc = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = torch.nn.Linear(D, V)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.emb(x)))


def batches(steps: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (steps, 8, T + 1), generator=torch.Generator().manual_seed(seed))


def lm_loss(model, x: torch.Tensor) -> torch.Tensor:
    logits = model(x[:, :-1]).float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, V), x[:, 1:].reshape(-1))


def train(dtype, steps: int, ours: bool):
    """100 steps of the tiny transformer with clipping and a one-cycle LR: OffloadAdamW on the
    ``dtype`` model, or torch.optim.AdamW on fp32 master copies of it (the usual
    mixed-precision recipe). Returns the losses and the final fp32 master weights."""
    torch.manual_seed(0)
    model = TinyTransformer().to(dtype)
    masters = [p.detach().float().clone().requires_grad_() for p in model.parameters()]
    if ours:
        opt = OffloadAdamW(model.parameters(), lr=3e-3, weight_decay=0.1, subgroup_size=8192, threads=2)
    else:
        opt = torch.optim.AdamW(masters, lr=3e-3, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    losses = []
    for x in batches(steps):
        loss = lm_loss(model, x)
        loss.backward()
        losses.append(loss.item())
        if ours:
            opt.clip_grad_norm_(1.0)
        else:
            for mp, p in zip(masters, model.parameters()):
                mp.grad, p.grad = p.grad.float(), None
            torch.nn.utils.clip_grad_norm_(masters, 1.0)
        opt.step()
        opt.zero_grad()
        sched.step()
        if not ours:
            with torch.no_grad():
                for mp, p in zip(masters, model.parameters()):
                    p.copy_(mp)
    if ours:
        masters = [opt.state[p].get("master", p) for p in model.parameters()]
        assert opt.state[model.head.weight]["step"].item() == steps
    return losses, [m.detach().float() for m in masters]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, FP32_TOL), (torch.bfloat16, BF16_TOL)])
def test_trajectory_matches_torch_adamw(dtype, tol):
    ours, ours_w = train(dtype, 100, ours=True)
    ref, ref_w = train(dtype, 100, ours=False)
    assert max(abs(a - b) for a, b in zip(ours, ref)) <= tol["loss"]
    worst = max(((a - b).norm() / b.norm()).item() for a, b in zip(ours_w, ref_w))
    assert worst <= tol["param_rel"]
    assert ours[-1] < ours[0] - 0.1  # it trained


class RuleReference:
    """The update the optimizer promises, written with the rule's torch ops per parameter."""

    def __init__(self, params, groups) -> None:
        self.rule = AdamRule()
        self.groups = groups
        self.state = {p: {"master": p.detach().float().clone(), "m": torch.zeros(p.shape), "v": torch.zeros(p.shape),
                          "step": 0} for p in params}

    def step(self, gscale: float = 1.0) -> None:
        for g in self.groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                st["step"] += 1
                row = self.rule.scalars(g, st["step"], f32(gscale))
                self.rule.apply([st["master"]], [p.grad], [[st["m"], st["v"]]], [row])
                with torch.no_grad():
                    p.copy_(st["master"])


def two_group_model(dtype):
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(40, 300), torch.nn.Tanh(), torch.nn.Linear(300, 7)).to(dtype)
    ref_model = copy.deepcopy(model)
    return model, ref_model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bitwise_equal_to_rule_reference(dtype):
    """Params split over subgroups, two groups with other hyper-parameters, a param without a
    gradient on some steps, a clip factor: every bit equal to the per-tensor reference."""
    model, ref_model = two_group_model(dtype)

    def groups(m):
        ps = list(m.parameters())
        return [{"params": ps[:2], "lr": 1e-2, "weight_decay": 0.1},
                {"params": ps[2:], "lr": 3e-3, "betas": (0.8, 0.9), "weight_decay": 0.0}]

    opt = OffloadAdamW(groups(model), subgroup_size=2048, threads=2)
    ref_groups = [{**g, **{k: v for k, v in opt.defaults.items() if k not in g}} for g in groups(ref_model)]
    ref = RuleReference(list(ref_model.parameters()), ref_groups)
    assert len(opt.layout.subgroups) > 3 and any(
        len({opt.layout.pieces[k].subgroup for k in range(len(opt.layout.pieces)) if opt.layout.pieces[k].entry == e})
        > 1 for e in range(4))
    g = torch.Generator().manual_seed(9)
    for step in range(6):
        x = torch.randn(16, 40, generator=g).to(dtype)
        for m in (model, ref_model):
            m.zero_grad(set_to_none=True)
            m(x).float().square().mean().backward()
            if step % 2:
                m[2].bias.grad = None  # no gradient this step: no update, no step count
        if step == 4:
            norm = opt.clip_grad_norm_(0.01)
            torch.testing.assert_close(norm, torch.nn.utils.get_total_norm([p.grad for p in ref_model.parameters()]),
                                       check_dtype=False)
            ref.step(gscale=float(torch.clamp(0.01 / (norm + 1e-6), max=1.0)))
        else:
            ref.step()
        opt.step()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)
        st, rst = opt.state[p], ref.state[q]
        assert torch.equal(st["exp_avg"], rst["m"]) and torch.equal(st["exp_avg_sq"], rst["v"])
        assert st["step"].item() == rst["step"]
        if dtype != torch.float32:
            assert torch.equal(st["master"], rst["master"])
    assert opt.state[model[2].bias]["step"].item() == 3.0


def test_adam_mode_matches_torch_adam():
    torch.manual_seed(0)
    a = torch.nn.Linear(30, 20)
    b = copy.deepcopy(a)
    opt = OffloadAdam(a.parameters(), lr=1e-2, weight_decay=0.05, threads=1)
    ref = torch.optim.Adam(b.parameters(), lr=1e-2, weight_decay=0.05)
    for _ in range(20):
        x = torch.randn(8, 30)
        for m, o in ((a, opt), (b, ref)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_maximize_matches_torch():
    torch.manual_seed(0)
    a = torch.nn.Linear(10, 10)
    b = copy.deepcopy(a)
    opt = OffloadAdamW(a.parameters(), lr=1e-2, maximize=True, threads=1)
    ref = torch.optim.AdamW(b.parameters(), lr=1e-2, maximize=True)
    for _ in range(5):
        x = torch.randn(4, 10)
        for m, o in ((a, opt), (b, ref)):
            o.zero_grad()
            m(x).sum().backward()
            o.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def run_steps(model, opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(8, 40, generator=g).to(next(model.parameters()).dtype)).float().square().mean().backward()
        opt.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_resumes_bitwise(dtype):
    model, _ = two_group_model(dtype)
    opt = OffloadAdamW(model.parameters(), lr=1e-2, subgroup_size=4096, threads=1)
    run_steps(model, opt, 3, seed=1)
    saved_model = copy.deepcopy(model.state_dict())
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)  # an ordinary state dict: plain tensors and numbers
    run_steps(model, opt, 4, seed=2)

    model2, _ = two_group_model(dtype)
    model2.load_state_dict(saved_model)
    opt2 = OffloadAdamW(model2.parameters(), lr=1e-2, subgroup_size=4096, threads=1)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert set(sd["state"][0]) == ({"step", "exp_avg", "exp_avg_sq"} | ({"master"} if dtype != torch.float32 else set()))
    assert all(v.dtype == torch.float32 for v in sd["state"][0].values())
    opt2.load_state_dict(sd)
    run_steps(model2, opt2, 4, seed=2)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][k], opt2.state[q][k])


def test_state_dict_interchanges_with_torch_adamw():
    """torch AdamW state loads into OffloadAdamW and back: same slots, same meaning."""
    torch.manual_seed(0)
    a = torch.nn.Linear(12, 6)
    b = copy.deepcopy(a)
    ref = torch.optim.AdamW(b.parameters(), lr=1e-2)
    run = lambda m, o: (o.zero_grad(), m(torch.ones(2, 12)).sum().backward(), o.step())  # noqa: E731
    for _ in range(3):
        run(b, ref)
    a.load_state_dict(b.state_dict())
    opt = OffloadAdamW(a.parameters(), lr=1e-2, threads=1)
    opt.load_state_dict(ref.state_dict())
    for p in a.parameters():
        assert opt.state[p]["step"].item() == 3.0
    for _ in range(2):
        run(a, opt)
        run(b, ref)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    back = torch.optim.AdamW(copy.deepcopy(a).parameters(), lr=1e-2)
    back.load_state_dict(opt.state_dict())
    assert back.state_dict()["state"][0]["step"].item() == 5.0


def test_state_put_back_by_anyone_is_adopted():
    """A checkpoint restore replaces state tensors; the next step copies them into the host
    buffers (the state then points at the buffers again)."""
    model, _ = two_group_model(torch.bfloat16)
    opt = OffloadAdamW(model.parameters(), lr=1e-2, threads=1)
    run_steps(model, opt, 2, seed=1)
    p = next(iter(model.parameters()))
    own = opt.state[p]["exp_avg"]
    replacement = {k: (v.clone() + 1 if k != "step" else v.clone()) for k, v in opt.state[p].items()}
    opt.state.clear()
    opt.state[p].update(replacement)
    opt.state_dict()
    assert opt.state[p]["exp_avg"] is own and torch.equal(own, replacement["exp_avg"])
    assert opt.state[p]["step"].item() == 2.0
    q = list(model.parameters())[1]  # cleared: master from the weights, moments zero
    assert torch.equal(opt.state[q]["master"], q.float()) and not opt.state[q]["exp_avg"].any()
    opt.state[p]["max_exp_avg_sq"] = torch.zeros(p.shape)
    with pytest.raises(OffloadError, match="max_exp_avg_sq"):
        opt.step()


@pytest.mark.parametrize("dtype,expected", [(torch.float32, 16.0), (torch.bfloat16, 16.0)])
def test_memory_report_at_most_16_bytes_per_param(dtype, expected):
    torch.manual_seed(0)
    model = torch.nn.Linear(1024, 1024).to(dtype)  # sizes multiple of 16: no padding
    opt = OffloadAdamW(model.parameters(), threads=1, subgroup_size=1 << 18)
    rep = opt.memory_report()
    n = 1024 * 1024 + 1024
    assert rep["params"] == n
    assert rep["host_bytes_per_param"] <= expected + 4096 * 3 / n  # page rounding of each buffer
    own = 8 if dtype == torch.float32 else 12  # moments (+ fp32 master)
    assert rep["optimizer_host_bytes"] == sum(rep["host_bytes"].values())
    assert abs(rep["optimizer_host_bytes"] - own * n) < 3 * 4096
    assert sum(rep["numa"].values()) == rep["optimizer_host_bytes"] - sum(
        r.size - r.nbytes for r in opt.regions.values())


def test_refused_clearly():
    lin = torch.nn.Linear(4, 4)
    with pytest.raises(OffloadError, match="amsgrad"):
        OffloadAdamW(lin.parameters(), amsgrad=True)
    with pytest.raises(OffloadError, match=r"param group 0, param 0: dtype torch.float64"):
        OffloadAdamW([torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))])
    with pytest.raises(OffloadError, match="not contiguous"):
        OffloadAdamW([torch.nn.Parameter(torch.zeros(3, 4).t())])
    opt = OffloadAdamW(lin.parameters(), threads=1)
    lin.weight.grad = torch.zeros(4, 4).to_sparse()
    with pytest.raises(OffloadError, match=r"param group 0, param 0 .*sparse gradients"):
        opt.step()


def test_add_param_group_keeps_existing_state():
    a, b = torch.nn.Linear(5, 5), torch.nn.Linear(5, 5)
    opt = OffloadAdamW(a.parameters(), lr=1e-2, threads=1)
    run = lambda: (opt.zero_grad(), (a(torch.ones(1, 5)) + b(torch.ones(1, 5))).sum().backward(), opt.step())  # noqa: E731
    run()
    before = opt.state[a.weight]["exp_avg"].clone()
    opt.add_param_group({"params": list(b.parameters()), "lr": 1e-3})
    assert torch.equal(opt.state[a.weight]["exp_avg"], before) and opt.state[a.weight]["step"].item() == 1.0
    run()
    assert opt.state[b.weight]["step"].item() == 1.0 and opt.state[a.weight]["step"].item() == 2.0
