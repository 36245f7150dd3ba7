"""Generation with interventions against transformers' `generate`, a planted feature, and itself without the cache."""

from __future__ import annotations

import pytest
import torch
from helpers import random_transcoder
from test_attribution import PROMPT

from clt.attribution import ReplacementModel, generate, intervene

STEPS = 12


@pytest.fixture(scope="module")
def rm(tiny):
    _, model, tokenizer = tiny
    return ReplacementModel(model, random_transcoder(model, cross_layer=True), tokenizer)


def test_without_interventions_greedy_decoding_is_transformers_generate(rm):
    result = generate(rm, None, PROMPT, max_new_tokens=STEPS)
    ids = torch.tensor([result.prompt_ids])
    with torch.no_grad():
        expected = rm.model.generate(ids, max_new_tokens=STEPS, do_sample=False)[0].tolist()
    assert result.token_ids == expected
    assert len(result.new_ids) == len(result.logits) >= 2
    assert result.activations.shape[0] == len(result.token_ids) - 1


@pytest.mark.slow
def test_greedy_decoding_is_transformers_generate_on_smollm2(smollm2):
    model, tokenizer = smollm2
    rm = ReplacementModel(model, random_transcoder(model, num_features=16, cross_layer=True), tokenizer)
    result = generate(rm, None, "The capital of France is", max_new_tokens=16)
    with torch.no_grad():
        expected = model.generate(torch.tensor([result.prompt_ids]), max_new_tokens=16, do_sample=False)[0].tolist()
    assert result.token_ids == expected


def _planted(rm, feature: int = 3):
    """The transcoder with one last-layer feature whose decoder writes a direction v, and the token
    the model predicts once v dominates the residual stream (the final norm is scale-invariant)."""
    tc = random_transcoder(rm.model, cross_layer=False)
    last = tc.cfg.num_layers - 1
    v = torch.randn(rm.layout.d_model, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        tc.W_dec[last][feature, 0] = v / tc.output_std[last]
        final = rm.model.get_submodule(rm.layout.final_norm_path)
        target = int(rm.model.get_output_embeddings()(final(1e4 * v[None]))[0].argmax())
    return ReplacementModel(rm.model, tc, rm.tokenizer), rm.layers[last], feature, target


def test_clamping_a_planted_feature_steers_every_generated_token(rm):
    planted, layer, feature, target = _planted(rm)
    n = len(generate(planted, None, PROMPT, max_new_tokens=1).prompt_ids)
    free = generate(planted, None, PROMPT, max_new_tokens=STEPS, stop_at_eos=False)
    assert free.new_ids != [target] * STEPS
    steered = generate(
        planted, None, PROMPT, [(layer, slice(n - 1, None), feature, 1e4)], max_new_tokens=STEPS, stop_at_eos=False
    )
    assert steered.new_ids == [target] * STEPS
    assert (steered.activations[n - 1 :, -1, feature] == 1e4).all()
    only_prompt = generate(planted, None, PROMPT, [(layer, n - 1, feature, 1e4)], max_new_tokens=3, stop_at_eos=False)
    assert only_prompt.new_ids[0] == target and (only_prompt.activations[n:, -1, feature] != 1e4).all()


@pytest.mark.parametrize("mode", ["set", "add"])
def test_the_kv_cache_gives_the_tokens_of_full_reruns(rm, mode):
    n = len(generate(rm, None, PROMPT, max_new_tokens=1).prompt_ids)
    steer = [(rm.layers[0], slice(2, None), 1, 4.0), (rm.layers[-1], slice(n - 1, None), 5, -3.0)]
    options = {"mode": mode, "max_new_tokens": STEPS, "stop_at_eos": False}
    cached = generate(rm, None, PROMPT, steer, **options)
    rerun = generate(rm, None, PROMPT, steer, use_cache=False, **options)
    assert cached.new_ids == rerun.new_ids
    torch.testing.assert_close(cached.logits, rerun.logits, rtol=0, atol=1e-4)
    torch.testing.assert_close(cached.activations, rerun.activations, rtol=0, atol=1e-4)
    plain = generate(rm, None, PROMPT, **options)
    assert (cached.logits - plain.logits).abs().max() > 1e-2  # the steering acts


def test_each_new_token_runs_alone_on_the_cache(rm):
    """The model sees the prompt once, then one token per pass (not the whole sequence again)."""
    lengths = []
    embed = rm.model.get_input_embeddings()
    handle = embed.register_forward_hook(lambda module, args, out: lengths.append(args[0].shape[-1]))
    try:
        result = generate(
            rm, None, PROMPT, [(rm.layers[0], slice(1, None), 1, 4.0)], max_new_tokens=6, stop_at_eos=False
        )
    finally:
        handle.remove()
    n = len(result.prompt_ids)
    assert lengths[-6:] == [n, 1, 1, 1, 1, 1]  # after `prepare`'s clean pass of the prompt


def test_sampling_is_reproducible_with_a_seed(rm):
    options = {"max_new_tokens": STEPS, "do_sample": True, "temperature": 2.0, "top_k": 50, "stop_at_eos": False}
    first = generate(rm, None, PROMPT, seed=3, **options)
    assert generate(rm, None, PROMPT, seed=3, **options).new_ids == first.new_ids
    assert generate(rm, None, PROMPT, seed=3, use_cache=False, **options).new_ids == first.new_ids
    assert any(generate(rm, None, PROMPT, seed=s, **options).new_ids != first.new_ids for s in (4, 5, 6))
    nucleus = generate(rm, None, PROMPT, seed=3, **{**options, "top_k": None, "top_p": 1e-6})
    assert nucleus.new_ids == generate(rm, None, PROMPT, max_new_tokens=STEPS, stop_at_eos=False).new_ids


def test_frozen_generation_and_bad_options(rm):
    for options in ({"freeze_attention": True}, {"freeze_attention": True, "constrained_layers": "all"}):
        frozen = generate(
            rm, None, PROMPT, [(rm.layers[0], -1, 0, 2.0)], max_new_tokens=3, stop_at_eos=False, **options
        )
        first = intervene(rm, None, PROMPT, [(rm.layers[0], -1, 0, 2.0)], **options)
        torch.testing.assert_close(frozen.logits[0], first.logits[-1])  # the prompt's pass is `intervene`'s
        assert len(frozen.new_ids) == 3
    with pytest.raises(ValueError, match="use_cache"):
        generate(rm, None, PROMPT, [(rm.layers[0], -1, 0, 2.0)], freeze_attention=True, use_cache=False)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(rm, None, PROMPT, max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        generate(rm, None, PROMPT, do_sample=True, top_p=0.0)
    with pytest.raises(ValueError, match="context"):
        generate(rm, None, PROMPT, max_new_tokens=10**6)
