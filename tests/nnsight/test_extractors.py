"""ActivationExtractor against plain PyTorch forward hooks, padding/BOS handling and resume."""

from __future__ import annotations

import os
import re

import pytest
import torch
from helpers import INT8_HALF_STEP

from clt.data.corpus import token_windows
from clt.nnsight.extractors import ActivationExtractor
from clt.nnsight.loading import find_layout
from clt.store import ActivationStore, StoreError

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A tuple is an immutable sequence; lists are mutable.",
    "Short one.",
    "Exceptions propagate up the call stack until a matching except clause handles them. " * 3,
]


def hook_reference(model, windows, layers, pad_id):
    """x_l, y_l at every real position, captured with plain forward hooks (no nnsight)."""
    layout = find_layout(model)
    width = max(len(w.token_ids) for w in windows)
    ids = torch.full((len(windows), width), pad_id)
    mask = torch.zeros_like(ids)
    for row, w in enumerate(windows):
        ids[row, : len(w.token_ids)] = torch.tensor(w.token_ids)
        mask[row, : len(w.token_ids)] = 1
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for layer in layers:
        mlp = model.get_submodule(layout.mlp_paths[layer])
        handles.append(
            mlp.register_forward_hook(
                lambda mod, args, out, layer=layer: captured.__setitem__(layer, (args[0].detach(), out.detach()))
            )
        )
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
    return captured, mask.bool()


@pytest.mark.parametrize("layers", [None, [0, 2]])
def test_extracted_activations_equal_forward_hooks(tiny, layers):
    name, model, tokenizer = tiny
    extractor = ActivationExtractor(
        name, model=model, tokenizer=tokenizer, layers=layers, context_length=24, exclude_bos=True
    )
    windows = list(token_windows(TEXTS, tokenizer, 24))
    got = extractor.activations(windows)
    captured, mask = hook_reference(model, windows, extractor.layers, extractor.pad_id)
    mask[:, 0] = False
    assert got["inputs"].shape == (int(mask.sum()), len(extractor.layers), model.config.hidden_size)
    for i, layer in enumerate(extractor.layers):
        x, y = captured[layer]
        assert (got["inputs"][:, i] - x[mask]).abs().max() <= 1e-5
        assert (got["outputs"][:, i] - y[mask]).abs().max() <= 1e-5
    ids = torch.cat([torch.tensor(w.token_ids[1:]) for w in windows])
    assert torch.equal(got["token_ids"], ids)


def test_bos_kept_when_not_excluded(tiny_llama):
    model, tokenizer = tiny_llama
    extractor = ActivationExtractor("tiny-llama", model=model, tokenizer=tokenizer, exclude_bos=False)
    windows = list(token_windows(TEXTS[:2], tokenizer, 64))
    got = extractor.activations(windows)
    assert got["inputs"].shape[0] == sum(len(w.token_ids) for w in windows)
    assert (got["positions"] == 0).sum() == 2
    assert (got["token_ids"][got["positions"] == 0] == tokenizer.bos_token_id).all()


def test_long_documents_are_split_not_truncated(tiny_llama):
    _, tokenizer = tiny_llama
    text = TEXTS[3]
    n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    windows = list(token_windows([text], tokenizer, 16))
    assert sum(len(w.token_ids) - 1 for w in windows) == n
    assert all(w.token_ids[0] == tokenizer.bos_token_id for w in windows)
    assert max(len(w.token_ids) for w in windows) == 16


