"""Per-layer transcoder weights in raw model space, and loading them from safetensors folders.

Notation follows the `sparse-clt` / `sparse-transcoder` seeds: `f` features, `h` hidden size.
Three on-disk layouts are read (safetensors only, never pickle):

- this project's `CrossLayerTranscoder.save_pretrained` folder (`config.json` +
  `model.safetensors`), loaded via `CrossLayerTranscoder.from_pretrained(dir).fold_normalization()`;
- circuit-tracer per-layer transcoders: `layer_{i}.safetensors` with `W_enc [f, h]`,
  `W_dec [f, h]`, `b_enc`, `b_dec`, optional `activation_function.threshold` and `W_skip`;
- circuit-tracer cross-layer transcoders: `W_enc_{i}.safetensors` (`W_enc_i`, `b_enc_i`,
  `b_dec_i`, optional `threshold_i`) and optional `W_dec_{i}.safetensors` (`W_dec_i [f, L - i, h]`).

circuit-tracer's files are read and written by `clt.models.circuit_tracer_files` (writes atomic).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import Tensor

from clt.config.base import ConfigError
from clt.config.transcoder import CLTConfig
from clt.models.circuit_tracer_files import FILES, PLT_KIND, detect_kind, layer_files, read_layer, write_layer
from clt.models.saving import CheckpointError
from clt.models.transcoder import CrossLayerTranscoder


class TranscoderLoadError(ValueError):
    """A transcoder folder or file cannot be read; the message names the file and the fix."""


@dataclasses.dataclass
class TranscoderWeights:
    """One layer's transcoder, raw (un-normalised) model space, seed shapes `[f, h]` / `[h, f]`."""

    W_enc: Tensor
    """Encoder `[f, h]`: pre-activations are `hidden @ W_enc.T + b_enc`."""
    b_enc: Tensor
    """Encoder bias `[f]`."""
    W_dec: Tensor | None = None
    """Same-layer decoder `[h, f]` (a transposed view of the stored `[f, h]`); None: not loaded."""
    b_dec: Tensor | None = None
    """Decoder bias `[h]`."""
    threshold: Tensor | None = None
    """JumpReLU threshold `[f]`: a feature is on only where its pre-activation exceeds it."""
    W_skip: Tensor | None = None
    """Skip connection `[h, h]`, applied as `hidden @ W_skip.T` (circuit-tracer convention)."""
    W_dec_cross: Tensor | None = None
    """CLT decoder `[f, n_out, h]`: slot j writes to the j-th CLT layer from this one (0 = self)."""

    def __post_init__(self) -> None:
        f, h = _expect(self.W_enc, "W_enc", 2).shape
        if not self.W_enc.is_floating_point():
            raise ValueError(f"W_enc must be a floating-point tensor, got {self.W_enc.dtype}")
        checks: dict[str, tuple[int, ...]] = {
            "b_enc": (f,),
            "W_dec": (h, f),
            "b_dec": (h,),
            "threshold": (f,),
            "W_skip": (h, h),
        }
        for name, shape in checks.items():
            value = getattr(self, name)
            if value is not None and tuple(_expect(value, name, len(shape)).shape) != shape:
                raise ValueError(
                    f"{name} has shape {list(value.shape)} but W_enc [f={f}, h={h}] needs "
                    f"{list(shape)}; check that W_enc is [features, hidden] (transpose it if not)"
                )
        cross = self.W_dec_cross
        if cross is not None and (_expect(cross, "W_dec_cross", 3).shape[0] != f or cross.shape[2] != h):
            raise ValueError(f"W_dec_cross has shape {list(cross.shape)}; expected [f={f}, n_out, h={h}]")
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is not None and value.device != self.W_enc.device:
                raise ValueError(
                    f"{field.name} is on {value.device} but W_enc is on {self.W_enc.device}; "
                    "move all weights with `.to(device)`"
                )

    @property
    def d_features(self) -> int:
        """Number of features f."""
        return self.W_enc.shape[0]

    @property
    def d_hidden(self) -> int:
        """Hidden size h of the layer the transcoder reads."""
        return self.W_enc.shape[1]

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> TranscoderWeights:
        """A copy on another device and/or floating dtype."""
        moved: dict[str, Tensor | None] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            moved[field.name] = None if value is None else value.to(device=device, dtype=dtype)
        return TranscoderWeights(**moved)


