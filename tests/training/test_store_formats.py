"""Store formats: int8 codes with per-token scales, zstd shards, MLP-input stores, version 1 stores, errors."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from helpers import INT8_HALF_STEP, STATS_RTOL
from safetensors.torch import load

from clt.config.base import ConfigError
from clt.config.extraction import ExtractionConfig
from clt.store import ActivationStore, StoreError, StoreWriter


def activations(n=240, layers=3, d=64, seed=0):
    """Rows with very different magnitudes per token and layer, and some all-zero rows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, layers, d, generator=g) * torch.rand(n, layers, 1, generator=g).mul(6).exp()
    y = torch.randn(n, layers, d, generator=g) * 0.3 + 1
    x[5] = 0
    return x, y


def write(path, x, y, *, dtype="float32", compression="none", output_site="mlp_out", shard=64):
    writer = StoreWriter(
        path,
        layers=list(range(x.shape[1])),
        d_model=x.shape[2],
        dtype=dtype,
        shard_tokens=shard,
        compression=compression,
        output_site=output_site,
    )
    for lo in range(0, len(x), 40):
        n = len(x[lo : lo + 40])
        writer.add(
            x[lo : lo + 40],
            None if output_site == "mlp_in" else y[lo : lo + 40],
            token_ids=torch.arange(lo, lo + n),
            positions=torch.zeros(n),
            window_ids=torch.zeros(n),
        )
        writer.flush_if_full({"rows": lo + n})
    return writer.finish()


def test_int8_error_is_at_most_half_a_step_and_statistics_are_of_the_decoded_values(tmp_path):
    x, y = activations()
    store = write(tmp_path / "s", x, y, dtype="int8")
    got_x, got_y = store.tensors()
    for original, got in ((x, got_x), (y, got_y)):
        step = original.double().abs().amax(-1, keepdim=True) / 127  # the oracle's absmax scale
        error = (original.double() - got.double()).abs()
        assert bool((error <= step * INT8_HALF_STEP + 1e-30).all())
        assert error.max() > 0  # really quantised
    assert torch.equal(got_x[5], torch.zeros_like(got_x[5]))
    sums = store.stats.sums  # statistics of what the trainer reads, not of the float inputs
    # float32 block sums (helpers.STATS_RTOL) of values of both signs: relative to the sum of |x|
    assert bool(((sums["in_sum"] - got_x.double().sum(0)).abs() <= STATS_RTOL * got_x.double().abs().sum(0)).all())
    assert (sums["in_sum"] - x.double().sum(0)).abs().max() > 0.5
    assert torch.allclose(sums["out_sq"], got_y.double().square().sum(0), rtol=STATS_RTOL)
    raw = load((tmp_path / "s" / "shard_00000.safetensors").read_bytes())
    assert raw["inputs"].dtype == torch.int8 and raw["inputs_scale"].shape == (80, 3)  # flushed after 2 adds of 40 rows
    assert raw["inputs"].abs().amax(-1)[:5].eq(127).all()  # absmax maps to ±127
    batch = next(store.batches(32, seed=1))
    assert batch.inputs.dtype == torch.float32 and batch.inputs.shape == (32, 3, 64)


def test_zstd_round_trip_is_exact_and_batches_match_the_plain_store(tmp_path):
    x, y = activations()
    for dtype in ("float32", "int8"):
        plain = write(tmp_path / f"plain-{dtype}", x, y, dtype=dtype)
        packed = write(tmp_path / f"zstd-{dtype}", x, y, dtype=dtype, compression="zstd")
        assert packed.compression == "zstd" and all(p.suffix == ".zst" for p in packed.shards)
        assert all(torch.equal(a, b) for a, b in zip(plain.tensors(), packed.tensors()))
        if dtype == "float32":
            assert torch.equal(packed.tensors()[0], x) and torch.equal(packed.tensors()[1], y)
        reopened = ActivationStore.open(tmp_path / f"zstd-{dtype}")
        for a, b in zip(plain.batches(48, seed=3, start=2), [next(reopened.batches(48, seed=3, start=2))]):
            assert torch.equal(a.inputs, b.inputs) and torch.equal(a.outputs, b.outputs)
        assert torch.equal(plain.shard(1)["token_ids"], reopened.shard(1)["token_ids"])


def test_corrupt_or_truncated_zstd_shard_gives_a_clear_error(tmp_path):
    x, y = activations()
    write(tmp_path / "s", x, y, compression="zstd")
    shard = tmp_path / "s" / "shard_00001.safetensors.zst"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError, match="shard_00001.safetensors.zst is corrupt or truncated"):
        ActivationStore.open(tmp_path / "s").shard(1)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(flipped))
    with pytest.raises(StoreError, match="corrupt or truncated"):
        next(ActivationStore.open(tmp_path / "s").batches(240))
    shard.unlink()
    with pytest.raises(StoreError, match="missing"):
        ActivationStore.open(tmp_path / "s").tensors()
    assert torch.equal(ActivationStore.open(tmp_path / "s").shard(0)["inputs"], x[:80])  # the rest is intact


