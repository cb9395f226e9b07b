"""Hugging Face Trainer checkpoints and Accelerate save_state directories, made by the real
libraries (tiny models built from configs, no download), read whole: every optimizer slot
by param name, scheduler, RNG, step; and never a silent drop."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import stalwart.formats as F
from stalwart.cli import main
from stalwart.errors import ConversionError
from stalwart.formats.convert import convert

from .conftest import same_bits

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts", "hf_train.py")
STALWART = shutil.which("stalwart") or os.path.join(os.path.dirname(sys.executable), "stalwart")


@pytest.fixture(scope="session")
def hf_runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("hf_runs"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    res = subprocess.run([sys.executable, SCRIPT, root], capture_output=True, text=True, timeout=600, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"hf_train.py failed:\n{res.stderr[-3000:]}")
    truth = torch.load(os.path.join(root, "truth.pt"), weights_only=True)
    return root, truth


def run(*args):
    return subprocess.run([STALWART, *args], capture_output=True, text=True, timeout=300)


def run_here(capsys, *args) -> tuple[int, str]:
    """The command in this process: paths that import transformers pay for it once per session."""
    capsys.readouterr()
    rc = main(list(args))
    return rc, capsys.readouterr().out


def check_slots(ckpt: str, truth: dict) -> None:
    state = F.load(ckpt)
    slots = {k: v for k, v in state.items() if k.startswith("optim.")}
    want = {f"optim.{n}.{s}": t for n, st in truth["slots"].items() for s, t in st.items()}
    assert sorted(slots) == sorted(want)
    for k, t in want.items():
        assert same_bits(slots[k], t), k
    for n, w in truth["weights"].items():
        assert same_bits(state[n], w), n


def test_trainer_checkpoint_read_whole(hf_runs, tmp_path):
    root, truth = hf_runs
    ck = os.path.join(root, "trainer", "checkpoint-3")
    dst = str(tmp_path / "native")
    result = convert(ck, dst, to="native")
    assert result.plan.source_format == "hf-trainer"
    check_slots(dst, truth["trainer"])
    with F.open(dst) as c:
        objects = c.objects
        assert c.step == 3
    groups = objects["optimizer"]["param_groups"]
    assert [len(g["params"]) for g in groups] == truth["trainer"]["groups"]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert all("bias" not in p and "norm" not in p for p in groups[0]["params"])
    sched = truth["trainer"]["scheduler"]
    assert objects["scheduler"]["last_epoch"] == sched["last_epoch"] and objects["scheduler"]["_last_lr"] == sched["_last_lr"]
    assert objects["trainer_state"]["global_step"] == 3
    assert objects["hf_config"]["model_type"] == "llama"
    rng = objects["rng"]["rank0"]
    assert {"python", "numpy", "cpu"} <= set(rng)
    # nothing dropped silently: the one file not read is named
    assert result.plan.not_read == ["training_args.bin"]
    assert any("training_args.bin" in w for w in result.plan.warnings)
    assert any("Trainer's weight-decay groups" in w for w in result.plan.warnings)


def test_accelerate_without_param_order_fails_loudly(hf_runs, tmp_path):
    root, _ = hf_runs
    acc = os.path.join(root, "accelerate")
    dst = str(tmp_path / "native")
    with pytest.raises(ConversionError, match=r"optimizer\.bin.*21 params.*--param-order.*--weights-only"):
        convert(acc, dst, to="native")
    assert not os.path.exists(dst)
    res = run("convert", acc, dst, "--to", "native")
    assert res.returncode == 2 and "optimizer.bin" in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    # asked for explicitly, the weights alone convert; inspect says what is not read
    assert convert(acc, dst, to="native", weights_only=True).plan.tensors
    out = run("inspect", acc).stdout
    assert "optimizer.bin" in out and "NOT read" in out


@pytest.mark.parametrize("order", ["param_order.txt", "config"])
def test_accelerate_read_whole_with_param_order(hf_runs, tmp_path, order, capsys):
    root, truth = hf_runs
    acc = os.path.join(root, "accelerate")
    spec = os.path.join(root, order) if order != "config" else os.path.join(root, "trainer", "checkpoint-3", "config.json")
    dst = str(tmp_path / "native")
    if order == "config":
        rc, _ = run_here(capsys, "convert", acc, dst, "--to", "native", "--param-order", spec)
    else:  # as users run it
        res = run("convert", acc, dst, "--to", "native", "--param-order", spec)
        rc = res.returncode
    assert rc == 0
    check_slots(dst, truth["accelerate"])
    with F.open(dst) as c:
        objects, step = c.objects, c.step
    # the step Accelerate records in random_states_0.pkl (our own file: full unpickling is fine here)
    assert step == torch.load(os.path.join(acc, "random_states_0.pkl"), weights_only=False)["step"]
    assert objects["scheduler"]["last_epoch"] == truth["accelerate"]["scheduler"]["last_epoch"]
    rng = objects["rng"]["rank0"]
    assert rng["random_state"][1] == truth["accelerate"]["python_rng"]
    assert rng["numpy_random_seed"][1] == truth["accelerate"]["numpy_rng"]
    raw = base64.b64decode(rng["torch_manual_seed"]["base64"])
    assert raw == bytes(truth["accelerate"]["torch_rng"].numpy().tobytes())


def test_wrong_param_order_is_refused(hf_runs, tmp_path):
    root, _ = hf_runs
    with open(os.path.join(root, "param_order.txt")) as f:
        names = f.read().split()
    bad = tmp_path / "order.txt"
    bad.write_text("\n".join(reversed(names)))
    res = run("convert", os.path.join(root, "accelerate"), str(tmp_path / "o"), "--to", "native", "--param-order", str(bad))
    assert res.returncode == 2 and "shape" in res.stderr, res.stderr
    assert not os.path.exists(tmp_path / "o")


def test_trainer_to_hf_says_what_the_format_cannot_hold(hf_runs, tmp_path, capsys):
    root, _ = hf_runs
    rc, out = run_here(capsys, "convert", os.path.join(root, "trainer", "checkpoint-2"), str(tmp_path / "hf"), "--to", "hf")
    assert rc == 0
    assert "optimizer state, scheduler, RNG state not written" in out
    assert "training_args.bin" in out


def test_inspect_and_verify_training_dirs(hf_runs, capsys):
    root, _ = hf_runs
    ck = os.path.join(root, "trainer", "checkpoint-3")
    rc, out = run_here(capsys, "inspect", ck, "--json")
    info = json.loads(out)
    assert rc == 0 and info["format"] == "hf-trainer" and info["step"] == 3
    assert info["optimizer"]["class"] == "AdamW" and len(info["optimizer"]["param_groups"]) == 2
    assert info["not_read"] == ["training_args.bin"]
    rc, out = run_here(capsys, "verify", ck)
    assert rc == 0 and "checksums match" in out, out
