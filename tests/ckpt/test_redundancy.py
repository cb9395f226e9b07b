"""Redundancy across keepers (issue 5, second half).

Unit level: the placement (one shard of every stripe per node, parity m/k, any m lost
nodes decodable, m+1 not) and the encode / rebuild rounds run by n in-process members
over a queue transport, checked bitwise against a direct codec oracle.

End to end: six keeper processes standing for six nodes (intra-node mode: one data-parallel
rank per "node", STALWART_LOCAL_WORLD_SIZE=1), RS(4, 2) over real gloo groups, a
snapshot every step. A keeper is SIGKILLed mid-run (its node keeps its memory: the
trainer restarts it and the group re-forms); then two nodes are lost at a random moment
(keeper SIGKILL + its shared memory deleted, the job killed): fresh trainers restore
bitwise from memory, the lost nodes' snapshots rebuilt from the survivors. Then three
nodes are lost: the error names them and the restore falls back to the disk tier.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stalwart.ckpt.erasure import ReedSolomon
from stalwart.ckpt.keeper_client import shm_dir_for
from stalwart.ckpt.redundancy import (
    ECConfig,
    Geometry,
    LocalTransport,
    NodeBytes,
    RedundancyError,
    check_topology,
    encode_rounds,
    encode_shared,
    plan_rebuild,
    rebuild_rounds,
)
from stalwart.formats.atomic import read_latest

from .conftest import WORKERS, free_port, kill_keepers, stalwart_shm_dirs

EC_TRAIN = os.path.join(WORKERS, "ec_train.py")
PROPERTY = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ============================================================================ placement


def _geometry(k: int, m: int, lens: list[list[int]]) -> Geometry:
    return Geometry(k, m, tuple(tuple((10 * p + i, f"f{p}-{i}", n) for i, n in enumerate(ls)) for p, ls in enumerate(lens)))


def test_every_node_holds_one_shard_of_every_stripe_and_parity_is_m_over_k():
    k, m = 4, 2
    geo = _geometry(k, m, [[4096 * k]] * (k + m))
    for j in range(geo.n):
        holders = [geo.holder(j, s) for s in range(geo.n)]
        assert sorted(holders) == list(range(geo.n)), f"stripe {j}: a node holds two shards"
        for s, p in enumerate(holders):
            assert geo.shard_of(p, j) == s
    for p in range(geo.n):
        assert geo.parity_bytes(p) == m * geo.block(p) == geo.length(p) * m // k  # m/k of its data
        assert sorted(j for _, j, _ in geo.parity_slots(p)) == sorted((p - k - u) % geo.n for u in range(m))


def test_unequal_nodes_pay_parity_only_for_the_bytes_that_exist():
    # DDP: rank 0 writes the replicated state, the others only their RNG rows
    k, m = 4, 2
    geo = _geometry(k, m, [[1 << 20], [100], [100], [100], [100], [100]])
    total = sum(geo.parity_bytes(p) for p in range(geo.n))
    assert total <= m * (1 << 20) + geo.n * m * 64 * 2, "padding every node to the largest would cost n*m/k"
    assert total < geo.n * m * geo.block(0)


@pytest.mark.parametrize("k,m", [(4, 2), (2, 1), (3, 3), (1, 2)])
def test_any_m_lost_nodes_decode_and_more_do_not(k, m):
    geo = _geometry(k, m, [[1000 + 37 * p] for p in range(k + m)])
    everyone = range(geo.n)
    for lost in itertools.chain.from_iterable(itertools.combinations(everyone, r) for r in range(m + 1)):
        plan = plan_rebuild(geo, lost, [p for p in everyone if p not in lost])
        for j, sp in plan.stripes.items():
            assert len(sp.chosen) == k and sp.decoder not in lost
            assert all(geo.holder(j, s) not in lost for s in sp.chosen)
    for lost in itertools.combinations(everyone, m + 1):
        with pytest.raises(RedundancyError, match=r"keeps .* of the .* shards it needs"):
            plan_rebuild(geo, lost, [p for p in everyone if p not in lost])


def test_missing_parity_counts_as_lost():
    geo = _geometry(4, 2, [[5000]] * 6)
    plan_rebuild(geo, [1, 2], [0, 3, 4, 5])
    with pytest.raises(RedundancyError, match="stripe"):
        plan_rebuild(geo, [1, 2], [0, 3])  # two survivors lost their parity too


def test_topology_and_config_errors_are_clear():
    check_topology(4, 2, 12)
    with pytest.raises(RedundancyError, match=r"groups of k\+m=6 .* 4 node\(s\).*STALWART_LOCAL_WORLD_SIZE=1"):
        check_topology(4, 2, 4)
    with pytest.raises(RedundancyError, match="7 % 6"):
        check_topology(4, 2, 7)
    assert ECConfig.coerce((4, 2)).overhead == 0.5
    assert ECConfig.coerce("2,1", max_parity_memory=10).max_parity_memory == 10
    with pytest.raises(RedundancyError):
        ECConfig.coerce((0, 2))


# ============================================================================ the rounds, in process


def _run_members(fns) -> None:
    errors: list[BaseException] = []

    def wrap(fn):
        try:
            fn()
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=wrap, args=(fn,)) for fn in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors


def _oracle_parity(geo: Geometry, datas, rs: ReedSolomon, j: int) -> list[torch.Tensor]:
    size = geo.stripe(j)
    shards = []
    for t in range(geo.k):
        q = geo.holder(j, t)
        whole = torch.cat(datas[q]) if datas[q] else torch.zeros(0, dtype=torch.uint8)
        b = torch.zeros(size, dtype=torch.uint8)
        n = geo.present(q, t)
        b[:n] = whole[t * geo.block(q) : t * geo.block(q) + n]
        shards.append(b)
    return [torch.as_tensor(p) for p in rs.encode(shards)] if size else [torch.zeros(0, dtype=torch.uint8)] * geo.m


@PROPERTY
@given(
    k=st.integers(1, 5), m=st.integers(1, 3), seed=st.integers(0, 2**16),
    chunk=st.sampled_from([64, 192, 4096]), data=st.data(),
)
def test_encode_and_rebuild_rounds_are_bitwise(k, m, seed, chunk, data):
    n = k + m
    sizes = st.lists(st.sampled_from([0, 1, 63, 64, 65, 1000, 4099, 20000]), max_size=3)
    lens = [data.draw(sizes) for _ in range(n)]
    lost = data.draw(st.lists(st.integers(0, n - 1), max_size=m, unique=True))
    geo = _geometry(k, m, lens)
    g = torch.Generator().manual_seed(seed)
    datas = [[torch.randint(0, 256, (size,), dtype=torch.uint8, generator=g) for size in ls] for ls in lens]
    rs = ReedSolomon(k, m)
    parity = [torch.full((geo.parity_bytes(p),), 7, dtype=torch.uint8) for p in range(n)]
    nets = LocalTransport.group(n)
    _run_members([lambda p=p: encode_rounds(geo, p, NodeBytes(datas[p]), parity[p], nets[p], rs, chunk) for p in range(n)])
    for p in range(n):  # every parity block against the codec applied to the padded stripe
        for u, j, off in geo.parity_slots(p):
            want = _oracle_parity(geo, datas, rs, j)[u]
            assert torch.equal(parity[p][off : off + geo.stripe(j)], want), (p, u, j)
    for p in range(n):  # intra-host: the same parity computed from the members' data read in place
        shared = torch.full((geo.parity_bytes(p),), 9, dtype=torch.uint8)
        encode_shared(geo, p, [NodeBytes(d) for d in datas], shared, rs, chunk)
        assert torch.equal(shared, parity[p]), f"member {p}: shared-memory parity differs from the network rounds'"
    rebuilt = [[torch.zeros_like(t) for t in ts] for ts in datas]
    plan = plan_rebuild(geo, lost, [p for p in range(n) if p not in lost])
    nets = LocalTransport.group(n)
    _run_members([
        lambda p=p: rebuild_rounds(geo, plan, p, NodeBytes(rebuilt[p] if p in lost else datas[p]),
                                   None if p in lost else parity[p], nets[p], rs, chunk)
        for p in range(n)
    ])
    for p in lost:
        for want, got in zip(datas[p], rebuilt[p], strict=True):
            assert torch.equal(want, got), f"member {p} not rebuilt bitwise"


def test_node_bytes_span_file_boundaries():
    parts = [torch.arange(10, dtype=torch.uint8), torch.arange(10, 15, dtype=torch.uint8), torch.arange(100, 120, dtype=torch.uint8)]
    nb = NodeBytes(parts)
    whole = torch.cat(parts)
    scratch = torch.empty(64, dtype=torch.uint8)
    for off, n in [(0, 35), (8, 4), (9, 7), (14, 1), (15, 20), (3, 0)]:
        assert torch.equal(nb.read(off, n, scratch), whole[off : off + n])
    out = [torch.zeros_like(p) for p in parts]
    dst = NodeBytes(out)
    dst.write(7, whole[7:30])
    assert torch.equal(torch.cat(out)[7:30], whole[7:30]) and not torch.cat(out)[:7].any()


# ============================================================================ end to end

NODES, K, M = 6, 4, 2
SEED = int(os.environ.get("STALWART_TEST_SEED", "20"))


class Job:
    """One torchrun launch of the EC training worker (6 ranks = 6 nodes)."""

    def __init__(self, root, out, port: int, steps: int, sleep: float = 0.05, k: int = K, m: int = M,
                 extra: tuple[str, ...] = ()) -> None:
        self.out = str(out)
        self.nodes = k + m
        tiers = json.dumps(["memory", {"url": f"local:{root}/disk", "every": 4}])
        cmd = [
            sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={self.nodes}", "--max-restarts=0",
            "--monitor-interval=0.1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--nnodes=1",
            EC_TRAIN, "--root", str(root), "--out", self.out, "--tiers", tiers, "--ec", f"{k},{m}",
            "--steps", str(steps), "--sleep", str(sleep), "--linger", "40", "--rebuild-wait", "120", *extra,
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "STALWART_LOCAL_WORLD_SIZE": "1",
               "STALWART_KEEPER_GROUP": f"127.0.0.1:{port}", "STALWART_KEEPER_DEAD_AFTER_S": "3"}
        self.log = open(os.path.join(os.path.dirname(self.out), os.path.basename(self.out) + ".txt"), "w")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def kill(self) -> None:
        # torchrun starts its workers in their own sessions: killing its group leaves them
        for rank in range(self.nodes):
            try:
                with open(os.path.join(self.out, f"pid-rank{rank}")) as f:
                    os.kill(int(f.read()), signal.SIGKILL)
            except (FileNotFoundError, ValueError, ProcessLookupError):
                pass
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.log.close()

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill()

    def tail(self) -> str:
        with open(self.log.name) as f:
            return "".join(line for line in f.readlines() if not line.startswith("[W"))[-4000:]

    def read(self, name: str) -> dict | None:
        try:
            with open(os.path.join(self.out, name)) as f:
                return json.load(f)
        except (FileNotFoundError, ValueError):
            return None

    def wait_for(self, what: str, pred, timeout: float = 180):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = pred()
            if got:
                return got
            if self.proc.poll() is not None:
                raise AssertionError(f"the job exited ({self.proc.returncode}) before {what}:\n{self.tail()}")
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}:\n{self.tail()}")

    def progress(self, pred, what: str, timeout: float = 180) -> dict:
        return self.wait_for(what, lambda: (p := self.read("progress.json")) and pred(p) and p, timeout)

    def restored(self, timeout: float = 240) -> list[dict]:
        return self.wait_for("every rank restored", lambda: all(
            self.read(f"restored-rank{r}.json") for r in range(NODES)) and [self.read(f"restored-rank{r}.json") for r in range(NODES)], timeout)

    def digests(self, rank: int) -> dict[int, str]:
        with open(os.path.join(self.out, f"rank{rank}.log")) as f:
            return {int(s): d for s, d in (line.split() for line in f if line.strip())}


def _lose_nodes(job: Job, dirs: list[str], victims: list[int]) -> None:
    """Node loss: the keepers die with the job, and the nodes' memory is gone."""
    kill_keepers([dirs[v] for v in victims], remove=False)
    job.kill()
    kill_keepers([dirs[v] for v in victims], remove=True)


