"""Optimizer offload: state in host memory the optimizer allocates itself (NUMA/CXL
aware), a native multi-threaded host kernel, and on CUDA a per-subgroup CPU/GPU
placement chosen every step by a calibrated performance model.

    from stalwart.offload import OffloadAdamW
    opt = OffloadAdamW(model.parameters(), lr=3e-4, weight_decay=0.1, threads=8)

See docs/OFFLOAD.md.
"""

from stalwart.offload.native import HostKernel, NativeBuildError
from stalwart.offload.numa import BufferUse, Extent, NumaError, NumaPlan, Topology, plan_placement
from stalwart.offload.optimizer import OffloadAdam, OffloadAdamW, OffloadError, StepStats
from stalwart.offload.planner import Calibration, Plan, Prediction, SubgroupCost
from stalwart.offload.rules import AdamRule, UpdateRule

__all__ = [
    "AdamRule",
    "BufferUse",
    "Calibration",
    "Extent",
    "HostKernel",
    "NativeBuildError",
    "NumaError",
    "NumaPlan",
    "OffloadAdam",
    "OffloadAdamW",
    "OffloadError",
    "Plan",
    "Prediction",
    "StepStats",
    "SubgroupCost",
    "Topology",
    "UpdateRule",
    "plan_placement",
]