def test_memory_and_disk_extraction_agree(tiny_llama, tmp_path):
    model, tokenizer = tiny_llama
    extractor = ActivationExtractor("tiny-llama", model=model, tokenizer=tokenizer, context_length=32, batch_size=4)
    memory = extractor.extract(max_tokens=700, store_dtype="float32", progress=False)
    disk = extractor.extract(
        max_tokens=700, store_dtype="float32", output_dir=tmp_path / "s", shard_tokens=200, progress=False
    )
    assert memory.n_tokens == disk.n_tokens == 700
    assert len(disk.shards) > 1
    for a, b in zip(memory.tensors(), disk.tensors()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("write_behind", [False, True])
def test_interrupted_extraction_resumes_to_the_same_store(tiny_llama, tmp_path, monkeypatch, write_behind):
    model, tokenizer = tiny_llama
    extractor = ActivationExtractor("tiny-llama", model=model, tokenizer=tokenizer, context_length=32, batch_size=2)
    reference = extractor.extract(max_tokens=900, store_dtype="float32", progress=False)

    calls = {"n": 0}
    original = extractor.activations

    def crashing(windows, **kwargs):
        calls["n"] += 1
        if calls["n"] == 9:
            raise KeyboardInterrupt("simulated crash")
        return original(windows, **kwargs)

    settings = dict(max_tokens=900, store_dtype="float32", shard_tokens=100, progress=False, write_behind=write_behind)
    monkeypatch.setattr(extractor, "activations", crashing)
    with pytest.raises(KeyboardInterrupt):
        extractor.extract(output_dir=tmp_path / "s", **settings)
    partial = ActivationStore.open(tmp_path / "s")
    assert 0 < partial.n_tokens < 900
    monkeypatch.setattr(extractor, "activations", original)
    resumed = extractor.extract(output_dir=tmp_path / "s", **settings)
    assert resumed.n_tokens == 900
    for a, b in zip(reference.tensors(), resumed.tensors()):
        assert torch.equal(a, b)
    stats_a, stats_b = reference.norm_stats(), resumed.norm_stats()
    assert torch.allclose(stats_a.input_mean, stats_b.input_mean, atol=1e-6)
    assert torch.allclose(stats_a.output_std, stats_b.output_std, atol=1e-6)


def test_store_dtype_is_applied_while_gathering(tiny_llama):
    model, tokenizer = tiny_llama
    extractor = ActivationExtractor("tiny-llama", model=model, tokenizer=tokenizer, context_length=24)
    windows = list(token_windows(TEXTS, tokenizer, 24))
    full, half = extractor.activations(windows), extractor.activations(windows, dtype=torch.float16)
    assert half["inputs"].dtype == half["outputs"].dtype == torch.float16
    assert torch.equal(half["inputs"], full["inputs"].half()) and torch.equal(half["outputs"], full["outputs"].half())


def test_write_behind_gives_the_same_store(tiny_llama, tmp_path):
    model, tokenizer = tiny_llama
    extractor = ActivationExtractor("tiny-llama", model=model, tokenizer=tokenizer, context_length=32, batch_size=3)
    stores = [
        extractor.extract(
            max_tokens=500, output_dir=tmp_path / str(behind), shard_tokens=120, progress=False, write_behind=behind
        )
        for behind in (False, True)
    ]
    assert stores[0].n_tokens == stores[1].n_tokens == 500 and len(stores[0].shards) == len(stores[1].shards) > 1
    for a, b in zip(stores[0].tensors(), stores[1].tensors()):
        assert torch.equal(a, b)
    assert torch.equal(stores[0].stats.sums["in_sq"], stores[1].stats.sums["in_sq"])


def _no_model_work(*args, **kwargs):
    pytest.fail("the model ran before the output folder was checked")


def test_output_folder_under_a_file_fails_before_any_model_work(tiny_llama, tmp_path, monkeypatch):
    model, tokenizer = tiny_llama
    extractor = ActivationExtractor("tiny-llama", model=model, tokenizer=tokenizer, context_length=32)
    monkeypatch.setattr(extractor, "activations", _no_model_work)
    results = tmp_path / "results.txt"
    results.write_text("keep me")
    for target in (results / "store", results):  # a parent that is a file (works as root), or the path itself
        message = rf"cannot write the activation store to {re.escape(str(target))}: .* is a file.*choose another folder"
        with pytest.raises(StoreError, match=message):
            extractor.extract(TEXTS, max_tokens=50, output_dir=target, progress=False)
    assert results.read_text() == "keep me"


@pytest.mark.skipif(
    os.geteuid() == 0,
    reason="root may write into read-only folders (as root, "
    "test_output_folder_under_a_file_fails_before_any_model_work checks the error)",
)
def test_read_only_folders_fail_before_any_model_work_and_keep_their_data(tiny_llama, tmp_path, monkeypatch):
    model, tokenizer = tiny_llama
    extractor = ActivationExtractor("tiny-llama", model=model, tokenizer=tokenizer, context_length=32)
    store = tmp_path / "store"
    extractor.extract(TEXTS, max_tokens=50, output_dir=store, progress=False)
    before = {p.name: p.read_bytes() for p in store.iterdir()}
    monkeypatch.setattr(extractor, "activations", _no_model_work)
    parent = tmp_path / "read-only"
    parent.mkdir()
    for folder in (store, parent):
        folder.chmod(0o500)
    try:
        for target in (store, parent / "new"):  # resuming a read-only store, creating a store in a read-only folder
            message = rf"cannot write the activation store to {re.escape(str(target))}: .*make this one writable"
            with pytest.raises(StoreError, match=message):
                extractor.extract(TEXTS, max_tokens=500, output_dir=target, progress=False)
    finally:
        for folder in (store, parent):
            folder.chmod(0o700)
    assert {p.name: p.read_bytes() for p in store.iterdir()} == before
    assert not (parent / "new").exists()


def test_resume_with_other_settings_is_refused(tiny_llama, tmp_path):
    model, tokenizer = tiny_llama
    ActivationExtractor("tiny-llama", model=model, tokenizer=tokenizer, context_length=32).extract(
        max_tokens=100, output_dir=tmp_path / "s", progress=False
    )
    other = ActivationExtractor("tiny-llama", model=model, tokenizer=tokenizer, context_length=16)
    with pytest.raises(ValueError, match="cannot resume"):
        other.extract(max_tokens=200, output_dir=tmp_path / "s", progress=False)


def test_bad_arguments(tiny_llama):
    model, tokenizer = tiny_llama
    with pytest.raises(ValueError, match="layers"):
        ActivationExtractor("tiny-llama", model=model, tokenizer=tokenizer, layers=[7])
    with pytest.raises(ValueError, match="context"):
        ActivationExtractor("tiny-llama", model=model, tokenizer=tokenizer, context_length=10_000)
    with pytest.raises(ValueError, match=r"layers \[-1\] are invalid: the model has layers 0..2"):
        ActivationExtractor("tiny-llama", model=model, tokenizer=tokenizer, layers=[-1, 0])
    extractor = ActivationExtractor("tiny-llama", model=model, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="no text"):
        extractor.extract(["", "  "], max_tokens=10, progress=False)


def test_empty_or_missing_corpus_files(tiny_llama, tmp_path):
    model, tokenizer = tiny_llama
    extractor = ActivationExtractor("tiny-llama", model=model, tokenizer=tokenizer)
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "folder").mkdir()
    for source, message in (
        (tmp_path / "empty.txt", "contains no text"),
        (tmp_path / "nothing.txt", "corpus not found"),
        (tmp_path / "folder", "contains no .txt files"),
    ):
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            extractor.extract(source, max_tokens=10, output_dir=tmp_path / "store", progress=False)
    assert not (tmp_path / "store").exists()


