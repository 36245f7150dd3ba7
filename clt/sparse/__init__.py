"""Sparse top-k feature extraction with (cross-layer) transcoders, batched over layers.

The API of the `sparse-clt` and `sparse-transcoder` packages: `from clt.sparse import
SparseCLTEncoder, load_transcoders` replaces `from sparse_clt import ...`.
"""

from clt.sparse.encoder import (
    AttributionFeature,
    LayerFeatures,
    SparseCLTEncoder,
    SparseTranscoderEncoder,
    encode_single_layer,
)
from clt.sparse.weights import (
    TranscoderLoadError,
    TranscoderWeights,
    load_transcoders,
    random_transcoders,
    save_transcoders,
)

__all__ = [
    "AttributionFeature",
    "LayerFeatures",
    "SparseCLTEncoder",
    "SparseTranscoderEncoder",
    "TranscoderLoadError",
    "TranscoderWeights",
    "encode_single_layer",
    "load_transcoders",
    "random_transcoders",
    "save_transcoders",
]
