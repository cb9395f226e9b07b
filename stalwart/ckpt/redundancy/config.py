"""Erasure-coding configuration: RS(k, m) settings, group topology, slot file names, snapshot identity."""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from stalwart.errors import StalwartError
from stalwart.formats import checksum as ck

log = logging.getLogger("stalwart.keeper")


ALIGN = 64  # block and stripe sizes are multiples of this (the codec's word size)
DEFAULT_CHUNK = 8 * 1024 * 1024
PARITY_FILE = "parity.bin"
PARITY_META = "parity.json"
#: A slot's parity file kept, mapped, after its step left the slot: the next step's
#: parity is written into it (a fresh file costs ~0.7 us of page zeroing and faults per KiB).
PARITY_SPARE = "parity.spare"
NODES_FILE = "nodes.json"  # rank -> node of a slot's snapshot (who holds which file)
SLOT_EXTRA_FILES = (PARITY_FILE, PARITY_META, PARITY_FILE + ".tmp", NODES_FILE)
PARITY_BLOCK = ck.DEFAULT_BLOCK_SIZE


def _host_id() -> str:
    """This machine and boot, plus the shared-memory mount's identity: members with the
    same id read each other's snapshot files in place."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "?"
    try:
        shm = os.stat("/dev/shm")
        dev = f"{shm.st_dev}:{shm.st_ino}"
    except OSError:
        dev = "?"
    return f"{socket.gethostname()}/{boot}/{dev}"


HOST_ID = _host_id()


class RedundancyError(StalwartError):
    """Erasure-coded memory snapshots cannot be formed, kept or rebuilt (the message says why)."""


# ============================================================================ configuration


@dataclass(frozen=True)
class ECConfig:
    """Redundancy settings: RS(``k``, ``m``) across groups of ``k + m`` nodes.

    ``max_parity_memory``: bytes of parity one keeper may hold (older parity is dropped
    first; a step whose parity alone exceeds the cap is not protected, and says so).
    ``chunk``: bytes per transfer round; ``rate``: bytes/s each keeper sends at most
    (None: unlimited); ``rebuild_wait_s``: how long a restarting trainer waits for its
    keeper's group to form and rebuild lost snapshots before restoring without it;
    ``nice``: how much lower the coding threads' CPU priority is than the keeper's (0:
    the same), so that on a busy node coding yields to training; ``shared``: when all
    members of a group share one machine's memory (intra-node mode), read each other's
    snapshot files in place instead of sending them (False: always the network).
    """

    k: int
    m: int
    max_parity_memory: int | None = None
    chunk: int = DEFAULT_CHUNK
    rate: float | None = None
    rebuild_wait_s: float = 300.0
    nice: int = 10
    shared: bool = True

    def __post_init__(self) -> None:
        if not (isinstance(self.k, int) and isinstance(self.m, int)) or self.k < 1 or self.m < 1 or self.k + self.m > 256:
            raise RedundancyError(f"redundancy needs integers k >= 1, m >= 1, k + m <= 256; got k={self.k!r}, m={self.m!r}")
        if self.chunk < ALIGN or self.chunk % ALIGN:
            raise RedundancyError(f"redundancy chunk must be a positive multiple of {ALIGN} bytes, got {self.chunk}")
        if self.max_parity_memory is not None and self.max_parity_memory < 0:
            raise RedundancyError("max_parity_memory must be >= 0")

    @property
    def n(self) -> int:
        """Nodes per redundancy group (``k + m``)."""
        return self.k + self.m

    @property
    def overhead(self) -> float:
        """Parity bytes per data byte of a balanced group, ``m / k``."""
        return self.m / self.k

    @staticmethod
    def coerce(value, max_parity_memory: int | None = None) -> ECConfig | None:
        """``None``, ``(k, m)``, ``"k,m"`` or an :class:`ECConfig` (the cap overrides when given)."""
        if value is None:
            return None
        if isinstance(value, ECConfig):
            cfg = value
        elif isinstance(value, str):
            k, m = parse_ec(value)
            cfg = ECConfig(k, m)
        else:
            try:
                k, m = value
            except (TypeError, ValueError):
                raise RedundancyError(f"redundancy must be (k, m), got {value!r}") from None
            cfg = ECConfig(int(k), int(m))
        if max_parity_memory is not None:
            cfg = ECConfig(cfg.k, cfg.m, int(max_parity_memory), cfg.chunk, cfg.rate, cfg.rebuild_wait_s)
        return cfg


def parse_ec(text: str) -> tuple[int, int]:
    """``"4,2"`` -> ``(4, 2)``."""
    try:
        k, m = (int(x) for x in text.split(","))
    except ValueError:
        raise RedundancyError(f"--ec wants 'k,m' (e.g. 4,2), got {text!r}") from None
    return k, m


def check_topology(k: int, m: int, nodes: int) -> None:
    """Raise unless ``nodes`` splits into redundancy groups of ``k + m`` failure domains."""
    n = k + m
    if nodes < n or nodes % n:
        raise RedundancyError(
            f"redundancy=({k}, {m}) needs the job's nodes to form groups of k+m={n} failure domains, but it has"
            f" {nodes} node(s) ({nodes} % {n} = {nodes % n}). Use a (k, m) with k+m dividing the node count; on a"
            " single host, run one keeper per rank (intra-node mode): STALWART_LOCAL_WORLD_SIZE=1 and"
            " STALWART_KEEPER_GROUP=host:port"
        )


def group_members(node: int, n: int) -> list[int]:
    """The node ranks of ``node``'s redundancy group (consecutive ranks in chunks of ``n``)."""
    first = node - node % n
    return list(range(first, first + n))


def snapshot_id(records: Sequence[dict]) -> str:
    """Identity of a snapshot's bytes: a digest over every data file's record (the header
    digest covers every block checksum), so two slots of one step agree only if equal."""
    rows = sorted((int(r.get("rank", -1)), str(r["path"]), int(r["size"]), str(r["header_digest"])) for r in records)
    return ck.digest(json.dumps(rows, separators=(",", ":")).encode())


def read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return None

