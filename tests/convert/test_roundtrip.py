"""Round trips torch.save <-> native <-> DCP <-> Hugging Face <-> DeepSpeed universal, bitwise.

The model has tied embeddings, BatchNorm (an int64 counter), buffers of many dtypes
(ints, bools, fp16, bf16, fp8, fp64, a 0-d scalar) and two param groups; optimizers
with slots other than Adam's are covered too. Outputs are also loaded with the
tools users would use: torch.load + load_state_dict, torch.distributed.checkpoint.load,
safetensors.torch.load_model.
"""

from __future__ import annotations

import os

import pytest
import safetensors
import safetensors.torch
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

import stalwart.formats as F
from stalwart.formats.convert import convert, open_convert_source

from .conftest import same_bits, tree_bytes

OPTIMIZERS = {
    "adamw_amsgrad": lambda groups: torch.optim.AdamW(groups, lr=0.01, amsgrad=True),
    "sgd_momentum": lambda groups: torch.optim.SGD(groups, lr=0.1, momentum=0.9),
    "rmsprop": lambda groups: torch.optim.RMSprop(groups, lr=0.01, momentum=0.5, centered=True),
    "adagrad": lambda groups: torch.optim.Adagrad(groups, lr=0.1),
}
SLOTS = {
    "adamw_amsgrad": {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"},
    "sgd_momentum": {"momentum_buffer"},
    "rmsprop": {"step", "square_avg", "momentum_buffer", "grad_avg"},
    "adagrad": {"step", "sum"},
}


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.lin = nn.Linear(6, 6)
        self.bn = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("ids", torch.arange(5, dtype=torch.int32) * 7)
        self.register_buffer("mask", torch.tensor([True, False, True, True]))
        self.register_buffer("u8", torch.tensor([0, 128, 255], dtype=torch.uint8))
        self.register_buffer("f16", torch.tensor([[1.5, -2.0], [65504.0, 6e-8]], dtype=torch.float16))
        self.register_buffer("b16", torch.tensor([1.0, -0.0, 3.14], dtype=torch.bfloat16))
        self.register_buffer("f8", torch.tensor([1.0, -2.0, 448.0, 0.0]).to(torch.float8_e4m3fn))
        self.register_buffer("f64", torch.tensor([1e-300, 2.0], dtype=torch.float64))
        self.register_buffer("scalar", torch.tensor(0.25))

    def forward(self, ids):
        h = self.bn(torch.tanh(self.lin(self.emb(ids))))
        return self.head(h)


def build(opt_name: str, seed: int = 0, steps: int = 2):
    torch.manual_seed(seed)
    model = Tiny()
    groups = [
        {"params": [p for n, p in model.named_parameters() if n.startswith(("emb", "lin"))]},
        {"params": [p for n, p in model.named_parameters() if n.startswith("bn")], "weight_decay": 0.0, "lr": 0.05},
    ]
    opt = OPTIMIZERS[opt_name](groups)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
    for i in range(steps):
        ids = torch.randint(0, 11, (8,), generator=torch.Generator().manual_seed(i))
        model(ids).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return model, opt, sched


def save_source(path: str, opt_name: str = "adamw_amsgrad") -> tuple[nn.Module, torch.optim.Optimizer]:
    model, opt, sched = build(opt_name)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict(),
                "step": 2, "epoch": 1}, path)
    return model, opt


def assert_same_tensors(a_path: str, b_path: str, *, weights_only: bool = False) -> None:
    with open_convert_source(a_path) as a, open_convert_source(b_path) as b:
        names = [n for n, t in a.tensors.items() if not (weights_only and t.role == "optimizer_slot")]
        assert sorted(names) == sorted(b.tensors), (sorted(names), sorted(b.tensors))
        for n in names:
            assert same_bits(a.read(n), b.read(n)), n
        assert a.aliases == b.aliases
        if not weights_only:
            assert b.meta.step == a.meta.step
            assert b.meta.optimizer["param_groups"] == a.meta.optimizer["param_groups"]
            assert b.meta.scheduler == a.meta.scheduler
            assert sorted((t.name, t.role, str(t.param), str(t.slot)) for t in a.tensors.values()) == \
                   sorted((t.name, t.role, str(t.param), str(t.slot)) for t in b.tensors.values())


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_every_slot_of_any_optimizer_round_trips(tmp_path, opt_name):
    src = str(tmp_path / "src.pt")
    model, opt = save_source(src, opt_name)
    native = str(tmp_path / "native")
    convert(src, native, to="native")
    with F.open(native) as ckpt:
        slots = {t.slot for t in ckpt.tensors.values() if t.role == "optimizer_slot"}
        assert slots == SLOTS[opt_name]
        names = dict(model.named_parameters())
        for p, state in opt.state.items():
            fqn = next(n for n, q in names.items() if q is p)
            for slot, value in state.items():
                assert same_bits(ckpt.read(f"optim.{fqn}.{slot}"), value), (fqn, slot)
    for to, name in [("dcp", "dcp"), ("torch", "out.pt"), ("ds-universal", "ucp")]:
        out = str(tmp_path / name)
        convert(native, out, to=to)
        back = str(tmp_path / f"{name}.native")
        convert(out, back, to="native")
        assert_same_tensors(native, back)


