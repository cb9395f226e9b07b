"""Split by layout A -> save -> load with layout B == split the original by B, bitwise."""

import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import stalwart.formats as F
from stalwart.formats.layout import Layout, Mesh

from .strategies import DTYPES, layouts, random_tensor, same_bits, tensor_specs

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _check_load(path, tensors, target: Layout):
    for rank in range(target.world_size):
        got = F.load(path, layout=target, rank=rank)
        for name, t in tensors.items():
            expect = target.split(name, t, rank)
            if expect is None:
                assert name not in got
            else:
                assert same_bits(got[name], expect), f"{name} on rank {rank} of {target.mesh}"


@SETTINGS
@given(st.data())
def test_save_with_layout_a_load_with_layout_b(tmp_path_factory, data):
    specs = data.draw(tensor_specs())
    a = data.draw(layouts(specs))
    b = data.draw(layouts(specs))
    tensors = {name: random_tensor(shape, dtype, i) for i, (name, shape, dtype) in enumerate(specs)}
    path = str(tmp_path_factory.mktemp("ckpt") / "c")
    # tiny checksum blocks make the planner's block widening, splitting and merging matter
    F.save(tensors, path, layout=a, block_size=data.draw(st.sampled_from([16, 64, 1024, 65536])))
    _check_load(path, tensors, b)
    whole = F.load(path)
    assert set(whole) == set(tensors)
    assert all(same_bits(whole[n], t) for n, t in tensors.items())


@SETTINGS
@given(st.data())
def test_each_rank_writes_its_own_file_then_commit(tmp_path_factory, data):
    """The multi-writer path: every rank writes only its local shards, a coordinator commits."""
    specs = data.draw(tensor_specs())
    a = data.draw(layouts(specs))
    b = data.draw(layouts(specs))
    tensors = {name: random_tensor(shape, dtype, i) for i, (name, shape, dtype) in enumerate(specs)}
    path = str(tmp_path_factory.mktemp("ckpt"))
    block = data.draw(st.sampled_from([16, 128, 65536]))
    records = []
    for rank in range(a.world_size):
        local = {n: a.split(n, t, rank) for n, t in tensors.items()}
        rec = F.write_rank(
            path, a, rank, {n: v for n, v in local.items() if v is not None}, objects={"rank": rank}, fsync=False, block_size=block
        )
        if rec is not None:
            records.append(rec)
    F.commit(path, a, records, step=3, fsync=False, block_size=block)
    _check_load(path, tensors, b)
    with F.open(path) as ckpt:
        assert ckpt.step == 3
        for rec in records:
            assert ckpt.rank_objects(rec.rank) == {"rank": rec.rank}
    assert F.verify(path).ok


def test_every_dtype_and_odd_shapes_round_trip(tmp_path):
    tensors = {}
    for i, dt in enumerate([*DTYPES, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz, torch.complex128]):
        for shape in [(), (0,), (3, 0, 2), (1,), (5, 3)]:
            tensors[f"{dt}.{len(shape)}.{'x'.join(map(str, shape))}"] = random_tensor(shape, dt, i)
    F.save(tensors, str(tmp_path / "c"))
    back = F.load(str(tmp_path / "c"))
    assert set(back) == set(tensors)
    for n, t in tensors.items():
        assert same_bits(back[n], t), n


def test_nested_state_ties_and_objects(tmp_path):
    emb = torch.randn(13, 10)
    state = {
        "model": {"emb.weight": emb, "head.weight": emb, "norm": torch.ones(10)},
        "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(13, 10)}}, "param_groups": [{"lr": 1e-3, "params": [0]}]},
        "step": 17,
        "name": "run-7",
        "misc": (None, True, float("inf"), b"\x00\xff"),
    }
    F.save(state, str(tmp_path / "c"), objects={"note": "hello"})
    back = F.load(str(tmp_path / "c"))
    assert back["model"]["head.weight"] is back["model"]["emb.weight"], "tied weights come back tied"
    assert torch.equal(back["model"]["emb.weight"], emb)
    assert back["optimizer"]["param_groups"] == [{"lr": 1e-3, "params": [0]}]
    assert list(back["optimizer"]["state"]) == [0]
    assert back["step"] == 17 and back["name"] == "run-7"
    assert back["misc"] == (None, True, float("inf"), b"\x00\xff")
    with F.open(str(tmp_path / "c")) as ckpt:
        assert ckpt.objects == {"note": "hello"}
        assert ckpt.tensors["model.emb.weight"].aliases == ("model.head.weight",)
        # one stored copy only
        assert sorted(ckpt.tensors) == ["model.emb.weight", "model.norm", "optimizer.state.0.exp_avg", "optimizer.state.0.step"]


def test_sparse_column_reads_are_split_not_over_read(tmp_path):
    # TP column slices of a row-major tensor: each row contributes a strided run.
    t = torch.arange(64 * 1024, dtype=torch.float32).view(64, 1024)
    F.save({"w": t}, str(tmp_path / "c"), block_size=256)
    spec = Layout.single({"w": t})
    from stalwart.formats.layout import Shard, Sharded, TensorSpec

    target = Layout(Mesh(("tp",), (4,)), [TensorSpec("w", (64, 1024), t.dtype, Sharded((Shard(1, "tp"),)))])
    with F.open(str(tmp_path / "c")) as ckpt:
        for rank in range(4):
            plan = ckpt.plan(target, rank)
            assert plan.planned_bytes <= 1.05 * plan.needed_bytes
            assert torch.equal(ckpt.execute(plan)["w"], t[:, rank * 256 : (rank + 1) * 256])
    del spec


def test_partial_reads_fetch_only_needed_bytes(tmp_path):
    t = torch.arange(4096 * 512, dtype=torch.float32).view(4096, 512)  # 8 MiB
    F.save({"w": t}, str(tmp_path / "c"))
    with F.open(str(tmp_path / "c")) as ckpt:
        assert torch.equal(ckpt.read("w", (slice(100, 300), slice(None))), t[100:300])
        assert torch.equal(ckpt.read("w", (slice(7, 9), slice(30, 40))), t[7:9, 30:40])
        target = Layout.zero({"w": t}, 4, 3)
        plan = ckpt.plan(target, 2)
        assert plan.planned_bytes <= 1.05 * plan.needed_bytes
        assert torch.equal(ckpt.execute(plan)["w"], t.reshape(-1)[2 * 2**19 : 3 * 2**19])


def test_save_to_root_with_step_updates_latest(tmp_path):
    root = str(tmp_path / "run")
    F.save({"w": torch.zeros(3)}, root, step=1)
    F.save({"w": torch.ones(3)}, root, step=2)
    with open(os.path.join(root, "latest")) as f:
        assert f.read().strip() == "step-00000002"
    assert torch.equal(F.load(root)["w"], torch.ones(3))
    assert torch.equal(F.load(os.path.join(root, "step-00000001"))["w"], torch.zeros(3))
    assert sorted(os.listdir(root)) == ["latest", "step-00000001", "step-00000002"]


def test_mesh_roundtrip_of_replicated_layout_spreads_writes(tmp_path):
    tensors = {f"w{i}": torch.full((4,), float(i)) for i in range(6)}
    layout = Layout.replicated(tensors, Mesh(("dp",), (3,)))
    F.save(tensors, str(tmp_path / "c"), layout=layout)
    with F.open(str(tmp_path / "c")) as ckpt:
        assert len(ckpt.manifest.files) == 3  # replicated tensors are spread over the replicas
    back = F.load(str(tmp_path / "c"))
    assert all(torch.equal(back[n], t) for n, t in tensors.items())
