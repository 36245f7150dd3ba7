"""End-to-end objective: KL(model ‖ model with the transcoder spliced in) on the store's own windows.

As sparsify's and CLT-Forge's end-to-end training: besides reconstructing each MLP output, the
transcoder is trained so that the language model with *all* covered MLP outputs replaced by its
reconstructions (`clt.nnsight.splice.spliced_logits`, the same splice as `replacement_metrics`)
predicts the same next-token distributions. Gradients flow through the frozen language model
into the transcoder's parameters only (`torch.autograd.grad`; the model's own parameters get none).

The token windows are rebuilt from the store's per-row metadata (``token_ids``, ``positions``,
``window_ids``); the BOS that stores leave out is prepended again and keeps the model's own MLP
outputs, as in ``replacement_metrics(keep_bos=True)``. Features use the transcoder's inference
rule (BatchTopK: its threshold), the rule of the replacement model.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from clt.data.corpus import TokenWindow, bos_id
from clt.data.windows import pad_id, pad_windows
from clt.models.transcoder import CrossLayerTranscoder
from clt.nnsight.splice import language_model, spliced_logits
from clt.store import ActivationStore, StoreError
from clt.training.metrics import bos_keep_mask, next_token_kl, next_token_valid

logger = logging.getLogger(__name__)
_LIVE_WINDOWS = 4096
"""Windows of a live stream the KL objective draws from (~500k tokens at 128 per window)."""


def store_windows(store: ActivationStore, tokenizer: Any, *, min_tokens: int = 2) -> list[TokenWindow]:
    """The token windows a store was extracted from (BOS prepended again where the store left it out)."""
    if hasattr(store, "token_windows"):  # a live stream knows its windows
        windows = [w for w in store.token_windows(_LIVE_WINDOWS) if len(w.token_ids) >= min_tokens]
        if windows:
            return windows
    prepend_bos = bool(store.extra.get("prepend_bos", True))
    rows: dict[int, dict[int, int]] = {}
    for i in range(len(store.shards)):
        data = store.metadata(i)
        if any(key not in data for key in ("token_ids", "positions", "window_ids")) or bool(
            (data["token_ids"] < 0).any()
        ):
            raise StoreError(
                "this store does not record token_ids/positions/window_ids per row, which the KL "
                "objective needs to rebuild its windows; extract the store with `clt extract` "
                "(ActivationExtractor) or set kl_coef=0"
            )
        for window, position, token in zip(
            data["window_ids"].tolist(), data["positions"].tolist(), data["token_ids"].tolist()
        ):
            rows.setdefault(window, {})[position] = token
    bos = bos_id(tokenizer) if prepend_bos else None
    windows = []
    for window_id, tokens in sorted(rows.items()):
        first = min(tokens)
        if first > 1 or (first == 1 and bos is None) or sorted(tokens) != list(range(first, first + len(tokens))):
            continue  # a window whose beginning is not in the store
        ids = ([bos] if first == 1 else []) + [tokens[p] for p in sorted(tokens)]
        if len(ids) >= min_tokens:
            windows.append(TokenWindow(tuple(ids), window_id, 0))
    if not windows:
        raise StoreError(
            f"no complete token windows of at least {min_tokens} tokens in {store}; "
            "extract more tokens or set kl_coef=0"
        )
    return windows


class KLObjective:
    """Mean next-token KL(original ‖ spliced) over a few store windows, differentiable w.r.t. the transcoder."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        store: ActivationStore,
        transcoder: CrossLayerTranscoder,
        *,
        windows_per_step: int = 4,
        seed: int = 0,
        keep_bos: bool = True,
    ) -> None:
        if store.model_name and transcoder.cfg.model_name and store.model_name != transcoder.cfg.model_name:
            raise ValueError(
                f"the store holds activations of {store.model_name!r} but the transcoder is for "
                f"{transcoder.cfg.model_name!r}; use the model the store was extracted from"
            )
        self.model, self.windows_per_step, self.seed = model, windows_per_step, seed
        self.lm, self.mlp_paths = language_model(model, tokenizer, transcoder)
        self.windows = store_windows(store, tokenizer)
        self.prepend_bos, self.keep_bos = bool(store.extra.get("prepend_bos", True)), keep_bos
        self.pad = pad_id(tokenizer)
        self.device = next(model.parameters()).device

    def windows_at(self, step: int) -> list[TokenWindow]:
        """The windows of training step `step` (a deterministic function of seed and step)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        n = min(self.windows_per_step, len(self.windows))
        return [self.windows[i] for i in torch.randperm(len(self.windows), generator=g)[:n].tolist()]

    def loss(self, transcoder: CrossLayerTranscoder, windows: list[TokenWindow]) -> torch.Tensor:
        """Mean KL (nats per predicted token) of the spliced model on `windows`, with its graph."""
        ids, mask = pad_windows(windows, self.pad)
        ids, mask = ids.to(self.device), mask.to(self.device)
        with torch.no_grad():
            logits = self.model(input_ids=ids, attention_mask=mask).logits
        keep = bos_keep_mask(mask, self.prepend_bos, self.keep_bos)
        logq = spliced_logits(self.lm, self.mlp_paths, transcoder, ids, mask, "replace", keep, grad=True)
        valid = next_token_valid(mask)
        return next_token_kl(logits[:, :-1], logq[:, :-1], valid) / valid.sum().clamp_min(1)

    def step(self, transcoder: CrossLayerTranscoder, step: int, coef: float, scaler: Any = None) -> float:
        """Add the gradient of coef · KL on step `step`'s windows to the transcoder's `.grad`; returns the KL."""
        kl = self.loss(transcoder, self.windows_at(step))
        if not torch.isfinite(kl):
            raise FloatingPointError(
                f"the KL term became {float(kl)} at step {step}; lower kl_coef or "
                "learning_rate (the last checkpoint is intact)"
            )
        weighted = coef * kl
        params = [p for p in transcoder.parameters() if p.requires_grad]
        grads = torch.autograd.grad(
            scaler.scale(weighted) if scaler is not None else weighted, params, allow_unused=True
        )
        for param, grad in zip(params, grads):
            if grad is not None:
                param.grad = grad if param.grad is None else param.grad + grad
        return float(kl.detach())


__all__ = ["KLObjective", "store_windows"]
