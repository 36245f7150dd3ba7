"""CLTConfig: the shape and activation function of a cross-layer (or per-layer) transcoder."""

from __future__ import annotations

import dataclasses

from clt.config.base import ConfigBase, check
from clt.config.constants import FLOAT_DTYPE_NAMES, check_choice, check_output_site

ACTIVATION_FNS = ("relu", "jumprelu", "topk", "batchtopk")
BATCHTOPK_SCOPES = ("layer", "all")
PARAM_DTYPES = FLOAT_DTYPE_NAMES
SPARSE_DECODE = ("auto", "on", "off")
ARCHITECTURES = ("transcoder", "molt")


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
    architecture: str = "transcoder"
    """'transcoder': features with decoder vectors (CLT/PLT/SAE); 'molt': a sparse mixture of
    linear transforms per layer, ŷ_l = Σ_i a_l,i U_i V_i x_l + b (clt.models.molt)."""
    molt_ranks: list[int] = dataclasses.field(default_factory=lambda: [8])
    """MOLT ranks, decreasing: group g holds N·2^g transforms of rank molt_ranks[g], so
    num_features = N·(2^G − 1) for G ranks (as in Anthropic's MOLT note: few high-rank and many
    low-rank transforms)."""
    matryoshka_prefixes: list[int] | None = None
    """Matryoshka: increasing prefix sizes m < num_features (the full size is implied); the loss
    sums the reconstruction loss of the first m features of every layer over all prefixes."""
    output_site: str = "mlp_out"
    """What the transcoder reconstructs: 'mlp_out' (a transcoder) or 'mlp_in' (its own inputs:
    an SAE). The trainer takes it from the store's output_site."""
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
            check(isinstance(value, int) and value > 0, f"{name} must be a positive integer, got {value!r}")
        check(
            self.activation_fn in ACTIVATION_FNS,
            f"activation_fn '{self.activation_fn}' is not one of {ACTIVATION_FNS}; pick one",
        )
        check(
            self.jumprelu_threshold > 0,
            f"jumprelu_threshold must be > 0 (learned as log θ), got {self.jumprelu_threshold}",
        )
        check(self.jumprelu_bandwidth > 0, f"jumprelu_bandwidth must be > 0, got {self.jumprelu_bandwidth}")
        check(isinstance(self.topk, int) and self.topk >= 1, f"topk must be a positive integer, got {self.topk!r}")
        check(
            self.activation_fn not in ("topk", "batchtopk") or self.topk <= self.num_features,
            f"topk={self.topk} exceeds num_features={self.num_features}; lower topk",
        )
        check(
            self.sparse_decode in SPARSE_DECODE, f"sparse_decode '{self.sparse_decode}' is not one of {SPARSE_DECODE}"
        )
        check(
            self.sparse_decode != "on" or self.activation_fn in ("topk", "batchtopk"),
            f"sparse_decode='on' needs activation_fn topk or batchtopk, not "
            f"'{self.activation_fn}' (its gradient skips inactive features); use 'auto' or 'off'",
        )
        check(
            self.batchtopk_scope in BATCHTOPK_SCOPES,
            f"batchtopk_scope '{self.batchtopk_scope}' is not one of {BATCHTOPK_SCOPES}",
        )
        check(0 < self.batchtopk_momentum <= 1, f"batchtopk_momentum must be in (0, 1], got {self.batchtopk_momentum}")
        check_choice("dtype", self.dtype, PARAM_DTYPES)
        self._check_architecture()
        self._check_matryoshka()
        self._check_output_site()
        self.layers = list(range(self.num_layers)) if self.layers is None else list(self.layers)
        check(
            len(self.layers) == self.num_layers,
            f"layers has {len(self.layers)} entries but num_layers is {self.num_layers}; "
            "give one model layer index per transcoder layer, or omit layers",
        )
        check(
            all(isinstance(i, int) and i >= 0 for i in self.layers)
            and all(a < b for a, b in zip(self.layers, self.layers[1:])),
            f"layers must be increasing non-negative integers, got {self.layers}",
        )

    def _check_architecture(self) -> None:
        check(self.architecture in ARCHITECTURES, f"architecture '{self.architecture}' is not one of {ARCHITECTURES}")
        if self.architecture != "molt":
            return
        check(
            not self.cross_layer,
            "architecture='molt' is a per-layer replacement (each layer's transforms act on its "
            "own input): set cross_layer=False",
        )
        ranks = self.molt_ranks
        check(
            isinstance(ranks, list)
            and len(ranks) > 0
            and all(isinstance(r, int) and 1 <= r <= self.d_model for r in ranks)
            and all(a > b for a, b in zip(ranks, ranks[1:])),
            f"molt_ranks must be a non-empty decreasing list of ranks in [1, d_model={self.d_model}], got {ranks!r}",
        )
        groups = 2 ** len(ranks) - 1
        check(
            self.num_features % groups == 0,
            f"a MOLT with {len(ranks)} ranks has N·{groups} transforms (N, 2N, 4N, ... per rank); "
            f"num_features={self.num_features} is not a multiple of {groups}: use "
            f"{max(1, self.num_features // groups) * groups} or change molt_ranks",
        )
        check(
            not (self.activation_fn == "batchtopk" and self.batchtopk_scope == "all"),
            "a MOLT's layers are independent mixtures: batchtopk_scope='all' would share one "
            "budget across layers; use batchtopk_scope='layer'",
        )
        check(self.sparse_decode != "on", "a MOLT has no sparse decoder path: use sparse_decode='auto' or 'off'")
        check(
            self.matryoshka_prefixes is None,
            "matryoshka_prefixes is for transcoders (architecture='transcoder'); a MOLT's "
            "transforms have different ranks and no nested order: remove matryoshka_prefixes",
        )

    def _check_matryoshka(self) -> None:
        prefixes = self.matryoshka_prefixes
        if prefixes is None:
            return
        self.matryoshka_prefixes = prefixes = list(prefixes)
        check(
            len(prefixes) > 0
            and all(isinstance(m, int) and 0 < m < self.num_features for m in prefixes)
            and all(a < b for a, b in zip(prefixes, prefixes[1:])),
            f"matryoshka_prefixes must be strictly increasing integers in [1, num_features="
            f"{self.num_features}) (the full dictionary is implied), got {prefixes!r}; "
            "e.g. [F // 8, F // 4, F // 2], or None to turn Matryoshka off",
        )

    def _check_output_site(self) -> None:
        check_output_site(self.output_site)
        if self.output_site != "mlp_in":
            return
        sae = "output_site='mlp_in' (an SAE: the outputs are the layer's own inputs)"
        check(not self.cross_layer, f"{sae} reconstructs each layer from its own features: set cross_layer=False")
        check(
            not self.skip_connection,
            f"{sae} with skip_connection would learn the identity W_skip = I: set skip_connection=False",
        )
        check(
            self.architecture == "transcoder",
            f"{sae} needs architecture='transcoder' (a MOLT of the identity map is meaningless)",
        )

    @property
    def is_sae(self) -> bool:
        """True when the transcoder reconstructs its own inputs (output_site 'mlp_in')."""
        return self.output_site == "mlp_in"
