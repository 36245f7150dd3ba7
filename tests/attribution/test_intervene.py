"""Interventions against plain PyTorch forward hooks that add the same decoder writes."""

from __future__ import annotations

import pytest
import torch
from helpers import random_transcoder
from test_attribution import PROMPT

from clt.attribution import ReplacementModel, intervene


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
    for constant_errors in (False, True):
        result = intervene(rm, None, PROMPT, [(layer, pos, feature, value)], constant_errors=constant_errors)
        torch.testing.assert_close(result.logits, state.logits, rtol=0, atol=1e-5)
        assert result.top_tokens == result.original_top_tokens


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
        intervene(rm, None, PROMPT, [], mode="add")
    with pytest.raises(ValueError, match="not covered"):
        intervene(rm, None, PROMPT, [(9, 0, 0, 1.0)])
    with pytest.raises(ValueError, match="out of range"):
        intervene(rm, None, PROMPT, [(0, 0, 10_000, 1.0)])
    with pytest.raises(ValueError, match="position 99 is out of range"):
        intervene(rm, None, PROMPT, [(0, 99, 0, 1.0)])
    with pytest.raises(ValueError, match=r"\(layer, pos, feature, value\)"):
        intervene(rm, None, PROMPT, [(0, 1)])
