"""Generate text with feature interventions (steering), one token per forward pass on the KV cache.

The prompt runs once through `EditedRun.forward` (`clt.attribution.intervene`: set, scale or add,
frozen attention and constrained layers apply to this pass only, as in circuit-tracer's
``feature_intervention_generate``); then each new token runs alone against transformers' KV cache,
with every intervention whose positions reach it (an open-ended slice such as ``slice(5, None)``,
or None for every position) applied at its layer. Positions count from the start of the prompt.
Decoding is greedy (deterministic; token for token what ``model.generate(do_sample=False)`` gives
without interventions) or sampled with temperature, top-k and top-p from a seeded generator.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from clt.attribution.intervene import EditedRun, Intervention
from clt.attribution.replacement import ReplacementModel
from clt.models.transcoder import CrossLayerTranscoder


@dataclasses.dataclass
class GenerationResult:
    """A continuation generated with interventions."""

    prompt_ids: list[int]
    """Prompt token ids."""
    new_ids: list[int]
    """Generated token ids (the EOS token included when it ended the generation)."""
    text: str
    """The decoded continuation."""
    logits: Tensor
    """Logits that chose each generated token [k, vocab]."""
    activations: Tensor
    """Features (interventions applied) at every position that was run [n + k − 1, L, F]."""

    @property
    def token_ids(self) -> list[int]:
        """Prompt and continuation."""
        return self.prompt_ids + self.new_ids


def generate(
    model: nn.Module | ReplacementModel | str,
    transcoder: CrossLayerTranscoder | None,
    prompt: str | Sequence[int] | Tensor,
    interventions: Sequence[Intervention] = (),
    *,
    mode: str = "set",
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    freeze_attention: bool = False,
    constrained_layers: Collection[int] | str | None = None,
    use_cache: bool = True,
    stop_at_eos: bool = True,
    tokenizer: Any = None,
    prepend_bos: bool = True,
) -> GenerationResult:
    """Continue a prompt with features set, scaled or added to (module docstring). Without the KV
    cache every step re-runs the whole sequence (same tokens, quadratic cost; free interventions only)."""
    from clt.attribution.attribute import _replacement_model

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature must be positive when sampling, got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k}")
    rm = _replacement_model(model, transcoder, tokenizer)
    state = rm.prepare(prompt, prepend_bos=prepend_bos)
    n = len(state.input_ids)
    limit = rm.context_length
    if limit is not None and n + max_new_tokens > limit:
        raise ValueError(f"{n} prompt tokens + {max_new_tokens} new ones exceed the model's context of {limit}")
    run = EditedRun(
        rm, state, interventions, mode=mode, freeze_attention=freeze_attention, constrained_layers=constrained_layers
    )
    if not use_cache and run.freezes:
        raise ValueError("frozen attention or constrained layers apply to the prompt's pass: generate with use_cache")
    generator = torch.Generator(device="cpu").manual_seed(0 if seed is None else seed)
    eos = _eos_ids(rm.model) if stop_at_eos else set()
    cache = _new_cache(rm.model) if use_cache else None
    ids = state.input_ids
    out = run.forward(ids, cache=cache)
    chosen: list[Tensor] = []
    activations = [out.activations]
    new: list[int] = []
    for step in range(max_new_tokens):
        logits = out.logits[-1]
        chosen.append(logits)
        token = _choose(logits, do_sample, temperature, top_k, top_p, generator)
        new.append(token)
        ids = torch.cat([ids, ids.new_tensor([token])])
        if token in eos or step == max_new_tokens - 1:
            break
        if cache is not None:
            out = run.forward(ids[-1:], offset=len(ids) - 1, cache=cache)
            activations.append(out.activations)
        else:
            out = run.forward(ids)
            activations = [out.activations]
    text = rm.tokenizer.decode(new) if rm.tokenizer is not None else " ".join(map(str, new))
    return GenerationResult(
        prompt_ids=state.input_ids.tolist(),
        new_ids=new,
        text=text,
        logits=torch.stack(chosen),
        activations=torch.cat(activations),
    )


def _choose(
    logits: Tensor, do_sample: bool, temperature: float, top_k: int | None, top_p: float | None, generator: Any
) -> int:
    """The next token: the argmax, or a sample after temperature, top-k and top-p filtering."""
    if not do_sample:
        return int(logits.argmax())
    scores = logits.double().cpu() / temperature
    if top_k is not None and top_k < len(scores):
        scores[scores < scores.topk(top_k).values[-1]] = float("-inf")
    if top_p is not None and top_p < 1:
        order = scores.argsort(descending=True)
        probs = torch.softmax(scores[order], -1)
        drop = probs.cumsum(0) - probs >= top_p  # keep the smallest prefix reaching top_p
        scores[order[drop]] = float("-inf")
    return int(torch.multinomial(torch.softmax(scores, -1), 1, generator=generator))


def _eos_ids(model: nn.Module) -> set[int]:
    config = getattr(model, "generation_config", None) or model.config
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


def _new_cache(model: nn.Module) -> Any:
    """An empty transformers KV cache for the model."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # transformers < 4.56
        return DynamicCache()


__all__ = ["GenerationResult", "generate"]
