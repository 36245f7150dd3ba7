"""Freeze a model for attribution: attention patterns and normalisation scales without gradient.

- Attention: a function registered with transformers' ``AttentionInterface`` computes eager
  attention (applying the causal mask itself) with the softmax output detached.
- Norms: a forward hook on every RMSNorm/LayerNorm returns the module's own output with the
  gradient of ``x / rms(x)·w`` (or ``(x − mean)/std·w + b``) at the frozen scale, so values stay
  bit-identical.

Inside `frozen(model)` the map from MLP outputs and embeddings to later MLP inputs and logits is
then linear; every hook, attribute and flag is restored on exit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from clt.nnsight.splice import eval_mode

FROZEN_ATTENTION = "clt_frozen_eager"


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Freeze attention patterns and norm scales (and model parameters' grads) until exit."""
    register_frozen_attention()
    saved_grad = [(p, p.requires_grad) for p in model.parameters()]
    handles = []
    try:
        for p, _ in saved_grad:
            p.requires_grad_(False)
        for norm in (m for m in model.modules() if is_norm(m)):
            handles.append(norm.register_forward_hook(_NormFreezer(norm)))
        with attention_implementation(model, FROZEN_ATTENTION), eval_mode(model):
            yield
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in saved_grad:
            p.requires_grad_(flag)


@contextlib.contextmanager
def attention_implementation(model: nn.Module, name: str) -> Iterator[None]:
    """Run the model's attention through the registered function `name` until exit."""
    config = model.config
    saved_impl = {"": config._attn_implementation}
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if sub is not None:
            saved_impl[key] = getattr(sub, "_attn_implementation", None)
    try:
        config._attn_implementation = name
        yield
    finally:
        config._attn_implementation = saved_impl if len(saved_impl) > 1 else saved_impl[""]


def frozen_eager_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor]:
    """Eager attention whose pattern is computed without gradient (frozen); causal mask applied."""
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("attention sinks (s_aux) are not supported by the frozen attention")
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    with torch.no_grad():
        pattern = attention_pattern(query, key, attention_mask, scaling, softcap, sliding_window).to(value.dtype)
    out = torch.matmul(pattern, value).transpose(1, 2).contiguous()
    return out, pattern


def attention_pattern(
    query: Tensor,
    key: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    softcap: float | None = None,
    sliding_window: int | None = None,
    first_row: int | None = None,
) -> Tensor:
    """Softmax pattern [..., H, q, k] (float32) of query rows [..., H, q, d] against keys
    [..., H_kv, k, d] (H a multiple of H_kv: query head h reads key head h // (H / H_kv)).

    The query rows are positions ``first_row .. first_row + q - 1`` (default: the last q of the k
    positions); without a mask the causal (and sliding-window) mask is applied here, else the
    mask's rows for those positions and its first k columns."""
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    heads, q_rows, groups = query.shape[-3], query.shape[-2], query.shape[-3] // key.shape[-3]
    if groups > 1:  # grouped query heads: one matmul per key head, no repeated keys
        grouped = query.reshape(*query.shape[:-3], key.shape[-3], groups * q_rows, query.shape[-1])
        scores = torch.matmul(grouped, key.transpose(-1, -2)).view(*query.shape[:-3], heads, q_rows, key.shape[-2])
    else:
        scores = torch.matmul(query, key.transpose(-1, -2))
    scores = scores.float() * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    q_len, k_len = scores.shape[-2:]
    start = k_len - q_len if first_row is None else first_row
    if attention_mask is None:
        rows = torch.arange(q_len, device=scores.device)[:, None] + start
        cols = torch.arange(k_len, device=scores.device)[None, :]
        allowed = cols <= rows
        if sliding_window is not None:
            allowed &= cols > rows - sliding_window
        scores = scores.masked_fill(~allowed, float("-inf"))
    else:
        mask = attention_mask[..., :k_len]
        if mask.shape[-2] > 1:
            mask = mask[..., -q_len:, :] if first_row is None else mask[..., start : start + q_len, :]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    return torch.softmax(scores, dim=-1)


