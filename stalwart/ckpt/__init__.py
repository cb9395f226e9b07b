"""The checkpoint engine: lazy snapshots to host memory, a keeper per node, tiers.

Public surface: :func:`protect` / :class:`Guard`; :func:`init_distributed`
(a restart-safe ``init_process_group``); :class:`ResumableLoader`; and, for DCP
users, :class:`StorageWriter` / :class:`StorageReader` (see ``dcp_storage``).
"""

from stalwart.ckpt.dist import init_distributed
from stalwart.ckpt.guard import Guard, GuardStats, Latest, Preempted, Timeouts, protect
from stalwart.ckpt.providers.base import StateProvider
from stalwart.ckpt.providers.data import ResumableLoader

__all__ = ["Guard", "GuardStats", "Latest", "Preempted", "ResumableLoader", "StateProvider", "Timeouts", "init_distributed", "protect"]


def __getattr__(name: str):
    # DCP integration is imported on first use (it pulls torch.distributed.checkpoint).
    if name in ("StorageWriter", "StorageReader"):
        from stalwart.ckpt import dcp_storage

        return getattr(dcp_storage, name)
    raise AttributeError(name)
