"""Elastic training: the same training when the data-parallel degree changes.

:mod:`stalwart.elastic.data` keeps the global batch, the data order and sample-tied
randomness independent of the DP degree (pure torch, no ``torch.distributed`` calls).
:func:`run` (:mod:`stalwart.elastic.inprocess`) runs a training function with in-process
recovery: under stalwart's rendezvous the survivors of a failure keep their processes.
"""

from stalwart.elastic.data import (
    ElasticBatchError,
    ElasticLoader,
    ElasticSampler,
    GlobalBatch,
    MicroBatch,
    micro_batch_rng,
    sample_generator,
    sample_seed,
)
from stalwart.elastic.inprocess import PeerLost, Recovery, RecoveryError, history, run

__all__ = [
    "ElasticBatchError",
    "ElasticLoader",
    "ElasticSampler",
    "GlobalBatch",
    "MicroBatch",
    "PeerLost",
    "Recovery",
    "RecoveryError",
    "history",
    "micro_batch_rng",
    "run",
    "sample_generator",
    "sample_seed",
]
