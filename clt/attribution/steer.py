"""Interventions on groups of graph nodes: a supernode, the pinned nodes of a graph page, node ids.

A group is named by node ids (``feature:{layer}:{pos}:{feature}``, `clt.attribution.graph`),
supernode ids (``supernode:{n}``, from a graph page's saved state, `clt.attribution.state`) or
``"pinned"`` (the state's pinned nodes, supernodes expanded). Its feature nodes become one
intervention each, ``(layer, pos, feature, value)``, at the graph's prompt; error, token and logit
members are left out (they are not features), and a group without a feature is an error::

    result = intervene_nodes(rm, graph, "supernode:1", state="state.json", value=0.0)   # ablate it
    text = steer_nodes(rm, graph, "pinned", state=url, value=3.0, max_new_tokens=20).text
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from clt.attribution.generate import GenerationResult, generate
from clt.attribution.graph import Graph
from clt.attribution.intervene import Intervention, InterventionResult, intervene
from clt.attribution.replacement import ReplacementModel
from clt.attribution.state import GraphState

logger = logging.getLogger(__name__)

NodeGroup = str | Sequence[str]


def group_nodes(graph: Graph, nodes: NodeGroup, *, state: GraphState | str | Path | Mapping | None = None) -> list[str]:
    """The node ids a group names (module docstring), each once, in order; errors name what is unknown."""
    names = [nodes] if isinstance(nodes, str) else list(nodes)
    if not names:
        raise ValueError("the group is empty: name node ids, supernode ids or 'pinned'")
    if state is not None and not isinstance(state, GraphState):
        state = GraphState.read(state)
    out: dict[str, None] = {}
    for name in names:
        if name == "pinned" or name.startswith("supernode:"):
            if state is None:
                raise ValueError(f"'{name}' needs the graph page's saved state: pass state=FILE, URL or GraphState")
            try:
                members = state.pinned_nodes() if name == "pinned" else state.supernode(name).members
            except KeyError as err:
                raise ValueError(str(err.args[0])) from None
            out.update(dict.fromkeys(members))
        else:
            out[name] = None
    unknown = []
    for node_id in out:
        try:
            graph.node_index(node_id)
        except KeyError:
            unknown.append(node_id)
    if unknown:
        shown = ", ".join(unknown[:5]) + (" …" if len(unknown) > 5 else "")
        raise ValueError(
            f"{len(unknown)} node ids are not in this graph ({shown}); was the state saved from another graph?"
        )
    if not out:
        raise ValueError(f"the group {names} has no members (nothing is pinned?)")
    return list(out)


def node_interventions(
    graph: Graph,
    nodes: NodeGroup,
    *,
    value: float,
    state: GraphState | str | Path | Mapping | None = None,
) -> list[Intervention]:
    """One intervention ``(layer, pos, feature, value)`` per feature node of the group."""
    ids = group_nodes(graph, nodes, state=state)
    features = [graph.node(graph.node_index(i)) for i in ids]
    skipped = [n.id for n in features if n.kind != "feature"]
    features = [n for n in features if n.kind == "feature"]
    if not features:
        raise ValueError(f"the group has no feature nodes to intervene on (only {', '.join(skipped[:5])})")
    if skipped:
        logger.info("left out %d non-feature nodes of the group: %s", len(skipped), ", ".join(skipped[:5]))
    return [(int(n.layer), n.pos, int(n.feature), float(value)) for n in features]  # type: ignore[arg-type]


def intervene_nodes(
    model: ReplacementModel,
    graph: Graph,
    nodes: NodeGroup,
    *,
    value: float = 0.0,
    mode: str = "scale",
    state: GraphState | str | Path | Mapping | None = None,
    **options: Any,
) -> InterventionResult:
    """`intervene` on the graph's prompt with every feature of a group set, scaled (default: by 0,
    an ablation) or added to; options as `intervene` (freeze_attention, constrained_layers, ...)."""
    interventions = node_interventions(graph, nodes, value=value, state=state)
    return intervene(model, None, graph.token_ids, interventions, mode=mode, **options)


def steer_nodes(
    model: ReplacementModel,
    graph: Graph,
    nodes: NodeGroup,
    *,
    value: float = 0.0,
    mode: str = "scale",
    state: GraphState | str | Path | Mapping | None = None,
    **options: Any,
) -> GenerationResult:
    """`generate` from the graph's prompt with a group's features changed at their positions."""
    interventions = node_interventions(graph, nodes, value=value, state=state)
    return generate(model, None, graph.token_ids, interventions, mode=mode, **options)


__all__ = ["group_nodes", "intervene_nodes", "node_interventions", "steer_nodes"]
