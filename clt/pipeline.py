"""Stage runners shared by the CLI, the demo and notebooks: config in, result object out."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

from clt.config.constants import DEFAULT_MODEL
from clt.config.extraction import ExtractionConfig
from clt.files import atomic_write_text
from clt.store import ActivationStore, writable_folder

logger = logging.getLogger(__name__)

DEMO_TRANSCODER: dict[str, Any] = {"activation_fn": "batchtopk", "topk": 8, "cross_layer": True}
"""The demo's transcoder: a CLT whose BatchTopK keeps 8 features per token and layer on average."""
DEMO_TRAINING: dict[str, Any] = {"learning_rate": 5e-4, "checkpoint_every": 0}
"""The demo's training options beyond size: a high learning rate for a short run."""
DEMO_PROMPT = "A list is a mutable sequence, and a tuple is an immutable"
"""The demo's prompt, in the style of the default corpus (the next token is ' sequence')."""
_EXTRACTOR_FIELDS = ("layers", "context_length", "batch_size", "prepend_bos", "exclude_bos", "device")
"""ExtractionConfig fields that are options of `ActivationExtractor` (besides the model)."""
_EXTRACT_FIELDS = (
    "max_tokens",
    "output_dir",
    "store_dtype",
    "shard_tokens",
    "text_field",
    "compression",
    "output_site",
    "writer_rank",
    "num_writers",
)
"""ExtractionConfig fields that are options of `ActivationExtractor.extract` (besides the corpus)."""


def run_extraction(cfg: ExtractionConfig, *, progress: bool = True, stop: Any = None) -> ActivationStore:
    """Extract activations as `cfg` says into `cfg.output_dir`; writes the resolved config beside them.

    `stop` (a threading.Event) ends the extraction early with `ExtractionStopped`; the store resumes.
    """
    from clt.nnsight.extractors import ActivationExtractor

    writable_folder(cfg.output_dir)  # fail before the model loads
    extractor = ActivationExtractor(cfg.model, **cfg.subset(*_EXTRACTOR_FIELDS))
    store = extractor.extract(cfg.corpus, progress=progress, stop=stop, **cfg.subset(*_EXTRACT_FIELDS))
    cfg.save(Path(cfg.output_dir) / "extraction.yaml")
    return store


@dataclasses.dataclass
class TrainingResult:
    """What `run_training` produced: the transcoder, where it is, and its metrics."""

    transcoder: Any
    store: ActivationStore
    output_dir: Path | None
    history: list[dict[str, float]]
    reconstruction: Any
    replacement: Any = None

    def summary(self) -> str:
        """A human-readable report."""
        lines = [
            f"transcoder: {self.transcoder.extra_repr()}",
            f"trained on: {self.store}",
            *metric_lines(self.reconstruction, self.replacement),
        ]
        if self.output_dir is not None:
            lines.append(
                f"saved to {self.output_dir / 'transcoder'} (metrics log: {self.output_dir / 'metrics.jsonl'})"
            )
        return "\n".join(lines)


def metric_lines(reconstruction: Any, replacement: Any = None) -> list[str]:
    """Report lines for reconstruction (and replacement-model) metrics."""
    r = reconstruction
    lines = [
        f"FVU {r.fvu:.4f} (per layer {' '.join(f'{v:.3f}' for v in r.fvu_per_layer)})",
        f"L0 {r.l0:.1f} active features per token over {len(r.l0_per_layer)} layers; "
        f"dead fraction {r.dead_fraction:.3f}",
    ]
    if replacement is not None:
        m = replacement
        lines.append(
            f"replacement model: KL {m.kl:.4f} nats/token, top-1 agreement {m.top1_agreement:.3f}, "
            f"CE recovered {m.ce_recovered:.3f} (CE {m.ce_original:.3f} -> {m.ce_replaced:.3f}; "
            f"zero-ablated {m.ce_zero_ablated:.3f})"
        )
    return lines