def test_chain_is_bitwise_and_keeps_state(tmp_path):
    src = str(tmp_path / "src.pt")
    save_source(src)
    a, b, c, d, e = (str(tmp_path / n) for n in ("a", "b_dcp", "c", "d.pt", "e"))
    convert(src, a, to="native")
    convert(a, b, to="dcp")
    convert(b, c, to="native")
    convert(c, d, to="torch")
    convert(d, e, to="native")
    for x in (b, c, d, e):
        assert_same_tensors(a, x)
    with open_convert_source(a) as s:
        assert s.aliases == {"head.weight": "emb.weight"}
        assert s.tensors["bn.num_batches_tracked"].dtype == torch.int64
        assert s.meta.step == 2 and s.meta.client == {"epoch": 1}
    with F.open(e) as ckpt:
        assert ckpt.objects["client"] == {"epoch": 1} and ckpt.step == 2
        assert F.verify(e).ok


def test_hugging_face_round_trip_keeps_ints_bools_and_ties(tmp_path):
    src = str(tmp_path / "src.pt")
    model, _ = save_source(src)
    native, hf, back = str(tmp_path / "n"), str(tmp_path / "hf"), str(tmp_path / "back")
    convert(src, native, to="native")
    convert(native, hf, to="hf", max_shard_size="300B")
    files = sorted(os.listdir(hf))
    assert "model.safetensors.index.json" in files and len([f for f in files if f.endswith(".safetensors")]) > 2
    for f in files:
        if f.endswith(".safetensors"):
            with safetensors.safe_open(os.path.join(hf, f), "pt") as fh:
                assert fh.metadata()["format"] == "pt"
    convert(hf, back, to="native")
    assert_same_tensors(native, back, weights_only=True)
    # a user's loader: every shard through safetensors, into a fresh model, ties restored
    sd = {}
    for f in files:
        if f.endswith(".safetensors"):
            sd.update(safetensors.torch.load_file(os.path.join(hf, f)))
    fresh = Tiny()
    missing, unexpected = fresh.load_state_dict(sd, strict=False)
    assert missing == ["head.weight"] and not unexpected
    for n, t in model.state_dict().items():
        assert same_bits(fresh.state_dict()[n], t), n


