"""Metrics of a trained transcoder: reconstruction (FVU, L0, dead features, activation frequency)
on a store, and replacement-model metrics on the live model (KL, top-1 agreement, CE recovered).

The replacement metrics splice the transcoder into the model with `clt.nnsight.splice`: layer by
layer, in execution order, each covered MLP's output is replaced by the transcoder's
reconstruction, whose features are encoded from the MLP inputs of the spliced run itself. A CLT's
feature at layer l adds its decoders to the outputs of layers l..L-1.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from clt.data.windows import pad_id, pad_windows
from clt.models.transcoder import CrossLayerTranscoder
from clt.nnsight.splice import language_model, spliced_logits
from clt.store import ActivationStore
from clt.training.activity import FeatureActivity


@dataclasses.dataclass
class ReconstructionMetrics:
    """How well a transcoder reconstructs the MLP outputs in a store."""

    fvu_per_layer: list[float]
    """Fraction of variance unexplained per layer (raw activations)."""
    fvu: float
    """FVU over all layers together."""
    l0_per_layer: list[float]
    """Mean number of active features per token, per layer."""
    l0: float
    """Mean active features per token, summed over layers."""
    dead_fraction: float
    """Fraction of features that never fired on the evaluated tokens."""
    activation_frequency: torch.Tensor
    """Firing frequency of each feature [L, F]."""
    n_tokens: int
    """Tokens evaluated."""

    @property
    def mean_layer_fvu(self) -> float:
        """FVU averaged over layers (the overall FVU hides bad layers behind high-variance ones)."""
        return sum(self.fvu_per_layer) / len(self.fvu_per_layer)

    def as_dict(self) -> dict[str, Any]:
        """Scalars and per-layer lists (no tensors)."""
        scalars = {k: v for k, v in dataclasses.asdict(self).items() if not isinstance(v, torch.Tensor)}
        return {**scalars, "mean_layer_fvu": self.mean_layer_fvu}


@torch.no_grad()
def reconstruction_metrics(
    transcoder: CrossLayerTranscoder, store: ActivationStore, *, max_tokens: int = 10_000, batch_size: int = 1024
) -> ReconstructionMetrics:
    """FVU, L0, dead fraction and activation frequency on the first `max_tokens` tokens of a store."""
    was_training = transcoder.training
    transcoder.eval()
    device = next(transcoder.parameters()).device
    inputs, outputs = store.tensors(max_tokens)
    L, F = transcoder.cfg.num_layers, transcoder.cfg.num_features
    activity = FeatureActivity(L, F, device)
    resid = torch.zeros(L, dtype=torch.float64)
    l0 = torch.zeros(L, dtype=torch.float64)
    for lo in range(0, inputs.shape[0], batch_size):
        x, y = inputs[lo : lo + batch_size].to(device), outputs[lo : lo + batch_size].to(device)
        out = transcoder(x)
        resid += (out.reconstruction - y).double().square().sum((0, 2)).cpu()
        l0 += (out.features != 0).double().sum((0, 2)).cpu()
        activity.update(out.features)
    total = (outputs.double() - outputs.double().mean(0)).square().sum((0, 2))
    transcoder.train(was_training)
    n = inputs.shape[0]
    return ReconstructionMetrics(
        fvu_per_layer=(resid / total).tolist(),
        fvu=float(resid.sum() / total.sum()),
        l0_per_layer=(l0 / n).tolist(),
        l0=float(l0.sum() / n),
        dead_fraction=float((activity.fire_count == 0).float().mean()),
        activation_frequency=activity.frequency().float().cpu(),
        n_tokens=n,
    )


@dataclasses.dataclass
class ReplacementMetrics:
    """The model with its MLPs replaced by the transcoder, compared with the original."""

    kl: float
    """Mean KL(original ‖ replaced) of next-token distributions (nats per token)."""
    top1_agreement: float
    """Fraction of positions whose most likely next token is unchanged."""
    ce_original: float
    """Next-token cross-entropy of the original model."""
    ce_replaced: float
    """Next-token cross-entropy with the transcoder spliced in."""
    ce_zero_ablated: float
    """Next-token cross-entropy with the covered MLP outputs set to zero."""
    ce_recovered: float
    """(CE_zero − CE_replaced) / (CE_zero − CE_original): 1 = as good as the model, 0 = as bad as ablation."""
    n_tokens: int
    """Positions evaluated."""

    def as_dict(self) -> dict[str, float]:
        """All fields as numbers."""
        return dataclasses.asdict(self)


_EXPM1_MAX = 50.0
"""Largest d − c summed through expm1 (e^50 · V stays far below the float32 maximum)."""


def next_token_kl(logits_p: torch.Tensor, logits_q: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Σ over positions where `valid` [B, T] of KL(p ‖ q), from the logits [B, T, V] of p and q.

    Computed from the logit difference d = logits_q − logits_p and its mean c = E_p[d], as
    KL = log1p(E_p[expm1(d − c)]) − E_p[d − c], in at least float32: its rounding error is about
    u·max|d − c| rather than u·(log V + max|logit|) for Σ p (log p − log q), so a KL near zero (an
    exact splice) is resolved instead of being rounding noise of either sign. Any per-position shift
    of the logits (log-probabilities) gives the same KL. Rows where some d − c exceeds 50 (where
    expm1 could overflow) use log-sum-exp instead."""
    dtype = torch.promote_types(torch.promote_types(logits_p.dtype, logits_q.dtype), torch.float32)
    lp, lq = logits_p[valid].to(dtype), logits_q[valid].to(dtype)
    p = lp.softmax(-1)
    d = lq - lp
    a = d - (p * d).sum(-1, keepdim=True).detach()  # the KL does not depend on the shift c (Σ p = 1)
    kl = torch.log1p((p * torch.expm1(a.clamp(max=_EXPM1_MAX))).sum(-1))
    far = a.amax(-1) > _EXPM1_MAX
    if bool(far.any()):
        kl = kl.index_put((far,), torch.logsumexp(lp[far].log_softmax(-1) + a[far], -1))
    return (kl - (p * a).sum(-1)).sum()


