"""Redundancy across keepers: erasure-coded memory snapshots that survive lost nodes.

The keepers of a job form *redundancy groups* of ``n = k + m`` consecutive node
ranks (failure domains). Node ``i``'s snapshot bytes of a step, ``D_i`` (its local
ranks' slot files concatenated in rank order), are cut into ``k`` blocks. Stripe
``j`` (``j = 0 .. n-1``) takes data block ``t`` from node ``(j + t) mod n`` and puts
its parity ``u`` on node ``(j + k + u) mod n``: every node holds exactly one shard of
every stripe (never two), ``k`` data blocks of its own and ``m`` parity blocks, so the
parity overhead is ``m / k`` of the data and losing any ``m`` nodes leaves every stripe
decodable. See docs/ERASURE.md ("Redundancy across keepers") for the protocol.

One module per job; dependencies point down this list, and none imports the keeper
(it is seen through :class:`stalwart.ckpt.slots.SlotStore`):

* :mod:`.config` - :class:`ECConfig`, topology checks, slot file names, snapshot identity;
* :mod:`.geometry` - the placement math (:class:`Geometry`) and a node's snapshot bytes
  (:class:`NodeBytes`), pure and unit-tested;
* :mod:`.transport` - point-to-point transports: gloo between keepers, in-process queues
  in tests;
* :mod:`.coding` - the encode rounds (:func:`encode_rounds`, :func:`encode_shared`);
* :mod:`.rebuild` - rebuild planning and decode rounds (:func:`plan_rebuild`,
  :func:`rebuild_rounds`);
* :mod:`.agent` - :class:`Redundancy`, the per-keeper background agent (generations,
  encode tasks, recovery of lost nodes' snapshots);
* :mod:`.peer` - :class:`PeerService`: byte-range reads of another node's memory
  snapshot, so a multi-node memory restore reads from memory, a peer, or a rebuilt
  (decoded) slot through the ordinary ``Checkpoint`` reader.

The keepers' store link (TCPStore client, heartbeats, liveness-aware gathers) is
:mod:`stalwart.ckpt.storelink`, shared with the multi-node commit and elastic recovery.
"""

from stalwart.ckpt.redundancy.agent import Redundancy
from stalwart.ckpt.redundancy.coding import encode_rounds, encode_shared
from stalwart.ckpt.redundancy.config import (
    DEFAULT_CHUNK,
    HOST_ID,
    NODES_FILE,
    PARITY_FILE,
    PARITY_META,
    PARITY_SPARE,
    SLOT_EXTRA_FILES,
    ECConfig,
    RedundancyError,
    check_topology,
    group_members,
    parse_ec,
    snapshot_id,
)
from stalwart.ckpt.redundancy.geometry import Geometry, NodeBytes
from stalwart.ckpt.redundancy.peer import PeerService, missing_reads
from stalwart.ckpt.redundancy.rebuild import RebuildPlan, StripePlan, plan_rebuild, rebuild_rounds
from stalwart.ckpt.redundancy.transport import GlooTransport, LocalTransport, Transport
from stalwart.ckpt.storelink import GroupError, StoreDown, StoreLink, local_address

__all__ = [
    "DEFAULT_CHUNK", "HOST_ID", "NODES_FILE", "PARITY_FILE", "PARITY_META", "PARITY_SPARE", "SLOT_EXTRA_FILES",
    "ECConfig", "Geometry", "GlooTransport", "GroupError", "LocalTransport", "NodeBytes", "PeerService", "RebuildPlan",
    "Redundancy", "RedundancyError", "StoreDown", "StoreLink", "StripePlan", "Transport", "check_topology",
    "encode_rounds", "encode_shared", "group_members", "local_address", "missing_reads", "parse_ec", "plan_rebuild",
    "rebuild_rounds", "snapshot_id",
]
