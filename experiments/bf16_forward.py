"""The bf16 forward against float32: activation error, and what training on bf16 activations costs.

    flock /tmp/clt-bench.lock .venv/bin/python experiments/bf16_forward.py [--steps 150] [--windows 16]

1. Activation error: the MLP inputs and outputs of every SmolLM2 layer on `--windows` held-out
   windows ('stdlib:heldout', 128 tokens) from the model in bfloat16 against the same model in
   float32 (`clt.nnsight.precision.forward_error`): per layer ‖bf16 − fp32‖ / ‖fp32‖ over the tokens.
2. Training: the recipe's transcoder (experiments/configs/smollm2_recipe.yaml) trained twice from
   the live model for `--steps` steps, the same seed, corpus order and settings, once on the bf16
   forward and once on the float32 forward; both are evaluated on float32 activations of held-out
   text (`run_heldout_evaluation`). The issue's bound: the bf16-trained one loses at most 1 % FVU.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
import yaml

from clt.config import CLTConfig, ExtractionConfig, TrainingConfig
from clt.data.corpus import token_windows
from clt.data.stdlib import stdlib_eval_texts
from clt.nnsight.extractors import ActivationExtractor
from clt.nnsight.precision import forward_error
from clt.pipeline.evaluation import run_heldout_evaluation
from clt.pipeline.train import live_source
from clt.training.trainer import CLTTrainer

ROOT = Path(__file__).resolve().parents[1]


def activation_error(model: str, n_windows: int) -> dict:
    """Largest and mean per-layer relative error of the bf16 forward's activations."""
    extractor = ActivationExtractor(model, dtype=torch.float32, context_length=128)
    windows = list(token_windows(stdlib_eval_texts("heldout"), extractor.tokenizer, 128, prepend_bos=True))[:n_windows]
    error = forward_error(extractor, windows, torch.bfloat16)
    return {
        "windows": len(windows),
        "inputs_max": max(error.inputs),
        "inputs_mean": sum(error.inputs) / len(error.inputs),
        "outputs_max": max(error.outputs),
        "outputs_mean": sum(error.outputs) / len(error.outputs),
        "outputs_per_layer": error.outputs,
    }


def train_and_evaluate(recipe: dict, model_dtype: str, steps: int) -> dict:
    """The recipe's transcoder trained `steps` steps on the `model_dtype` forward, judged on float32."""
    extraction = ExtractionConfig.from_dict({**recipe["extraction"], "model_dtype": model_dtype})
    training = TrainingConfig.from_dict(
        {**recipe["training"], "training_steps": steps, "output_dir": None, "checkpoint_every": 0, "kl_coef": 0.0}
    )
    source = live_source(extraction, training)
    cfg = CLTConfig.from_dict({"num_layers": 1, "d_model": 1, **recipe["transcoder"]}).replace(
        num_layers=source.num_layers, d_model=source.d_model, layers=source.layers, model_name=source.model_name
    )
    transcoder = CLTTrainer(cfg, training, source).train()
    del source
    result = run_heldout_evaluation(transcoder, max_tokens=4096, max_windows=32)
    return {"model_dtype": model_dtype, **result.as_dict()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "experiments/configs/smollm2_recipe.yaml")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--output", type=Path, default=Path("runs/bf16_forward.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    recipe = yaml.safe_load(args.config.read_text())
    error = activation_error(recipe["extraction"]["model"], args.windows)
    print(
        f"bf16 forward vs float32 on {error['windows']} held-out windows, relative error per layer: "
        f"MLP inputs max {error['inputs_max']:.4f} (mean {error['inputs_mean']:.4f}), "
        f"MLP outputs max {error['outputs_max']:.4f} (mean {error['outputs_mean']:.4f})",
        flush=True,
    )
    runs = {dtype: train_and_evaluate(recipe, dtype, args.steps) for dtype in ("bfloat16", "float32")}
    fvu = {dtype: run["reconstruction"]["fvu"] for dtype, run in runs.items()}
    loss = fvu["bfloat16"] / fvu["float32"] - 1
    for dtype, run in runs.items():
        rec, rep = run["reconstruction"], run["replacement"]
        print(
            f"trained on the {dtype} forward ({args.steps} steps), judged on float32: FVU {rec['fvu']:.4f}, "
            f"mean layer FVU {rec['mean_layer_fvu']:.4f}, KL {rep['kl']:.3f}, top-1 {rep['top1_agreement']:.3f}"
        )
    print(f"FVU of the bf16-trained transcoder relative to the float32-trained one: {loss:+.2%} (bound: +1%)")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"error": error, "runs": runs, "fvu_change": loss}, indent=1))


if __name__ == "__main__":
    main()
