"""Peak memory stays near the largest tensor plus the read-ahead buffer, whatever the checkpoint size."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

MB = 1 << 20
N_TENSORS, TENSOR_MB, BUFFER_MB = 8, 48, 64

# VmHWM is this process image's own peak RSS (ru_maxrss would include the parent's at fork).
CHILD = textwrap.dedent(
    """
    import sys
    import torch
    from stalwart.formats.convert import convert
    import stalwart.formats.adapters

    def hwm():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))

    base = hwm()
    if sys.argv[3] != "none":
        convert(sys.argv[1], sys.argv[2], to=sys.argv[3], buffer_bytes=int(sys.argv[4]), workers=2)
    print(base, hwm())
    """
)


def _peak(src: str, dst: str, to: str) -> int:
    res = subprocess.run([sys.executable, "-c", CHILD, src, dst, to, str(BUFFER_MB * MB)], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    base, peak = (int(x) for x in res.stdout.split()[-2:])
    return peak - base


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("big") / "big.pt")
    n = TENSOR_MB * MB // 4
    torch.save({"model": {f"layer{i}.weight": torch.full((n,), float(i)) for i in range(N_TENSORS)}}, path)
    return path


@pytest.mark.parametrize("to", ["hf", "native", "ds-universal"])
def test_peak_memory_is_bounded(big, tmp_path, to):
    total = N_TENSORS * TENSOR_MB * MB
    extra = _peak(big, str(tmp_path / ("out.pt" if to == "torch" else "out")), to)
    bound = TENSOR_MB * MB + BUFFER_MB * MB + 64 * MB  # largest tensor + read-ahead + slack (writer chunks, allocator)
    assert extra < bound, f"{to}: {extra / MB:.0f} MiB above the import baseline; bound {bound / MB:.0f} MiB"
    assert extra < total / 2, f"{to}: peak grows with the checkpoint ({extra / MB:.0f} MiB for {total / MB:.0f} MiB)"
