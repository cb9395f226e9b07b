"""Real DeepSpeed checkpoints -> stalwart, bitwise against DeepSpeed's own ground truth.

Truth is what DeepSpeed itself reports on the live engine right after saving
(``safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state`` and the base
optimizer's ``step``) and what its ``zero_to_fp32`` writes.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import safetensors
import safetensors.torch
import torch

import stalwart.formats as F
from stalwart.formats.convert import convert, open_convert_source

from .conftest import DS_CONFIGS, DS_CONFIGS_DP1, MATRIX, same_bits

ALL_CONFIGS = {**DS_CONFIGS, **DS_CONFIGS_DP1}

pytestmark = pytest.mark.deepspeed

TRAINABLE = ["emb.weight", "l1.weight", "l1.bias", "l2.weight", "l2.bias"]
FROZEN = ["frozen.weight", "frozen.bias"]
SLOTS = ["exp_avg", "exp_avg_sq"]


def _net():
    """The test model, loaded from the training script under a name of its own."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "scripts", "ds_train.py")
    spec = importlib.util.spec_from_file_location("stalwart_tests_convert_ds_train", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Net()


@pytest.fixture(scope="module")
def natives(ds_ckpts, tmp_path_factory):
    out = tmp_path_factory.mktemp("native")
    paths = {}
    for name in ALL_CONFIGS:
        paths[name] = str(out / name)
        convert(ds_ckpts.path(name), paths[name], to="native")
    return paths


@pytest.mark.parametrize("name", [*MATRIX, "z0_fp32", "bf16opt", "z2_fp16", "z2_elastic", *DS_CONFIGS_DP1])
def test_native_equals_deepspeed_truth(ds_ckpts, natives, name):
    truth = ds_ckpts.truth(name)
    lp = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[ALL_CONFIGS[name]["dtype"]]
    with F.open(natives[name]) as ckpt:
        assert F.verify(natives[name]).ok
        specs = ckpt.tensors
        for p in TRAINABLE:
            got = ckpt.read(p)
            assert got.dtype == torch.float32, f"{p}: the fp32 master is preferred over the {lp} module weight"
            assert same_bits(got, truth[p]), p
            for slot in SLOTS:
                assert same_bits(ckpt.read(f"optim.{p}.{slot}"), truth[f"optim.{p}.{slot}"]), f"{p}.{slot}"
                spec = specs[f"optim.{p}.{slot}"]
                assert (spec.role, spec.param, spec.slot) == ("optimizer_slot", p, slot)
            step = ckpt.read(f"optim.{p}.step")
            assert step.shape == () and float(step) == float(truth["__step__"][0])
        for p in FROZEN:  # frozen params keep their true (low-precision) dtype
            got = ckpt.read(p)
            assert got.dtype == lp and same_bits(got, truth[p]), p
            assert specs[p].role == "param"
        assert same_bits(ckpt.read("buf"), truth["buf"]) and specs["buf"].role == "buffer"
        assert ckpt.aliases() == {"head.weight": "emb.weight"}
        assert "head.weight" not in specs
        for key, ref in truth.items():  # DeepSpeed's zero_to_fp32 output, where it can read the checkpoint
            if key.startswith("zero_to_fp32."):
                assert same_bits(ckpt.read(key[len("zero_to_fp32."):]), ref), key
        assert ckpt.step == int(truth["__global_steps__"]) == 3
        objects = ckpt.objects
    groups = objects["optimizer"]["param_groups"]
    assert [g["params"] for g in groups] == [["emb.weight", "l1.weight", "l1.bias"], ["l2.weight", "l2.bias"]]
    if name != "z2_elastic":  # the elastic format does not save the param groups' hyper-parameters
        assert [g["lr"] for g in groups] == truth["__lr__"].tolist()
    assert objects["optimizer"]["class"] == (None if name == "z2_elastic" else "AdamW")
    assert objects["scheduler"]["last_epoch"] == 3 and objects["scheduler"]["base_lrs"][0] == 0.01
    assert objects["client"] == {"epoch": 1, "data_position": 12, "note": "tiny"}
    assert sorted(objects["frozen_params"]) == sorted(FROZEN)
    assert objects["source"]["format"].startswith("deepspeed-")
    with F.open(natives[name]) as ckpt:
        assert ckpt.manifest.topology["dp"] == (1 if name.endswith("_dp1") else 2)
    if name == "z2_fp16":
        assert objects["loss_scaler"]["dynamic"] is True and objects["loss_scaler"]["cur_scale"] > 1


def test_zero_to_fp32_covers_zero123(ds_ckpts):
    for name in MATRIX:
        assert any(k.startswith("zero_to_fp32.") for k in ds_ckpts.truth(name)), name


def test_hf_trainer_layouts_resolve_to_the_same_tag(ds_ckpts):
    root = ds_ckpts.path("z2_fp32")  # run dir holding checkpoint-3/global_step3
    for path in (root, os.path.join(root, "checkpoint-3"), os.path.join(root, "checkpoint-3", "global_step3")):
        with open_convert_source(path) as src:
            assert src.meta.format == "deepspeed-zero2"
            assert src.tag_dir.endswith(os.path.join("checkpoint-3", "global_step3"))


def test_tied_embeddings_export_to_safetensors(ds_ckpts, tmp_path):
    """DeepSpeed's exporter refuses tied weights (deepspeedai/DeepSpeed#8376); stalwart stores them once."""
    out = str(tmp_path / "hf")
    convert(ds_ckpts.path("z2_bf16"), out, to="hf")
    path = os.path.join(out, "model.safetensors")
    with safetensors.safe_open(path, "pt") as f:
        assert f.metadata()["format"] == "pt"
        names = set(f.keys())
    assert "emb.weight" in names and "head.weight" not in names
    net = _net()
    missing, unexpected = safetensors.torch.load_model(net, path)  # re-ties head.weight
    assert not unexpected and set(missing) <= {"head.weight"}
    truth = ds_ckpts.truth("z2_bf16")
    assert same_bits(net.head.weight.detach(), truth["zero_to_fp32.emb.weight"])
    assert net.head.weight is net.emb.weight
    for n in TRAINABLE:
        assert same_bits(safetensors.torch.load_file(path)[n], truth[f"zero_to_fp32.{n}"]), n
    code = (
        "import sys; from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_fp32_state_dict as c;"
        " c(sys.argv[1], sys.argv[2], max_shard_size=None, safe_serialization=True)"
    )
    res = subprocess.run([sys.executable, "-c", code, ds_ckpts.path("z2_bf16"), str(tmp_path / "ds_hf")],
                         capture_output=True, text=True, timeout=300)
    if res.returncode == 0:  # fixed upstream: then both must agree
        ds = safetensors.torch.load_file(str(tmp_path / "ds_hf" / "model.safetensors"))
        assert all(same_bits(ds[n], truth[f"zero_to_fp32.{n}"]) for n in TRAINABLE)
    else:
        assert "share memory" in res.stderr


def test_dtype_cast_and_filters(ds_ckpts, tmp_path):
    out = str(tmp_path / "hf")
    convert(ds_ckpts.path("z3_fp32"), out, to="hf", dtype="bf16", exclude=[r"^frozen\."], rename=[r"^l(\d)\.=layer\1."])
    sd = safetensors.torch.load_file(os.path.join(out, "model.safetensors"))
    truth = ds_ckpts.truth("z3_fp32")
    assert set(sd) == {"buf", "emb.weight", "layer1.weight", "layer1.bias", "layer2.weight", "layer2.bias"}
    assert same_bits(sd["layer1.weight"], truth["l1.weight"].to(torch.bfloat16))
    assert same_bits(sd["buf"], truth["buf"].to(torch.bfloat16))


def test_reads_deepspeeds_own_universal_checkpoints(ds_ucp):
    """ds_to_universal output, ZeRO-1/2 form (dict files, step.pt) and ZeRO-3 form (raw flat files)."""
    for name, ucp in ds_ucp.items():
        truth = ds_ucp.truth(name)
        with open_convert_source(ucp) as src:
            assert src.meta.format == ("ds-universal-zero3" if name.startswith("z3") else "ds-universal")
            for p in TRAINABLE:
                assert same_bits(src.read(p), truth[p]), (name, p)
                for slot in SLOTS:
                    assert same_bits(src.read(f"optim.{p}.{slot}"), truth[f"optim.{p}.{slot}"]), (name, p, slot)
                assert float(src.read(f"optim.{p}.step")) == float(truth["__step__"][0])
            assert src.aliases == {"head.weight": "emb.weight"}
            assert src.meta.step == 3


def test_stalwart_diff_compares_across_formats(ds_ckpts, natives):
    import shutil as _shutil

    stalwart = _shutil.which("stalwart") or os.path.join(os.path.dirname(sys.executable), "stalwart")
    res = subprocess.run([stalwart, "diff", ds_ckpts.path("z3_bf16"), natives["z3_bf16"]], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "deepspeed-zero3" in res.stdout and "0 differ" in res.stdout
