"""NUMA topology from fake sysfs trees (1 node; 2 sockets; 2 sockets + 2 CPU-less CXL
nodes), the placement policy on them, and a real mbind on this machine checked in
/proc/self/numa_maps (also for the optimizer's own buffers)."""

from __future__ import annotations

import os

import pytest
import torch

from stalwart.offload import OffloadAdamW
from stalwart.offload.hostmem import HostRegion
from stalwart.offload.numa import (
    PAGE,
    STRIPE,
    BufferUse,
    Extent,
    NumaError,
    NumaPlan,
    Topology,
    mbind,
    numa_maps,
    parse_cpulist,
    plan_placement,
)

GiB = 1 << 30


def fake_sysfs(root, nodes: dict[int, dict]) -> str:
    """A /sys/devices/system/node look-alike: nodeN/{cpulist,meminfo,distance}, optional HMAT bandwidth."""
    base = os.path.join(root, "node")
    os.makedirs(base)
    ids = sorted(nodes)
    for nid, spec in nodes.items():
        d = os.path.join(base, f"node{nid}")
        os.makedirs(d)
        with open(os.path.join(d, "cpulist"), "w") as f:
            f.write(spec.get("cpus", "") + "\n")
        with open(os.path.join(d, "meminfo"), "w") as f:
            f.write(f"Node {nid} MemTotal:       {spec['total'] // 1024} kB\n"
                    f"Node {nid} MemFree:        {spec['free'] // 1024} kB\n"
                    f"Node {nid} MemUsed:        {(spec['total'] - spec['free']) // 1024} kB\n")
        with open(os.path.join(d, "distance"), "w") as f:
            f.write(" ".join(str(spec["dist"][j]) for j in ids) + "\n")
        if "bw" in spec:
            os.makedirs(os.path.join(d, "access0", "initiators"))
            with open(os.path.join(d, "access0", "initiators", "read_bandwidth"), "w") as f:
                f.write(f"{spec['bw']}\n")
    with open(os.path.join(base, "online"), "w") as f:
        f.write(f"0-{max(ids)}\n")
    return base


ONE_NODE = {0: {"cpus": "0-7", "total": 64 * GiB, "free": 60 * GiB, "dist": {0: 10}}}
TWO_SOCKETS = {0: {"cpus": "0-7,16-23", "total": 64 * GiB, "free": 40 * GiB, "dist": {0: 10, 1: 21}},
               1: {"cpus": "8-15,24-31", "total": 64 * GiB, "free": 50 * GiB, "dist": {0: 21, 1: 10}}}
WITH_CXL = {0: {**TWO_SOCKETS[0], "dist": {0: 10, 1: 21, 2: 24, 3: 40}},
            1: {**TWO_SOCKETS[1], "dist": {0: 21, 1: 10, 2: 40, 3: 24}},
            2: {"total": 128 * GiB, "free": 128 * GiB, "dist": {0: 24, 1: 40, 2: 10, 3: 40}, "bw": 40000},
            3: {"total": 128 * GiB, "free": 128 * GiB, "dist": {0: 40, 1: 24, 2: 40, 3: 10}, "bw": 20000}}


def test_parse_cpulist():
    assert parse_cpulist("0-3,8,10-11\n") == (0, 1, 2, 3, 8, 10, 11)
    assert parse_cpulist("\n") == ()


def test_one_node_tree(tmp_path):
    topo = Topology.from_sysfs(fake_sysfs(tmp_path, ONE_NODE))
    assert list(topo.nodes) == [0] and topo.nodes[0].cpus == tuple(range(8))
    assert topo.nodes[0].mem_total == 64 * GiB and topo.nodes[0].mem_free == 60 * GiB
    assert not topo.cpuless_nodes and topo.local_node({3}) == 0
    plan = plan_placement([BufferUse("a", 10 * GiB, 2.0)], topo, local=0)
    assert [(e.name, e.offset, e.length, e.nodes, e.mode) for e in plan.extents] == [("a", 0, 10 * GiB, (0,), "bind")]


