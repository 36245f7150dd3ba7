"""Sparse top-k feature extraction with transcoders, layers batched into one bmm per tile.

Per token and layer, with `pre = hidden @ W_enc.T + b_enc`:

1. activation: `relu(pre)`, or JumpReLU `relu(pre) * (pre > threshold)` when the weights carry a
   threshold (circuit-tracer's JumpReLU for thresholds >= 0);
2. filter: a feature is *active* where its activation is > 0 and >= `activation_threshold`;
   inactive features count as 0;
3. top-k: the `k = min(top_k, f)` largest activations, in descending order.

Slots beyond the active features hold activation 0 and index -1, so `indices >= 0` marks exactly
the kept features (never index a weight matrix with a -1 slot). `sparsity` is the fraction of all
`f` features that are active at that token (before the top-k cut), a density in [0, 1].
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import TypedDict

import torch
import torch.nn.functional as F
from torch import Tensor

from clt.sparse.weights import TranscoderWeights

logger = logging.getLogger(__name__)

Params = tuple[Tensor, Tensor, Tensor | None]
"""Stacked encoder `(W_enc [L, f, h], b_enc [L, f], threshold [L, f] | None)`."""
Kernel = Callable[[Tensor, Tensor, Tensor, Tensor | None, float, int], tuple[Tensor, Tensor, Tensor]]


class LayerFeatures(TypedDict):
    """One layer's sparse features for hidden states `[B, T, h]`."""

    layer: int
    activations: Tensor
    """`[B, T, k]` kept activations, descending; 0 in empty slots."""
    indices: Tensor
    """`[B, T, k]` int64 feature ids of the kept activations; -1 in empty slots."""
    sparsity: Tensor
    """`[B, T]` float32 fraction of the f features active (> 0 and >= threshold) at each token."""


class AttributionFeature(TypedDict):
    """One active feature at one token, as returned by `extract_attribution_features`."""

    layer: int
    feature: int
    activation: float
    position: int
    batch: int


