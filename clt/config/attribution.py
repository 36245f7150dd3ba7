"""AttributionConfig: which logits and features an attribution graph covers, batching and memory."""

from __future__ import annotations

import dataclasses

from clt.config.base import ConfigBase, check


@dataclasses.dataclass
class AttributionConfig(ConfigBase):
    """Settings of `attribute`: logit targets, feature budget, BOS handling, batching, memory."""

    max_n_logits: int = 10
    """Most logit nodes: the likeliest next tokens at the last position."""
    desired_logit_prob: float = 0.95
    """Keep logit nodes until their cumulative probability reaches this (capped by max_n_logits)."""
    batch_size: int = 64
    """Target nodes per batched backward pass (at most: `max_memory_gb` may lower it)."""
    max_feature_nodes: int | None = None
    """Most feature nodes; when set, features are visited in order of estimated influence."""
    update_interval: int = 4
    """With max_feature_nodes: batches between two re-rankings of the remaining features."""
    zero_bos: bool = True
    """Zero the features and error terms at position 0 when it holds a special (BOS) token."""
    prepend_bos: bool = True
    """Prepend the BOS token to a text prompt (the convention of extraction and training)."""
    max_memory_gb: float | None = None
    """Memory budget in GiB (the loaded model and transcoder included): the batch size and whether
    attention patterns are kept or rebuilt per batch are chosen to fit, and a prompt that cannot fit
    raises MemoryError. None: batch_size as given, patterns kept up to 1 GiB. The estimate is logged."""
    row_store: str = "auto"
    """Where the visited rows wait for the graph (with max_feature_nodes; `clt.attribution.rowstore`):
    'memory' (float32), 'split' (their upper 16 bits in memory, which rank the features to visit, the
    lower 16 bits in a temporary file under $TMPDIR; the graph's entries are joined back exactly: half
    the memory) or 'auto' ('split' only where the memory plan needs it: the budget, or without one
    the memory available)."""
    backward: str = "auto"
    """How rows are computed: 'linear' (frozen patterns and norm scales applied as linear maps, kept
    once, no batch copies; pre-norm decoders such as Llama and GPT-2), 'autograd' (the prompt copied
    batch_size times through the frozen model; any architecture) or 'auto' (linear where it applies)."""

    topk_mode: str = "freeze"
    """TopK dictionaries (e.g. sparsify's): 'freeze' keeps TopK exact, its selection of active features
    frozen for the prompt like the attention pattern: the graph explains the dictionary as trained, but
    in the local replacement model a selected feature stays on (its activation its pre-activation, even
    below another's) and an unselected one stays off whatever an intervention does. 'jumprelu' first
    converts the dictionary to JumpReLU with per-feature thresholds calibrated to the same L0 per layer
    (`clt.models.convert`) on `calibration_tokens` of the default corpus: each feature then fires on its
    own input, as in circuit-tracer's JumpReLU transcoders, but it is a different dictionary: per-token
    active sets and L0 change, and the error nodes absorb the difference."""
    calibration_tokens: int = 4096
    """Tokens of the default corpus on which topk_mode='jumprelu' calibrates the thresholds."""

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
        check(
            self.max_memory_gb is None or (isinstance(self.max_memory_gb, (int, float)) and self.max_memory_gb > 0),
            f"max_memory_gb must be None (no budget) or a positive number of GiB, got {self.max_memory_gb!r}",
        )
        check(
            self.topk_mode in ("freeze", "jumprelu"),
            f"topk_mode must be 'freeze' or 'jumprelu', got {self.topk_mode!r}",
        )
        check(
            isinstance(self.calibration_tokens, int) and self.calibration_tokens >= 1,
            f"calibration_tokens must be a positive integer, got {self.calibration_tokens!r}",
        )
        check(
            self.row_store in ("auto", "memory", "split"),
            f"row_store must be 'auto', 'memory' or 'split', got {self.row_store!r}",
        )
        check(
            self.backward in ("auto", "linear", "autograd"),
            f"backward must be 'auto', 'linear' or 'autograd', got {self.backward!r}",
        )
