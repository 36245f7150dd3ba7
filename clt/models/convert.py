"""TopK/BatchTopK → JumpReLU: the same weights with per-feature thresholds calibrated to the same L0.

After crosslayer-coding (utahnlp/crosslayer-coding): `ThetaManager.estimate_theta_posthoc` in
``clt/models/theta.py`` records, per batch, each feature's smallest pre-activation that BatchTopK
selected and averages it over batches (θ_i); ``scripts/convert_batchtopk_to_jumprelu.py``
(`calibrate_layerwise_theta_for_l0_matching`) then bisects one scale s_l per layer so that the
JumpReLU model's L0 on calibration tokens matches the BatchTopK model's. Unlike crosslayer-coding
(which collapses θ to one value per layer before calibrating) we keep the per-feature θ_i and scale
it, θ = s_l · θ_i; features never selected get θ = `never_selected_threshold` (they stay off).
Thresholds live in standardised pre-activation units, as ``log_threshold`` of a JumpReLU model.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from clt.models.activations import batchtopk, topk
from clt.models.transcoder import CrossLayerTranscoder

logger = logging.getLogger(__name__)


@torch.no_grad()
def source_features(transcoder: CrossLayerTranscoder, z: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Features [N, L, F] of pre-activations z under the TopK/BatchTopK training rule, batch by batch."""
    c = transcoder.cfg
    if c.activation_fn == "topk":
        return topk(z, c.topk)
    return torch.cat([batchtopk(part, c.topk, c.batchtopk_scope) for part in z.split(batch_size)])


@torch.no_grad()
def convert_to_jumprelu(
    transcoder: CrossLayerTranscoder,
    store: Any,
    *,
    calibration_tokens: int = 8192,
    batch_size: int = 1024,
    never_selected_threshold: float = 1e6,
    max_iters: int = 60,
) -> CrossLayerTranscoder:
    """A JumpReLU copy of a TopK/BatchTopK transcoder whose per-layer L0 on the first
    `calibration_tokens` of `store` matches the source's (BatchTopK over batches of `batch_size`)."""
    c = transcoder.cfg
    if c.activation_fn not in ("topk", "batchtopk"):
        raise ValueError(
            f"convert_to_jumprelu converts TopK/BatchTopK transcoders; this one is "
            f"'{c.activation_fn}'{' already' if c.activation_fn == 'jumprelu' else ''} — use it as is"
        )
    if c.architecture != "transcoder":
        raise ValueError(f"convert_to_jumprelu needs a feature transcoder, not architecture '{c.architecture}'")
    if store.d_model != c.d_model or list(store.layers) != list(c.layers):
        raise ValueError(
            f"the store (layers {store.layers}, d_model {store.d_model}) does not match the transcoder "
            f"(layers {c.layers}, d_model {c.d_model}); calibrate on the store it was trained on"
        )
    if store.model_name and c.model_name and store.model_name != c.model_name:
        raise ValueError(
            f"the store holds activations of {store.model_name!r}, the transcoder was trained on "
            f"{c.model_name!r}; calibrate on a store of the same model"
        )
    device = transcoder.W_enc.device
    x, _ = store.tensors(calibration_tokens)
    z = torch.cat([transcoder.preactivations(part.to(device)) for part in x.split(batch_size)])
    selected = source_features(transcoder, z, batch_size) > 0
    target_l0 = selected.float().sum(-1).mean(0)  # [L]
    theta = _mean_smallest_selected(z, selected, batch_size, never_selected_threshold)
    scale = torch.stack(
        [_bisect_scale(z[:, l], theta[l], float(target_l0[l]), max_iters) for l in range(c.num_layers)]
    ).to(theta.device)
    new = CrossLayerTranscoder(c.replace(activation_fn="jumprelu", sparse_decode="auto")).to(device)
    state = {k: v for k, v in transcoder.state_dict().items() if not k.startswith("batchtopk.")}
    missing, unexpected = new.load_state_dict(state, strict=False)
    if unexpected or set(missing) != {"log_threshold"}:
        raise RuntimeError(
            f"weights did not map onto the JumpReLU transcoder (missing {missing}, unexpected {unexpected})"
        )
    new.log_threshold.copy_((scale[:, None] * theta).clamp_min(1e-12).log().to(new.log_threshold.dtype))
    logger.info("JumpReLU conversion: target L0 per layer %s, scales %s", target_l0.tolist(), scale.tolist())
    return new.train(transcoder.training)


def _mean_smallest_selected(z: torch.Tensor, selected: torch.Tensor, batch_size: int, never: float) -> torch.Tensor:
    """θ_i [L, F]: mean over batches of feature i's smallest selected pre-activation (crosslayer-coding)."""
    total = torch.zeros(z.shape[1:], dtype=torch.float64, device=z.device)
    count = torch.zeros_like(total)
    for part, chosen in zip(z.split(batch_size), selected.split(batch_size)):
        smallest = torch.where(chosen, part, torch.full_like(part, math.inf)).amin(0)
        seen = torch.isfinite(smallest)
        total += torch.where(seen, smallest, 0).double()
        count += seen.double()
    return torch.where(count > 0, total / count.clamp_min(1), never).float()


def _bisect_scale(z: torch.Tensor, theta: torch.Tensor, target: float, max_iters: int) -> torch.Tensor:
    """Scale s (log-space bisection) with mean_n #{i: z[n, i] > s·θ_i} closest to `target`."""

    def l0(s: float) -> float:
        return float((z > s * theta).float().sum(-1).mean())

    lo, hi = math.log(1e-4), math.log(1e4)
    best, best_gap = 1.0, abs(l0(1.0) - target)
    for _ in range(max_iters):
        mid = (lo + hi) / 2
        value = l0(math.exp(mid))
        if abs(value - target) < best_gap:
            best, best_gap = math.exp(mid), abs(value - target)
        if value > target:
            lo = mid
        else:
            hi = mid
    return torch.tensor(best)


__all__ = ["convert_to_jumprelu", "source_features"]
