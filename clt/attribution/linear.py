"""The local replacement model of one prompt as linear maps: gradients of many targets, no batch copies.

With attention patterns, norm denominators and error terms frozen (`clt.attribution.frozen`), the
replacement model is linear from the residual stream to the targets. A pre-norm decoder layer
computes ``h' = h + O·P·V·N1(h)``, ``x = N2(h')``, ``h_next = h' + y(x)`` with N1, N2 norms at
frozen scales, P each head's frozen pattern, V and O the value and output projections, and y the
MLP replaced by the transcoder plus its constant error (a skip transcoder adds W_skip·x). The
gradient of a batch of targets with respect to every MLP output and the embeddings is then the
transposed maps applied from the top layer down::

    g_y = g;   g += N2ᵀ(targets at this layer + W_skipᵀ g);   g += N1ᵀ(Vᵀ Pᵀ Oᵀ g)

One recording pass of the prompt (batch 1) keeps, per layer, the norm scales, V, O and the queries
and keys; patterns are computed in blocks of query rows (kept when the memory plan allows, else
rebuilt for each batch). A batch of B targets costs no copy of any constant: memory is the
patterns once (at most L·heads·n²/2 floats) plus O(B·n·d), and the Q/K projections and the MLPs
never run in the batched pass. Targets at position p only need positions ≤ p, so a batch works on
the first ``max(position) + 1`` positions. The recording pass checks the layer shape on the recorded
tensors; a model whose layers differ raises `UnsupportedModelError` (`attribute` then falls back to
the autograd path of `ReplacementModel.attribution_trace`).
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from collections.abc import Callable
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
    norm_weight,
)
from clt.attribution.replacement import PromptState, ReplacementModel, base_model, first_arg, first_tensor
from clt.nnsight.splice import eval_mode

RECORDING_ATTENTION = "clt_linear_record"


class Stopwatch:
    """Seconds spent in each named part of a computation, measured between laps."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._last = time.perf_counter()

    def lap(self, part: str) -> None:
        """Count the time since the previous lap as `part`."""
        now = time.perf_counter()
        self.seconds[part] += now - self._last
        self._last = now

    def describe(self) -> str:
        """The parts by share of the total time, largest first."""
        total = sum(self.seconds.values()) or 1.0
        parts = sorted(self.seconds.items(), key=lambda item: -item[1])
        return ", ".join(f"{name} {100 * seconds / total:.0f}% ({seconds:.1f} s)" for name, seconds in parts)


class UnsupportedModelError(NotImplementedError):
    """The model's layers are not of the pre-norm shape the linear path computes (module docstring)."""


@dataclasses.dataclass
class _Norm:
    """A norm at frozen scale as a linear map (its bias is a constant)."""

    weight: Tensor | None
    """Gain [d] (float32), or None."""
    scale: Tensor
    """Frozen denominator per position [n]."""
    centred: bool
    """LayerNorm: the mean is subtracted."""

    def adjoint(self, g: Tensor) -> Tensor:
        """Nᵀ g for g [..., n', d] at the first n' positions."""
        factor = 1 / self.scale[: g.shape[-2], None]
        out = g * (factor if self.weight is None else factor * self.weight)
        return out - out.mean(-1, keepdim=True) if self.centred else out

    def adjoint_at(self, vecs: Tensor, positions: Tensor) -> Tensor:
        """Nᵀ of single vectors [k, d] at the given positions [k]."""
        out = vecs / self.scale[positions, None]
        if self.weight is not None:
            out = out * self.weight
        return out - out.mean(-1, keepdim=True) if self.centred else out


