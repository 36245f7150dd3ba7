"""Attention patterns and norm denominators pinned to the values of a clean run (interventions).

`clt.attribution.frozen` detaches patterns and norm scales for gradients; an intervention that
"freezes attention" needs their *values* held at the clean run's while the residual stream
changes (circuit-tracer's ``freeze_attention`` and, over all layers, its frozen layernorm
denominators). `record_pinned` runs the prompt once and keeps every attention module's softmax
pattern and every norm's denominator; inside `pinned(model, values)` the attention output is the
kept pattern times the live values, and each norm divides its live input by the kept denominator.
Both apply to a forward pass over the recorded prompt's positions only (the first step of a
generation); a pass of another length raises a clear error.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from clt.attribution.frozen import (
    attention_implementation,
    attention_pattern,
    is_norm,
    norm_epsilon,
    norm_kind,
    norm_scale,
)
from clt.nnsight.splice import eval_mode

RECORD_ATTENTION = "clt_record_patterns"
PINNED_ATTENTION = "clt_pinned_patterns"


@dataclasses.dataclass
class PinnedValues:
    """Attention patterns and norm denominators of one clean forward pass (batch 1)."""

    patterns: dict[nn.Module, Tensor]
    """Softmax pattern [1, H, n, n] (float32) by attention module."""
    scales: dict[nn.Module, Tensor]
    """Denominator [1, n, 1] (float32) by norm module."""
    kinds: dict[nn.Module, str]
    """Formula of each norm (`clt.attribution.frozen.norm_kind`)."""
    n_tokens: int
    """Length of the recorded prompt."""


_ACTIVE: list[PinnedValues] = []
"""The values the registered pinned attention reads (innermost `pinned` context last)."""


def _eager(pattern: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
    groups = pattern.shape[1] // value.shape[1]
    if groups > 1:
        value = value.repeat_interleave(groups, dim=1)
    out = torch.matmul(pattern.to(value.dtype), value).transpose(1, 2).contiguous()
    return out, pattern


def _record_attention(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, **kw: Any
) -> tuple[Tensor, Tensor]:
    if kw.get("s_aux") is not None:
        raise NotImplementedError("attention sinks (s_aux) are not supported by pinned attention")
    options = {k: kw.get(k) for k in ("scaling", "softcap", "sliding_window")}
    pattern = attention_pattern(query, key, attention_mask, **options)
    _ACTIVE[-1].patterns[module] = pattern
    return _eager(pattern, value)


def _pinned_attention(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, **kw: Any
) -> tuple[Tensor, Tensor]:
    pattern = _ACTIVE[-1].patterns.get(module)
    if pattern is None:
        raise RuntimeError(f"no recorded attention pattern for {type(module).__name__}; record_pinned first")
    if pattern.shape[-2] != query.shape[-2] or pattern.shape[-1] != key.shape[-2]:
        raise ValueError(
            f"frozen attention holds patterns of {pattern.shape[-2]} positions but this pass has "
            f"{query.shape[-2]} queries and {key.shape[-2]} keys; freeze only the prompt's pass"
        )
    return _eager(pattern, value)


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(RECORD_ATTENTION, _record_attention)
    AttentionInterface.register(PINNED_ATTENTION, _pinned_attention)


@torch.no_grad()
def record_pinned(model: nn.Module, ids: Tensor) -> PinnedValues:
    """Patterns and norm denominators of the model's forward pass over token ids [n] (module docstring)."""
    _register()
    values = PinnedValues({}, {}, {}, len(ids))
    handles = []

    def on_norm(module: nn.Module, args: tuple, output: Any) -> None:
        x = args[0]
        kind = norm_kind(module, x, output)
        values.kinds[module] = kind
        values.scales[module] = norm_scale(x, kind, norm_epsilon(module))

    try:
        _ACTIVE.append(values)
        for norm in (m for m in model.modules() if is_norm(m)):
            handles.append(norm.register_forward_hook(on_norm))
        with attention_implementation(model, RECORD_ATTENTION), eval_mode(model):
            model(input_ids=ids[None], use_cache=False)
    finally:
        _ACTIVE.remove(values)
        for handle in handles:
            handle.remove()
    return values


@contextlib.contextmanager
def pinned(model: nn.Module, values: PinnedValues, *, attention: bool = True, norms: bool = False) -> Iterator[None]:
    """Hold attention patterns (`attention`) and norm denominators (`norms`) at `values` until exit."""
    _register()
    handles = []

    def on_norm(module: nn.Module, args: tuple, output: Any) -> Tensor:
        x, scale = args[0], values.scales[module]
        if x.shape[-2] != scale.shape[-2]:
            raise ValueError(
                f"frozen norms hold denominators of {scale.shape[-2]} positions but this pass has "
                f"{x.shape[-2]}; freeze only the prompt's pass"
            )
        return _pinned_norm(module, x, scale, values.kinds[module]).to(output.dtype)

    try:
        _ACTIVE.append(values)
        if norms:
            for norm in values.scales:
                handles.append(norm.register_forward_hook(on_norm))
        with contextlib.ExitStack() as stack:
            if attention:
                stack.enter_context(attention_implementation(model, PINNED_ATTENTION))
            yield
    finally:
        _ACTIVE.remove(values)
        for handle in handles:
            handle.remove()


def _pinned_norm(module: nn.Module, x: Tensor, scale: Tensor, kind: str) -> Tensor:
    """A norm's output for input x with its denominator held at `scale`."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    if kind == "layer":
        xf = xf - xf.mean(-1, keepdim=True)
    out = xf / scale
    weight = getattr(module, "weight", None)
    if weight is not None:
        out = out * (weight.to(out.dtype) + (1.0 if kind == "rms+1" else 0.0))
    bias = getattr(module, "bias", None)
    if bias is not None and kind == "layer":
        out = out + bias.to(out.dtype)
    return out


__all__ = ["PinnedValues", "pinned", "record_pinned"]