def test_two_sockets_local_node_and_degrade_to_local_binding(tmp_path):
    topo = Topology.from_sysfs(fake_sysfs(tmp_path, TWO_SOCKETS))
    assert topo.local_node({9, 10}) == 1 and topo.local_node({0, 1, 2, 9}) == 0
    assert not topo.cpuless_nodes
    # 70 GiB of state, node 1 has 50 free (less a 10 % reserve of 64): no CXL, so what does not
    # fit stays preferred on the local node (no strict bind that would fail), never on the far socket.
    bufs = [BufferUse(f"exp_avg/{i}", 10 * GiB, 2.0) for i in range(7)]
    plan = plan_placement(bufs, topo, local=1)
    budget = 50 * GiB - int(0.1 * 64 * GiB)
    assert plan.budget == budget
    assert {n for e in plan.extents for n in e.nodes} == {1}
    bound = sum(e.length for e in plan.extents if e.mode == "bind")
    assert budget - PAGE < bound <= budget
    assert sum(e.length for e in plan.extents) == 70 * GiB
    assert {e.mode for e in plan.extents} == {"bind", "preferred"}


def test_cxl_nodes_take_the_coldest_by_bandwidth(tmp_path):
    topo = Topology.from_sysfs(fake_sysfs(tmp_path, WITH_CXL))
    assert [n.id for n in topo.cpuless_nodes] == [2, 3]
    assert topo.nodes[2].bandwidth == 40e9 and topo.nodes[3].bandwidth == 20e9
    assert [n.id for n in topo.cxl_for(0)] == [2, 3] and [n.id for n in topo.cxl_for(1)] == [3, 2]
    hot = [BufferUse(f"grad/{i}", 4 * GiB, 3.0) for i in range(2)]  # CPU-updated subgroups: touched most
    warm = [BufferUse(f"exp_avg/{i}", 8 * GiB, 2.0) for i in range(2)]
    cold = [BufferUse(f"exp_avg/{i + 2}", 8 * GiB, 1.0) for i in range(4)]  # GPU-updated: DMA only
    plan = plan_placement(cold + warm + hot, topo, local=0, dram_budget=20 * GiB)
    by_name = {n: plan.for_buffer(n) for n in {e.name for e in plan.extents}}
    for b in hot + warm[:1]:  # 8 + 8 GiB fit in the 20 GiB budget, hottest first
        assert [(e.nodes, e.mode) for e in by_name[b.name]] == [((0,), "bind")]
    split = by_name["exp_avg/1"]  # 4 GiB left in DRAM, the rest to CXL
    assert split[0].nodes == (0,) and split[0].length == 4 * GiB
    assert split[1].mode == "weighted" and split[1].nodes == (2, 3) and split[1].weights == (8, 4)
    for b in cold:
        (ext,) = by_name[b.name]
        assert ext.mode == "weighted" and ext.node_bytes()[2] == pytest.approx(2 * ext.node_bytes()[3], abs=2)  # 40 vs 20 GB/s
    per_node = plan.bytes_by_node()
    assert per_node[0] == 20 * GiB and 0 not in [e.nodes[0] for e in by_name["exp_avg/5"]]
    assert per_node[2] + per_node[3] == pytest.approx(36 * GiB, abs=PAGE)


def test_equal_cxl_bandwidth_interleaves_and_full_nodes_are_skipped(tmp_path):
    spec = {**WITH_CXL, 3: {**WITH_CXL[3], "bw": 40000}}
    topo = Topology.from_sysfs(fake_sysfs(tmp_path, spec))
    plan = plan_placement([BufferUse("v", 10 * GiB, 1.0)], topo, local=0, dram_budget=0)
    assert [(e.nodes, e.mode) for e in plan.extents] == [((2, 3), "interleave")]
    spec = {**spec, 3: {**spec[3], "free": 1 * GiB}}  # node 3 nearly full
    topo = Topology.from_sysfs(fake_sysfs(tmp_path / "b", spec))
    plan = plan_placement([BufferUse("v", 10 * GiB, 1.0)], topo, local=0, dram_budget=0)
    assert [(e.nodes, e.mode) for e in plan.extents] == [((2,), "bind")]


