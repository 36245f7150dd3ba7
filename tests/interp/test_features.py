"""Feature cards against brute-force encoding of the whole store."""

from __future__ import annotations

import pytest
import torch
from helpers import cards_with_logits, saved_store, standardised_transcoder

from clt.config.transcoder import CLTConfig
from clt.interp import FeatureCards, build_feature_cards, output_logit_effects, unembedding_of
from clt.models.transcoder import CrossLayerTranscoder, UnsupportedDictionaryError


@pytest.fixture(scope="module")
def setup(tiny_llama, tmp_path_factory):
    model, tokenizer = tiny_llama
    store = saved_store(model, tokenizer, tmp_path_factory.mktemp("store"), 700, shard_tokens=256)
    tc = standardised_transcoder(store, num_features=8, activation_fn="relu")
    with torch.no_grad():
        tc.b_enc.fill_(-0.5)
    return store, tc.eval(), model, tokenizer


def _all_activations(store, tc):
    inputs = torch.cat([store.shard(i)["inputs"] for i in range(len(store.shards))]).float()
    token_ids = torch.cat([store.shard(i)["token_ids"] for i in range(len(store.shards))])
    with torch.no_grad():
        return tc.encode(inputs), token_ids


def test_cards_match_brute_force(setup):
    store, tc, model, tokenizer = setup
    assert len(store.shards) > 1
    acts, token_ids = _all_activations(store, tc)
    unembedding, norm_weight = unembedding_of(model)
    cards = cards_with_logits(tc, store, model, tokenizer, top_k=5, batch_size=100)
    firing = [(lay, f) for lay, f in (acts > 0).any(0).nonzero().tolist()]
    assert sorted(cards) == sorted(f"{lay}/{f}" for lay, f in firing) and len(firing) > 0
    for layer, feature in firing[:6]:
        card = cards.card(layer, feature)
        column = acts[:, layer, feature]
        values, rows = column.topk(5)
        positive = values > 0
        assert [c.activation for c in card.contexts] == pytest.approx(values[positive].tolist(), rel=1e-5)
        assert card.density == pytest.approx(float((column > 0).float().mean()))
        assert sum(card.histogram) == int((column > 0).sum())
        assert card.max_activation == pytest.approx(float(column.max()), rel=1e-5)
        for ctx, row in zip(card.contexts, rows[positive].tolist()):
            assert ctx.tokens[ctx.focus] == tokenizer.decode([int(token_ids[row])])
            assert ctx.activations[ctx.focus] == pytest.approx(float(column[row]), abs=1e-4)
            assert len(ctx.tokens) <= 7
        decoder = sum(tc.W_dec[layer][feature, j] * tc.output_std[layer + j] for j in range(tc.W_dec[layer].shape[1]))
        effect = (decoder * norm_weight) @ unembedding.T
        effect = effect - effect.mean()
        top = effect.topk(4)
        assert [v for _, v in card.top_logits] == pytest.approx(top.values.tolist(), rel=1e-4, abs=1e-6)
        assert [t for t, _ in card.top_logits] == [tokenizer.decode([i]) for i in top.indices.tolist()]
        assert card.label


def test_cache_round_trip_and_reuse(setup, tmp_path, monkeypatch):
    store, tc, model, tokenizer = setup
    path = tmp_path / "cards.json"
    wanted = [(0, 1), (2, 3)]
    cards = build_feature_cards(
        tc, store, tokenizer, features=wanted, cache=path, progress=False, labeller=lambda card: f"feature {card.key}"
    )
    loaded = FeatureCards.load(path)
    assert loaded == cards and loaded.source == cards.source
    assert cards.card(2, 3).label == "feature 2/3"
    import clt.interp.features as features

    monkeypatch.setattr(features, "_scan", lambda *a, **k: pytest.fail("the cache was not used"))
    again = build_feature_cards(tc, store, tokenizer, features=wanted, cache=path, progress=False)
    assert again == cards
    monkeypatch.undo()
    other = CrossLayerTranscoder(tc.cfg.replace(seed=5)).eval()
    rebuilt = build_feature_cards(other, store, tokenizer, features=wanted, cache=path, progress=False)
    assert rebuilt.source != cards.source


def test_bad_inputs(setup, tmp_path):
    store, tc, model, tokenizer = setup
    with pytest.raises(ValueError, match="out of range"):
        build_feature_cards(tc, store, tokenizer, features=[(0, 99)], progress=False)
    wrong = CrossLayerTranscoder(CLTConfig(num_features=4, num_layers=2, d_model=store.d_model))
    with pytest.raises(ValueError, match="use the store it was trained on"):
        build_feature_cards(wrong, store, tokenizer, progress=False)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a feature-card file"):
        FeatureCards.load(tmp_path / "bad.json")
    with pytest.raises(KeyError, match="no card for layer 0 feature 7"):
        FeatureCards().card(0, 7)


@pytest.mark.parametrize("keep", [None, 0], ids=["one pass", "two passes"])
def test_histograms_match_brute_force(setup, monkeypatch, keep):
    """Activation histograms from the first pass's nonzeros, or (dense activations) a second pass."""
    from clt.interp import features

    store, tc, model, tokenizer = setup
    if keep is not None:
        monkeypatch.setattr(features, "_SCAN_KEEP", keep)
    acts, _ = _all_activations(store, tc)
    cards = build_feature_cards(tc, store, tokenizer, batch_size=100, progress=False)
    for key, card in cards.items():
        layer, feature = map(int, key.split("/"))
        column = acts[:, layer, feature]
        fired = column[column > 0]
        bins = (fired / column.max() * features.HISTOGRAM_BINS).long().clamp(0, features.HISTOGRAM_BINS - 1)
        assert card.histogram == torch.bincount(bins, minlength=features.HISTOGRAM_BINS).tolist(), key


def test_logit_effects_shape(setup):
    store, tc, model, tokenizer = setup
    unembedding, norm_weight = unembedding_of(model)
    effects = output_logit_effects(tc, unembedding, norm_weight)
    assert effects.shape == (tc.cfg.num_layers, tc.cfg.num_features, unembedding.shape[0])
    torch.testing.assert_close(effects.mean(-1), torch.zeros(effects.shape[:2]), atol=1e-5, rtol=0)
    pairs = [(1, 3), (0, 0), (1, 0), (tc.cfg.num_layers - 1, tc.cfg.num_features - 1)]
    subset = output_logit_effects(tc, unembedding, norm_weight, features=pairs)
    torch.testing.assert_close(subset, torch.stack([effects[lay, f] for lay, f in pairs]), atol=1e-5, rtol=1e-5)


def test_logit_effects_refuse_an_sae(setup):
    store, tc, model, tokenizer = setup
    sae = CrossLayerTranscoder(tc.cfg.replace(output_site="mlp_in", cross_layer=False, skip_connection=False))
    with pytest.raises(UnsupportedDictionaryError, match="this is an SAE"):
        output_logit_effects(sae, *unembedding_of(model))
