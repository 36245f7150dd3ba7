"""Scores of node sets: features left out are merged into their error nodes."""

from __future__ import annotations

import pytest
import torch
from helpers import hand_graph

from clt.attribution import Graph, attribute, graph_scores, subgraph_scores
from clt.attribution.prune import merged_rows


@pytest.fixture
def chain() -> Graph:
    """t1 → f (layer 0, pos 1) → logit, plus the error at (0, 1) and t1 straight to the logit.

    Nodes: 0 f, 1 error(0,0), 2 error(0,1), 3 t0, 4 t1, 5 logit."""
    return hand_graph([[0, 1, 0]], 1, 2, {(0, 4): 2.0, (5, 0): 3.0, (5, 2): 1.0, (5, 4): 1.0})


def test_scores_of_a_hand_built_graph(chain):
    # logit row normalised: f 0.6, error 0.2, t1 0.2; f's row: t1 1 -> influence f .6, error .2, t1 .8
    assert graph_scores(chain) == pytest.approx((0.8, 2.4 / 2.6), abs=1e-7)
    assert subgraph_scores(chain, ["feature:0:1:0"]) == pytest.approx((0.8, 2.4 / 2.6), abs=1e-12)
    # without f, its edge to the logit joins the error's: logit row error 0.8, t1 0.2
    assert subgraph_scores(chain, []) == pytest.approx((0.2, 1.2 / 2.0), abs=1e-12)
    # error, token and logit nodes do not change a subgraph
    assert subgraph_scores(chain, ["token:1", "error:0:1", "logit:7"]) == subgraph_scores(chain, [])
    assert subgraph_scores(chain, [0, 4]) == subgraph_scores(chain, ["feature:0:1:0"])
    with pytest.raises(KeyError, match="feature:3:1:0"):
        subgraph_scores(chain, ["feature:3:1:0"])
    with pytest.raises(IndexError, match="out of range"):
        subgraph_scores(chain, [6])


@pytest.fixture(scope="module")
def tiny_graph(tiny_llama) -> Graph:
    from helpers import random_transcoder

    model, tokenizer = tiny_llama
    tc = random_transcoder(model)
    return attribute("The for statement iterates over", model, tc, tokenizer=tokenizer, progress=False)


def test_subgraph_of_all_features_is_the_graph(tiny_graph):
    everything = subgraph_scores(tiny_graph, range(tiny_graph.n_features))
    # float64 here, float32 in graph_scores: they differ by float32 rounding of sums of ~100 terms
    assert everything == pytest.approx(graph_scores(tiny_graph), abs=1e-5)
    nothing = subgraph_scores(tiny_graph, [])
    assert nothing[0] < everything[0] and nothing[1] < everything[1]


def test_merging_is_order_free(tiny_graph):
    n = tiny_graph.n_features
    everything = torch.arange(tiny_graph.n_nodes)
    first, second = torch.arange(0, n, 3), torch.tensor([i for i in range(n) if i % 3 and i % 2])
    at_once = merged_rows(tiny_graph, everything, torch.cat([first, second]).sort().values)
    staged = dataclass_with(tiny_graph, merged_rows(tiny_graph, everything, first))
    in_two_steps = merged_rows(staged, everything, second)
    assert torch.allclose(at_once, in_two_steps, rtol=0, atol=1e-12)


def dataclass_with(graph: Graph, adjacency: torch.Tensor) -> Graph:
    import dataclasses

    return dataclasses.replace(graph, adjacency=adjacency)
