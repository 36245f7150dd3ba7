"""Long prompts: the linear path against the autograd path, sparse graphs against dense ones, the memory plan."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import random_transcoder

from clt.attribution import Graph, ReplacementModel, attribute, graph_scores, node_influence, prune
from clt.attribution.adjacency import csr_matrix, entries, to_dense
from clt.attribution.linear import LinearReplacement, UnsupportedModelError
from clt.attribution.memory import CHUNK_BYTES, plan_memory
from clt.viz import graph_figure

PROMPT = "The for statement iterates over the items of any sequence"
CASES = {
    "clt-relu": dict(cross_layer=True, activation_fn="relu"),
    "plt-jumprelu": dict(cross_layer=False, activation_fn="jumprelu"),
    "clt-skip": dict(cross_layer=True, activation_fn="relu", skip_connection=True),
}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((to_dense(a) - to_dense(b)).abs().max() / to_dense(b).abs().max())


@pytest.mark.parametrize("case", list(CASES))
def test_linear_path_equals_the_autograd_path(tiny, case, one_thread):
    name, model, tokenizer = tiny
    rm = ReplacementModel(model, random_transcoder(model, **CASES[case]), tokenizer)
    for options in ({"zero_bos": False}, {"max_feature_nodes": 12, "batch_size": 5, "update_interval": 1}):
        linear = attribute(PROMPT, rm, backward="linear", progress=False, **options)
        autograd = attribute(PROMPT, rm, backward="autograd", progress=False, **options)
        assert torch.equal(linear.features, autograd.features)
        assert linear.logit_token_ids == autograd.logit_token_ids
        assert _relative(linear.adjacency, autograd.adjacency) <= 1e-5


def test_a_batch_runs_each_row_from_its_own_layer_down(tiny_llama, monkeypatch, one_thread):
    """Rows join the batched backward at their own layer: layer m sees only the rows above it."""
    from clt.attribution.rows import Edges

    model, tokenizer = tiny_llama
    rm = ReplacementModel(model, random_transcoder(model), tokenizer)
    seen: list[tuple[int, int]] = []
    layer = Edges.layer
    monkeypatch.setattr(Edges, "layer", lambda self, m, g, out: seen.append((m, len(g))) or layer(self, m, g, out))
    batches: list[torch.Tensor] = []
    backward = LinearReplacement.backward
    monkeypatch.setattr(
        LinearReplacement, "backward", lambda self, layers, *a: batches.append(layers) or backward(self, layers, *a)
    )
    attribute(PROMPT, rm, backward="linear", batch_size=7, progress=False)
    calls, skipped = iter(seen), 0
    for layers in batches:
        assert bool((layers[:-1] >= layers[1:]).all())  # top layer first
        for m in range(min(int(layers.max()), rm.n_layers) - 1, -1, -1):
            m_seen, rows = next(calls)
            assert (m_seen, rows) == (m, int((layers > m).sum()))
            skipped += len(layers) - rows
    assert next(calls, None) is None and skipped > 0


def test_patterns_rebuilt_in_blocks_equal_kept_patterns(tiny_llama, one_thread):
    model, tokenizer = tiny_llama
    rm = ReplacementModel(model, random_transcoder(model, skip_connection=True), tokenizer)
    state = rm.prepare(PROMPT, zero_bos=False)
    n, M, d = len(state.input_ids), rm.n_layers, rm.layout.d_model
    kept = LinearReplacement(rm, state)
    rebuilt = LinearReplacement(rm, state, block_size=3, keep_patterns=False)
    assert kept.pattern_bytes > 0 and rebuilt.pattern_bytes == 0
    layers, positions = torch.tensor([M, 2, 1, 2]), torch.tensor([n - 1, 4, n - 3, 7])
    vecs = torch.randn(4, d, generator=torch.Generator().manual_seed(0))
    grads: dict[str, dict[int, torch.Tensor]] = {"kept": {}, "rebuilt": {}}
    emb_kept = kept.backward(layers, positions, vecs, lambda m, g: grads["kept"].__setitem__(m, g.clone()))
    emb_rebuilt = rebuilt.backward(layers, positions, vecs, lambda m, g: grads["rebuilt"].__setitem__(m, g.clone()))
    assert _relative(emb_rebuilt, emb_kept) <= 1e-6
    assert grads["kept"].keys() == grads["rebuilt"].keys() == {0, 1, 2}
    for m, g in grads["kept"].items():
        assert _relative(grads["rebuilt"][m], g) <= 1e-6


def test_a_parallel_residual_model_uses_the_autograd_path(caplog, one_thread):
    """GPT-NeoX adds attention and MLP to the same residual: the linear path refuses it, 'auto' falls back."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from clt.nnsight.loading import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    sizes = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
    config = GPTNeoXConfig(vocab_size=len(tokenizer), use_parallel_residual=True, max_position_embeddings=64, **sizes)
    model = GPTNeoXForCausalLM(config).eval()
    rm = ReplacementModel(model, random_transcoder(model), tokenizer)
    with pytest.raises(UnsupportedModelError, match="norm, attention, norm, MLP"):
        attribute(PROMPT, rm, backward="linear", progress=False)
    with caplog.at_level(logging.WARNING, logger="clt.attribution.attribute"):
        auto = attribute(PROMPT, rm, progress=False)
    assert "using the autograd path" in caplog.text
    assert torch.equal(auto.adjacency, attribute(PROMPT, rm, backward="autograd", progress=False).adjacency)


