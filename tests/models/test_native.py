"""The compiled TopK selection against torch.topk, its fallbacks, and the training step on it."""

from __future__ import annotations

import logging
import sys

import pytest
import torch

from clt.config.training import TrainingConfig
from clt.config.transcoder import CLTConfig
from clt.models import native
from clt.models.activations import batchtopk_active, entries_at, topk_active
from clt.store import ActivationStore
from clt.training.activity import FeatureActivity, fire_counts
from clt.training.trainer import CLTTrainer

needs_library = pytest.mark.skipif(native.library() is None, reason="no C compiler: the fallback is tested below")


def _assert_same_selection(z: torch.Tensor, k: int) -> None:
    """Same kept values per row as torch.topk (a multiset: ties may pick other indices), and
    indices that point at those values."""
    values, indices = native.topk_rows(z, k)
    expected = z.topk(k, dim=-1, sorted=False).values.transpose(0, 1).sort(-1).values
    assert values.shape == indices.shape == (z.shape[1], z.shape[0], k)
    assert torch.equal(values.sort(-1).values.nan_to_num(9e9), expected.nan_to_num(9e9))
    at = z.transpose(0, 1).gather(-1, indices)
    assert torch.equal(at.nan_to_num(9e9), values.nan_to_num(9e9))
    assert all(len(set(row.tolist())) == k for row in indices.reshape(-1, k))  # distinct indices


@needs_library
@pytest.mark.parametrize(
    ("shape", "k"),
    [((64, 8, 2048), 32), ((7, 3, 5), 5), ((7, 3, 50), 1), ((33, 2, 100), 17), ((5, 1, 16), 3), ((9, 2, 301), 8)],
)
def test_native_topk_selects_what_torch_topk_selects(shape, k):
    g = torch.Generator().manual_seed(0)
    _assert_same_selection(torch.randn(*shape, generator=g), k)
    _assert_same_selection(torch.randint(0, 3, shape, generator=g).float(), k)  # ties everywhere
    ascending = torch.randn(*shape, generator=g).sort(-1).values.contiguous()  # the worst order for a scan
    _assert_same_selection(ascending, k)
    _assert_same_selection(-ascending, k)
    special = torch.randn(*shape, generator=g)
    special[0, 0, -1] = float("nan")  # NaN ranks above everything, as in torch.topk
    special[-1, -1, :] = float("-inf")
    special[0, -1, 0] = float("inf")
    _assert_same_selection(special, k)


@needs_library
def test_native_topk_reads_a_layer_major_view():
    """The encoder writes z as [L, N, F] and hands on its [N, L, F] view: same selection."""
    stored = torch.randn(3, 40, 300, generator=torch.Generator().manual_seed(7))
    _assert_same_selection(stored.transpose(0, 1), 9)


@pytest.mark.parametrize("scope", ["layer", "all"])
def test_batchtopk_and_entries_read_either_layout(scope):
    z = torch.randn(30, 3, 50, generator=torch.Generator().manual_seed(8))
    layer_major = z.transpose(0, 1).contiguous().transpose(0, 1)
    a, b = batchtopk_active(z, 4, scope), batchtopk_active(layer_major, 4, scope)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert torch.equal(a.preactivations, z[a.rows, a.layer, a.cols])
    strided = torch.randn(30, 6, 50)[:, ::2]  # neither layout: indexed directly
    e = entries_at(strided, a.layer, a.rows, a.cols)
    assert torch.equal(e.preactivations, strided[a.rows, a.layer, a.cols])


def test_native_topk_declines_what_it_does_not_handle():
    z = torch.randn(4, 2, 16)
    assert native.topk_rows(z.double(), 3) is None
    assert native.topk_rows(z.transpose(1, 2), 3) is None  # rows not contiguous
    assert native.topk_rows(z, 0) is None and native.topk_rows(z, 17) is None
    assert native.topk_rows(z[0], 3) is None


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """An empty kernel cache, rebuilt for the test and forgotten after it."""
    monkeypatch.setenv("CLT_CACHE_DIR", str(tmp_path))
    native.library.cache_clear()
    yield
    native.library.cache_clear()


