"""Automated feature interpretation: top activating contexts, activation statistics, top logits, labels."""

from clt.interp.features import (
    Context,
    FeatureCard,
    FeatureCards,
    build_feature_cards,
    fingerprint,
    output_logit_effects,
    unembedding_of,
)
from clt.interp.labels import TermCounts, auto_label, is_stop_word, label_cards, label_report, llm_labeller

__all__ = [
    "Context",
    "FeatureCard",
    "FeatureCards",
    "TermCounts",
    "auto_label",
    "build_feature_cards",
    "fingerprint",
    "is_stop_word",
    "label_cards",
    "label_report",
    "llm_labeller",
    "output_logit_effects",
    "unembedding_of",
]