def _expect(value: object, name: str, ndim: int) -> Tensor:
    if not isinstance(value, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {list(value.shape)}")
    return value


def load_transcoders(
    transcoder_dir: str | Path,
    layers: list[int] | None = None,
    device: str | torch.device = "cpu",
    *,
    dtype: torch.dtype | None = None,
    load_decoder: bool = True,
) -> dict[int, TranscoderWeights]:
    """Load the transcoders of `layers` (default: all) from a folder, keyed by model layer index."""
    root = Path(transcoder_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"transcoder directory not found: {root}")
    if (root / "config.json").is_file():
        result = _load_pretrained(root, layers, device, load_decoder)
    else:
        kind = detect_kind(root)
        if kind is None:
            raise TranscoderLoadError(
                f"{root} holds no transcoder: expected `config.json` + `model.safetensors` "
                "(CrossLayerTranscoder.save_pretrained), `layer_{i}.safetensors` (circuit-tracer "
                "per-layer transcoders) or `W_enc_{i}.safetensors` (circuit-tracer CLT)"
            )
        found = layer_files(root, FILES[kind][0])
        wanted = _check_layers(root, layers, sorted(found))
        result = {layer: _read_circuit_tracer(found[layer], kind, layer, device, load_decoder) for layer in wanted}
    if dtype is not None:
        result = {layer: weights.to(dtype=dtype) for layer, weights in result.items()}
    _check_consistent(root, result)
    return result


def save_transcoders(transcoders: dict[int, TranscoderWeights], directory: str | Path) -> Path:
    """Write `layer_{i}.safetensors` files in circuit-tracer's per-layer format; returns the dir."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for layer, weights in transcoders.items():
        if weights.W_dec is None or weights.b_dec is None:
            raise ValueError(f"layer {layer}: circuit-tracer files need W_dec and b_dec")
        tensors = {"W_enc": weights.W_enc, "W_dec": weights.W_dec.T, "b_enc": weights.b_enc, "b_dec": weights.b_dec}
        write_layer(directory, PLT_KIND, layer, {**tensors, "threshold": weights.threshold, "W_skip": weights.W_skip})
    return directory


def random_transcoders(
    layers: list[int],
    d_hidden: int,
    d_features: int,
    *,
    jumprelu: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> dict[int, TranscoderWeights]:
    """Random transcoders (for tests and benchmarks) whose features fire on Gaussian inputs."""
    gen = torch.Generator().manual_seed(seed)
    result = {}
    for layer in layers:
        W_enc = torch.randn(d_features, d_hidden, generator=gen) / d_hidden**0.5
        threshold = torch.rand(d_features, generator=gen) if jumprelu else None
        result[layer] = TranscoderWeights(
            W_enc=W_enc,
            b_enc=0.1 * torch.randn(d_features, generator=gen),
            W_dec=torch.randn(d_hidden, d_features, generator=gen) / d_features**0.5,
            b_dec=0.1 * torch.randn(d_hidden, generator=gen),
            threshold=threshold,
        ).to(device=device, dtype=dtype)
    return result


def _check_layers(root: Path, layers: list[int] | None, available: list[int]) -> list[int]:
    if layers is None:
        return available
    missing = [layer for layer in layers if layer not in available]
    if missing:
        raise TranscoderLoadError(f"no transcoder for layer(s) {missing} in {root}; available layers: {available}")
    return list(layers)


def _build(path: Path, **fields: Tensor | None) -> TranscoderWeights:
    try:
        return TranscoderWeights(**fields)
    except ValueError as err:
        raise TranscoderLoadError(f"{path}: {err}") from err


def _read_circuit_tracer(
    path: Path, kind: str, layer: int, device: str | torch.device, load_decoder: bool
) -> TranscoderWeights:
    """One layer of a circuit-tracer folder; `path` is the layer's main file."""
    try:
        tensors = read_layer(path.parent, kind, layer, device=device, decoder=load_decoder)
    except CheckpointError as err:
        raise TranscoderLoadError(str(err)) from err
    if kind == PLT_KIND:
        same_layer, cross = tensors.get("W_dec"), None
    else:
        cross = tensors.get("W_dec")
        same_layer = None if cross is None else cross[:, 0, :]
    return _build(
        path,
        W_enc=tensors["W_enc"],
        b_enc=tensors["b_enc"],
        W_dec=None if same_layer is None else same_layer.T,
        b_dec=tensors["b_dec"],
        threshold=tensors.get("threshold"),
        W_skip=tensors.get("W_skip"),
        W_dec_cross=cross,
    )


def _load_pretrained(
    root: Path, layers: list[int] | None, device: str | torch.device, load_decoder: bool
) -> dict[int, TranscoderWeights]:
    """Read a `CrossLayerTranscoder.save_pretrained` folder, normalisation folded into the weights.

    The threshold is the model's inference threshold (JumpReLU θ, or the BatchTopK EMA); ReLU and
    TopK transcoders get none (for TopK, the encoder's `top_k` plays the role of k).
    """
    try:
        cfg = CLTConfig.load(root / "config.json")
        wanted = _check_layers(root, layers, list(cfg.layers))
        model = CrossLayerTranscoder.from_pretrained(root, device=device).fold_normalization()
    except (CheckpointError, ConfigError, FileNotFoundError) as err:
        raise TranscoderLoadError(f"cannot load the transcoder in {root}: {err}") from err
    thresholds = model.threshold if cfg.activation_fn in ("jumprelu", "batchtopk") else None
    result = {}
    for layer in wanted:
        i = cfg.layers.index(layer)
        cross = model.W_dec[i].detach() if load_decoder else None
        result[layer] = _build(
            root / "model.safetensors",
            W_enc=model.W_enc[i].detach(),
            b_enc=model.b_enc[i].detach(),
            W_dec=None if cross is None else cross[:, 0, :].T,
            b_dec=model.b_dec[i].detach(),
            threshold=None if thresholds is None else thresholds[i].detach(),
            W_skip=model.W_skip[i].detach() if cfg.skip_connection else None,
            W_dec_cross=cross,
        )
    return result


def _check_consistent(root: Path, transcoders: dict[int, TranscoderWeights]) -> None:
    hidden = {layer: weights.d_hidden for layer, weights in transcoders.items()}
    if len(set(hidden.values())) > 1:
        raise TranscoderLoadError(
            f"transcoders in {root} disagree on the hidden size (layer: h = {hidden}); "
            "all layers must read the same model"
        )
