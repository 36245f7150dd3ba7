"""Per-layer transcoder weights in raw model space, and loading them from safetensors folders.

Notation follows the `sparse-clt` / `sparse-transcoder` seeds: `f` features, `h` hidden size.
Three on-disk layouts are read (safetensors only, never pickle):

- this project's `CrossLayerTranscoder.save_pretrained` folder (`config.json` +
  `model.safetensors`), loaded via `CrossLayerTranscoder.from_pretrained(dir).fold_normalization()`;
- circuit-tracer per-layer transcoders: `layer_{i}.safetensors` with `W_enc [f, h]`,
  `W_dec [f, h]`, `b_enc`, `b_dec`, optional `activation_function.threshold` and `W_skip`;
- circuit-tracer cross-layer transcoders: `W_enc_{i}.safetensors` (`W_enc_i`, `b_enc_i`,
  `b_dec_i`, optional `threshold_i`) and optional `W_dec_{i}.safetensors` (`W_dec_i [f, L - i, h]`).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

_PLT_FILE = re.compile(r"^layer_(\d+)\.safetensors$")
_CLT_FILE = re.compile(r"^W_enc_(\d+)\.safetensors$")


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
        found = _scan(root, _PLT_FILE) or _scan(root, _CLT_FILE)
        if not found:
            raise TranscoderLoadError(
                f"{root} holds no transcoder: expected `config.json` + `model.safetensors` "
                "(CrossLayerTranscoder.save_pretrained), `layer_{i}.safetensors` (circuit-tracer "
                "per-layer transcoders) or `W_enc_{i}.safetensors` (circuit-tracer CLT)"
            )
        wanted = _check_layers(root, layers, sorted(found))
        reader = _read_plt if next(iter(found.values())).name.startswith("layer_") else _read_clt
        result = {layer: reader(found[layer], layer, device, load_decoder) for layer in wanted}
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
        tensors = {
            "W_enc": weights.W_enc,
            "W_dec": weights.W_dec.T,
            "b_enc": weights.b_enc,
            "b_dec": weights.b_dec,
        }
        if weights.threshold is not None:
            tensors["activation_function.threshold"] = weights.threshold
        if weights.W_skip is not None:
            tensors["W_skip"] = weights.W_skip
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
            str(directory / f"layer_{layer}.safetensors"),
        )
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


def _scan(root: Path, pattern: re.Pattern[str]) -> dict[int, Path]:
    found = {}
    for path in root.iterdir():
        match = pattern.match(path.name)
        if match:
            found[int(match.group(1))] = path
    return found


def _check_layers(root: Path, layers: list[int] | None, available: list[int]) -> list[int]:
    if layers is None:
        return available
    missing = [layer for layer in layers if layer not in available]
    if missing:
        raise TranscoderLoadError(f"no transcoder for layer(s) {missing} in {root}; available layers: {available}")
    return list(layers)


def _read_file(
    path: Path, device: str | torch.device, skip: tuple[str, ...] = (), header_only: bool = False
) -> dict[str, Tensor]:
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            if header_only:
                return {}
            return {key: handle.get_tensor(key) for key in handle.keys() if key not in skip}  # noqa: SIM118 (safe_open is no dict)
    except (SafetensorError, OSError) as err:
        raise TranscoderLoadError(f"{path} is not a readable safetensors file (truncated or corrupt?): {err}") from err


def _take(tensors: dict[str, Tensor], key: str, path: Path) -> Tensor:
    if key not in tensors:
        raise TranscoderLoadError(f"{path} has no tensor '{key}'; it holds {sorted(tensors)}")
    return tensors[key]


def _build(path: Path, **fields: Tensor | None) -> TranscoderWeights:
    try:
        return TranscoderWeights(**fields)
    except ValueError as err:
        raise TranscoderLoadError(f"{path}: {err}") from err


def _read_plt(path: Path, layer: int, device: str | torch.device, load_decoder: bool) -> TranscoderWeights:
    tensors = _read_file(path, device, skip=() if load_decoder else ("W_dec",))
    return _build(
        path,
        W_enc=_take(tensors, "W_enc", path),
        b_enc=_take(tensors, "b_enc", path),
        W_dec=_take(tensors, "W_dec", path).T if load_decoder else None,
        b_dec=_take(tensors, "b_dec", path),
        threshold=tensors.get("activation_function.threshold"),
        W_skip=tensors.get("W_skip"),
    )


def _read_clt(path: Path, layer: int, device: str | torch.device, load_decoder: bool) -> TranscoderWeights:
    tensors = _read_file(path, device)
    cross = None
    dec_path = path.with_name(f"W_dec_{layer}.safetensors")
    if load_decoder and dec_path.is_file():
        cross = _take(_read_file(dec_path, device), f"W_dec_{layer}", dec_path)
        if cross.ndim != 3:
            raise TranscoderLoadError(
                f"{dec_path}: W_dec_{layer} has shape {list(cross.shape)}; expected [f, n_out, h]"
            )
    return _build(
        path,
        W_enc=_take(tensors, f"W_enc_{layer}", path),
        b_enc=_take(tensors, f"b_enc_{layer}", path),
        W_dec=None if cross is None else cross[:, 0, :].T,
        b_dec=_take(tensors, f"b_dec_{layer}", path),
        threshold=tensors.get(f"threshold_{layer}"),
        W_dec_cross=cross,
    )


def _load_pretrained(
    root: Path, layers: list[int] | None, device: str | torch.device, load_decoder: bool
) -> dict[int, TranscoderWeights]:
    """Read a `CrossLayerTranscoder.save_pretrained` folder, normalisation folded into the weights.

    The threshold is the model's inference threshold (JumpReLU θ, or the BatchTopK EMA); ReLU and
    TopK transcoders get none (for TopK, the encoder's `top_k` plays the role of k).
    """
    from clt.config.base import ConfigError
    from clt.config.transcoder import CLTConfig
    from clt.models.transcoder import CheckpointError, CrossLayerTranscoder

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
