r"""Train several dictionary types on one activation store with matched L0 and compare them.

    python experiments/compare_dictionaries.py --store runs/demo/store --num-features 64 --k 8 \
        --steps 250 --batch-size 128 --learning-rate 5e-4 --kl-coef 1000 --kl-every 5 --kl-windows 2 \
        --output-dir runs/compare_smollm2

(SmolLM2-135M, the demo's 20k-token store of all 30 layers: 10.5 minutes on a 2-core CPU, of
which ~1 minute extracts the SAE's 'mlp_in' store and ~3 minutes train CLT+KL.)

Each entry of DICTIONARIES is trained with the same TrainingConfig on the same tokens, as
BatchTopK with the same k (so L0 is matched; the achieved L0 under each one's inference rule is
reported): PLT, CLT, skip PLT (skip transcoder), Matryoshka CLT, MOLT, SAE (on an 'mlp_in' store of
the same model and windows: `--sae-store`, or extracted next to the outputs), CLT trained with the
end-to-end KL term, and the CLT converted to JumpReLU at the same per-layer L0. One table: FVU,
L0, dead fraction, replacement-model KL, top-1 agreement, CE recovered, and the replacement and
completeness scores of attribution graphs of a few fixed prompts ("n/a" where a type replaces no
MLP or is not linear in its features). Writes `<output-dir>/comparison.json` and a Pareto figure
(FVU vs L0; a short sweep with `--k 8,16`) as `<output-dir>/pareto.html`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from clt.config import CLTConfig, ExtractionConfig, TrainingConfig
from clt.config.base import ConfigError
from clt.pipeline import run_evaluation, run_extraction, run_training
from clt.store import ActivationStore

logger = logging.getLogger("compare_dictionaries")
PROMPTS = ("The list is sorted in place by the", "A class definition defines a class")


@dataclasses.dataclass(frozen=True)
class Dictionary:
    """How one dictionary type is built from the shared settings."""

    transcoder: dict[str, Any] = dataclasses.field(default_factory=dict)
    """CLTConfig overrides; a callable value is called with num_features."""
    kl: bool = False
    """Train with the end-to-end KL term (TrainingConfig.kl_coef)."""
    sae: bool = False
    """Train on the 'mlp_in' store (an SAE)."""
    convert_from: str | None = None
    """Not trained: the JumpReLU conversion of this (BatchTopK) entry."""


DICTIONARIES: dict[str, Dictionary] = {
    "PLT": Dictionary({"cross_layer": False}),
    "CLT": Dictionary({"cross_layer": True}),
    "skip PLT": Dictionary({"cross_layer": False, "skip_connection": True}),
    "Matryoshka CLT": Dictionary({"cross_layer": True, "matryoshka_prefixes": lambda f: [f // 4, f // 2]}),
    "MOLT": Dictionary({"architecture": "molt", "cross_layer": False, "molt_ranks": [8]}),
    "SAE": Dictionary({"cross_layer": False}, sae=True),
    "CLT+KL": Dictionary({"cross_layer": True}, kl=True),
    "CLT→JumpReLU": Dictionary(convert_from="CLT"),
}


def transcoder_config(entry: Dictionary, store: ActivationStore, num_features: int, k: int) -> CLTConfig:
    """The CLTConfig of one entry (ConfigError when this clt lacks one of its options)."""
    options = {
        key: value(num_features) if isinstance(value, Callable) else value for key, value in entry.transcoder.items()
    }
    return CLTConfig(
        num_features=num_features,
        num_layers=store.num_layers,
        d_model=store.d_model,
        activation_fn="batchtopk",
        topk=k,
        **options,
    )


def sae_store(store: ActivationStore, output_dir: Path, *, progress: bool = True) -> ActivationStore:
    """An 'mlp_in' store of the same model, corpus, windows and token count (extracted once)."""
    extra = store.extra
    cfg = ExtractionConfig(
        model=store.model_name,
        corpus=extra.get("corpus", "pydoc"),
        layers=store.layers,
        max_tokens=store.n_tokens,
        context_length=extra.get("context_length", 128),
        prepend_bos=extra.get("prepend_bos", True),
        exclude_bos=extra.get("exclude_bos", True),
        output_site="mlp_in",
        output_dir=str(output_dir / "sae_store"),
    )
    return run_extraction(cfg, progress=progress)


def graph_scores_of(transcoder: Any, prompts: tuple[str, ...], model: Any) -> tuple[float | None, float | None]:
    """Mean (replacement, completeness) score of the prompts' graphs; (None, None) without a linear replacement."""
    from clt.attribution import attribute, graph_scores
    from clt.models.transcoder import UnsupportedDictionaryError

    try:
        transcoder.require_mlp_replacement("attribution")
    except UnsupportedDictionaryError:
        return None, None
    lm, tokenizer = model
    scores = [
        graph_scores(attribute(prompt, lm, transcoder, tokenizer=tokenizer, progress=False)) for prompt in prompts
    ]
    return (sum(s[0] for s in scores) / len(scores), sum(s[1] for s in scores) / len(scores))


