"""Interventions: set, scale or add to transcoder features and re-run the model through nnsight.

Each intervention ``(layer, pos, feature, value)`` names a model layer covered by the transcoder,
a position (an int, a slice, or None for every position), a feature and a value: the new
activation (mode "set"), a factor (mode "scale") or an amount added (mode "add": the feature's
decoder direction times the value joins the MLP outputs it writes to). Layer by layer in
execution order the features are encoded from the MLP input of the running (intervened) model,
the interventions are applied, and the MLP output changes by Σ (a_new − a_old) · W_dec over every
source layer that writes to it (for a CLT, a feature's change reaches all its target layers):
the splice of `clt.nnsight.splice.spliced_forward`, with the features edited. One piece,
`EditedRun.forward`, runs every such pass: `intervene`, `generate` and group interventions.

How far effects travel (as circuit-tracer's ``feature_intervention``):

- ``constrained_layers=None`` (iterative patching, the default): the model's own MLPs run on
  their changed inputs, so the error terms follow the model; a_old are the running features.
- ``constrained_layers=[...]`` (model layers, or "all"): those layers' MLP outputs are held at the
  clean run's plus the decoder writes of the interventions, a_old the clean features (features do
  not respond); writes to other layers are dropped, and their MLPs run freely. Over all layers the
  norm denominators are held at the clean run's too: the *direct effects* of the attribution
  graph, whose edges then predict every change exactly (`clt.attribution.effects`).
- ``freeze_attention=True``: attention patterns are held at the clean run's
  (`clt.attribution.pinned`).
- ``constant_errors=True``: the local replacement model (transcoder reconstruction of the running
  inputs plus the clean error terms); uncovered MLPs keep their clean outputs.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Collection, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from clt.attribution.pinned import PinnedValues, pinned, record_pinned
from clt.attribution.replacement import PromptState, ReplacementModel
from clt.models.transcoder import CrossLayerTranscoder
from clt.nnsight import splice

Intervention = tuple[int, int | slice | None, int, float]
MODES = ("set", "scale", "add")


@dataclasses.dataclass
class InterventionResult:
    """Logits with and without the interventions, feature activations, the likeliest next tokens."""

    logits: Tensor
    """Logits with the interventions [n, vocab]."""
    original_logits: Tensor
    """Logits of the unchanged model [n, vocab]."""
    activations: Tensor
    """Feature activations of the intervened run, interventions applied [n, L, F] (encoded from the
    running MLP inputs; in constrained layers the interventions act on the clean run's features)."""
    token_ids: list[int]
    """Prompt token ids."""
    tokens: list[str]
    """Decoded prompt tokens."""
    top_tokens: list[tuple[str, int, float]]
    """(token, id, probability) of the likeliest next tokens at the last position, intervened."""
    original_top_tokens: list[tuple[str, int, float]]
    """The same for the unchanged model."""
    preactivations: Tensor | None = None
    """Encoder pre-activations of the intervened run (as encoded, before the interventions) [n, L, F]."""
    original_preactivations: Tensor | None = None
    """Encoder pre-activations of the unchanged model [n, L, F]."""
    original_activations: Tensor | None = None
    """Feature activations of the unchanged model [n, L, F]."""
    interventions: list[Intervention] = dataclasses.field(default_factory=list)
    """The interventions applied."""
    mode: str = "set"
    """How their values were applied: 'set', 'scale' or 'add'."""
    layers: list[int] = dataclasses.field(default_factory=list)
    """Model layer of each transcoder layer (the L axis of the activations)."""

    def logit_change(self, token_id: int, pos: int = -1) -> float:
        """Change of one token's logit at `pos` caused by the interventions."""
        return float(self.logits[pos, token_id] - self.original_logits[pos, token_id])

    def demeaned_logit_change(self, pos: int = -1) -> Tensor:
        """Change of every logit minus the mean logit at `pos` [vocab] (what a graph's logit rows predict)."""
        new, old = self.logits[pos], self.original_logits[pos]
        return (new - new.mean()) - (old - old.mean())


@dataclasses.dataclass
class StepOutput:
    """One forward pass with edits: logits and the live encoding of every transcoder layer."""

    logits: Tensor
    """[T, vocab] (all three in float32, or the model's dtype if wider)."""
    preactivations: Tensor
    """Encoder pre-activations as encoded from the running MLP inputs [T, L, F]."""
    activations: Tensor
    """Features with the interventions applied [T, L, F]."""


class _Plan:
    """Interventions by transcoder layer, positions resolved against a prompt of n tokens."""

    def __init__(self, rm: ReplacementModel, interventions: Sequence[Intervention], n: int, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        F = rm.transcoder.cfg.num_features
        self.by_layer: dict[int, list[tuple[int, int | None, int, int, float]]] = {}
        for item in interventions:
            if not isinstance(item, Sequence) or len(item) != 4:
                raise ValueError(f"an intervention is (layer, pos, feature, value), got {item!r}")
            layer, pos, feature, value = item
            if int(layer) not in rm.layers:
                raise ValueError(f"layer {layer} is not covered by the transcoder (model layers {rm.layers})")
            if not 0 <= int(feature) < F:
                raise ValueError(f"feature {feature} is out of range [0, {F})")
            start, stop, step = _positions(pos, n)
            self.by_layer.setdefault(rm.layers.index(int(layer)), []).append(
                (start, stop, step, int(feature), float(value))
            )

    def __bool__(self) -> bool:
        return bool(self.by_layer)

    def apply(self, i: int, a: Tensor, offset: int) -> Tensor:
        """Features a [..., T, F] of transcoder layer i at positions offset.. with the interventions applied."""
        items = self.by_layer.get(i)
        if not items:
            return a
        out = a.clone()
        where = torch.arange(offset, offset + a.shape[-2], device=a.device)
        for start, stop, step, feature, value in items:
            sel = (where >= start) & ((where - start) % step == 0)
            if stop is not None:
                sel &= where < stop
            if not bool(sel.any()):
                continue
            if self.mode == "set":
                out[..., sel, feature] = value
            elif self.mode == "scale":
                out[..., sel, feature] = out[..., sel, feature] * value
            else:
                out[..., sel, feature] = out[..., sel, feature] + value
        return out


def _positions(pos: int | slice | None, n: int) -> tuple[int, int | None, int]:
    """(start, stop or None for open-ended, step) of an intervention's positions (negatives count from n)."""
    if pos is None:
        return 0, None, 1
    if isinstance(pos, slice):
        step = 1 if pos.step is None else int(pos.step)
        if step < 1:
            raise ValueError(f"position slices need a positive step, got {pos}")
        start = 0 if pos.start is None else int(pos.start) + (n if int(pos.start) < 0 else 0)
        stop = None if pos.stop is None else int(pos.stop) + (n if int(pos.stop) < 0 else 0)
        if start < 0 or start >= n and stop is not None:
            raise ValueError(f"positions {pos} are out of range for a prompt of {n} tokens")
        return start, stop, step
    try:
        p = operator.index(pos)
    except TypeError:
        raise ValueError(f"a position is an int, a slice or None, got {pos!r}") from None
    if isinstance(pos, bool) or not -n <= p < n:
        raise ValueError(f"position {pos} is out of range for a prompt of {n} tokens")
    p %= n
    return p, p + 1, 1


def _constrained(rm: ReplacementModel, layers: Collection[int] | str | None) -> set[int] | None:
    if layers is None:
        return None
    if isinstance(layers, str):
        if layers != "all":
            raise ValueError(f"constrained_layers must be None, 'all' or model layers, got {layers!r}")
        return set(range(rm.n_layers))
    chosen = {int(m) for m in layers}
    bad = sorted(m for m in chosen if not 0 <= m < rm.n_layers)
    if not chosen or bad:
        raise ValueError(f"constrained_layers must be model layers in [0, {rm.n_layers}), got {sorted(chosen)}")
    return chosen


class EditedRun:
    """Forward passes of a prompt (and its continuations) with interventions (module docstring)."""

    def __init__(
        self,
        rm: ReplacementModel,
        state: PromptState,
        interventions: Sequence[Intervention],
        *,
        mode: str = "set",
        freeze_attention: bool = False,
        constrained_layers: Collection[int] | str | None = None,
        constant_errors: bool = False,
    ) -> None:
        if constant_errors and constrained_layers is not None:
            raise ValueError("constant_errors and constrained_layers are two different models; choose one")
        self.rm, self.state = rm, state
        self.plan = _Plan(rm, interventions, len(state.input_ids), mode)
        self.constrained = _constrained(rm, constrained_layers)
        self.freeze_attention, self.constant_errors = freeze_attention, constant_errors
        self.direct = self.constrained is not None and len(self.constrained) == rm.n_layers
        self.pinned: PinnedValues | None = None
        if freeze_attention or self.direct:
            self.pinned = record_pinned(rm.model, state.input_ids)
        self.lm = splice.wrap_model(rm.model, rm.tokenizer)

    @property
    def freezes(self) -> bool:
        """Whether the prompt's pass holds anything at the clean run's values (then it cannot be re-run
        with a different length, and a generation's later steps run freely)."""
        return self.pinned is not None or self.constrained is not None or self.constant_errors

    @torch.no_grad()
    def forward(self, ids: Tensor, *, offset: int = 0, cache: Any = None) -> StepOutput:
        """Logits and features of tokens ids [T] at positions offset.. (after `cache`'s, if given).
        The prompt's own pass (offset 0, T = n) is the one that freezing and constraints apply to."""
        rm, L = self.rm, self.rm.transcoder.cfg.num_layers
        first = offset == 0 and len(ids) == len(self.state.input_ids)
        if self.freezes and offset == 0 and not first:
            raise ValueError("a frozen or constrained intervention re-runs only the prompt; use the KV cache")
        z_rec: list[Tensor] = [None] * L  # type: ignore[list-item]
        a_rec: list[Tensor] = [None] * L  # type: ignore[list-item]

        def edit(i: int, a: Tensor) -> Tensor:
            return self.plan.apply(i, a, offset)

        def observe(i: int, z: Tensor, a: Tensor) -> None:
            z_rec[i], a_rec[i] = z[0], edit(i, a)[0]

        constrained = self.constrained if first else None
        clean = first and (constrained is not None or self.constant_errors)
        inputs: dict[str, Any] = {"input_ids": ids[None].to(rm.device), "use_cache": cache is not None}
        if cache is not None:  # nnsight's LanguageModel would mask the cached positions out
            inputs[_cache_keyword(rm.model)] = cache
            inputs["attention_mask"] = torch.ones(1, offset + len(ids), dtype=torch.long, device=rm.device)
        freeze = first and self.pinned is not None
        with (
            pinned(rm.model, self.pinned, attention=self.freeze_attention, norms=self.direct)
            if freeze
            else nullcontext()
        ):
            out = splice.spliced_forward(
                self.lm,
                rm.layout.mlp_paths,
                rm.transcoder,
                inputs,
                errors=self.state if clean else "live",
                edit=edit if self.plan else None,
                frozen_features=constrained is not None,
                replaced=constrained,
                observe=observe,
            )
        return StepOutput(*(_wide(t) for t in (out.logits[0], torch.stack(z_rec, 1), torch.stack(a_rec, 1))))


def _wide(t: Tensor) -> Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _cache_keyword(model: nn.Module) -> str:
    """The forward's KV-cache argument: ``cache`` (transformers ≥ 5.2x) or ``past_key_values``."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def intervene(
    model: nn.Module | ReplacementModel | str,
    transcoder: CrossLayerTranscoder | None,
    prompt: str | Sequence[int] | Tensor,
    interventions: Sequence[Intervention],
    *,
    mode: str = "set",
    tokenizer: Any = None,
    freeze_attention: bool = False,
    constrained_layers: Collection[int] | str | None = None,
    constant_errors: bool = False,
    prepend_bos: bool = True,
    top_k: int = 5,
) -> InterventionResult:
    """Run the model (through nnsight) with features set, scaled or added to; see the module docstring."""
    from clt.attribution.attribute import _replacement_model

    rm = _replacement_model(model, transcoder, tokenizer)
    state = rm.prepare(prompt, prepend_bos=prepend_bos)
    run = EditedRun(
        rm,
        state,
        interventions,
        mode=mode,
        freeze_attention=freeze_attention,
        constrained_layers=constrained_layers,
        constant_errors=constant_errors,
    )
    out = run.forward(state.input_ids)
    ids = state.input_ids.tolist()
    return InterventionResult(
        logits=out.logits,
        original_logits=state.logits,
        activations=out.activations,
        token_ids=ids,
        tokens=rm.token_strings(ids),
        top_tokens=top_tokens(rm, out.logits[-1], top_k),
        original_top_tokens=top_tokens(rm, state.logits[-1], top_k),
        preactivations=out.preactivations,
        original_preactivations=state.preactivations,
        original_activations=state.activations,
        interventions=list(interventions),
        mode=mode,
        layers=list(rm.layers),
    )


def top_tokens(rm: ReplacementModel, logits: Tensor, k: int) -> list[tuple[str, int, float]]:
    """(token, id, probability) of the k likeliest tokens of one logit vector."""
    probs = torch.softmax(logits.float(), -1)
    top = probs.topk(min(k, len(probs)))
    ids = top.indices.tolist()
    return list(zip(rm.token_strings(ids), ids, top.values.tolist()))


__all__ = ["MODES", "EditedRun", "Intervention", "InterventionResult", "StepOutput", "intervene", "top_tokens"]