def test_lost_nodes_rebuilt_from_survivors_then_more_than_m_falls_back_to_disk(tmp_path, no_leftovers):
    rnd = random.Random(SEED)
    port = free_port()
    root = str(tmp_path / "root")
    dirs = [shm_dir_for(root, node) for node in range(NODES)]
    jobs: list[Job] = []
    try:
        # ---- run 1: a keeper crash mid-run (memory kept), then m=2 nodes lost
        job1 = Job(root, tmp_path / "out1", port, steps=600, extra=("--no-shared",))  # coded over gloo
        jobs.append(job1)
        job1.progress(lambda q: (q["protected"] or 0) >= 3, "the first EC-protected steps")
        time.sleep(rnd.uniform(0, 1.0))
        crashed = rnd.randrange(NODES)
        kill_keepers([dirs[crashed]], remove=False)  # its trainer starts a new keeper, which adopts the memory
        at = job1.read("progress.json")["step"]
        job1.progress(lambda q: (q["protected"] or 0) >= at + 3, f"protection after node {crashed}'s keeper crashed")
        time.sleep(rnd.uniform(0, 1.5))
        victims = sorted(rnd.sample(range(NODES), M))
        protected_before = job1.read("progress.json")["protected"]
        assert job1.read("progress.json")["mode"] == "gloo"
        _lose_nodes(job1, dirs, victims)
        log1 = [job1.digests(r) for r in range(NODES)]

        # ---- run 2: fresh trainers; the lost nodes' snapshots are rebuilt from the survivors
        job2 = Job(root, tmp_path / "out2", port, steps=600)
        jobs.append(job2)
        restored = job2.restored()
        start = restored[0]["start"]
        for rank, r in enumerate(restored):
            assert r["stats"]["restored_from"] == "memory", (rank, r["stats"]["fallbacks"], job2.tail())
            assert r["start"] == start >= protected_before, (rank, r["start"], protected_before)
            assert r["digest"] == log1[rank][start], f"rank {rank}: restored state differs from step {start}"
        for v in victims:
            assert start in restored[v]["stats"]["redundancy"]["rebuilt"], restored[v]["stats"]["redundancy"]
        job2.progress(lambda q: q["step"] >= start + 8 and (q["protected"] or 0) >= start + 4, "protection in run 2")
        time.sleep(rnd.uniform(0, 1.5))
        victims2 = sorted(rnd.sample(range(NODES), M + 1))
        _lose_nodes(job2, dirs, victims2)
        log2 = [job2.digests(r) for r in range(NODES)]
        for rank in range(NODES):  # the resumed run continued bitwise
            common = set(log1[rank]) & set(log2[rank])
            assert common or max(log1[rank]) == start, (rank, start, max(log1[rank]))  # run 1 died at the restored step
            assert all(log1[rank][s] == log2[rank][s] for s in common), rank
        disk = int(read_latest(os.path.join(root, "disk")).split("-")[1])

        # ---- run 3: more than m lost -> a clear error, restore from disk
        job3 = Job(root, tmp_path / "out3", port, steps=disk + 3)
        jobs.append(job3)
        assert job3.wait(240) == 0, job3.tail()
        restored = [job3.read(f"restored-rank{r}.json") for r in range(NODES)]
        names = ", ".join(map(str, victims2))
        why = " ".join(f for r in restored for f in r["stats"]["fallbacks"])
        assert f"nodes {names}" in why and f"lost (more than m={M}); cannot rebuild from memory" in why, why
        for rank, r in enumerate(restored):
            assert r["stats"]["restored_from"].startswith("local:"), (rank, r["stats"])
            assert r["start"] == disk
            ref = log2[rank] if disk in log2[rank] else log1[rank]
            assert r["digest"] == ref[disk], f"rank {rank}: state restored from disk differs from step {disk}"
            assert job3.read(f"result-rank{rank}.json")["step"] == disk + 3
    finally:
        for job in jobs:
            job.kill()
        kill_keepers(stalwart_shm_dirs())


