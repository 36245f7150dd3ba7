"""InterventionConfig: how `clt steer` changes features and generates (see clt.attribution.intervene)."""

from __future__ import annotations

import dataclasses

from clt.config.base import ConfigBase, check

MODES = ("set", "scale", "add")


@dataclasses.dataclass
class InterventionConfig(ConfigBase):
    """Settings of an intervention and of the continuation generated with it."""

    mode: str = "set"
    """How the value applies to each feature: 'set' (new activation), 'scale' (factor) or 'add'
    (added to the activation: its decoder direction times the value joins the MLP outputs)."""
    value: float = 0.0
    """The value of every intervention (default: set to 0, an ablation)."""
    freeze_attention: bool = False
    """Hold attention patterns at the clean run's (for the prompt's pass)."""
    constrained_layers: str | None = None
    """Model layers whose MLP outputs are held at the clean run's plus the interventions' decoder
    writes: 'all' (with attention frozen: the graph's direct effects) or a list such as '0,1,2';
    none: iterative patching (effects propagate through the model)."""
    max_new_tokens: int = 20
    """Tokens to generate after the prompt, with and without the intervention (0: next token only)."""
    do_sample: bool = False
    """Sample the continuation (temperature, top_k, top_p, seed) instead of greedy decoding."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_k: int | None = None
    """Sample among the k likeliest tokens only."""
    top_p: float | None = None
    """Sample among the likeliest tokens holding this probability only (nucleus)."""
    seed: int = 0
    """Seed of the sampler."""
    use_cache: bool = True
    """Generate on transformers' KV cache (one token per pass); off: re-run the whole sequence."""
    prepend_bos: bool = True
    """Prepend the BOS token to a text prompt (the convention of extraction and attribution)."""
    top_tokens: int = 5
    """Likeliest next tokens to report, with and without the intervention."""

    def __post_init__(self) -> None:
        check(self.mode in MODES, f"mode must be one of {MODES}, got {self.mode!r}")
        check(
            isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 0,
            f"max_new_tokens must be a non-negative integer, got {self.max_new_tokens!r}",
        )
        check(self.temperature > 0, f"temperature must be positive, got {self.temperature}")
        check(self.top_k is None or self.top_k >= 1, f"top_k must be None or at least 1, got {self.top_k}")
        check(self.top_p is None or 0 < self.top_p <= 1, f"top_p must be None or in (0, 1], got {self.top_p}")
        check(self.top_tokens >= 1, f"top_tokens must be at least 1, got {self.top_tokens}")
        self.layers()

    def layers(self) -> list[int] | str | None:
        """`constrained_layers` as None, 'all' or a list of model layers."""
        if self.constrained_layers is None or self.constrained_layers == "all":
            return self.constrained_layers
        text = str(self.constrained_layers).replace(",", " ").split()
        check(
            bool(text) and all(t.isdigit() for t in text),
            f"constrained_layers must be 'all' or model layers such as '0,1,2', got {self.constrained_layers!r}",
        )
        return [int(t) for t in text]
