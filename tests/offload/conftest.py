"""Offload tests: the host kernel builds once per machine into the repo's .cache (or
$STALWART_OFFLOAD_CACHE); torch runs single-threaded (tiny models, a shared 2-core box)."""

from __future__ import annotations

import os

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("STALWART_OFFLOAD_CACHE", os.path.join(REPO, ".cache", "offload"))


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
