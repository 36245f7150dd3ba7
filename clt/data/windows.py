"""Batches of token windows: right padding, the pad token, stable window ids."""

from __future__ import annotations

from typing import Any

import torch

from clt.data.corpus import TokenWindow


def pad_id(tokenizer: Any) -> int:
    """The id padded positions get: the pad token, else the EOS token, else 0 (padding is masked, so any id works)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def pad_windows(windows: list[TokenWindow], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` (padded with `pad`) and ``attention_mask`` [batch, longest window] of windows."""
    width = max(len(w.token_ids) for w in windows)
    ids = torch.full((len(windows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(windows), width), dtype=torch.long)
    for row, window in enumerate(windows):
        ids[row, : len(window.token_ids)] = torch.tensor(window.token_ids)
        mask[row, : len(window.token_ids)] = 1
    return ids, mask


def hash_window(window: TokenWindow) -> int:
    """A stable id of a window: document index and offset packed into one integer."""
    return window.document * 1_000_000_007 + window.start
