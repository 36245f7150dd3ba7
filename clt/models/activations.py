"""Feature nonlinearities: ReLU, JumpReLU and Heaviside step with STE, TopK and BatchTopK.

Pseudo-gradients (Rajamanoharan et al. 2024, "Jumping Ahead", rectangle kernel
K(u) = 1 for -1/2 < u < 1/2, else 0, bandwidth ε):

- ``jumprelu(z, θ, ε) = z · H(z − θ)``:
  ∂/∂z = H(z − θ) (the exact derivative away from the jump);
  ð/ðθ = −(θ/ε) · K((z − θ)/ε).
- ``step(z, θ, ε) = H(z − θ)`` (for an L0 penalty):
  ∂/∂z = 0; ð/ðθ = −(1/ε) · K((z − θ)/ε).

θ-gradients are summed over the dimensions along which θ was broadcast.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from clt.models import native


def _zero(like: Tensor) -> Tensor:
    return torch.zeros((), dtype=like.dtype, device=like.device)


def relu(z: Tensor) -> Tensor:
    """max(z, 0)."""
    return torch.relu(z)


def rectangle(u: Tensor) -> Tensor:
    """Rectangle kernel K(u): 1 on the open interval (-1/2, 1/2), else 0."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _ThresholdFunction(torch.autograd.Function):
    """Backward shared by JumpReLU and the step: H(z−θ) (JumpReLU) or 0 (step) for z,
    −(s/ε)·K((z−θ)/ε) for θ with s = θ (JumpReLU) or 1 (step)."""

    @staticmethod
    def save(ctx: Any, z: Tensor, threshold: Tensor, bandwidth: float, *, jump: bool) -> None:
        """Keep what `backward` needs."""
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth, ctx.jump = bandwidth, jump

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        z, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_z = grad * (z > threshold).to(grad.dtype) if ctx.jump else torch.zeros_like(z)
        grad_theta = -((threshold if ctx.jump else 1.0) / eps) * rectangle((z - threshold) / eps) * grad
        return grad_z, grad_theta.sum_to_size(threshold.shape), None


class JumpReLUFunction(_ThresholdFunction):
    """z·H(z−θ); backward: H(z−θ) for z, −(θ/ε)·K((z−θ)/ε) for θ."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        _ThresholdFunction.save(ctx, z, threshold, bandwidth, jump=True)
        return torch.where(z > threshold, z, _zero(z))


class StepFunction(_ThresholdFunction):
    """H(z−θ); backward: 0 for z, −(1/ε)·K((z−θ)/ε) for θ."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        _ThresholdFunction.save(ctx, z, threshold, bandwidth, jump=False)
        return (z > threshold).to(z.dtype)


