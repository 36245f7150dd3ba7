"""Random non-trivial parameters for a transcoder: for format checks and tests, not training."""

from __future__ import annotations

import torch

from clt.models.transcoder import CrossLayerTranscoder


def randomize_parameters(
    model: CrossLayerTranscoder, seed: int = 0, *, standardisation: bool = True
) -> CrossLayerTranscoder:
    """Give `model` random biases, thresholds, skip weights and (optionally) standardisation, in place.

    A freshly initialised transcoder has zero biases, equal thresholds and identity statistics,
    so a reader that drops or transposes any of them would still pass; this makes each one matter.
    Returns the model in eval mode.
    """
    cfg, g = model.cfg, torch.Generator().manual_seed(seed)
    L, F, d = cfg.num_layers, cfg.num_features, cfg.d_model
    with torch.no_grad():
        model.b_enc.copy_(torch.randn(L, F, generator=g) * 0.3)
        model.b_dec.copy_(torch.randn(L, d, generator=g) * 0.3)
        if cfg.skip_connection:
            model.W_skip.copy_(torch.randn(L, d, d, generator=g) * 0.2)
        if cfg.activation_fn == "jumprelu":
            model.log_threshold.copy_(torch.empty(L, F).uniform_(-3, -0.5, generator=g))
        if cfg.activation_fn == "batchtopk":
            model.batchtopk.threshold.copy_(torch.rand(L, generator=g) * 0.3)
    if standardisation:
        model.set_normalization(
            torch.randn(L, d, generator=g),
            torch.rand(L, d, generator=g) + 0.5,
            torch.randn(L, d, generator=g),
            torch.rand(L, d, generator=g) + 0.5,
        )
    return model.eval()
