"""Attribution graphs: the local replacement model, graph building, pruning, scores, interventions."""

from clt.attribution.attribute import attribute
from clt.attribution.effects import InterventionEffects, intervention_effects
from clt.attribution.generate import GenerationResult, generate
from clt.attribution.graph import Graph, GraphFileError, Node
from clt.attribution.groups import suggest_supernodes
from clt.attribution.interop import (
    from_circuit_tracer_dict,
    load_circuit_tracer_graph,
    to_circuit_tracer_dict,
)
from clt.attribution.intervene import Intervention, InterventionResult, intervene
from clt.attribution.neuronpedia import to_neuronpedia_json
from clt.attribution.prune import (
    PruneResult,
    completeness_score,
    edge_influence,
    graph_scores,
    node_influence,
    prune,
    replacement_score,
    subgraph_scores,
)
from clt.attribution.replacement import PromptState, ReplacementModel
from clt.attribution.state import GraphState, GraphStateError, Supernode
from clt.attribution.steer import group_nodes, intervene_nodes, node_interventions, steer_nodes
from clt.config.attribution import AttributionConfig
from clt.nnsight.splice import TranscoderMismatchError

__all__ = [
    "AttributionConfig",
    "GenerationResult",
    "Graph",
    "GraphFileError",
    "GraphState",
    "GraphStateError",
    "Intervention",
    "InterventionEffects",
    "InterventionResult",
    "Node",
    "PromptState",
    "PruneResult",
    "ReplacementModel",
    "Supernode",
    "TranscoderMismatchError",
    "attribute",
    "completeness_score",
    "edge_influence",
    "from_circuit_tracer_dict",
    "generate",
    "graph_scores",
    "group_nodes",
    "intervene",
    "intervene_nodes",
    "intervention_effects",
    "load_circuit_tracer_graph",
    "node_influence",
    "node_interventions",
    "prune",
    "replacement_score",
    "steer_nodes",
    "subgraph_scores",
    "suggest_supernodes",
    "to_circuit_tracer_dict",
    "to_neuronpedia_json",
]
