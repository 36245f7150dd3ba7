"""Evaluation runners: reconstruction metrics on a store, the replacement model on held-out text."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clt.files import atomic_write_text
from clt.pipeline.loading import model_for
from clt.store import ActivationStore

logger = logging.getLogger(__name__)


def metric_lines(reconstruction: Any, replacement: Any = None, graphs: GraphScores | None = None) -> list[str]:
    """Report lines for reconstruction, replacement-model and graph metrics."""
    r = reconstruction
    lines = [
        f"FVU {r.fvu:.4f}, mean per layer {r.mean_layer_fvu:.4f} "
        f"(per layer {' '.join(f'{v:.3f}' for v in r.fvu_per_layer)})",
        f"L0 {r.l0:.1f} active features per token over {len(r.l0_per_layer)} layers "
        f"(max per layer {max(r.l0_per_layer):.1f}); dead fraction {r.dead_fraction:.3f}",
    ]
    if replacement is not None:
        m = replacement
        lines.append(
            f"replacement model: KL {m.kl:.4f} nats/token, top-1 agreement {m.top1_agreement:.3f}, "
            f"CE recovered {m.ce_recovered:.3f} (CE {m.ce_original:.3f} -> {m.ce_replaced:.3f}; "
            f"zero-ablated {m.ce_zero_ablated:.3f})"
        )
    if graphs is not None:
        lines.append(
            f"graphs of {len(graphs.prompts)} prompts: mean replacement score {graphs.replacement:.3f}, "
            f"completeness {graphs.completeness:.3f}"
        )
    return lines


@dataclasses.dataclass
class GraphScores:
    """Replacement and completeness scores of the attribution graphs of a prompt set."""

    prompts: list[str]
    replacement_scores: list[float]
    completeness_scores: list[float]

    @property
    def replacement(self) -> float:
        """Mean replacement score."""
        return sum(self.replacement_scores) / len(self.replacement_scores)

    @property
    def completeness(self) -> float:
        """Mean completeness score."""
        return sum(self.completeness_scores) / len(self.completeness_scores)

    def as_dict(self) -> dict[str, Any]:
        """Means and per-prompt scores."""
        return {"replacement": self.replacement, "completeness": self.completeness, **dataclasses.asdict(self)}


@dataclasses.dataclass
class EvaluationResult:
    """Metrics of a transcoder on a store and, with a model, of the replacement model."""

    reconstruction: Any
    replacement: Any = None
    graphs: GraphScores | None = None
    corpus: str | None = None
    """The text the metrics were measured on (e.g. 'stdlib:heldout'), when not the store's."""

    def summary(self) -> str:
        """A human-readable report."""
        head = [f"evaluated on {self.corpus}"] if self.corpus else []
        return "\n".join(head + metric_lines(self.reconstruction, self.replacement, self.graphs))

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready metrics (written to `eval.json`)."""
        return {
            "corpus": self.corpus,
            "reconstruction": self.reconstruction.as_dict(),
            "replacement": self.replacement.as_dict() if self.replacement is not None else None,
            "graphs": self.graphs.as_dict() if self.graphs is not None else None,
        }


def run_evaluation(
    transcoder: Any,
    store: ActivationStore,
    *,
    model: Any = None,
    replacement: bool = True,
    max_tokens: int = 4096,
    context_length: int | None = None,
    device: str = "cpu",
    output_path: str | Path | None = None,
) -> EvaluationResult:
    """Reconstruction metrics on `store` and (when a model is known) replacement-model metrics.

    The replacement metrics run on windows of `context_length` tokens (default: the store's own
    extraction setting, so they match the windows the transcoder was trained on).
    """
    from clt.training.metrics import reconstruction_metrics, replacement_metrics

    result = EvaluationResult(reconstruction_metrics(transcoder, store, max_tokens=max_tokens))
    if replacement and (model is not None or transcoder.cfg.model_name or store.model_name):
        lm, tokenizer = model_for(transcoder, model or transcoder.cfg.model_name or store.model_name, device)
        result.replacement = replacement_metrics(
            lm, tokenizer, transcoder.to(device), context_length=context_length or store.extra.get("context_length", 64)
        )
    if output_path is not None:
        atomic_write_text(json.dumps(result.as_dict(), indent=1), Path(output_path))
    return result


def heldout_corpus(corpus: Any) -> str | None:
    """The held-out split of a corpus name ('stdlib' -> 'stdlib:heldout'), None where it has none."""
    from clt.data.stdlib import STDLIB_CORPUS, parse_corpus_name

    if isinstance(corpus, str) and parse_corpus_name(corpus) in ("train", "heldout"):
        return f"{STDLIB_CORPUS}:heldout"
    return None


def evaluation_texts(corpus: str) -> list[str]:
    """Evaluation text of a corpus name: for 'stdlib:heldout' a slice of every held-out document."""
    from clt.data.corpus import load_texts
    from clt.data.stdlib import parse_corpus_name, stdlib_eval_texts

    split = parse_corpus_name(corpus)
    return stdlib_eval_texts(split) if split is not None else load_texts(corpus)


def run_heldout_evaluation(
    transcoder: Any,
    *,
    model: Any = None,
    corpus: str = "stdlib:heldout",
    max_tokens: int = 4096,
    max_windows: int = 64,
    context_length: int = 128,
    prompts: Sequence[str] | None = None,
    device: str = "cpu",
    progress: bool = False,
    output_path: str | Path | None = None,
) -> EvaluationResult:
    """The transcoder judged on text it was not trained on, with every covered MLP replaced at once.

    Reconstruction metrics (FVU overall and per layer, L0, dead fraction) on `max_tokens` tokens of
    `corpus` recorded from the float32 model; the replacement model's KL, top-1 agreement and CE
    recovered on `max_windows` windows of it; with `prompts` (e.g. `clt.data.prompts.EVAL_PROMPTS`),
    the mean replacement and completeness scores of their attribution graphs.
    """
    import torch

    from clt.nnsight.extractors import ActivationExtractor
    from clt.training.metrics import reconstruction_metrics, replacement_metrics

    lm, tokenizer = model_for(transcoder, model, device)
    if next(lm.parameters()).dtype != torch.float32:
        raise ValueError("evaluate against the float32 model: load it with dtype=torch.float32")
    texts = evaluation_texts(corpus)
    extractor = ActivationExtractor(
        transcoder.cfg.model_name or "model",
        model=lm,
        tokenizer=tokenizer,
        layers=transcoder.cfg.layers,
        context_length=context_length,
        device=device,
    )
    store = extractor.extract(texts, max_tokens=max_tokens, store_dtype="float32", progress=progress)
    result = EvaluationResult(reconstruction_metrics(transcoder, store, max_tokens=max_tokens), corpus=corpus)
    result.replacement = replacement_metrics(
        lm, tokenizer, transcoder.to(device), texts, max_windows=max_windows, context_length=context_length
    )
    if prompts:
        result.graphs = prompt_graph_scores(transcoder, prompts, model=(lm, tokenizer), progress=progress)
    if output_path is not None:
        atomic_write_text(json.dumps(result.as_dict(), indent=1), Path(output_path))
    return result


def prompt_graph_scores(
    transcoder: Any, prompts: Sequence[str], *, model: Any = None, progress: bool = False, **options: Any
) -> GraphScores:
    """Replacement and completeness scores of each prompt's (unpruned) attribution graph."""
    from tqdm.auto import tqdm

    from clt.attribution import attribute, graph_scores
    from clt.attribution.replacement import ReplacementModel

    lm, tokenizer = model_for(transcoder, model)
    replacement = ReplacementModel(lm, transcoder, tokenizer)
    scores = [
        graph_scores(attribute(prompt, replacement, progress=False, **options))
        for prompt in tqdm(prompts, desc="graphs", disable=not progress)
    ]
    return GraphScores(list(prompts), [s[0] for s in scores], [s[1] for s in scores])