def _sparse_copy(graph: Graph) -> Graph:
    fields = {name: getattr(graph, name) for name in graph.__dataclass_fields__}
    return Graph(**{**fields, "adjacency": csr_matrix(*entries(graph.adjacency), graph.n_nodes)})


def test_a_sparse_graph_gives_the_dense_graph_results(tiny_llama, tmp_path, one_thread):
    model, tokenizer = tiny_llama
    dense = attribute(PROMPT, model, random_transcoder(model), tokenizer=tokenizer, progress=False)
    sparse = _sparse_copy(dense)
    assert sparse.is_sparse and not dense.is_sparse
    influence = node_influence(dense.adjacency, dense.logit_weights())  # sparse sums run in another order
    torch.testing.assert_close(node_influence(sparse.adjacency, sparse.logit_weights()), influence)
    assert graph_scores(sparse) == pytest.approx(graph_scores(dense), rel=1e-6)
    for thresholds in ((0.8, 0.98), (0.5, 0.5), (0.3, 0.99)):  # at 1.0, rounding decides
        a, b = prune(sparse, *thresholds), prune(dense, *thresholds)
        assert torch.equal(a.node_mask, b.node_mask) and torch.equal(to_dense(a.edge_mask), b.edge_mask)
        torch.testing.assert_close(a.cumulative_scores, b.cumulative_scores)
    pruned = prune(dense)
    assert sparse.edges_df(node_mask=pruned.node_mask).equals(dense.edges_df(node_mask=pruned.node_mask))
    assert sparse.edges_df(0.05).equals(dense.edges_df(0.05))
    exports = [g.to_neuronpedia_json() for g in (sparse, dense)]
    assert [n["node_id"] for n in exports[0]["nodes"]] == [n["node_id"] for n in exports[1]["nodes"]]
    assert exports[0]["links"] == exports[1]["links"]
    figures = [graph_figure(g, max_edges=20) for g in (sparse, dense)]
    drawn = [[(t.meta, t.name, t.customdata, len(t.x)) for t in fig.data] for fig in figures]
    assert drawn[0] == drawn[1]

    path = sparse.save(tmp_path / "sparse.json")
    loaded = Graph.load(path)
    assert loaded.is_sparse and torch.equal(to_dense(loaded.adjacency), dense.adjacency)
    assert loaded.nodes == dense.nodes
    spec = sparse.to_dict()["tensors"]["adjacency"]
    assert spec["layout"] == "sparse_csr" and spec["col_indices"]["dtype"] == "int32"  # 8 bytes per edge


def test_attribute_streams_rows_into_a_sparse_adjacency(tiny_llama, monkeypatch, one_thread):
    model, tokenizer = tiny_llama
    rm = ReplacementModel(model, random_transcoder(model), tokenizer)
    for options in ({}, {"max_feature_nodes": 9, "batch_size": 4}):
        dense = attribute(PROMPT, rm, progress=False, **options)
        with monkeypatch.context() as patch:
            patch.setattr("clt.attribution.memory.DENSE_LIMIT_BYTES", 0)
            sparse = attribute(PROMPT, rm, progress=False, **options)
        assert sparse.is_sparse
        assert torch.equal(to_dense(sparse.adjacency), dense.adjacency)
        values = sparse.adjacency.values()
        assert (values != 0).all() and len(values) == int((dense.adjacency != 0).sum())


