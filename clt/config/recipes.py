"""Recipes: the settings found by measurement to give the best replacement model per CPU-hour.

`clt train` starts from the default model's recipe when it is given neither a config file nor a
store (command-line options still override it); `experiments/configs/smollm2_recipe.yaml` is the
same recipe as a file, and `experiments/quality_vs_compute.py` measures it.
"""

from __future__ import annotations

import copy
from typing import Any

from clt.config.constants import DEFAULT_MODEL

RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    DEFAULT_MODEL: {
        "extraction": {
            "model": DEFAULT_MODEL,
            "model_dtype": "auto",
            "corpus": "stdlib",
            "context_length": 128,
            "batch_size": 8,
        },
        "transcoder": {
            "num_features": 1024,
            "activation_fn": "topk",
            "topk": 16,
            "cross_layer": False,
            "skip_connection": True,
        },
        "training": {
            "stream": True,
            "buffer_tokens": 32_768,
            "batch_size": 512,
            "learning_rate": 2e-3,
            "lr_warmup_steps": 50,
            "lr_decay_start": 0.5,
            "training_steps": 3_000,
            "sparsity_lambda": 0.0,
            "dead_after_tokens": 500_000,
            "kl_coef": 1.0,
            "kl_start": 0.8,
            "kl_windows": 2,
            "checkpoint_every": 200,
            "output_dir": "runs/smollm2_recipe",
        },
    }
}
"""Per model: the extraction, transcoder and training sections of a `clt train --config` file."""


def recipe(model: str = DEFAULT_MODEL) -> dict[str, dict[str, Any]] | None:
    """A copy of the recipe of `model` (None when there is none)."""
    found = RECIPES.get(model)
    return copy.deepcopy(found) if found is not None else None
