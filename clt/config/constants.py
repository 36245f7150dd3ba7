"""Constants shared by several stages (default model, dtypes, store formats, output sites) and their checks."""

from __future__ import annotations

from collections.abc import Sequence

from clt.config.base import ConfigError

DEFAULT_MODEL = "smollm2-135m"
"""Alias of the default model, SmolLM2-135M-Instruct (see clt.nnsight.loading)."""
FLOAT_DTYPE_NAMES = ("float16", "bfloat16", "float32")
"""Floating-point precisions of stored activations and transcoder parameters, by torch name."""
STORE_DTYPES = (*FLOAT_DTYPE_NAMES, "int8")
"""Precisions of an activation store: a float dtype, or int8 codes with per-token-and-layer scales."""
COMPRESSIONS = ("none", "zstd")
"""Lossless compression of a store's shard files."""
MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")
"""Precisions of the model's forward; 'auto' is bfloat16 where the hardware computes it natively."""
OUTPUT_SITES = ("mlp_out", "mlp_in")
"""What a transcoder reconstructs: the MLP outputs (a transcoder) or the MLP inputs (an SAE)."""


def check_choice(name: str, value: object, choices: Sequence[object], error: type[Exception] = ConfigError) -> None:
    """Raise `error` naming `name`, `value` and the allowed `choices` unless value is one of them."""
    if value not in choices:
        raise error(f"{name} '{value}' is not one of {tuple(choices)}")


def check_output_site(output_site: str, error: type[Exception] = ConfigError) -> None:
    """Raise `error` unless `output_site` is one of OUTPUT_SITES."""
    check_choice("output_site", output_site, OUTPUT_SITES, error)


def layer_span(layers: Sequence[int]) -> str:
    """Layers for messages: ``"a..b"`` for a contiguous increasing range, else the list."""
    layers = list(layers)
    if layers and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}..{layers[-1]}"
    return str(layers)