def test_torch_output_loads_into_model_and_optimizer(tmp_path):
    src = str(tmp_path / "src.pt")
    model, opt = save_source(src)
    native, out = str(tmp_path / "n"), str(tmp_path / "out.pt")
    convert(src, native, to="native")
    convert(native, out, to="torch")
    ck = torch.load(out, weights_only=True, mmap=True)
    fresh, fresh_opt, _ = build("adamw_amsgrad", seed=1, steps=0)
    fresh.load_state_dict(ck["model"])
    fresh_opt.load_state_dict(ck["optimizer"])
    for (n, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert same_bits(a, b), n
    for pa, pb in zip(model.parameters(), fresh.parameters()):
        for slot in opt.state[pa]:
            assert same_bits(opt.state[pa][slot], fresh_opt.state[pb][slot])
    assert [g["lr"] for g in fresh_opt.param_groups] == [g["lr"] for g in opt.param_groups]
    weights = str(tmp_path / "w.pt")
    convert(native, weights, to="torch", weights_only=True)
    plain = torch.load(weights, weights_only=True)
    assert set(plain) == set(model.state_dict())
    assert plain["head.weight"].data_ptr() == plain["emb.weight"].data_ptr()  # tied: one storage


def test_dcp_output_loads_with_torch_dcp(tmp_path):
    src = str(tmp_path / "src.pt")
    model, opt = save_source(src)
    out = str(tmp_path / "dcp")
    convert(src, out, to="dcp")
    fresh, fresh_opt, _ = build("adamw_amsgrad", seed=3, steps=1)
    msd, osd = get_state_dict(fresh, fresh_opt)
    dcp.load({"model": msd, "optim": osd}, checkpoint_id=out, no_dist=True)
    set_state_dict(fresh, fresh_opt, model_state_dict=msd, optim_state_dict=osd)
    for (n, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert same_bits(a, b), n
    for pa, pb in zip(model.parameters(), fresh.parameters()):
        for slot in opt.state[pa]:
            assert same_bits(opt.state[pa][slot], fresh_opt.state[pb][slot]), slot
    assert fresh_opt.param_groups[1]["lr"] == opt.param_groups[1]["lr"]


def test_reads_torch_dcp_in_every_layout(tmp_path):
    """dcp.save (torch.save entries), its safetensors serialization (which torch's own
    FileSystemReader cannot read back) and the Hugging Face distributed storage layout,
    whose consolidation in torch crashes on integer tensors."""
    from torch.distributed.checkpoint import FileSystemWriter, HuggingFaceStorageWriter
    from torch.distributed.checkpoint.filesystem import SerializationFormat

    sd = {"w": torch.randn(4, 3), "ids": torch.arange(6), "mask": torch.tensor([True, False]),
          "b": torch.randn(5).to(torch.bfloat16)}
    plain, st, hfd = str(tmp_path / "plain"), str(tmp_path / "st"), str(tmp_path / "hfd")
    dcp.save(dict(sd), checkpoint_id=plain, no_dist=True)
    dcp.save(dict(sd), storage_writer=FileSystemWriter(st, serialization_format=SerializationFormat.SAFETENSORS), no_dist=True)
    dcp.save(dict(sd), storage_writer=HuggingFaceStorageWriter(hfd, save_distributed=True), no_dist=True)
    for path in (plain, st, hfd):
        out = str(tmp_path / f"{os.path.basename(path)}.hf")
        convert(path, out, to="hf")
        got = safetensors.torch.load_file(os.path.join(out, "model.safetensors"))
        assert set(got) == set(sd)
        for k, v in sd.items():
            assert same_bits(got[k], v), (path, k)
    from torch.distributed.checkpoint._consolidate_hf_safetensors import consolidate_safetensors_files

    try:
        consolidate_safetensors_files(hfd, str(tmp_path / "torch_out"), fqn_to_index_mapping=dict.fromkeys(sd, 1))
    except TypeError as e:  # torch 2.9-2.13: torch.finfo() on an integer dtype
        assert "finfo" in str(e)


def test_sharded_dcp_is_reassembled(tmp_path):
    """Chunks at offsets (as FSDP/DTensor ranks write them) are put back into place."""
    import pickle

    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    full = torch.arange(5 * 6, dtype=torch.float32).reshape(5, 6)
    pieces = [((0, 0), full[:3]), ((3, 0), full[3:])]
    path = tmp_path / "sharded"
    path.mkdir()
    storage = {}
    chunks = []
    for rank, (offs, t) in enumerate(pieces):
        rel = f"__{rank}_0.distcp"
        with open(path / rel, "wb") as f:
            torch.save(t.clone(), f)
            storage[MetadataIndex("model.w", torch.Size(offs), 0)] = _StorageInfo(rel, 0, f.tell())
        chunks.append(ChunkStorageMetadata(torch.Size(offs), torch.Size(t.shape)))
    md = Metadata({"model.w": TensorStorageMetadata(TensorProperties(dtype=torch.float32), torch.Size([5, 6]), chunks)},
                  planner_data={"model.w": ("model", "w")}, storage_data=storage)
    with open(path / ".metadata", "wb") as f:
        pickle.dump(md, f)
    with open_convert_source(str(path)) as s:
        assert list(s.tensors) == ["w"]
        assert same_bits(s.read("w"), full)


@pytest.mark.parametrize("to", ["native", "hf", "dcp", "ds-universal", "torch"])
def test_output_is_deterministic_whatever_the_workers(tmp_path, to):
    src = str(tmp_path / "src.pt")
    save_source(src)
    suffix = ".pt" if to == "torch" else ""
    a, b = str(tmp_path / f"a{suffix}"), str(tmp_path / f"b{suffix}")
    convert(src, a, to=to, workers=1)
    convert(src, b, to=to, workers=4, buffer_bytes=64)
    assert tree_bytes(a) == tree_bytes(b)


def test_legacy_torch_save_format(tmp_path):
    model, _, _ = build("sgd_momentum")
    src = str(tmp_path / "legacy.pt")
    sd = {k: v for k, v in model.state_dict().items() if k != "f8"}  # the legacy format predates fp8
    torch.save(sd, src, _use_new_zipfile_serialization=False)
    out = str(tmp_path / "n")
    convert(src, out, to="native")
    with F.open(out) as ckpt:
        for n, t in sd.items():
            if n != "head.weight":
                assert same_bits(ckpt.read(n), t), n
        assert ckpt.aliases() == {"head.weight": "emb.weight"}


def test_dry_run_plans_without_writing(tmp_path):
    src = str(tmp_path / "src.pt")
    save_source(src)
    out = str(tmp_path / "hf")
    plan = convert(src, out, to="hf", dry_run=True, dtype="bf16", exclude=["^bn\\."])
    assert not os.path.exists(out)
    names = {t.name: t for t in plan.tensors}
    assert "bn.weight" not in names and "bn.running_mean" in plan.dropped
    assert names["lin.weight"].dtype == torch.bfloat16 and names["ids"].dtype == torch.int32
    assert [f.path for f in plan.files] == ["model.safetensors"]
    assert plan.files[0].nbytes == os.path.getsize(os.path.join(convert(src, out, to="hf", dtype="bf16",
                                                                        exclude=["^bn\\."]).destination,
                                                                "model.safetensors"))


def test_rename_strips_a_prefix_and_keeps_slots_attached(tmp_path):
    model, opt, _ = build("adamw_amsgrad")
    src = str(tmp_path / "src.pt")
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}, "optimizer": opt.state_dict()}, src)
    out = str(tmp_path / "w.pt")
    convert(src, out, to="torch", rename=[r"^module\.="], include=[r"^module\.(lin|emb)\."])
    got = torch.load(out, weights_only=True)
    assert set(got["model"]) == {"lin.weight", "lin.bias", "emb.weight"}
    assert same_bits(got["model"]["lin.weight"], model.lin.weight.detach())
    groups = got["optimizer"]["param_groups"]
    assert [g["param_names"] for g in groups] == [["emb.weight", "lin.weight", "lin.bias"], []]
    assert same_bits(got["optimizer"]["state"][1]["exp_avg"], opt.state[model.lin.weight]["exp_avg"])


