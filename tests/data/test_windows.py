"""Batches of token windows: the pad token rule, right padding, window ids; layer spans in messages."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from clt.config import ConfigError, check_output_site, layer_span
from clt.data import TokenWindow, hash_window, pad_id, pad_windows


def test_pad_id_takes_the_pad_token_then_eos_then_zero():
    assert pad_id(SimpleNamespace(pad_token_id=3, eos_token_id=2)) == 3
    assert pad_id(SimpleNamespace(pad_token_id=None, eos_token_id=2)) == 2
    assert pad_id(SimpleNamespace(pad_token_id=None, eos_token_id=None)) == 0


def test_pad_windows_right_pads_and_masks():
    windows = [TokenWindow((5, 6, 7), 0, 0), TokenWindow((8,), 1, 0)]
    ids, mask = pad_windows(windows, 9)
    assert torch.equal(ids, torch.tensor([[5, 6, 7], [8, 9, 9]]))
    assert torch.equal(mask, torch.tensor([[1, 1, 1], [1, 0, 0]]))
    assert hash_window(windows[1]) != hash_window(TokenWindow((8,), 0, 1))


def test_layer_span_and_output_site_check():
    assert layer_span(range(30)) == "0..29" and layer_span([2, 3]) == "2..3"
    assert layer_span([0, 2, 5]) == "[0, 2, 5]" and layer_span([]) == "[]"
    check_output_site("mlp_in")
    with pytest.raises(ConfigError, match="output_site 'resid' is not one of"):
        check_output_site("resid")
    with pytest.raises(KeyError, match="output_site"):
        check_output_site("resid", KeyError)