def test_seed_api_dict_feeds_the_store(tiny_llama, tmp_path):
    model, tokenizer = tiny_llama
    corpus = tmp_path / "dataset.txt"
    corpus.write_text("\n".join(TEXTS * 5))
    extractor = ActivationExtractor(model_name="tiny-llama")
    activations = extractor.extract_from_dataset(str(corpus), max_tokens=200, progress=False)
    store = ActivationStore.from_nnsight_activations(activations_dict=activations, batch_size=16, normalize=True)
    assert store.n_tokens == 200 and store.batch_size == 16
    batch = next(iter(store))
    assert batch.inputs.shape == (16, 3, 32)


@pytest.mark.slow
def test_smollm2_extraction_equals_forward_hooks(smollm2):
    model, tokenizer = smollm2
    extractor = ActivationExtractor(
        "smollm2-135m", model=model, tokenizer=tokenizer, layers=[0, 14, 29], context_length=24
    )
    windows = list(token_windows(TEXTS, tokenizer, 24))
    got = extractor.activations(windows)
    captured, mask = hook_reference(model, windows, extractor.layers, extractor.pad_id)
    mask[:, 0] = False
    for i, layer in enumerate(extractor.layers):
        x, y = captured[layer]
        assert (got["inputs"][:, i] - x[mask]).abs().max() <= 1e-5
        assert (got["outputs"][:, i] - y[mask]).abs().max() <= 1e-5


def test_mlp_input_store_targets_are_the_inputs_of_forward_hooks(tiny, tmp_path):
    name, model, tokenizer = tiny
    extractor = ActivationExtractor(name, model=model, tokenizer=tokenizer, layers=[0, 2], context_length=24)
    store = extractor.extract(
        TEXTS,
        max_tokens=10_000,
        store_dtype="float32",
        output_dir=tmp_path / "s",
        output_site="mlp_in",
        shard_tokens=30,
        progress=False,
    )
    windows = list(token_windows(TEXTS, tokenizer, 24))
    captured, mask = hook_reference(model, windows, [0, 2], extractor.pad_id)
    mask[:, 0] = False
    inputs, outputs = store.tensors()
    assert store.output_site == "mlp_in" and store.n_tokens == int(mask.sum())
    assert torch.equal(inputs, outputs)
    for i, layer in enumerate([0, 2]):
        assert (inputs[:, i] - captured[layer][0][mask]).abs().max() <= 1e-5
        assert (outputs[:, i] - captured[layer][1][mask]).abs().max() > 1e-2  # not the MLP outputs
    reopened = ActivationStore.open(tmp_path / "s")
    assert reopened.output_site == "mlp_in" and torch.equal(reopened.tensors()[1], inputs)


def test_int8_zstd_extraction_is_within_half_a_step_of_float32(tiny_llama, tmp_path):
    model, tokenizer = tiny_llama
    extractor = ActivationExtractor("tiny-llama", model=model, tokenizer=tokenizer, context_length=32, batch_size=4)
    exact = extractor.extract(max_tokens=400, store_dtype="float32", progress=False)
    packed = extractor.extract(
        max_tokens=400,
        store_dtype="int8",
        compression="zstd",
        output_dir=tmp_path / "s",
        shard_tokens=150,
        progress=False,
    )
    assert packed.dtype == "int8" and packed.compression == "zstd" and len(packed.shards) > 1
    for a, b in zip(exact.tensors(), packed.tensors()):
        step = a.abs().amax(-1, keepdim=True) / 127
        assert bool(((a - b).abs() <= step * INT8_HALF_STEP).all())
    with pytest.raises(StoreError, match="cannot resume .*its dtype is 'int8'"):
        extractor.extract(
            max_tokens=500, store_dtype="float16", compression="zstd", output_dir=tmp_path / "s", progress=False
        )
