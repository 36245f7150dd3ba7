"""ReplacementModel: a language model whose MLPs are replaced by a transcoder, frozen for a prompt.

For one prompt the *local replacement model* keeps the model's computation except that

- every covered MLP output is the transcoder's reconstruction ŷ plus a constant error term
  e = y − ŷ (an MLP the transcoder does not cover keeps its output as a constant error);
- attention patterns are detached: a function registered with transformers' ``AttentionInterface``
  computes eager attention (applying the causal mask itself) with the softmax output detached;
- normalisation denominators are detached: a forward hook on every RMSNorm/LayerNorm returns the
  module's own output with the gradient of ``x / rms(x)·w`` (or ``(x − mean)/std·w + b``) at the
  frozen scale, so values stay bit-identical.

Then the map from feature activations, error terms and token embeddings to the MLP inputs and
logits is linear (affine, with the model's biases and b_dec constant), and the replacement logits
equal the model's. The model is only changed inside `ReplacementModel.frozen()` and the internal
patches; every hook, attribute and flag is restored on exit.

The transcoder is used in raw activation space: encoder rows W_enc/σ_in, decoder rows W_dec·σ_out
(see `raw_encoder`, `raw_decoder`). A model layer ``layers[i]`` holds transcoder layer ``i``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from clt.config.constants import layer_span
from clt.models.transcoder import CrossLayerTranscoder
from clt.nnsight.models import ModelLayout, find_layout

FROZEN_ATTENTION = "clt_frozen_eager"
_FAR_BELOW = -1e9


class TranscoderMismatchError(ValueError):
    """The transcoder was not trained for this model (layers or width differ)."""


@dataclasses.dataclass
class PromptState:
    """One clean forward pass of a prompt, and the transcoder's view of it (rows: positions)."""

    input_ids: Tensor
    """Token ids [n]."""
    logits: Tensor
    """Model logits [n, vocab] (float32)."""
    embeddings: Tensor
    """Input of the first block [n, d] (token plus positional embedding where the model has one)."""
    mlp_inputs: Tensor
    """MLP inputs x [n, M, d] for all M model layers."""
    mlp_outputs: Tensor
    """MLP outputs y [n, M, d]."""
    preactivations: Tensor
    """Encoder pre-activations z [n, L, F]."""
    activations: Tensor
    """Feature activations a [n, L, F] (zero at the BOS position when it is zeroed)."""
    reconstruction: Tensor
    """Transcoder output ŷ [n, M, d] in raw space (0 at layers it does not cover)."""
    errors: Tensor
    """Error terms e = y − ŷ [n, M, d] (0 at the BOS position when it is zeroed)."""
    zeroed_positions: list[int]
    """Positions whose features and errors were zeroed (the BOS position, or none)."""