def sparse_topk_kernel(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, threshold: Tensor | None, activation_threshold: float, k: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Encode `x [L, N, h]` with stacked `W_enc [L, f, h]`: top-k values, indices, density."""
    pre = torch.baddbmm(b_enc.unsqueeze(1), x, W_enc.transpose(1, 2))
    act = torch.relu(pre)
    if threshold is not None:
        act = act * (pre > threshold.unsqueeze(1))
    active = (act > 0) & (act >= activation_threshold)
    values, indices = torch.topk(act.masked_fill(~active, 0), k, dim=-1)
    indices = indices.masked_fill(values <= 0, -1)
    return values, indices, active.float().mean(dim=-1)


def _sparse_topk_inplace(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    threshold: Tensor | None,
    activation_threshold: float,
    k: int,
    pre: Tensor,
    mask: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """`sparse_topk_kernel` in two preallocated `[L, N, f]` buffers: same results, eager-fast.

    Fresh `[L, N, f]` tensors cost more than the arithmetic on CPU (page faults), and masked
    ops (`masked_fill`, `where`, bool `sum`) are slow there; in-place float ops are not.
    """
    torch.baddbmm(b_enc.unsqueeze(1), x, W_enc.transpose(1, 2), out=pre)
    if threshold is not None:
        torch.sub(pre, threshold.unsqueeze(1), out=mask)
        mask.sign_().clamp_min_(0)
        pre.clamp_min_(0).mul_(mask)
    else:
        pre.clamp_min_(0)
    if activation_threshold > 0:
        F.threshold_(pre, _just_below(activation_threshold, pre.dtype), 0.0)
    torch.sign(pre, out=mask)
    values, indices = torch.topk(pre, k, dim=-1)
    indices.masked_fill_(values <= 0, -1)
    return values, indices, mask.sum(dim=-1, dtype=torch.float32) / pre.shape[-1]


def _just_below(value: float, dtype: torch.dtype) -> float:
    """The largest `dtype` number below `value`: `x > _just_below(v)` iff `x >= v` in `dtype`."""
    below = torch.nextafter(torch.tensor(value, dtype=dtype), torch.tensor(-torch.inf, dtype=dtype))
    return below.item()


def encode_single_layer(
    hidden: Tensor,
    weights: TranscoderWeights,
    *,
    top_k: int = 20,
    activation_threshold: float = 1.0,
    chunk_size: int = 512,
    layer: int = -1,
) -> LayerFeatures:
    """Sparse top-k features of one layer's `hidden [B, T, h]` (eager PyTorch, chunked)."""
    encoder = SparseCLTEncoder(
        {layer: weights},
        top_k=top_k,
        activation_threshold=activation_threshold,
        use_compile=False,
        chunk_size=chunk_size,
    )
    return encoder.encode_layer(layer, hidden)


class SparseCLTEncoder:
    """Top-k sparse features of transcoder layers; layers batched in one bmm when shapes agree.

    Encoder weights of all layers are stacked into `[L, f, h]` once, at construction (a view, no
    copy, when they already tile one tensor, as after `load_transcoders` of a `save_pretrained`
    folder); `encode_layer` reads the same stacked weights. `chunk_size` bounds the
    `(layer, token)` rows whose f pre-activations exist at once (two `[chunk_size, f]` buffers):
    a kernel call takes up to `chunk_size` tokens of one layer, or all tokens of as many layers
    as fit. With `use_compile`, the kernel goes through `torch.compile`; where compiling is
    unavailable or fails, a warning is logged and eager PyTorch (same results) is used instead.
    """

    def __init__(
        self,
        transcoders: Mapping[int, TranscoderWeights],
        top_k: int = 20,
        activation_threshold: float = 1.0,
        use_compile: bool = True,
        chunk_size: int = 512,
    ) -> None:
        _check_options(top_k, activation_threshold, chunk_size)
        if not transcoders:
            raise ValueError("transcoders is empty; pass {layer: TranscoderWeights}")
        self.top_k = top_k
        self.activation_threshold = float(activation_threshold)
        self.chunk_size = chunk_size
        self.layers = list(transcoders)
        self.d_features = {layer: w.d_features for layer, w in transcoders.items()}
        hidden = {w.d_hidden for w in transcoders.values()}
        if len(hidden) > 1:
            raise ValueError(f"transcoders disagree on the hidden size: {sorted(hidden)}")
        self.d_hidden = hidden.pop()
        weights = list(transcoders.values())
        self._stacked = _stack_weights(weights) if _stackable(weights) else None
        self._params: dict[int, Params] = {}
        for i, (layer, own) in enumerate(transcoders.items()):
            if self._stacked is None:
                self._params[layer] = _stack_weights([own])
            else:
                self._params[layer] = _select(self._stacked, slice(i, i + 1))
        self._compiled = _try_compile(sparse_topk_kernel) if use_compile else None

    @property
    def compiled(self) -> bool:
        """Whether the kernel currently runs through `torch.compile`."""
        return self._compiled is not None

    @property
    def batched(self) -> bool:
        """Whether all layers share one stacked `[L, f, h]` encoder (bmm in `encode_all_layers`)."""
        return self._stacked is not None

    def encode_layer(self, layer_idx: int, hidden: Tensor) -> LayerFeatures:
        """Sparse features of one layer for `hidden [B, T, h]`, `chunk_size` tokens at a time."""
        return self.encode_chunked(layer_idx, hidden)

    def encode_chunked(self, layer_idx: int, hidden: Tensor, chunk_size: int | None = None) -> LayerFeatures:
        """Like `encode_layer`, with an explicit number of tokens per chunk; identical results."""
        params = self._layer_params(layer_idx)
        size = self.chunk_size if chunk_size is None else chunk_size
        _check_options(self.top_k, self.activation_threshold, size)
        x = _flatten(layer_idx, hidden, params[0])
        return _pack(layer_idx, hidden, self._encode_rows(x, params, size), 0)

    def encode_all_layers(self, hidden_states: Mapping[int, Tensor]) -> dict[int, LayerFeatures]:
        """Sparse features of each layer in `hidden_states {layer: [B, T, h]}`, layers batched."""
        layers = list(hidden_states)
        for layer in layers:
            self._layer_params(layer)
        shapes = {tuple(hidden_states[layer].shape) for layer in layers}
        if self._stacked is None or len(shapes) != 1 or len(layers) < 2:
            return {layer: self.encode_layer(layer, hidden_states[layer]) for layer in layers}
        positions = [self.layers.index(layer) for layer in layers]
        W = self._stacked[0]
        if positions == list(range(positions[0], positions[0] + len(positions))):
            params = _select(self._stacked, slice(positions[0], positions[0] + len(positions)))
        else:
            params = _select(self._stacked, torch.tensor(positions, device=W.device))
        x = torch.cat([_flatten(layer, hidden_states[layer], W) for layer in layers])
        out = self._encode_rows(x, params, self.chunk_size)
        return {layer: _pack(layer, hidden_states[layer], out, i) for i, layer in enumerate(layers)}

    def extract_attribution_features(
        self, hidden_states: Mapping[int, Tensor], top_k_global: int | None = 100
    ) -> list[AttributionFeature]:
        """The `top_k_global` strongest kept features over all layers and tokens, descending.

        Candidates are the per-token top-k of `encode_all_layers`; ties keep layer, batch,
        position order. `top_k_global=None` returns every kept feature.
        """
        if top_k_global is not None and top_k_global < 1:
            raise ValueError(f"top_k_global must be >= 1 or None, got {top_k_global}")
        if not hidden_states:
            return []
        columns: list[list[Tensor]] = [[], [], [], [], []]
        for layer, result in self.encode_all_layers(hidden_states).items():
            values = result["activations"]
            batch, position, slot = (values > 0).nonzero(as_tuple=True)
            columns[0].append(torch.full_like(batch, layer))
            columns[1].append(result["indices"][batch, position, slot])
            columns[2].append(values[batch, position, slot].float())
            columns[3].append(position)
            columns[4].append(batch)
        layer_ids, features, activations, positions, batches = (torch.cat(c) for c in columns)
        order = torch.sort(activations, descending=True, stable=True).indices[:top_k_global]
        picked = (c[order].tolist() for c in (layer_ids, features, activations, positions, batches))
        return [
            AttributionFeature(layer=layer, feature=feature, activation=value, position=pos, batch=b)
            for layer, feature, value, pos, b in zip(*picked, strict=True)
        ]

    def _layer_params(self, layer: int) -> Params:
        if layer not in self._params:
            raise KeyError(f"no transcoder for layer {layer}; available layers: {self.layers}")
        return self._params[layer]

    @torch.no_grad()
    def _encode_rows(self, x: Tensor, params: Params, chunk_size: int) -> tuple[Tensor, Tensor, Tensor]:
        """Kernel outputs for `x [L, N, h]`, in tiles of at most `chunk_size` (layer, token) rows.

        A tile takes `min(N, chunk_size)` tokens of as many layers as fit, so each layer's
        weights are read once when a layer's tokens fit in one chunk.
        """
        L, N, _ = x.shape
        f = params[0].shape[1]
        k = min(self.top_k, f)
        tokens = max(1, min(N, chunk_size))
        group = max(1, chunk_size // tokens)
        values = x.new_empty(L, N, k)
        indices = torch.empty(L, N, k, dtype=torch.int64, device=x.device)
        fraction = torch.empty(L, N, dtype=torch.float32, device=x.device)
        buffers: Tensor | None = None
        for l0 in range(0, L, group):
            layers = slice(l0, l0 + group)
            tile_params = _select(params, layers)
            for t0 in range(0, N, tokens):
                rows = slice(t0, t0 + tokens)
                chunk = x[layers, rows]
                out = self._run_compiled(chunk, tile_params, k)
                if out is None:
                    if buffers is None:
                        buffers = x.new_empty(2, min(group, L) * tokens * f)
                    n = chunk.shape[0] * chunk.shape[1] * f
                    pre, mask = buffers[:, :n].view(2, *chunk.shape[:2], f)
                    out = _sparse_topk_inplace(chunk, *tile_params, self.activation_threshold, k, pre, mask)
                values[layers, rows], indices[layers, rows], fraction[layers, rows] = out
        return values, indices, fraction

    def _run_compiled(self, x: Tensor, params: Params, k: int) -> tuple[Tensor, Tensor, Tensor] | None:
        """The compiled kernel's outputs, or None when not compiling (any more)."""
        if self._compiled is None:
            return None
        try:
            return self._compiled(x, *params, self.activation_threshold, k)
        except Exception as err:  # compile errors surface on first call, in many types
            logger.warning("torch.compile failed (%s: %s); using eager PyTorch", type(err).__name__, err)
            self._compiled = None
            return None


class SparseTranscoderEncoder(SparseCLTEncoder):
    """`SparseCLTEncoder` under the `sparse-transcoder` name: per-layer transcoders, same API."""


def _select(params: Params, index: slice | Tensor) -> Params:
    """The layers `index` of stacked encoder parameters."""
    W, b, th = params
    return W[index], b[index], None if th is None else th[index]


def _stackable(weights: list[TranscoderWeights]) -> bool:
    """Whether all encoders share shape, dtype and device."""
    key = {(w.W_enc.shape, w.W_enc.dtype, w.W_enc.device) for w in weights}
    return len(key) == 1


def _stack_weights(weights: list[TranscoderWeights]) -> Params:
    """Stacked encoder parameters of `_stackable` weights (views where possible).

    A layer without a threshold gets 0 in a stack with thresholds: `relu(z) * (z > 0) == relu(z)`.
    """
    W = _stack([w.W_enc.detach() for w in weights])
    b = _stack([w.b_enc.detach() for w in weights])
    if all(w.threshold is None for w in weights):
        return W, b, None
    zeros = torch.zeros_like(weights[0].b_enc)
    th = _stack([(zeros if w.threshold is None else w.threshold).detach() for w in weights])
    return W, b, th


def _stack(tensors: list[Tensor]) -> Tensor:
    """Stack equal-shaped tensors on a new dim 0; a view when they already tile one storage."""
    first = tensors[0]
    step = first.numel()
    ptr = first.untyped_storage().data_ptr()
    if all(
        t.is_contiguous()
        and t.untyped_storage().data_ptr() == ptr
        and t.storage_offset() == first.storage_offset() + i * step
        for i, t in enumerate(tensors)
    ):
        return first.as_strided((len(tensors), *first.shape), (step, *first.stride()))
    return torch.stack(tensors)


def _try_compile(kernel: Kernel) -> Kernel | None:
    try:
        return torch.compile(kernel)
    except Exception as err:  # e.g. dynamo unsupported on this Python
        logger.warning("torch.compile unavailable (%s: %s); using eager PyTorch", type(err).__name__, err)
        return None


def _check_options(top_k: int, activation_threshold: float, chunk_size: int) -> None:
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if activation_threshold < 0:
        raise ValueError(f"activation_threshold must be >= 0, got {activation_threshold}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def _flatten(layer: int, hidden: Tensor, W_enc: Tensor) -> Tensor:
    """`hidden [B, T, h]` as `[1, B*T, h]` on the weights' device and dtype."""
    h = W_enc.shape[-1]
    if not isinstance(hidden, Tensor) or hidden.ndim != 3 or hidden.shape[-1] != h:
        shape = list(hidden.shape) if isinstance(hidden, Tensor) else type(hidden).__name__
        raise ValueError(f"layer {layer}: expected hidden states [batch, seq, {h}], got {shape}")
    return hidden.reshape(1, -1, h).to(device=W_enc.device, dtype=W_enc.dtype)


def _pack(layer: int, hidden: Tensor, out: tuple[Tensor, Tensor, Tensor], i: int) -> LayerFeatures:
    """Row `i` of the kernel outputs, reshaped to `hidden`'s `[B, T]`."""
    B, T = hidden.shape[:2]
    values, indices, fraction = out
    return LayerFeatures(
        layer=layer,
        activations=values[i].reshape(B, T, values.shape[-1]),
        indices=indices[i].reshape(B, T, indices.shape[-1]),
        sparsity=fraction[i].reshape(B, T),
    )
