"""Training losses of a transcoder, as pure functions of tensors (standardised activations).

Shapes: features, preactivations [..., L, F]; reconstructions, targets [..., L, d];
decoder norms and thresholds [L, F]. Each loss is a mean over tokens (the leading dims) of a
sum over layers and features (or dimensions). `compute_losses` composes them for a model.

Matryoshka (``CLTConfig.matryoshka_prefixes`` = m_1 < ... < m_k < F): the reconstruction term is
Σ_{m ∈ {m_1..m_k, F}} Σ_l ‖ŷ_l^{(m)} − y_l‖², where ŷ^{(m)} decodes only the first m features of
every layer (plus b_dec and the skip term), so each prefix is a transcoder on its own
(`CrossLayerTranscoder.truncate`) — exactly for ReLU, JumpReLU and BatchTopK (inference threshold);
for TopK the prefix keeps the first m of the top k over all F features, while `truncate(m)` picks
the top k within the first m. The prefixes' FVUs come back in `LossTerms.metrics`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import NamedTuple

import torch
from torch import Tensor

from clt.models.transcoder import CLTOutput, CrossLayerTranscoder

SPARSITY_KINDS = ("tanh", "l1")


class LossTerms(NamedTuple):
    """The scalar loss terms of one step, each already multiplied by its coefficient."""

    reconstruction: Tensor
    """Σ_l ‖ŷ_l − y_l‖², mean over tokens (summed over the Matryoshka prefixes and the full
    dictionary when there are prefixes)."""
    sparsity: Tensor
    """λ · Σ_l Σ_i tanh(c · a_l,i · ‖W_dec,i^l‖) (or the L1 form), mean over tokens."""
    preactivation: Tensor
    """Pre-activation penalty against dead JumpReLU features (0 when unused)."""
    auxiliary: Tensor
    """Auxiliary top-k loss for TopK/BatchTopK (0 when unused)."""
    metrics: Mapping[str, Tensor] = MappingProxyType({})
    """Logged quantities that are not loss terms: ``fvu_prefix_<m>`` for each Matryoshka
    prefix m (FVU over all layers of the standardised targets, as the trainer's ``fvu``)."""

    @property
    def total(self) -> Tensor:
        """Sum of all terms: the quantity to minimise."""
        return self.reconstruction + self.sparsity + self.preactivation + self.auxiliary

    def tensors(self) -> dict[str, Tensor]:
        """Terms, total and metrics as tensors (no device sync)."""
        terms = {k: v for k, v in self._asdict().items() if k != "metrics"}
        return {**terms, "total": self.total, **self.metrics}

    def as_dict(self) -> dict[str, float]:
        """Terms, total and metrics as Python floats, for logging."""
        return {k: float(v.detach()) for k, v in self.tensors().items()}


def _tokens_mean(per_token: Tensor) -> Tensor:
    return per_token.mean() if per_token.ndim else per_token


def reconstruction_loss(reconstruction: Tensor, target: Tensor) -> Tensor:
    """Squared error summed over layers and dimensions, mean over tokens."""
    if reconstruction.shape != target.shape:
        raise ValueError(f"reconstruction {list(reconstruction.shape)} and target {list(target.shape)} differ in shape")
    return _MeanSquaredError.apply(reconstruction, target)


class _MeanSquaredError(torch.autograd.Function):
    """Σ (ŷ − y)² / tokens in one pass over ŷ − y each way (autograd's square/sum/backward take
    four): forward keeps e = ŷ − y, backward returns (2/tokens) g e."""

    @staticmethod
    def forward(ctx, reconstruction: Tensor, target: Tensor) -> Tensor:
        err = reconstruction - target
        tokens = max(math.prod(err.shape[:-2]), 1)
        ctx.tokens = tokens
        ctx.save_for_backward(err)
        return torch.linalg.vector_norm(err).square() / tokens

    @staticmethod
    def backward(ctx, grad: Tensor):
        (err,) = ctx.saved_tensors
        grad_err = err * (grad * (2 / ctx.tokens)).to(err.dtype)
        return (
            grad_err if ctx.needs_input_grad[0] else None,
            -grad_err if ctx.needs_input_grad[1] else None,
        )


def fvu(reconstruction: Tensor, target: Tensor, *, per_layer: bool = True) -> Tensor:
    """Fraction of variance unexplained: [L] per layer, or one scalar over all layers."""
    num_layers, d = target.shape[-2:]
    dtype = torch.promote_types(torch.promote_types(reconstruction.dtype, target.dtype), torch.float32)
    t = target.detach().reshape(-1, num_layers, d).to(dtype)
    err = reconstruction.detach().reshape(-1, num_layers, d).to(dtype) - t
    centered = t - t.mean(0)
    # sums of squares as norms (one pass, no squared copy), per layer or over all, then float64
    dims = (0, 2) if per_layer else None
    resid = torch.linalg.vector_norm(err, dim=dims).double().square()
    total = torch.linalg.vector_norm(centered, dim=dims).double().square()
    return (resid / total.clamp_min(torch.finfo(torch.float64).tiny)).to(target.dtype)


def sparsity_loss(
    features: Tensor, decoder_norms: Tensor, *, coefficient: float = 1.0, c: float = 1.0, kind: str = "tanh"
) -> Tensor:
    """coefficient · Σ tanh(c · a · ‖W_dec‖) ('tanh') or Σ a · ‖W_dec‖ ('l1'), mean over tokens."""
    weighted = features * decoder_norms.to(features.dtype)
    if kind == "tanh":
        per_token = torch.tanh(c * weighted)
    elif kind == "l1":
        per_token = weighted
    else:
        raise ValueError(f"sparsity kind '{kind}' is not one of {SPARSITY_KINDS}")
    return coefficient * _tokens_mean(per_token.sum(dim=(-2, -1)))


def sparsity_lambda_at(step: int, final: float, warmup_steps: int) -> float:
    """Sparsity coefficient at `step`: a linear ramp from 0 to `final` over `warmup_steps`."""
    if warmup_steps <= 0:
        return float(final)
    return float(final) * min(1.0, max(step, 0) / warmup_steps)


def preactivation_loss(
    preactivations: Tensor, threshold: Tensor, decoder_norms: Tensor, *, coefficient: float = 3e-6
) -> Tensor:
    """coefficient · Σ ReLU(θ − z) · ‖W_dec‖ (lifts dead JumpReLU features), mean over tokens."""
    gap = torch.relu(threshold.to(preactivations.dtype) - preactivations)
    return coefficient * _tokens_mean((gap * decoder_norms.to(gap.dtype)).sum(dim=(-2, -1)))


def auxiliary_topk_loss(
    preactivations: Tensor,
    residual: Tensor,
    dead_mask: Tensor,
    decode: Callable[[Tensor], Tensor],
    *,
    k_aux: int,
    coefficient: float = 1 / 32,
) -> Tensor:
    """Gao et al. 2024: reconstruct the residual e = y − ŷ from the top-k_aux dead features.

    `decode` maps features [..., L, F] to outputs [..., L, d] without the decoder bias, e.g.
    ``lambda a: clt.decode_features_normalized(a, x_std)``; dead_mask is [L, F]. Returns
    coefficient · mean‖e − ê‖² / mean‖e‖² (e detached); 0 when no feature is dead.
    """
    dead = dead_mask.to(device=preactivations.device, dtype=torch.bool)
    if dead.shape != preactivations.shape[-2:]:
        raise ValueError(f"dead_mask {list(dead.shape)} must be [L, F] = {list(preactivations.shape[-2:])}")
    if not bool(dead.any()):
        return preactivations.new_zeros(())
    k = min(k_aux, int(dead.sum(-1).max()))
    top = preactivations.masked_fill(~dead, float("-inf")).topk(k, dim=-1)
    aux = torch.zeros_like(preactivations).scatter(-1, top.indices, torch.relu(top.values))
    e = residual.detach()
    err = (decode(aux) - e).square().sum(dim=(-2, -1)).mean()
    return coefficient * err / e.square().sum(dim=(-2, -1)).mean().clamp_min(1e-12)


def compute_losses(
    model: CrossLayerTranscoder,
    inputs: Tensor,
    targets: Tensor,
    *,
    sparsity_coef: float = 0.0,
    sparsity_c: float = 1.0,
    sparsity_kind: str = "tanh",
    preactivation_coef: float = 0.0,
    dead_mask: Tensor | None = None,
    k_aux: int = 0,
    aux_coef: float = 1 / 32,
    dense_features: bool = True,
) -> tuple[LossTerms, CLTOutput]:
    """All loss terms on standardised inputs and targets [..., L, d]; returns (terms, output).

    The pre-activation term applies to JumpReLU models; the auxiliary term to TopK/BatchTopK
    models when `dead_mask` is given and `k_aux` > 0. With Matryoshka prefixes the
    reconstruction term sums over the prefixes (module docstring). ``dense_features=False``
    lets the output's features be sparse where no term needs them dense
    (`CrossLayerTranscoder.forward_normalized`).
    """
    prefixes = model.cfg.matryoshka_prefixes or []
    if prefixes:
        out, recons = model.forward_prefixes(inputs)
    else:
        out = model.forward_normalized(inputs, dense_features=dense_features or bool(sparsity_coef))
        recons = [out.reconstruction]
    act = model.cfg.activation_fn
    use_pre = bool(preactivation_coef) and act == "jumprelu"
    norms = model.decoder_norms() if sparsity_coef or use_pre else None
    zero = out.reconstruction.new_zeros(())
    recon = sum((reconstruction_loss(r, targets) for r in recons[1:]), reconstruction_loss(recons[0], targets))
    metrics = {f"fvu_prefix_{m}": fvu(r.float(), targets.float(), per_layer=False) for m, r in zip(prefixes, recons)}
    sparse = zero
    if sparsity_coef:
        sparse = sparsity_loss(out.features, norms, coefficient=sparsity_coef, c=sparsity_c, kind=sparsity_kind)
    pre = zero
    if use_pre:
        pre = preactivation_loss(out.preactivations, model.threshold, norms, coefficient=preactivation_coef)
    aux = zero
    if act in ("topk", "batchtopk") and dead_mask is not None and k_aux > 0 and bool(dead_mask.any()):
        aux = auxiliary_topk_loss(
            out.preactivations,
            targets - out.reconstruction,
            dead_mask,
            lambda a: model.decode_features_normalized(a, inputs),
            k_aux=k_aux,
            coefficient=aux_coef,
        )
    return LossTerms(recon, sparse, pre, aux, MappingProxyType(metrics)), out
