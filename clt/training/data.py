"""The seed's import path of the activation store (`clt.training.data.ActivationStore`): see `clt.store`."""

from clt.store import (
    ActivationBatch,
    ActivationStore,
    NormStats,
    RunningStats,
    StoreError,
    StoreWriter,
    merge_store,
    writable_folder,
)

__all__ = [
    "ActivationBatch",
    "ActivationStore",
    "NormStats",
    "RunningStats",
    "StoreError",
    "StoreWriter",
    "merge_store",
    "writable_folder",
]
