"""Feature labels: an offline rule that tells features apart, and an optional LLM labeller.

The rule (`auto_label`): a feature's *terms* are the tokens and adjacent token pairs at which it is
active in its top contexts. Each term gets a weight per context (the largest activation at which it
ends there, over the feature's maximum) summed over contexts (c), and a score c · log(p / q) with
p = c / (number of contexts) and q the term's frequency in the corpus the cards were built from
(`TermCounts`; add-one smoothing). So a term scores high when it recurs in the top contexts *and*
is rarer in the corpus: "the" in every context scores less than "tuple" in half of them. Single
stop words and punctuation are never terms on their own (pairs of them are). The label is the two
best terms that do not overlap, then "→" and the output token the decoder promotes most, e.g.
``"list · tuple → sequence"``. `label_cards` labels a set of cards so that no two share a label
(more terms, then more promoted tokens, then the feature's name).

`llm_labeller` asks any local transformers causal LM for a name instead.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from clt.interp.features import FeatureCard

logger = logging.getLogger(__name__)

LABEL_RULE = "terms-v2"
"""Name of the labelling rule (part of a card cache's fingerprint)."""
_STOP_TEXT = """a about above after again all also an and any are as at be been before being below between both
but by can could did do does doing down during each few for from further had has have having he her here hers
him his how i if in into is it its itself just me more most my no nor not now of off on once only or other our
out over own same she should so some such than that the their them then there these they this those through to
too under until up very was we were what when where which while who whom why will with would you your s t"""
STOP_WORDS = frozenset(_STOP_TEXT.split())
"""English function words: never a term on their own, and never a whole label."""
_WORD = re.compile(r"\w", re.UNICODE)
_NAMED = re.compile(r" \(\d+/\d+\)$")  # the suffix label_cards adds as a last resort


def is_stop_word(text: str) -> bool:
    """True for a stop word, punctuation or whitespace alone (case and spaces ignored)."""
    stripped = text.strip().lower()
    return stripped in STOP_WORDS or not _WORD.search(stripped)


@dataclasses.dataclass
class TermCounts:
    """How often each token and adjacent token pair (by decoded text) occurs in a corpus."""

    unigrams: Counter[str]
    bigrams: Counter[tuple[str, str]]
    n_tokens: int
    n_bigrams: int

    @classmethod
    def from_ids(cls, token_ids: torch.Tensor, window_ids: torch.Tensor, decode: Callable[[int], str]) -> TermCounts:
        """Counts over a store's token ids (pairs only within one window); `decode` maps an id to text."""
        ids, window = token_ids.long().flatten(), window_ids.long().flatten()
        texts: dict[int, str] = {}

        def text(i: int) -> str:
            if i not in texts:
                texts[i] = decode(i)
            return texts[i]

        unigrams: Counter[str] = Counter()
        for i, n in zip(*(t.tolist() for t in ids.unique(return_counts=True))):
            unigrams[text(i)] += n
        same = window[1:] == window[:-1]
        pairs = torch.stack([ids[:-1][same], ids[1:][same]], 1)
        bigrams: Counter[tuple[str, str]] = Counter()
        if len(pairs):
            unique, counts = pairs.unique(dim=0, return_counts=True)
            for (a, b), n in zip(unique.tolist(), counts.tolist()):
                bigrams[(text(a), text(b))] += n
        return cls(unigrams, bigrams, len(ids), int(same.sum()))

    def frequency(self, term: tuple[str, ...]) -> float:
        """Smoothed corpus frequency of a token (1-tuple) or token pair."""
        if len(term) == 1:
            return (self.unigrams.get(term[0], 0) + 1) / (self.n_tokens + len(self.unigrams) + 1)
        return (self.bigrams.get(term, 0) + 1) / (self.n_bigrams + len(self.bigrams) + 1)


def _shown(term: tuple[str, ...]) -> str:
    text = "".join(term).strip()
    return " ".join(text.split()) if text else repr("".join(term))


def ranked_terms(card: FeatureCard, counts: TermCounts | None = None) -> list[str]:
    """The card's terms (shown as text), best first (module docstring); without `counts`, ranked by
    their weight in the top contexts alone."""
    peak = max([card.max_activation, *(max(c.activations, default=0.0) for c in card.contexts)])
    if peak <= 0:
        return []
    weights: Counter[tuple[str, ...]] = Counter()
    for context in card.contexts:
        best: dict[tuple[str, ...], float] = {}
        for i, (token, act) in enumerate(zip(context.tokens, context.activations)):
            if act <= 0:
                continue
            terms = [(token,)] + ([(context.tokens[i - 1], token)] if i > 0 else [])
            for term in terms:
                best[term] = max(best.get(term, 0.0), act / peak)
        weights.update(best)
    n = max(len(card.contexts), 1)
    scored = []
    for term, c in weights.items():
        if (len(term) == 1 and is_stop_word(term[0])) or not _WORD.search("".join(term)):
            continue
        p = c / n
        score = c * math.log(p / counts.frequency(term)) if counts is not None else c
        if score > 0:
            scored.append((-score, _shown(term)))
    out: list[str] = []
    for _, text in sorted(scored):
        if text not in out:
            out.append(text)
    return out


def _promoted(card: FeatureCard) -> list[str]:
    """The card's promoted output tokens (shown as text), strongest first, punctuation and spaces left out."""
    return [_shown((t,)) for t, v in card.top_logits if v > 0 and _WORD.search(t)]


def _compose(terms: Sequence[str], promoted: Sequence[str], n_terms: int, n_promoted: int) -> str:
    chosen: list[str] = []
    for term in terms:
        low = term.lower()
        if not any(low in c.lower() or c.lower() in low for c in chosen):
            chosen.append(term)
        if len(chosen) == n_terms:
            break
    left = " · ".join(chosen)
    right = ", ".join(promoted[:n_promoted])
    if left and right:
        return f"{left} → {right}"
    return left or (f"→ {right}" if right else "")


def auto_label(card: FeatureCard, counts: TermCounts | None = None, *, n_terms: int = 2) -> str:
    """The rule's label of one card (module docstring); "(never fires)" for a feature without contexts."""
    label = _compose(ranked_terms(card, counts), _promoted(card), n_terms, 1)
    if label:
        return label
    if card.contexts:
        focus = Counter(_shown((c.tokens[c.focus],)) for c in card.contexts).most_common(1)[0][0]
        return f"fires on “{focus}”"
    return "(never fires)"


def label_cards(cards: Iterable[FeatureCard], counts: TermCounts | None = None) -> None:
    """Set every card's label with `auto_label`, extended until no two cards share a label."""
    cards = list(cards)
    ranked = [(ranked_terms(c, counts), _promoted(c)) for c in cards]
    steps = [(2, 1), (3, 1), (3, 2), (4, 3)]
    labels = [auto_label(c, counts) for c in cards]
    for n_terms, n_promoted in steps[1:]:
        clashing = _clashes(labels)
        if not clashing:
            break
        for i in clashing:
            labels[i] = _compose(*ranked[i], n_terms, n_promoted) or labels[i]
    for i in _clashes(labels):
        labels[i] = f"{labels[i]} ({cards[i].key})"
    for card, label in zip(cards, labels):
        card.label = label


def _clashes(labels: Sequence[str]) -> list[int]:
    counts = Counter(labels)
    return [i for i, label in enumerate(labels) if counts[label] > 1]


def label_report(labels: Sequence[str]) -> dict[str, Any]:
    """How many labels there are, how many distinct, which are a single stop word, and how many
    `label_cards` could only tell apart by the feature's name."""
    return {
        "n": len(labels),
        "distinct": len(set(labels)),
        "single_stop_words": [label for label in labels if is_stop_word(label)],
        "named": sum(bool(_NAMED.search(label)) for label in labels),
    }


# ----------------------------------------------------------------------------- LLM labeller

_INSTRUCTION = (
    "Each line below is a text excerpt in which one feature of a language model is active; the token "
    "where it is most active is marked [[like this]]."
)


def llm_prompt(card: FeatureCard, n_contexts: int = 6) -> str:
    """The question `llm_labeller` asks about one card."""
    lines = [_INSTRUCTION]
    for k, context in enumerate(card.contexts[:n_contexts], 1):
        text = "".join(f"[[{t}]]" if i == context.focus else t for i, t in enumerate(context.tokens))
        lines.append(f"{k}. {' '.join(text.split())}")
    promoted = _promoted(card)[:5]
    if promoted:
        lines.append("The feature makes these next tokens more likely: " + ", ".join(f'"{t}"' for t in promoted))
    lines.append("A short name (2 to 6 words) for what the feature responds to:")
    return "\n".join(lines)


def llm_labeller(
    model: Any, tokenizer: Any = None, *, max_new_tokens: int = 12, n_contexts: int = 6, max_chars: int = 60
) -> Callable[[FeatureCard], str]:
    """A labeller (for `build_feature_cards(labeller=...)`) that asks a local transformers causal LM —
    a model with its `tokenizer`, or a name or folder `clt.nnsight.loading.load_model` accepts — for
    a short name; greedy decoding, first line, at most `max_chars`; the rule's label when it answers
    nothing."""
    if isinstance(model, str):
        from clt.nnsight.loading import load_model

        model, tokenizer = load_model(model)
    if tokenizer is None:
        raise ValueError("llm_labeller needs the model's tokenizer (or pass a model name to load both)")
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @torch.no_grad()
    def label(card: FeatureCard) -> str:
        question = llm_prompt(card, n_contexts)
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
            )
        else:
            text = question + "\n"
        ids = tokenizer(text, return_tensors="pt")["input_ids"].to(device)
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
        answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        lines = [line.strip().strip("\"'`*").strip() for line in answer.splitlines()]
        name = next((line for line in lines if _WORD.search(line)), "")
        return name[:max_chars].strip() or auto_label(card)

    return label


__all__ = [
    "LABEL_RULE",
    "STOP_WORDS",
    "TermCounts",
    "auto_label",
    "is_stop_word",
    "label_cards",
    "label_report",
    "llm_labeller",
    "llm_prompt",
    "ranked_terms",
]
