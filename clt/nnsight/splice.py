"""The one splice of a transcoder into a live model: its MLP outputs replaced in an nnsight trace.

Layer by layer in execution order, a covered MLP's features are encoded from the MLP input of the
spliced run itself (the transcoder's inference rule), and its output becomes

    out_m = base_m + Σ_{i ≤ m} (a_new_i − a_ref_i) · W_dec[i→m] + skip(x_m) − skip_ref_m

(standardised decoder contributions, scaled by the output σ), where, by `errors`:

- ``None`` (the replacement model of the metrics and the KL objective): base = b_dec·σ + μ, a_ref = 0,
  skip_ref = 0, i.e. the plain reconstruction ŷ;
- ``"live"``: base = the MLP's own output, a_ref = the live features, skip_ref = skip(x_m) (the
  model's error terms follow the run; only edited features change anything);
- a `CleanRun` (the local replacement model): base = the clean run's output, a_ref = its features,
  skip_ref = its skip term (errors held constant; uncovered MLPs keep the clean outputs).

a_new are the live features, changed by `edit` where given. Positions where `keep` is true keep the
model's own output (the clean run's under constant errors). A clean run with a TopK ``selection``
[..., L, F] (`clt.attribution.topk`, 'freeze') holds TopK's choice fixed: the live features are then
the pre-activations of the selected features and 0 elsewhere, as for the clean run itself.

`spliced_forward` is the same splice for any model inputs (a KV cache, say), returning the model's
output; with a clean run, `frozen_features` edits the clean run's features instead of the live ones
(a_new = edit(a_ref): features do not respond, the constrained layers of an intervention), and
`replaced` limits the splice to some model layers (the others keep their own outputs).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Container, Iterator, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from clt.config.constants import layer_span
from clt.models.transcoder import CrossLayerTranscoder
from clt.nnsight.loading import ModelLayout, find_layout

_MODES = ("none", "replace", "zero")


class TranscoderMismatchError(ValueError):
    """The transcoder was not trained for this model (layers or width differ)."""


class CleanRun(Protocol):
    """A clean run whose error terms a splice holds constant (e.g. attribution's `PromptState`)."""

    mlp_inputs: Tensor
    """MLP inputs [..., M, d] of every model layer."""
    mlp_outputs: Tensor
    """MLP outputs [..., M, d] of every model layer."""
    selection: Tensor | None
    """TopK dictionaries: the clean run's active features [..., L, F] (bool), held fixed; or None."""


def fitted_layout(model: nn.Module, transcoder: CrossLayerTranscoder, purpose: str, *, linear: bool) -> ModelLayout:
    """The model's layout, once the transcoder is known to replace its MLPs (`linear`: in a way
    linear in the features) and to fit its layers and width; else a clear error."""
    transcoder.require_mlp_replacement(purpose, linear=linear)
    layout = find_layout(model)
    cfg = transcoder.cfg
    if cfg.d_model != layout.d_model or max(cfg.layers) >= layout.num_layers:
        raise TranscoderMismatchError(
            f"the transcoder (layers {layer_span(cfg.layers)}, d_model {cfg.d_model}) does not fit the model "
            f"({layout.num_layers} layers, d_model {layout.d_model}); use a transcoder trained on this model"
        )
    return layout


def wrap_model(model: nn.Module, tokenizer: Any = None) -> Any:
    """The model wrapped by nnsight: a `LanguageModel` with a tokenizer, a bare `NNsight` without."""
    from nnsight import LanguageModel, NNsight

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LanguageModel(model, tokenizer=tokenizer) if tokenizer is not None else NNsight(model)


def language_model(model: nn.Module, tokenizer: Any, transcoder: CrossLayerTranscoder) -> tuple[Any, list[str]]:
    """(nnsight LanguageModel, MLP module paths of every model layer); errors if the transcoder does not fit."""
    layout = fitted_layout(model, transcoder, "splicing into the model", linear=False)
    return wrap_model(model, tokenizer), list(layout.mlp_paths)


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Put a module in eval mode until exit, then back in the mode it had."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def spliced_logits(
    lm: Any,
    mlp_paths: Sequence[str],
    transcoder: CrossLayerTranscoder,
    ids: Tensor,
    mask: Tensor | None = None,
    mode: str = "replace",
    keep: Tensor | None = None,
    *,
    grad: bool = False,
    errors: str | CleanRun | None = None,
    edit: Callable[[int, Tensor], Tensor] | None = None,
) -> Tensor:
    """Logits [B, T, V] of `lm` (`wrap_model`; `mlp_paths`: every model layer's MLP) with the covered
    MLP outputs replaced ('replace', see the module docstring), zeroed ('zero') or kept ('none').

    `edit(layer, features)` returns the features [..., F] of transcoder layer `layer` to use instead
    of the encoded ones; positions where `keep` [B, T] is true keep the model's own outputs. With
    `grad` the logits stay differentiable w.r.t. the transcoder (through the frozen model)."""
    inputs = {"input_ids": ids, "use_cache": False} | ({} if mask is None else {"attention_mask": mask})
    logits = spliced_forward(
        lm, mlp_paths, transcoder, inputs, mode=mode, keep=keep, grad=grad, errors=errors, edit=edit
    ).logits
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def spliced_forward(
    lm: Any,
    mlp_paths: Sequence[str],
    transcoder: CrossLayerTranscoder,
    inputs: dict[str, Any],
    *,
    mode: str = "replace",
    keep: Tensor | None = None,
    grad: bool = False,
    errors: str | CleanRun | None = None,
    edit: Callable[[int, Tensor], Tensor] | None = None,
    frozen_features: bool = False,
    replaced: Container[int] | None = None,
    observe: Callable[[int, Tensor, Tensor], None] | None = None,
) -> Any:
    """The model's output (logits, cache) for keyword `inputs` with the transcoder spliced in, as
    `spliced_logits`; also:

    - `frozen_features` (with a clean run as `errors`): `edit` changes the clean run's features, not
      the live ones (features do not respond to the run: the constrained layers of an intervention);
    - `replaced`: the model layers whose MLP output is spliced (default: all); the others keep their
      own output, and decoder writes to them are dropped;
    - `observe(layer, preactivations, features)`: the live encoding of every covered layer."""
    if mode not in _MODES:
        raise ValueError(f"mode must be 'none', 'replace' or 'zero', got {mode!r}")
    if isinstance(errors, str) and errors != "live":
        raise ValueError(f"errors must be None, 'live' or a clean run, got {errors!r}")
    if errors is not None or edit is not None:
        if mode != "replace":
            raise ValueError(f"error terms and edits need mode 'replace', got {mode!r}")
        transcoder.require_mlp_replacement("splicing with error terms or edited features")
    if frozen_features and (errors is None or isinstance(errors, str)):
        raise ValueError("frozen_features needs a clean run as errors (its features are the ones edited)")
    splice = _Splice(transcoder, errors, edit, keep, frozen_features, observe)
    clean = splice.clean
    layer_of = {m: i for i, m in enumerate(transcoder.cfg.layers)}
    with torch.set_grad_enabled(grad), eval_mode(transcoder), lm.trace(**inputs):
        for m, path in enumerate(mlp_paths):
            i = layer_of.get(m)
            spliced = replaced is None or m in replaced
            if mode == "none" or (i is None and (clean is None or not spliced)):
                continue
            mlp = lm.get(path)
            if mode == "zero":
                mlp.output = _kept(mlp.output, torch.zeros_like(mlp.output), keep)
            elif i is None:
                mlp.output = clean.mlp_outputs[..., m, :].to(mlp.output.dtype).expand_as(mlp.output)
            elif not spliced:
                splice.output(m, i, mlp.input, None)  # observed; its writes to later layers kept
            else:
                x = mlp.input  # before the output: nnsight visits a module's values in execution order
                own = mlp.output if clean is None else clean.mlp_outputs[..., m, :]
                mlp.output = splice.output(m, i, x, own).to(mlp.output.dtype)
        output = lm.output.save()
    return output