def _final_ec_status(job: Job, timeout: float = 240) -> dict:
    assert job.wait(timeout) == 0, job.tail()
    result = job.read("result-rank0.json")
    assert result is not None, job.tail()
    return result["stats"]["redundancy"]


def test_parity_memory_is_reported_and_capped(tmp_path, no_leftovers):
    """RS(2, 1) over three nodes: the parity held is reported as m/k of the data; a cap
    that fits one step's parity keeps exactly one step protected; a cap below one step's
    parity protects nothing and says why."""
    k, m = 2, 1
    dirs = [shm_dir_for(str(tmp_path / name), node) for name in ("free", "one", "none") for node in range(k + m)]
    try:
        free = _final_ec_status(Job(tmp_path / "free", tmp_path / "out-free", free_port(), steps=40, sleep=0.1, k=k, m=m))
        assert free["overhead"] == m / k and free["k"] == k and free["m"] == m
        assert free["mode"] == "shared-memory", free  # one machine: peers' snapshots read in place
        protected = free["protected"]
        assert protected and free["parity_bytes"] > 0, free
        assert abs(free["parity_per_data_byte"] - m / k) < 0.05, free  # balanced nodes pay m/k, plus alignment
        per_step = free["parity_bytes"] // len(protected)
        assert free["parity_reused"] > 0, free  # a slot's next step codes into its set-aside parity file

        cap = per_step + per_step // 2  # one step's parity fits, two do not
        one = _final_ec_status(Job(tmp_path / "one", tmp_path / "out-one", free_port(), steps=40, sleep=0.1, k=k, m=m,
                                   extra=("--max-parity-memory", str(cap))))
        assert one["max_parity_memory"] == cap
        # never two steps' parity; older parity is dropped to protect newer steps (so while the
        # newest is being coded, none may be protected: the price of a cap that fits one)
        assert one["parity_bytes"] + one["spare_parity_bytes"] <= cap and len(one["protected"]) <= 1, one
        assert one["encoded"] >= 2, one

        none = _final_ec_status(Job(tmp_path / "none", tmp_path / "out-none", free_port(), steps=20, sleep=0.1, k=k, m=m,
                                    extra=("--max-parity-memory", "1")))
        assert none["parity_bytes"] == 0 and not none["protected"] and none["skipped"] > 0, none
        assert "exceeds max_parity_memory (1 bytes)" in (none["last_skip"] or ""), none
    finally:
        kill_keepers(dirs)


