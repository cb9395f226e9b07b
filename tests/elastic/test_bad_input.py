"""Bad input around elastic jobs gets a clear one-line error, before any training is lost:
a node range that cannot keep the global batch, a checkpoint of another model, a second job
on the same keeper."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from stalwart.elastic import ElasticBatchError, ElasticLoader
from stalwart.elastic.provider import check_node_range

from ..ckpt.conftest import WORKERS, kill_tree, no_leftovers, run_group, stalwart_shm_dirs  # noqa: F401

SINGLE = os.path.join(WORKERS, "single_train.py")


def _loader(global_batch: int, micro: int, dp: int) -> ElasticLoader:
    data = torch.utils.data.TensorDataset(torch.arange(240.0))
    return ElasticLoader(data, global_batch, micro, dp_rank=0, dp_size=dp)


def test_node_range_that_cannot_keep_the_global_batch_is_refused():
    # 12 samples per step, 1 per micro-batch: 5 nodes of one rank each cannot split it evenly
    with pytest.raises(ElasticBatchError) as e:
        check_node_range(_loader(12, 1, 4), nodes=4, nnodes="3:5")
    msg = str(e.value)
    assert "\n" not in msg
    assert "--nnodes=3:5" in msg and "global batch 12" in msg and "at 5 node(s)" in msg
    assert "node counts that keep it: 3, 4" in msg
    # two ranks per node, 24 samples of 2 per micro-batch: 1-3 nodes keep it, 4 nodes (8 ranks x 2 > 24 / 2) do not
    with pytest.raises(ElasticBatchError, match="at 4 node"):
        check_node_range(_loader(24, 2, 4), nodes=2, nnodes="1:4")
    check_node_range(_loader(12, 1, 4), nodes=4, nnodes="2:4")  # 2, 3, 4 all divide 12


def test_node_range_comes_from_the_launcher(monkeypatch):
    monkeypatch.setenv("STALWART_NNODES", "4:5")
    with pytest.raises(ElasticBatchError, match="--nnodes=4:5"):
        check_node_range(_loader(12, 1, 4), nodes=4)
    monkeypatch.delenv("STALWART_NNODES")
    check_node_range(_loader(12, 1, 4), nodes=4)  # outside the plugin: nothing to check


def _train(root, *args, timeout=120, env=None):
    return run_group([sys.executable, SINGLE, "--root", str(root), *map(str, args)], timeout,
                     {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.mark.usefixtures("no_leftovers")
def test_checkpoint_of_another_model_is_refused(tmp_path):
    root = tmp_path / "run"
    res = _train(root, "--steps", 3, "--width", 32)
    assert res.returncode == 0, res.stderr[-2000:]
    res = _train(root, "--steps", 3, "--width", 48)
    assert res.returncode != 0
    errors = [ln for ln in res.stderr.splitlines() if "StalwartError" in ln]
    assert errors, res.stderr[-2000:]
    assert "do not fit this model" in errors[-1] and str(root) in errors[-1] and "resume=False" in errors[-1]


@pytest.mark.usefixtures("no_leftovers")
def test_second_job_on_the_same_keeper_is_refused(tmp_path):
    root = tmp_path / "run"
    before = stalwart_shm_dirs()
    first = subprocess.Popen([sys.executable, SINGLE, "--root", str(root), "--steps", "400", "--sleep", "0.1",
                              "--width", "32"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not any(glob.glob(os.path.join(d, "slot-*")) for d in stalwart_shm_dirs() - before):
            assert time.monotonic() < deadline and first.poll() is None, "the first job did not start snapshotting"
            time.sleep(0.2)
        assert first.poll() is None
        res = _train(root, "--steps", 3, "--width", 32)
        assert res.returncode != 0
        errors = [ln for ln in res.stderr.splitlines() if "StalwartError" in ln]
        assert errors, res.stderr[-2000:]
        assert "another job" in errors[-1] and f"pid {first.pid}" in errors[-1]
        assert first.poll() is None, "the first job must go on"
        first.send_signal(signal.SIGKILL)  # the trainer only: its keeper persists and leaves by itself
        first.communicate(timeout=60)
    finally:
        kill_tree(first.pid)