class _Attention:
    """One layer's frozen attention: patterns by blocks of query rows, value and output weights."""

    def __init__(
        self,
        query: Tensor,
        key: Tensor,
        mask: Tensor | None,
        options: dict[str, Any],
        block: int,
        keep: bool,
        watch: Stopwatch,
    ) -> None:
        self.query, self.key, self.mask, self.options = query, key, mask, options
        self.n_heads, self.n_kv, self.head_dim = query.shape[0], key.shape[0], query.shape[-1]
        self.block, self.keep = block, keep
        self.blocks: dict[int, Tensor] = {}
        self.watch = watch
        self.w_v: Tensor = torch.empty(0)
        """Value projection [n_kv · head_dim, d] (float32)."""
        self.w_o: Tensor = torch.empty(0)
        """Output projection [d, n_heads · head_dim] (float32)."""

    def pattern(self, q0: int, q1: int) -> Tensor:
        """Pattern [H, q1 − q0, q1] of query rows q0..q1−1 (q0 a multiple of the block size)."""
        kept = self.blocks.get(q0)
        if kept is not None:
            return kept if kept.shape[1] == q1 - q0 else kept[:, : q1 - q0, :q1]
        with torch.no_grad():
            p = attention_pattern(self.query[:, q0:q1], self.key[:, :q1], self.mask, first_row=q0, **self.options)
        if self.keep:
            self.blocks[q0] = p
        return p

    def forward(self, value: Tensor) -> Tensor:
        """Attention output [1, n, H, head_dim] for values [H_kv, n, head_dim] (recording pass)."""
        n, groups = value.shape[1], self.n_heads // self.n_kv
        out = value.new_empty(self.n_heads, n, self.head_dim)
        for q0 in range(0, n, self.block):
            q1 = min(q0 + self.block, n)
            p = self.pattern(q0, q1).to(value.dtype).reshape(self.n_kv, groups * (q1 - q0), q1)
            out[:, q0:q1] = torch.bmm(p, value[:, :q1]).view(self.n_heads, q1 - q0, self.head_dim)
        if self.keep:  # every block is kept: the queries and keys are no longer needed
            self.query = self.key = torch.empty(0)
        return out.transpose(0, 1)[None]

    def adjoint(self, g_out: Tensor) -> Tensor:
        """Pᵀ g: gradients at the values [H_kv, n', X] of gradients at the outputs [H, n', X]."""
        _, n1, width = g_out.shape
        groups = self.n_heads // self.n_kv
        g_v = g_out.new_zeros(self.n_kv, n1, width)
        for q0 in range(0, n1, self.block):
            q1 = min(q0 + self.block, n1)
            rows = groups * (q1 - q0)
            self.watch.lap("attention")
            p = self.pattern(q0, q1).reshape(self.n_kv, rows, q1)
            self.watch.lap("patterns")
            g_v[:, :q1].baddbmm_(p.transpose(1, 2), g_out[:, q0:q1].reshape(self.n_kv, rows, width))
        self.watch.lap("attention")
        return g_v


@dataclasses.dataclass
class _Layer:
    attn_norm: _Norm
    mlp_norm: _Norm
    attention: _Attention


