"""Host buffers the optimizer allocates itself: exact-size anonymous mappings, NUMA
policy set with ``mbind`` before the first touch, then touched (so every page lands
where the policy says) and, when CUDA is present, registered as pinned memory.

Not torch's pinned caching allocator: that one rounds every block up to a power of two
(a 20 GiB request takes 32 GiB) and reuses blocks whatever node they are on.
"""

from __future__ import annotations

import contextlib
import mmap
import weakref

import torch

from stalwart.offload.numa import PAGE, Extent, NumaError, apply_extent


class PinError(NumaError):
    """The host buffer could not be registered with CUDA (pinned)."""


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def _unregister(addr: int) -> None:
    with contextlib.suppress(Exception):  # at interpreter exit CUDA may be gone already
        torch.cuda.cudart().cudaHostUnregister(addr)


class HostRegion:
    """``nbytes`` of host memory (rounded up to a page) as a uint8 tensor ``self.bytes``.

    ``extents`` (offsets relative to this region) are bound with ``mbind`` before the
    memory is first written. ``pin`` registers the region with CUDA (unregistered when
    this object is collected; views that outlive it keep the memory, unpinned).
    ``hugepages`` asks for transparent huge pages (fewer TLB misses in the update).
    """

    def __init__(self, nbytes: int, extents: list[Extent] = (), pin: bool = False, hugepages: bool = True) -> None:
        self.nbytes = nbytes
        self.size = max(PAGE, _round_up(nbytes, PAGE))
        self._mm = mmap.mmap(-1, self.size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                             prot=mmap.PROT_READ | mmap.PROT_WRITE)
        # The tensor holds a reference to the mapping: it is unmapped when the last view dies.
        self.bytes = torch.frombuffer(self._mm, dtype=torch.uint8)
        self.addr = self.bytes.data_ptr()
        if hugepages and hasattr(mmap, "MADV_HUGEPAGE"):
            with contextlib.suppress(OSError):  # THP disabled: fine, just slower
                self._mm.madvise(mmap.MADV_HUGEPAGE)
        self.extents = list(extents)
        for ext in self.extents:
            apply_extent(self.addr, ext)
        self.bytes.zero_()  # first touch: pages are placed by the policy set above
        self.pinned = False
        if pin:
            rc = torch.cuda.cudart().cudaHostRegister(self.addr, self.size, 0)
            if int(rc) != 0:
                raise PinError(f"cudaHostRegister of {self.size} bytes at {self.addr:#x} failed (cudaError {int(rc)}); "
                                "is the locked-memory limit (ulimit -l) too low?")
            self.pinned = True
            weakref.finalize(self, _unregister, self.addr)

    def view(self, offset: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """``numel`` elements of ``dtype`` at byte ``offset`` (a view: no copy)."""
        size = torch.empty((), dtype=dtype).element_size()
        if offset % size or offset + numel * size > self.size:
            raise ValueError(f"view [{offset}, +{numel}x{size}) does not fit region of {self.size} bytes")
        return self.bytes[offset:offset + numel * size].view(dtype)