def register_frozen_attention() -> None:
    """Register `frozen_eager_attention` with transformers' AttentionInterface (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(FROZEN_ATTENTION, frozen_eager_attention)


def is_norm(module: nn.Module) -> bool:
    """Whether a module is a LayerNorm or an RMSNorm-like module with a weight."""
    if isinstance(module, nn.LayerNorm):
        return True
    name = type(module).__name__.lower()
    return ("rmsnorm" in name or "layernorm" in name) and isinstance(getattr(module, "weight", None), Tensor)


def norm_epsilon(module: nn.Module) -> float:
    """The epsilon of a norm module (``variance_epsilon`` or ``eps``)."""
    eps = getattr(module, "variance_epsilon", None)
    eps = getattr(module, "eps", None) if eps is None else eps
    if not isinstance(eps, float):
        raise NotImplementedError(
            f"cannot freeze {type(module).__name__}: no float epsilon attribute (variance_epsilon or eps)"
        )
    return eps


def norm_kind(module: nn.Module, x: Tensor, output: Tensor) -> str:
    """Which formula a norm computes: 'rms' (x/rms(x)·w), 'rms+1' (x/rms(x)·(1+w)) or 'layer'."""
    kinds = ("layer",) if isinstance(module, nn.LayerNorm) else ("rms", "rms+1", "layer")
    target = output.detach().float()
    tol = 1e-4 if output.dtype == torch.float32 else 2e-2
    eps = norm_epsilon(module)
    for kind in kinds:
        with torch.no_grad():
            lin = norm_linear(module, x.detach(), kind, eps)
        if torch.allclose(lin, target, rtol=tol, atol=tol * float(target.abs().max().clamp_min(1))):
            return kind
    raise NotImplementedError(
        f"cannot freeze {type(module).__name__}: its output is neither x/rms(x)·w, "
        "x/rms(x)·(1+w) nor (x − mean)/std·w + b; add its formula to clt.attribution.frozen"
    )


def norm_scale(x: Tensor, kind: str, eps: float) -> Tensor:
    """The frozen denominator [..., 1] (float32) of a norm of `kind` for inputs x."""
    xf = x.float()
    if kind == "layer":
        xf = xf - xf.mean(-1, keepdim=True)
    return (xf.square().mean(-1, keepdim=True) + eps).sqrt()


def norm_weight(module: nn.Module, kind: str) -> Tensor | None:
    """The float32 gain a norm of `kind` multiplies by (None: no weight)."""
    weight = getattr(module, "weight", None)
    if weight is None:
        return None
    return weight.detach().float() + (1.0 if kind == "rms+1" else 0.0)


def norm_linear(module: nn.Module, x: Tensor, kind: str, eps: float) -> Tensor:
    """The norm's output computed with a detached (frozen) scale: linear in x but for the bias."""
    xf = x.float()
    if kind == "layer":
        xf = xf - xf.mean(-1, keepdim=True)
    out = xf / norm_scale(x, kind, eps).detach()
    weight = getattr(module, "weight", None)
    if weight is not None:
        out = out * (weight.float() + (1.0 if kind == "rms+1" else 0.0))
    bias = getattr(module, "bias", None)
    if bias is not None and kind == "layer":
        out = out + bias.float()
    return out


class _NormFreezer:
    """Forward hook: keep a norm's output, give it the gradient of the frozen-scale formula."""

    def __init__(self, module: nn.Module) -> None:
        self.eps = norm_epsilon(module)
        self.kind: str | None = None

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if not torch.is_grad_enabled() or not isinstance(output, Tensor):
            return None
        x = args[0]
        if not x.requires_grad:
            return None
        if self.kind is None:
            self.kind = norm_kind(module, x, output)
        lin = norm_linear(module, x, self.kind, self.eps)
        return output.detach() + (lin - lin.detach()).to(output.dtype)


__all__ = [
    "FROZEN_ATTENTION",
    "attention_implementation",
    "attention_pattern",
    "frozen",
    "frozen_eager_attention",
    "is_norm",
    "norm_epsilon",
    "norm_kind",
    "norm_linear",
    "norm_scale",
    "norm_weight",
    "register_frozen_attention",
]