def test_a_step_some_members_still_commit_is_not_reported_as_lost_alarmingly(caplog):
    """A group formed while training runs sees a step only the fastest member committed: the
    others hold snapshots (they are behind), so the report is said at info level; a member
    with an empty memory (a replacement keeper) has lost it: error level."""
    import logging

    from stalwart.ckpt.redundancy.agent import Redundancy, Session
    from stalwart.ckpt.redundancy.config import ECConfig

    agent = Redundancy.__new__(Redundancy)
    agent.cfg, agent.members = ECConfig(k=3, m=1), [0, 1, 2, 3]

    def slot(step):
        return {"step": step, "sid": f"s{step}", "parity": False, "geometry": None, "holders": [0, 1, 2, 3]}

    behind = Session("p", 1, {}, [{"slots": [slot(2), slot(3)]}] + [{"slots": [slot(2)]}] * 3, None, None)
    task = agent._recovery_task(behind)
    assert task["plan"] == "report" and task["behind"] and "step 3" in task["error"], task
    empty = Session("p", 2, {}, [{"slots": [slot(2), slot(3)]}, {"slots": []}] + [{"slots": [slot(2)]}] * 2, None, None)
    assert not agent._recovery_task(empty)["behind"]
    agent.recovery_error, agent.settled, agent.state = None, False, "idle"
    with caplog.at_level(logging.INFO, logger="stalwart"):
        agent._recover(behind, task)
    assert agent.recovery_error == task["error"]
    assert [r.levelname for r in caplog.records if "step 3" in r.getMessage()] == ["INFO"]
