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
    config = model.config
    saved_impl = {"": config._attn_implementation}
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if sub is not None:
            saved_impl[key] = getattr(sub, "_attn_implementation", None)
    saved_grad = [(p, p.requires_grad) for p in model.parameters()]
    handles = []
    try:
        config._attn_implementation = FROZEN_ATTENTION
        for p, _ in saved_grad:
            p.requires_grad_(False)
        for norm in (m for m in model.modules() if _is_norm(m)):
            handles.append(norm.register_forward_hook(_NormFreezer(norm)))
        with eval_mode(model):
            yield
    finally:
        for handle in handles:
            handle.remove()
        config._attn_implementation = saved_impl if len(saved_impl) > 1 else saved_impl[""]
        for p, flag in saved_grad:
            p.requires_grad_(flag)


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
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    with torch.no_grad():
        scores = torch.matmul(query, key.transpose(-1, -2)).float() * scale
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        q_len, k_len = scores.shape[-2:]
        if attention_mask is None:
            rows = torch.arange(q_len, device=scores.device)[:, None] + (k_len - q_len)
            cols = torch.arange(k_len, device=scores.device)[None, :]
            allowed = cols <= rows
            if sliding_window is not None:
                allowed &= cols > rows - sliding_window
            scores = scores.masked_fill(~allowed, float("-inf"))
        elif attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask[..., :k_len], float("-inf"))
        else:
            scores = scores + attention_mask[..., :k_len].float()
        pattern = torch.softmax(scores, dim=-1).to(value.dtype)
    out = torch.matmul(pattern, value).transpose(1, 2).contiguous()
    return out, pattern


def register_frozen_attention() -> None:
    """Register `frozen_eager_attention` with transformers' AttentionInterface (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(FROZEN_ATTENTION, frozen_eager_attention)


def _is_norm(module: nn.Module) -> bool:
    if isinstance(module, nn.LayerNorm):
        return True
    name = type(module).__name__.lower()
    return ("rmsnorm" in name or "layernorm" in name) and isinstance(getattr(module, "weight", None), Tensor)


class _NormFreezer:
    """Forward hook: keep a norm's output, give it the gradient of the frozen-scale formula."""

    def __init__(self, module: nn.Module) -> None:
        eps = getattr(module, "variance_epsilon", None)
        eps = getattr(module, "eps", None) if eps is None else eps
        if not isinstance(eps, float):
            raise NotImplementedError(
                f"cannot freeze {type(module).__name__}: no float epsilon attribute (variance_epsilon or eps)"
            )
        self.eps = eps
        self.kind: str | None = None

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if not torch.is_grad_enabled() or not isinstance(output, Tensor):
            return None
        x = args[0]
        if not x.requires_grad:
            return None
        if self.kind is None:
            self.kind = self._identify(module, x, output)
        lin = self._linear(module, x, self.kind)
        return output.detach() + (lin - lin.detach()).to(output.dtype)

    def _linear(self, module: nn.Module, x: Tensor, kind: str) -> Tensor:
        xf = x.float()
        weight = getattr(module, "weight", None)
        bias = getattr(module, "bias", None)
        if kind == "layer":
            centred = xf - xf.mean(-1, keepdim=True)
            scale = (centred.square().mean(-1, keepdim=True) + self.eps).sqrt().detach()
            out = centred / scale
        else:
            out = xf / (xf.square().mean(-1, keepdim=True) + self.eps).sqrt().detach()
        if weight is not None:
            out = out * (weight.float() + (1.0 if kind == "rms+1" else 0.0))
        if bias is not None and kind == "layer":
            out = out + bias.float()
        return out

    def _identify(self, module: nn.Module, x: Tensor, output: Tensor) -> str:
        kinds = ("layer",) if isinstance(module, nn.LayerNorm) else ("rms", "rms+1", "layer")
        target = output.detach().float()
        tol = 1e-4 if output.dtype == torch.float32 else 2e-2
        for kind in kinds:
            with torch.no_grad():
                lin = self._linear(module, x.detach(), kind)
            if torch.allclose(lin, target, rtol=tol, atol=tol * float(target.abs().max().clamp_min(1))):
                return kind
        raise NotImplementedError(
            f"cannot freeze {type(module).__name__}: its output is neither x/rms(x)·w, "
            "x/rms(x)·(1+w) nor (x − mean)/std·w + b; add its formula to clt.attribution.frozen"
        )


__all__ = ["FROZEN_ATTENTION", "frozen", "frozen_eager_attention", "register_frozen_attention"]
