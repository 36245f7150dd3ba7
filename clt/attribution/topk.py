"""TopK dictionaries in attribution: keep TopK exact with its selection frozen, or convert to JumpReLU.

A TopK feature's activation depends on the other features' pre-activations (its rank), not on its
own input alone, so the local replacement model needs a choice (`AttributionConfig.topk_mode`):

- ``freeze`` (default): the selection of the clean run is held fixed for the prompt, like the
  attention pattern (`ReplacementModel.prepare` records it; the splice uses it): a selected feature's
  activation is its pre-activation, an unselected one's is 0. The graph explains the dictionary as
  trained and the replacement logits equal the model's; but the local model is only valid near the
  prompt: an intervention that pushes a feature below the k-th or another above it changes nothing
  about which features are on, as it would in the real TopK.
- ``jumprelu``: the dictionary is converted once (`clt.models.convert.convert_to_jumprelu`: per-feature
  thresholds, one scale per layer bisected so that the L0 per layer matches TopK's k on calibration
  tokens of the default corpus). Each feature then fires on its own input, as circuit-tracer's
  JumpReLU transcoders do, and interventions re-evaluate each feature; but the converted dictionary
  differs from the trained one: per-token active sets and L0 vary around k, reconstruction error
  grows, and the error nodes absorb the difference (replacement exactness still holds).
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from clt.models.transcoder import CrossLayerTranscoder

logger = logging.getLogger(__name__)
TOPK_MODES = ("freeze", "jumprelu")


def topk_for_attribution(
    transcoder: CrossLayerTranscoder, model: nn.Module, tokenizer: Any, mode: str, *, calibration_tokens: int = 4096
) -> CrossLayerTranscoder:
    """The dictionary attribution uses: `transcoder` itself unless it is TopK and `mode` is 'jumprelu',
    then its JumpReLU conversion calibrated on `calibration_tokens` of the model's activations over
    the default corpus (module docstring)."""
    if mode not in TOPK_MODES:
        raise ValueError(f"topk_mode must be one of {TOPK_MODES}, got {mode!r}")
    if transcoder.cfg.activation_fn != "topk" or mode == "freeze":
        return transcoder
    from clt.models.convert import convert_to_jumprelu
    from clt.nnsight.extractors import ActivationExtractor

    if tokenizer is None:
        raise ValueError("topk_mode='jumprelu' calibrates on text: pass the tokenizer (or use topk_mode='freeze')")
    cfg = transcoder.cfg
    extractor = ActivationExtractor(
        model=model, tokenizer=tokenizer, model_name=cfg.model_name or "model", layers=cfg.layers
    )
    store = extractor.extract(max_tokens=calibration_tokens, store_dtype="float32", progress=False)
    logger.info("converting the TopK dictionary to JumpReLU on %d calibration tokens", store.n_tokens)
    return convert_to_jumprelu(transcoder, store, calibration_tokens=calibration_tokens).eval()


__all__ = ["TOPK_MODES", "topk_for_attribution"]
