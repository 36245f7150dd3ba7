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

Compute: the encoder is one GEMM per layer; ReLU/JumpReLU decode densely (`_TriangularDecode`).
TopK/BatchTopK with few active features (``cfg.sparse_decode``, `uses_sparse_decode`) keep the
active entries as lists: the decoder sums the gathered decoder rows [J, d] of those features
(embedding bags), and the backward pass touches only them (`_EncodeActive`, `_SparseDecode`).
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar, NamedTuple

import torch
from safetensors import safe_open
from torch import Tensor, nn

from clt.config.transcoder import CLTConfig
from clt.files import atomic_save_tensors, read_tensors
from clt.models.activations import BatchTopK, batchtopk_active, jumprelu, relu, topk, topk_active

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_META_KEY = "clt_config"
_STATS = ("input_mean", "input_std", "output_mean", "output_std")


class CheckpointError(ValueError):
    """A transcoder file is corrupt, truncated or does not match its config."""


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


class CrossLayerTranscoder(nn.Module):
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
        return ((wide - mean) / std).to(self.W_enc.dtype)

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
            out = _sparse_decode(flat, rows, d, force=self.cfg.sparse_decode == "on")
        if out is not None:
            return out.reshape(*batch_shape, L, d)
        dtype = _compute_dtype(features, self.W_enc.dtype)
        flat = features.to(dtype).reshape(-1, L, m)
        weights = [w.to(dtype) for w in rows]
        return _TriangularDecode.apply(d, flat, *weights).reshape(*batch_shape, L, d)

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

    def forward_normalized(self, x_std: Tensor) -> CLTOutput:
        """Forward pass on standardised inputs; the reconstruction is standardised (training)."""
        self._check_shape(x_std, self.cfg.d_model, "d_model", "inputs x")
        x_std = x_std.to(self.W_enc.dtype)
        sparse = self.uses_sparse_decode() and x_std.numel() > 0
        if sparse and (self.cfg.activation_fn == "topk" or self.batchtopk.training):
            return self._forward_active(x_std)
        z = self._preactivations_normalized(x_std)
        a = self.activate(z)
        return CLTOutput(a, z, self.decode_normalized(a, x_std))

    def _select_active(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(layer, token, feature) of the entries TopK/BatchTopK keep in z [N, L, F], sorted by
        (layer, token); distributed training overrides it with a selection across ranks."""
        if self.cfg.activation_fn == "topk":
            return topk_active(z, self.cfg.topk)
        return batchtopk_active(z, self.cfg.topk, self.cfg.batchtopk_scope)

    def _forward_active(self, x_std: Tensor) -> CLTOutput:
        """TopK/BatchTopK forward that keeps the active entries as (layer, token, feature) lists:
        the decoder and every gradient use only those (see `_EncodeActive`)."""
        L, F, d = self.cfg.num_layers, self.cfg.num_features, self.cfg.d_model
        flat = x_std.reshape(-1, L, d)
        n = flat.shape[0]
        z, values, layer, rows, cols = _EncodeActive.apply(flat, self.W_enc, self.b_enc, self._select_active)
        if self.cfg.activation_fn == "batchtopk":
            self.batchtopk.update_threshold_active(values.detach(), layer)
        features = z.new_zeros(n, L, F).index_put_((rows, layer, cols), values)
        offsets, bounds = _segments(layer, rows, n, L)
        dtype = self.W_dec[0].dtype
        out = _SparseDecode.apply(d, rows, cols, offsets, bounds, values.to(dtype), *self.W_dec)
        batch = x_std.shape[:-2]
        out = self._add_bias_and_skip(out.view(*batch, L, d), x_std)
        return CLTOutput(features.view(*batch, L, F), z.view(*batch, L, F), out)

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
        z = _Encode.apply(flat, self.W_enc, self.b_enc, self.uses_sparse_decode())
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

    # ----------------------------------------------------------------- saving and loading

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write `config.json` and `model.safetensors` (unfolded: statistics saved as buffers)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.cfg.save(directory / CONFIG_NAME)
        atomic_save_tensors(self._tensors(), directory / WEIGHTS_NAME, {"format": "pt"})
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device | None = None) -> CrossLayerTranscoder:
        """Load a transcoder written by `save_pretrained` (or a single file written by `save`)."""
        directory = Path(directory)
        if directory.is_file():
            return cls.load(directory, device=device)
        if not directory.is_dir():
            raise FileNotFoundError(
                f"no transcoder at {directory}: expected a folder with "
                f"{CONFIG_NAME} and {WEIGHTS_NAME} (save_pretrained)"
            )
        config_path = directory / CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} is missing; save the transcoder with save_pretrained")
        cfg = CLTConfig.load(config_path)
        weights = directory / WEIGHTS_NAME
        return cls._from_tensors(cfg, _read_safetensors(weights), device, weights)

    def save(self, path: str | Path) -> Path:
        """Save to one safetensors file with the config in its metadata (any suffix: .pt,
        .safetensors, ...; never pickle), or to a `save_pretrained` folder if `path` has none."""
        path = Path(path)
        if path.is_dir() or path.suffix == "":
            return self.save_pretrained(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {"format": "pt", _META_KEY: json.dumps(self.cfg.to_dict())}
        atomic_save_tensors(self._tensors(), path, metadata)
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None) -> CrossLayerTranscoder:
        """Load a transcoder written by `save` (a single file or a `save_pretrained` folder)."""
        path = Path(path)
        if path.is_dir():
            return cls.from_pretrained(path, device=device)
        tensors = _read_safetensors(path)
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if _META_KEY not in meta:
            raise CheckpointError(
                f"{path} has no '{_META_KEY}' metadata: it was not written by "
                "CrossLayerTranscoder.save (use from_pretrained for a folder)"
            )
        try:
            values = json.loads(meta[_META_KEY])
        except json.JSONDecodeError as err:
            raise CheckpointError(
                f"{path}: the config in its metadata is not valid JSON ({err}); save the transcoder again"
            ) from err
        return cls._from_tensors(CLTConfig.from_dict(values), tensors, device, path)

    def _tensors(self) -> dict[str, Tensor]:
        return {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}

    @classmethod
    def _from_tensors(
        cls, cfg: CLTConfig, tensors: dict[str, Tensor], device: str | torch.device | None, source: Path
    ) -> CrossLayerTranscoder:
        model = CrossLayerTranscoder.from_config(cfg)
        expected = model.state_dict()
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise CheckpointError(
                f"{source} does not match its config (missing {missing}, "
                f"unexpected {unexpected}); config and weights come from "
                "different transcoders"
            )
        for name, value in expected.items():
            if tuple(tensors[name].shape) != tuple(value.shape):
                raise CheckpointError(
                    f"{source}: '{name}' has shape {list(tensors[name].shape)}"
                    f" but the config implies {list(value.shape)}; config and "
                    "weights come from different transcoders"
                )
        model.load_state_dict(tensors)
        return model if device is None else model.to(device)


CrossLayerTranscoder._registry["transcoder"] = CrossLayerTranscoder


class _TriangularDecode(torch.autograd.Function):
    """Σ_{l ≤ l'} a_l W_dec[l→l'] accumulated in place: no per-source copies in either pass."""

    @staticmethod
    def forward(ctx, d: int, flat: Tensor, *weights: Tensor) -> Tensor:
        out = flat.new_zeros(flat.shape[0], flat.shape[1] * d)
        for l, w in enumerate(weights):
            cols = out[:, l * d : (l + w.shape[1]) * d]
            cols.addmm_(flat[:, l], w.reshape(w.shape[0], -1))
        ctx.d = d
        ctx.save_for_backward(flat, *weights)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        flat, *weights = ctx.saved_tensors
        d = ctx.d
        grad_flat = torch.empty_like(flat) if ctx.needs_input_grad[1] else None
        grad_weights = []
        for l, w in enumerate(weights):
            g = grad[:, l * d : (l + w.shape[1]) * d]
            w2 = w.reshape(w.shape[0], -1)
            if grad_flat is not None:
                torch.mm(g, w2.T, out=grad_flat[:, l])
            grad_weights.append((flat[:, l].T @ g).view_as(w) if ctx.needs_input_grad[2 + l] else None)
        return None, grad_flat, *grad_weights


def _compute_dtype(t: Tensor, param_dtype: torch.dtype) -> torch.dtype:
    device = t.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else param_dtype


def _encoder_forward(flat: Tensor, weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """z [N, L, F] = x W_enc^T + b_enc, one GEMM per layer written in place; also returns x and
    W_enc in the compute dtype (autocast's: the bias is then added in the parameter dtype)."""
    n, num_layers, _ = flat.shape
    dtype = _compute_dtype(flat, weight.dtype)
    x, w = flat.to(dtype).contiguous(), weight.to(dtype)
    z = x.new_empty(n, num_layers, weight.shape[1])
    with torch.autocast(flat.device.type, enabled=False):
        for l in range(num_layers):
            if dtype == bias.dtype:
                torch.addmm(bias[l], x[:, l], w[l].T, out=z[:, l])
            else:
                torch.mm(x[:, l], w[l].T, out=z[:, l])
        if dtype != bias.dtype:
            z = z.to(torch.promote_types(dtype, bias.dtype)) + bias
    return z, x, w


def _encoder_backward(ctx, grad: Tensor, x: Tensor, w: Tensor, sparse: bool):
    """Gradients of (flat, W_enc, b_enc) from the dense gradient of z; with `sparse` the weight
    gradient sums only the nonzero entries of `grad` (embedding bags)."""
    x_dtype, w_dtype, b_dtype = ctx.dtypes
    grad_x = grad_w = grad_b = None
    with torch.autocast(grad.device.type, enabled=False):
        if ctx.needs_input_grad[2]:
            grad_b = grad.sum(0).to(b_dtype)
        g = grad.to(x.dtype)
        if ctx.needs_input_grad[1]:
            if sparse:
                rows, layer, cols = g.nonzero().unbind(1)
                grad_w = _bag_weight_grad(layer, rows, cols, g[rows, layer, cols], x, w.shape[1])
            else:
                grad_w = torch.empty_like(w)
                for l in range(x.shape[1]):
                    torch.mm(g[:, l].T, x[:, l], out=grad_w[l])
            grad_w = grad_w.to(w_dtype)
        if ctx.needs_input_grad[0]:
            grad_x = torch.empty_like(x)
            for l in range(x.shape[1]):
                torch.mm(g[:, l], w[l], out=grad_x[:, l])
            grad_x = grad_x.to(x_dtype)
    return grad_x, grad_w, grad_b


def _bag_weight_grad(layer: Tensor, rows: Tensor, cols: Tensor, values: Tensor, x: Tensor, num_features: int) -> Tensor:
    """Σ over entries of values · x[row, layer] into row (layer, col) of [L, F, d]: the encoder
    weight gradient from sparse entries, one embedding bag per (layer, feature)."""
    n, num_layers, d = x.shape
    if n == 0 or values.numel() == 0:
        return x.new_zeros(num_layers, num_features, d)
    bag = layer * num_features + cols
    order = torch.argsort(bag, stable=True)
    counts = torch.bincount(bag, minlength=num_layers * num_features)
    table = x.reshape(n * num_layers, d)  # row n·L + l is x[n, l]
    out = nn.functional.embedding_bag(
        (rows * num_layers + layer)[order],
        table,
        counts.cumsum(0) - counts,
        mode="sum",
        per_sample_weights=values.to(x.dtype)[order],
    )
    return out.view(num_layers, num_features, d)


class _Encode(torch.autograd.Function):
    """z = x W_enc^T + b_enc [N, L, F]; with ``sparse_grad`` (TopK/BatchTopK, whose gradient of z
    is nonzero only at the active features and the auxiliary loss's dead ones) the weight
    gradient sums the nonzero entries, Σ_n g[n,l,f] x[n,l], instead of a dense GEMM, while at
    most 1/8 of them are nonzero."""

    @staticmethod
    def forward(ctx, flat: Tensor, weight: Tensor, bias: Tensor, sparse_grad: bool) -> Tensor:
        z, x, w = _encoder_forward(flat, weight, bias)
        ctx.sparse_grad, ctx.dtypes = sparse_grad, (flat.dtype, weight.dtype, bias.dtype)
        ctx.save_for_backward(x, w)
        return z

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, w = ctx.saved_tensors
        sparse = ctx.sparse_grad and _sparse_enough(int(torch.count_nonzero(grad)), grad.numel())
        return *_encoder_backward(ctx, grad, x, w, sparse), None


class _EncodeActive(torch.autograd.Function):
    """Encoder and TopK/BatchTopK selection: z [N, L, F], and the kept entries as lists sorted
    by (layer, token): values ReLU(z) [nnz] and their (layer, token, feature) indices.

    Backward: the gradient reaching the values (decoder, features) never becomes a dense
    [N, L, F] tensor unless z itself gets one (auxiliary loss): encoder weight and bias
    gradients are sums over the entries (embedding bags, index_add).
    """

    @staticmethod
    def forward(ctx, flat: Tensor, weight: Tensor, bias: Tensor, select: Callable) -> tuple:
        z, x, w = _encoder_forward(flat, weight, bias)
        layer, rows, cols = select(z)
        values = z[rows, layer, cols].clamp_min(0)
        ctx.mark_non_differentiable(layer, rows, cols)
        ctx.set_materialize_grads(False)
        ctx.dtypes = (flat.dtype, weight.dtype, bias.dtype)
        ctx.save_for_backward(x, w, layer, rows, cols, values)
        return z, values, layer, rows, cols

    @staticmethod
    def backward(ctx, grad_z: Tensor | None, grad_values: Tensor | None, *_):
        x, w, layer, rows, cols, values = ctx.saved_tensors
        n, num_layers, _ = x.shape
        num_features = w.shape[1]
        active = None if grad_values is None else torch.where(values > 0, grad_values, 0)
        if grad_z is not None or ctx.needs_input_grad[0]:
            grad = grad_z
            if grad is None:
                grad = x.new_zeros(n, num_layers, num_features, dtype=values.dtype)
            if active is not None:
                grad = grad.index_put((rows, layer, cols), active, accumulate=True)
            sparse = grad_z is None or _sparse_enough(int(torch.count_nonzero(grad)), grad.numel())
            return *_encoder_backward(ctx, grad, x, w, sparse), None
        if active is None:
            return None, None, None, None
        b_dtype = ctx.dtypes[2]
        grad_b = None
        if ctx.needs_input_grad[2]:
            grad_b = (
                active.new_zeros(num_layers * num_features)
                .index_add_(0, layer * num_features + cols, active)
                .view(num_layers, num_features)
                .to(b_dtype)
            )
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = _bag_weight_grad(layer, rows, cols, active, x, num_features).to(ctx.dtypes[1])
        return None, grad_w, grad_b, None


def _sparse_enough(nnz: int, numel: int) -> bool:
    """Gathers beat dense GEMMs below 1/8 density (measured on CPU, F/k = 8 is about even)."""
    return nnz * 8 <= numel


def _segments(layer: Tensor, rows: Tensor, n: int, num_layers: int) -> tuple[Tensor, list[int]]:
    """For entries sorted by (layer, token): where each token's entries start within its layer's
    segment, offsets [L, N], and the segments' bounds [0, end of layer 0, ..., nnz]."""
    counts = torch.bincount(layer * n + rows, minlength=num_layers * n).view(num_layers, n)
    ends = counts.flatten().cumsum(0).view(num_layers, n)
    bounds = [0, *ends[:, -1].tolist()]
    return ends - counts - ends.new_tensor(bounds[:-1])[:, None], bounds


def _sparse_decode(flat: Tensor, weights: list[Tensor], d: int, force: bool) -> Tensor | None:
    """Σ_l Σ_{i: a_l,i ≠ 0} a_l,i W_dec[l][i] for features flat [N, L, F] → [N, L·d]; None
    when more than 1/8 of the features are nonzero (the dense decoder is faster) unless
    `force`."""
    n, num_layers, _ = flat.shape
    if n == 0:
        return flat.new_zeros(0, num_layers * d, dtype=weights[0].dtype)
    with torch.no_grad():
        layer, rows, cols = flat.transpose(0, 1).nonzero().unbind(1)  # sorted by (layer, token)
        if not force and not _sparse_enough(layer.numel(), flat.numel()):
            return None
        offsets, bounds = _segments(layer, rows, n, num_layers)
    values = flat[rows, layer, cols].to(weights[0].dtype)
    return _SparseDecode.apply(d, rows, cols, offsets, bounds, values, *weights)


class _SparseDecode(torch.autograd.Function):
    """Decoder over the active features only: embedding bags of the decoder rows [F, J·d].

    Inputs, sorted by (layer, token): ``rows``/``cols`` the token and feature of each active
    entry, ``values`` its activation; ``offsets`` [L, N] where each token's entries start within
    its layer's segment ``bounds[l]:bounds[l+1]``. Backward: values get ⟨grad row, decoder row⟩,
    decoder rows the Σ over their tokens of value · grad row (entries sorted by feature).
    """

    @staticmethod
    def forward(
        ctx, d: int, rows: Tensor, cols: Tensor, offsets: Tensor, bounds: list[int], values: Tensor, *weights: Tensor
    ) -> Tensor:
        n = offsets.shape[1]
        out = values.new_zeros(n, len(weights) * d)
        with torch.autocast(values.device.type, enabled=False):
            for l, w in enumerate(weights):
                seg = slice(bounds[l], bounds[l + 1])
                if seg.start == seg.stop:
                    continue
                part = nn.functional.embedding_bag(
                    cols[seg], w.reshape(w.shape[0], -1), offsets[l], mode="sum", per_sample_weights=values[seg]
                )
                out[:, l * d : (l + w.shape[1]) * d] += part
        ctx.d, ctx.bounds = d, bounds
        ctx.save_for_backward(rows, cols, offsets, values, *weights)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        rows, cols, offsets, values, *weights = ctx.saved_tensors
        d, bounds = ctx.d, ctx.bounds
        grad_values = torch.zeros_like(values) if ctx.needs_input_grad[5] else None
        grad_weights = []
        with torch.autocast(grad.device.type, enabled=False):
            grad = grad.to(values.dtype)
            for l, w in enumerate(weights):
                seg = slice(bounds[l], bounds[l + 1])
                g = grad[:, l * d : (l + w.shape[1]) * d]
                w2 = w.reshape(w.shape[0], -1)
                if grad_values is not None and seg.start != seg.stop:
                    grad_values[seg] = torch.ops.aten._embedding_bag_per_sample_weights_backward(
                        g, w2, cols[seg], offsets[l], rows[seg], 0, -1
                    )
                if not ctx.needs_input_grad[6 + l]:
                    grad_weights.append(None)
                    continue
                by_feature = torch.argsort(cols[seg], stable=True)
                counts = torch.bincount(cols[seg], minlength=w.shape[0])
                grad_w = nn.functional.embedding_bag(
                    rows[seg][by_feature],
                    g,
                    counts.cumsum(0) - counts,
                    mode="sum",
                    per_sample_weights=values[seg][by_feature],
                )
                grad_weights.append(grad_w.view_as(w))
        return None, None, None, None, None, grad_values, *grad_weights


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    return read_tensors(
        path,
        CheckpointError,
        missing="save the transcoder again",
        corrupt="re-save the transcoder or copy the file again",
        missing_error=FileNotFoundError,
    )


__all__ = ["CLTOutput", "CheckpointError", "CrossLayerTranscoder", "UnsupportedDictionaryError"]
