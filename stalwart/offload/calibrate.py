"""Measures the rates the placement model starts from (they are refitted from measured
step times afterwards): the host kernel's update rate with the threads given, and on
CUDA the host<->device bandwidth each way (from pinned memory allocated like the
optimizer's), the device update rate of the same rule, and free device memory."""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from stalwart.offload import native
from stalwart.offload.hostmem import HostRegion
from stalwart.offload.planner import Calibration
from stalwart.offload.rules import UpdateRule

_GROUP = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}


def cpu_rate(kernel: native.HostKernel, rule: UpdateRule, n: int = 1 << 21, repeats: int = 3) -> float:
    """Elements per second of the host kernel on an fp32 problem of ``n`` elements
    (median of ``repeats`` after one warm-up)."""
    region = HostRegion(4 * n * (2 + len(rule.slots)))
    bufs = [region.view(4 * n * i, n, torch.float32) for i in range(2 + len(rule.slots))]
    segs = np.zeros(1, native.SEG_DTYPE)
    segs[0] = (bufs[0].data_ptr(), bufs[1].data_ptr(), bufs[2].data_ptr(), bufs[3].data_ptr(), 0, n,
               native.F32, native.F32, 0, 0)
    table = np.array([rule.scalars(_GROUP, 1)])
    times = []
    for i in range(repeats + 1):
        t = time.perf_counter()
        kernel.step(rule.rule_id, segs, table)
        if i:
            times.append(time.perf_counter() - t)
    return n / statistics.median(times)


def device_rates(device: torch.device, rule: UpdateRule, nbytes: int = 64 << 20,
                 n: int = 1 << 22) -> tuple[float, float, float]:
    """(h2d bytes/s, d2h bytes/s, device update elements/s), each the median of 3."""
    region = HostRegion(nbytes, pin=True)
    host = region.view(0, nbytes, torch.uint8)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)

    def timed(fn) -> float:
        out = []
        for _ in range(4):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b) / 1e3)
        return statistics.median(out[1:])

    h2d = nbytes / timed(lambda: dev.copy_(host, non_blocking=True))
    d2h = nbytes / timed(lambda: host.copy_(dev, non_blocking=True))
    dev.resize_(0)  # give the scratch back before the update-rate problem is allocated
    p, g, m, v = (torch.rand(n, device=device) for _ in range(4))
    row = rule.scalars(_GROUP, 1)
    gpu = n / timed(lambda: rule.apply([p], [g], [[m, v]], [row]))
    return h2d, d2h, gpu


def device_free(device: torch.device, margin: float = 0.1) -> int:
    """Bytes the update may take on ``device`` now: free memory plus what torch's caching
    allocator holds unused, less ``margin`` of the total."""
    free, total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return max(0, int(free + cached - margin * total))


_measured: dict[tuple, float] = {}  # (threads, rule) -> host rate: measured once per process


def calibrate(kernel: native.HostKernel, rule: UpdateRule, device: torch.device | None = None) -> Calibration:
    """A :class:`Calibration` for this machine (CPU only when ``device`` is None). The host
    kernel's rate is measured once per process and thread count; device rates each time."""
    key = (kernel.threads, type(rule).__name__)
    if key not in _measured:
        _measured[key] = cpu_rate(kernel, rule)
    rate = _measured[key]
    if device is None or device.type != "cuda":
        return Calibration(cpu_rate=rate)
    h2d, d2h, gpu = device_rates(device, rule)
    return Calibration(cpu_rate=rate, h2d_bw=h2d, d2h_bw=d2h, gpu_rate=gpu, free_device=device_free(device))