def jumprelu(z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """JumpReLU z·H(z−θ) with the straight-through pseudo-gradient for θ (module docstring)."""
    return JumpReLUFunction.apply(z, threshold.to(z.dtype), float(bandwidth))


def step(z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """Heaviside H(z−θ) with the straight-through pseudo-gradient for θ (module docstring)."""
    return StepFunction.apply(z, threshold.to(z.dtype), float(bandwidth))


def _keep_topk(values: Tensor, k: int) -> Tensor:
    """Zero all but the k largest entries of the last dim (exactly k kept)."""
    top = values.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(values).scatter(-1, top.indices, top.values)


def topk(z: Tensor, k: int) -> Tensor:
    """ReLU of the k largest pre-activations per token and layer (last dim); others zero."""
    return _keep_topk(torch.relu(z), min(k, z.shape[-1]))


def batchtopk(z: Tensor, k: int, scope: str = "layer") -> Tensor:
    """Keep the k·batch largest ReLU'd entries per layer (scope 'layer') or k·L·batch over all.

    ``z`` is [..., L, F]; all leading dims form the batch. Exactly that many entries stay nonzero
    when at least that many are positive (ties broken arbitrarily).
    """
    num_layers, num_features = z.shape[-2:]
    a = torch.relu(z).reshape(-1, num_layers, num_features)
    n = a.shape[0]
    if scope == "layer":
        flat = a.transpose(0, 1).reshape(num_layers, n * num_features)
        kept = _keep_topk(flat, min(k * n, flat.shape[-1]))
        out = kept.reshape(num_layers, n, num_features).transpose(0, 1)
    elif scope == "all":
        flat = a.reshape(n * num_layers * num_features)
        kept = _keep_topk(flat, min(k * n * num_layers, flat.numel()))
        out = kept.reshape(n, num_layers, num_features)
    else:
        raise ValueError(f"batchtopk scope must be 'layer' or 'all', got {scope!r}")
    return out.reshape(z.shape)


class ActiveEntries(NamedTuple):
    """The entries TopK/BatchTopK keep in pre-activations z [N, L, F], as 1-D lists sorted by
    (layer, token): their layer, token (`rows`), feature (`cols`) and pre-activation z."""

    layer: Tensor
    rows: Tensor
    cols: Tensor
    preactivations: Tensor


def topk_active(z: Tensor, k: int) -> ActiveEntries:
    """The entries `topk` keeps in z [N, L, F], sorted by (layer, token).

    The k largest pre-activations per token and layer: where fewer than k are positive, the
    rest are entries that `topk` sets to 0 as well.
    """
    n, num_layers, num_features = z.shape
    k = min(k, num_features)
    top = native.topk_rows(z.detach(), k)  # [L, N, k], or None: torch.topk then
    if top is None:
        values, indices = z.detach().topk(k, dim=-1, sorted=False)
        top = values.transpose(0, 1), indices.transpose(0, 1)
    rows = torch.arange(n, device=z.device).repeat_interleave(k).repeat(num_layers)
    layer = torch.arange(num_layers, device=z.device).repeat_interleave(n * k)
    return ActiveEntries(layer, rows, top[1].reshape(-1), top[0].reshape(-1))


def batchtopk_active(z: Tensor, k: int, scope: str = "layer") -> ActiveEntries:
    """The entries `batchtopk` keeps in z [N, L, F], sorted by (layer, token, feature)."""
    n, num_layers, num_features = z.shape
    if scope == "layer":
        flat = z.detach().transpose(0, 1).reshape(num_layers, n * num_features)
        kept = flat.topk(min(k * n, flat.shape[-1]), dim=-1, sorted=False).indices.sort(-1).values
        layer = torch.arange(num_layers, device=z.device).repeat_interleave(kept.shape[1])
        kept = kept.reshape(-1)
        return entries_at(z, layer, kept // num_features, kept % num_features)
    if scope != "all":
        raise ValueError(f"batchtopk scope must be 'layer' or 'all', got {scope!r}")
    layer_major = z.transpose(0, 1).is_contiguous() and not z.is_contiguous()
    flat = (z.transpose(0, 1) if layer_major else z).detach().reshape(-1)  # a view of z's storage
    kept = flat.topk(min(k * n * num_layers, flat.numel()), sorted=False).indices
    cols, rest = kept % num_features, kept // num_features
    layer, rows = (rest // n, rest % n) if layer_major else (rest % num_layers, rest // num_layers)
    order = torch.argsort((layer * n + rows) * num_features + cols)
    return entries_at(z, layer[order], rows[order], cols[order])


def entries_at(z: Tensor, layer: Tensor, rows: Tensor, cols: Tensor) -> ActiveEntries:
    """`ActiveEntries` of z [N, L, F] at the given (layer, token, feature) lists."""
    z = z.detach()
    if z.is_contiguous() or z.transpose(0, 1).is_contiguous():  # one dense block: index its storage
        flat_index = rows * z.stride(0) + layer * z.stride(1) + cols
        block = z.as_strided((z.numel(),), (1,), z.storage_offset())
        return ActiveEntries(layer, rows, cols, block.take(flat_index))
    return ActiveEntries(layer, rows, cols, z[rows, layer, cols])


def smallest_kept(features: Tensor) -> Tensor:
    """Per layer, the smallest positive entry of features [..., L, F] (NaN where none is)."""
    flat = features.detach().reshape(-1, *features.shape[-2:]).transpose(0, 1).flatten(1)
    masked = torch.where(flat > 0, flat, torch.full_like(flat, float("inf")))
    low = masked.min(dim=-1).values
    return torch.where(torch.isinf(low), torch.full_like(low, float("nan")), low)


class BatchTopK(nn.Module):
    """BatchTopK (Bussmann et al. 2024) with an EMA threshold [L] used in eval mode.

    Training: ``batchtopk(z, k, scope)``, then the buffer ``threshold`` moves towards the smallest
    kept activation (per layer for scope 'layer', one value for all layers for scope 'all').
    Eval: ``z · H(z − threshold)``, a per-token rule; before any training step the threshold is 0
    (plain ReLU).
    """

    def __init__(self, num_layers: int, k: int, scope: str = "layer", momentum: float = 0.01) -> None:
        super().__init__()
        if scope not in ("layer", "all"):
            raise ValueError(f"BatchTopK scope must be 'layer' or 'all', got {scope!r}")
        self.k, self.scope, self.momentum = k, scope, momentum
        self.register_buffer("threshold", torch.zeros(num_layers))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def forward(self, z: Tensor) -> Tensor:
        """Features [..., L, F] from pre-activations z [..., L, F]."""
        if not self.training:
            return torch.where(z > self.threshold.to(z.dtype)[:, None], z, _zero(z))
        a = batchtopk(z, self.k, self.scope)
        self.update_threshold(a)
        return a

    @torch.no_grad()
    def update_threshold(self, features: Tensor) -> None:
        """Move the threshold towards the batch's smallest kept activation (EMA)."""
        self._update(smallest_kept(features).float())

    @torch.no_grad()
    def update_threshold_active(self, values: Tensor, layer: Tensor) -> None:
        """`update_threshold` from the kept entries only: their values and layers (1-D)."""
        inf = torch.full_like(values, float("inf"))
        low = inf.new_full((self.threshold.shape[0],), float("inf")).scatter_reduce(
            0, layer, torch.where(values > 0, values, inf), "amin"
        )
        self._update(torch.where(torch.isinf(low), torch.full_like(low, float("nan")), low).float())

    def _update(self, low: Tensor) -> None:
        if self.scope == "all":
            low = low.nan_to_num(float("inf")).min().expand_as(low)
            low = torch.where(torch.isinf(low), torch.full_like(low, float("nan")), low)
        seen = ~torch.isnan(low)
        momentum = torch.where(self.num_updates == 0, 1.0, self.momentum)
        updated = (1 - momentum) * self.threshold + momentum * low.nan_to_num(0.0)
        self.threshold.copy_(torch.where(seen, updated, self.threshold))
        self.num_updates += 1

    def extra_repr(self) -> str:
        return f"k={self.k}, scope={self.scope!r}, momentum={self.momentum}"
