"""Per-layer dictionaries in raw activation space: the common ground of other libraries' formats.

sparsify and SAELens (like circuit-tracer's transcoder sets) store one dictionary per model layer
with weights that act on raw activations: ``W_enc`` [F, d] (pre-activations ``x @ W_enc.T + b_enc``),
``b_enc`` [F], ``W_dec`` [F, d] (output ``a @ W_dec + b_dec``), ``b_dec`` [d], and optionally
``W_skip`` [d, d] (adds ``x @ W_skip.T``) and a JumpReLU ``threshold`` [F]. Their readers turn
the files into such `LayerWeights` and call `from_layers`; their writers call `to_layers`, which
folds this project's standardisation into the weights (`CrossLayerTranscoder.fold_normalization`).
"""

from __future__ import annotations

import difflib
import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from clt.config.transcoder import PARAM_DTYPES, CLTConfig
from clt.models.saving import CheckpointError
from clt.models.transcoder import CrossLayerTranscoder

logger = logging.getLogger(__name__)

LayerWeights = dict[str, Tensor]
"""One layer's tensors: W_enc, b_enc, W_dec, b_dec and optional W_skip, threshold; raw-space, or with
``input_std``/``output_std`` [d] the weights act on x / input_std and their output is scaled by
output_std (a library's per-layer scaling: this project's standardisation with zero means)."""
REQUIRED = ("W_enc", "b_enc", "W_dec", "b_dec")
TINY_THRESHOLD = 1e-30
"""JumpReLU thresholds <= 0 (a ReLU there) load as this: identical except for z in (0, 1e-30]."""
_LAYER = re.compile(r"(?:^|[._])(\d+)(?:[._]|$)")


def layer_number(name: str) -> int | None:
    """The layer a hook or folder name names: its first number (``model.layers.12.mlp`` → 12)."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def read_json_config(file: Path, known: tuple[str, ...], required: tuple[str, ...], fix: str) -> dict[str, Any]:
    """A JSON object from `file`, checked: the `required` keys are there, and a key that is not
    `known` but close to a known one that is absent is a typo (named, with the closest key)."""
    try:
        cfg = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{file} is not valid JSON ({err}); {fix}") from err
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{file} must hold a JSON object; {fix}")
    for key in cfg:
        if key not in known:
            close = difflib.get_close_matches(key, [k for k in known if k not in cfg], n=1, cutoff=0.75)
            if close:
                raise CheckpointError(f"{file}: unknown key '{key}'. Did you mean '{close[0]}'? Fix the file")
    missing = [k for k in required if k not in cfg]
    if missing:
        raise CheckpointError(f"{file} lacks {missing}; {fix}")
    return cfg


def check_layer(source: Path | str, layer: int, t: LayerWeights, F: int, d: int) -> None:
    """Raise CheckpointError naming the file when a layer's tensors are missing or mis-shaped."""
    missing = [k for k in REQUIRED if k not in t]
    if missing:
        raise CheckpointError(f"{source}: layer {layer} lacks {missing}; the file is incomplete, write it again")
    expected = {
        "W_enc": (F, d),
        "b_enc": (F,),
        "W_dec": (F, d),
        "b_dec": (d,),
        "W_skip": (d, d),
        "threshold": (F,),
        "input_std": (d,),
        "output_std": (d,),
    }
    for key, shape in expected.items():
        if key in t and tuple(t[key].shape) != shape:
            raise CheckpointError(
                f"{source}: layer {layer}'s {key} has shape {list(t[key].shape)}, expected {list(shape)} "
                f"(F={F} features, d_model={d}); the files come from different dictionaries or are corrupt"
            )