def bos_keep_mask(mask: torch.Tensor, prepend_bos: bool, keep_bos: bool) -> torch.Tensor:
    """[B, T] bool: true at position 0 when a prepended BOS keeps the model's own MLP outputs."""
    keep = torch.zeros_like(mask, dtype=torch.bool)
    keep[:, 0] = prepend_bos and keep_bos
    return keep


def next_token_valid(mask: torch.Tensor) -> torch.Tensor:
    """[B, T-1] bool: positions whose next token exists (both in the attention mask)."""
    return (mask[:, 1:] * mask[:, :-1]).bool()


@torch.no_grad()
def replacement_metrics(
    model: Any,
    tokenizer: Any,
    transcoder: CrossLayerTranscoder,
    texts: list[str] | None = None,
    *,
    max_windows: int = 16,
    context_length: int = 64,
    batch_size: int = 8,
    prepend_bos: bool = True,
    keep_bos: bool = True,
) -> ReplacementMetrics:
    """KL, top-1 agreement and fraction of CE recovered with the transcoder spliced into the model.

    With `keep_bos` (default) the BOS position keeps the model's own MLP outputs in both the
    replaced and the zero-ablated run: stores leave BOS out, so a transcoder never sees its
    (outlier) activations, and attribution treats it the same way (`zero_bos`)."""
    from clt.data.corpus import load_texts, token_windows

    transcoder = transcoder.eval()
    lm, mlp_paths = language_model(model, tokenizer, transcoder)
    windows = []
    for window in token_windows(
        load_texts(texts if texts is not None else "pydoc"), tokenizer, context_length, prepend_bos=prepend_bos
    ):
        if len(window.token_ids) >= 2:
            windows.append(window)
        if len(windows) >= max_windows:
            break
    sums = dict(kl=0.0, top1_agreement=0.0, ce_original=0.0, ce_replaced=0.0, ce_zero_ablated=0.0)
    count = 0
    pad = pad_id(tokenizer)
    device = next(model.parameters()).device
    for lo in range(0, len(windows), batch_size):
        ids, mask = pad_windows(windows[lo : lo + batch_size], pad)
        ids, mask = ids.to(device), mask.to(device)
        keep = bos_keep_mask(mask, prepend_bos, keep_bos)
        logits = {
            mode: spliced_logits(lm, mlp_paths, transcoder, ids, mask, mode, keep)
            for mode in ("none", "replace", "zero")
        }
        logp = {mode: value.log_softmax(-1) for mode, value in logits.items()}
        valid = next_token_valid(mask)
        targets = ids[:, 1:]
        for mode, key in (("none", "ce_original"), ("replace", "ce_replaced"), ("zero", "ce_zero_ablated")):
            nll = -logp[mode][:, :-1].gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            sums[key] += float(nll[valid].sum())
        p, q = logp["none"][:, :-1], logp["replace"][:, :-1]
        sums["kl"] += float(next_token_kl(logits["none"][:, :-1], logits["replace"][:, :-1], valid))
        sums["top1_agreement"] += float((p[valid].argmax(-1) == q[valid].argmax(-1)).sum())
        count += int(valid.sum())
    if count == 0:
        raise ValueError("no positions to evaluate: give texts of at least two tokens")
    mean = {k: v / count for k, v in sums.items()}
    gap = mean["ce_zero_ablated"] - mean["ce_original"]
    recovered = (mean["ce_zero_ablated"] - mean["ce_replaced"]) / gap if abs(gap) > 1e-12 else float("nan")
    return ReplacementMetrics(**mean, ce_recovered=recovered, n_tokens=count)
