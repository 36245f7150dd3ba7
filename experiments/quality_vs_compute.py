"""Replacement-model quality against CPU minutes for the SmolLM2 recipe, trained from the live model.

    flock /tmp/clt-bench.lock .venv/bin/python experiments/quality_vs_compute.py \
        [--config experiments/configs/smollm2_recipe.yaml] [--minutes 5,15,30,60] [--output-dir runs/quality]

One streaming run of the recipe (`clt train --config experiments/configs/smollm2_recipe.yaml`) whose
number of steps is set so that it ends after the largest budget: a short calibration run measures
this machine's steps per second first (forward and training together). The transcoder is saved
when each budget of compute minutes has passed (the learning rate is constant until the last
20 % of the run, so earlier snapshots are not annealed). Each snapshot is then judged on held-out
text ('stdlib:heldout', never trained on) with all 30 layers replaced at once: KL, top-1 agreement
and CE recovered of the replacement model; FVU (overall and mean per layer), L0 and dead fraction;
and the mean replacement and completeness scores of the attribution graphs of the 24 prompts of
`clt.data.prompts`.

Compute minutes are the process's CPU time divided by its torch threads (2 on the development
machine): the wall time the run takes when it has the machine to itself, and a clock that other
work on a shared machine does not advance (it only slows the run). Wall minutes are reported too.
Writes results.json, a markdown table (table.md) and a plotly figure
(quality_vs_compute.html) into --output-dir; `--docs` copies the figure and table into docs/.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import torch
import yaml

from clt.config import CLTConfig, ExtractionConfig, TrainingConfig
from clt.data.prompts import EVAL_PROMPTS
from clt.models import CrossLayerTranscoder
from clt.pipeline.evaluation import run_heldout_evaluation
from clt.pipeline.train import live_source
from clt.training.trainer import CLTTrainer

ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger("quality_vs_compute")


def configs(path: Path) -> tuple[ExtractionConfig, CLTConfig, TrainingConfig]:
    """The recipe's three sections."""
    values = yaml.safe_load(path.read_text())
    transcoder = CLTConfig.from_dict({"num_layers": 1, "d_model": 1, **values["transcoder"]})
    return ExtractionConfig.from_dict(values["extraction"]), transcoder, TrainingConfig.from_dict(values["training"])


def compute_minutes() -> float:
    """This process's CPU time over its torch threads, in minutes (module docstring)."""
    return time.process_time() / torch.get_num_threads() / 60


def steps_per_second(extraction: ExtractionConfig, transcoder: CLTConfig, training: TrainingConfig) -> float:
    """Training steps per second of the recipe from the live model, after the buffer's first fill."""
    probe = training.replace(training_steps=12, output_dir=None, kl_start=0.0, log_every=10**6)
    source = live_source(extraction, probe)
    cfg = transcoder.replace(num_layers=source.num_layers, d_model=source.d_model, layers=source.layers)
    model = source.extractor.model, source.extractor.tokenizer
    trainer = CLTTrainer(cfg, probe.replace(kl_coef=0.0), source)
    start = compute_minutes()
    trainer.train(progress=False)
    plain = (compute_minutes() - start) * 60 / probe.training_steps
    seconds = plain
    if training.kl_coef:  # the KL stage's steps cost more: time them too
        trainer = CLTTrainer(cfg, probe, source, language_model=model)
        start = compute_minutes()
        trainer.train(progress=False)
        with_kl = (compute_minutes() - start) * 60 / probe.training_steps
        kl_share = 1 - training.kl_start
        seconds = plain * (1 - kl_share) + (plain + (with_kl - plain) / training.kl_every) * kl_share
    return 1 / seconds


def train(
    extraction: ExtractionConfig, transcoder: CLTConfig, training: TrainingConfig, minutes: list[float], out: Path
) -> dict[float, dict]:
    """One run of the recipe, saving the transcoder as each budget of compute minutes passes."""
    source = live_source(extraction, training)
    cfg = transcoder.replace(
        num_layers=source.num_layers, d_model=source.d_model, layers=source.layers, model_name=source.model_name
    )
    model = (source.extractor.model, source.extractor.tokenizer) if training.kl_coef else None
    snapshots: dict[float, dict] = {}
    pending = sorted(minutes)
    start, wall = compute_minutes(), time.perf_counter()

    def snapshot(step: int, metrics: dict) -> None:
        elapsed = compute_minutes() - start
        while pending and (elapsed >= pending[0] or step == training.training_steps):
            budget = pending.pop(0)
            path = out / f"{budget:g}min"
            trainer.model.save_pretrained(path)
            snapshots[budget] = {
                "budget": budget,
                "step": step,
                "tokens": step * training.batch_size,
                "compute_minutes": elapsed,
                "wall_minutes": (time.perf_counter() - wall) / 60,
            }
            (path / "snapshot.json").write_text(json.dumps(snapshots[budget]))
            logger.info("%g min: step %d, snapshot %s", budget, step, path)

    trainer = CLTTrainer(cfg, training, source, language_model=model, callbacks=[snapshot])
    trainer.train()
    return snapshots