class ReplacementModel:
    """A causal LM with its MLPs replaced by a transcoder plus constant errors (module docstring)."""

    def __init__(self, model: nn.Module, transcoder: CrossLayerTranscoder, tokenizer: Any = None) -> None:
        self.model = model
        self.transcoder = transcoder
        self.tokenizer = tokenizer
        transcoder.require_mlp_replacement("attribution (the local replacement model)")
        self.layout: ModelLayout = find_layout(model)
        cfg = transcoder.cfg
        if cfg.d_model != self.layout.d_model or max(cfg.layers) >= self.layout.num_layers:
            raise TranscoderMismatchError(
                f"the transcoder (layers {layer_span(cfg.layers)}, d_model {cfg.d_model}) does not fit "
                f"the model ({self.layout.num_layers} layers, d_model {self.layout.d_model}); use a "
                "transcoder trained on this model"
            )
        self.layers: list[int] = list(cfg.layers)
        """Model layer of each transcoder layer."""
        self._mlps = [model.get_submodule(p) for p in self.layout.mlp_paths]
        self._first_block = model.get_submodule(self.layout.layer_paths[0])
        self._norms = [m for m in model.modules() if _is_norm(m)]
        self._tc_index = {m: i for i, m in enumerate(self.layers)}

    # ----------------------------------------------------------------- sizes and tokens

    @property
    def n_layers(self) -> int:
        """Number of model layers M."""
        return self.layout.num_layers

    @property
    def context_length(self) -> int | None:
        """Longest prompt the model accepts (from its config), if it says."""
        config = self.model.config
        for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
            value = getattr(config, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    @property
    def unembedding(self) -> Tensor:
        """Unembedding matrix [vocab, d]."""
        return self.model.get_output_embeddings().weight

    def tokenize(self, prompt: str | Sequence[int] | Tensor, *, prepend_bos: bool = True) -> Tensor:
        """Token ids [n] of a text (BOS prepended as in extraction) or of given ids (kept as is)."""
        if isinstance(prompt, str):
            if not prompt.strip():
                raise ValueError("the prompt is empty; give some text to attribute")
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer: pass tokenizer=... or token ids")
            from clt.data.corpus import encode_prompt

            ids = torch.tensor(encode_prompt(self.tokenizer, prompt, prepend_bos=prepend_bos))
        else:
            ids = torch.as_tensor(prompt, dtype=torch.long).flatten()
            if ids.numel() == 0:
                raise ValueError("the prompt is empty (no token ids); give at least one token")
        limit = self.context_length
        if limit is not None and len(ids) > limit:
            raise ValueError(f"the prompt has {len(ids)} tokens but the model's context is {limit}; shorten it")
        if int(ids.max()) >= self.layout.vocab_size or int(ids.min()) < 0:
            raise ValueError(
                f"token ids must lie in [0, {self.layout.vocab_size}); got {int(ids.min())}..{int(ids.max())}"
            )
        return ids.to(self.device)

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """Decoded text of each token id (the id itself without a tokenizer)."""
        if self.tokenizer is None:
            return [str(int(i)) for i in ids]
        return [self.tokenizer.decode([int(i)]) for i in ids]

    def is_special(self, token_id: int) -> bool:
        """Whether a token id is a special token (BOS and friends)."""
        specials = set(getattr(self.tokenizer, "all_special_ids", None) or [])
        specials.add(getattr(self.model.config, "bos_token_id", None))
        return int(token_id) in specials

    @property
    def device(self) -> torch.device:
        """Device of the model's parameters."""
        return next(self.model.parameters()).device

    # ----------------------------------------------------------------- transcoder in raw space

    def raw_encoder(self, layer: int, features: Tensor) -> Tensor:
        """Encoder rows [k, d] acting on raw MLP inputs (W_enc/σ_in) of transcoder layer `layer`."""
        tc = self.transcoder
        return tc.W_enc[layer, features].float() / tc.input_std[layer]

    def raw_decoder(self, layer: int, features: Tensor | None = None) -> Tensor:
        """Decoder rows [k, J, d] writing raw MLP outputs (W_dec·σ_out) of transcoder layer `layer`."""
        tc = self.transcoder
        w = tc.W_dec[layer] if features is None else tc.W_dec[layer][features]
        return w.float() * tc.output_std[layer : layer + w.shape[1]]

    def raw_bias(self, layer: int) -> Tensor:
        """Constant part of transcoder layer `layer`'s raw reconstruction (b_dec·σ_out + μ_out) [d]."""
        tc = self.transcoder
        return tc.b_dec[layer].float() * tc.output_std[layer] + tc.output_mean[layer]

    def raw_skip(self, layer: int, x: Tensor) -> Tensor | None:
        """The skip term of transcoder layer `layer` for raw inputs x [..., d] (None without skip)."""
        tc = self.transcoder
        if not tc.cfg.skip_connection:
            return None
        x_std = (x.float() - tc.input_mean[layer]) / tc.input_std[layer]
        return (x_std @ tc.W_skip[layer].float().T) * tc.output_std[layer]

    def layer_activations(self, layer: int, x: Tensor) -> Tensor:
        """Features [..., F] of transcoder layer `layer` from raw inputs x [..., d] (eval rule)."""
        tc = self.transcoder
        z_l = (x.float() - tc.input_mean[layer]) / tc.input_std[layer] @ tc.W_enc[layer].float().T
        z_l = z_l + tc.b_enc[layer].float()
        z = z_l.new_full((*z_l.shape[:-1], tc.cfg.num_layers, tc.cfg.num_features), _FAR_BELOW)
        z[..., layer, :] = z_l
        with _eval(tc):
            return tc.activate(z.to(tc.W_enc.dtype))[..., layer, :].float()

    # ----------------------------------------------------------------- clean pass

    @torch.no_grad()
    def prepare(
        self, prompt: str | Sequence[int] | Tensor, *, zero_bos: bool = False, prepend_bos: bool = True
    ) -> PromptState:
        """Run the model once on a prompt and compute features, reconstruction and errors."""
        ids = self.tokenize(prompt, prepend_bos=prepend_bos)
        record: dict[str, Any] = {"x": [None] * self.n_layers, "y": [None] * self.n_layers}

        def on_mlp(m: int, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            record["x"][m] = _first_arg(args, kwargs)[0][0]
            record["y"][m] = _first_tensor(output)[0][0]

        with (
            _hooks(self._first_block, pre=lambda mod, a, k: record.__setitem__("emb", _first_arg(a, k)[0])),
            contextlib.ExitStack() as stack,
        ):
            for m, mlp in enumerate(self._mlps):
                stack.enter_context(_hooks(mlp, post=functools.partial(on_mlp, m)))
            with _eval(self.model):
                logits = self.model(input_ids=ids[None], use_cache=False).logits[0].float()
        x = torch.stack(record["x"], 1).float()
        y = torch.stack(record["y"], 1).float()
        tc = self.transcoder
        with _eval(tc):
            x_tc = x[:, self.layers].to(tc.W_enc.dtype)
            z = tc.preactivations(x_tc)
            a = tc.activate(z)
            zeroed = [0] if zero_bos and self.is_special(int(ids[0])) else []
            a[zeroed] = 0
            recon = torch.zeros_like(y)
            recon[:, self.layers] = tc.decode(a, x_tc if tc.cfg.skip_connection else None).float()
        errors = y - recon
        errors[zeroed] = 0
        return PromptState(ids, logits, record["emb"][0].float(), x, y, z.float(), a.float(), recon, errors, zeroed)

    # ----------------------------------------------------------------- frozen model

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Freeze attention patterns and norm scales (and model parameters' grads) until exit."""
        model = self.model
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
            for norm in self._norms:
                handles.append(norm.register_forward_hook(_NormFreezer(norm)))
            with _eval(model):
                yield
        finally:
            for handle in handles:
                handle.remove()
            config._attn_implementation = saved_impl if len(saved_impl) > 1 else saved_impl[""]
            for p, flag in saved_grad:
                p.requires_grad_(flag)

    @contextlib.contextmanager
    def replaced_mlps(self, fn: Callable[[int, Tensor], Tensor]) -> Iterator[None]:
        """Make model layer m's MLP return fn(m, x) for its input x, until exit."""
        saved = []
        try:
            for m, mlp in enumerate(self._mlps):
                saved.append((mlp, mlp.__dict__.get("forward")))

                def forward(*args: Any, _m: int = m, **kwargs: Any) -> Tensor:
                    return fn(_m, _first_arg(args, kwargs)[0])

                mlp.forward = forward
            yield
        finally:
            for mlp, previous in saved:
                if previous is None:
                    del mlp.forward
                else:
                    mlp.forward = previous

    def forward(
        self, prompt: str | Sequence[int] | Tensor, *, prepend_bos: bool = True, state: PromptState | None = None
    ) -> Tensor:
        """Logits [n, vocab] of the frozen replacement model (ŷ from live inputs + constant errors)."""
        state = state if state is not None else self.prepare(prompt, prepend_bos=prepend_bos)
        pending: dict[int, Tensor] = {}
        keep = torch.ones(len(state.input_ids), 1, device=state.errors.device)
        keep[state.zeroed_positions] = 0  # zeroed positions: the MLP output stays constant

        def mlp(m: int, x: Tensor) -> Tensor:
            # y + ŷ(x) − ŷ(x_clean) = ŷ(x) + e, written so that y comes back exactly at x_clean
            y = state.mlp_outputs[:, m]
            i = self._tc_index.get(m)
            if i is None:
                return y.to(x.dtype).expand_as(x)
            x_clean = state.mlp_inputs[:, m]
            a = self.layer_activations(i, x) - self.layer_activations(i, x_clean)
            dec = self.raw_decoder(i)
            for j in range(dec.shape[1]):
                pending[i + j] = pending.get(i + j, 0) + a @ dec[:, j]
            delta = pending.pop(i)
            skip = self.raw_skip(i, x)
            if skip is not None:
                delta = delta + skip - self.raw_skip(i, x_clean)
            return (y + delta * keep).to(x.dtype)

        with self.frozen(), self.replaced_mlps(mlp):
            return self.model(input_ids=state.input_ids[None], use_cache=False).logits[0].float()

    __call__ = forward

    def attribution_trace(self, state: PromptState, batch_size: int) -> AttributionTrace:
        """Frozen forward of the prompt copied `batch_size` times, MLP outputs as gradient leaves."""
        ids = state.input_ids[None].expand(batch_size, -1)
        shape = (batch_size, *state.embeddings.shape)
        leaves: list[Tensor] = [None] * self.n_layers  # type: ignore[list-item]
        inputs: list[Tensor] = [None] * self.n_layers  # type: ignore[list-item]
        captured: dict[str, Tensor] = {}

        def embed(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            h, where = _first_arg(args, kwargs)
            leaf = h.detach().clone().requires_grad_(True)
            captured["emb"] = leaf
            return _replace_arg(args, kwargs, where, leaf)

        def mlp(m: int, x: Tensor) -> Tensor:
            inputs[m] = x
            y = state.mlp_outputs[:, m].to(x.dtype).expand(shape)
            i = self._tc_index.get(m)
            skip = None if i is None else self.raw_skip(i, x)
            if skip is None:
                leaves[m] = y.clone().requires_grad_(True)
                return leaves[m]
            skip = skip.to(x.dtype)
            leaves[m] = (y - skip).detach().requires_grad_(True)
            return skip + leaves[m]

        with torch.enable_grad(), self.frozen(), self.replaced_mlps(mlp), _hooks(self._first_block, pre=embed):
            out = _base_model(self.model)(input_ids=ids, use_cache=False)
        final = out[0] if isinstance(out, tuple) else out.last_hidden_state
        return AttributionTrace(captured["emb"], leaves, inputs, final)


@dataclasses.dataclass
class AttributionTrace:
    """Tensors of one frozen forward pass with gradient leaves (all [batch, n, d])."""

    embeddings: Tensor
    """Leaf: input of the first block."""
    mlp_outputs: list[Tensor]
    """Leaf per model layer: the part of the MLP output that nodes write to."""
    mlp_inputs: list[Tensor]
    """MLP input per model layer (a feature's input reads it)."""
    final: Tensor
    """Last hidden state after the final norm (the unembedding's input)."""


# --------------------------------------------------------------------- attention


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


# --------------------------------------------------------------------- norms


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
            "x/rms(x)·(1+w) nor (x − mean)/std·w + b; add its formula to clt.attribution.replacement"
        )


# --------------------------------------------------------------------- helpers


def _first_arg(args: tuple, kwargs: dict) -> tuple[Tensor, Any]:
    if args:
        return args[0], 0
    for key in ("hidden_states", "x", "input", "hidden_state"):
        if key in kwargs:
            return kwargs[key], key
    key = next(iter(kwargs))
    return kwargs[key], key


def _replace_arg(args: tuple, kwargs: dict, where: Any, value: Tensor) -> tuple[tuple, dict]:
    if where == 0:
        return (value, *args[1:]), kwargs
    return args, {**kwargs, where: value}


def _first_tensor(output: Any) -> tuple[Tensor, bool]:
    if isinstance(output, Tensor):
        return output, False
    return output[0], True


def _base_model(model: nn.Module) -> nn.Module:
    base = getattr(model, "base_model", None)
    if isinstance(base, nn.Module) and base is not model:
        return base
    raise ValueError(f"{type(model).__name__} has no base_model to run without its LM head")


@contextlib.contextmanager
def _hooks(module: nn.Module, *, pre: Callable | None = None, post: Callable | None = None) -> Iterator[None]:
    handles = []
    try:
        if pre is not None:
            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        if post is not None:
            handles.append(module.register_forward_hook(post, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _eval(module: nn.Module) -> Iterator[None]:
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


__all__ = [
    "AttributionTrace",
    "PromptState",
    "ReplacementModel",
    "TranscoderMismatchError",
    "frozen_eager_attention",
    "register_frozen_attention",
]
