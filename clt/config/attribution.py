"""AttributionConfig: which logits and features an attribution graph covers, and batch sizes."""

from __future__ import annotations

import dataclasses

from clt.config.base import ConfigBase, check


@dataclasses.dataclass
class AttributionConfig(ConfigBase):
    """Settings of `attribute`: logit targets, feature budget, BOS handling, batching."""

    max_n_logits: int = 10
    """Most logit nodes: the likeliest next tokens at the last position."""
    desired_logit_prob: float = 0.95
    """Keep logit nodes until their cumulative probability reaches this (capped by max_n_logits)."""
    batch_size: int = 64
    """Target nodes per backward pass (the prompt is copied this many times; memory grows with it)."""
    max_feature_nodes: int | None = None
    """Most feature nodes; when set, features are visited in order of estimated influence."""
    update_interval: int = 4
    """With max_feature_nodes: batches between two re-rankings of the remaining features."""
    zero_bos: bool = True
    """Zero the features and error terms at position 0 when it holds a special (BOS) token."""
    prepend_bos: bool = True
    """Prepend the BOS token to a text prompt (the convention of extraction and training)."""

    def __post_init__(self) -> None:
        check(
            isinstance(self.max_n_logits, int) and self.max_n_logits >= 1,
            f"max_n_logits must be a positive integer, got {self.max_n_logits!r}",
        )
        check(0 < self.desired_logit_prob <= 1, f"desired_logit_prob must be in (0, 1], got {self.desired_logit_prob}")
        check(
            isinstance(self.batch_size, int) and self.batch_size >= 1,
            f"batch_size must be a positive integer, got {self.batch_size!r}",
        )
        check(
            self.max_feature_nodes is None or (isinstance(self.max_feature_nodes, int) and self.max_feature_nodes >= 0),
            f"max_feature_nodes must be None (all) or a non-negative integer, got {self.max_feature_nodes!r}",
        )
        check(
            isinstance(self.update_interval, int) and self.update_interval >= 1,
            f"update_interval must be a positive integer, got {self.update_interval!r}",
        )