def test_the_memory_budget_chooses_batch_size_and_pattern_storage(tiny_llama, monkeypatch, caplog, one_thread):
    model, tokenizer = tiny_llama
    rm = ReplacementModel(model, random_transcoder(model), tokenizer)
    monkeypatch.setattr("clt.attribution.memory.BLOCK_SIZE", 8)  # rebuilt blocks smaller than kept patterns
    monkeypatch.setattr("clt.attribution.memory._resident_bytes", lambda rm, state: 10 * 2**20)  # fixed
    state = rm.prepare(torch.arange(5, 205))
    sizes = dict(n_active=400, decoder_writes=800, n_rows=60, n_cols=500, n_nodes=200, direct=False, linear=True)

    def plan(budget: float | None):
        return plan_memory(rm, state, batch_size=64, max_memory_gb=budget, row_store="memory", **sizes)

    free = plan(None)
    assert free.batch_size == 64 and free.keep_patterns and free.block_size == 8
    assert plan(free.total / 2**30).keep_patterns
    rebuilt = plan((free.total - 1) / 2**30)
    assert not rebuilt.keep_patterns and rebuilt.batch_size == 64 and rebuilt.total < free.total
    smaller = plan(rebuilt.total / 2**30 * 0.7)
    assert not smaller.keep_patterns and 1 <= smaller.batch_size < 64
    assert smaller.total <= rebuilt.total * 0.7 < plan(None).parts["batch"] + rebuilt.total * 0.7
    with pytest.raises(MemoryError, match="max_memory_gb"):
        plan(1e-6)

    # the sizes of attribute's own plan: every feature visited, 10 logits
    n, K, M = len(state.input_ids), int(state.activations.count_nonzero()), rm.n_layers
    reach = torch.tensor([w.shape[1] for w in rm.transcoder.W_dec])
    writes = int(reach[state.activations.nonzero()[:, 1]].sum())
    columns = K + M * n + n + 10
    sizes = dict(n_active=K, decoder_writes=writes, n_rows=K + 10, n_cols=columns, n_nodes=columns)
    budget = plan_memory(rm, state, batch_size=64, max_memory_gb=None, direct=True, linear=True, **sizes)
    options = {"max_n_logits": 10, "desired_logit_prob": 1.0, "progress": False}
    with caplog.at_level(logging.INFO, logger="clt.attribution.attribute"):
        budgeted = attribute(state.input_ids, rm, max_memory_gb=budget.total / 2**30 * 0.8, **options)
    assert "estimated peak memory" in caplog.text and "attribution time by part" in caplog.text
    assert "batch 64," not in caplog.text and "rebuilt in blocks of 8" in caplog.text
    assert _relative(budgeted.adjacency, attribute(state.input_ids, rm, **options).adjacency) <= 1e-6


@pytest.mark.parametrize("case", ["clt-relu", "plt-jumprelu"])
def test_feature_edges_kernel_gives_the_torch_rows(tiny, case, monkeypatch, one_thread):
    name, model, tokenizer = tiny
    rm = ReplacementModel(model, random_transcoder(model, **CASES[case]), tokenizer)
    options = {"max_feature_nodes": 12, "batch_size": 5, "progress": False}
    kernel = attribute(PROMPT, rm, **options)
    monkeypatch.setattr("clt.models.native.feature_edges", lambda *args: False)
    torch_rows = attribute(PROMPT, rm, **options)
    assert torch.equal(kernel.features, torch_rows.features)
    assert _relative(kernel.adjacency, torch_rows.adjacency) <= 1e-6


def test_split_rows_give_the_graph_of_rows_in_memory(tiny_llama, one_thread):
    """A split row store ranks on rounded halves but joins the graph's entries back bit for bit."""
    model, tokenizer = tiny_llama
    rm = ReplacementModel(model, random_transcoder(model), tokenizer)
    options = {"max_feature_nodes": 20, "batch_size": 4, "update_interval": 1, "progress": False}
    in_memory = attribute(PROMPT, rm, row_store="memory", **options)
    split = attribute(PROMPT, rm, row_store="split", **options)
    assert len(split.features) == 20 and torch.equal(split.features, in_memory.features)
    assert torch.equal(to_dense(split.adjacency), to_dense(in_memory.adjacency))