def test_topk_falls_back_to_torch_without_a_compiler(monkeypatch, fresh_library, caplog):
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    with caplog.at_level(logging.WARNING, logger="clt.models.native"):
        assert native.library() is None
    assert "fall back to torch" in caplog.text
    z = torch.randn(16, 3, 64, generator=torch.Generator().manual_seed(1))
    assert native.topk_rows(z, 4) is None
    layer, rows, cols, pre = topk_active(z, 4)
    assert torch.equal(pre, z[rows, layer, cols])
    expected = z.topk(4, dim=-1).values.transpose(0, 1).sort(-1).values
    assert torch.equal(pre.view(3, 16, 4).sort(-1).values, expected)


def test_native_kernels_can_be_turned_off(monkeypatch, fresh_library):
    monkeypatch.setenv("CLT_NATIVE", "0")
    assert native.library() is None


@needs_library
def test_topk_active_is_the_same_with_and_without_the_kernel(monkeypatch):
    z = torch.randn(40, 3, 96, generator=torch.Generator().manual_seed(2))
    fast = topk_active(z, 6)
    monkeypatch.setattr(native, "topk_rows", lambda z, k: None)
    slow = topk_active(z, 6)
    assert torch.equal(fast.layer, slow.layer) and torch.equal(fast.rows, slow.rows)
    key = lambda e: (e.layer * 40 + e.rows) * 96 + e.cols  # noqa: E731
    assert torch.equal(key(fast).view(-1, 6).sort(-1).values, key(slow).view(-1, 6).sort(-1).values)
    assert torch.equal(fast.preactivations, z[fast.rows, fast.layer, fast.cols])


