"""Feature cards without an external service: what makes each transcoder feature fire, and what it writes.

One pass over an activation store (in store order) keeps, for every feature, its `top_k` largest
activations and where they occurred, its firing density and a histogram of its positive
activations; a card then adds the context around each top activation (tokens from the store's
token ids, the feature's activation on each of them), the output tokens its decoder promotes and
suppresses through the unembedding, and a short automatic label (`clt.interp.labels`: terms
over-represented in the top contexts relative to the corpus, and the top promoted token; no two
cards built together share one). A `labeller` callable (e.g. `llm_labeller`) can replace it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from clt.files import atomic_write_text
from clt.interp.labels import LABEL_RULE, TermCounts, label_cards
from clt.models.transcoder import CrossLayerTranscoder
from clt.store import ActivationStore

logger = logging.getLogger(__name__)

CARDS_VERSION = 1
HISTOGRAM_BINS = 24


@dataclasses.dataclass
class Context:
    """A window of tokens around one top activation of a feature."""

    tokens: list[str]
    """Token strings of the context, in order."""
    activations: list[float]
    """The feature's activation on each context token."""
    focus: int
    """Index in `tokens` of the token with the top activation."""
    activation: float
    """The top activation itself."""


@dataclasses.dataclass
class FeatureCard:
    """Everything known about one feature (layer, feature) without running an LLM."""

    layer: int
    feature: int
    density: float
    """Fraction of store tokens on which the feature fires."""
    max_activation: float
    quantiles: dict[str, float]
    """Activation quantiles over the tokens where it fires (approximate: from the histogram)."""
    histogram: list[int]
    """Counts of positive activations in `bin_edges` bins."""
    bin_edges: list[float]
    contexts: list[Context]
    """Top activating contexts, strongest first."""
    top_logits: list[tuple[str, float]]
    """Output tokens the feature's decoder promotes most (direct path through the unembedding)."""
    bottom_logits: list[tuple[str, float]]
    """Output tokens it suppresses most."""
    label: str = ""
    """A short description: automatic (`clt.interp.labels`) unless a labeller gave one."""

    @property
    def key(self) -> str:
        """`"{layer}/{feature}"`, the card's name in a `FeatureCards` file."""
        return f"{self.layer}/{self.feature}"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureCard:
        """Inverse of `dataclasses.asdict`."""
        data = dict(data)
        data["contexts"] = [Context(**c) for c in data["contexts"]]
        data["top_logits"] = [tuple(t) for t in data["top_logits"]]
        data["bottom_logits"] = [tuple(t) for t in data["bottom_logits"]]
        return cls(**data)


