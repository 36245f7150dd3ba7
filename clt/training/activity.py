"""Feature activity during training: firing counts and tokens since each feature last fired."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


class FeatureActivity:
    """Counts, per feature [L, F], how often it fired and how many tokens ago it last fired."""

    def __init__(self, num_layers: int, num_features: int, device: str | torch.device = "cpu") -> None:
        self.fire_count = torch.zeros(num_layers, num_features, dtype=torch.long, device=device)
        self.tokens_since_fired = torch.zeros(num_layers, num_features, dtype=torch.long, device=device)
        self.tokens_seen = torch.zeros((), dtype=torch.long, device=device)

    @torch.no_grad()
    def update(
        self,
        features: torch.Tensor,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
        *,
        counts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Record a batch of feature activations [..., L, F]; returns how many entries fired (a tensor).

        `reduce` sums a tensor over the ranks that hold the other rows of the batch (data
        parallel), so that the counts are those of the whole batch. `counts` [L, F]: the
        `fire_counts` of `features` when the caller has them (`CLTOutput.fire_counts`; then
        `features` may be sparse).
        """
        num_tokens = math.prod(features.shape[:-2])
        if counts is None:
            counts = fire_counts(features)
        tokens = torch.full((), num_tokens, dtype=counts.dtype, device=counts.device)  # no host copy
        if reduce is not None:
            packed = reduce(torch.cat([counts.reshape(-1), tokens.view(1)]))
            counts, tokens = packed[:-1].view_as(counts), packed[-1]
        self.fire_count += counts
        self.tokens_since_fired = torch.where(
            counts > 0, torch.zeros_like(self.tokens_since_fired), self.tokens_since_fired + tokens
        )
        self.tokens_seen += tokens
        return counts.sum()

    def dead_mask(self, after_tokens: int) -> torch.Tensor:
        """Features that have not fired in the last `after_tokens` tokens, [L, F] bool."""
        return self.tokens_since_fired >= after_tokens

    def frequency(self) -> torch.Tensor:
        """Fraction of tokens on which each feature fired, [L, F]."""
        return self.fire_count.double() / max(int(self.tokens_seen), 1)

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors to checkpoint."""
        return {
            "fire_count": self.fire_count.cpu(),
            "tokens_since_fired": self.tokens_since_fired.cpu(),
            "tokens_seen": self.tokens_seen.cpu(),
        }

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore from `state()`."""
        for name in ("fire_count", "tokens_since_fired", "tokens_seen"):
            getattr(self, name).copy_(state[name])


def fire_counts(features: torch.Tensor) -> torch.Tensor:
    """On how many tokens each feature of activations [..., L, F] is nonzero (NaN counts), [L, F]
    int64.

    On the CPU the comparison is written as float 0/1 and summed (exact below 2^24 tokens): a
    bool → int64 sum there first converts a tensor of the features' size.
    """
    flat = features.detach().reshape(-1, features.shape[-2] * features.shape[-1])
    if flat.device.type == "cpu" and flat.shape[0] < 2**24:
        ones = torch.ne(flat, 0, out=torch.empty(flat.shape, dtype=torch.float32))
        return ones.sum(0).long().view(features.shape[-2:])
    return (flat != 0).sum(0).view(features.shape[-2:])
