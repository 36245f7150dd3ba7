"""Every encoder path against a naive per-layer PyTorch reference (relu, threshold, torch.topk)."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import Tensor

from clt.sparse import (
    SparseCLTEncoder,
    SparseTranscoderEncoder,
    TranscoderWeights,
    encode_single_layer,
    random_transcoders,
)
from clt.sparse.encoder import _sparse_topk_inplace, sparse_topk_kernel

H, F, B, T = 16, 48, 2, 13
LAYERS = [3, 4, 5, 6]


def reference(hidden: Tensor, w: TranscoderWeights, top_k: int, threshold: float) -> dict[str, Tensor]:
    """Dense activations after the filter, top-k values and sparsity, written out by hand."""
    pre = hidden @ w.W_enc.T + w.b_enc
    act = torch.relu(pre)
    if w.threshold is not None:
        act = act * (pre > w.threshold)
    active = (act > 0) & (act >= threshold)
    dense = torch.where(active, act, torch.zeros_like(act))
    values, indices = torch.topk(dense, min(top_k, w.d_features), dim=-1)
    kept = torch.zeros_like(dense).scatter(-1, indices, values)
    return {"values": values, "kept": kept, "sparsity": active.float().mean(-1)}


def assert_no_near_ties(hidden: Tensor, w: TranscoderWeights, top_k: int, threshold: float) -> None:
    """Precondition of comparing indices exactly across kernels (chunk sizes, bmm or not, compiled).

    Float32 evaluates a pre-activation, a sum of H + 1 terms, to within (H + 1) u Σ|terms| in any
    order, so two kernels may differ by twice that. No decision may lie closer than this: between
    kept values (their order), the k-th and (k+1)-th, and the activation threshold or JumpReLU θ."""
    pre = hidden @ w.W_enc.T + w.b_enc
    worst = 2 * (H + 1) * torch.finfo(torch.float32).eps / 2 * (hidden.abs() @ w.W_enc.abs().T + w.b_enc.abs())
    act = torch.relu(pre)
    distances = []
    if w.threshold is not None:
        distances.append((pre - w.threshold)[pre > 0].abs())
        act = act * (pre > w.threshold)
    distances.append((act - threshold)[act > 0].abs())
    top = torch.where(act >= threshold, act, torch.zeros_like(act)).topk(min(top_k + 1, w.d_features), -1).values
    distances.append((top[..., :-1] - top[..., 1:])[top[..., :-1] > 0])
    margin, bound = float(torch.cat(distances).min()), float(worst.max())
    assert margin > bound, f"a near-tie ({margin:.2e} <= {bound:.2e}): choose another seed"


def assert_matches(result: dict, ref: dict[str, Tensor], layer: int) -> None:
    """Same values, same kept (index, value) pairs, -1 exactly in empty slots, same sparsity."""
    values, indices = result["activations"], result["indices"]
    assert result["layer"] == layer
    assert values.shape == ref["values"].shape == indices.shape
    assert indices.dtype == torch.int64
    torch.testing.assert_close(values, ref["values"], atol=1e-5, rtol=1e-5)
    assert torch.equal(indices == -1, values == 0)
    dense = torch.zeros_like(ref["kept"])
    dense.scatter_add_(-1, indices.clamp_min(0), values)
    torch.testing.assert_close(dense, ref["kept"], atol=1e-5, rtol=1e-5)
    assert ((dense > 0).sum(-1) == (values > 0).sum(-1)).all()
    torch.testing.assert_close(result["sparsity"], ref["sparsity"])


@pytest.fixture(params=[False, True], ids=["relu", "jumprelu"])
def transcoders(request) -> dict[int, TranscoderWeights]:
    return random_transcoders(LAYERS, H, F, jumprelu=request.param, seed=7)


@pytest.fixture
def hidden_states() -> dict[int, Tensor]:
    gen = torch.Generator().manual_seed(11)
    return {layer: 1.5 * torch.randn(B, T, H, generator=gen) for layer in LAYERS}


@pytest.mark.parametrize("top_k, threshold", [(5, 1.0), (F + 10, 0.0), (8, 0.3)])
def test_every_method_matches_reference(transcoders, hidden_states, top_k, threshold) -> None:
    encoder = SparseCLTEncoder(
        transcoders, top_k=top_k, activation_threshold=threshold, use_compile=False, chunk_size=7
    )
    batched = encoder.encode_all_layers(hidden_states)
    assert list(batched) == LAYERS
    for layer in LAYERS:
        ref = reference(hidden_states[layer], transcoders[layer], top_k, threshold)
        assert_matches(encoder.encode_layer(layer, hidden_states[layer]), ref, layer)
        assert_matches(encoder.encode_chunked(layer, hidden_states[layer], chunk_size=3), ref, layer)
        assert_matches(batched[layer], ref, layer)
        single = encode_single_layer(
            hidden_states[layer],
            transcoders[layer],
            top_k=top_k,
            activation_threshold=threshold,
            layer=layer,
        )
        assert_matches(single, ref, layer)


def test_reference_is_not_trivial(transcoders, hidden_states) -> None:
    """The random setup has active and inactive features, and empty top-k slots."""
    ref = reference(hidden_states[3], transcoders[3], 20, 1.0)
    assert 0.05 < ref["sparsity"].mean() < 0.5
    assert (ref["values"] == 0).any() and (ref["values"] > 0).any()


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 26, 52, 80, 1000])
def test_chunked_equals_unchunked(transcoders, hidden_states, chunk_size) -> None:
    encoder = SparseCLTEncoder(transcoders, top_k=6, activation_threshold=0.5, use_compile=False, chunk_size=chunk_size)
    whole = SparseCLTEncoder(transcoders, top_k=6, activation_threshold=0.5, use_compile=False, chunk_size=10_000)
    for layer in LAYERS:
        assert_no_near_ties(hidden_states[layer], transcoders[layer], 6, 0.5)
        a = encoder.encode_chunked(layer, hidden_states[layer])
        b = whole.encode_layer(layer, hidden_states[layer])
        torch.testing.assert_close(a["activations"], b["activations"])
        assert torch.equal(a["indices"], b["indices"])
    a_all, b_all = encoder.encode_all_layers(hidden_states), whole.encode_all_layers(hidden_states)
    for layer in LAYERS:
        torch.testing.assert_close(a_all[layer]["activations"], b_all[layer]["activations"])
        assert torch.equal(a_all[layer]["indices"], b_all[layer]["indices"])


def test_all_layers_equals_per_layer(transcoders, hidden_states) -> None:
    encoder = SparseCLTEncoder(transcoders, top_k=10, activation_threshold=0.2, use_compile=False)
    assert encoder.batched
    for layer in LAYERS:
        assert_no_near_ties(hidden_states[layer], transcoders[layer], 10, 0.2)
    subsets = [LAYERS, [6, 3], [4, 5], [5]]
    for layers in subsets:
        batched = encoder.encode_all_layers({layer: hidden_states[layer] for layer in layers})
        assert list(batched) == layers
        for layer in layers:
            single = encoder.encode_layer(layer, hidden_states[layer])
            torch.testing.assert_close(batched[layer]["activations"], single["activations"])
            assert torch.equal(batched[layer]["indices"], single["indices"])
            torch.testing.assert_close(batched[layer]["sparsity"], single["sparsity"])


def test_unstackable_layers_fall_back_to_per_layer(hidden_states) -> None:
    """Layers of different widths, or inputs of different lengths, are encoded one by one."""
    transcoders = random_transcoders([3, 4], H, F, seed=1) | random_transcoders([5], H, F // 2, seed=2)
    encoder = SparseTranscoderEncoder(transcoders, top_k=30, activation_threshold=0.5, use_compile=False)
    assert not encoder.batched
    hidden = {3: hidden_states[3], 4: hidden_states[4][:, :5], 5: hidden_states[5]}
    result = encoder.encode_all_layers(hidden)
    assert result[5]["activations"].shape == (B, T, F // 2)
    for layer, h in hidden.items():
        assert_matches(result[layer], reference(h, transcoders[layer], 30, 0.5), layer)


def test_mixed_thresholds_in_one_stack(hidden_states) -> None:
    """A layer without a threshold keeps plain ReLU when stacked with JumpReLU layers."""
    transcoders = random_transcoders([3, 4], H, F, jumprelu=True, seed=4)
    transcoders[4].threshold = None
    encoder = SparseCLTEncoder(transcoders, top_k=8, activation_threshold=0.0, use_compile=False)
    result = encoder.encode_all_layers({3: hidden_states[3], 4: hidden_states[4]})
    for layer in (3, 4):
        assert_matches(result[layer], reference(hidden_states[layer], transcoders[layer], 8, 0.0), layer)


def test_extract_attribution_features_matches_brute_force(transcoders, hidden_states) -> None:
    top_k, threshold = 4, 0.5
    encoder = SparseCLTEncoder(transcoders, top_k=top_k, activation_threshold=threshold, use_compile=False)
    candidates = []
    for layer in LAYERS:
        ref = reference(hidden_states[layer], transcoders[layer], top_k, threshold)["kept"]
        for b, t, f in ref.nonzero().tolist():
            candidates.append((ref[b, t, f].item(), layer, f, t, b))
    candidates.sort(key=lambda c: -c[0])
    found = encoder.extract_attribution_features(hidden_states, top_k_global=25)
    assert len(found) == 25
    assert [f["activation"] for f in found] == sorted((f["activation"] for f in found), reverse=True)
    for got, (value, layer, feature, position, batch) in zip(found, candidates[:25], strict=True):
        assert (got["layer"], got["feature"], got["position"], got["batch"]) == (
            layer,
            feature,
            position,
            batch,
        )
        assert got["activation"] == pytest.approx(value, rel=1e-5)
    everything = encoder.extract_attribution_features(hidden_states, top_k_global=None)
    assert len(everything) == len(candidates)
    assert encoder.extract_attribution_features({}, top_k_global=5) == []


@pytest.fixture
def inductor_cache(tmp_path, monkeypatch):
    """A fresh Inductor cache folder for this test, and no precompiled headers (kept outside it, in
    the default cache): a cache shared with runs under other kernel settings (ATen capability,
    threads) or another CPU can hold code that no longer builds, or that aborts the process.
    Kernels compiled earlier in this process are dropped, so this test compiles."""
    import contextlib

    import torch._inductor.config

    cache = tmp_path / "inductor"
    try:  # sets TORCHINDUCTOR_CACHE_DIR and clears Inductor's in-memory caches (paths included)
        from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir
    except ImportError:  # older torch: read when a compilation first needs the cache
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))
        temporary_cache_dir = None
    torch._dynamo.reset()
    with (
        temporary_cache_dir(str(cache)) if temporary_cache_dir else contextlib.nullcontext(),
        torch._inductor.config.patch(cpp_cache_precompile_headers=False),
    ):
        yield cache
    torch._dynamo.reset()


def skip_unless_compiled(encoder: SparseCLTEncoder, caplog) -> None:
    """Skip (saying why) where torch.compile does not work on this machine: the encoder then runs
    eager PyTorch, which is what the product does and what the other tests check."""
    if not encoder.compiled:
        reasons = [r.getMessage() for r in caplog.records if "torch.compile" in r.getMessage()]
        pytest.skip(f"torch.compile is unavailable here: {'; '.join(reasons) or 'no reason logged'}")


def test_compile_on_equals_off(hidden_states, inductor_cache, caplog) -> None:
    transcoders = random_transcoders(LAYERS, H, F, jumprelu=True, seed=5)
    compiled = SparseCLTEncoder(transcoders, top_k=6, activation_threshold=0.5, use_compile=True, chunk_size=64)
    eager = SparseCLTEncoder(transcoders, top_k=6, activation_threshold=0.5, use_compile=False, chunk_size=64)
    assert not eager.compiled
    with caplog.at_level(logging.WARNING, logger="clt.sparse.encoder"):
        a, b = compiled.encode_all_layers(hidden_states), eager.encode_all_layers(hidden_states)
    skip_unless_compiled(compiled, caplog)
    assert any(inductor_cache.rglob("*")), "Inductor did not use this test's cache"
    for layer in LAYERS:
        assert_no_near_ties(hidden_states[layer], transcoders[layer], 6, 0.5)
        torch.testing.assert_close(a[layer]["activations"], b[layer]["activations"])
        assert torch.equal(a[layer]["indices"], b[layer]["indices"])
        torch.testing.assert_close(a[layer]["sparsity"], b[layer]["sparsity"])


def test_compile_failure_falls_back_to_eager(monkeypatch, caplog, transcoders, hidden_states) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: broken)
    encoder = SparseCLTEncoder(transcoders, top_k=6, activation_threshold=0.5, use_compile=True)
    assert encoder.compiled
    with caplog.at_level(logging.WARNING, logger="clt.sparse.encoder"):
        result = encoder.encode_layer(3, hidden_states[3])
    assert not encoder.compiled
    assert "torch.compile failed (RuntimeError: no C++ compiler)" in caplog.text
    assert_matches(result, reference(hidden_states[3], transcoders[3], 6, 0.5), 3)


def test_compile_unavailable_falls_back_to_eager(monkeypatch, caplog, transcoders, hidden_states) -> None:
    def unavailable(fn, **kwargs):
        raise RuntimeError("Dynamo is not supported on this Python")

    monkeypatch.setattr(torch, "compile", unavailable)
    with caplog.at_level(logging.WARNING, logger="clt.sparse.encoder"):
        encoder = SparseCLTEncoder(transcoders, top_k=6, activation_threshold=0.5)
    assert not encoder.compiled and "torch.compile unavailable" in caplog.text
    assert_matches(
        encoder.encode_layer(4, hidden_states[4]),
        reference(hidden_states[4], transcoders[4], 6, 0.5),
        4,
    )


def test_dtype_device_and_grad(hidden_states) -> None:
    """Inputs are cast to the weights' dtype; results carry no autograd graph."""
    transcoders = {layer: w.to(dtype=torch.float64) for layer, w in random_transcoders(LAYERS, H, F).items()}
    for w in transcoders.values():
        w.W_enc.requires_grad_(True)
    encoder = SparseCLTEncoder(transcoders, top_k=5, activation_threshold=0.5, use_compile=False)
    result = encoder.encode_all_layers(hidden_states)[3]
    assert result["activations"].dtype == torch.float64 and not result["activations"].requires_grad
    ref = reference(hidden_states[3].double(), transcoders[3], 5, 0.5)
    torch.testing.assert_close(result["activations"], ref["values"].detach())