def test_sharded_pytorch_model_bin_with_index(tmp_path):
    import json

    model, _, _ = build("sgd_momentum")
    sd = {k: v for k, v in model.state_dict().items() if k != "head.weight"}
    names = list(sd)
    d = tmp_path / "bin"
    d.mkdir()
    shards = [names[: len(names) // 2], names[len(names) // 2 :]]
    wmap = {}
    for i, part in enumerate(shards):
        fname = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        torch.save({k: sd[k] for k in part}, str(d / fname))
        wmap.update(dict.fromkeys(part, fname))
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    out = str(tmp_path / "hf")
    convert(str(d), out, to="hf")
    got = safetensors.torch.load_file(os.path.join(out, "model.safetensors"))
    assert set(got) == set(sd) and all(same_bits(got[k], v) for k, v in sd.items())


def test_client_state_with_namespace_and_numpy(tmp_path):
    import argparse

    import numpy as np

    src = str(tmp_path / "m.pt")
    torch.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=0.1, layers=2), "seed": np.int64(7),
                "hist": np.arange(3)}, src)
    with open_convert_source(src) as s:
        assert s.meta.client["args"] == {"lr": 0.1, "layers": 2} and s.meta.client["seed"] == 7
        assert any("hist" in w for w in s.meta.warnings)  # an array is not JSON: dropped, and said so


def test_universal_optimizer_state_holds_each_groups_step(tmp_path):
    """The ZeRO-3 loader takes the step from optimizer_state.pt, not from step.pt."""
    from stalwart.formats.adapters.safe_load import torch_load

    model, opt, _ = build("adamw_amsgrad")
    for p in opt.param_groups[1]["params"]:
        opt.state[p]["step"] = torch.tensor(5.0)  # groups at different steps tell them apart
    src = str(tmp_path / "src.pt")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 2}, src)
    out = str(tmp_path / "ucp")
    convert(src, out, to="ds-universal", workers=1)  # read buffers are recycled
    osd = torch_load(os.path.join(out, "global_step2_universal", "zero", "optimizer_state.pt"))
    steps = [float(opt.state[g["params"][0]]["step"]) for g in opt.param_groups]
    assert steps == [2.0, 5.0]
    assert [float(osd["optimizer_state_dict"]["state"][i]["step"]) for i in range(2)] == steps
    assert [g["lr"] for g in osd["param_groups"]] == [g["lr"] for g in opt.param_groups]
    assert osd["param_groups"][0]["betas"] == (0.9, 0.999)
