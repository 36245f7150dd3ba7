"""The activation store: MLP inputs/outputs per layer on disk or in memory, with statistics.

Modules: `format` (shard files: float/int8, zstd), `stats` (normalisation statistics),
`manifest` (the store folder's manifest), `reader` (ActivationStore: batches, following a store
being written), `follow` (waiting for a writer), `writer` (StoreWriter, merging several writers).
"""

from clt.store.format import FLOAT_DTYPES, StoreError
from clt.store.manifest import MANIFEST, read_manifest
from clt.store.reader import ActivationBatch, ActivationStore
from clt.store.stats import NormStats, RunningStats
from clt.store.writer import StoreWriter, merge_store, writable_folder

__all__ = [
    "FLOAT_DTYPES",
    "MANIFEST",
    "ActivationBatch",
    "ActivationStore",
    "NormStats",
    "RunningStats",
    "StoreError",
    "StoreWriter",
    "merge_store",
    "read_manifest",
    "writable_folder",
]