@dataclasses.dataclass
class EvaluationResult:
    """Metrics of a transcoder on a store and, with a model, of the replacement model."""

    reconstruction: Any
    replacement: Any = None

    def summary(self) -> str:
        """A human-readable report."""
        return "\n".join(metric_lines(self.reconstruction, self.replacement))

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready metrics (written to `eval.json`)."""
        return {
            "reconstruction": self.reconstruction.as_dict(),
            "replacement": self.replacement.as_dict() if self.replacement is not None else None,
        }


def load_transcoder(path: str | Path, device: str = "cpu") -> Any:
    """A transcoder from a `save_pretrained` folder, a training run folder or a `.safetensors` file."""
    from clt.models.transcoder import CrossLayerTranscoder

    path = Path(path)
    if path.is_file():
        return CrossLayerTranscoder.load(path).to(device).eval()
    for folder in (path, path / "transcoder", path / "final"):
        if (folder / "config.json").is_file():
            return CrossLayerTranscoder.from_pretrained(folder).to(device).eval()
    raise FileNotFoundError(
        f"no transcoder at {path}: give a save_pretrained folder (config.json + "
        "model.safetensors), a training run folder or a .safetensors file"
    )


def _model_for(transcoder: Any, model: Any, device: str = "cpu") -> tuple[Any, Any]:
    """(model, tokenizer) from a name/path, a pair, or the transcoder's recorded model name."""
    from clt.nnsight.loading import load_model

    if isinstance(model, tuple):
        return model
    name = model or transcoder.cfg.model_name
    if not name:
        raise ValueError("the transcoder does not record its model; pass --model (a name or path)")
    return load_model(name, device=device)


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
        lm, tokenizer = _model_for(transcoder, model or transcoder.cfg.model_name or store.model_name, device)
        result.replacement = replacement_metrics(
            lm, tokenizer, transcoder.to(device), context_length=context_length or store.extra.get("context_length", 64)
        )
    if output_path is not None:
        atomic_write_text(json.dumps(result.as_dict(), indent=1), Path(output_path))
    return result


def run_training(
    extraction: ExtractionConfig,
    transcoder: Any,
    training: Any,
    *,
    store_path: str | Path | None = None,
    store: ActivationStore | None = None,
    replacement: bool = True,
    progress: bool = True,
) -> TrainingResult:
    """Train a transcoder on a store (opened from `store_path`, given, or extracted first), then evaluate it."""
    from clt.training.trainer import CLTTrainer

    if store is None:
        store = (
            ActivationStore.open(store_path, batch_size=training.batch_size)
            if store_path
            else run_extraction(extraction, progress=progress)
        )
    transcoder = transcoder.replace(
        num_layers=store.num_layers, d_model=store.d_model, layers=store.layers, model_name=store.model_name
    )
    if training.kl_coef and not store.model_name:
        raise ValueError(
            "kl_coef > 0 needs the language model, but the store records none; train with CLTTrainer("
            "..., language_model=(model, tokenizer)) or set kl_coef=0"
        )
    language_model = _model_for(None, store.model_name, training.device) if training.kl_coef else None
    trainer = CLTTrainer(transcoder, training, store, language_model=language_model)
    model = trainer.train(progress=progress)
    if not trainer.is_main:  # under torchrun rank 0 evaluates and reports
        return TrainingResult(model, store, trainer.output_dir, trainer.history, None)
    evaluation = run_evaluation(
        model,
        store,
        replacement=replacement and bool(store.model_name),
        device=training.device,
        output_path=None if trainer.output_dir is None else trainer.output_dir / "eval.json",
    )
    return TrainingResult(
        model, store, trainer.output_dir, trainer.history, evaluation.reconstruction, evaluation.replacement
    )


def run_streaming(
    extraction: ExtractionConfig,
    transcoder: Any,
    training: Any,
    *,
    replacement: bool = True,
    progress: bool = True,
    timeout: float = 600.0,
) -> TrainingResult:
    """Extract in a background thread and train on the store while it is being written, then evaluate.

    Training starts after the first shard (normalisation statistics from the shards present then) and
    reads epoch 0 in the order the shards are written; see `ActivationStore.open(follow=...)`. If
    training fails or is interrupted, the extraction stops after its current batch (the store resumes).
    """
    from clt.nnsight.extractors import BackgroundExtraction

    producer = BackgroundExtraction(lambda stop: run_extraction(extraction, progress=False, stop=stop))
    producer.start()
    try:
        store = ActivationStore.open(
            extraction.output_dir, batch_size=training.batch_size, follow=producer, timeout=timeout
        )
        result = run_training(extraction, transcoder, training, store=store, replacement=replacement, progress=progress)
    except BaseException:
        producer.stop()  # no model keeps running behind a failed or interrupted run; the store resumes
        raise
    producer.result()
    return result


