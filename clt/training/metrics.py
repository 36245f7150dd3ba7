"""Metrics of a trained transcoder: reconstruction (FVU, L0, dead features, activation frequency)
on a store, and replacement-model metrics on the live model (KL, top-1 agreement, CE recovered).

The replacement metrics splice the transcoder into the model with nnsight: layer by layer, in
execution order, each covered MLP's output is replaced by the transcoder's reconstruction, whose
features are encoded from the MLP inputs of the spliced run itself. A CLT's feature at layer l
adds its decoders to the outputs of layers l..L-1.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from clt.data.windows import pad_id, pad_windows
from clt.models.transcoder import CrossLayerTranscoder
from clt.store import ActivationStore
from clt.training.activity import FeatureActivity

_FAR_BELOW = -1e9


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

    def as_dict(self) -> dict[str, Any]:
        """Scalars and per-layer lists (no tensors)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if not isinstance(v, torch.Tensor)}


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


def _envoy(root: Any, path: str) -> Any:
    for part in path.split("."):
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root


def _standardised_input(transcoder: CrossLayerTranscoder, layer: int, x: torch.Tensor) -> torch.Tensor:
    """Raw MLP input x [..., d] of transcoder layer `layer`, standardised in float32 (or wider),
    then in the parameter dtype (as `CrossLayerTranscoder.normalize_inputs`)."""
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    return ((wide - transcoder.input_mean[layer]) / transcoder.input_std[layer]).to(transcoder.W_enc.dtype)


def _layer_features(transcoder: CrossLayerTranscoder, layer: int, x_std: torch.Tensor) -> torch.Tensor:
    """Features [..., F] of transcoder layer `layer` from its standardised input [..., d] (eval-mode rule)."""
    w = transcoder
    z_l = x_std @ w.W_enc[layer].T + w.b_enc[layer]
    z = z_l.new_full((*z_l.shape[:-1], w.cfg.num_layers, w.cfg.num_features), _FAR_BELOW)
    z[..., layer, :] = z_l
    return w.activate(z)[..., layer, :]


