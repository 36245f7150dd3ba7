"""Export a transcoder to circuit-tracer's on-disk formats, and read such a folder back.

The folder is circuit-tracer's layout (`clt.models.circuit_tracer_files`, which reads and writes
its files). With its ``config.yaml``, ``ReplacementModel.from_pretrained(model,
"/absolute/path/to/folder")`` loads the folder; ``load_clt(folder, ...)`` and
``load_transcoder_set({m: path}, ...)`` read the files directly. We add a ``clt_config`` key
(this project's CLTConfig, which circuit-tracer ignores) so that `load_circuit_tracer` restores
the exact configuration.

circuit-tracer runs transcoders on raw MLP inputs, so the export folds the standardisation into the
weights (`CrossLayerTranscoder.fold_normalization`): W_enc/σ_in with b_enc − W_enc·μ_in/σ_in,
W_dec·σ_out, b_dec·σ_out + μ_out (and the skip term likewise). Tensors keep the transcoder's
parameter dtype (call ``.float()`` first for float32 files).

Activation functions: ReLU → ReLU (no threshold written); JumpReLU → JumpReLU with θ = exp(log θ);
BatchTopK → JumpReLU with its inference threshold (per layer, repeated over features), which is
exactly what `activate` computes in eval mode. TopK has no exact counterpart (circuit-tracer's TopK,
for transcoder sets only, keeps negative pre-activations when fewer than k are positive) and raises
ValueError. circuit-tracer's CLT loader reads no skip weights, so a CLT with a skip connection
raises ValueError too.

SAEs (``output_site='mlp_in'``) and MOLTs have no circuit-tracer transcoder format and raise
UnsupportedDictionaryError; a Matryoshka transcoder is a plain one (its prefixes are kept in
``clt_config``).

circuit-tracer needs a transcoder at every model layer 0..M-1; layers this transcoder does not
cover are written with zero weights (features that never fire), so their MLP outputs become
error terms there, as in this project's ReplacementModel.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from clt.config.base import ConfigError
from clt.config.transcoder import PARAM_DTYPES, CLTConfig
from clt.models.circuit_tracer_files import (
    CLT_KIND,
    CONFIG_FILE,
    FILES,
    PLT_KIND,
    detect_kind,
    is_layer_file,
    layer_files,
    read_config,
    read_layer,
    write_config,
    write_layer,
)
from clt.models.saving import CheckpointError
from clt.models.transcoder import CrossLayerTranscoder

logger = logging.getLogger(__name__)

DEFAULT_INPUT_HOOK = "mlp.hook_in"
DEFAULT_OUTPUT_HOOK = "mlp.hook_out"
_OWN_CONFIG = "clt_config"


# ----------------------------------------------------------------- export


@torch.no_grad()
def export_circuit_tracer(
    transcoder: CrossLayerTranscoder,
    out_dir: str | Path,
    *,
    feature_input_hook: str = DEFAULT_INPUT_HOOK,
    feature_output_hook: str = DEFAULT_OUTPUT_HOOK,
    scan: str | None = None,
    num_model_layers: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `transcoder` as a folder circuit-tracer loads (module docstring); returns the folder.

    ``feature_input_hook``/``feature_output_hook`` name where circuit-tracer reads the features'
    input and writes their output; the defaults ``mlp.hook_in``/``mlp.hook_out`` are the MLP's
    own input and output, where this project's extractor records x and y. ``num_model_layers``
    (default: the last covered layer + 1) is the number of layers M written. An existing folder
    with circuit-tracer files is only replaced with ``overwrite=True``.
    """
    cfg = transcoder.cfg
    transcoder.require_mlp_replacement("circuit-tracer's transcoder formats")
    _check_exportable(cfg)
    layers = list(cfg.layers)
    M = max(layers) + 1 if num_model_layers is None else num_model_layers
    if max(layers) >= M:
        raise ValueError(
            f"num_model_layers={M} but the transcoder covers model layer "
            f"{max(layers)}; give the model's layer count (> {max(layers)})"
        )
    kind = CLT_KIND if cfg.cross_layer else PLT_KIND
    out_dir = Path(out_dir)
    _prepare(out_dir, overwrite)

    folded = transcoder.fold_normalization()
    dtype = folded.W_enc.dtype
    threshold = None if cfg.activation_fn == "relu" else folded.threshold.detach().to(dtype)
    index = {m: i for i, m in enumerate(layers)}
    F, d = cfg.num_features, cfg.d_model
    written: set[str] = set()

    def part(t: Tensor, i: int | None, *shape: int) -> Tensor:
        """Covered layer i's slice of `t`, or zeros of `shape` for a model layer not covered."""
        return t[i] if i is not None else torch.zeros(*shape, dtype=dtype)

    for m in range(M):
        i = index.get(m)
        tensors: dict[str, Tensor | None] = {
            "W_enc": part(folded.W_enc, i, F, d),
            "b_enc": part(folded.b_enc, i, F),
            "b_dec": part(folded.b_dec, i, d),
            "threshold": None if threshold is None else part(threshold, i, F),
        }
        if kind == PLT_KIND:
            tensors["W_dec"] = folded.W_dec[i][:, 0] if i is not None else torch.zeros(F, d, dtype=dtype)
            if cfg.skip_connection:
                tensors["W_skip"] = part(folded.W_skip, i, d, d)
        else:
            W_dec = torch.zeros(F, M - m, d, dtype=dtype)
            if i is not None:
                for t in range(i, cfg.num_layers):
                    W_dec[:, layers[t] - m] = folded.W_dec[i][:, t - i]
            tensors["W_dec"] = W_dec
        written.update(write_layer(out_dir, kind, m, tensors))
    for stale in out_dir.iterdir():
        if is_layer_file(stale.name) and stale.name not in written:
            stale.unlink()
    config: dict[str, Any] = {
        "model_kind": kind,
        "feature_input_hook": feature_input_hook,
        "feature_output_hook": feature_output_hook,
    }
    if scan is not None:
        config["scan"] = scan
    config[_OWN_CONFIG] = cfg.to_dict()
    write_config(out_dir, config)
    return out_dir