@dataclasses.dataclass
class AttributionResult:
    """What `run_attribution` produced: the graph, its pruning and scores, cards and files."""

    graph: Any
    pruned: Any
    """`PruneResult` (node and edge masks) at the thresholds used for the HTML and exports."""
    scores: tuple[float, float]
    """(replacement score, completeness score) of the unpruned graph."""
    paths: dict[str, Path] = dataclasses.field(default_factory=dict)
    cards: Any = None
    """`FeatureCards` of the most influential features (when a store was given)."""

    def summary(self) -> str:
        """A human-readable report."""
        g, pruned = self.graph, self.pruned
        top = ", ".join(f"{t!r} {p:.3f}" for t, p in zip(g.logit_tokens, g.logit_probabilities.tolist()))
        lines = [
            f"prompt: {g.prompt!r} ({g.n_tokens} tokens)",
            f"likeliest next tokens: {top}",
            f"graph: {g.n_features} active features, {g.n_nodes} nodes; pruned to "
            f"{int(pruned.node_mask[: g.n_features].sum())} features, {int(pruned.node_mask.sum())} nodes, "
            f"{int(pruned.edge_mask.sum())} edges",
            f"replacement score {self.scores[0]:.3f}, completeness score {self.scores[1]:.3f}",
        ]
        if self.cards:
            lines.append("top features: " + "; ".join(f"{c.key} [{c.label}]" for c in list(self.cards.values())[:5]))
        lines += [f"{name}: {path}" for name, path in self.paths.items()]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        g = self.graph
        return {
            "prompt": g.prompt,
            "n_tokens": g.n_tokens,
            "n_features": g.n_features,
            "kept_nodes": int(self.pruned.node_mask.sum()),
            "kept_edges": int(self.pruned.edge_mask.sum()),
            "replacement_score": self.scores[0],
            "completeness_score": self.scores[1],
            "paths": {k: str(v) for k, v in self.paths.items()},
        }


def run_attribution(
    transcoder: Any,
    prompt: str,
    *,
    model: Any = None,
    config: Any = None,
    output_dir: str | Path | None = None,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    store: ActivationStore | None = None,
    n_cards: int = 8,
    device: str = "cpu",
    progress: bool = True,
) -> AttributionResult:
    """Attribution graph of a prompt, pruned and scored; with `output_dir`, graph JSON, HTML and
    Neuronpedia JSON; with `store`, feature cards of the most influential features (labels in the HTML)."""
    from clt.attribution import attribute, graph_scores, node_influence, prune

    lm, tokenizer = _model_for(transcoder, model, device)
    graph = attribute(prompt, lm, transcoder.to(device), tokenizer=tokenizer, config=config, progress=progress)
    result = AttributionResult(graph, prune(graph, node_threshold, edge_threshold), graph_scores(graph))
    out = Path(output_dir) if output_dir is not None else None
    if store is not None and graph.n_features:
        influence = node_influence(graph.adjacency, graph.logit_weights())[: graph.n_features]
        index = {m: i for i, m in enumerate(transcoder.cfg.layers)}
        wanted: list[tuple[int, int]] = []
        for node in influence.argsort(descending=True).tolist():
            layer, _, feature = graph.features[node].tolist()
            if (index[layer], feature) not in wanted:
                wanted.append((index[layer], feature))
            if len(wanted) >= n_cards:
                break
        result.cards = run_features(
            transcoder,
            store,
            model=(lm, tokenizer),
            features=wanted,
            cache=None if out is None else out / "cards.json",
            progress=progress,
        )
    if out is not None:
        from clt.viz import save_graph_html

        result.paths["graph"] = graph.save(out / "graph.json")
        result.paths["html"] = save_graph_html(
            graph, out / "graph.html", node_threshold=node_threshold, edge_threshold=edge_threshold, cards=result.cards
        )
        result.paths["neuronpedia"] = out / "neuronpedia.json"
        graph.to_neuronpedia_json(
            result.paths["neuronpedia"], node_threshold=node_threshold, edge_threshold=edge_threshold
        )
        atomic_write_text(json.dumps(result.as_dict(), indent=1), out / "attribution.json")
    return result


