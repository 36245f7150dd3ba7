"""Interventions: set or scale transcoder features and re-run the model through nnsight.

Each intervention ``(layer, pos, feature, value)`` names a model layer covered by the transcoder,
a position (an int, a slice, or None for every position), a feature and a value (the new
activation for mode "set", a factor for mode "scale"). Layer by layer in execution order, the
features are encoded from the MLP input of the running (intervened) model, the interventions are
applied, and the MLP output changes by Σ (a_new − a_old) · W_dec over every source layer that
writes to it (for a CLT, a feature's change reaches all its target layers): the splice of
`clt.nnsight.splice.spliced_logits`, with the features edited.

- ``constant_errors=False`` (default): the model's own MLPs run on their changed inputs, so the
  error terms follow the model; a_old are the features of the running model.
- ``constant_errors=True``: the local replacement model: each covered MLP output is the
  transcoder's reconstruction of the running inputs (with interventions) plus the error term of
  the clean run; uncovered MLPs keep their clean outputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from clt.attribution.replacement import ReplacementModel
from clt.models.transcoder import CrossLayerTranscoder

Intervention = tuple[int, int | slice | None, int, float]
MODES = ("set", "scale")


@dataclasses.dataclass
class InterventionResult:
    """Logits with and without the interventions, and the most likely next tokens."""

    logits: Tensor
    """Logits with the interventions [n, vocab]."""
    original_logits: Tensor
    """Logits of the unchanged model [n, vocab]."""
    activations: Tensor
    """Feature activations of the intervened run, interventions applied [n, L, F]."""
    token_ids: list[int]
    """Prompt token ids."""
    tokens: list[str]
    """Decoded prompt tokens."""
    top_tokens: list[tuple[str, int, float]]
    """(token, id, probability) of the likeliest next tokens at the last position, intervened."""
    original_top_tokens: list[tuple[str, int, float]]
    """The same for the unchanged model."""

    def logit_change(self, token_id: int, pos: int = -1) -> float:
        """Change of one token's logit at `pos` caused by the interventions."""
        return float(self.logits[pos, token_id] - self.original_logits[pos, token_id])


def intervene(
    model: nn.Module | ReplacementModel | str,
    transcoder: CrossLayerTranscoder | None,
    prompt: str | Sequence[int] | Tensor,
    interventions: Sequence[Intervention],
    *,
    mode: str = "set",
    tokenizer: Any = None,
    constant_errors: bool = False,
    prepend_bos: bool = True,
    top_k: int = 5,
) -> InterventionResult:
    """Run the model (through nnsight) with features set or scaled; see the module docstring."""
    from clt.attribution.attribute import _replacement_model

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    rm = _replacement_model(model, transcoder, tokenizer)
    state = rm.prepare(prompt, prepend_bos=prepend_bos)
    n = len(state.input_ids)
    plan = _plan(rm, interventions, n)
    recorded: list[Tensor] = [None] * rm.transcoder.cfg.num_layers  # type: ignore[list-item]

    def edit(layer: int, a: Tensor) -> Tensor:
        a = _apply(a, plan.get(layer, []), mode)
        recorded[layer] = a[0].float()
        return a

    with torch.no_grad():
        logits = rm.spliced_logits(state, errors=state if constant_errors else "live", edit=edit)
    ids = state.input_ids.tolist()
    return InterventionResult(
        logits=logits,
        original_logits=state.logits,
        activations=torch.stack(recorded, 1),
        token_ids=ids,
        tokens=rm.token_strings(ids),
        top_tokens=_top(rm, logits[-1], top_k),
        original_top_tokens=_top(rm, state.logits[-1], top_k),
    )


def _plan(
    rm: ReplacementModel, interventions: Sequence[Intervention], n: int
) -> dict[int, list[tuple[Any, int, float]]]:
    F = rm.transcoder.cfg.num_features
    plan: dict[int, list[tuple[Any, int, float]]] = {}
    for item in interventions:
        if len(item) != 4:
            raise ValueError(f"an intervention is (layer, pos, feature, value), got {item!r}")
        layer, pos, feature, value = item
        if layer not in rm.layers:
            raise ValueError(f"layer {layer} is not covered by the transcoder (model layers {rm.layers})")
        if not 0 <= int(feature) < F:
            raise ValueError(f"feature {feature} is out of range [0, {F})")
        if pos is None:
            pos = slice(None)
        elif not isinstance(pos, slice) and not -n <= int(pos) < n:
            raise ValueError(f"position {pos} is out of range for a prompt of {n} tokens")
        plan.setdefault(rm.layers.index(layer), []).append((pos, int(feature), float(value)))
    return plan


def _apply(a: Tensor, items: list[tuple[Any, int, float]], mode: str) -> Tensor:
    out = a.clone()
    for pos, feature, value in items:
        if mode == "set":
            out[..., pos, feature] = value
        else:
            out[..., pos, feature] = out[..., pos, feature] * value
    return out


def _top(rm: ReplacementModel, logits: Tensor, k: int) -> list[tuple[str, int, float]]:
    probs = torch.softmax(logits.float(), -1)
    top = probs.topk(min(k, len(probs)))
    ids = top.indices.tolist()
    return list(zip(rm.token_strings(ids), ids, top.values.tolist()))


__all__ = ["Intervention", "InterventionResult", "intervene"]
