"""Element-wise update rules: their state slots, their per-step scalars, and their
operation sequence as single torch ops.

A rule is the contract between the two places an update can run. The host kernel
(``_host_kernel.c``) and :meth:`UpdateRule.apply` (torch ops, used on the device and as
the CPU reference) perform the same IEEE fp32 operations in the same order, each one
correctly rounded on its own (no fused multiply-add, no ``alpha=``/``addcmul`` that a
backend may fuse), with the same fp32 scalars. So which of them updated a subgroup
never changes a bit of the result. A new element-wise optimizer (SGD with momentum,
Lion, ...) is a new rule here plus its loop in the C source.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from stalwart.offload import native

GSCALE, ADAM_DECOUPLED, ADAM_L2 = 4, 1, 2  # flag bits, as in _host_kernel.c

ADAM_SCALARS = np.dtype([("gscale", "f4"), ("wd", "f4"), ("decay", "f4"), ("b1", "f4"), ("omb1", "f4"), ("b2", "f4"),
                         ("omb2", "f4"), ("inv_bc2_sqrt", "f4"), ("eps", "f4"), ("step_size", "f4"),
                         ("flags", "i4"), ("pad", "i4")])


def f32(x: float) -> float:
    """``x`` rounded to the nearest fp32 value (the value both kernels compute with)."""
    return float(np.float32(x))


class UpdateRule:
    """An element-wise optimizer update. Subclasses define ``slots`` (fp32 state shaped
    like the parameter), ``rule_id`` (the C kernel's), ``scalar_dtype``, :meth:`scalars`
    and :meth:`apply`."""

    rule_id: int
    slots: tuple[str, ...]
    scalar_dtype: np.dtype

    def scalars(self, group: dict, step: int, gscale: float = 1.0) -> np.void:
        raise NotImplementedError

    def apply(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
              states: Sequence[Sequence[torch.Tensor]], rows: Sequence[np.void]) -> None:
        raise NotImplementedError


class AdamRule(UpdateRule):
    """Adam (``decoupled=False``: L2 penalty added to the gradient) and AdamW
    (``decoupled=True``: weights decayed by ``1 - lr * weight_decay``).

    Per element, in this order (every step one rounded fp32 op; scalars are fp32)::

        g = grad * gscale                 (only when gscale != 1)
        g = g + p * wd                    (Adam with weight decay)
        p = p * (1 - lr * wd)             (AdamW with weight decay)
        m = m * b1 + g * (1 - b1)
        v = v * b2 + (g * g) * (1 - b2)
        d = sqrt(v) * (1 / sqrt(1 - b2^t)) + eps
        p = p - (m / d) * (lr / (1 - b1^t))

    This is torch's AdamW formula with ``lerp``, ``addcmul`` and ``addcdiv`` spelled out
    as single ops and the division by ``sqrt(1 - b2^t)`` made a multiplication by its
    fp32 reciprocal; it differs from ``torch.optim.AdamW`` by rounding only.
    """

    rule_id = native.RULE_ADAM
    slots = ("exp_avg", "exp_avg_sq")
    scalar_dtype = ADAM_SCALARS

    def __init__(self, decoupled: bool = True) -> None:
        self.decoupled = decoupled

    def scalars(self, group: dict, step: int, gscale: float = 1.0) -> np.void:
        lr, wd, eps = float(group["lr"]), float(group["weight_decay"]), float(group["eps"])
        b1, b2 = (float(b) for b in group["betas"])
        if group.get("maximize"):
            gscale = -gscale
        flags = GSCALE if f32(gscale) != 1.0 else 0
        if wd != 0.0:
            flags |= ADAM_DECOUPLED if self.decoupled else ADAM_L2
        row = np.zeros((), ADAM_SCALARS)
        row["gscale"], row["wd"], row["decay"] = gscale, wd, 1.0 - lr * wd
        row["b1"], row["omb1"], row["b2"], row["omb2"] = b1, 1.0 - b1, b2, 1.0 - b2
        row["inv_bc2_sqrt"] = 1.0 / math.sqrt(1.0 - b2 ** step)
        row["eps"], row["step_size"] = eps, lr / (1.0 - b1 ** step)
        row["flags"] = flags
        return row

    def apply(self, params, grads, states, rows) -> None:
        """Update ``params`` (fp32, in place) and the two slots in ``states`` with torch
        ops, on whatever device the tensors are. ``rows[i]`` are segment i's scalars."""
        by_flags: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            by_flags.setdefault(int(r["flags"]), []).append(i)
        for flags, idx in by_flags.items():
            p = [params[i] for i in idx]
            m = [states[i][0] for i in idx]
            v = [states[i][1] for i in idx]
            col = {k: [float(rows[i][k]) for i in idx] for k in ADAM_SCALARS.names if k not in ("flags", "pad")}
            g = [grads[i].float() for i in idx]  # a new tensor for bf16/fp16; never written for fp32
            if flags & GSCALE:
                g = torch._foreach_mul(g, col["gscale"])
            if flags & ADAM_L2:
                g = torch._foreach_add(g, torch._foreach_mul(p, col["wd"]))
            if flags & ADAM_DECOUPLED:
                torch._foreach_mul_(p, col["decay"])
            torch._foreach_mul_(m, col["b1"])
            torch._foreach_add_(m, torch._foreach_mul(g, col["omb1"]))
            torch._foreach_mul_(v, col["b2"])
            t = torch._foreach_mul(g, g)
            torch._foreach_mul_(t, col["omb2"])
            torch._foreach_add_(v, t)
            # sqrt through fp64: torch's CPU sqrt is not correctly rounded (SLEEF, 0.5001 ulp);
            # an fp64 sqrt rounded once to fp32 is (53 >= 2 * 24 + 2 bits), on every backend.
            d = [x.double().sqrt_().float() for x in v]
            torch._foreach_mul_(d, col["inv_bc2_sqrt"])
            torch._foreach_add_(d, col["eps"])
            u = torch._foreach_div(m, d)
            torch._foreach_mul_(u, col["step_size"])
            torch._foreach_sub_(p, u)