@torch.no_grad()
def from_layers(
    layers: list[int], weights: list[LayerWeights], source: Path | str, **config: Any
) -> CrossLayerTranscoder:
    """A per-layer transcoder (or SAE, ``output_site='mlp_in'``) covering model `layers` from `weights`
    (one `LayerWeights` per layer); `config` holds further CLTConfig fields (activation_fn,
    topk, output_site, model_name). Standardisation from input_std/output_std where given, else identity."""
    if not weights:
        raise CheckpointError(f"{source} holds no dictionary layer")
    F, d = weights[0]["W_enc"].shape if "W_enc" in weights[0] else (0, 0)
    for m, t in zip(layers, weights):
        check_layer(source, m, t, F, d)
    skips = {"W_skip" in t for t in weights}
    if len(skips) > 1:
        raise CheckpointError(f"{source}: some layers have a skip connection and some do not; load them separately")
    dtype = str(weights[0]["W_enc"].dtype).removeprefix("torch.")
    cfg = CLTConfig(
        num_features=int(F),
        num_layers=len(layers),
        d_model=int(d),
        layers=list(layers),
        cross_layer=False,
        skip_connection=skips == {True},
        dtype=dtype if dtype in PARAM_DTYPES else "float32",
        **config,
    )
    if cfg.activation_fn == "batchtopk":
        raise ValueError("from_layers builds relu, jumprelu or topk dictionaries (a file holds no BatchTopK state)")
    with torch.device("meta"):  # no random initialisation of weights that are all overwritten below
        model = CrossLayerTranscoder(cfg)
    model = model.to_empty(device="cpu")
    ones, zeros = torch.ones(len(weights), int(d)), torch.zeros(len(weights), int(d))
    stds = [torch.stack([t.get(k, ones[0]).float() for t in weights]) for k in ("input_std", "output_std")]
    model.set_normalization(zeros, stds[0], zeros, stds[1])
    for i, t in enumerate(weights):
        model.W_enc[i] = t["W_enc"]
        model.b_enc[i] = t["b_enc"]
        model.W_dec[i].copy_(t["W_dec"][:, None])
        model.b_dec[i] = t["b_dec"]
        if cfg.skip_connection:
            model.W_skip[i] = t["W_skip"]
        if cfg.activation_fn == "jumprelu":
            theta = t["threshold"].double()
            if not bool((theta > 0).all()):
                logger.warning(
                    "%s: layer %d has %d JumpReLU thresholds <= 0 (a ReLU there); they load as %g",
                    source,
                    layers[i],
                    int((theta <= 0).sum()),
                    TINY_THRESHOLD,
                )
            model.log_threshold[i] = theta.clamp_min(TINY_THRESHOLD).log()
    return model.eval()


@torch.no_grad()
def to_layers(transcoder: CrossLayerTranscoder, purpose: str) -> list[LayerWeights]:
    """Raw-space `LayerWeights` of each covered layer of a per-layer transcoder or SAE (standardisation
    folded in; ``threshold`` for JumpReLU and BatchTopK, the latter at its inference threshold)."""
    cfg = transcoder.cfg
    if cfg.architecture != "transcoder" or cfg.cross_layer:
        raise ValueError(
            f"{purpose} stores one dictionary per layer; this is a {transcoder.kind}: train a per-layer "
            "transcoder (cross_layer=False) or an SAE"
        )
    folded = transcoder.fold_normalization()
    threshold = folded.threshold if cfg.activation_fn in ("jumprelu", "batchtopk") else None
    out = []
    for i in range(cfg.num_layers):
        t = {
            "W_enc": folded.W_enc[i],
            "b_enc": folded.b_enc[i],
            "W_dec": folded.W_dec[i][:, 0],
            "b_dec": folded.b_dec[i],
        }
        if cfg.skip_connection:
            t["W_skip"] = folded.W_skip[i]
        if threshold is not None:
            t["threshold"] = threshold[i].to(folded.W_enc.dtype)
        out.append({k: v.detach().cpu().contiguous() for k, v in t.items()})
    return out


__all__ = ["REQUIRED", "LayerWeights", "check_layer", "from_layers", "layer_number", "read_json_config", "to_layers"]