def test_no_numa_directory_is_one_node(tmp_path):
    topo = Topology.from_sysfs(str(tmp_path / "missing"))
    assert list(topo.nodes) == [0] and set(topo.nodes[0].cpus) == os.sched_getaffinity(0)


def _node_pages(line: str) -> dict[int, int]:
    return {int(tok[1:].split("=")[0]): int(tok.split("=")[1]) for tok in line.split() if tok.startswith("N")
            and "=" in tok and tok[1:].split("=")[0].isdigit()}


def test_real_mbind_shows_in_numa_maps():
    """This machine: bind a fresh mapping to node 0 before first touch; the kernel reports
    the policy and every page on node 0."""
    local = Topology.from_sysfs().local_node()
    region = HostRegion(4 << 20, [Extent("x", 0, 4 << 20, (local,))], hugepages=False)
    line = numa_maps(region.addr)
    assert line is not None and f"bind:{local}" in line
    assert _node_pages(line) == {local: (4 << 20) // PAGE} or f"N{local}=" in line  # merged with a neighbour
    region2 = HostRegion(3 * STRIPE, [Extent("y", 0, 3 * STRIPE, (local,), "weighted", (1,))], hugepages=False)
    assert f"bind:{local}" in numa_maps(region2.addr)


def test_mbind_to_a_missing_node_is_a_clear_error():
    region = HostRegion(PAGE, hugepages=False)
    with pytest.raises(NumaError, match=r"mbind\(0x[0-9a-f]+, 4096 bytes, bind \[63\]\) failed"):
        mbind(region.addr, PAGE, (63,))


def test_optimizer_buffers_are_bound():
    model = torch.nn.Linear(512, 512).to(torch.bfloat16)
    opt = OffloadAdamW(model.parameters(), threads=1, subgroup_size=1 << 16)
    local = opt.numa_plan.local
    assert opt.numa_plan.bytes_by_node() == {local: sum(r.nbytes for r in opt.regions.values())}
    for kind, region in opt.regions.items():
        line = numa_maps(region.addr)
        assert line is not None and f"bind:{local}" in line, (kind, line)
    off = OffloadAdamW(model.parameters(), threads=1, numa="off")
    assert off.numa_plan is None and "bind:" not in (numa_maps(off.regions["exp_avg"].addr) or "")


def test_optimizer_numa_policy_can_be_overridden(tmp_path):
    """A dict of policy inputs (here a fake 2-socket tree and no DRAM budget: everything
    preferred on the local node), or a whole NumaPlan of one's own."""
    model = torch.nn.Linear(256, 256)
    opt = OffloadAdamW(model.parameters(), threads=1, numa={"root": fake_sysfs(tmp_path, TWO_SOCKETS), "dram_budget": 0})
    assert opt.numa_plan.local == 0 and {e.mode for e in opt.numa_plan.extents} == {"preferred"}
    assert "prefer:0" in numa_maps(opt.regions["exp_avg"].addr)
    mine = NumaPlan(0, [Extent("exp_avg/0", 0, 256 * 256 * 4, (0,), "interleave")])
    opt = OffloadAdamW(model.parameters(), threads=1, numa=mine, subgroup_size=1 << 20)
    assert opt.numa_plan is mine
    assert "interleave:0" in numa_maps(opt.regions["exp_avg"].addr)


def test_binding_to_nodes_this_machine_lacks_is_an_error_when_asked_for(tmp_path):
    """An explicit policy that puts state on CXL nodes 2 and 3 (absent here) fails clearly;
    "auto" would warn and run unbound instead."""
    model = torch.nn.Linear(256, 256)
    with pytest.raises(NumaError, match=r"mbind\(.*\[2(, 3)?\]\) failed"):
        OffloadAdamW(model.parameters(), threads=1, numa={"root": fake_sysfs(tmp_path, WITH_CXL), "dram_budget": 0})
