"""Custom autograd kernels of the transcoder: the encoder GEMMs and the dense and sparse decoders.

ReLU/JumpReLU decode densely (`TriangularDecode`). TopK/BatchTopK with few active features keep
the active entries as lists: the decoder sums the gathered decoder rows [J, d] of those features
(embedding bags), and the backward pass touches only them (`EncodeActive`, `decode_entries`,
`sparse_decode`). Layouts: inputs are flattened to [N, L, ·]; decoder weights are one tensor
[F, J, d] per source layer (J target layers); reconstructions come back as [N, L·d].
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from clt.models import native


class TriangularDecode(torch.autograd.Function):
    """Σ_{l ≤ l'} a_l W_dec[l→l'] accumulated in place: no per-source copies in either pass."""

    @staticmethod
    def forward(ctx, d: int, flat: Tensor, *weights: Tensor) -> Tensor:
        out = flat.new_zeros(flat.shape[0], flat.shape[1] * d)
        for l, w in enumerate(weights):
            cols = out[:, l * d : (l + w.shape[1]) * d]
            cols.addmm_(flat[:, l], w.reshape(w.shape[0], -1))
        ctx.d = d
        ctx.save_for_backward(flat, *weights)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        flat, *weights = ctx.saved_tensors
        d = ctx.d
        grad_flat = torch.empty_like(flat) if ctx.needs_input_grad[1] else None
        grad_weights = []
        for l, w in enumerate(weights):
            g = grad[:, l * d : (l + w.shape[1]) * d]
            w2 = w.reshape(w.shape[0], -1)
            if grad_flat is not None:
                torch.mm(g, w2.T, out=grad_flat[:, l])
            grad_weights.append((flat[:, l].T @ g).view_as(w) if ctx.needs_input_grad[2 + l] else None)
        return None, grad_flat, *grad_weights


def compute_dtype(t: Tensor, param_dtype: torch.dtype) -> torch.dtype:
    """The dtype to compute in: autocast's on `t`'s device when it is on, else the parameters'."""
    device = t.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else param_dtype


