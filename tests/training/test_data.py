"""ActivationStore: statistics, deterministic shuffling, resume positions, disk format and errors."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import STATS_RTOL
from safetensors.torch import load_file

from clt.store import ActivationStore, StoreError, StoreWriter


def make_activations(n=300, layers=3, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, layers, d, generator=g) * 3 + 1
    y = torch.randn(n, layers, d, generator=g) * 0.5 - 2
    return {"inputs": x, "outputs": y, "layers": list(range(layers)), "token_ids": torch.arange(n)}


def write_store(path, acts, shard=50, dtype="float32"):
    writer = StoreWriter(path, layers=acts["layers"], d_model=acts["inputs"].shape[2], dtype=dtype, shard_tokens=shard)
    n = acts["inputs"].shape[0]
    for lo in range(0, n, 20):
        sl = slice(lo, lo + 20)
        rows = len(acts["token_ids"][sl])
        writer.add(
            acts["inputs"][sl],
            acts["outputs"][sl],
            token_ids=acts["token_ids"][sl],
            positions=torch.zeros(rows),
            window_ids=torch.zeros(rows),
        )
        writer.flush_if_full({"rows": lo + rows})
    return writer.finish()


def rows_key(t):
    return sorted(map(tuple, t.reshape(len(t), -1)[:, :2].tolist()))


def test_norm_stats_match_torch():
    acts = make_activations()
    stats = ActivationStore.from_nnsight_activations(acts, batch_size=32, normalize=True).norm_stats()
    x = acts["inputs"]
    assert torch.allclose(stats.input_mean, x.mean(0), atol=1e-5)
    centred_rms = (x - x.mean(0)).square().mean((0, 2)).sqrt()
    assert torch.allclose(stats.input_std[:, 0], centred_rms, atol=1e-5)
    identity = ActivationStore.from_nnsight_activations(acts, normalize=False).norm_stats()
    assert torch.equal(identity.input_mean, torch.zeros(3, 8)) and torch.equal(identity.output_std, torch.ones(3, 8))


def test_dict_of_layers_form():
    acts = make_activations()
    per_layer = {
        "inputs": {i: acts["inputs"][:, i] for i in range(3)},
        "outputs": {i: acts["outputs"][:, i] for i in range(3)},
    }
    store = ActivationStore.from_nnsight_activations(per_layer, batch_size=10)
    assert torch.equal(store.tensors()[0], acts["inputs"]) and store.layers == [0, 1, 2]


@pytest.mark.parametrize("on_disk", [False, True])
def test_batches_cover_each_row_once_per_epoch_and_resume_exactly(tmp_path, on_disk):
    acts = make_activations(n=300)
    store = write_store(tmp_path / "s", acts) if on_disk else ActivationStore.from_nnsight_activations(acts)
    stream = store.batches(30, seed=3)
    epoch = torch.cat([next(stream).inputs for _ in range(10)])
    assert rows_key(epoch) == rows_key(acts["inputs"])
    assert not torch.equal(epoch, acts["inputs"])
    whole = store.batches(30, seed=3)
    first = [next(whole).inputs for _ in range(17)]
    resumed = next(store.batches(30, seed=3, start=16)).inputs
    assert torch.equal(first[16], resumed)
    other_seed = next(store.batches(30, seed=4)).inputs
    assert not torch.equal(first[0], other_seed)


def test_batch_size_not_dividing_store_still_yields_full_batches(tmp_path):
    store = write_store(tmp_path / "s", make_activations(n=310))
    stream = store.batches(64, seed=0)
    assert all(next(stream).inputs.shape[0] == 64 for _ in range(12))


@pytest.mark.parametrize("on_disk", [False, True])
def test_ranks_get_disjoint_halves(tmp_path, on_disk):
    acts = make_activations()
    store = write_store(tmp_path / "s", acts, shard=70) if on_disk else ActivationStore.from_nnsight_activations(acts)
    full, ranks = store.batches(32, seed=1), [store.batches(32, seed=1, rank=r, world_size=2) for r in (0, 1)]
    for _ in range(12):  # more than an epoch: batches that straddle shuffle windows
        assert torch.equal(torch.cat([next(r).inputs for r in ranks]), next(full).inputs)


def test_batches_gather_rows_of_several_shards_in_the_store_dtype(tmp_path):
    acts = make_activations(n=230)
    store = write_store(tmp_path / "s", acts, shard=40, dtype="bfloat16")
    rows = {tuple(r) for r in acts["inputs"].bfloat16().float().reshape(230, -1)[:, :3].tolist()}
    stream = store.batches(23, seed=5)
    epoch = [next(stream) for _ in range(10)]
    assert all(b.inputs.dtype == torch.float32 and b.inputs.shape == (23, 3, 8) for b in epoch)
    seen = torch.cat([b.inputs for b in epoch]).reshape(230, -1)[:, :3]
    assert {tuple(r) for r in seen.tolist()} == rows and len(rows) == 230
    half = next(store.batches(23, seed=5, dtype=torch.bfloat16))
    assert half.inputs.dtype == torch.bfloat16 and torch.equal(half.inputs.float(), epoch[0].inputs)
    assert torch.equal(store.tensors(max_tokens=75)[1], acts["outputs"][:75].bfloat16().float())


def test_disk_store_round_trip_and_dtypes(tmp_path):
    acts = make_activations()
    memory = ActivationStore.from_nnsight_activations(acts)
    disk = memory.save(tmp_path / "s", dtype="bfloat16", shard_tokens=64)
    reopened = ActivationStore.open(tmp_path / "s")
    assert reopened.n_tokens == 300 and reopened.dtype == "bfloat16" and len(reopened.shards) > 1
    assert torch.equal(reopened.tensors()[0], acts["inputs"].bfloat16().float())
    stored = acts["inputs"].bfloat16().float()
    assert torch.allclose(disk.norm_stats().input_mean, stored.mean(0), atol=1e-5)
    assert torch.allclose(memory.norm_stats().input_mean, acts["inputs"].mean(0), atol=1e-5)
    assert reopened.nbytes() > 0 and "300 tokens" in repr(reopened)


def test_the_seed_import_path_is_the_store():
    from clt.training.data import ActivationStore as SeedStore

    store = SeedStore.from_nnsight_activations(make_activations())
    assert SeedStore is ActivationStore and store.n_tokens == 300 and "layers=0..2" in repr(store)


def test_corrupt_and_truncated_files_give_clear_errors(tmp_path):
    store = write_store(tmp_path / "s", make_activations())
    shard = tmp_path / "s" / "shard_00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(StoreError, match="corrupt or truncated"):
        ActivationStore.open(tmp_path / "s").shard(1)
    (tmp_path / "s" / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match="corrupt"):
        ActivationStore.open(tmp_path / "s")
    with pytest.raises(StoreError, match="not an activation store"):
        ActivationStore.open(tmp_path / "elsewhere")
    assert store.n_tokens == 300


def test_nan_activations_are_rejected_and_nothing_written_is_lost(tmp_path):
    acts = make_activations()
    writer = StoreWriter(tmp_path / "s", layers=[0, 1, 2], d_model=8, dtype="float32", shard_tokens=10)
    z = torch.zeros(20)
    writer.add(acts["inputs"][:20], acts["outputs"][:20], token_ids=z, positions=z, window_ids=z)
    writer.flush({"rows": 20})
    bad = acts["inputs"][20:40].clone()
    bad[3, 1, 2] = float("nan")
    with pytest.raises(StoreError, match="NaN.*layer 1"):
        writer.add(bad, acts["outputs"][20:40], token_ids=z, positions=z, window_ids=z)
    assert ActivationStore.open(tmp_path / "s").n_tokens == 20
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["state"] == {"rows": 20} and not manifest["complete"]


@pytest.mark.parametrize("shards_before_crash", [0, 2])
def test_crash_between_statistics_and_manifest_is_recounted_on_resume(tmp_path, monkeypatch, shards_before_crash):
    """The statistics file is written before the manifest; a crash between them must not double-count."""
    acts = make_activations(n=60)
    z = torch.zeros(20)
    writer = StoreWriter(tmp_path / "s", layers=[0, 1, 2], d_model=8, dtype="float32", shard_tokens=20)
    for i in range(shards_before_crash):
        writer.add(
            acts["inputs"][20 * i : 20 * (i + 1)],
            acts["outputs"][20 * i : 20 * (i + 1)],
            token_ids=z,
            positions=z,
            window_ids=z,
        )
        writer.flush({"rows": 20 * (i + 1)})
    writer.add(acts["inputs"][40:], acts["outputs"][40:], token_ids=z, positions=z, window_ids=z)
    monkeypatch.setattr(StoreWriter, "_write_manifest", lambda self: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        writer.flush({"rows": 60})  # the shard and its statistics are written, the manifest is not
    monkeypatch.undo()
    resumed = StoreWriter(tmp_path / "s", layers=[0, 1, 2], d_model=8, dtype="float32", shard_tokens=20)
    assert float(resumed.stats.sums["count"]) == resumed.n_tokens == 20 * shards_before_crash
    if shards_before_crash:
        expected = acts["inputs"][: resumed.n_tokens].double().mean(0)
        torch.testing.assert_close(resumed.stats.norm_stats().input_mean.double(), expected, rtol=1e-6, atol=1e-6)


def test_empty_and_malformed_inputs(tmp_path):
    with pytest.raises(StoreError, match="no tokens"):
        ActivationStore.from_nnsight_activations({"inputs": torch.zeros(0, 2, 4), "outputs": torch.zeros(0, 2, 4)})
    with pytest.raises(StoreError, match="must both be"):
        ActivationStore.from_nnsight_activations({"inputs": torch.zeros(5, 2, 4), "outputs": torch.zeros(5, 2, 3)})
    with pytest.raises(StoreError, match="'outputs'"):
        ActivationStore.from_nnsight_activations({"inputs": torch.zeros(5, 2, 4)})
    with pytest.raises(StoreError, match="dtype"):
        StoreWriter(tmp_path / "w", layers=[0], d_model=4, dtype="int4")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_statistics_of_the_stored_rows_match_float64(tmp_path, dtype):
    acts = make_activations(n=300)
    acts["inputs"] = acts["inputs"] * 40 + 300  # large mean: cancellation in E[x^2] - E[x]^2
    store = write_store(tmp_path / "s", acts, dtype=dtype)
    stored = store.tensors()[0].double()
    sums = store.stats.sums
    assert bool(((sums["in_sum"] - stored.sum(0)).abs() <= STATS_RTOL * stored.abs().sum(0)).all())
    assert torch.allclose(sums["in_sq"], stored.square().sum(0), rtol=STATS_RTOL)
    assert float(sums["count"]) == 300


def test_streamed_shards_are_plain_safetensors(tmp_path):
    acts = make_activations(n=90)
    write_store(tmp_path / "s", acts, shard=60, dtype="float16")
    first = load_file(str(tmp_path / "s" / "shard_00000.safetensors"))
    assert {k: v.dtype for k, v in first.items()} == {
        "inputs": torch.float16,
        "outputs": torch.float16,
        "token_ids": torch.int64,
        "positions": torch.int32,
        "window_ids": torch.int64,
    }
    assert torch.equal(first["inputs"], acts["inputs"][:60].half())
    assert torch.equal(first["token_ids"], torch.arange(60))
    odd = make_activations(n=7, layers=1, d=3)  # 7 x 3 float16 = 42 bytes: 8-byte fields must stay aligned
    store = write_store(tmp_path / "odd", odd, dtype="float16")
    assert torch.equal(store.shard(0)["token_ids"], torch.arange(7))
    assert torch.equal(store.tensors()[1], odd["outputs"].half().float())


def test_float16_overflow_is_rejected_and_nothing_written_is_lost(tmp_path):
    writer = StoreWriter(tmp_path / "s", layers=[0, 1], d_model=4, dtype="float16", shard_tokens=5)
    z = torch.zeros(5)
    writer.add(torch.ones(5, 2, 4), torch.ones(5, 2, 4), token_ids=z, positions=z, window_ids=z)
    writer.flush({"rows": 5})
    big = torch.ones(5, 2, 4)
    big[2, 1, 3] = 1e5  # finite in float32, inf in float16
    with pytest.raises(StoreError, match="output activations of layer 1.*float16's range.*bfloat16 or float32"):
        writer.add(torch.ones(5, 2, 4), big, token_ids=z, positions=z, window_ids=z)
    writer.flush({"rows": 10})
    assert ActivationStore.open(tmp_path / "s").n_tokens == 5
    assert torch.equal(writer.stats.sums["out_sum"], torch.full((2, 4), 5.0, dtype=torch.float64))


def test_manifest_without_fields_and_missing_shard_give_clear_errors(tmp_path):
    write_store(tmp_path / "s", make_activations())
    manifest = tmp_path / "s" / "manifest.json"
    (tmp_path / "s" / "shard_00002.safetensors").unlink()
    with pytest.raises(StoreError, match="shard_00002.safetensors is missing.*re-run the extraction"):
        ActivationStore.open(tmp_path / "s").tensors()
    manifest.write_text(json.dumps({"version": 1, "layers": [0, 1, 2]}))
    with pytest.raises(StoreError, match="corrupt \\(no d_model, dtype"):
        ActivationStore.open(tmp_path / "s")
    manifest.write_text("[]")
    with pytest.raises(StoreError, match="version None"):
        ActivationStore.open(tmp_path / "s")


def test_store_of_other_layers_or_width_is_refused(tmp_path):
    acts = make_activations(n=100)
    write_store(tmp_path / "s", acts)
    for change in ({"layers": [0, 1]}, {"d_model": 16}):
        settings = {"layers": [0, 1, 2], "d_model": 8, "dtype": "float32", **change}
        key = next(iter(change))
        with pytest.raises(StoreError, match=f"cannot resume .*its {key} is .*use the same settings or a new folder"):
            StoreWriter(tmp_path / "s", **settings)
    other = write_store(tmp_path / "other", make_activations(n=100, d=4))  # a shard of another width
    (tmp_path / "other" / "shard_00000.safetensors").replace(tmp_path / "s" / "shard_00000.safetensors")
    with pytest.raises(
        StoreError, match=r"shard 0 has inputs of shape \(60, 3, 4\), expected \(60, 3, 8\): the store is"
    ):
        ActivationStore.open(tmp_path / "s").shard(0)
    assert other.d_model == 4