def figure(rows: list[dict]) -> object:
    """Metrics against CPU minutes, one panel per metric."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    panels = [
        ("top1", "top-1 agreement", 0.5),
        ("kl", "KL (nats/token)", 0.5),
        ("ce_recovered", "CE recovered", 0.97),
        ("mean_layer_fvu", "mean per-layer FVU", 0.25),
        ("graph_replacement", "graph replacement score", 0.6),
        ("graph_completeness", "graph completeness score", 0.9),
    ]
    fig = make_subplots(rows=2, cols=3, subplot_titles=[title for _, title, _ in panels])
    x = [r["minutes"] for r in rows]
    for i, (key, title, target) in enumerate(panels):
        row, col = divmod(i, 3)
        fig.add_trace(go.Scatter(x=x, y=[r[key] for r in rows], mode="lines+markers", name=title), row + 1, col + 1)
        fig.add_hline(y=target, line_dash="dot", line_color="grey", row=row + 1, col=col + 1)
        fig.update_xaxes(title_text="compute minutes (2 cores)", type="log", row=row + 1, col=col + 1)
    fig.update_layout(
        title="SmolLM2-135M replacement model on held-out text vs training time (dotted: targets)",
        showlegend=False,
        height=650,
        width=1150,
    )
    return fig


def table(rows: list[dict]) -> str:
    """Markdown table of the results."""
    head = (
        "| compute min | wall min | tokens | top-1 | KL | CE recovered | FVU | mean layer FVU | L0/layer | dead "
        "| graph repl. | graph compl. |"
    )
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        lines.append(
            f"| {r['minutes']:g} | {r['wall_minutes']:.0f} | {r['tokens']:,} | {r['top1']:.3f} | {r['kl']:.3f} | "
            f"{r['ce_recovered']:.3f} | "
            f"{r['fvu']:.3f} | {r['mean_layer_fvu']:.3f} | {r['l0_per_layer']:.1f} | {r['dead']:.3f} | "
            f"{r['graph_replacement']:.3f} | {r['graph_completeness']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "experiments/configs/smollm2_recipe.yaml")
    parser.add_argument("--minutes", default="5,15,30,60")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/quality"))
    parser.add_argument("--prompts", type=int, default=len(EVAL_PROMPTS), help="prompts of the graph scores")
    parser.add_argument("--docs", action="store_true", help="copy the figure and table into docs/")
    parser.add_argument(
        "--evaluate-only",
        action="store_true",
        help="judge the snapshots of --minutes already in --output-dir (several processes may share the work)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    minutes = [float(m) for m in args.minutes.split(",")]
    if args.evaluate_only:
        report(args, minutes)
        return
    extraction, transcoder, training = configs(args.config)
    rate = steps_per_second(extraction, transcoder, training)
    steps = int(max(minutes) * 60 * rate)
    logger.info("%.3f steps/s: %d steps for %g minutes", rate, steps, max(minutes))
    training = training.replace(training_steps=steps, output_dir=str(args.output_dir / "run"), checkpoint_every=0)
    train(extraction, transcoder, training, minutes, args.output_dir)
    report(args, minutes)


def evaluate(snapshot: Path, n_prompts: int) -> dict:
    """The table row of one snapshot (cached in its evaluation.json: snapshots can be judged by
    several processes, `--evaluate-only --minutes 5`)."""
    cache = snapshot / "evaluation.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    meta = json.loads((snapshot / "snapshot.json").read_text())
    clt = CrossLayerTranscoder.from_pretrained(snapshot)
    ev = run_heldout_evaluation(clt, prompts=[p.text for p in EVAL_PROMPTS[:n_prompts]], progress=True)
    rec, rep, graphs = ev.reconstruction, ev.replacement, ev.graphs
    row = {
        "minutes": meta["budget"],
        "tokens": meta["tokens"],
        "step": meta["step"],
        "wall_minutes": meta["wall_minutes"],
        "top1": rep.top1_agreement,
        "kl": rep.kl,
        "ce_recovered": rep.ce_recovered,
        "fvu": rec.fvu,
        "mean_layer_fvu": rec.mean_layer_fvu,
        "l0_per_layer": rec.l0 / len(rec.l0_per_layer),
        "dead": rec.dead_fraction,
        "graph_replacement": graphs.replacement,
        "graph_completeness": graphs.completeness,
        "evaluation": ev.as_dict(),
    }
    cache.write_text(json.dumps(row, indent=1))
    logger.info("%g min: %s", meta["budget"], {k: v for k, v in row.items() if k != "evaluation"})
    return row


def report(args: argparse.Namespace, minutes: list[float]) -> None:
    """Judge the snapshots of `minutes`; write results.json, table.md and the figure of all judged so far."""
    for budget in minutes:
        evaluate(args.output_dir / f"{budget:g}min", args.prompts)
    judged = [json.loads(p.read_text()) for p in args.output_dir.glob("*min/evaluation.json")]
    rows = sorted(judged, key=lambda row: row["minutes"])
    (args.output_dir / "results.json").write_text(json.dumps({"rows": rows}, indent=1))
    (args.output_dir / "table.md").write_text(table(rows) + "\n")
    fig = figure(rows)
    fig.write_html(args.output_dir / "quality_vs_compute.html", include_plotlyjs=True)
    print(table(rows))
    if args.docs:
        shutil.copy(args.output_dir / "quality_vs_compute.html", ROOT / "docs" / "quality_vs_compute.html")
        shutil.copy(args.output_dir / "table.md", ROOT / "docs" / "quality_vs_compute.md")


if __name__ == "__main__":
    main()
