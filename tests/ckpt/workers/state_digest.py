"""The digest the worker scripts log after every step, to compare runs bitwise."""

from __future__ import annotations

import hashlib

import torch


def digest(model: torch.nn.Module, opt: torch.optim.Optimizer) -> str:
    """sha1 over every param and its optimizer slots, in parameter order."""
    h = hashlib.sha1()
    for p in model.parameters():
        h.update(p.detach().reshape(-1).view(torch.uint8).numpy().tobytes())
        for k in sorted(opt.state.get(p, {})):
            v = opt.state[p][k]
            if isinstance(v, torch.Tensor):
                h.update(k.encode() + v.detach().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