class _Splice:
    """The per-layer arithmetic of `spliced_forward` (module docstring), in execution order.

    Layer slices of the stacked parameters come from one `unbind` per forward (`_param`): indexing
    a stacked parameter layer by layer makes autograd fill a zero tensor of the whole parameter for
    each layer's gradient (two thirds of a KL training step's backward before); decoder writes to
    later layers accumulate per target layer for the same reason."""

    def __init__(
        self,
        transcoder: CrossLayerTranscoder,
        errors: str | CleanRun | None,
        edit: Callable[[int, Tensor], Tensor] | None,
        keep: Tensor | None,
        frozen_features: bool = False,
        observe: Callable[[int, Tensor, Tensor], None] | None = None,
    ) -> None:
        self.tc, self.errors, self.edit, self.keep = transcoder, errors, edit, keep
        self.frozen_features, self.observe = frozen_features, observe
        self.live = isinstance(errors, str)
        self.clean = None if errors is None or self.live else errors
        self.selection: Tensor | None = getattr(self.clean, "selection", None)
        self.pending: dict[int, Tensor] = {}
        """Standardised decoder contributions [..., d] to the transcoder layers still to come, by layer."""
        self.slices: dict[str, tuple[Tensor, ...]] = {}

    def output(self, m: int, i: int, x: Tensor, own: Tensor | None) -> Tensor | None:
        """Output of model layer m (transcoder layer i) for its live input x; `own`: its kept output
        (None: the layer is not spliced, only observed and its decoder writes recorded)."""
        tc = self.tc
        x_std = _standardised(tc, i, x)
        frozen = None if self.selection is None else self.selection[..., i, :]
        z, a = self._encoded(i, x_std, frozen)
        if self.observe is not None:
            self.observe(i, z, a)
        ref_std = None if self.clean is None else _standardised(tc, i, self.clean.mlp_inputs[..., m, :])
        a_ref = None if ref_std is None else self._encoded(i, ref_std, frozen)[1]
        base = a_ref if self.frozen_features else a
        a_new = base if self.edit is None else self.edit(i, base)
        if a_ref is not None:
            a_new = a_new - a_ref
        elif self.live:
            a_new = a_new - a
        y_std = tc.layer_output(i, a_new, x_std) if tc.cfg.architecture == "molt" else self._decoded(i, a_new)
        if own is None:
            return None
        if self.errors is None:
            y_std = y_std + self._param("b_dec", i)
        if tc.cfg.skip_connection and not self.live:
            w_skip = self._param("W_skip", i)
            y_std = y_std + x_std @ w_skip.T
            if ref_std is not None:
                y_std = y_std - ref_std @ w_skip.T
        base_out = tc.output_mean[i] if self.errors is None else own.to(torch.promote_types(own.dtype, torch.float32))
        return _kept(own, y_std * tc.output_std[i] + base_out, self.keep)

    def _decoded(self, i: int, a: Tensor) -> Tensor:
        """Add features a [..., F] of transcoder layer i to the pending contributions; layer i's sum."""
        contrib = torch.einsum("...f,fjd->...jd", a, self.tc.W_dec[i])
        for j, c in enumerate(contrib.unbind(-2), start=i):
            self.pending[j] = c if j not in self.pending else self.pending[j] + c
        return self.pending.pop(i)

    def _param(self, name: str, i: int) -> Tensor:
        """Layer i of the stacked parameter `name`, from one unbind per forward (class docstring)."""
        if name not in self.slices:
            self.slices[name] = getattr(self.tc, name).unbind(0)
        return self.slices[name][i]

    def _encoded(self, i: int, x_std: Tensor, selection: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Pre-activations and features [..., F] of transcoder layer i from its standardised input
        [..., d]; with a frozen TopK `selection` [..., F], the features are the pre-activations of the
        selected ones."""
        z = x_std @ self._param("W_enc", i).T + self._param("b_enc", i)
        return z, self.tc.activate_layer(z, i) if selection is None else z * selection.to(z.dtype)


def _standardised(transcoder: CrossLayerTranscoder, layer: int, x: Tensor) -> Tensor:
    """Raw MLP input x [..., d] of transcoder layer `layer`, standardised in float32 (or wider),
    then in the parameter dtype (as `CrossLayerTranscoder.normalize_inputs`)."""
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    return ((wide - transcoder.input_mean[layer]) / transcoder.input_std[layer]).to(transcoder.W_enc.dtype)


def _kept(own: Tensor, new: Tensor, keep: Tensor | None) -> Tensor:
    return new if keep is None else torch.where(keep[..., None], own, new)


__all__ = [
    "CleanRun",
    "TranscoderMismatchError",
    "eval_mode",
    "fitted_layout",
    "language_model",
    "spliced_forward",
    "spliced_logits",
    "wrap_model",
]
