"""Attribution graphs against an independent linear oracle of the frozen replacement model.

The oracle re-runs the model with the clean run's attention patterns and normalisation scales
*replayed* (recorded with transformers' eager attention, `output_attentions=True`), every MLP output
held at its clean value plus a chosen change. That model is exactly affine in the changes, so
removing a source node (a feature's decoder write, an error term, a token embedding) changes a
target's input by exactly the edge weight, and removing all of them leaves the constant terms.
"""

from __future__ import annotations

import base64

import pytest
import torch
from helpers import random_transcoder
from torch import nn

from clt.attribution import (
    AttributionConfig,
    Graph,
    GraphFileError,
    ReplacementModel,
    TranscoderMismatchError,
    attribute,
    graph_scores,
    prune,
)
from clt.config.transcoder import CLTConfig
from clt.models.transcoder import CrossLayerTranscoder

PROMPT = "The for statement iterates over the items"


class LinearOracle:
    """The frozen replacement model rebuilt independently (module docstring); CPU, float64 reads."""

    def __init__(self, rm: ReplacementModel, ids: torch.Tensor) -> None:
        self.rm, self.model, self.ids = rm, rm.model, ids
        self.norms = {
            m: None for m in self.model.modules() if isinstance(m, nn.LayerNorm) or "RMSNorm" in type(m).__name__
        }
        self.mlps = [self.model.get_submodule(p) for p in rm.layout.mlp_paths]
        self.first_block = self.model.get_submodule(rm.layout.layer_paths[0])
        self.state = rm.prepare(ids, zero_bos=False)
        config = self.model.config
        saved = config._attn_implementation
        handles = [n.register_forward_hook(self._record_scale) for n in self.norms]
        try:
            config._attn_implementation = "eager"
            with torch.no_grad():
                out = self.model(input_ids=ids[None], output_attentions=True, use_cache=False)
        finally:
            config._attn_implementation = saved
            for h in handles:
                h.remove()
        self.patterns = [a.detach() for a in out.attentions]
        torch.testing.assert_close(out.logits[0].float(), self.state.logits)

    def _record_scale(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        x = args[0].detach().float()
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        if isinstance(module, nn.LayerNorm):
            self.norms[module] = (x.var(-1, unbiased=False, keepdim=True) + eps).sqrt()
        else:
            self.norms[module] = (x.square().mean(-1, keepdim=True) + eps).sqrt()

    def _replay_norm(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0].float()
        if isinstance(module, nn.LayerNorm):
            x = x - x.mean(-1, keepdim=True)
            return (x / self.norms[module] * module.weight + module.bias).to(output.dtype)
        return (x / self.norms[module] * module.weight).to(output.dtype)

    def _replay_attention(self, module, query, key, value, attention_mask, **kwargs):
        pattern = self.patterns[module.layer_idx].to(value.dtype)
        value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
        return torch.matmul(pattern, value).transpose(1, 2).contiguous(), pattern

    def run(
        self, deltas: dict[int, torch.Tensor] | None = None, embedding_scale: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits [n, vocab] and MLP inputs (per layer, [n, d]) with MLP outputs y + skip change + δ."""
        from transformers import AttentionInterface

        deltas = deltas or {}
        state, rm = self.state, self.rm
        inputs: list[torch.Tensor] = [None] * rm.n_layers

        def mlp_hook(m: int):
            def hook(module, args, output):
                x = args[0][0]
                inputs[m] = x.detach().float()
                y = state.mlp_outputs[:, m].clone()
                i = rm._tc_index.get(m)
                if i is not None and rm.transcoder.cfg.skip_connection:
                    y += rm.raw_skip(i, x) - rm.raw_skip(i, state.mlp_inputs[:, m])
                if m in deltas:
                    y += deltas[m]
                return y[None].to(output.dtype)

            return hook

        def embed_hook(module, args, kwargs):
            if embedding_scale is None:
                return None
            h = args[0] if args else kwargs["hidden_states"]
            h = h * embedding_scale[None, :, None].to(h.dtype)
            return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

        AttentionInterface.register("clt_test_replay", self._replay_attention)
        config = self.model.config
        saved = config._attn_implementation
        handles = [n.register_forward_hook(self._replay_norm) for n in self.norms]
        handles += [mlp.register_forward_hook(mlp_hook(m)) for m, mlp in enumerate(self.mlps)]
        handles.append(self.first_block.register_forward_pre_hook(embed_hook, with_kwargs=True))
        try:
            config._attn_implementation = "clt_test_replay"
            with torch.no_grad():
                logits = self.model(input_ids=self.ids[None], use_cache=False).logits[0].float()
        finally:
            config._attn_implementation = saved
            for h in handles:
                h.remove()
        return logits, inputs

    def target_values(self, graph: Graph, logits: torch.Tensor, inputs: list[torch.Tensor]) -> torch.Tensor:
        """Each graph row's target: feature pre-activations, then logit − mean logit [rows]."""
        tc, rm = self.rm.transcoder, self.rm
        values = []
        for layer, pos, feature in graph.features.tolist():
            i = rm._tc_index[layer]
            x = (inputs[layer][pos] - tc.input_mean[i]) / tc.input_std[i]
            values.append(float((x @ tc.W_enc[i, feature] + tc.b_enc[i, feature]).detach()))
        last = logits[-1]
        values += (last[graph.logit_token_ids] - last.mean()).tolist()
        return torch.tensor(values)

    def ablation(self, graph: Graph, source: int) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
        """MLP-output changes (or embedding scales) that remove one source node."""
        node, rm, n = graph.node(source), self.rm, len(self.ids)
        if node.kind == "token":
            scale = torch.ones(n)
            scale[node.pos] = 0
            return {}, scale
        if node.kind == "error":
            delta = torch.zeros(n, rm.layout.d_model)
            delta[node.pos] = -self.state.errors[node.pos, node.layer]
            return {node.layer: delta}, None
        i = rm._tc_index[node.layer]
        decoder = rm.raw_decoder(i, torch.tensor([node.feature]))[0].detach()  # [J, d]
        deltas = {}
        for j in range(decoder.shape[0]):
            delta = torch.zeros(n, rm.layout.d_model)
            delta[node.pos] = -node.activation * decoder[j]
            deltas[rm.layers[i + j]] = delta
        return deltas, None

    def all_sources_removed(self, graph: Graph) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run with every feature, error and embedding removed: only constant terms remain."""
        state, rm = self.state, self.rm
        deltas = {m: -state.errors[:, m].clone() for m in range(rm.n_layers)}
        for i, _m in enumerate(rm.layers):
            decoder = rm.raw_decoder(i).detach()  # [F, J, d]
            for j in range(decoder.shape[1]):
                deltas[rm.layers[i + j]] -= state.activations[:, i] @ decoder[:, j]
        return self.run(deltas, torch.zeros(len(self.ids)))


def _graph_rows(graph: Graph) -> torch.Tensor:
    """Row indices of the graph's targets: feature rows then logit rows."""
    return torch.cat([torch.arange(graph.n_features), torch.arange(graph.logit_slice.start, graph.n_nodes)])


CASES = {
    "clt-relu": dict(cross_layer=True, activation_fn="relu"),
    "plt-jumprelu": dict(cross_layer=False, activation_fn="jumprelu"),
    "clt-skip": dict(cross_layer=True, activation_fn="relu", skip_connection=True),
    "plt-skip": dict(cross_layer=False, activation_fn="jumprelu", skip_connection=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_replacement_logits_equal_the_model(tiny, case):
    name, model, tokenizer = tiny
    rm = ReplacementModel(model, random_transcoder(model, **CASES[case]), tokenizer)
    state = rm.prepare(PROMPT)
    assert state.activations.count_nonzero() > 0
    assert (rm(PROMPT) - state.logits).abs().max() <= 1e-4


def _hook_inventory(model: nn.Module) -> list[tuple]:
    """Every module's hook ids and whether its forward is patched (transformers may hold hooks)."""
    return [
        (name, list(m._forward_hooks), list(m._forward_pre_hooks), "forward" in m.__dict__)
        for name, m in model.named_modules()
    ]


def test_model_is_restored_after_attribution(tiny_llama):
    model, tokenizer = tiny_llama
    ids = torch.tensor(tokenizer(PROMPT)["input_ids"])
    with torch.no_grad():
        before = model(input_ids=ids[None]).logits
    impl = model.config._attn_implementation
    grads = [p.requires_grad for p in model.parameters()]
    hooks = _hook_inventory(model)
    attribute(PROMPT, model, random_transcoder(model), tokenizer=tokenizer, progress=False)
    assert model.config._attn_implementation == impl
    assert [p.requires_grad for p in model.parameters()] == grads
    assert _hook_inventory(model) == hooks
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids[None]).logits, before)


@pytest.mark.parametrize("case", list(CASES))
def test_rows_sum_to_targets_minus_constants(tiny, case):
    """Σ row + constant terms = target (pre-activation, or logit − mean logit), all rows."""
    name, model, tokenizer = tiny
    rm = ReplacementModel(model, random_transcoder(model, **CASES[case]), tokenizer)
    graph = attribute(PROMPT, rm, zero_bos=False, max_n_logits=5, desired_logit_prob=1.0, progress=False)
    assert graph.n_features > 20 and graph.n_logits == 5
    oracle = LinearOracle(rm, torch.tensor(graph.token_ids))
    targets = oracle.target_values(graph, *oracle.run())
    torch.testing.assert_close(
        targets[: graph.n_features],
        oracle.state.preactivations[graph.features[:, 1], graph.features[:, 0], graph.features[:, 2]],
        rtol=1e-5,
        atol=1e-5,
    )
    constants = oracle.target_values(graph, *oracle.all_sources_removed(graph))
    sums = graph.adjacency[_graph_rows(graph)].sum(1)
    scale = targets.abs().max()
    assert ((sums + constants - targets).abs() / scale).max() <= 1e-4


def test_without_biases_the_only_constant_is_the_encoder_bias(tiny_llama):
    model, tokenizer = tiny_llama
    assert not any(n.endswith("bias") for n, _ in model.named_parameters())
    tc = random_transcoder(model, output_bias=False)
    graph = attribute(
        PROMPT, model, tc, tokenizer=tokenizer, zero_bos=False, max_n_logits=4, desired_logit_prob=1.0, progress=False
    )
    folded = tc.fold_normalization()
    layers, positions, features = graph.features.unbind(1)
    z = ReplacementModel(model, tc, tokenizer).prepare(graph.token_ids).preactivations
    expected = torch.cat(
        [z[positions, layers, features] - folded.b_enc[layers, features], z.new_tensor(0).new_zeros(0)]
    )
    sums = graph.adjacency[_graph_rows(graph)].sum(1)
    torch.testing.assert_close(sums[: graph.n_features], expected.detach(), rtol=1e-4, atol=1e-5)
    logits = ReplacementModel(model, tc, tokenizer).prepare(graph.token_ids).logits[-1]
    torch.testing.assert_close(
        sums[graph.n_features :], logits[graph.logit_token_ids] - logits.mean(), rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("case", list(CASES))
def test_edges_equal_the_effect_of_removing_their_source(tiny, case):
    """Finite differences in the (exactly affine) oracle: removing a source changes each target
    by the edge weight."""
    name, model, tokenizer = tiny
    rm = ReplacementModel(model, random_transcoder(model, **CASES[case]), tokenizer)
    graph = attribute(PROMPT, rm, zero_bos=False, max_n_logits=3, desired_logit_prob=1.0, batch_size=7, progress=False)
    oracle = LinearOracle(rm, torch.tensor(graph.token_ids))
    clean = oracle.target_values(graph, *oracle.run())
    rows = _graph_rows(graph)
    gen = torch.Generator().manual_seed(0)
    feature_sources = torch.randperm(graph.n_features, generator=gen)[:6].tolist()
    error_sources = [graph.error_slice.start + i for i in (1, graph.n_errors // 2, graph.n_errors - 2)]
    token_sources = [graph.token_slice.start, graph.token_slice.stop - 1]
    scale = clean.abs().max()
    checked = 0
    for source in feature_sources + error_sources + token_sources:
        ablated = oracle.target_values(graph, *oracle.run(*oracle.ablation(graph, source)))
        effect = clean - ablated
        edges = graph.adjacency[rows, source]
        assert ((effect - edges).abs() / scale).max() <= 1e-4, graph.node(source)
        checked += int(edges.abs().gt(1e-6).sum())
    assert checked > 20  # the check saw real edges, not only zeros


def test_batch_size_does_not_change_the_graph(tiny_llama):
    model, tokenizer = tiny_llama
    rm = ReplacementModel(model, random_transcoder(model), tokenizer)
    one = attribute(PROMPT, rm, batch_size=1, progress=False)
    many = attribute(PROMPT, rm, batch_size=50, progress=False)
    torch.testing.assert_close(one.adjacency, many.adjacency, rtol=1e-5, atol=1e-6)


def test_feature_budget_keeps_the_most_influential_features(tiny_llama):
    model, tokenizer = tiny_llama
    rm = ReplacementModel(model, random_transcoder(model), tokenizer)
    full = attribute(PROMPT, rm, progress=False)
    capped = attribute(PROMPT, rm, max_feature_nodes=10, batch_size=4, update_interval=1, progress=False)
    assert capped.n_features == 10 and capped.n_active_features == full.n_features
    for i in range(capped.n_features):  # rows of kept features equal the full graph's rows
        layer, pos, feature = capped.features[i].tolist()
        j = full.node_index(f"feature:{layer}:{pos}:{feature}")
        keep = [full.node_index(n.id) for n in capped.nodes]
        torch.testing.assert_close(capped.adjacency[i], full.adjacency[j, keep], rtol=1e-5, atol=1e-6)
    equal = attribute(PROMPT, rm, max_feature_nodes=full.n_features, progress=False)
    torch.testing.assert_close(equal.adjacency, full.adjacency, rtol=1e-5, atol=1e-6)


def test_bos_zeroing_removes_position_zero_sources(tiny_llama):
    model, tokenizer = tiny_llama
    graph = attribute(PROMPT, model, random_transcoder(model), tokenizer=tokenizer, progress=False)
    assert graph.token_ids[0] == tokenizer.bos_token_id
    assert (graph.features[:, 1] > 0).all()
    errors_at_bos = [graph.error_slice.start + m * graph.n_tokens for m in range(graph.n_layers)]
    assert graph.adjacency[:, errors_at_bos].abs().max() == 0


def test_exact_transcoder_scores_one_and_pruning_keeps_tokens_and_logits(relu_gpt2, exact_plt):
    model, tokenizer = relu_gpt2
    graph = attribute(PROMPT, model, exact_plt(model), tokenizer=tokenizer, progress=False)
    assert graph.adjacency[:, graph.error_slice].abs().max() < 1e-4 * graph.adjacency.abs().max()
    replacement, completeness = graph_scores(graph)
    assert replacement == pytest.approx(1.0, abs=1e-4)
    assert completeness == pytest.approx(1.0, abs=1e-4)
    noisy = attribute(PROMPT, model, random_transcoder(model), tokenizer=tokenizer, progress=False)
    assert graph_scores(noisy)[0] < 0.99  # a random transcoder leaves real error paths
    for g in (graph, noisy):
        for node_threshold, edge_threshold in ((0.8, 0.98), (0.1, 0.1), (0.0, 0.0)):
            result = prune(g, node_threshold, edge_threshold)
            assert result.node_mask[g.token_slice].all() and result.node_mask[g.logit_slice].all()
            assert not result.edge_mask[~result.node_mask].any()
            assert not result.edge_mask[:, ~result.node_mask].any()
        full = prune(g, 1.0, 1.0)
        assert full.node_mask[: g.n_features].any()
        default = prune(g)
        cumulative = default.cumulative_scores[: g.token_slice.start]
        boundary = cumulative[cumulative >= 0.8].min()
        assert (cumulative[default.node_mask[: g.token_slice.start]] <= boundary).all()


def test_graph_json_round_trip_and_bad_files(tiny_llama, tmp_path):
    model, tokenizer = tiny_llama
    graph = attribute(PROMPT, model, random_transcoder(model), tokenizer=tokenizer, progress=False)
    path = graph.save(tmp_path / "graph.json")
    loaded = Graph.load(path)
    for name in ("features", "activations", "adjacency", "logit_probabilities"):
        assert torch.equal(getattr(loaded, name), getattr(graph, name))
    assert loaded.tokens == graph.tokens and loaded.config == graph.config
    assert loaded.nodes == graph.nodes
    text = path.read_text()
    (tmp_path / "cut.json").write_text(text[: len(text) // 2])
    with pytest.raises(GraphFileError, match="truncated"):
        Graph.load(tmp_path / "cut.json")
    (tmp_path / "other.json").write_text('{"nodes": []}')
    with pytest.raises(GraphFileError, match="not a graph file"):
        Graph.load(tmp_path / "other.json")
    with pytest.raises(FileNotFoundError):
        Graph.load(tmp_path / "missing.json")


def test_graph_file_stores_the_adjacency_sparsely_and_reads_dense_version_1_files(tiny_llama, tmp_path):
    model, tokenizer = tiny_llama
    graph = attribute(PROMPT, model, random_transcoder(model), tokenizer=tokenizer, progress=False)
    data = graph.to_dict()
    adjacency = data["tensors"]["adjacency"]
    assert "nonzero_mask" in adjacency  # mostly zeros: a bit mask plus the nonzero values
    n_values = len(base64.b64decode(adjacency["data"])) // 4
    assert n_values == int((graph.adjacency != 0).sum()) < graph.adjacency.numel() // 2
    dense = {
        **data,
        "version": 1,
        "tensors": {
            **data["tensors"],
            "adjacency": {
                "dtype": "float32",
                "shape": list(graph.adjacency.shape),
                "data": base64.b64encode(graph.adjacency.numpy().astype("<f4").tobytes()).decode(),
            },
        },
    }
    assert torch.equal(Graph.from_dict(dense).adjacency, graph.adjacency)
    broken = {**data, "tensors": {**data["tensors"], "adjacency": {**adjacency, "data": adjacency["data"][:16]}}}
    with pytest.raises(GraphFileError, match="nonzero mask .* does not match"):
        Graph.from_dict(broken)


def test_neuronpedia_export_has_consistent_nodes_and_links(tiny_llama, tmp_path):
    model, tokenizer = tiny_llama
    graph = attribute(PROMPT, model, random_transcoder(model), tokenizer=tokenizer, progress=False)
    data = graph.to_neuronpedia_json(tmp_path / "np.json")
    ids = {n["node_id"] for n in data["nodes"]}
    assert len(ids) == len(data["nodes"])
    assert all(link["source"] in ids and link["target"] in ids for link in data["links"])
    kinds = [n["feature_type"] for n in data["nodes"]]
    assert kinds.count("embedding") == graph.n_tokens and kinds.count("logit") == graph.n_logits
    assert (tmp_path / "np.json").is_file()


def test_bad_inputs_give_clear_errors(tiny_llama):
    model, tokenizer = tiny_llama
    tc = random_transcoder(model)
    wrong = CrossLayerTranscoder(CLTConfig(num_features=4, num_layers=3, d_model=16))
    with pytest.raises(TranscoderMismatchError, match="does not fit the model"):
        ReplacementModel(model, wrong, tokenizer)
    rm = ReplacementModel(model, tc, tokenizer)
    with pytest.raises(ValueError, match="prompt is empty"):
        attribute("  ", rm, progress=False)
    with pytest.raises(ValueError, match="context is 256"):
        attribute(list(range(5, 305)), rm, progress=False)
    with pytest.raises(ValueError, match="must lie in"):
        attribute([1, 2, 100_000], rm, progress=False)
    with pytest.raises(ValueError, match="max_n_logits"):
        attribute(PROMPT, rm, max_n_logits=0, progress=False)
    with pytest.raises(TypeError, match="batch_sise"):
        AttributionConfig(batch_sise=3)


@pytest.mark.slow
def test_replacement_logits_on_smollm2(smollm2):
    model, tokenizer = smollm2
    rm = ReplacementModel(model, random_transcoder(model, num_features=32), tokenizer)
    state = rm.prepare("The capital of France is")
    assert (rm(state.input_ids, state=state) - state.logits).abs().max() <= 1e-4


def test_a_transcoder_covering_some_layers(tiny_llama):
    """Layers 0 and 2 of 3: layer 1's MLP output is all error; logits and row sums still hold."""
    model, tokenizer = tiny_llama
    full = random_transcoder(model)
    tc = CrossLayerTranscoder(CLTConfig(num_features=12, num_layers=2, d_model=32, activation_fn="relu", layers=[0, 2]))
    with torch.no_grad():
        tc.W_enc.copy_(full.W_enc[[0, 2]])
        tc.b_enc.copy_(full.b_enc[[0, 2]])
        tc.W_dec[0].copy_(full.W_dec[0][:, [0, 2]])
        tc.W_dec[1].copy_(full.W_dec[2])
        tc.set_normalization(
            full.input_mean[[0, 2]], full.input_std[[0, 2]], full.output_mean[[0, 2]], full.output_std[[0, 2]]
        )
    rm = ReplacementModel(model, tc.eval(), tokenizer)
    state = rm.prepare(PROMPT)
    assert (rm(PROMPT) - state.logits).abs().max() <= 1e-4
    graph = attribute(PROMPT, rm, zero_bos=False, max_n_logits=3, desired_logit_prob=1.0, progress=False)
    assert set(graph.features[:, 0].tolist()) == {0, 2}
    oracle = LinearOracle(rm, torch.tensor(graph.token_ids))
    targets = oracle.target_values(graph, *oracle.run())
    constants = oracle.target_values(graph, *oracle.all_sources_removed(graph))
    sums = graph.adjacency[_graph_rows(graph)].sum(1)
    assert ((sums + constants - targets).abs() / targets.abs().max()).max() <= 1e-4
