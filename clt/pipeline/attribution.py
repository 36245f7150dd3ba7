"""Attribution runners: a prompt's graph (pruned, scored, written as JSON and its HTML page) and feature cards."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from clt.files import atomic_write_text
from clt.pipeline.loading import model_for
from clt.store import ActivationStore

logger = logging.getLogger(__name__)


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
    """`FeatureCards` of the features on the graph page, most influential first (when a store was given)."""
    labels: dict[str, Any] | None = None
    """`label_report` of the `N_LABELLED` most influential features' labels (with cards)."""

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
        if self.labels:
            report = self.labels
            lines.append(
                f"labels of the {report['n']} most influential features: {report['distinct']} distinct, "
                f"{len(report['single_stop_words'])} a single stop word, {report['named']} told apart only by name"
            )
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
            "n_cards": len(self.cards) if self.cards else 0,
            "labels": self.labels,
            "paths": {k: str(v) for k, v in self.paths.items()},
        }


N_LABELLED = 20
"""How many of the most influential features' labels `run_attribution` reports on."""


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
    n_cards: int | None = None,
    labeller: Any = None,
    device: str = "cpu",
    progress: bool = True,
) -> AttributionResult:
    """Attribution graph of a prompt, pruned and scored; with `output_dir`, graph JSON, the HTML page
    and Neuronpedia JSON; with `store`, the feature cards of the page's features and of the
    `N_LABELLED` most influential ones (the `n_cards` most influential; default all), labelled by
    `labeller` (a callable or a model name for `llm_labeller`; default the offline rule), embedded in
    the page."""
    from clt.attribution import attribute, graph_scores, prune
    from clt.attribution.topk import topk_for_attribution
    from clt.config.attribution import AttributionConfig
    from clt.viz.page import select_page

    lm, tokenizer = model_for(transcoder, model, device)
    config = config if config is not None else AttributionConfig()
    transcoder = topk_for_attribution(  # cards and graph describe the same dictionary
        transcoder.to(device), lm, tokenizer, config.topk_mode, calibration_tokens=config.calibration_tokens
    )
    graph = attribute(prompt, lm, transcoder, tokenizer=tokenizer, config=config, progress=progress)
    result = AttributionResult(graph, prune(graph, node_threshold, edge_threshold), graph_scores(graph))
    out = Path(output_dir) if output_dir is not None else None
    selection = select_page(graph, node_threshold=node_threshold, edge_threshold=edge_threshold)
    page_cards = None
    if store is not None and graph.n_features:
        layers = list(transcoder.cfg.layers)
        wanted = _by_influence(graph, selection.features, selection.influence, layers)
        result.cards = run_features(
            transcoder,
            store,
            model=(lm, tokenizer),
            features=wanted[:n_cards] if n_cards is not None else wanted,
            cache=None if out is None else out / "cards.json",
            labeller=labeller,
            progress=progress,
        )
        page_cards = {f"{layers[c.layer]}/{c.feature}": c for c in result.cards.values()}
        from clt.interp import label_report

        top = [f"{layer}/{feature}" for layer, feature in wanted[:N_LABELLED]]
        result.labels = label_report([result.cards[key].label for key in top if key in result.cards])
    if out is not None:
        from clt.viz import save_graph_html

        result.paths["graph"] = graph.save(out / "graph.json")
        result.paths["html"] = save_graph_html(
            graph,
            out / "graph.html",
            node_threshold=node_threshold,
            edge_threshold=edge_threshold,
            cards=page_cards,
            selection=selection,
        )
        result.paths["neuronpedia"] = out / "neuronpedia.json"
        graph.to_neuronpedia_json(
            result.paths["neuronpedia"], node_threshold=node_threshold, edge_threshold=edge_threshold
        )
        atomic_write_text(json.dumps(result.as_dict(), indent=1), out / "attribution.json")
    return result


def _by_influence(graph: Any, features: Any, influence: Any, layers: list[int]) -> list[tuple[int, int]]:
    """(transcoder layer, feature) of the feature nodes `features` and of the `N_LABELLED` most
    influential features, most influential node first, once each."""
    index = {m: i for i, m in enumerate(layers)}
    on_page = set(features.tolist())
    wanted: dict[tuple[int, int], None] = {}
    for node in influence[: graph.n_features].argsort(descending=True).tolist():
        if node in on_page or len(wanted) < N_LABELLED:
            layer, _, feature = graph.features[node].tolist()
            wanted[(index[layer], feature)] = None
    return list(wanted)


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
    labeller: Any = None,
    device: str = "cpu",
    progress: bool = True,
) -> Any:
    """Feature cards (top contexts, statistics, top logits, labels) for `features` (default: all that
    fire); with `figures_dir`, an HTML card for each of the first `n_figures`; `labeller`: a callable
    or a local causal LM's name or folder (`llm_labeller`), default the offline rule."""
    from clt.interp import build_feature_cards, llm_labeller, unembedding_of

    if isinstance(labeller, (str, Path)):
        labeller = llm_labeller(str(labeller))

    lm, tokenizer = model_for(transcoder, model or store.model_name, device)
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
        labeller=labeller,
        progress=progress,
    )
    if figures_dir is not None:
        from clt.viz import feature_card_figure, save_figure_html

        for card in list(cards.values())[:n_figures]:
            save_figure_html(feature_card_figure(card), Path(figures_dir) / f"feature_{card.layer}_{card.feature}.html")
    return cards