def test_invalid_arguments(transcoders, hidden_states) -> None:
    for kwargs, message in [
        ({"top_k": 0}, "top_k"),
        ({"activation_threshold": -1.0}, "activation_threshold"),
        ({"chunk_size": 0}, "chunk_size"),
    ]:
        with pytest.raises(ValueError, match=message):
            SparseCLTEncoder(transcoders, use_compile=False, **kwargs)
    with pytest.raises(ValueError, match="empty"):
        SparseCLTEncoder({}, use_compile=False)
    with pytest.raises(ValueError, match="disagree on the hidden size"):
        SparseCLTEncoder(random_transcoders([0], H, F) | random_transcoders([1], H + 1, F), use_compile=False)
    encoder = SparseCLTEncoder(transcoders, use_compile=False)
    with pytest.raises(KeyError, match=r"no transcoder for layer 9; available layers: \[3, 4, 5, 6\]"):
        encoder.encode_layer(9, hidden_states[3])
    with pytest.raises(KeyError, match="layer 9"):
        encoder.encode_all_layers({3: hidden_states[3], 9: hidden_states[3]})
    with pytest.raises(ValueError, match=r"layer 3: expected hidden states \[batch, seq, 16\], got \[13, 16\]"):
        encoder.encode_layer(3, hidden_states[3][0])
    with pytest.raises(ValueError, match=r"got \[2, 13, 8\]"):
        encoder.encode_all_layers({3: hidden_states[3][..., :8], 4: hidden_states[4][..., :8]})
    with pytest.raises(ValueError, match="top_k_global"):
        encoder.extract_attribution_features(hidden_states, top_k_global=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("jumprelu", [False, True])
@pytest.mark.parametrize("threshold", [0.0, 0.1, 1.0])
def test_inplace_kernel_equals_functional_kernel(dtype, jumprelu, threshold) -> None:
    """The eager in-place kernel and the (compilable) functional one agree bit for bit."""
    gen = torch.Generator().manual_seed(3)
    L, N = 3, 9
    x = torch.randn(L, N, H, generator=gen, dtype=dtype)
    W = torch.randn(L, F, H, generator=gen, dtype=dtype) / H**0.5
    b = torch.randn(L, F, generator=gen, dtype=dtype)
    th = torch.rand(L, F, generator=gen, dtype=dtype) - 0.2 if jumprelu else None
    pre, mask = torch.empty(2, L, N, F, dtype=dtype)
    pre[0, 0, 0] = threshold
    expected = sparse_topk_kernel(x, W, b, th, threshold, 7)
    got = _sparse_topk_inplace(x, W, b, th, threshold, 7, pre, mask)
    for a, e in zip(got, expected, strict=True):
        assert a.dtype == e.dtype and torch.equal(a, e)


def test_activation_exactly_at_threshold_is_kept(inductor_cache, caplog) -> None:
    """`>= activation_threshold`, also for values not representable exactly (0.1 in float32)."""
    w = TranscoderWeights(torch.eye(3), torch.zeros(3))
    hidden = torch.tensor([[[0.1, 0.0999999, 1.0]]])
    for use_compile in (False, True):
        encoder = SparseCLTEncoder({0: w}, top_k=3, activation_threshold=0.1, use_compile=use_compile)
        with caplog.at_level(logging.WARNING, logger="clt.sparse.encoder"):
            out = encoder.encode_layer(0, hidden)
        if use_compile:
            skip_unless_compiled(encoder, caplog)
        assert out["indices"].tolist() == [[[2, 0, -1]]]
        assert out["sparsity"].tolist() == [[pytest.approx(2 / 3)]]
