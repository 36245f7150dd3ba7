"""CLTConfig: the shape and activation function of a cross-layer (or per-layer) transcoder."""

from __future__ import annotations

import dataclasses

from clt.config.base import ConfigBase, check

ACTIVATION_FNS = ("relu", "jumprelu", "topk", "batchtopk")
BATCHTOPK_SCOPES = ("layer", "all")
PARAM_DTYPES = ("float32", "float16", "bfloat16")
SPARSE_DECODE = ("auto", "on", "off")


@dataclasses.dataclass
class CLTConfig(ConfigBase):
    """Architecture of a transcoder: widths, layers, activation function, cross- or per-layer."""

    num_features: int
    """Features per layer (F)."""
    num_layers: int
    """Number of layers the transcoder reads from and writes to (L)."""
    d_model: int
    """Width of the MLP inputs and outputs (d)."""
    activation_fn: str = "jumprelu"
    """Feature nonlinearity: relu, jumprelu, topk or batchtopk."""
    jumprelu_threshold: float = 0.03
    """Initial JumpReLU threshold θ (learned per feature as log θ), in standardised units."""
    jumprelu_bandwidth: float = 0.1
    """Width ε of the rectangle kernel in the JumpReLU θ pseudo-gradient (standardised units;
    pre-activations are O(1), so θ learns from tokens within ±0.05 of it)."""
    topk: int = 16
    """k: active features per token and layer (TopK), or that many on average (BatchTopK)."""
    batchtopk_scope: str = "layer"
    """BatchTopK selection: 'layer' keeps k·batch per layer, 'all' k·L·batch over all layers."""
    batchtopk_momentum: float = 0.01
    """EMA momentum of the BatchTopK inference threshold (smallest kept activation per batch)."""
    cross_layer: bool = True
    """True: a layer-l feature writes to layers l..L-1 (CLT); False: to layer l only (PLT)."""
    sparse_decode: str = "auto"
    """TopK/BatchTopK: 'on' decodes from the active features only (their decoder rows gathered
    with embedding bags; the backward pass touches only them), 'off' multiplies the dense
    feature matrix. 'auto' is 'on' when topk <= F/8, falling back to dense wherever more than
    1/8 of the features are nonzero (measured on a 2-core CPU: about even at F/k = 8, 1.3-1.9x
    faster steps at F/k = 16, 1.8-4x at F/k >= 32). ReLU/JumpReLU always decode densely."""
    skip_connection: bool = False
    """Add a learned linear skip term W_skip x_l to each layer's reconstruction."""
    layers: list[int] | None = None
    """Model layer indices covered, increasing (default 0..num_layers-1; num_layers entries)."""
    model_name: str | None = None
    """Model the transcoder was trained on (informational)."""
    dtype: str = "float32"
    """Parameter precision: float32, float16 or bfloat16 (normalisation buffers stay float32)."""
    seed: int = 0
    """Seed of the weight initialisation."""

    def __post_init__(self) -> None:
        for name in ("num_features", "num_layers", "d_model"):
            value = getattr(self, name)
            check(isinstance(value, int) and value > 0,
                  f"{name} must be a positive integer, got {value!r}")
        check(self.activation_fn in ACTIVATION_FNS,
              f"activation_fn '{self.activation_fn}' is not one of {ACTIVATION_FNS}; pick one")
        check(self.jumprelu_threshold > 0,
              f"jumprelu_threshold must be > 0 (learned as log θ), got {self.jumprelu_threshold}")
        check(self.jumprelu_bandwidth > 0,
              f"jumprelu_bandwidth must be > 0, got {self.jumprelu_bandwidth}")
        check(isinstance(self.topk, int) and self.topk >= 1,
              f"topk must be a positive integer, got {self.topk!r}")
        check(self.activation_fn not in ("topk", "batchtopk") or self.topk <= self.num_features,
              f"topk={self.topk} exceeds num_features={self.num_features}; lower topk")
        check(self.sparse_decode in SPARSE_DECODE,
              f"sparse_decode '{self.sparse_decode}' is not one of {SPARSE_DECODE}")
        check(self.sparse_decode != "on" or self.activation_fn in ("topk", "batchtopk"),
              f"sparse_decode='on' needs activation_fn topk or batchtopk, not "
              f"'{self.activation_fn}' (its gradient skips inactive features); use 'auto' or 'off'")
        check(self.batchtopk_scope in BATCHTOPK_SCOPES,
              f"batchtopk_scope '{self.batchtopk_scope}' is not one of {BATCHTOPK_SCOPES}")
        check(0 < self.batchtopk_momentum <= 1,
              f"batchtopk_momentum must be in (0, 1], got {self.batchtopk_momentum}")
        check(self.dtype in PARAM_DTYPES, f"dtype '{self.dtype}' is not one of {PARAM_DTYPES}")
        self.layers = list(range(self.num_layers)) if self.layers is None else list(self.layers)
        check(len(self.layers) == self.num_layers,
              f"layers has {len(self.layers)} entries but num_layers is {self.num_layers}; "
              "give one model layer index per transcoder layer, or omit layers")
        check(all(isinstance(i, int) and i >= 0 for i in self.layers)
              and all(a < b for a, b in zip(self.layers, self.layers[1:])),
              f"layers must be increasing non-negative integers, got {self.layers}")
