"""The placement planner as pure logic: its decisions are the model's optimum (checked by
brute force over every placement) on synthetic calibrations — fast/slow PCIe, few/many CPU
threads, little/much free device memory — and they move the way they should."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest

from stalwart.offload.planner import Calibration, SubgroupCost, _model, plan, predict, refit

MB = 1 << 20
SUB = 16 << 20  # elements per subgroup


def cost(n: int = SUB, model_bytes: int = 2) -> SubgroupCost:
    """A bf16 (or fp32) subgroup: fp32 master + 2 moments move each way, weights go up."""
    state = 12 * n
    return SubgroupCost(n, state, state, model_bytes * n, state)


PCIE = {"fast": 50e9, "slow": 6e9}
CPU = {"few": 0.8e9, "many": 6e9}  # elements/s: 2 threads vs a socket
MEM = {"little": 100 * MB, "some": 450 * MB, "much": 60 << 30}


def calibration(pcie: str, cpu: str, mem: str, resident: int = 0) -> Calibration:
    return Calibration(cpu_rate=CPU[cpu], h2d_bw=PCIE[pcie], d2h_bw=PCIE[pcie] * 0.9, gpu_rate=80e9,
                       free_device=MEM[mem], resident_budget=resident)


def brute_force(costs, cal):
    """The model's best makespan over all 3^k placements (each subgroup its own class, all
    placements evaluated at once by the vectorised model)."""
    places = np.array(list(itertools.product(range(3), repeat=len(costs))))
    counts = [((places[:, k] == 0).astype(int), (places[:, k] == 1).astype(int), (places[:, k] == 2).astype(int))
              for k in range(len(costs))]
    cpu, h2d, gpu, d2h, bad = _model([(c, 1) for c in costs], counts, cal)
    span = np.where(bad, np.inf, np.maximum.reduce([cpu, h2d, gpu, d2h]))
    return float(span.min())


CASES = [(p, c, m, r) for p in PCIE for c in CPU for m in MEM for r in (0, 400 * MB)]


@pytest.mark.parametrize("pcie,cpu,mem,resident", CASES)
def test_plan_is_the_models_optimum(pcie, cpu, mem, resident):
    cal = calibration(pcie, cpu, mem, resident)
    costs = [cost() for _ in range(5)] + [cost(SUB // 3), cost(SUB // 2, model_bytes=4)]  # three classes
    chosen = plan(costs, cal)
    assert chosen.predicted.makespan == pytest.approx(brute_force(costs, cal), rel=1e-12)
    assert predict(costs, chosen.placements, cal).makespan == chosen.predicted.makespan


def test_slow_pcie_and_many_threads_keep_everything_on_the_cpu():
    chosen = plan([cost() for _ in range(8)], calibration("slow", "many", "much"))
    assert chosen.placements == ["cpu"] * 8


def test_fast_pcie_and_few_threads_interleave_cpu_and_gpu():
    chosen = plan([cost() for _ in range(16)], calibration("fast", "few", "much"))
    assert chosen.count("gpu") > chosen.count("cpu") > 0  # both work at once, the GPU takes more
    cpu_only = predict([cost()] * 16, ["cpu"] * 16, chosen.calibration).makespan
    assert chosen.predicted.makespan < cpu_only / 3


def test_more_cpu_threads_move_work_back_to_the_cpu():
    few = plan([cost() for _ in range(16)], calibration("fast", "few", "much"))
    many = plan([cost() for _ in range(16)], calibration("fast", "many", "much"))
    assert many.count("cpu") > few.count("cpu")


def test_little_device_memory_means_no_device_updates():
    chosen = plan([cost() for _ in range(8)], calibration("fast", "few", "little"))
    assert chosen.placements == ["cpu"] * 8


def test_one_scratch_slot_serialises_and_the_plan_knows():
    two_slots = calibration("fast", "few", "some")  # 450 MiB: two 192 MiB slots
    assert two_slots.free_device // cost().device_bytes == 2
    single = Calibration(**{**two_slots.__dict__, "free_device": 200 * MB})
    two = plan([cost() for _ in range(16)], two_slots)
    one = plan([cost() for _ in range(16)], single)
    assert one.predicted.makespan >= two.predicted.makespan
    assert one.count("gpu") <= two.count("gpu")


def test_resident_budget_is_used_and_respected():
    cal = calibration("fast", "few", "much", resident=5 * 12 * SUB)
    chosen = plan([cost() for _ in range(12)], cal)
    assert chosen.count("resident") == 5  # no upload: cheaper than any other device update
    assert sum(c.device_bytes for c, p in zip([cost()] * 12, chosen.placements) if p == "resident") <= cal.resident_budget


def test_resident_set_is_stable_across_steps():
    cal = calibration("fast", "few", "much", resident=3 * 12 * SUB)
    prev = ["cpu"] * 9
    prev[4] = prev[6] = prev[8] = "resident"
    chosen = plan([cost() for _ in range(9)], cal, previous=prev)
    assert [i for i, p in enumerate(chosen.placements) if p == "resident"] == [4, 6, 8]


def test_no_device_all_cpu_and_prediction():
    cal = Calibration(cpu_rate=1e9)
    chosen = plan([cost(1000), cost(3000)], cal)
    assert chosen.placements == ["cpu", "cpu"]
    assert chosen.predicted.makespan == pytest.approx(4000 / 1e9)
    assert chosen.per_subgroup == pytest.approx([1e-6, 3e-6])


def test_refit_moves_rates_toward_measurements():
    cal = Calibration(cpu_rate=1e9, h2d_bw=10e9, d2h_bw=10e9, gpu_rate=50e9)
    new = refit(cal, {"cpu": (2e9, 1.0), "h2d": (20e9, 1.0), "gpu": (0, 0.0)}, weight=0.5)
    assert new.cpu_rate == pytest.approx(1.5e9) and new.h2d_bw == pytest.approx(15e9)
    assert new.gpu_rate == 50e9 and new.d2h_bw == 10e9  # nothing measured: unchanged


def test_planning_hundreds_of_subgroups_is_fast():
    costs = [cost() for _ in range(300)] + [cost(SUB // 7)]
    t = time.perf_counter()
    chosen = plan(costs, calibration("fast", "few", "much", resident=40 * 12 * SUB))
    assert time.perf_counter() - t < 2.0
    assert len(chosen.placements) == 301 and chosen.count("resident") == 40