def compare(
    store: ActivationStore,
    names: list[str],
    *,
    num_features: int,
    k: int | list[int],
    steps: int,
    batch_size: int,
    learning_rate: float,
    output_dir: Path,
    mixed_precision: str = "no",
    sae: ActivationStore | None = None,
    prompts: tuple[str, ...] = PROMPTS,
    kl_coef: float = 1000.0,
    kl_every: int = 4,
    kl_windows: int = 2,
    progress: bool = True,
) -> pd.DataFrame:
    """Train each named dictionary for each k (BatchTopK, so L0 is matched), collect metrics, write
    comparison.json and pareto.html into output_dir; returns the table (None where not applicable)."""
    from clt.models.convert import convert_to_jumprelu
    from clt.nnsight.loading import load_model
    from clt.viz import pareto_figure, save_figure_html

    unknown = [n for n in names if n not in DICTIONARIES]
    if unknown:
        raise ValueError(f"unknown dictionaries {unknown}; choose from {list(DICTIONARIES)}")
    if not store.model_name:
        raise ValueError("the store records no model name; the replacement metrics need the model")
    output_dir.mkdir(parents=True, exist_ok=True)
    model = load_model(store.model_name)
    rows: list[dict[str, Any]] = []
    for k_value in [k] if isinstance(k, int) else list(k):
        trained: dict[str, Any] = {}
        for name in names:
            entry, run_dir = DICTIONARIES[name], output_dir / f"{name.replace(' ', '_')}_k{k_value}"
            start = time.perf_counter()
            if entry.convert_from is not None:
                source = trained.get(entry.convert_from)
                if source is None:
                    logger.warning("skipping %s: it converts %s, which is not in this run", name, entry.convert_from)
                    continue
                transcoder = convert_to_jumprelu(
                    source, store, calibration_tokens=min(8192, store.n_tokens), batch_size=batch_size
                )
                transcoder.save_pretrained(run_dir / "transcoder")
                evaluation = run_evaluation(transcoder, store, model=model, output_path=run_dir / "eval.json")
                rec, rep = evaluation.reconstruction, evaluation.replacement
            else:
                try:
                    cfg = transcoder_config(entry, store, num_features, k_value)
                except (ConfigError, TypeError) as err:
                    logger.warning("skipping %s: this clt cannot build it yet (%s)", name, err)
                    continue
                if entry.sae and sae is None:
                    sae = sae_store(store, output_dir, progress=progress)
                training = TrainingConfig(
                    learning_rate=learning_rate,
                    batch_size=batch_size,
                    training_steps=steps,
                    output_dir=str(run_dir),
                    checkpoint_every=0,
                    resume=False,
                    mixed_precision=mixed_precision,
                    kl_coef=kl_coef if entry.kl else 0.0,
                    kl_every=kl_every,
                    kl_windows=kl_windows,
                )
                result = run_training(
                    ExtractionConfig(model=store.model_name),
                    cfg,
                    training,
                    store=sae if entry.sae else store,
                    replacement=not entry.sae,
                    progress=progress,
                )
                transcoder, rec, rep = result.transcoder, result.reconstruction, result.replacement
                trained[name] = transcoder
            replacement_score, completeness = graph_scores_of(transcoder.eval(), prompts, model)
            rows.append(
                {
                    "dictionary": name,
                    "k": k_value,
                    "features": num_features * store.num_layers,
                    "FVU": rec.fvu,
                    "L0": rec.l0,
                    "dead": rec.dead_fraction,
                    "KL": rep.kl if rep else None,
                    "top1": rep.top1_agreement if rep else None,
                    "CE_recovered": rep.ce_recovered if rep else None,
                    "replacement_score": replacement_score,
                    "completeness_score": completeness,
                    "seconds": time.perf_counter() - start,
                }
            )
            logger.info("%s (k=%d): %s", name, k_value, rows[-1])
    if not rows:
        raise ValueError("no dictionary was trained; check --dictionaries")
    (output_dir / "comparison.json").write_text(json.dumps(rows, indent=1))
    save_figure_html(
        pareto_figure(rows, title=f"FVU vs L0 on {store.model_name} ({store.n_tokens} tokens)"),
        output_dir / "pareto.html",
    )
    return pd.DataFrame(rows).set_index(["dictionary", "k"])


def format_table(table: pd.DataFrame) -> str:
    """The table as text, "n/a" where a metric does not apply."""

    def cell(value: Any) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "n/a"
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    return table.astype(object).map(cell).to_string()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True, help="activation store folder (from `clt extract`)")
    parser.add_argument("--dictionaries", default=",".join(DICTIONARIES), help="comma-separated names")
    parser.add_argument("--num-features", type=int, default=128, help="features per layer")
    parser.add_argument("--k", default="16", help="BatchTopK k per token and layer; a list (8,16) sweeps")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--output-dir", default="runs/compare")
    parser.add_argument("--mixed-precision", default="no", help="no, bf16 (CPU/GPU) or fp16 (GPU)")
    parser.add_argument("--sae-store", default=None, help="'mlp_in' store for the SAE (default: extract one)")
    parser.add_argument("--kl-coef", type=float, default=1000.0, help="KL coefficient of CLT+KL")
    parser.add_argument("--kl-every", type=int, default=4, help="CLT+KL: add the KL term every this many steps")
    parser.add_argument("--kl-windows", type=int, default=2, help="CLT+KL: store windows per KL evaluation")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    store = ActivationStore.open(args.store, batch_size=args.batch_size)
    sae = ActivationStore.open(args.sae_store, batch_size=args.batch_size) if args.sae_store else None
    table = compare(
        store,
        [n.strip() for n in args.dictionaries.split(",")],
        num_features=args.num_features,
        k=[int(v) for v in args.k.split(",")],
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        output_dir=Path(args.output_dir),
        mixed_precision=args.mixed_precision,
        sae=sae,
        kl_coef=args.kl_coef,
        kl_every=args.kl_every,
        kl_windows=args.kl_windows,
    )
    print(format_table(table))
    print(f"written: {Path(args.output_dir) / 'comparison.json'}, {Path(args.output_dir) / 'pareto.html'}")


if __name__ == "__main__":
    main()