class FeatureCards(dict[str, FeatureCard]):
    """Cards by `"{layer}/{feature}"`, saved to and loaded from one JSON file."""

    def card(self, layer: int, feature: int) -> FeatureCard:
        """The card of one feature (KeyError names what is available)."""
        key = f"{layer}/{feature}"
        if key not in self:
            raise KeyError(
                f"no card for layer {layer} feature {feature}; {len(self)} cards were built "
                "(pass features=[...] to build_feature_cards to build others)"
            )
        return self[key]

    source: str = ""
    """Fingerprint of the transcoder and store the cards were built from (a cache is valid for it)."""

    def save(self, path: str | Path) -> Path:
        """Write all cards as JSON (atomically)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "version": CARDS_VERSION,
            "source": self.source,
            "cards": [dataclasses.asdict(c) for c in self.values()],
        }
        atomic_write_text(json.dumps(payload), path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> FeatureCards:
        """Read cards written by `save`."""
        try:
            payload = json.loads(Path(path).read_text())
            cards = [FeatureCard.from_dict(c) for c in payload["cards"]]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(
                f"{path} is not a feature-card file ({type(err).__name__}: {err}); delete it "
                "or rebuild it with build_feature_cards"
            ) from err
        out = cls((c.key, c) for c in cards)
        out.source = str(payload.get("source", ""))
        return out


def fingerprint(transcoder: CrossLayerTranscoder, store: ActivationStore, *settings: Any) -> str:
    """A short hash of the transcoder's weights, the store's size and card settings (cache validity)."""
    digest = hashlib.sha256()
    for tensor in transcoder.state_dict().values():
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    digest.update(json.dumps([store.n_tokens, list(store.shard_sizes), *settings], default=str).encode())
    return digest.hexdigest()[:16]


@dataclasses.dataclass
class _Scan:
    """Per-feature statistics from one pass over the store."""

    top_values: torch.Tensor  # [L, F, k]
    top_rows: torch.Tensor  # [L, F, k] global row index in store order
    fire_count: torch.Tensor  # [L, F]
    histogram: torch.Tensor  # [L, F, bins]
    bin_edges: torch.Tensor  # [L, F, bins + 1]
    n_tokens: int


@torch.no_grad()
def _scan(
    transcoder: CrossLayerTranscoder,
    store: ActivationStore,
    top_k: int,
    max_tokens: int | None,
    batch_size: int,
    progress: bool,
) -> _Scan:
    L, F = transcoder.cfg.num_layers, transcoder.cfg.num_features
    top_values = torch.full((L, F, top_k), -torch.inf)
    top_rows = torch.full((L, F, top_k), -1, dtype=torch.long)
    fire_count = torch.zeros(L, F, dtype=torch.long)
    peak = torch.full((L, F), 1e-6)
    seen = 0
    total = store.n_tokens if max_tokens is None else min(max_tokens, store.n_tokens)
    bar = tqdm(total=total, desc="feature statistics", unit="tok", disable=not progress)
    fired: list[tuple[torch.Tensor, torch.Tensor]] | None = []  # nonzeros of the first pass, while few
    for inputs in _store_batches(store, max_tokens, batch_size):
        a = transcoder.encode(inputs).float()  # [n, L, F]
        peak = torch.maximum(peak, a.max(0).values)
        fire_count += (a > 0).sum(0)
        values, rows = a.topk(min(top_k, a.shape[0]), dim=0)  # [k', L, F]
        merged_v = torch.cat([top_values, values.permute(1, 2, 0)], -1)
        merged_r = torch.cat([top_rows, (rows + seen).permute(1, 2, 0)], -1)
        best = merged_v.topk(top_k, dim=-1)
        top_values, top_rows = best.values, merged_r.gather(-1, best.indices)
        seen += a.shape[0]
        if fired is not None:
            fired.append(_nonzeros(a))
            if int(fire_count.sum()) > _SCAN_KEEP:  # dense activations: encode again instead
                fired = None
        bar.update(a.shape[0])
    if fired is None:
        bar.reset(total=total)
        fired = _nonzeros_again(transcoder, store, max_tokens, batch_size, bar)
    histogram = torch.zeros(L * F * HISTOGRAM_BINS, dtype=torch.long)
    for index, value in fired:  # one bin per nonzero activation, scaled by its feature's peak
        bins = (value / peak.view(-1)[index] * HISTOGRAM_BINS).long().clamp(0, HISTOGRAM_BINS - 1)
        histogram.index_add_(0, index * HISTOGRAM_BINS + bins, torch.ones_like(bins))
    bar.close()
    histogram = histogram.view(L, F, HISTOGRAM_BINS)
    edges = torch.linspace(0, 1, HISTOGRAM_BINS + 1)[None, None] * peak[..., None]
    return _Scan(top_values, top_rows, fire_count, histogram, edges, seen)


_SCAN_KEEP = 50_000_000
"""Nonzero activations the statistics scan keeps from its first pass (~600 MB) instead of encoding twice."""


def _nonzeros(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat layer·feature index, value) of each nonzero of activations [n, L, F]."""
    flat = a.reshape(a.shape[0], -1)
    where = flat > 0
    return where.nonzero()[:, 1], flat[where]