def _check_exportable(cfg: CLTConfig) -> None:
    if cfg.activation_fn == "topk":
        raise ValueError(
            "a TopK transcoder has no exact circuit-tracer counterpart (its TopK "
            "keeps negative pre-activations when fewer than k are positive, and only "
            "transcoder sets support it); train with activation_fn='jumprelu', "
            "'relu' or 'batchtopk' (exported as JumpReLU at its inference threshold)"
        )
    if cfg.cross_layer and cfg.skip_connection:
        raise ValueError(
            "circuit-tracer's CLT loader (load_clt) reads no skip weights, so the "
            "skip term would be dropped silently; export a CLT without "
            "skip_connection, or a per-layer transcoder (cross_layer=False), "
            "whose skip is supported"
        )


def _prepare(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} is a file; give a folder for the circuit-tracer export")
    out_dir.mkdir(parents=True, exist_ok=True)
    existing = [p.name for p in out_dir.iterdir() if p.name == CONFIG_FILE or is_layer_file(p.name)]
    if existing and not overwrite:
        raise FileExistsError(
            f"{out_dir} already holds circuit-tracer files ({min(existing)}, "
            "...); pass overwrite=True or choose an empty folder"
        )
    (out_dir / CONFIG_FILE).unlink(missing_ok=True)


# ----------------------------------------------------------------- load