def test_bytes_per_token_of_each_format(tmp_path):
    x, y = activations(n=256, layers=2, d=128)
    sizes, stores = {}, {}
    for dtype, compression in (("float16", "none"), ("int8", "none"), ("float16", "zstd"), ("int8", "zstd")):
        store = write(tmp_path / f"{dtype}-{compression}", x, y, dtype=dtype, compression=compression, shard=256)
        sizes[dtype, compression] = sum(p.stat().st_size for p in store.shards) / store.n_tokens
        stores[dtype, compression] = store
    meta = 8 + 4 + 8  # token id, position, window id
    assert sizes["float16", "none"] == pytest.approx(2 * 2 * 128 * 2 + meta, rel=0.02)
    assert sizes["int8", "none"] == pytest.approx(2 * 2 * (128 + 4) + meta, rel=0.02)
    # the store's own byte count: per token, 2 layers x (inputs, outputs) x (128 int8 codes + a float32 scale)
    # and the metadata; plus the float64 statistics (sums of x, x², y, y² per layer and dimension, and the count)
    int8, stats = stores["int8", "none"], 4 * 2 * 128 * 8 + 8
    assert int8.nbytes() == pytest.approx(int8.n_tokens * (2 * 2 * (128 + 4) + meta) + stats, rel=0.02)
    assert sizes["float16", "zstd"] < sizes["float16", "none"]
    assert sizes["int8", "zstd"] < sizes["int8", "none"]


def test_mlp_input_store_writes_inputs_once_and_reads_them_as_targets(tmp_path):
    x, y = activations(n=120)
    store = write(tmp_path / "s", x, y, output_site="mlp_in")
    assert store.output_site == "mlp_in" and "mlp_in" in repr(store)
    assert set(load((tmp_path / "s" / "shard_00000.safetensors").read_bytes())) == {
        "inputs",
        "token_ids",
        "positions",
        "window_ids",
    }
    got_x, got_y = store.tensors()
    assert torch.equal(got_x, x) and torch.equal(got_y, x)
    batch = next(store.batches(50, seed=2))
    assert torch.equal(batch.inputs, batch.outputs)
    stats = store.norm_stats()
    assert torch.equal(stats.input_mean, stats.output_mean) and torch.equal(stats.input_std, stats.output_std)
    full = write(tmp_path / "full", x, y)
    assert store.nbytes() < 0.55 * full.nbytes()
    copy = store.save(tmp_path / "copy", dtype="int8", compression="zstd")
    assert copy.output_site == "mlp_in" and torch.equal(copy.tensors()[0], copy.tensors()[1])
    writer = StoreWriter(tmp_path / "x", layers=[0, 1, 2], d_model=64, output_site="mlp_in")
    with pytest.raises(StoreError, match="MLP inputs only.*outputs=None"):
        writer.add(x[:4], y[:4], token_ids=torch.zeros(4), positions=torch.zeros(4), window_ids=torch.zeros(4))


def test_version_1_store_is_read_and_resumed(tmp_path):
    x, y = activations(n=100)
    write(tmp_path / "s", x[:60], y[:60], shard=30)
    manifest_file = tmp_path / "s" / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    for key in ("compression", "output_site"):
        del manifest[key]
    manifest_file.write_text(json.dumps({**manifest, "version": 1, "complete": False}))
    old = ActivationStore.open(tmp_path / "s")
    assert old.compression == "none" and old.output_site == "mlp_out" and torch.equal(old.tensors()[1], y[:60])
    writer = StoreWriter(tmp_path / "s", layers=[0, 1, 2], d_model=64, dtype="float32", shard_tokens=30)
    writer.add(x[60:], y[60:], token_ids=torch.arange(40), positions=torch.zeros(40), window_ids=torch.zeros(40))
    store = writer.finish()
    assert json.loads(manifest_file.read_text())["version"] == 2
    assert torch.equal(store.tensors()[0], x)
    with pytest.raises(StoreError, match="cannot resume .*its compression is 'none', this run's is 'zstd'"):
        StoreWriter(tmp_path / "s", layers=[0, 1, 2], d_model=64, dtype="float32", compression="zstd")
    with pytest.raises(StoreError, match="cannot resume .*its dtype is 'float32', this run's is 'int8'"):
        StoreWriter(tmp_path / "s", layers=[0, 1, 2], d_model=64, dtype="int8")
    with pytest.raises(StoreError, match="cannot resume .*its output_site is 'mlp_out'"):
        StoreWriter(tmp_path / "s", layers=[0, 1, 2], d_model=64, dtype="float32", output_site="mlp_in")
    manifest_file.write_text(json.dumps({**manifest, "version": 3}))
    with pytest.raises(StoreError, match="version 3, this clt reads versions"):
        ActivationStore.open(tmp_path / "s")


def test_unknown_formats_and_a_missing_zstandard_are_named(tmp_path, monkeypatch):
    settings = {"layers": [0], "d_model": 4}
    for option, value in (("dtype", "int4"), ("compression", "lz4"), ("output_site", "resid")):
        with pytest.raises(StoreError, match=f"{option} '{value}' is not one of"):
            StoreWriter(tmp_path / "s", **settings, **{option: value})
        field = "store_dtype" if option == "dtype" else option
        with pytest.raises(ConfigError, match=f"{field} '{value}' is not one of"):
            ExtractionConfig(**{field: value})
    assert ExtractionConfig(store_dtype="int8", compression="zstd", output_site="mlp_in").store_dtype == "int8"
    monkeypatch.setitem(sys.modules, "zstandard", None)
    with pytest.raises(ImportError, match="pip install zstandard"):
        StoreWriter(tmp_path / "z", **settings, compression="zstd")
    assert not (tmp_path / "z" / "manifest.json").exists()