def run_features(
    transcoder: Any,
    store: ActivationStore,
    *,
    model: Any = None,
    features: list[tuple[int, int]] | None = None,
    top_k: int = 8,
    max_tokens: int | None = None,
    cache: str | Path | None = None,
    figures_dir: str | Path | None = None,
    n_figures: int = 10,
    device: str = "cpu",
    progress: bool = True,
) -> Any:
    """Feature cards (top contexts, statistics, top logits, labels) for `features` (default: all that
    fire); with `figures_dir`, an HTML card for each of the first `n_figures`."""
    from clt.interp import build_feature_cards, unembedding_of

    lm, tokenizer = _model_for(transcoder, model or store.model_name, device)
    unembedding, final_norm = unembedding_of(lm)
    cards = build_feature_cards(
        transcoder.cpu(),
        store,
        tokenizer,
        unembedding=unembedding.cpu(),
        final_norm_weight=None if final_norm is None else final_norm.cpu(),
        features=features,
        top_k=top_k,
        max_tokens=max_tokens,
        cache=cache,
        progress=progress,
    )
    if figures_dir is not None:
        from clt.viz import feature_card_figure, save_figure_html

        for card in list(cards.values())[:n_figures]:
            save_figure_html(feature_card_figure(card), Path(figures_dir) / f"feature_{card.layer}_{card.feature}.html")
    return cards


@dataclasses.dataclass
class DemoResult:
    """What `clt demo` produced: paths, timings and the result of each stage."""

    output_dir: Path
    store: ActivationStore
    training: TrainingResult | None = None
    attribution: AttributionResult | None = None
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def summary(self) -> str:
        """A human-readable report."""
        nbytes = self.store.nbytes()
        lines = [
            f"demo outputs in {self.output_dir}",
            f"store: {self.store}",
            f"store size on disk: {nbytes / 2**20:.1f} MiB ({nbytes / self.store.n_tokens / 1024:.1f} KiB/token)",
        ]
        if self.training is not None:
            lines.append(self.training.summary())
        lines += [f"{k}: {v}" for k, v in self.extra.items()]
        lines += [f"time {k}: {v:.1f} s" for k, v in self.timings.items()]
        if self.attribution is not None:  # last: where the graph is, and its scores
            lines.append(self.attribution.summary())
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary (written to `demo_summary.json`)."""
        out: dict[str, Any] = {
            "store": str(self.store.path),
            "n_tokens": self.store.n_tokens,
            "bytes": self.store.nbytes(),
            "timings": self.timings,
            **self.extra,
        }
        if self.training is not None:
            out["reconstruction"] = self.training.reconstruction.as_dict()
            out["replacement"] = self.training.replacement.as_dict() if self.training.replacement else None
        if self.attribution is not None:
            out["attribution"] = self.attribution.as_dict()
        return out


def run_demo(
    output_dir: str | Path = "runs/demo",
    *,
    model: str = DEFAULT_MODEL,
    max_tokens: int = 20_000,
    num_features: int = 64,
    training_steps: int = 600,
    batch_size: int = 128,
    prompt: str = DEMO_PROMPT,
    progress: bool = True,
) -> DemoResult:
    """The end-to-end demo: extract a store of all layers, train a CLT on it, evaluate it, and write
    the attribution graph of `prompt` as HTML with feature cards."""
    from clt.config.training import TrainingConfig
    from clt.config.transcoder import CLTConfig

    output_dir = Path(output_dir)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    extraction = ExtractionConfig(model=model, max_tokens=max_tokens, output_dir=str(output_dir / "store"))
    store = run_extraction(extraction, progress=progress)
    timings["extract"] = time.perf_counter() - start
    start = time.perf_counter()
    transcoder = CLTConfig(
        num_features=num_features, num_layers=store.num_layers, d_model=store.d_model, **DEMO_TRANSCODER
    )
    training = TrainingConfig(
        batch_size=batch_size, training_steps=training_steps, output_dir=str(output_dir / "train"), **DEMO_TRAINING
    )
    trained = run_training(extraction, transcoder, training, store=store, progress=progress)
    timings["train+evaluate"] = time.perf_counter() - start
    start = time.perf_counter()
    attribution = run_attribution(
        trained.transcoder, prompt, model=model, output_dir=output_dir / "attribution", store=store, progress=progress
    )
    if attribution.cards:
        run_features(
            trained.transcoder,
            store,
            model=model,
            features=[(c.layer, c.feature) for c in attribution.cards.values()],
            cache=output_dir / "attribution" / "cards.json",
            figures_dir=output_dir / "attribution",
            n_figures=3,
            progress=progress,
        )
    timings["attribute"] = time.perf_counter() - start
    result = DemoResult(output_dir, store, trained, attribution, timings)
    atomic_write_text(json.dumps(result.as_dict(), indent=1), output_dir / "demo_summary.json")
    return result
