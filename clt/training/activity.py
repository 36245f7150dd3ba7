"""Feature activity during training: firing counts and tokens since each feature last fired."""

from __future__ import annotations

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
        self, features: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Record a batch of feature activations [..., L, F]; returns how many entries fired (a tensor).

        `reduce` sums a tensor over the ranks that hold the other rows of the batch (data
        parallel), so that the counts are those of the whole batch.
        """
        active = (features.detach() != 0).reshape(-1, *features.shape[-2:])
        counts = active.sum(0)
        tokens = torch.full((), active.shape[0], dtype=counts.dtype, device=counts.device)  # no host copy
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
