"""Distributed featurisation, Fisher reduction and scoring on Dask (docs/distributed.md).

Needs the ``distributed`` extra (dask, distributed, zarr); importing :mod:`iif_ref`
does not import this package.

Public API
----------
attribute_distributed   ``iif_ref.attribute`` on a Dask cluster (torch models)
attribute_features      scores from any feature function (the protocol in ``featurize``)
map_retrainings         many independent model fits (LDS ground truth) on the cluster
connect                 a running client from a client or a scheduler address
FeatureStore            the out-of-core, checksummed, fingerprinted feature store
"""
from iif_ref.distributed.api import (DistributedScores, attribute_distributed,
                                    attribute_features, connect)
from iif_ref.distributed.featurize import FeaturizationError, FeaturizeReport
from iif_ref.distributed.retrain import RetrainingError, map_retrainings
from iif_ref.distributed.store import (ChunkCorruptError, FeatureStore, StoreMismatchError,
                                       StoreWriteError)

__all__ = ["attribute_distributed", "DistributedScores", "attribute_features", "connect", "FeatureStore",
           "FeaturizationError", "FeaturizeReport", "ChunkCorruptError",
           "StoreMismatchError", "StoreWriteError", "RetrainingError", "map_retrainings"]
