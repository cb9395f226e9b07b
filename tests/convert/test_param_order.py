"""``--param-order`` names optimizer state saved by position in plain torch.save files too,
and is never ignored silently."""

from __future__ import annotations

import pytest
import torch

from stalwart.errors import ConversionError
from stalwart.formats.convert import convert

from .conftest import same_bits


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    opt = torch.optim.Adam(list(model.parameters()))  # plain tensors: no param_names in the state dict
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    path = str(tmp_path / "ck.pt")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    names = [n for n, _ in model.named_parameters()]
    order = tmp_path / "order.txt"
    order.write_text("\n".join(names) + "\n")
    truth = {n: opt.state[p] for n, p in model.named_parameters()}
    return path, str(order), names, truth


def test_param_order_names_a_torch_save_optimizer(saved, tmp_path):
    path, order, _, truth = saved
    plan = convert(path, str(tmp_path / "a"), to="native", param_order=order, dry_run=True)
    assert any("named from --param-order" in w for w in plan.warnings)
    assert not any("by order and shape" in w for w in plan.warnings)
    from stalwart.formats.convert import open_convert_source

    with open_convert_source(path, param_order=order) as src:
        for n, st in truth.items():
            assert same_bits(src.read(f"optim.{n}.exp_avg"), st["exp_avg"]), n


def test_wrong_param_order_is_refused(saved, tmp_path):
    path, _, names, _ = saved
    bad = tmp_path / "bad.txt"
    bad.write_text("\n".join([names[1], names[0], *names[2:]]))  # a weight where a bias belongs
    with pytest.raises(ConversionError, match="param order is wrong"):
        convert(path, str(tmp_path / "b"), to="native", param_order=str(bad))


def test_unused_param_order_is_said(saved, tmp_path):
    path, order, _, _ = saved
    hf = str(tmp_path / "hf")
    convert(path, hf, to="hf")
    plan = convert(hf, str(tmp_path / "c"), to="native", param_order=order, dry_run=True)
    assert any("--param-order" in w and "not used" in w for w in plan.warnings)
