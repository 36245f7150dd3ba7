"""Automated feature interpretation: top activating contexts, activation statistics, top logits, labels."""

from clt.interp.features import (
    Context,
    FeatureCard,
    FeatureCards,
    auto_label,
    build_feature_cards,
    fingerprint,
    output_logit_effects,
    unembedding_of,
)

__all__ = [
    "Context",
    "FeatureCard",
    "FeatureCards",
    "auto_label",
    "build_feature_cards",
    "fingerprint",
    "output_logit_effects",
    "unembedding_of",
]