@needs_library
@pytest.mark.parametrize("cross", [False, True], ids=["plt", "clt"])
def test_training_on_the_kernels_matches_training_on_torch(monkeypatch, cross):
    """Five TopK PLT and CLT steps: the same weights and activity with the compiled kernels as
    with torch's."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(256, 3, 16, generator=g), torch.randn(256, 3, 16, generator=g)
    store = ActivationStore.from_nnsight_activations({"inputs": x, "outputs": y}, batch_size=64)
    cfg = CLTConfig(num_features=64, num_layers=3, d_model=16, activation_fn="topk", topk=4, cross_layer=cross)

    def run() -> CLTTrainer:
        torch.manual_seed(0)
        trainer = CLTTrainer(cfg, TrainingConfig(batch_size=64, training_steps=5, log_every=10**6), store)
        batches = store.batches(64, seed=0)
        for _ in range(5):
            trainer.train_step(batches)
        return trainer

    fast = run()
    monkeypatch.setattr(native, "library", lambda: None)  # torch.topk and embedding_bag
    slow = run()
    for (name, a), b in zip(fast.model.state_dict().items(), slow.model.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name
    assert torch.equal(fast.activity.fire_count, slow.activity.fire_count)


def test_fire_counts_count_nonzero_entries_like_a_bool_sum():
    g = torch.Generator().manual_seed(4)
    features = torch.relu(torch.randn(50, 3, 40, generator=g)) * (torch.rand(50, 3, 40, generator=g) < 0.3)
    features[0, 0, :5] = torch.tensor([-1.0, float("nan"), float("inf"), -float("inf"), 1e-45])
    assert torch.equal(fire_counts(features), (features != 0).sum(0))
    assert torch.equal(fire_counts(features.bfloat16().view(5, 10, 3, 40)), (features.bfloat16() != 0).sum(0))
    activity = FeatureActivity(3, 40)
    fired = activity.update(features)
    assert int(fired) == int((features != 0).sum()) and torch.equal(activity.fire_count, (features != 0).sum(0))


@needs_library
@pytest.mark.parametrize("ordered", [False, True])
@pytest.mark.parametrize("accumulate", [False, True])
def test_bag_sum_equals_embedding_bag(ordered, accumulate):
    g = torch.Generator().manual_seed(5)
    wide = torch.randn(30, 3 * 24, generator=g)
    table = wide[:, 24:48]  # rows 72 floats apart
    counts = torch.randint(0, 5, (11,), generator=g)
    counts[3] = 0  # an empty bag
    starts = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    idx = torch.randint(0, 30, (int(counts.sum()),), generator=g)
    weights = torch.randn(idx.numel(), generator=g)
    order = torch.randperm(idx.numel(), generator=g) if ordered else None
    out = torch.randn(11, 2 * 24, generator=g)[:, :24]  # strided rows
    before = out.clone()
    assert native.bag_sum(out, table, starts, idx, weights, order, accumulate=accumulate)
    e = order if ordered else torch.arange(idx.numel())
    expected = torch.nn.functional.embedding_bag(idx[e], table, starts[:-1], mode="sum", per_sample_weights=weights[e])
    torch.testing.assert_close(out, expected + before if accumulate else expected, rtol=1e-6, atol=1e-6)


@needs_library
def test_row_dots_equals_gathered_dot_products():
    g = torch.Generator().manual_seed(6)
    a, b = torch.randn(40, 3 * 17, generator=g)[:, 17:34], torch.randn(25, 17, generator=g)
    ia, ib = torch.randint(0, 40, (3000,), generator=g), torch.randint(0, 25, (3000,), generator=g)
    out = torch.empty(3000)
    assert native.row_dots(out, a, ia, b, ib)
    torch.testing.assert_close(out, (a[ia] * b[ib]).sum(-1), rtol=1e-5, atol=1e-5)
    assert not native.row_dots(out, a.double(), ia, b.double(), ib)  # declines; the caller falls back
    with pytest.raises(IndexError, match="ib holds indices outside"):
        native.row_dots(out, a, ia, b, ib + 1)
    with pytest.raises(IndexError, match="idx holds indices outside"):
        native.bag_sum(out.view(-1, 1)[:25], b[:, :1], torch.arange(26), torch.full((25,), 25), torch.ones(25))


@needs_library
def test_abs_weighted_sum_equals_torch_on_float32_rows_and_their_upper_halves():
    torch.manual_seed(0)
    wide = torch.randn(37, 5000) * torch.logspace(-20, 20, 5000)
    wide[3, 7] = float("inf")
    rows = wide[::2]  # a row stride other than the width
    weights = torch.rand(len(rows)) * 3
    for width in (4999, 1, 1500):
        out = torch.full((width,), 0.5)
        assert native.abs_weighted_sum(out, rows, weights)
        expected = 0.5 + weights.double() @ rows[:, :width].abs().double()
        torch.testing.assert_close(out, expected.float(), rtol=1e-6, atol=0)
    high = 1 if sys.byteorder == "little" else 0
    upper = wide.view(torch.int16).unflatten(1, (-1, 2))[..., high].contiguous()[::2]
    out = torch.zeros(4000)
    assert native.abs_weighted_sum(out, upper, weights)
    rounded = upper[:, :4000].view(torch.bfloat16).double().abs()
    torch.testing.assert_close(out, (weights.double() @ rounded).float(), rtol=1e-6, atol=0)
    assert not native.abs_weighted_sum(torch.zeros(3), rows.double(), weights)  # declined: float64 rows
    with pytest.raises(ValueError, match="do not fit"):
        native.abs_weighted_sum(torch.zeros(3), rows, weights[1:])


@needs_library
def test_feature_edges_equal_gathered_dot_products():
    g = torch.Generator().manual_seed(7)
    grads = torch.randn(6, 50, 33, generator=g)  # [batch, positions, d]
    table = torch.randn(2 * 40, 33, generator=g)[::2]  # a row stride other than d
    n = 300
    positions = torch.randint(0, 50, (n,), generator=g).sort().values.int()
    rows = torch.randint(0, 40, (n,), generator=g).int()
    cols = torch.randperm(1000, generator=g)[:n].int()
    activations = torch.rand(n, generator=g)
    for batch in (6, 3, 1):  # 4-row blocks and the rest
        out = torch.randn(batch, 1000, generator=g)
        expected = out.clone()
        dots = (grads[:batch, positions.long()] * table[rows.long()]).sum(-1)  # [batch, n]
        expected[:, cols.long()] += dots * activations
        assert native.feature_edges(out, grads[:batch], table, positions, rows, cols, activations)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert not native.feature_edges(out, grads[:1], table, positions.long(), rows, cols, activations)  # declined
    with pytest.raises(IndexError, match="positions holds indices outside"):
        native.feature_edges(out, grads[:1, :10], table, positions, rows, cols, activations)