@torch.no_grad()
def load_circuit_tracer(path: str | Path, device: str | torch.device | None = None) -> CrossLayerTranscoder:
    """Read a circuit-tracer transcoder folder (ours or circuit-tracer's) into a transcoder.

    The result has identity standardisation and raw-space weights. A folder written by
    `export_circuit_tracer` restores its CLTConfig (layers, activation, BatchTopK); weights and
    biases come back exactly, JumpReLU thresholds up to float rounding of log θ. Other folders
    cover model layers 0..M-1; a circuit-tracer TopK transcoder set loads as TopK (which differs
    where fewer than k pre-activations are positive: ours zeroes negative values).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no circuit-tracer transcoder folder at {path}; write one with export_circuit_tracer")
    config = read_config(path)
    kind = config.get("model_kind") or detect_kind(path)
    if kind is None:
        raise FileNotFoundError(
            f"{path} holds no circuit-tracer transcoder (layer_0.safetensors or "
            "W_enc_0.safetensors); write one with export_circuit_tracer"
        )
    if kind not in FILES:
        raise CheckpointError(
            f"{path / CONFIG_FILE}: model_kind {kind!r} is not one of {sorted(FILES)}; fix config.yaml"
        )
    M = _count_layers(path, kind)
    own = _own_config(path, config, kind, M)
    layers = own.layers if own is not None else list(range(M))
    per_layer = [read_layer(path, kind, m) for m in layers]
    first = per_layer[0]
    F, d = first["W_enc"].shape
    for m, t in zip(layers, per_layer):
        _check_shapes(path, kind, m, M, t, F, d)
    cfg = own if own is not None else _infer_config(config, kind, per_layer, F, d, M)
    if (cfg.num_features, cfg.d_model) != (F, d):
        raise CheckpointError(
            f"{path}: the files hold F={F}, d={d} but {CONFIG_FILE} says "
            f"F={cfg.num_features}, d={cfg.d_model}; export the folder again"
        )
    model = CrossLayerTranscoder(cfg)
    for i, (m, t) in enumerate(zip(layers, per_layer)):
        model.W_enc[i] = t["W_enc"]
        model.b_enc[i] = t["b_enc"]
        model.b_dec[i] = t["b_dec"]
        if kind == PLT_KIND:
            model.W_dec[i].copy_(t["W_dec"][:, None])
        else:
            cols = [layers[j] - m for j in range(i, cfg.num_layers)]
            model.W_dec[i].copy_(t["W_dec"][:, cols])
        if cfg.skip_connection:
            model.W_skip[i] = t["W_skip"]
        _set_threshold(model, i, t.get("threshold"), path)
    return model if device is None else model.to(device)


def _count_layers(path: Path, kind: str) -> int:
    counts = []
    for pattern in FILES[kind]:
        found = set(layer_files(path, pattern))
        missing = sorted(set(range(max(found, default=-1) + 1)) - found)
        if not found or missing:
            first = pattern.format(missing[0] if missing else 0)
            raise CheckpointError(
                f"{path} lacks {first} (a {kind} needs one file per layer "
                "0..M-1); copy the complete folder or export it again"
            )
        counts.append(len(found))
    if len(set(counts)) > 1:
        raise CheckpointError(
            f"{path} has {counts[0]} W_enc_* but {counts[1]} W_dec_* files; copy the complete folder or export it again"
        )
    return counts[0]


def _own_config(path: Path, config: dict[str, Any], kind: str, M: int) -> CLTConfig | None:
    if _OWN_CONFIG not in config:
        return None
    try:
        cfg = CLTConfig.from_dict(config[_OWN_CONFIG])
    except (ConfigError, TypeError) as err:
        raise CheckpointError(
            f"{path / CONFIG_FILE}: {_OWN_CONFIG} is invalid ({err}); export the folder again"
        ) from err
    if cfg.cross_layer != (kind == CLT_KIND):
        raise CheckpointError(
            f"{path / CONFIG_FILE}: model_kind {kind} contradicts "
            f"{_OWN_CONFIG}.cross_layer={cfg.cross_layer}; export the folder "
            "again"
        )
    if max(cfg.layers) >= M:
        raise CheckpointError(
            f"{path} has files for {M} layers but its {_OWN_CONFIG} covers model "
            f"layers up to {max(cfg.layers)}; copy the missing files or export "
            "the folder again"
        )
    return cfg


def _check_shapes(path: Path, kind: str, m: int, M: int, t: dict[str, Tensor], F: int, d: int) -> None:
    expected = {
        "W_enc": (F, d),
        "b_enc": (F,),
        "b_dec": (d,),
        "threshold": (F,),
        "W_dec": (F, d) if kind == PLT_KIND else (F, M - m, d),
        "W_skip": (d, d),
    }
    for key, shape in expected.items():
        if key in t and tuple(t[key].shape) != shape:
            raise CheckpointError(
                f"{path}, layer {m}: '{key}' has shape {list(t[key].shape)}, "
                f"expected {list(shape)} (F={F}, d={d}, {M} layers); the files "
                "come from different transcoders or a wrong layer count"
            )


def _infer_config(
    config: dict[str, Any], kind: str, per_layer: list[dict[str, Tensor]], F: int, d: int, M: int
) -> CLTConfig:
    first = per_layer[0]
    has_threshold = ["threshold" in t for t in per_layer]
    if any(has_threshold) and not all(has_threshold):
        raise CheckpointError("some layers have JumpReLU thresholds and some do not; export the folder again")
    activation = "jumprelu" if all(has_threshold) else "relu"
    k = config.get("k", int(first["k"]) if "k" in first else None)
    if config.get("activation") == "topk" or "k" in first:
        if k is None:
            raise CheckpointError(
                "a TopK transcoder set needs k (config.yaml 'k' or a 'k' tensor); add it to config.yaml"
            )
        logger.warning(
            "loading circuit-tracer TopK as this project's TopK, which zeroes negative "
            "pre-activations (they differ where fewer than k are positive)"
        )
        activation = "topk"
    elif config.get("activation") == "relu":
        activation = "relu"
    dtype = str(first["W_enc"].dtype).removeprefix("torch.")
    return CLTConfig(
        num_features=F,
        num_layers=M,
        d_model=d,
        activation_fn=activation,
        topk=k if activation == "topk" else min(16, F),
        cross_layer=kind == CLT_KIND,
        skip_connection=kind == PLT_KIND and "W_skip" in first,
        dtype=dtype if dtype in PARAM_DTYPES else "float32",
    )


def _set_threshold(model: CrossLayerTranscoder, i: int, threshold: Tensor | None, path: Path) -> None:
    act = model.cfg.activation_fn
    if act in ("relu", "topk"):
        return
    if threshold is None:
        raise CheckpointError(
            f"{path}: layer {model.cfg.layers[i]} has no threshold but the config says {act}; export the folder again"
        )
    theta = threshold.double()
    if act == "batchtopk":
        if not bool((theta == theta[0]).all()):
            raise CheckpointError(
                f"{path}: a BatchTopK layer needs one threshold per layer, but "
                f"layer {model.cfg.layers[i]} has several; export it again"
            )
        model.batchtopk.threshold[i] = theta[0]
        model.batchtopk.num_updates.fill_(1)
        return
    if bool((theta < 0).any()):
        raise CheckpointError(
            f"{path}: layer {model.cfg.layers[i]} has negative JumpReLU "
            "thresholds, which log θ cannot represent; clamp them to >= 0"
        )
    model.log_threshold[i] = theta.log()


__all__ = ["export_circuit_tracer", "load_circuit_tracer"]
