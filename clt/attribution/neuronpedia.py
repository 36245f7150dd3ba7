"""Export a pruned attribution graph as Neuronpedia attribution-graph JSON (schema 1)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from clt.attribution.adjacency import mask_entries, values_at
from clt.attribution.graph import Graph, Node
from clt.files import atomic_write_text

logger = logging.getLogger(__name__)


def to_neuronpedia_json(
    graph: Graph,
    path: str | Path | None = None,
    *,
    slug: str = "graph",
    scan: str | None = None,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
) -> dict[str, Any]:
    """The pruned graph as Neuronpedia attribution-graph JSON (schema 1); written to `path` if given.

    Node ids follow the frontend: ``{layer}_{feature}_{pos}`` (features), ``0_{layer}_{pos}``
    (errors), ``E_{token}_{pos}`` (embeddings), ``{n_layers+1}_{token}_{pos}`` (logits). Where two
    kept nodes would share an id (a layer-0 feature k and the error of layer k at one position),
    the error node's id gets the suffix ``_error`` and a warning is logged.
    """
    from clt.attribution.prune import prune

    result = prune(graph, node_threshold=node_threshold, edge_threshold=edge_threshold)
    scores = result.cumulative_scores
    nodes: dict[int, dict[str, Any]] = {}
    taken: set[str] = set()
    order = sorted(
        result.node_mask.nonzero().squeeze(1).tolist(), key=lambda i: graph.node(i).kind == "error"
    )  # errors take suffixes, not features
    renamed = []
    for index in order:
        record = _np_node(graph, graph.node(index), float(scores[index]))
        if record["node_id"] in taken:
            renamed.append(record["node_id"])
            record["node_id"] += "_error"
            record["jsNodeId"] += "_error"
        taken.add(record["node_id"])
        nodes[index] = record
    if renamed:
        logger.warning(
            "%d error nodes share their Neuronpedia id with a layer-0 feature (e.g. %s); "
            "they were renamed with the suffix _error",
            len(renamed),
            renamed[0],
        )
    targets, sources = mask_entries(result.edge_mask)
    weights = values_at(graph.adjacency, targets, sources).tolist()
    links = [
        {"source": nodes[s]["node_id"], "target": nodes[t]["node_id"], "weight": float(w)}
        for t, s, w in zip(targets.tolist(), sources.tolist(), weights)
        if s in nodes and t in nodes
    ]
    connected = {link["source"] for link in links} | {link["target"] for link in links}
    kept = [
        nodes[i]
        for i in sorted(nodes)
        if nodes[i]["node_id"] in connected or nodes[i]["feature_type"] in ("embedding", "logit")
    ]
    out = {
        "metadata": {
            "slug": slug,
            "scan": scan or graph.model_name or "clt",
            "transcoder_list": [],
            "prompt_tokens": list(graph.tokens),
            "prompt": graph.prompt,
            "node_threshold": node_threshold,
            "schema_version": 1,
        },
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
        "nodes": kept,
        "links": links,
    }
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json.dumps(out, indent=2), path)
    return out


def _np_node(graph: Graph, node: Node, influence: float) -> dict[str, Any]:
    base = {
        "ctx_idx": node.pos,
        "token_prob": 0.0,
        "is_target_logit": False,
        "run_idx": 0,
        "reverse_ctx_idx": 0,
        "clerp": "",
        "influence": influence,
        "activation": None,
    }
    if node.kind == "feature":
        layer, feature = node.layer, node.feature
        return {
            **base,
            "node_id": f"{layer}_{feature}_{node.pos}",
            "feature": (layer + feature) * (layer + feature + 1) // 2 + feature,
            "layer": str(layer),
            "feature_type": "cross layer transcoder",
            "jsNodeId": f"{layer}_{feature}-0",
            "activation": node.activation,
        }
    if node.kind == "error":
        return {
            **base,
            "node_id": f"0_{node.layer}_{node.pos}",
            "feature": -1,
            "layer": str(node.layer),
            "feature_type": "mlp reconstruction error",
            "jsNodeId": f"{node.layer}_{node.pos}-0",
        }
    if node.kind == "token":
        return {
            **base,
            "node_id": f"E_{node.token_id}_{node.pos}",
            "feature": node.pos,
            "layer": "E",
            "feature_type": "embedding",
            "jsNodeId": f"E_{node.token_id}-{node.pos}",
        }
    layer = str(graph.n_layers + 1)
    prob = float(node.activation or 0.0)
    return {
        **base,
        "node_id": f"{layer}_{node.token_id}_{node.pos}",
        "feature": node.token_id,
        "layer": layer,
        "feature_type": "logit",
        "token_prob": prob,
        "is_target_logit": node.index == graph.logit_slice.start,
        "jsNodeId": f"L_{node.token_id}-{node.pos}",
        "clerp": f'Output "{node.token}" (p={prob:.3f})',
    }


__all__ = ["to_neuronpedia_json"]
