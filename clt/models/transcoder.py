"""CrossLayerTranscoder: encoder per layer, decoders to the same and later layers, standardisation.

Notation: L layers, F features per layer, d = d_model. A feature at layer l reads the MLP input
x_l and writes to the MLP outputs of layers l..L-1 (a CLT) or of layer l only (a PLT,
``cross_layer=False``). Inputs and outputs are standardised per layer with the float32 buffers
``input_mean/input_std/output_mean/output_std``; the weights act in standardised space until
``fold_normalization`` absorbs the statistics so that they act on raw activations.

Initialisation (seeded by ``cfg.seed``): W_enc ~ U(±1/√d), so pre-activations of standardised
inputs have std ≈ 0.58 and, with b_enc = 0, about half of the features start active;
W_dec ~ U(±1/√(F·L)) (U(±1/√F) for a PLT), so initial reconstructions are small
(variance ≈ 0.03 of the standardised targets); b_dec = 0, W_skip = 0, θ = jumprelu_threshold.

Compute (`clt.models.kernels`): the encoder is one GEMM per layer; ReLU/JumpReLU decode densely.
TopK/BatchTopK with few active features (``cfg.sparse_decode``, `uses_sparse_decode`) keep the
active entries as lists: the decoder sums the gathered decoder rows [J, d] of those features
(embedding bags), and the backward pass touches only them. Saving and loading: `clt.models.saving`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from clt.config.transcoder import CLTConfig
from clt.models.activations import ActiveEntries, BatchTopK, batchtopk_active, jumprelu, relu, topk, topk_active
from clt.models.kernels import (
    Encode,
    EncodeActive,
    FeatureBags,
    TriangularDecode,
    compute_dtype,
    decode_entries,
    sparse_decode,
)
from clt.models.saving import CheckpointError, PretrainedIO

_STATS = ("input_mean", "input_std", "output_mean", "output_std")


class UnsupportedDictionaryError(ValueError):
    """This kind of dictionary (SAE, MOLT) cannot be used for the requested operation."""


class CLTOutput(NamedTuple):
    """Result of a forward pass."""

    features: Tensor
    """Feature activations a, [..., L, F]."""
    preactivations: Tensor
    """Encoder pre-activations z = W_enc x_std + b_enc, [..., L, F]."""
    reconstruction: Tensor
    """Reconstructed MLP outputs ŷ, [..., L, d]: raw from `forward`, standardised from
    `forward_normalized`."""

    fire_counts = None
    """On how many tokens each feature fired, [L, F] int64, where the forward knows it without a
    pass over `features` (the sparse TopK/BatchTopK path: `_ActiveOutput`); else None. Not a
    field: the tuple stays (features, preactivations, reconstruction)."""


class _ActiveOutput(CLTOutput):
    """`CLTOutput` of the sparse TopK/BatchTopK forward, which also knows `fire_counts`."""

    def __new__(
        cls, features: Tensor, preactivations: Tensor, reconstruction: Tensor, fire_counts: Tensor | None = None
    ):
        out = super().__new__(cls, features, preactivations, reconstruction)
        out.fire_counts = fire_counts
        return out


class CrossLayerTranscoder(nn.Module, PretrainedIO):
    """A cross-layer (or per-layer) transcoder; see the module docstring for the notation."""

    architecture = "transcoder"
    """`CLTConfig.architecture` this class implements (subclasses register their own)."""
    _registry: ClassVar[dict[str, type[CrossLayerTranscoder]]] = {}

    def __init_subclass__(cls, **kwargs: object) -> None:
        """A subclass that sets its own `architecture` registers for `from_config`; one that
        does not (e.g. a distributed wrapper) leaves the registry alone."""
        super().__init_subclass__(**kwargs)
        if "architecture" in cls.__dict__:
            CrossLayerTranscoder._registry[cls.architecture] = cls

    @classmethod
    def from_config(cls, cfg: CLTConfig) -> CrossLayerTranscoder:
        """A new dictionary of the class `cfg.architecture` names (transcoder or MOLT; importing
        any clt.models module registers them all)."""
        return CrossLayerTranscoder._registry[cfg.architecture](cfg)

    def __init__(self, cfg: CLTConfig) -> None:
        super().__init__()
        if cfg.architecture != self.architecture:
            raise ValueError(
                f"{type(self).__name__} implements architecture "
                f"'{self.architecture}', not '{cfg.architecture}'; build it with "
                "CrossLayerTranscoder.from_config(cfg)"
            )
        self.cfg = cfg
        L, F, d = cfg.num_layers, cfg.num_features, cfg.d_model
        dtype = getattr(torch, cfg.dtype)
        gen = torch.Generator().manual_seed(cfg.seed)

        def uniform(shape: tuple[int, ...], bound: float) -> Tensor:
            return ((torch.rand(shape, generator=gen) * 2 - 1) * bound).to(dtype)

        self.W_enc = nn.Parameter(uniform((L, F, d), 1 / math.sqrt(d)))
        self.b_enc = nn.Parameter(torch.zeros(L, F, dtype=dtype))
        self._init_decoder(uniform)
        self.b_dec = nn.Parameter(torch.zeros(L, d, dtype=dtype))
        if cfg.activation_fn == "jumprelu":
            log_theta = math.log(cfg.jumprelu_threshold)
            self.log_threshold = nn.Parameter(torch.full((L, F), log_theta, dtype=dtype))
        if cfg.activation_fn == "batchtopk":
            self.batchtopk = BatchTopK(L, cfg.topk, cfg.batchtopk_scope, cfg.batchtopk_momentum)
        if cfg.skip_connection:
            self.W_skip = nn.Parameter(torch.zeros(L, d, d, dtype=dtype))
        for name in _STATS:
            self.register_buffer(name, torch.full((L, d), 1.0 if name.endswith("std") else 0.0))

    def _init_decoder(self, uniform: Callable[[tuple[int, ...], float], Tensor]) -> None:
        """Create the decoder parameters (W_dec per source layer)."""
        L, F, d = self.cfg.num_layers, self.cfg.num_features, self.cfg.d_model
        dec_bound = 1 / math.sqrt(F * (L if self.cfg.cross_layer else 1))
        self.W_dec = nn.ParameterList([nn.Parameter(uniform((F, self.num_targets(l), d), dec_bound)) for l in range(L)])

    # ----------------------------------------------------------------- structure

    def num_targets(self, layer: int) -> int:
        """Number of layers that source layer `layer` writes to: L - layer (CLT) or 1 (PLT)."""
        return self.cfg.num_layers - layer if self.cfg.cross_layer else 1

    @property
    def threshold(self) -> Tensor | None:
        """Inference threshold [L, F]: θ (JumpReLU), the BatchTopK EMA, 0 (ReLU); None (TopK)."""
        act = self.cfg.activation_fn
        if act == "jumprelu":
            return self.log_threshold.exp()
        if act == "batchtopk":
            return self.batchtopk.threshold[:, None].expand(-1, self.cfg.num_features)
        if act == "relu":
            return torch.zeros_like(self.b_enc)
        return None

    def decoder_norms(self) -> Tensor:
        """‖W_dec,i^l‖ over all of feature i's target layers, [L, F]."""
        return torch.stack([torch.linalg.vector_norm(w, dim=(1, 2)) for w in self.W_dec])

    @property
    def kind(self) -> str:
        """Short name of the dictionary: CLT, PLT, SAE or MOLT."""
        c = self.cfg
        return "SAE" if c.is_sae else "MOLT" if c.architecture == "molt" else ("CLT" if c.cross_layer else "PLT")

    def require_mlp_replacement(self, purpose: str, *, linear: bool = True) -> None:
        """Raise UnsupportedDictionaryError unless this dictionary replaces the MLPs (not an SAE)
        and, with `linear`, its output is linear in the features (not a MOLT)."""
        if self.cfg.is_sae:
            raise UnsupportedDictionaryError(
                f"{purpose} needs a transcoder of the MLP outputs, but this is an SAE "
                "(output_site='mlp_in': it reconstructs the MLP inputs and replaces no MLP); "
                "train a transcoder on a store extracted with output_site='mlp_out'"
            )
        if linear and self.cfg.architecture == "molt":
            raise UnsupportedDictionaryError(
                f"{purpose} needs outputs linear in the features, but a MOLT's output "
                "Σ a_i U_i V_i x also depends on x through the transforms; use a transcoder "
                "(architecture='transcoder', e.g. cross_layer=False with skip_connection=True)"
            )

    def extra_repr(self) -> str:
        c = self.cfg
        kind = self.kind
        return f"{kind}: L={c.num_layers}, F={c.num_features}, d={c.d_model}, {c.activation_fn}"

    # ----------------------------------------------------------------- standardisation

    def set_normalization(self, input_mean: Tensor, input_std: Tensor, output_mean: Tensor, output_std: Tensor) -> None:
        """Set the standardisation statistics (each [L, d]; a [L, 1] scale is broadcast)."""
        shape = (self.cfg.num_layers, self.cfg.d_model)
        for name, value in zip(_STATS, (input_mean, input_std, output_mean, output_std)):
            value = torch.as_tensor(value, dtype=torch.float32)
            try:
                value = value.expand(shape)
            except RuntimeError as err:
                raise ValueError(
                    f"{name} has shape {list(value.shape)}; expected [L={shape[0]}, d={shape[1]}]"
                ) from err
            if name.endswith("std") and not bool((value > 0).all()):
                raise ValueError(f"{name} must be positive everywhere; clamp it (clamp_min(1e-6))")
            getattr(self, name).copy_(value)

    def normalize_inputs(self, x: Tensor) -> Tensor:
        """Standardise raw MLP inputs [..., L, d] (in float32 or wider, then parameter dtype)."""
        self._check_shape(x, self.cfg.d_model, "d_model", "inputs x")
        return self._standardise(x, self.input_mean, self.input_std)

    def normalize_outputs(self, y: Tensor) -> Tensor:
        """Standardise raw MLP outputs [..., L, d] (the training targets)."""
        self._check_shape(y, self.cfg.d_model, "d_model", "outputs y")
        return self._standardise(y, self.output_mean, self.output_std)

    def denormalize_outputs(self, y_std: Tensor) -> Tensor:
        """Map standardised outputs [..., L, d] back to raw space."""
        wide = y_std.to(torch.promote_types(y_std.dtype, torch.float32))
        return (wide * self.output_std + self.output_mean).to(y_std.dtype)

    def _standardise(self, t: Tensor, mean: Tensor, std: Tensor) -> Tensor:
        wide = t.to(torch.promote_types(t.dtype, torch.float32))
        return torch.sub(wide, mean).div_(std).to(self.W_enc.dtype)

    # ----------------------------------------------------------------- forward

    def preactivations(self, x: Tensor) -> Tensor:
        """Encoder pre-activations [..., L, F] of raw inputs x [..., L, d]."""
        return self._preactivations_normalized(self.normalize_inputs(x))

    def activate(self, z: Tensor) -> Tensor:
        """Apply the configured nonlinearity to pre-activations [..., L, F]."""
        act = self.cfg.activation_fn
        if act == "relu":
            return relu(z)
        if act == "jumprelu":
            return jumprelu(z, self.log_threshold.exp(), self.cfg.jumprelu_bandwidth)
        if act == "topk":
            return topk(z, self.cfg.topk)
        return self.batchtopk(z)

    def encode(self, x: Tensor) -> Tensor:
        """Feature activations [..., L, F] of raw inputs x [..., L, d]."""
        return self.activate(self.preactivations(x))

    def encode_layer(self, x: Tensor, layer: int) -> Tensor:
        """Feature activations [..., F] of layer `layer` from raw inputs x [..., L, d] (only that
        layer's are read): `encode(x)[..., layer, :]` at inference (BatchTopK: its threshold) at 1/L
        of the cost, for code that needs one layer's features (feature cards)."""
        self._check_shape(x, self.cfg.d_model, "d_model", "inputs x")
        if not 0 <= layer < self.cfg.num_layers:
            raise IndexError(f"layer {layer} is out of range [0, {self.cfg.num_layers})")
        x_std = self._standardise(x[..., layer, :], self.input_mean[layer], self.input_std[layer])
        return self.activate_layer(nn.functional.linear(x_std, self.W_enc[layer], self.b_enc[layer]), layer)

    def activate_layer(self, z: Tensor, layer: int) -> Tensor:
        """The nonlinearity of one layer's pre-activations z [..., F]: `activate` of the full
        [..., L, F] at that layer, values and gradients, at 1/L of the cost (BatchTopK: eval only,
        its per-token threshold rule; in training it needs every layer of the batch)."""
        act = self.cfg.activation_fn
        if act == "relu":
            return relu(z)
        if act == "jumprelu":
            return jumprelu(z, self.log_threshold[layer].exp(), self.cfg.jumprelu_bandwidth)
        if act == "topk":
            return topk(z, self.cfg.topk)
        if self.training:
            raise ValueError("a single layer's BatchTopK uses its inference threshold: call .eval() first")
        return torch.where(z > self.batchtopk.threshold[layer].to(z.dtype), z, torch.zeros((), dtype=z.dtype))

    def uses_sparse_decode(self, features: Tensor | None = None) -> bool:
        """Whether the TopK/BatchTopK sparse path is on (cfg.sparse_decode): the decoder gathers
        the active features' rows and the encoder's weight gradient sums only active entries.
        `decode_normalized` never uses it for a leaf `features` that requires grad."""
        c = self.cfg
        if c.activation_fn not in ("topk", "batchtopk") or c.sparse_decode == "off":
            return False
        if features is not None and features.requires_grad and features.is_leaf:
            return False
        return c.sparse_decode == "on" or c.topk * 8 <= c.num_features

    def decode_normalized(self, features: Tensor, x_std: Tensor | None = None, *, bias: bool = True) -> Tensor:
        """Standardised reconstruction [..., L, d]; adds the skip term when x_std is given.

        With `uses_sparse_decode` the sum runs over the nonzero features only (in the parameter
        dtype, also under autocast; with sparse_decode 'auto' only while at most 1/8 of them
        are nonzero); the gradient w.r.t. `features` is then exact at nonzero entries and 0 at
        zero entries, the only ones TopK/BatchTopK pass back to the encoder.
        """
        self._check_shape(features, self.cfg.num_features, "num_features", "features")
        return self._add_bias_and_skip(self._decode_features(features, x_std), x_std, bias)

    def decode_features_normalized(self, features: Tensor, x_std: Tensor | None = None) -> Tensor:
        """The features' part of the standardised reconstruction [..., L, d]: no b_dec, no skip."""
        self._check_shape(features, self.cfg.num_features, "num_features", "features")
        return self._decode_features(features, x_std)

    def _decode_features(self, features: Tensor, x_std: Tensor | None, start: int = 0) -> Tensor:
        """Σ over features [..., L, m] of their decoder rows start..start+m-1 (no bias, no skip)."""
        L, d = self.cfg.num_layers, self.cfg.d_model
        batch_shape, m = features.shape[:-2], features.shape[-1]
        rows = [w[start : start + m] for w in self.W_dec]
        out = None
        if self.uses_sparse_decode(features):
            flat = features.reshape(-1, L, m)
            out = sparse_decode(flat, rows, d, force=self.cfg.sparse_decode == "on")
        if out is not None:
            return out.reshape(*batch_shape, L, d)
        dtype = compute_dtype(features, self.W_enc.dtype)
        flat = features.to(dtype).reshape(-1, L, m)
        weights = [w.to(dtype) for w in rows]
        return TriangularDecode.apply(d, flat, *weights).reshape(*batch_shape, L, d)

    def prefix_reconstructions(
        self, features: Tensor, x_std: Tensor | None = None, sizes: list[int] | None = None
    ) -> list[Tensor]:
        """Standardised reconstructions [..., L, d] from the first m features of every layer, for
        each m in `sizes` (increasing; default: the Matryoshka prefixes and F). Computed as
        cumulative sums of the decodes of consecutive feature segments: one full decode in all."""
        F = self.cfg.num_features
        self._check_shape(features, F, "num_features", "features")
        sizes = list(sizes if sizes is not None else [*(self.cfg.matryoshka_prefixes or []), F])
        if not sizes or sizes[0] < 1 or sizes[-1] > F or any(a >= b for a, b in zip(sizes, sizes[1:])):
            raise ValueError(f"sizes must be increasing integers in [1, {F}], got {sizes}")
        outs: list[Tensor] = []
        total, start = None, 0
        for m in sizes:
            part = self._decode_features(features[..., start:m], x_std, start)
            total = part if total is None else total + part
            outs.append(self._add_bias_and_skip(total, x_std))
            start = m
        return outs

    def _add_bias_and_skip(self, out: Tensor, x_std: Tensor | None, bias: bool = True) -> Tensor:
        if bias:
            out = out + self.b_dec
        if x_std is not None and self.cfg.skip_connection:
            out = out + torch.einsum("...li,loi->...lo", x_std.to(out.dtype), self.W_skip)
        return out

    def _decode_needs_inputs(self) -> bool:
        return self.cfg.skip_connection

    def decode(self, features: Tensor, x: Tensor | None = None) -> Tensor:
        """Raw reconstruction [..., L, d] of features [..., L, F] (x: raw inputs, for the skip)."""
        if self._decode_needs_inputs() and x is None:
            raise ValueError(
                f"this {self.kind} reads its inputs when decoding (a skip connection "
                "or transforms): call decode(features, x=x) with the raw inputs"
            )
        x_std = None if x is None else self.normalize_inputs(x)
        return self.denormalize_outputs(self.decode_normalized(features, x_std))

    def forward_normalized(self, x_std: Tensor, *, dense_features: bool = True) -> CLTOutput:
        """Forward pass on standardised inputs; the reconstruction is standardised (training).

        ``dense_features=False``: on the sparse TopK/BatchTopK path with inputs [N, L, d],
        `features` is a sparse COO tensor of the kept entries and `fire_counts` is set, which
        spares the [N, L, F] tensor when only the reconstruction is needed (the trainer's step).
        """
        self._check_shape(x_std, self.cfg.d_model, "d_model", "inputs x")
        x_std = x_std.to(self.W_enc.dtype)
        sparse = self.uses_sparse_decode() and x_std.numel() > 0
        if sparse and (self.cfg.activation_fn == "topk" or self.batchtopk.training):
            return self._forward_active(x_std, dense_features or x_std.ndim != 3)
        z = self._preactivations_normalized(x_std)
        a = self.activate(z)
        return CLTOutput(a, z, self.decode_normalized(a, x_std))

    def _select_active(self, z: Tensor) -> ActiveEntries:
        """The entries TopK/BatchTopK keep in z [N, L, F], sorted by (layer, token); distributed
        training overrides it with a selection across ranks."""
        if self.cfg.activation_fn == "topk":
            return topk_active(z, self.cfg.topk)
        return batchtopk_active(z, self.cfg.topk, self.cfg.batchtopk_scope)

    def _forward_active(self, x_std: Tensor, dense_features: bool = True) -> CLTOutput:
        """TopK/BatchTopK forward that keeps the active entries as (layer, token, feature) lists:
        the decoder and every gradient use only those (see `clt.models.kernels.EncodeActive`)."""
        L, F, d = self.cfg.num_layers, self.cfg.num_features, self.cfg.d_model
        flat = x_std.reshape(-1, L, d)
        n = flat.shape[0]
        group = torch.is_grad_enabled()  # the weight gradients read the entries grouped by feature
        z, values, layer, rows, cols, order, counts = EncodeActive.apply(
            flat, self.W_enc, self.b_enc, self._select_active, group
        )
        if self.cfg.activation_fn == "batchtopk":
            self.batchtopk.update_threshold_active(values.detach(), layer)
        batch = x_std.shape[:-2]
        if dense_features:
            features = z.new_zeros(n, L, F).index_put_((rows, layer, cols), values).view(*batch, L, F)
        else:
            index = torch.stack([rows, layer, cols])
            features = torch.sparse_coo_tensor(index, values, (n, L, F), check_invariants=False)
        bags = FeatureBags(order, counts) if group else None
        out = decode_entries(d, layer, rows, cols, values, n, list(self.W_dec), bags)
        out = self._add_bias_and_skip(out.view(*batch, L, d), x_std)
        fire_counts = torch.bincount((layer * F + cols)[values.detach() != 0], minlength=L * F).view(L, F)
        return _ActiveOutput(features, z.view(*batch, L, F), out, fire_counts)

    def forward_prefixes(self, x_std: Tensor) -> tuple[CLTOutput, list[Tensor]]:
        """Forward pass on standardised inputs that also returns the standardised reconstruction
        of every Matryoshka prefix (`prefix_reconstructions`; the last one is the full one)."""
        self._check_shape(x_std, self.cfg.d_model, "d_model", "inputs x")
        x_std = x_std.to(self.W_enc.dtype)
        z = self._preactivations_normalized(x_std)
        a = self.activate(z)
        recons = self.prefix_reconstructions(a, x_std)
        return CLTOutput(a, z, recons[-1]), recons

    def forward(self, x: Tensor) -> CLTOutput:
        """Forward pass on raw inputs x [..., L, d]; the reconstruction is in raw space."""
        out = self.forward_normalized(self.normalize_inputs(x))
        return out._replace(reconstruction=self.denormalize_outputs(out.reconstruction))

    def _preactivations_normalized(self, x_std: Tensor) -> Tensor:
        L, F = self.cfg.num_layers, self.cfg.num_features
        flat = x_std.reshape(-1, L, x_std.shape[-1])
        z = Encode.apply(flat, self.W_enc, self.b_enc, self.uses_sparse_decode())
        return z.reshape(*x_std.shape[:-2], L, F)

    def _check_shape(self, t: Tensor, width: int, width_name: str, what: str) -> None:
        L = self.cfg.num_layers
        if not isinstance(t, Tensor) or t.ndim < 2 or tuple(t.shape[-2:]) != (L, width):
            shape = list(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(
                f"{what} must have shape [..., L={L}, {width_name}={width}], got "
                f"{shape}; stack the layers on dim -2 (e.g. [batch, layers, d_model])"
            )

    # ----------------------------------------------------------------- folding

    @torch.no_grad()
    def fold_normalization(self) -> CrossLayerTranscoder:
        """A copy with identity standardisation whose weights give the same raw-space outputs."""
        new = copy.deepcopy(self)
        mu_in, sd_in = self.input_mean.double(), self.input_std.double()
        mu_out, sd_out = self.output_mean.double(), self.output_std.double()
        W_enc = self.W_enc.double()
        new.W_enc.copy_(W_enc / sd_in[:, None, :])
        new.b_enc.copy_(self.b_enc.double() - torch.einsum("lfd,ld->lf", W_enc, mu_in / sd_in))
        b_dec = self.b_dec.double()
        if self.cfg.skip_connection:
            W_skip = self.W_skip.double()
            b_dec = b_dec - torch.einsum("loi,li->lo", W_skip, mu_in / sd_in)
            new.W_skip.copy_(sd_out[:, :, None] * W_skip / sd_in[:, None, :])
        new.b_dec.copy_(sd_out * b_dec + mu_out)
        for l, w in enumerate(new.W_dec):
            w.copy_(w.double() * sd_out[l : l + w.shape[1]][None])
        for name in _STATS:
            getattr(new, name).fill_(1.0 if name.endswith("std") else 0.0)
        return new

    # ----------------------------------------------------------------- truncation

    @torch.no_grad()
    def truncate(self, num_features: int) -> CrossLayerTranscoder:
        """A standalone transcoder of the first `num_features` features of every layer (a
        Matryoshka prefix): same biases, skip, thresholds and statistics, Matryoshka prefixes
        below the new size kept. TopK keeps min(k, num_features) among the kept features."""
        c = self.cfg
        if c.architecture != "transcoder":
            raise UnsupportedDictionaryError(
                f"truncate works on transcoders; a {self.kind}'s features have no nested order"
            )
        if not (isinstance(num_features, int) and 0 < num_features <= c.num_features):
            raise ValueError(f"num_features must be in [1, {c.num_features}], got {num_features!r}")
        prefixes = [m for m in c.matryoshka_prefixes or [] if m < num_features] or None
        cfg = c.replace(num_features=num_features, matryoshka_prefixes=prefixes, topk=min(c.topk, num_features))
        small = CrossLayerTranscoder.from_config(cfg).to(self.b_dec.device)
        state = {}
        for name, value in self.state_dict().items():
            if name in ("W_enc", "b_enc", "log_threshold") or name.startswith("W_dec."):
                value = value[:, :num_features] if not name.startswith("W_dec.") else value[:num_features]
            state[name] = value.clone()
        small.load_state_dict(state)
        return small.train(self.training)


CrossLayerTranscoder._registry["transcoder"] = CrossLayerTranscoder


__all__ = ["CLTOutput", "CheckpointError", "CrossLayerTranscoder", "UnsupportedDictionaryError"]