def spliced_logits(
    lm: Any,
    mlp_paths: list[str],
    transcoder: CrossLayerTranscoder,
    ids: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    keep: torch.Tensor | None = None,
    *,
    grad: bool = False,
) -> torch.Tensor:
    """Logits [B, T, V] with the covered MLP outputs replaced ('replace'), zeroed ('zero') or kept
    ('none'); positions where `keep` [B, T] is true keep the model's own outputs. With `grad` the
    logits stay differentiable w.r.t. the transcoder (through the frozen model)."""
    if mode not in ("none", "replace", "zero"):
        raise ValueError(f"mode must be 'none', 'replace' or 'zero', got {mode!r}")
    L = transcoder.cfg.num_layers
    with torch.set_grad_enabled(grad), lm.trace({"input_ids": ids, "attention_mask": mask}):
        pending: torch.Tensor | None = None
        for l, path in enumerate(mlp_paths):
            mlp = _envoy(lm, path)
            if mode == "zero":
                mlp.output = _spliced(mlp.output, torch.zeros_like(mlp.output), keep)
            elif mode == "replace":
                x = mlp.input
                x_std = _standardised_input(transcoder, l, x)
                a = _layer_features(transcoder, l, x_std)
                if transcoder.cfg.architecture == "molt":
                    y_std = transcoder.layer_output(l, a, x_std) + transcoder.b_dec[l]
                else:
                    contrib = torch.einsum("...f,fjd->...jd", a, transcoder.W_dec[l])
                    if pending is None:
                        pending = contrib.new_zeros(*contrib.shape[:-2], L, contrib.shape[-1])
                    pending = pending.index_add(
                        -2, torch.arange(l, l + contrib.shape[-2], device=contrib.device), contrib
                    )
                    y_std = pending[..., l, :] + transcoder.b_dec[l]
                if transcoder.cfg.skip_connection:
                    y_std = y_std + x_std @ transcoder.W_skip[l].T
                y = (y_std * transcoder.output_std[l] + transcoder.output_mean[l]).to(mlp.output.dtype)
                mlp.output = _spliced(mlp.output, y, keep)
        logits = lm.output.logits.save()
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def next_token_kl(logp: torch.Tensor, logq: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Σ over positions where `valid` [B, T] of KL(p ‖ q), from log-probabilities [B, T, V]."""
    p, q = logp[valid], logq[valid]
    return (p.exp() * (p - q)).sum()


def language_model(model: Any, tokenizer: Any, transcoder: CrossLayerTranscoder) -> tuple[Any, list[str]]:
    """(nnsight LanguageModel, MLP module paths of the transcoder's layers); errors if they do not fit."""
    import warnings

    from nnsight import LanguageModel

    from clt.nnsight.models import find_layout

    transcoder.require_mlp_replacement("splicing into the model", linear=False)
    layout = find_layout(model)
    cfg = transcoder.cfg
    if cfg.d_model != layout.d_model or max(cfg.layers) >= layout.num_layers:
        raise ValueError(
            f"the transcoder (layers {cfg.layers}, d_model {cfg.d_model}) does not fit the model "
            f"({layout.num_layers} layers, d_model {layout.d_model}); use a transcoder trained on this model"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = LanguageModel(model, tokenizer=tokenizer)
    return lm, [layout.mlp_paths[layer] for layer in cfg.layers]


def bos_keep_mask(mask: torch.Tensor, prepend_bos: bool, keep_bos: bool) -> torch.Tensor:
    """[B, T] bool: true at position 0 when a prepended BOS keeps the model's own MLP outputs."""
    keep = torch.zeros_like(mask, dtype=torch.bool)
    keep[:, 0] = prepend_bos and keep_bos
    return keep


def next_token_valid(mask: torch.Tensor) -> torch.Tensor:
    """[B, T-1] bool: positions whose next token exists (both in the attention mask)."""
    return (mask[:, 1:] * mask[:, :-1]).bool()


def _spliced(original: torch.Tensor, new: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    return new if keep is None else torch.where(keep[..., None], original, new)


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
    sums = dict(kl=0.0, top1=0.0, ce_original=0.0, ce_replaced=0.0, ce_zero_ablated=0.0)
    count = 0
    pad = pad_id(tokenizer)
    device = next(model.parameters()).device
    for lo in range(0, len(windows), batch_size):
        ids, mask = pad_windows(windows[lo : lo + batch_size], pad)
        ids, mask = ids.to(device), mask.to(device)
        keep = bos_keep_mask(mask, prepend_bos, keep_bos)
        logp = {
            mode: spliced_logits(lm, mlp_paths, transcoder, ids, mask, mode, keep).log_softmax(-1)
            for mode in ("none", "replace", "zero")
        }
        valid = next_token_valid(mask)
        targets = ids[:, 1:]
        for mode, key in (("none", "ce_original"), ("replace", "ce_replaced"), ("zero", "ce_zero_ablated")):
            nll = -logp[mode][:, :-1].gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            sums[key] += float(nll[valid].sum())
        p, q = logp["none"][:, :-1], logp["replace"][:, :-1]
        sums["kl"] += float(next_token_kl(p, q, valid))
        sums["top1"] += float((p[valid].argmax(-1) == q[valid].argmax(-1)).sum())
        count += int(valid.sum())
    if count == 0:
        raise ValueError("no positions to evaluate: give texts of at least two tokens")
    mean = {k: v / count for k, v in sums.items()}
    gap = mean["ce_zero_ablated"] - mean["ce_original"]
    recovered = (mean["ce_zero_ablated"] - mean["ce_replaced"]) / gap if abs(gap) > 1e-12 else float("nan")
    return ReplacementMetrics(
        kl=mean["kl"],
        top1_agreement=mean["top1"],
        ce_original=mean["ce_original"],
        ce_replaced=mean["ce_replaced"],
        ce_zero_ablated=mean["ce_zero_ablated"],
        ce_recovered=recovered,
        n_tokens=count,
    )
