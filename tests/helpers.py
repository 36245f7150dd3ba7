"""Test helpers shared across test folders: stores of a tiny model and transcoders that fit them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from clt.config.transcoder import CLTConfig
from clt.models.transcoder import CrossLayerTranscoder


def saved_store(model: nn.Module, tokenizer: Any, folder: Path, max_tokens: int, **save_options: Any) -> Any:
    """A float32 store of the tiny Llama's activations over the default corpus, saved in `folder`."""
    from clt.nnsight.extractors import ActivationExtractor

    extractor = ActivationExtractor(model=model, tokenizer=tokenizer, model_name="tiny-llama")
    return extractor.extract(max_tokens=max_tokens, store_dtype="float32", progress=False).save(folder, **save_options)


def standardised_transcoder(source: Any, *, output_bias: bool = True, **config: Any) -> CrossLayerTranscoder:
    """A transcoder (CLTConfig fields in `config`) standardised with real activation statistics: a
    store's, or those of a model's clean run on 64 random tokens (output mean 0 unless `output_bias`)."""
    if hasattr(source, "norm_stats"):
        stats = source.norm_stats()
        sizes = {"num_layers": source.num_layers, "d_model": source.d_model, "model_name": source.model_name}
        tc = CrossLayerTranscoder(CLTConfig(**{**sizes, **config}))
        tc.set_normalization(stats.input_mean, stats.input_std, stats.output_mean, stats.output_std)
        return tc
    from clt.attribution import ReplacementModel
    from clt.nnsight.loading import find_layout

    layout = find_layout(source)
    tc = CrossLayerTranscoder(CLTConfig(**{"num_layers": layout.num_layers, "d_model": layout.d_model, **config}))
    ids = torch.randint(3, layout.vocab_size, (64,), generator=torch.Generator().manual_seed(tc.cfg.seed))
    clean = ReplacementModel(source, tc).prepare(ids)
    x, y = clean.mlp_inputs, clean.mlp_outputs  # [n, L, d]
    out_mean = y.mean(0) if output_bias else torch.zeros_like(y[0])
    tc.set_normalization(x.mean(0), x.std(0), out_mean, y.std(0))
    return tc


def random_transcoder(
    source: Any,
    *,
    output_bias: bool = True,
    decoder_scale: float | None = None,
    dtype: torch.dtype = torch.float32,
    **config: Any,
) -> CrossLayerTranscoder:
    """A random transcoder (12 ReLU features unless `config` says otherwise) standardised with real
    statistics (`standardised_transcoder`: of a store or a model), plus a random encoder bias, skip
    and (unless told) decoder bias; with `decoder_scale`, decoders and decoder bias drawn at that
    scale. In eval mode."""
    config = {"num_features": 12, "activation_fn": "relu", "jumprelu_threshold": 0.05, **config}
    tc = standardised_transcoder(source, output_bias=output_bias, **config)
    L, F, d = tc.cfg.num_layers, tc.cfg.num_features, tc.cfg.d_model
    gen = torch.Generator().manual_seed(tc.cfg.seed + 1)
    with torch.no_grad():
        tc.b_enc.copy_(torch.randn(L, F, generator=gen) * 0.3)
        if tc.cfg.skip_connection:
            tc.W_skip.copy_(torch.randn(L, d, d, generator=gen) * 0.05)
        if output_bias:
            tc.b_dec.copy_(torch.randn(L, d, generator=gen) * 0.1)
        if decoder_scale is not None:
            for w in tc.W_dec:
                w.copy_(torch.randn(w.shape, generator=gen) * decoder_scale)
            tc.b_dec.copy_(torch.randn(L, d, generator=gen) * decoder_scale)
    return tc.to(dtype).eval()


def cards_with_logits(
    transcoder: CrossLayerTranscoder, store: Any, model: nn.Module, tokenizer: Any, **options: Any
) -> Any:
    """Feature cards of 3-token contexts with the 4 top logits read from the model's unembedding."""
    from clt.interp import build_feature_cards, unembedding_of

    unembedding, norm = unembedding_of(model)
    options = {"context": 3, "n_logits": 4, "progress": False, **options}
    return build_feature_cards(transcoder, store, tokenizer, unembedding=unembedding, final_norm_weight=norm, **options)


def hand_graph(features: list[list[int]], n_layers: int, n_tokens: int, edges: dict[tuple[int, int], float]) -> Any:
    """A hand-built graph with the given feature nodes (layer, pos, feature), one logit of probability 1, and
    adjacency[target, source] = edges[(target, source)]."""
    from clt.attribution import Graph
    from clt.config.attribution import AttributionConfig

    n = len(features) + n_layers * n_tokens + n_tokens + 1
    adjacency = torch.zeros(n, n)
    for (target, source), weight in edges.items():
        adjacency[target, source] = weight
    return Graph(
        prompt="a b",
        token_ids=list(range(n_tokens)),
        tokens=[f"t{i}" for i in range(n_tokens)],
        features=torch.tensor(features, dtype=torch.long).view(-1, 3),
        activations=torch.ones(len(features)),
        adjacency=adjacency,
        logit_token_ids=[7],
        logit_tokens=["x"],
        logit_probabilities=torch.tensor([1.0]),
        n_layers=n_layers,
        config=AttributionConfig(),
    )
