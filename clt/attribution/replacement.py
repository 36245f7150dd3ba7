"""ReplacementModel: a language model whose MLPs are replaced by a transcoder, frozen for a prompt.

For one prompt the *local replacement model* keeps the model's computation except that

- every covered MLP output is the transcoder's reconstruction ŷ plus a constant error term
  e = y − ŷ (an MLP the transcoder does not cover keeps its output as a constant error): the
  splice of `clt.nnsight.splice` with the clean run's errors;
- attention patterns and normalisation denominators are detached (`clt.attribution.frozen`).

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

from clt.attribution.frozen import frozen
from clt.models.transcoder import CrossLayerTranscoder
from clt.nnsight import splice
from clt.nnsight.loading import ModelLayout


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
    selection: Tensor | None = None
    """TopK dictionaries: the features TopK selected [n, L, F] (bool), frozen for the prompt like the
    attention pattern (`clt.attribution.topk`); None for other activations."""


class ReplacementModel:
    """A causal LM with its MLPs replaced by a transcoder plus constant errors (module docstring)."""

    def __init__(self, model: nn.Module, transcoder: CrossLayerTranscoder, tokenizer: Any = None) -> None:
        self.model = model
        self.transcoder = transcoder
        self.tokenizer = tokenizer
        self.layout: ModelLayout = splice.fitted_layout(
            model, transcoder, "attribution (the local replacement model)", linear=True
        )
        self.layers: list[int] = list(transcoder.cfg.layers)
        """Model layer of each transcoder layer."""
        self._mlps = [model.get_submodule(p) for p in self.layout.mlp_paths]
        self._first_block = model.get_submodule(self.layout.layer_paths[0])
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

    def raw_skip(self, layer: int, x: Tensor) -> Tensor | None:
        """The skip term of transcoder layer `layer` for raw inputs x [..., d] (None without skip)."""
        tc = self.transcoder
        if not tc.cfg.skip_connection:
            return None
        x_std = (x.float() - tc.input_mean[layer]) / tc.input_std[layer]
        return (x_std @ tc.W_skip[layer].float().T) * tc.output_std[layer]

    # ----------------------------------------------------------------- clean pass

    @torch.no_grad()
    def prepare(
        self, prompt: str | Sequence[int] | Tensor, *, zero_bos: bool = False, prepend_bos: bool = True
    ) -> PromptState:
        """Run the model once on a prompt and compute features, reconstruction and errors."""
        ids = self.tokenize(prompt, prepend_bos=prepend_bos)
        record: dict[str, Any] = {"x": [None] * self.n_layers, "y": [None] * self.n_layers}

        def on_mlp(m: int, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            record["x"][m] = first_arg(args, kwargs)[0][0]
            record["y"][m] = first_tensor(output)[0][0]

        with (
            module_hooks(self._first_block, pre=lambda mod, a, k: record.__setitem__("emb", first_arg(a, k)[0])),
            contextlib.ExitStack() as stack,
        ):
            for m, mlp in enumerate(self._mlps):
                stack.enter_context(module_hooks(mlp, post=functools.partial(on_mlp, m)))
            with splice.eval_mode(self.model):
                logits = self.model(input_ids=ids[None], use_cache=False).logits[0].float()
        x = torch.stack(record["x"], 1).float()
        y = torch.stack(record["y"], 1).float()
        tc = self.transcoder
        with splice.eval_mode(tc):
            x_tc = x[:, self.layers].to(tc.W_enc.dtype)
            z = tc.preactivations(x_tc)
            a = tc.activate(z)
            zeroed = [0] if zero_bos and self.is_special(int(ids[0])) else []
            a[zeroed] = 0
            recon = torch.zeros_like(y)
            recon[:, self.layers] = tc.decode(a, x_tc if tc.cfg.skip_connection else None).float()
        errors = y - recon
        errors[zeroed] = 0
        selection = a > 0 if tc.cfg.activation_fn == "topk" else None
        emb = record["emb"][0].float()
        return PromptState(ids, logits, emb, x, y, z.float(), a.float(), recon, errors, zeroed, selection)

    # ----------------------------------------------------------------- frozen model

    def frozen(self) -> contextlib.AbstractContextManager[None]:
        """Freeze attention patterns and norm scales (and model parameters' grads) until exit."""
        return frozen(self.model)

    @contextlib.contextmanager
    def replaced_mlps(self, fn: Callable[[int, Tensor], Tensor]) -> Iterator[None]:
        """Make model layer m's MLP return fn(m, x) for its input x, until exit."""
        saved = []
        try:
            for m, mlp in enumerate(self._mlps):
                saved.append((mlp, mlp.__dict__.get("forward")))

                def forward(*args: Any, _m: int = m, **kwargs: Any) -> Tensor:
                    return fn(_m, first_arg(args, kwargs)[0])

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
        keep = torch.zeros(1, len(state.input_ids), dtype=torch.bool, device=state.input_ids.device)
        keep[:, state.zeroed_positions] = True  # zeroed positions: the MLP output stays constant
        with self.frozen():
            return self.spliced_logits(state, errors=state, keep=keep)

    def spliced_logits(
        self,
        state: PromptState,
        *,
        errors: str | PromptState,
        edit: Callable[[int, Tensor], Tensor] | None = None,
        keep: Tensor | None = None,
    ) -> Tensor:
        """Logits [n, vocab] of the prompt with the transcoder spliced in (`clt.nnsight.splice`):
        errors ``"live"`` or those of a clean `state`; `edit` changes features; `keep` [1, n]."""
        lm = splice.wrap_model(self.model, self.tokenizer)
        ids, grad = state.input_ids[None], torch.is_grad_enabled()
        return splice.spliced_logits(
            lm, self.layout.mlp_paths, self.transcoder, ids, keep=keep, grad=grad, errors=errors, edit=edit
        )[0]

    __call__ = forward

    def attribution_trace(self, state: PromptState, batch_size: int) -> AttributionTrace:
        """Frozen forward of the prompt copied `batch_size` times, MLP outputs as gradient leaves."""
        ids = state.input_ids[None].expand(batch_size, -1)
        shape = (batch_size, *state.embeddings.shape)
        leaves: list[Tensor] = [None] * self.n_layers  # type: ignore[list-item]
        inputs: list[Tensor] = [None] * self.n_layers  # type: ignore[list-item]
        captured: dict[str, Tensor] = {}

        def embed(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            h, where = first_arg(args, kwargs)
            leaf = h.detach().clone().requires_grad_(True)
            captured["emb"] = leaf
            return replace_arg(args, kwargs, where, leaf)

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

        with torch.enable_grad(), self.frozen(), self.replaced_mlps(mlp), module_hooks(self._first_block, pre=embed):
            out = base_model(self.model)(input_ids=ids, use_cache=False)
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


# --------------------------------------------------------------------- helpers


def first_arg(args: tuple, kwargs: dict) -> tuple[Tensor, Any]:
    """A module call's hidden-state argument and where it was (0 or its keyword)."""
    if args:
        return args[0], 0
    for key in ("hidden_states", "x", "input", "hidden_state"):
        if key in kwargs:
            return kwargs[key], key
    key = next(iter(kwargs))
    return kwargs[key], key


def replace_arg(args: tuple, kwargs: dict, where: Any, value: Tensor) -> tuple[tuple, dict]:
    """The call's arguments with the one at `where` (from `first_arg`) replaced by `value`."""
    if where == 0:
        return (value, *args[1:]), kwargs
    return args, {**kwargs, where: value}


def first_tensor(output: Any) -> tuple[Tensor, bool]:
    """A module output's first tensor, and whether the output was a tuple."""
    if isinstance(output, Tensor):
        return output, False
    return output[0], True


def base_model(model: nn.Module) -> nn.Module:
    """The model without its LM head (its last hidden state is the unembedding's input)."""
    base = getattr(model, "base_model", None)
    if isinstance(base, nn.Module) and base is not model:
        return base
    raise ValueError(f"{type(model).__name__} has no base_model to run without its LM head")


@contextlib.contextmanager
def module_hooks(module: nn.Module, *, pre: Callable | None = None, post: Callable | None = None) -> Iterator[None]:
    """Forward pre-/post-hooks (with keyword arguments) on a module until exit."""
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


__all__ = [
    "AttributionTrace",
    "PromptState",
    "ReplacementModel",
]
