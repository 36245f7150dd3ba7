"""Feature labels: the over-representation rule, distinct labels, and the LLM labeller on a tiny model."""

from __future__ import annotations

import pytest
import torch

from clt.interp import FeatureCard, TermCounts, auto_label, is_stop_word, label_cards, label_report, llm_labeller
from clt.interp.features import Context
from clt.interp.labels import llm_prompt, ranked_terms

VOCAB = [" the", " list", " tuple", " is", " a", ".", " sequence", " of", " value"]


def card(contexts: list[list[tuple[str, float]]], promoted=(" sequence",), key=(0, 1)) -> FeatureCard:
    """A card whose contexts are (token, activation) lists; the focus is each context's top token."""
    built = []
    for tokens in contexts:
        acts = [a for _, a in tokens]
        focus = max(range(len(acts)), key=acts.__getitem__)
        built.append(Context([t for t, _ in tokens], acts, focus, acts[focus]))
    return FeatureCard(
        layer=key[0],
        feature=key[1],
        density=0.01,
        max_activation=max(c.activation for c in built),
        quantiles={},
        histogram=[1],
        bin_edges=[0.0, 1.0],
        contexts=built,
        top_logits=[(t, 1.0) for t in promoted],
        bottom_logits=[],
    )


@pytest.fixture
def counts() -> TermCounts:
    # a corpus where " the" is common and " tuple" rare
    text = [0, 1, 3, 4, 6, 5] * 30 + [0, 8, 5] * 30 + [2, 3, 4, 6, 5]
    ids = torch.tensor(text)
    return TermCounts.from_ids(ids, torch.zeros_like(ids), VOCAB.__getitem__)


def test_term_counts(counts):
    assert counts.unigrams[" the"] == 60 and counts.unigrams[" tuple"] == 1
    assert counts.bigrams[(" the", " list")] == 30 and counts.n_tokens == 275
    windows = torch.tensor([0, 0, 1, 1])
    split = TermCounts.from_ids(torch.tensor([0, 1, 0, 1]), windows, VOCAB.__getitem__)
    assert split.bigrams == {(" the", " list"): 2} and split.n_bigrams == 2  # no pair across windows
    assert counts.frequency((" tuple",)) < counts.frequency((" the",))


def test_rare_recurring_terms_beat_frequent_ones(counts):
    fires = card(
        [
            [(" the", 1.0), (" tuple", 2.0), (" is", 0.0)],
            [(" a", 0.0), (" tuple", 1.8), (".", 0.0)],
            [(" the", 1.5), (" value", 0.1)],
        ]
    )
    terms = ranked_terms(fires, counts)
    assert terms[0] == "tuple" and "the" not in terms  # a stop word alone is never a term
    label = auto_label(fires, counts)
    assert label.startswith("tuple") and label.endswith("→ sequence")
    assert not is_stop_word(label)


def test_a_stop_word_feature_gets_a_label_that_says_more(counts):
    the = card([[(" of", 0.0), (" the", 1.0)], [(" of", 0.0), (" the", 0.9)]], promoted=(".", " list"))
    label = auto_label(the, counts)
    assert label == "of the → list" and not is_stop_word(label)
    silent = card([[(".", 1.0)]], promoted=())
    assert auto_label(silent, counts) == "fires on “.”"


def test_label_cards_makes_labels_distinct(counts):
    contexts = [[(" a", 0.0), (" list", 1.0), (" is", 0.5)], [(" value", 1.0), (" of", 0.2)]]
    twins = [card(contexts, key=(0, k)) for k in range(3)]
    twins[1].top_logits = [(" sequence", 1.0), (" tuple", 0.5)]
    label_cards(twins, counts)
    labels = [c.label for c in twins]
    assert len(set(labels)) == 3, labels
    # twins 0 and 2 are the same card: only their names tell them apart
    assert [c.label.endswith(f"(0/{k})") for k, c in enumerate(twins)] == [True, False, True]
    report = label_report(labels + ["the", "."])
    assert report == {"n": 5, "distinct": 5, "single_stop_words": ["the", "."], "named": 2}


def test_is_stop_word():
    assert is_stop_word(" The ") and is_stop_word("...") and is_stop_word("\n")
    assert not is_stop_word("tuple") and not is_stop_word("of the")


def test_llm_labeller_with_the_tiny_model(tiny_llama):
    model, tokenizer = tiny_llama
    fires = card([[(" the", 1.0), (" tuple", 2.0)], [(" a", 0.5), (" <b>", 1.0)]])
    prompt = llm_prompt(fires)
    assert "[[ tuple]]" in prompt and "[[ <b>]]" in prompt and '"sequence"' in prompt
    labeller = llm_labeller(model, tokenizer, max_new_tokens=6)
    first = labeller(fires)
    assert first and len(first) <= 60 and "\n" not in first
    assert labeller(fires) == first  # greedy: the same answer twice
    by_name = llm_labeller("tiny-llama", max_new_tokens=6)
    assert isinstance(by_name(fires), str)
    with pytest.raises(ValueError, match="tokenizer"):
        llm_labeller(model)