def _nonzeros_again(
    transcoder: CrossLayerTranscoder, store: ActivationStore, max_tokens: int | None, batch_size: int, bar: Any
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`_nonzeros` of a second encoding pass over the store."""
    for inputs in _store_batches(store, max_tokens, batch_size):
        yield _nonzeros(transcoder.encode(inputs).float())
        bar.update(len(inputs))


def _store_batches(store: ActivationStore, max_tokens: int | None, batch_size: int) -> Iterable[torch.Tensor]:
    taken = 0
    for i in range(len(store.shards)):
        inputs = store.shard(i)["inputs"]
        for lo in range(0, inputs.shape[0], batch_size):
            if max_tokens is not None and taken >= max_tokens:
                return
            chunk = inputs[lo : lo + batch_size]
            if max_tokens is not None:
                chunk = chunk[: max_tokens - taken]
            taken += chunk.shape[0]
            yield chunk.float()


def _store_column(store: ActivationStore, key: str) -> torch.Tensor:
    parts = []
    for i in range(len(store.shards)):
        shard = store.shard(i)
        if key not in shard:
            raise ValueError(
                f"this store has no '{key}' (an in-memory store built from raw tensors?); "
                "feature cards need a store written by ActivationExtractor"
            )
        parts.append(shard[key].long())
    return torch.cat(parts)


def _quantiles(histogram: torch.Tensor, edges: torch.Tensor) -> dict[str, float]:
    total = int(histogram.sum())
    out = {}
    cumulative = histogram.cumsum(0)
    for q in (0.5, 0.9, 0.99):
        if total == 0:
            out[f"q{int(q * 100)}"] = 0.0
            continue
        i = int(torch.searchsorted(cumulative, torch.tensor(q * total)).clamp(max=len(histogram) - 1))
        out[f"q{int(q * 100)}"] = float(edges[i + 1])
    return out


def output_logit_effects(
    transcoder: CrossLayerTranscoder,
    unembedding: torch.Tensor,
    final_norm_weight: torch.Tensor | None = None,
    features: Sequence[tuple[int, int]] | None = None,
) -> torch.Tensor:
    """Direct logit effect of each feature's total decoder write (mean logit removed): [L, F, vocab],
    or [len(features), vocab] for the given (layer, feature) pairs (a card set needs only its own)."""
    transcoder.require_mlp_replacement("a feature's direct logit effect")
    folded = transcoder.fold_normalization()
    with torch.no_grad():
        if features is None:
            total = torch.stack([w.sum(1) for w in folded.W_dec])  # [L, F, d]: summed over target layers
        else:
            pairs = torch.tensor(list(features), dtype=torch.long).reshape(-1, 2)
            total = torch.empty(len(pairs), transcoder.cfg.d_model, dtype=folded.W_dec[0].dtype)
            for layer in pairs[:, 0].unique().tolist():
                here = pairs[:, 0] == layer
                total[here] = folded.W_dec[layer][pairs[here, 1]].sum(1)
        if final_norm_weight is not None:
            total = total * final_norm_weight
        logits = total.float() @ unembedding.float().T
        return logits - logits.mean(-1, keepdim=True)


def unembedding_of(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The unembedding [vocab, d] of a transformers model and its final norm's weight (if any)."""
    from clt.nnsight.loading import find_layout

    layout = find_layout(model)
    norm = model.get_submodule(layout.final_norm_path) if layout.final_norm_path else None
    weight = getattr(norm, "weight", None)
    return model.get_output_embeddings().weight.detach(), None if weight is None else weight.detach()


def build_feature_cards(
    transcoder: CrossLayerTranscoder,
    store: ActivationStore,
    tokenizer: Any,
    *,
    unembedding: torch.Tensor | None = None,
    final_norm_weight: torch.Tensor | None = None,
    features: Iterable[tuple[int, int]] | None = None,
    top_k: int = 8,
    context: int = 6,
    n_logits: int = 8,
    max_tokens: int | None = None,
    batch_size: int = 512,
    labeller: Callable[[FeatureCard], str] | None = None,
    cache: str | Path | None = None,
    progress: bool = True,
) -> FeatureCards:
    """Cards for `features` ((layer, feature) pairs; default all that fire) from one pass over `store`.

    `unembedding` [vocab, d] (and the final norm's weight) gives top promoted/suppressed tokens.
    With `cache`, cards already in that file are reused and new ones are added to it.
    """
    cfg = transcoder.cfg
    if store.num_layers != cfg.num_layers or store.d_model != cfg.d_model:
        raise ValueError(
            f"the store has {store.num_layers} layers × d_model {store.d_model} but the transcoder "
            f"expects {cfg.num_layers} × {cfg.d_model}: use the store it was trained on"
        )
    source = fingerprint(transcoder, store, max_tokens, top_k, context, n_logits, unembedding is not None, LABEL_RULE)
    cached = FeatureCards.load(cache) if cache is not None and Path(cache).is_file() else FeatureCards()
    if cached and cached.source != source:
        logger.warning("%s holds cards of another transcoder or store; rebuilding them", cache)
        cached = FeatureCards()
    cached.source = source
    wanted = [(int(lay), int(f)) for lay, f in features] if features is not None else None
    for layer, feature in wanted or []:
        if not (0 <= layer < cfg.num_layers and 0 <= feature < cfg.num_features):
            raise ValueError(
                f"feature ({layer}, {feature}) is out of range: the transcoder has "
                f"{cfg.num_layers} layers × {cfg.num_features} features"
            )
    scan = None
    if wanted is None or any(f"{lay}/{f}" not in cached for lay, f in wanted):
        scan = _scan(transcoder.eval(), store, top_k, max_tokens, batch_size, progress)
    if wanted is None:
        wanted = [(lay, f) for lay, f in (scan.fire_count > 0).nonzero().tolist()]
    todo = [(lay, f) for lay, f in wanted if f"{lay}/{f}" not in cached]
    if todo:
        token_ids = _store_column(store, "token_ids")
        window_ids = _store_column(store, "window_ids")
        logit_effects = (
            dict(zip(todo, output_logit_effects(transcoder, unembedding, final_norm_weight, features=todo)))
            if unembedding is not None
            else None
        )
        inputs_cache: dict[int, torch.Tensor] = {}
        built: list[FeatureCard] = []
        for layer, feature in tqdm(todo, desc="feature cards", disable=not progress):
            card = _card(
                transcoder,
                store,
                tokenizer,
                scan,
                layer,
                feature,
                token_ids,
                window_ids,
                context,
                logit_effects,
                n_logits,
                inputs_cache,
            )
            if labeller is not None:
                card.label = labeller(card)
            cached[card.key] = card
            built.append(card)
        if labeller is None:
            label_cards(built, TermCounts.from_ids(token_ids, window_ids, lambda i: tokenizer.decode([i])))
        if cache is not None:
            cached.save(cache)
    out = FeatureCards((f"{lay}/{f}", cached[f"{lay}/{f}"]) for lay, f in wanted)
    out.source = source
    return out


_CACHED_SHARDS = 8
"""Store shards of inputs `_row_inputs` keeps in memory between calls (least recently used dropped)."""


def _row_inputs(store: ActivationStore, rows: torch.Tensor, cache: dict[int, torch.Tensor]) -> torch.Tensor:
    """Inputs [len(rows), L, d] (float32) at global store rows, reading each shard once."""
    starts = torch.tensor([0] + list(store.shard_sizes)).cumsum(0)
    shards = torch.searchsorted(starts, rows, right=True) - 1
    out = torch.empty(len(rows), store.num_layers, store.d_model)
    for shard in shards.unique().tolist():
        if shard not in cache:
            while len(cache) >= _CACHED_SHARDS:
                cache.pop(next(iter(cache)))
            cache[shard] = store.shard(shard)["inputs"]
        cache[shard] = cache.pop(shard)  # most recently used last
        here = shards == shard
        out[here] = cache[shard][rows[here] - int(starts[shard])].float()
    return out


@torch.no_grad()
def _card(
    transcoder: CrossLayerTranscoder,
    store: ActivationStore,
    tokenizer: Any,
    scan: _Scan,
    layer: int,
    feature: int,
    token_ids: torch.Tensor,
    window_ids: torch.Tensor,
    context: int,
    logit_effects: dict[tuple[int, int], torch.Tensor] | None,
    n_logits: int,
    inputs_cache: dict[int, torch.Tensor],
) -> FeatureCard:
    spans = []  # (value, row, rows of its context window)
    for value, row in zip(scan.top_values[layer, feature].tolist(), scan.top_rows[layer, feature].tolist()):
        if row < 0 or value <= 0:
            continue
        lo, hi = max(0, row - context), min(len(token_ids), row + context + 1)
        rows = torch.arange(lo, hi)
        spans.append((value, row, rows[window_ids[rows] == window_ids[row]]))
    contexts = []
    if spans:  # one encode of this layer for all the contexts' rows
        every = torch.cat([rows for _, _, rows in spans])
        acts = transcoder.encode_layer(_row_inputs(store, every, inputs_cache), layer)[:, feature]
        for (value, row, rows), span_acts in zip(spans, acts.split([len(r) for _, _, r in spans])):
            tokens = [tokenizer.decode([t]) for t in token_ids[rows].tolist()]
            activations = [round(float(a), 5) for a in span_acts]
            contexts.append(Context(tokens, activations, int((rows == row).nonzero()), value))
    top, bottom = [], []
    if logit_effects is not None:
        effects = logit_effects[layer, feature]
        k = min(n_logits, effects.numel())
        top = [(tokenizer.decode([i]), float(v)) for v, i in zip(*effects.topk(k))]
        bottom = [(tokenizer.decode([i]), float(v)) for v, i in zip(*(-effects).topk(k))]
        bottom = [(t, -v) for t, v in bottom]
    histogram = scan.histogram[layer, feature]
    edges = scan.bin_edges[layer, feature]
    return FeatureCard(
        layer=layer,
        feature=feature,
        density=float(scan.fire_count[layer, feature]) / max(scan.n_tokens, 1),
        max_activation=max(0.0, float(scan.top_values[layer, feature, 0])),
        quantiles=_quantiles(histogram, edges),
        histogram=histogram.tolist(),
        bin_edges=[float(e) for e in edges],
        contexts=contexts,
        top_logits=top,
        bottom_logits=bottom,
    )
