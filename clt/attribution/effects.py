"""What a graph predicts an intervention does, against what it did.

An edge A[t, s] is the direct effect of source s on target t's input at s's activation a_s (rows
targets, columns sources; `clt.attribution.graph`), linear in a_s. So changing the graph's
features by Δa_s predicts each target's input to move by Σ_s A[t, s] · Δa_s / a_s: a feature's
encoder pre-activation, a logit's value minus the mean logit. With attention frozen and every
layer constrained (`intervene(..., freeze_attention=True, constrained_layers="all")`: direct
effects) the prediction is exact; other modes show how far indirect paths carry the change.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from clt.attribution.adjacency import dense_rows
from clt.attribution.graph import Graph

if TYPE_CHECKING:
    import pandas as pd

    from clt.attribution.intervene import InterventionResult


@dataclasses.dataclass
class InterventionEffects:
    """Predicted and measured changes of a graph's feature and logit nodes after an intervention."""

    sources: list[str]
    """Node ids of the intervened graph features."""
    source_changes: Tensor
    """Their activation changes Δa_s [n_sources]."""
    node_ids: list[str]
    """Target node ids: the graph's other features, then its logits."""
    kinds: list[str]
    """'feature' or 'logit' for each target."""
    labels: list[str]
    """Short display label of each target (``L3 "tok"@5 #12``, ``logit "tok"``)."""
    predicted: Tensor
    """Σ_s A[t, s] · Δa_s / a_s per target [n_targets] (float64)."""
    measured: Tensor
    """Measured change of the target's input (pre-activation; logit minus mean logit) [n_targets]."""

    def to_frame(self) -> pd.DataFrame:
        """One row per target: node_id, kind, label, predicted, measured."""
        import pandas as pd

        return pd.DataFrame(
            {
                "node_id": self.node_ids,
                "kind": self.kinds,
                "label": self.labels,
                "predicted": self.predicted.tolist(),
                "measured": self.measured.tolist(),
            }
        )

    def max_relative_error(self, floor: float = 0.0) -> float:
        """max |measured − predicted| / max(|predicted|, floor) over the targets."""
        if not len(self.predicted):
            return 0.0
        err = (self.measured - self.predicted).abs()
        return float((err / self.predicted.abs().clamp_min(floor)).max())


def intervention_effects(graph: Graph, result: InterventionResult) -> InterventionEffects:
    """Predicted against measured effects of `result`'s interventions on `graph`'s nodes (module
    docstring). The result must come from the graph's prompt; every intervened feature must be a
    feature node of the graph at a single position."""
    if result.token_ids != graph.token_ids:
        raise ValueError("the intervention ran on another prompt than the graph's; use the graph's prompt")
    if result.preactivations is None or result.original_preactivations is None or result.original_activations is None:
        raise ValueError("the intervention result has no pre-activations; run it with `intervene`")
    layer_index = {m: i for i, m in enumerate(result.layers)}
    sources, changes = [], []
    for layer, pos, feature, _ in result.interventions:
        if pos is None or isinstance(pos, slice):
            raise ValueError(f"intervention at positions {pos}: predictions need one position per feature node")
        pos = int(pos) % len(graph.token_ids)
        node_id = f"feature:{layer}:{pos}:{feature}"
        try:
            index = graph.node_index(node_id)
        except KeyError:
            raise ValueError(f"intervened feature {node_id} is not a node of the graph (inactive or pruned)") from None
        i = layer_index[int(layer)]
        delta = float(result.activations[pos, i, feature] - result.original_activations[pos, i, feature])
        if index not in sources:
            sources.append(index)
            changes.append(delta)
    A = graph.adjacency
    cols = torch.tensor(sources, dtype=torch.long)
    weights = torch.tensor(changes, dtype=torch.float64) / graph.activations[cols].double()
    targets = [t for t in range(graph.n_features) if t not in sources] + list(
        range(graph.logit_slice.start, graph.n_nodes)
    )
    rows = torch.tensor(targets, dtype=torch.long)
    predicted = dense_rows(A, rows)[:, cols].double() @ weights
    measured, kinds, labels = [], [], []
    logit_change = result.demeaned_logit_change(-1).double()
    for t in targets:
        node = graph.node(t)
        if node.kind == "feature":
            i = layer_index[int(node.layer)]
            z = (
                result.preactivations[node.pos, i, node.feature]
                - result.original_preactivations[node.pos, i, node.feature]
            )
            measured.append(float(z))
            labels.append(f"L{node.layer} {node.token!r}@{node.pos} #{node.feature}")
        else:
            measured.append(float(logit_change[node.token_id]))
            labels.append(f"logit {node.token!r}")
        kinds.append(node.kind)
    return InterventionEffects(
        sources=[graph.node(s).id for s in sources],
        source_changes=torch.tensor(changes, dtype=torch.float64),
        node_ids=[graph.node(t).id for t in targets],
        kinds=kinds,
        labels=labels,
        predicted=predicted,
        measured=torch.tensor(measured, dtype=torch.float64),
    )


__all__ = ["InterventionEffects", "intervention_effects"]
