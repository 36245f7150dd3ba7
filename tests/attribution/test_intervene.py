"""Interventions against plain PyTorch forward hooks that add the same decoder writes, and against
the attribution graph's edges (direct effects)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from helpers import random_transcoder
from test_attribution import PROMPT

from clt.attribution import ReplacementModel, attribute, intervene, intervention_effects


@pytest.fixture(scope="module")
def setup(tiny_llama):
    model, tokenizer = tiny_llama
    rm = ReplacementModel(model, random_transcoder(model, cross_layer=True), tokenizer)
    state = rm.prepare(PROMPT)
    return rm, state


def _hooked_logits(rm, ids, deltas):
    """Model logits with `deltas[m]` [n, d] added to layer m's MLP output (plain forward hooks)."""
    mlps = [rm.model.get_submodule(p) for p in rm.layout.mlp_paths]
    handles = [
        mlps[m].register_forward_hook(lambda mod, args, out, d=d: out + d[None].to(out.dtype))
        for m, d in deltas.items()
    ]
    try:
        with torch.no_grad():
            return rm.model(input_ids=ids[None]).logits[0].float()
    finally:
        for h in handles:
            h.remove()


def test_setting_features_to_their_own_values_changes_nothing(setup):
    rm, state = setup
    layer = 0
    pos, feature = (state.activations[:, layer] > 0).nonzero()[0].tolist()
    value = float(state.activations[pos, layer, feature])
    variants = [
        {"constant_errors": True},
        {},
        {"freeze_attention": True},
        {"freeze_attention": True, "constrained_layers": "all"},
        {"constrained_layers": [1]},
    ]
    for options in variants:
        result = intervene(rm, None, PROMPT, [(layer, pos, feature, value)], **options)
        torch.testing.assert_close(result.logits, state.logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(result.preactivations, state.preactivations, rtol=0, atol=1e-5)
        assert [t[1] for t in result.top_tokens] == [t[1] for t in result.original_top_tokens]


def test_ablating_a_cross_layer_feature_matches_hooks(setup):
    """Zeroing a layer-0 feature removes its decoder writes to every later layer, nothing else."""
    rm, state = setup
    pos, feature = (state.activations[:, 0] > 0).nonzero()[-1].tolist()
    a = float(state.activations[pos, 0, feature])
    decoder = rm.raw_decoder(0, torch.tensor([feature]))[0].detach()  # [L, d]
    deltas = {}
    for m in range(rm.n_layers):
        delta = torch.zeros(len(state.input_ids), rm.layout.d_model)
        delta[pos] = -a * decoder[m]
        deltas[m] = delta
    expected = _hooked_logits(rm, state.input_ids, deltas)
    result = intervene(rm, None, PROMPT, [(0, pos, feature, 0.0)])
    torch.testing.assert_close(result.logits, expected, rtol=0, atol=1e-5)
    assert (result.logits - state.logits).abs().max() > 1e-4  # the intervention did something
    assert result.activations[pos, 0, feature] == 0
    scaled = intervene(rm, None, PROMPT, [(0, pos, feature, 0.0)], mode="scale")
    torch.testing.assert_close(scaled.logits, result.logits)


def test_constant_errors_intervention_is_the_local_replacement_model(setup):
    """With constant errors, a last-layer edit changes only the last MLP output, by Δa · W_dec."""
    rm, state = setup
    last = rm.n_layers - 1
    pos, feature = (state.activations[:, last] > 0).nonzero()[0].tolist()
    a = float(state.activations[pos, last, feature])
    delta = torch.zeros(len(state.input_ids), rm.layout.d_model)
    delta[pos] = a * rm.raw_decoder(last, torch.tensor([feature]))[0, 0].detach()  # doubled: +a
    expected = _hooked_logits(rm, state.input_ids, {last: delta})
    result = intervene(rm, None, PROMPT, [(last, pos, feature, 2.0)], mode="scale", constant_errors=True)
    torch.testing.assert_close(result.logits, expected, rtol=0, atol=1e-5)


def test_bad_interventions_are_rejected(setup):
    rm, state = setup
    with pytest.raises(ValueError, match="mode must be one of"):
        intervene(rm, None, PROMPT, [], mode="double")
    with pytest.raises(ValueError, match="not covered"):
        intervene(rm, None, PROMPT, [(9, 0, 0, 1.0)])
    with pytest.raises(ValueError, match="out of range"):
        intervene(rm, None, PROMPT, [(0, 0, 10_000, 1.0)])
    with pytest.raises(ValueError, match="position 99 is out of range"):
        intervene(rm, None, PROMPT, [(0, 99, 0, 1.0)])
    with pytest.raises(ValueError, match=r"\(layer, pos, feature, value\)"):
        intervene(rm, None, PROMPT, [(0, 1)])
    with pytest.raises(ValueError, match="constrained_layers must be model layers"):
        intervene(rm, None, PROMPT, [(0, 1, 0, 1.0)], constrained_layers=[0, 99])
    with pytest.raises(ValueError, match="constrained_layers must be None, 'all'"):
        intervene(rm, None, PROMPT, [(0, 1, 0, 1.0)], constrained_layers="every")
    with pytest.raises(ValueError, match="choose one"):
        intervene(rm, None, PROMPT, [(0, 1, 0, 1.0)], constrained_layers="all", constant_errors=True)
    with pytest.raises(ValueError, match="positions slice\\(-99"):
        intervene(rm, None, PROMPT, [(0, slice(-99, None), 0, 1.0)])
    with pytest.raises(ValueError, match="positive step"):
        intervene(rm, None, PROMPT, [(0, slice(0, None, -1), 0, 1.0)])


def _iterative_oracle(rm, ids, plan, mode):
    """Logits of the model with forward hooks on its MLPs that encode the live input, apply `plan`
    {model layer: [(pos, feature, value)]} in `mode` and add Δa · W_dec to this and later layers."""
    tc, L = rm.transcoder, rm.transcoder.cfg.num_layers
    pending = torch.zeros(L, len(ids), rm.layout.d_model)

    def hook(i, module, args, out):
        x = args[0][0].float()
        z = ((x - tc.input_mean[i]) / tc.input_std[i]) @ tc.W_enc[i].T.float() + tc.b_enc[i]
        a = torch.relu(z)
        for pos, feature, value in plan.get(rm.layers[i], []):
            new = {"set": value, "scale": a[pos, feature] * value, "add": a[pos, feature] + value}[mode]
            dec = rm.raw_decoder(i, torch.tensor([feature]))[0]  # [J, d]
            pending[i : i + len(dec), pos] += (new - a[pos, feature]) * dec
        return out + pending[i][None].to(out.dtype)

    handles = [
        rm.model.get_submodule(rm.layout.mlp_paths[m]).register_forward_hook(lambda mod, a, o, i=i: hook(i, mod, a, o))
        for i, m in enumerate(rm.layers)
    ]
    try:
        with torch.no_grad():
            return rm.model(input_ids=ids[None]).logits[0].float()
    finally:
        for h in handles:
            h.remove()


@pytest.fixture(scope="module")
def each_tiny(tiny):
    _, model, tokenizer = tiny
    rm = ReplacementModel(model, random_transcoder(model, cross_layer=True), tokenizer)
    return rm, rm.prepare(PROMPT)


@pytest.mark.parametrize("mode", ["set", "scale", "add"])
def test_iterative_patching_equals_hooks_that_follow_the_live_features(each_tiny, mode):
    """Interventions at two layers: the second's Δa is taken against the features the first changed."""
    rm, state = each_tiny
    (p0, f0), (p1, f1) = (
        (state.activations[:, 0] > 0).nonzero()[0].tolist(),
        (state.activations[:, 1] > 0).nonzero()[-1].tolist(),
    )
    value = {"set": 3.0, "scale": 4.0, "add": -2.5}[mode]
    plan = {rm.layers[0]: [(p0, f0, value)], rm.layers[1]: [(p1, f1, value)]}
    expected = _iterative_oracle(rm, state.input_ids, plan, mode)
    items = [(m, p, f, v) for m, entries in plan.items() for p, f, v in entries]
    result = intervene(rm, None, PROMPT, items, mode=mode)
    assert (expected - state.logits).abs().max() > 1e-3  # the oracle's edit shows
    torch.testing.assert_close(result.logits, expected, rtol=0, atol=2e-5)
    assert result.preactivations.shape == result.activations.shape == state.activations.shape


@pytest.fixture(scope="module", params=["tiny-llama-clt", "tiny-gpt2-clt", "tiny-llama-plt-skip"])
def direct_case(request):
    """(float32 replacement model, its float64 copy, graph) with decoders large enough to matter."""
    from clt.nnsight.loading import load_model

    name, kind = request.param.rsplit("-", 1)[0].replace("-plt", ""), request.param.split("-", 2)[-1]
    model, tokenizer = load_model(name)
    options = {"cross_layer": kind == "clt", "skip_connection": kind == "plt-skip", "decoder_scale": 0.3}
    rm = ReplacementModel(model, random_transcoder(model, **options), tokenizer)
    rm64 = ReplacementModel(copy.deepcopy(model).double(), copy.deepcopy(rm.transcoder).double(), tokenizer)
    return rm, rm64, attribute(PROMPT, rm, progress=False)


def _check_direct_effects(rm64, graph, sources, delta=1e-2) -> float:
    """Scale each source by 1 + δ in the float64 model (frozen attention, every layer constrained)
    and check every target moves by δ · A[t, s] (tolerance: `test_direct_effects_equal_the_graph_edges`);
    returns the largest relative error on the edges held to 1e-4."""
    options = {"mode": "scale", "freeze_attention": True, "constrained_layers": "all"}
    A, worst, checked = graph.adjacency, 0.0, 0
    for s in sources:
        layer, pos, feature = graph.features[s].tolist()
        change = [(layer, pos, feature, 1 + delta)]
        result = intervene(rm64, None, graph.token_ids, change, **options)
        base = intervene(rm64, None, graph.token_ids, [(layer, pos, feature, 1.0)], **options)  # float64 reference
        base = {"original_logits": base.logits, "original_preactivations": base.preactivations}
        effects = intervention_effects(graph, dataclasses.replace(result, **base))
        rows = torch.tensor([graph.node_index(i) for i in effects.node_ids])
        torch.testing.assert_close(effects.predicted, delta * A[rows, s].double(), rtol=1e-4, atol=0)  # Δa/a ≈ δ
        assert effects.kinds[-1] == "logit"
        largest = float(effects.predicted.abs().max())
        if largest == 0:  # a last-layer source writes to no feature; its logit edges may vanish too
            assert effects.measured.abs().max() <= 1e-12
            continue
        err = (effects.measured - effects.predicted).abs()
        relative = effects.predicted.abs() >= 1e-3 * largest
        bound = torch.where(relative, 1e-4 * effects.predicted.abs(), torch.full_like(err, 1e-7 * largest))
        assert (err <= bound).all(), effects.to_frame()[(err > bound).numpy()]
        worst = max(worst, float((err[relative] / effects.predicted[relative].abs()).max()))
        checked += int(relative.sum())
    assert checked > 50
    return worst


def test_direct_effects_equal_the_graph_edges(direct_case):
    """Frozen attention, every layer constrained: scaling a feature by 1 + δ moves every downstream
    feature's pre-activation and every logit minus the mean logit by δ · A[t, s].

    Tolerance: 1e-4 relative for every edge at least 1e-3 of the source's largest edge, and 1e-7 of
    the largest edge absolutely for the rest. The graph is computed in float32: an edge is a sum of
    products whose rounding is a few eps32 (1.2e-7) of the magnitudes along its paths, about the
    largest edge's, so relative precision goes where an edge is far smaller (measured: ≤ 2e-5
    relative on edges ≥ 1e-2 of the largest). The intervention runs in float64 against an
    unchanged float64 pass (the clean state is float32), so its own rounding is ~1e-16 relative."""
    rm, rm64, graph = direct_case
    worst = _check_direct_effects(rm64, graph, torch.linspace(0, graph.n_features - 1, 6).long().unique().tolist())
    print(f"direct effects: max relative error {worst:.2e}")


@pytest.mark.slow
def test_direct_effects_equal_the_graph_edges_on_smollm2(smollm2):
    """As on the tiny models, through SmolLM2's 30 layers (measured: ≤ 2.3e-5 relative)."""
    model, tokenizer = smollm2
    rm = ReplacementModel(model, random_transcoder(model, num_features=32, cross_layer=True), tokenizer)
    graph = attribute("The capital of France is", rm, max_feature_nodes=64, max_n_logits=4, progress=False)
    rm64 = ReplacementModel(copy.deepcopy(model).double(), copy.deepcopy(rm.transcoder).double(), tokenizer)
    worst = _check_direct_effects(rm64, graph, [0, 20, 40, 63])
    print(f"SmolLM2 direct effects: max relative error {worst:.2e}")


def test_without_constraints_the_graph_misses_indirect_effects(direct_case):
    """The same change with MLPs and attention free moves the targets differently (iterative)."""
    rm, _, graph = direct_case
    layer, pos, feature = graph.features[0].tolist()
    effects = intervention_effects(graph, intervene(rm, None, PROMPT, [(layer, pos, feature, 0.0)], mode="scale"))
    assert (effects.measured - effects.predicted).abs().max() > 1e-3 * effects.predicted.abs().max()