def _encoder_forward(
    flat: Tensor, weight: Tensor, bias: Tensor, layer_major: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """z [N, L, F] = x W_enc^T + b_enc, one GEMM per layer written in place; also returns x and
    W_enc in the compute dtype (autocast's: the bias is then added in the parameter dtype).
    With `layer_major` z is stored as [L, N, F] (returned as its [N, L, F] transposed view), so
    that each layer's GEMM writes a contiguous block instead of a strided one through a copy."""
    n, num_layers, _ = flat.shape
    dtype = compute_dtype(flat, weight.dtype)
    x, w = flat.to(dtype).contiguous(), weight.to(dtype)
    if layer_major:
        z = x.new_empty(num_layers, n, weight.shape[1]).transpose(0, 1)
    else:
        z = x.new_empty(n, num_layers, weight.shape[1])
    with torch.autocast(flat.device.type, enabled=False):
        for l in range(num_layers):
            if dtype == bias.dtype:
                torch.addmm(bias[l], x[:, l], w[l].T, out=z[:, l])
            else:
                torch.mm(x[:, l], w[l].T, out=z[:, l])
        if dtype != bias.dtype:  # element-wise ops keep z's layout
            z = z.to(torch.promote_types(dtype, bias.dtype)) + bias
    return z, x, w


def _encoder_backward(ctx, grad: Tensor, x: Tensor, w: Tensor, sparse: bool):
    """Gradients of (flat, W_enc, b_enc) from the dense gradient of z; with `sparse` the weight
    gradient sums only the nonzero entries of `grad` (embedding bags)."""
    x_dtype, w_dtype, b_dtype = ctx.dtypes
    grad_x = grad_w = grad_b = None
    with torch.autocast(grad.device.type, enabled=False):
        if ctx.needs_input_grad[2]:
            grad_b = grad.sum(0).to(b_dtype)
        g = grad.to(x.dtype)
        if ctx.needs_input_grad[1]:
            if sparse:
                rows, layer, cols = g.nonzero().unbind(1)
                grad_w = _bag_weight_grad(layer, rows, cols, g[rows, layer, cols], x, w.shape[1])
            else:
                grad_w = torch.empty_like(w)
                for l in range(x.shape[1]):
                    torch.mm(g[:, l].T, x[:, l], out=grad_w[l])
            grad_w = grad_w.to(w_dtype)
        if ctx.needs_input_grad[0]:
            grad_x = torch.empty_like(x)
            for l in range(x.shape[1]):
                torch.mm(g[:, l], w[l], out=grad_x[:, l])
            grad_x = grad_x.to(x_dtype)
    return grad_x, grad_w, grad_b


class FeatureBags(NamedTuple):
    """Active entries grouped by (layer, feature): `order` sorts the entries (sorted by (layer,
    token)) by (layer, feature), stably; `counts` [L·F] holds each group's size. The encoder's
    and the sparse decoder's weight gradients sum over these groups (embedding bags)."""

    order: Tensor
    counts: Tensor

    @staticmethod
    def of(layer: Tensor, cols: Tensor, num_layers: int, num_features: int) -> FeatureBags:
        bag = layer * num_features + cols
        return FeatureBags(torch.argsort(bag, stable=True), torch.bincount(bag, minlength=num_layers * num_features))

    def starts(self) -> Tensor:
        """Where each (layer, feature) group starts in `order`, and the end: [L·F + 1]."""
        return _starts(self.counts)

    def layer(self, start: int, stop: int, index: int, num_features: int) -> tuple[Tensor, Tensor]:
        """Order and starts [F + 1] within one layer's segment start:stop of the entries."""
        counts = self.counts[index * num_features : (index + 1) * num_features]
        return self.order[start:stop] - start, _starts(counts)


def _starts(counts: Tensor) -> Tensor:
    """[0, c_0, c_0 + c_1, ..., Σc]: where consecutive groups of the given sizes start, and the end."""
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def _bags(
    out: Tensor,
    table: Tensor,
    starts: Tensor,
    idx: Tensor,
    weights: Tensor,
    order: Tensor | None = None,
    *,
    accumulate: bool,
) -> Tensor:
    """Embedding bags of `table` rows written (or added) into `out`: row b gets Σ over k in
    starts[b]:starts[b+1] of weights[e] · table[idx[e]], e = order[k] (or k). The compiled
    `native.bag_sum` where it applies, else `embedding_bag`."""
    if native.bag_sum(out, table, starts, idx, weights, order, accumulate=accumulate):
        return out
    if order is not None:
        idx, weights = idx[order], weights[order]
    part = nn.functional.embedding_bag(idx, table, starts[:-1], mode="sum", per_sample_weights=weights)
    return out.add_(part) if accumulate else out.copy_(part)


def _bag_weight_grad(
    layer: Tensor,
    rows: Tensor,
    cols: Tensor,
    values: Tensor,
    x: Tensor,
    num_features: int,
    bags: FeatureBags | None = None,
) -> Tensor:
    """Σ over entries of values · x[row, layer] into row (layer, col) of [L, F, d]: the encoder
    weight gradient from sparse entries, one embedding bag per (layer, feature)."""
    n, num_layers, d = x.shape
    if n == 0 or values.numel() == 0:
        return x.new_zeros(num_layers, num_features, d)
    if bags is None:
        bags = FeatureBags.of(layer, cols, num_layers, num_features)
    table = x.reshape(n * num_layers, d)  # row n·L + l is x[n, l]
    out = x.new_empty(num_layers * num_features, d)
    _bags(out, table, bags.starts(), rows * num_layers + layer, values.to(x.dtype), bags.order, accumulate=False)
    return out.view(num_layers, num_features, d)


class Encode(torch.autograd.Function):
    """z = x W_enc^T + b_enc [N, L, F]; with ``sparse_grad`` (TopK/BatchTopK, whose gradient of z
    is nonzero only at the active features and the auxiliary loss's dead ones) the weight
    gradient sums the nonzero entries, Σ_n g[n,l,f] x[n,l], instead of a dense GEMM, while at
    most 1/8 of them are nonzero."""

    @staticmethod
    def forward(ctx, flat: Tensor, weight: Tensor, bias: Tensor, sparse_grad: bool) -> Tensor:
        z, x, w = _encoder_forward(flat, weight, bias)
        ctx.sparse_grad, ctx.dtypes = sparse_grad, (flat.dtype, weight.dtype, bias.dtype)
        ctx.save_for_backward(x, w)
        return z

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, w = ctx.saved_tensors
        sparse = ctx.sparse_grad and _sparse_enough(int(torch.count_nonzero(grad)), grad.numel())
        return *_encoder_backward(ctx, grad, x, w, sparse), None


class EncodeActive(torch.autograd.Function):
    """Encoder and TopK/BatchTopK selection: z [N, L, F], and the kept entries as lists sorted
    by (layer, token): values ReLU(z) [nnz] and their (layer, token, feature) indices.

    Backward: the gradient reaching the values (decoder, features) never becomes a dense
    [N, L, F] tensor unless z itself gets one (auxiliary loss): encoder weight and bias
    gradients are sums over the entries (embedding bags, index_add).
    """

    @staticmethod
    def forward(ctx, flat: Tensor, weight: Tensor, bias: Tensor, select: Callable, group: bool) -> tuple:
        """`group`: also return the entries' `FeatureBags` (order, counts), which only the
        weight gradients read (else None, None)."""
        z, x, w = _encoder_forward(flat, weight, bias, layer_major=True)
        layer, rows, cols, pre = select(z)
        values = pre.clamp_min(0)
        order, counts = FeatureBags.of(layer, cols, weight.shape[0], weight.shape[1]) if group else (None, None)
        ctx.mark_non_differentiable(*(t for t in (layer, rows, cols, order, counts) if t is not None))
        ctx.set_materialize_grads(False)
        ctx.dtypes = (flat.dtype, weight.dtype, bias.dtype)
        ctx.save_for_backward(x, w, layer, rows, cols, values, order, counts)
        return z, values, layer, rows, cols, order, counts

    @staticmethod
    def backward(ctx, grad_z: Tensor | None, grad_values: Tensor | None, *_):
        x, w, layer, rows, cols, values, order, counts = ctx.saved_tensors
        n, num_layers, _ = x.shape
        num_features = w.shape[1]
        active = None if grad_values is None else torch.where(values > 0, grad_values, 0)
        if grad_z is not None or ctx.needs_input_grad[0]:
            grad = grad_z
            if grad is None:
                grad = x.new_zeros(n, num_layers, num_features, dtype=values.dtype)
            if active is not None:
                grad = grad.index_put((rows, layer, cols), active, accumulate=True)
            sparse = grad_z is None or _sparse_enough(int(torch.count_nonzero(grad)), grad.numel())
            return *_encoder_backward(ctx, grad, x, w, sparse), None, None
        if active is None:
            return None, None, None, None, None
        b_dtype = ctx.dtypes[2]
        grad_b = None
        if ctx.needs_input_grad[2]:
            grad_b = (
                active.new_zeros(num_layers * num_features)
                .index_add_(0, layer * num_features + cols, active)
                .view(num_layers, num_features)
                .to(b_dtype)
            )
        grad_w = None
        if ctx.needs_input_grad[1]:
            bags = None if order is None else FeatureBags(order, counts)
            grad_w = _bag_weight_grad(layer, rows, cols, active, x, num_features, bags).to(ctx.dtypes[1])
        return None, grad_w, grad_b, None, None


def _value_grads(out: Tensor, grad: Tensor, weight: Tensor, rows: Tensor, cols: Tensor, offsets: Tensor) -> None:
    """out[e] = ⟨grad[rows[e]], weight[cols[e]]⟩: the gradient of each bag entry's weight."""
    if not native.row_dots(out, grad, rows, weight, cols):
        out.copy_(torch.ops.aten._embedding_bag_per_sample_weights_backward(grad, weight, cols, offsets, rows, 0, -1))


def _sparse_enough(nnz: int, numel: int) -> bool:
    """Gathers beat dense GEMMs below 1/8 density (measured on CPU, F/k = 8 is about even)."""
    return nnz * 8 <= numel


def _segments(layer: Tensor, rows: Tensor, n: int, num_layers: int) -> tuple[Tensor, list[int]]:
    """For entries sorted by (layer, token): where each token's entries start within its layer's
    segment, offsets [L, N], and the segments' bounds [0, end of layer 0, ..., nnz]."""
    counts = torch.bincount(layer * n + rows, minlength=num_layers * n).view(num_layers, n)
    ends = counts.flatten().cumsum(0).view(num_layers, n)
    bounds = [0, *ends[:, -1].tolist()]
    return ends - counts - ends.new_tensor(bounds[:-1])[:, None], bounds


def sparse_decode(flat: Tensor, weights: list[Tensor], d: int, force: bool) -> Tensor | None:
    """Σ_l Σ_{i: a_l,i ≠ 0} a_l,i W_dec[l][i] for features flat [N, L, F] → [N, L·d]; None
    when more than 1/8 of the features are nonzero (the dense decoder is faster) unless
    `force`."""
    n, num_layers, _ = flat.shape
    if n == 0:
        return flat.new_zeros(0, num_layers * d, dtype=weights[0].dtype)
    with torch.no_grad():
        layer, rows, cols = flat.transpose(0, 1).nonzero().unbind(1)  # sorted by (layer, token)
        if not force and not _sparse_enough(layer.numel(), flat.numel()):
            return None
    return decode_entries(d, layer, rows, cols, flat[rows, layer, cols], n, weights)


def decode_entries(
    d: int,
    layer: Tensor,
    rows: Tensor,
    cols: Tensor,
    values: Tensor,
    n: int,
    weights: list[Tensor],
    bags: FeatureBags | None = None,
) -> Tensor:
    """Σ over active entries (sorted by (layer, token); `values` [nnz] at (layer, token `rows`,
    feature `cols`)) of value · decoder row, for `n` tokens → [N, L·d] in the decoder's dtype.
    `bags`: the entries grouped by feature, when the caller has them (else grouped in the
    backward pass, if a decoder weight needs its gradient)."""
    offsets, bounds = _segments(layer, rows, n, len(weights))
    return _SparseDecode.apply(d, rows, cols, offsets, bounds, bags, values.to(weights[0].dtype), *weights)


class _SparseDecode(torch.autograd.Function):
    """Decoder over the active features only: embedding bags of the decoder rows [F, J·d].

    Inputs, sorted by (layer, token): ``rows``/``cols`` the token and feature of each active
    entry, ``values`` its activation; ``offsets`` [L, N] where each token's entries start within
    its layer's segment ``bounds[l]:bounds[l+1]``. Backward: values get ⟨grad row, decoder row⟩,
    decoder rows the Σ over their tokens of value · grad row (entries sorted by feature).
    """

    @staticmethod
    def forward(
        ctx,
        d: int,
        rows: Tensor,
        cols: Tensor,
        offsets: Tensor,
        bounds: list[int],
        bags: FeatureBags | None,
        values: Tensor,
        *weights: Tensor,
    ) -> Tensor:
        n = offsets.shape[1]
        out = values.new_zeros(n, len(weights) * d)
        with torch.autocast(values.device.type, enabled=False):
            for l, w in enumerate(weights):
                seg = slice(bounds[l], bounds[l + 1])
                if seg.start == seg.stop:
                    continue
                starts = torch.cat([offsets[l], offsets.new_tensor([seg.stop - seg.start])])
                cols_out = out[:, l * d : (l + w.shape[1]) * d]
                _bags(cols_out, w.reshape(w.shape[0], -1), starts, cols[seg], values[seg], accumulate=True)
        ctx.d, ctx.bounds = d, bounds
        ctx.save_for_backward(rows, cols, offsets, *(bags or (None, None)), values, *weights)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        rows, cols, offsets, order, counts, values, *weights = ctx.saved_tensors
        d, bounds = ctx.d, ctx.bounds
        bags = None if order is None else FeatureBags(order, counts)
        if bags is None and any(ctx.needs_input_grad[7:]):  # group the entries by feature now
            sizes = torch.tensor([b - a for a, b in zip(bounds, bounds[1:])], device=cols.device)
            layer = torch.repeat_interleave(torch.arange(len(weights), device=cols.device), sizes)
            bags = FeatureBags.of(layer, cols, len(weights), weights[0].shape[0])
        grad_values = torch.zeros_like(values) if ctx.needs_input_grad[6] else None
        grad_weights = []
        with torch.autocast(grad.device.type, enabled=False):
            grad = grad.to(values.dtype)
            for l, w in enumerate(weights):
                seg = slice(bounds[l], bounds[l + 1])
                g = grad[:, l * d : (l + w.shape[1]) * d]
                w2 = w.reshape(w.shape[0], -1)
                if grad_values is not None and seg.start != seg.stop:
                    _value_grads(grad_values[seg], g, w2, rows[seg], cols[seg], offsets[l])
                if not ctx.needs_input_grad[7 + l]:
                    grad_weights.append(None)
                    continue
                by_feature, starts = bags.layer(seg.start, seg.stop, l, w.shape[0])
                grad_w = _bags(g.new_empty(w2.shape), g, starts, rows[seg], values[seg], by_feature, accumulate=False)
                grad_weights.append(grad_w.view_as(w))
        return None, None, None, None, None, None, grad_values, *grad_weights


__all__ = [
    "Encode",
    "EncodeActive",
    "FeatureBags",
    "TriangularDecode",
    "compute_dtype",
    "decode_entries",
    "sparse_decode",
]
