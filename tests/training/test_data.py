"""ActivationStore: statistics, deterministic shuffling, resume positions, disk format and errors."""

from __future__ import annotations

import json

import pytest
import torch

from clt.training.data import ActivationStore, StoreError, StoreWriter


def make_activations(n=300, layers=3, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, layers, d, generator=g) * 3 + 1
    y = torch.randn(n, layers, d, generator=g) * 0.5 - 2
    return {"inputs": x, "outputs": y, "layers": list(range(layers)), "token_ids": torch.arange(n)}


def write_store(path, acts, shard=50):
    writer = StoreWriter(path, layers=acts["layers"], d_model=acts["inputs"].shape[2], dtype="float32",
                         shard_tokens=shard)
    n = acts["inputs"].shape[0]
    for lo in range(0, n, 20):
        sl = slice(lo, lo + 20)
        rows = len(acts["token_ids"][sl])
        writer.add(acts["inputs"][sl], acts["outputs"][sl], token_ids=acts["token_ids"][sl],
                   positions=torch.zeros(rows), window_ids=torch.zeros(rows))
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
    per_layer = {"inputs": {i: acts["inputs"][:, i] for i in range(3)},
                 "outputs": {i: acts["outputs"][:, i] for i in range(3)}}
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


def test_ranks_get_disjoint_halves():
    store = ActivationStore.from_nnsight_activations(make_activations())
    full = next(store.batches(32, seed=1)).inputs
    halves = [next(store.batches(32, seed=1, rank=r, world_size=2)).inputs for r in (0, 1)]
    assert torch.equal(torch.cat(halves), full)


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


def test_empty_and_malformed_inputs(tmp_path):
    with pytest.raises(StoreError, match="no tokens"):
        ActivationStore.from_nnsight_activations({"inputs": torch.zeros(0, 2, 4), "outputs": torch.zeros(0, 2, 4)})
    with pytest.raises(StoreError, match="must both be"):
        ActivationStore.from_nnsight_activations({"inputs": torch.zeros(5, 2, 4), "outputs": torch.zeros(5, 2, 3)})
    with pytest.raises(StoreError, match="'outputs'"):
        ActivationStore.from_nnsight_activations({"inputs": torch.zeros(5, 2, 4)})
    with pytest.raises(StoreError, match="dtype"):
        StoreWriter(tmp_path / "w", layers=[0], d_model=4, dtype="int4")
