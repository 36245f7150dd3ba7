"""Attribution runners: a prompt's graph (pruned, scored, written as JSON and HTML) and feature cards."""

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

    lm, tokenizer = model_for(transcoder, model, device)
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
        progress=progress,
    )
    if figures_dir is not None:
        from clt.viz import feature_card_figure, save_figure_html

        for card in list(cards.values())[:n_figures]:
            save_figure_html(feature_card_figure(card), Path(figures_dir) / f"feature_{card.layer}_{card.feature}.html")
    return cards
