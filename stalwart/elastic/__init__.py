"""Elastic training: the same training when the data-parallel degree changes.

:mod:`stalwart.elastic.data` keeps the global batch, the data order and sample-tied
randomness independent of the DP degree (pure torch, no ``torch.distributed`` calls).
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

__all__ = [
    "ElasticBatchError",
    "ElasticLoader",
    "ElasticSampler",
    "GlobalBatch",
    "MicroBatch",
    "micro_batch_rng",
    "sample_generator",
    "sample_seed",
]
