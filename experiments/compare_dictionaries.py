"""Train several dictionaries on one activation store and print one comparison table.

    python experiments/compare_dictionaries.py --store runs/demo/store --steps 1500

Each entry of DICTIONARIES is a set of CLTConfig overrides trained with the same TrainingConfig
on the same tokens; the table reports FVU, L0, dead fraction and the replacement-model metrics
(KL, top-1 agreement, CE loss recovered), and is written to `<output-dir>/comparison.json`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from clt.config import CLTConfig, ExtractionConfig, TrainingConfig
from clt.pipeline import run_training
from clt.training.data import ActivationStore

DICTIONARIES: dict[str, dict] = {
    "CLT": {"cross_layer": True},
    "PLT": {"cross_layer": False},
}


def compare(store: ActivationStore, names: list[str], *, num_features: int, k: int, steps: int, batch_size: int,
            learning_rate: float, output_dir: Path, mixed_precision: str = "no") -> pd.DataFrame:
    """Train each named dictionary (BatchTopK with the same k, so L0 is matched) and collect metrics."""
    rows = []
    for name in names:
        transcoder = CLTConfig(num_features=num_features, num_layers=store.num_layers, d_model=store.d_model,
                               activation_fn="batchtopk", topk=k, **DICTIONARIES[name])
        training = TrainingConfig(learning_rate=learning_rate, batch_size=batch_size, training_steps=steps,
                                  output_dir=str(output_dir / name), checkpoint_every=0,
                                  mixed_precision=mixed_precision)
        result = run_training(ExtractionConfig(model=store.model_name), transcoder, training, store=store)
        rec, rep = result.reconstruction, result.replacement
        rows.append({"dictionary": name, "features": num_features * store.num_layers, "FVU": rec.fvu,
                     "L0": rec.l0, "dead": rec.dead_fraction, "KL": rep.kl, "top1": rep.top1_agreement,
                     "CE_recovered": rep.ce_recovered})
    table = pd.DataFrame(rows).set_index("dictionary")
    (output_dir / "comparison.json").write_text(json.dumps(table.reset_index().to_dict("records"), indent=1))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True, help="activation store folder (from `clt extract`)")
    parser.add_argument("--dictionaries", default=",".join(DICTIONARIES), help="comma-separated names")
    parser.add_argument("--num-features", type=int, default=128, help="features per layer")
    parser.add_argument("--k", type=int, default=16, help="BatchTopK k (active features per token and layer)")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--output-dir", default="runs/compare")
    parser.add_argument("--mixed-precision", default="no", help="no, bf16 (CPU/GPU) or fp16 (GPU)")
    args = parser.parse_args()
    store = ActivationStore.open(args.store, batch_size=args.batch_size)
    table = compare(store, args.dictionaries.split(","), num_features=args.num_features, k=args.k,
                    steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
                    output_dir=Path(args.output_dir), mixed_precision=args.mixed_precision)
    print(table.to_string(float_format=lambda v: f"{v:.4f}"))


if __name__ == "__main__":
    main()