class LinearReplacement:
    """The frozen replacement model of one prompt as linear maps (module docstring)."""

    def __init__(
        self,
        rm: ReplacementModel,
        state: PromptState,
        *,
        block_size: int = 256,
        keep_patterns: bool = True,
        watch: Stopwatch | None = None,
    ):
        self.rm, self.n, self.block, self.keep = rm, len(state.input_ids), block_size, keep_patterns
        self.watch = watch if watch is not None else Stopwatch()
        self.layers: list[_Layer] = []
        self.final: _Norm | None = None
        self._record(state.input_ids)
        tc = rm.transcoder
        self.skips: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
        if tc.cfg.skip_connection:
            for i, m in enumerate(rm.layers):
                w = tc.W_skip[i].detach().float()
                self.skips[m] = (w, tc.input_std[i].detach().float(), tc.output_std[i].detach().float())

    @property
    def pattern_bytes(self) -> int:
        """Bytes of the patterns kept so far."""
        return sum(p.numel() * p.element_size() for layer in self.layers for p in layer.attention.blocks.values())

    # ----------------------------------------------------------------- the batched pass

    def backward(
        self, layers: Tensor, positions: Tensor, vecs: Tensor, on_layer: Callable[[int, Tensor], None]
    ) -> Tensor:
        """Gradients of targets reading `vecs` [B, d] at (model layer, position) — layer M: the final
        hidden state — calling ``on_layer(m, g)`` with the gradient at MLP output m from the top layer
        down; returns the gradient at the embeddings [B, n', d] (n' = max position + 1).

        A target's gradient is zero above its own layer: with `layers` in descending order, the rows
        above layer m are skipped there, and ``g`` [b, n', d] holds only the first b rows (those
        with a target above m), all of them otherwise."""
        M, B = len(self.layers), len(vecs)
        n1, top = int(positions.max()) + 1, int(layers.max())
        rows = torch.arange(B)
        descending = bool((layers[:-1] >= layers[1:]).all())
        g = vecs.new_zeros(B, n1, vecs.shape[1])
        at = layers == M
        if at.any():
            v = vecs[at] if self.final is None else self.final.adjoint_at(vecs[at], positions[at])
            g.index_put_((rows[at], positions[at]), v, accumulate=True)
        for m in range(min(top, M - 1), -1, -1):
            if m < top:
                self.watch.lap("norms and targets")
                on_layer(m, g[: int((layers > m).sum())] if descending else g)
                self.watch.lap("edges")
            layer, here = self.layers[m], layers == m
            live = g[: int((layers >= m).sum())] if descending else g
            if m in self.skips:
                w, in_std, out_std = self.skips[m]
                g_x = ((live * out_std) @ w) / in_std
                g_x.index_put_((rows[here], positions[here]), vecs[here], accumulate=True)
                live += layer.mlp_norm.adjoint(g_x)
            elif here.any():
                v = layer.mlp_norm.adjoint_at(vecs[here], positions[here])
                g.index_put_((rows[here], positions[here]), v, accumulate=True)
            g_a = self._attention_adjoint(layer.attention, live)
            live += layer.attn_norm.adjoint(g_a)
        self.watch.lap("norms and targets")
        return g

    def _attention_adjoint(self, att: _Attention, g: Tensor) -> Tensor:
        B, n1, _ = g.shape
        H, kv, dh = att.n_heads, att.n_kv, att.head_dim
        self.watch.lap("norms and targets")
        g_out = (g @ att.w_o).view(B, n1, H, dh).permute(2, 1, 0, 3).reshape(H, n1, B * dh)
        self.watch.lap("projections")
        g_v = att.adjoint(g_out).view(kv, n1, B, dh).permute(2, 1, 0, 3).reshape(B, n1, kv * dh)
        g_a = g_v @ att.w_v
        self.watch.lap("projections")
        return g_a

    # ----------------------------------------------------------------- the recording pass

    def _record(self, ids: Tensor) -> None:
        """One frozen forward pass (batch 1) that keeps what the batched pass needs, with checks."""
        from transformers import AttentionInterface

        model, layout = self.rm.model, self.rm.layout
        blocks = [model.get_submodule(p) for p in layout.layer_paths]
        mlps = [model.get_submodule(p) for p in layout.mlp_paths]
        final_norm = model.get_submodule(layout.final_norm_path) if layout.final_norm_path else None
        seen: dict[str, Any] = {"calls": [], "attention": None, "final": None}

        def attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, **kw: Any):
            if kw.get("s_aux") is not None:
                raise UnsupportedModelError("attention sinks (s_aux) are not supported by the linear path")
            options = {"scaling": kw.get("scaling"), "softcap": kw.get("softcap")}
            options["sliding_window"] = kw.get("sliding_window")
            if mask is not None:
                _check_causal(mask)
            att = _Attention(
                query[0].contiguous(),
                key[0].contiguous(),
                None if mask is None else mask[0],
                options,
                self.block,
                self.keep,
                self.watch,
            )
            out = att.forward(value[0])
            seen["attention"] = (module, att, value[0], out)
            return out, None

        def on_block(m: int) -> Callable:
            def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
                seen["calls"], seen["attention"], seen["input"] = [], None, first_arg(args, kwargs)[0]

            def post(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
                self.layers.append(self._layer(m, seen, first_tensor(output)[0], mlps[m]))

            return pre, post

        def on_child(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            seen["calls"].append((module, first_arg(args, kwargs)[0], first_tensor(output)[0]))

        def on_final(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            seen["final"] = (module, first_arg(args, kwargs)[0], first_tensor(output)[0])

        AttentionInterface.register(RECORDING_ATTENTION, attention)
        handles = []
        try:
            for m, block in enumerate(blocks):
                pre, post = on_block(m)
                handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
                handles.append(block.register_forward_hook(post, with_kwargs=True))
                for child in block.children():
                    handles.append(child.register_forward_hook(on_child, with_kwargs=True))
            if final_norm is not None:
                handles.append(final_norm.register_forward_hook(on_final, with_kwargs=True))
            with torch.no_grad(), attention_implementation(model, RECORDING_ATTENTION), eval_mode(model):
                out = base_model(model)(input_ids=ids[None], use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        last = out[0] if isinstance(out, tuple) else out.last_hidden_state
        if final_norm is None:
            return
        if seen["final"] is None:
            raise UnsupportedModelError(f"the final norm {layout.final_norm_path} was not called")
        module, x, y = seen["final"]
        _check(x, seen["input"], "final norm input vs the last layer output")
        _check(y, last, "final norm output vs the last hidden state")
        self.final = _frozen_norm(module, x, y)

    def _layer(self, m: int, seen: dict[str, Any], output: Tensor, mlp: nn.Module) -> _Layer:
        """Check layer m's recorded calls against the pre-norm shape and keep its linear maps."""
        calls, recorded = seen["calls"], seen["attention"]
        kinds = [type(c[0]).__name__ for c in calls]
        where = f"layer {m} ({type(self.rm.model).__name__})"
        if recorded is None or len(calls) != 4:
            raise UnsupportedModelError(f"{where} calls {kinds}; the linear path needs norm, attention, norm, MLP")
        (n1, x1, y1), (attn, x_attn, attn_out), (n2, x2, y2), (mlp_call, x_mlp, y_mlp) = calls
        module, att, value, iface_out = recorded
        if not (is_norm(n1) and is_norm(n2) and _within(module, attn) and _within(mlp, mlp_call)):
            raise UnsupportedModelError(f"{where} calls {kinds}; the linear path needs norm, attention, norm, MLP")
        h = seen["input"]
        _check(x1, h, f"{where}: first norm input vs the layer input")
        _check(y1, x_attn, f"{where}: first norm output vs the attention input")
        _check(x2, h + attn_out, f"{where}: second norm input vs the residual after attention")
        _check(y2, x_mlp, f"{where}: second norm output vs the MLP input")
        _check(output, x2 + y_mlp, f"{where}: layer output vs the residual after the MLP")
        att.w_v, att.w_o = _projections(module, att, x_attn.shape[-1])
        flat = value.transpose(0, 1).reshape(value.shape[1], -1)
        _check_affine(flat, x_attn[0].float() @ att.w_v.T, f"{where}: value projection")
        _check_affine(attn_out[0], iface_out[0].reshape(flat.shape[0], -1).float() @ att.w_o.T, f"{where}: output")
        seen["input"] = output
        return _Layer(_frozen_norm(n1, x1, y1), _frozen_norm(n2, x2, y2), att)


def _within(module: nn.Module, container: nn.Module) -> bool:
    return module is container or any(module is sub for sub in container.modules())


def _tolerance(t: Tensor) -> float:
    return 1e-4 if t.dtype == torch.float32 else 2e-2


def _check(actual: Tensor, expected: Tensor, what: str) -> None:
    if actual is expected:
        return
    scale = float(expected.detach().abs().max().clamp_min(1))
    error = float((actual.detach().float() - expected.detach().float()).abs().max())
    if error > _tolerance(actual) * scale:
        raise UnsupportedModelError(f"{what} differ by {error:.3g}; the linear path needs a pre-norm decoder layer")


def _check_affine(actual: Tensor, linear: Tensor, what: str) -> None:
    """`actual` equals `linear` plus a constant (a bias) at every position."""
    offset = actual.detach().float() - linear
    _check(offset, offset[:1].expand_as(offset), f"{what} (offset from the extracted weights)")


def _check_causal(mask: Tensor) -> None:
    """A given attention mask must hide every later key (the batched pass truncates keys)."""
    n = mask.shape[-1]
    rows = mask[..., -n:, :] if mask.shape[-2] >= n else None
    upper = torch.ones(n, n, dtype=torch.bool, device=mask.device).triu(1)
    if rows is not None:
        above = rows[..., upper]
        if not (above.any() if mask.dtype == torch.bool else above.float().gt(-1e4).any()):
            return
    raise UnsupportedModelError("the attention mask is not causal; the linear path needs a causal mask")


def _frozen_norm(module: nn.Module, x: Tensor, y: Tensor) -> _Norm:
    kind = norm_kind(module, x, y)
    scale = norm_scale(x[0].detach(), kind, norm_epsilon(module)).squeeze(-1)
    return _Norm(norm_weight(module, kind), scale, kind == "layer")


def _projections(module: nn.Module, att: _Attention, d: int) -> tuple[Tensor, Tensor]:
    """Value [H_kv·dh, d] and output [d, H·dh] weights (float32) of an attention module."""
    kv, heads = att.n_kv * att.head_dim, att.n_heads * att.head_dim

    def weight(name: str) -> Tensor:  # as [out, in]; transformers' Conv1D stores [in, out]
        sub = getattr(module, name)
        w = sub.weight.detach().float()
        return w if isinstance(sub, nn.Linear) else w.T

    if hasattr(module, "v_proj") and hasattr(module, "o_proj"):
        w_v, w_o = weight("v_proj"), weight("o_proj")
    elif hasattr(module, "c_attn") and hasattr(module, "c_proj"):
        w_v, w_o = weight("c_attn")[-kv:], weight("c_proj")
    elif hasattr(module, "qkv_proj") and hasattr(module, "o_proj"):
        w_v, w_o = weight("qkv_proj")[-kv:], weight("o_proj")
    else:
        raise UnsupportedModelError(
            f"{type(module).__name__} has no value/output projection the linear path knows "
            "(v_proj/o_proj, c_attn/c_proj, qkv_proj/o_proj)"
        )
    if tuple(w_v.shape) != (kv, d) or tuple(w_o.shape) != (d, heads):
        raise UnsupportedModelError(
            f"{type(module).__name__}: value/output weights {list(w_v.shape)}/{list(w_o.shape)} do not fit "
            f"{att.n_heads} heads of {att.head_dim} ({att.n_kv} key/value heads) and d_model {d}"
        )
    return w_v.contiguous(), w_o.contiguous()


__all__ = ["LinearReplacement", "Stopwatch", "UnsupportedModelError"]