@pytest.mark.parametrize("kernel", [True, False])
def test_ranking_from_split_rows_is_within_rounding(kernel, monkeypatch, one_thread):
    from clt.attribution.attribute import _influence
    from clt.attribution.rowstore import RowStore

    if not kernel:
        monkeypatch.setattr("clt.models.native.abs_weighted_sum", lambda *args: False)

    torch.manual_seed(0)
    rows = torch.randn(30, 400) * torch.rand(30, 1) * 1e3
    rows[:, 390:] = 0  # the logit columns
    row_node = torch.cat([torch.arange(390, 400), torch.randperm(390)[:20]])
    for i in range(30):
        rows[i, row_node[: i + 1]] = 0  # edges only from later rows' nodes: no cycles
    logit_p = torch.softmax(torch.randn(10), 0)
    influence = {}
    for split in (False, True):
        with RowStore(30, 400, split=split, chunk_bytes=4 * 400 * 7) as store:
            for lo in range(0, 30, 8):
                store.commit(store.next_rows(min(8, 30 - lo)).copy_(rows[lo : lo + 8]))
            influence[split] = _influence(store, rows.abs().sum(1), row_node, logit_p, 390)
    expected = _influence_oracle(rows, row_node, logit_p)[:390]
    torch.testing.assert_close(influence[False], expected, rtol=1e-5, atol=0)
    ratio = influence[True] / expected
    assert 1 - 2**-6 < float(ratio.min()) <= float(ratio.max()) <= 1 and float(ratio.min()) < 1


def _influence_oracle(rows: torch.Tensor, row_node: torch.Tensor, logit_p: torch.Tensor) -> torch.Tensor:
    """Influence on a square graph of the rows' nodes and every column, by the matrix inverse."""
    n_cols = rows.shape[1]
    normalised = torch.zeros(n_cols, n_cols, dtype=torch.float64)
    normalised[row_node] = (rows.abs() / rows.abs().sum(1, keepdim=True)).double()
    weights = torch.zeros(n_cols, dtype=torch.float64)
    weights[row_node[: len(logit_p)]] = logit_p.double()
    total = weights @ torch.linalg.inv(torch.eye(n_cols, dtype=torch.float64) - normalised)
    return (total - weights).float()


def test_the_memory_plan_splits_rows_that_do_not_fit(tiny_llama, monkeypatch, one_thread):
    from clt.config.attribution import AttributionConfig

    model, tokenizer = tiny_llama
    rm = ReplacementModel(model, random_transcoder(model), tokenizer)
    monkeypatch.setattr("clt.attribution.memory._resident_bytes", lambda rm, state: 10 * 2**20)
    state = rm.prepare(torch.arange(5, 45))
    sizes = dict(n_active=400, decoder_writes=800, n_rows=600, n_cols=100_000, n_nodes=2000, direct=False, linear=True)

    def plan(budget: float | None, row_store: str = "auto"):
        return plan_memory(rm, state, batch_size=8, max_memory_gb=budget, row_store=row_store, **sizes)

    monkeypatch.setattr("clt.attribution.memory._available_bytes", lambda: 2**40)
    in_memory = plan(None)
    assert not in_memory.split_rows and in_memory.disk == 0 and "split" not in in_memory.describe()
    monkeypatch.setattr("clt.attribution.memory._available_bytes", lambda: in_memory.total - 10 * 2**20 - 1)
    split = plan(None)
    assert split.split_rows and split.keep_patterns and split.batch_size == 8 and split.disk == 600 * 100_000 * 2
    chunks = 2 * CHUNK_BYTES  # the influence's chunk buffers
    assert split.parts["rows"] - chunks == 600 * 100_000 * 2 and in_memory.parts["rows"] - chunks == 600 * 100_000 * 4
    assert "on disk" in split.describe()
    assert plan(split.total / 2**30).split_rows and not plan(in_memory.total / 2**30).split_rows
    assert not plan(None, "memory").split_rows and plan(None, "split").split_rows
    with pytest.raises(MemoryError, match="row_store='split'"):
        plan(split.total / 2**30, "memory")
    monkeypatch.setattr("clt.attribution.memory.shutil.disk_usage", lambda folder: type("U", (), {"free": 10})())
    with pytest.raises(OSError, match="TMPDIR"):
        plan(None, "split")
    assert not plan(None, "memory").split_rows
    with pytest.raises(ValueError, match="row_store"):
        AttributionConfig(row_store="disk")


@pytest.mark.slow
def test_linear_path_equals_the_autograd_path_on_smollm2(smollm2):
    model, tokenizer = smollm2
    rm = ReplacementModel(model, random_transcoder(model, num_features=32), tokenizer)
    options = {"max_feature_nodes": 64, "max_n_logits": 4, "progress": False}
    linear = attribute("The capital of France is", rm, backward="linear", **options)
    autograd = attribute("The capital of France is", rm, backward="autograd", **options)
    assert torch.equal(linear.features, autograd.features)
    assert _relative(linear.adjacency, autograd.adjacency) <= 1e-5
