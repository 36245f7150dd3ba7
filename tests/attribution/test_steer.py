"""Group interventions: supernodes and pinned nodes of a graph page's state, against hooks."""

from __future__ import annotations

import pytest
import torch
from helpers import random_transcoder
from test_attribution import PROMPT
from test_intervene import _iterative_oracle

from clt.attribution import (
    GraphState,
    ReplacementModel,
    Supernode,
    attribute,
    generate,
    intervene_nodes,
    node_interventions,
    steer_nodes,
)


@pytest.fixture(scope="module")
def setup(tiny_llama):
    model, tokenizer = tiny_llama
    rm = ReplacementModel(model, random_transcoder(model, cross_layer=True, decoder_scale=0.3), tokenizer)
    graph = attribute(PROMPT, rm, progress=False)
    ids = [graph.node(i).id for i in range(graph.n_features)]
    state = GraphState(
        pinned=["supernode:1", ids[-1], f"logit:{graph.logit_token_ids[0]}"],
        supernodes=[
            Supernode("supernode:1", "pair", [ids[0], ids[5]]),
            Supernode("supernode:2", "odd", ["token:0", "error:0:1"]),
        ],
    )
    return rm, graph, state, ids


def test_ablating_a_supernode_equals_hooks_that_remove_its_writes(setup):
    rm, graph, state, ids = setup
    result = intervene_nodes(rm, graph, "supernode:1", state=state, value=0.0)
    plan: dict[int, list] = {}
    for node_id in (ids[0], ids[5]):
        layer, pos, feature = (int(v) for v in node_id.split(":")[1:])
        plan.setdefault(layer, []).append((pos, feature, 0.0))
    expected = _iterative_oracle(rm, torch.tensor(graph.token_ids), plan, "scale")
    torch.testing.assert_close(result.logits, expected, rtol=0, atol=2e-5)
    assert (expected - result.original_logits).abs().max() > 1e-3


def test_pinned_nodes_expand_supernodes_and_leave_out_logits(setup):
    rm, graph, state, ids = setup
    pinned = node_interventions(graph, "pinned", state=state.to_dict(), value=2.0)
    expected = [ids[0], ids[5], ids[-1]]
    assert [f"feature:{layer}:{pos}:{feature}" for layer, pos, feature, _ in pinned] == expected
    assert all(value == 2.0 for *_, value in pinned)
    steered = steer_nodes(rm, graph, "pinned", state=state, value=2.0, max_new_tokens=4, stop_at_eos=False)
    plain = generate(rm, None, graph.token_ids, pinned, mode="scale", max_new_tokens=4, stop_at_eos=False)
    assert steered.new_ids == plain.new_ids
    torch.testing.assert_close(steered.logits, plain.logits)


def test_bad_groups_are_refused_with_the_reason(setup):
    rm, graph, state, ids = setup
    with pytest.raises(ValueError, match="empty"):
        node_interventions(graph, [], value=0.0)
    with pytest.raises(ValueError, match="not in this graph"):
        node_interventions(graph, ["feature:0:0:99999", ids[0]], value=0.0)
    with pytest.raises(ValueError, match="saved state"):
        node_interventions(graph, "supernode:1", value=0.0)
    with pytest.raises(ValueError, match="no supernode"):
        node_interventions(graph, "supernode:7", state=state, value=0.0)
    with pytest.raises(ValueError, match="no feature nodes"):
        node_interventions(graph, "supernode:2", state=state, value=0.0)
    with pytest.raises(ValueError, match="nothing is pinned"):
        node_interventions(graph, "pinned", state=GraphState(), value=0.0)


def test_effects_need_the_graphs_prompt_and_its_feature_nodes(setup):
    from clt.attribution import intervene, intervention_effects

    rm, graph, state, ids = setup
    layer, pos, feature = graph.features[0].tolist()
    with pytest.raises(ValueError, match="another prompt"):
        intervention_effects(graph, intervene(rm, None, "Another prompt", [(layer, 1, feature, 0.0)]))
    with pytest.raises(ValueError, match="one position per feature"):
        intervention_effects(graph, intervene(rm, None, graph.token_ids, [(layer, slice(1, None), feature, 0.0)]))
    inactive = next(f for f in range(rm.transcoder.cfg.num_features) if f"feature:{layer}:0:{f}" not in ids)
    with pytest.raises(ValueError, match="not a node of the graph"):
        intervention_effects(graph, intervene(rm, None, graph.token_ids, [(layer, 0, inactive, 1.0)]))
    effects = intervention_effects(graph, intervene(rm, None, graph.token_ids, [(layer, pos, feature, 0.0)]))
    assert effects.sources == [ids[0]] and float(effects.source_changes[0]) == pytest.approx(
        -float(graph.activations[0])
    )
