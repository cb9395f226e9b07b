"""Bad input: a clear error naming what and where, and nothing left behind."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from stalwart.errors import ConversionError, FormatError, StalwartError
from stalwart.formats.adapters import safe_load
from stalwart.formats.convert import convert, open_convert_source

from .conftest import leftovers


class Evil:
    """Unpickling this would run a shell command."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class Custom:
    pass


def _fails(src: str, dst: str, match: str, exc=FormatError, **kw) -> None:
    with pytest.raises(exc, match=match):
        convert(src, dst, **{"to": "native", **kw})
    assert not os.path.exists(dst), "a failed conversion must leave no output"
    assert leftovers(dst) == []


@pytest.fixture
def copy_ckpt(ds_ckpts, tmp_path):
    def make(name: str) -> str:
        dst = str(tmp_path / name)
        shutil.copytree(ds_ckpts.path(name), dst)
        return dst

    return make


@pytest.mark.deepspeed
def test_truncated_deepspeed_file(copy_ckpt, tmp_path):
    src = copy_ckpt("z2_bf16")
    f = os.path.join(src, "global_step3", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt")
    os.truncate(f, os.path.getsize(f) // 2)
    _fails(src, str(tmp_path / "out"), r"bf16_zero_pp_rank_1_mp_rank_00_optim_states\.pt.*truncated")


@pytest.mark.deepspeed
def test_missing_rank_file(copy_ckpt, tmp_path):
    src = copy_ckpt("z3_fp32")
    os.unlink(os.path.join(src, "global_step3", "zero_pp_rank_1_mp_rank_00_optim_states.pt"))
    _fails(src, str(tmp_path / "out"), r"2 DP ranks.*rank 1 \(zero_pp_rank_1_mp_rank_00_optim_states\.pt\) is missing")


@pytest.mark.deepspeed
def test_mixed_steps(copy_ckpt, tmp_path):
    """Rank 1's optimizer file from step 2 next to rank 0's from step 3."""
    src = copy_ckpt("z2_bf16")
    name = "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shutil.copyfile(os.path.join(src, "global_step2", name), os.path.join(src, "global_step3", name))
    _fails(src, str(tmp_path / "out"), r"mixed steps: group 0 slot 'step' is 3\.0 on rank 0 but 2\.0 on rank 1")


@pytest.mark.deepspeed
def test_mixed_steps_across_zero3_model_files(copy_ckpt, tmp_path):
    src = copy_ckpt("z3_fp32")
    obj = safe_load.torch_load(os.path.join(src, "global_step3", "zero_pp_rank_1_mp_rank_00_model_states.pt"), mmap=False)
    obj["global_steps"] = 7
    torch.save(obj, os.path.join(src, "global_step3", "zero_pp_rank_1_mp_rank_00_model_states.pt"))
    _fails(src, str(tmp_path / "out"), r"mixed steps across model-states files")


def test_pickle_needing_a_class_outside_the_allow_list_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    src = str(tmp_path / "evil.pt")
    torch.save({"model": {"w": torch.ones(2)}, "hook": Evil(str(marker))}, src)
    _fails(src, str(tmp_path / "out"), r"evil\.pt: the pickle needs (posix|os|nt)\.system.*not on stalwart's allow-list")
    assert not marker.exists(), "the payload must never run"
    src2 = str(tmp_path / "custom.pt")
    torch.save({"model": {"w": torch.ones(2)}, "cfg": Custom()}, src2)
    _fails(src2, str(tmp_path / "out2"), r"tests\.convert\.test_bad_input\.Custom")


def test_deepspeed_stand_ins_load_through_torch_weights_only(tmp_path):
    """The same allow-list serves torch.load(weights_only=True): DeepSpeed's names map to stand-ins."""
    src = str(tmp_path / "x.pt")
    scaler = safe_load.LossScaler(cur_scale=128.0, dynamic=True)
    from stalwart.formats.adapters.torch_save import save_small

    save_small({"loss_scaler": scaler, "zero_stage": safe_load.ZeroStageEnum(2), "t": torch.arange(3)}, src)
    with open(src, "rb") as f:
        raw = f.read()
    assert b"deepspeed.runtime.fp16.loss_scaler" in raw and b"stalwart" not in raw  # pickled under DeepSpeed's name
    obj = safe_load.torch_load(src)
    assert isinstance(obj["loss_scaler"], safe_load.LossScaler) and obj["loss_scaler"].cur_scale == 128.0
    assert obj["zero_stage"] == 2 and torch.equal(obj["t"], torch.arange(3))
    with safe_load.open_lazy(src) as lf:
        assert lf.obj["loss_scaler"].dynamic is True and lf.obj["t"].read().tolist() == [0, 1, 2]


def test_truncated_torch_save_file(tmp_path):
    src = str(tmp_path / "m.pt")
    torch.save({"w": torch.randn(1000)}, src)
    os.truncate(src, os.path.getsize(src) - 200)
    _fails(src, str(tmp_path / "out"), r"m\.pt: truncated or not a torch\.save zip file")


def test_truncated_safetensors(tmp_path):
    import safetensors.torch

    d = tmp_path / "hf"
    d.mkdir()
    safetensors.torch.save_file({"w": torch.randn(100)}, str(d / "model.safetensors"))
    os.truncate(d / "model.safetensors", os.path.getsize(d / "model.safetensors") - 8)
    _fails(str(d), str(tmp_path / "out"), r"model\.safetensors is truncated")


def test_failure_mid_stream_leaves_nothing(tmp_path, monkeypatch):
    src = str(tmp_path / "m.pt")
    torch.save({f"w{i}": torch.randn(100) for i in range(10)}, src)
    from stalwart.formats import convert as engine

    real = engine._read_one
    calls = {"n": 0}

    def flaky(s, t, *a):
        calls["n"] += 1
        if calls["n"] == 6:
            raise FormatError("disk gone (injected)")
        return real(s, t, *a)

    monkeypatch.setattr(engine, "_read_one", flaky)
    for to in ("native", "hf", "dcp", "torch", "ds-universal"):
        calls["n"] = 0
        dst = str(tmp_path / f"out_{to}")
        _fails(src, dst, "injected", to=to)


def test_existing_destination_and_overlap(tmp_path):
    src = str(tmp_path / "m.pt")
    torch.save({"w": torch.randn(3)}, src)
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="exists; pass --overwrite"):
        convert(src, str(dst), to="hf")
    assert (dst / "keep.txt").read_text() == "mine"
    convert(src, str(dst), to="hf", overwrite=True)
    assert sorted(os.listdir(dst)) == ["model.safetensors"]
    with pytest.raises(ConversionError, match="overlaps the source"):
        convert(str(dst), str(dst / "inner"), to="native")


def test_unknown_format_says_what_it_found(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "notes.txt").write_text("hello")
    with pytest.raises(FormatError, match=r"not a checkpoint format stalwart reads .*found \['notes\.txt'\]"):
        open_convert_source(str(tmp_path / "src"))


def test_bad_options(tmp_path):
    src = str(tmp_path / "m.pt")
    torch.save({"w": torch.randn(3)}, src)
    for kw, match in [({"to": "onnx"}, "unknown target"), ({"to": "hf", "dtype": "int3"}, "unknown --dtype"),
                      ({"to": "hf", "max_shard_size": "lots"}, "cannot read size"),
                      ({"to": "hf", "rename": ["no-equals"]}, "PATTERN=REPLACEMENT"),
                      ({"to": "hf", "include": ["("]}, "not a valid regex"),
                      ({"to": "hf", "include": ["nothing-matches"]}, "nothing to convert")]:
        with pytest.raises(StalwartError, match=match):
            convert(src, str(tmp_path / "o"), **kw)
        assert not os.path.exists(tmp_path / "o")
