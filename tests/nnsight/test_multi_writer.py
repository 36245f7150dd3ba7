"""Several extraction processes writing disjoint shards of one store, merged into the single-process store."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from clt.config.base import ConfigError
from clt.config.extraction import ExtractionConfig
from clt.store import ActivationStore, StoreError, StoreWriter, merge_store

SETTINGS = {
    "model": "tiny-llama",
    "max_tokens": 700,
    "context_length": 32,
    "store_dtype": "float32",
    "shard_tokens": 90,
}
WRITER = """
import sys
from clt.config.extraction import ExtractionConfig
from clt.pipeline import run_extraction
run_extraction(ExtractionConfig(**{settings!r}, batch_size=3, output_dir=sys.argv[1], writer_rank=int(sys.argv[2]),
                                num_writers=2), progress=False)
"""


def by_row(store):
    """(window id, position) keys, token ids, inputs and outputs of every row, in key order."""
    shards = [store.shard(i) for i in range(len(store.shards))]
    meta = {k: torch.cat([s[k] for s in shards]) for k in ("window_ids", "positions", "token_ids")}
    inputs, outputs = store.tensors()
    order = sorted(range(store.n_tokens), key=lambda i: (int(meta["window_ids"][i]), int(meta["positions"][i])))
    keys = [(int(meta["window_ids"][i]), int(meta["positions"][i])) for i in order]
    return keys, meta["token_ids"][order], inputs[order], outputs[order]


def test_two_writer_processes_produce_the_single_process_store(tmp_path):
    from clt.pipeline import run_extraction

    single = run_extraction(
        ExtractionConfig(**SETTINGS, batch_size=4, output_dir=str(tmp_path / "single")), progress=False
    )
    script = WRITER.format(settings=SETTINGS)
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path / "multi"), str(rank)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    for process in processes:
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, output
    merged = ActivationStore.open(tmp_path / "multi")
    manifest = json.loads((tmp_path / "multi" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["state"]["writers"] == 2
    assert {s["file"][:9] for s in manifest["shards"]} == {"shard_p0_", "shard_p1_"}
    assert merged.n_tokens == single.n_tokens == 700
    keys, tokens, inputs, outputs = by_row(merged)
    ref_keys, ref_tokens, ref_inputs, ref_outputs = by_row(single)
    assert keys == ref_keys and len(set(keys)) == 700
    assert torch.equal(tokens, ref_tokens)
    assert (inputs - ref_inputs).abs().max() <= 1e-5 and (outputs - ref_outputs).abs().max() <= 1e-5
    for a, b in zip(vars(merged.norm_stats()).values(), vars(single.norm_stats()).values()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_writer_rank_out_of_range_is_refused(tiny_llama, tmp_path):
    from clt.nnsight.extractors import ActivationExtractor

    with pytest.raises(ConfigError, match="writer_rank 2 is out of range for num_writers=2: use 0..1"):
        ExtractionConfig(writer_rank=2, num_writers=2)
    with pytest.raises(ConfigError, match="num_writers must be at least 1"):
        ExtractionConfig(num_writers=0)
    model, tokenizer = tiny_llama
    extractor = ActivationExtractor("tiny-llama", model=model, tokenizer=tokenizer, context_length=32)
    with pytest.raises(ValueError, match="writer_rank 3 is out of range for num_writers=2"):
        extractor.extract(max_tokens=100, output_dir=tmp_path / "s", writer_rank=3, num_writers=2, progress=False)
    with pytest.raises(ValueError, match="share one store folder: pass output_dir"):
        extractor.extract(max_tokens=100, writer_rank=0, num_writers=2, progress=False)
    with pytest.raises(StoreError, match="writer 1 of 40 gets no tokens"):
        extractor.extract(
            ["one short text"], max_tokens=100, output_dir=tmp_path / "t", writer_rank=1, num_writers=40, progress=False
        )
    with pytest.raises(StoreError, match="writer rank 2 is out of range for 2 writers"):
        StoreWriter(tmp_path / "u", layers=[0], d_model=4, part=(2, 2))


def part(path, rank, layers=(0, 1), n=30, finish=True, **kwargs):
    writer = StoreWriter(path, layers=list(layers), d_model=4, dtype="float32", part=(rank, 2), **kwargs)
    g = torch.Generator().manual_seed(rank)
    writer.add(
        torch.randn(n, len(layers), 4, generator=g),
        torch.randn(n, len(layers), 4, generator=g),
        token_ids=torch.arange(n),
        positions=torch.arange(n),
        window_ids=torch.full((n,), rank),
    )
    return writer.finish() if finish else writer.flush({"rows": n})


def test_merging_inconsistent_or_unfinished_parts_gives_clear_errors(tmp_path):
    first = part(tmp_path / "s", 0)
    assert first.n_tokens == 30  # the first writer to finish opens its own part
    with pytest.raises(StoreError, match="being written by several writers and is not merged yet"):
        ActivationStore.open(tmp_path / "s")
    with pytest.raises(StoreError, match=r"writers \[1\] of 2 have not started"):
        merge_store(tmp_path / "s")
    part(tmp_path / "s", 1, finish=False)
    with pytest.raises(StoreError, match=r"writers \[1\] of 2 have not finished"):
        merge_store(tmp_path / "s")
    with pytest.raises(StoreError, match="is being written by several writers; resume them"):
        StoreWriter(tmp_path / "s", layers=[0, 1], d_model=4)
    part(tmp_path / "other", 0)
    with pytest.raises(StoreError, match="cannot merge .*writer 1 has layers \\[0, 2\\] but writer 0 has \\[0, 1\\]"):
        part(tmp_path / "other", 1, layers=(0, 2))
    assert (tmp_path / "other" / "manifest.part1of2.json").is_file()  # nothing written is lost
    part(tmp_path / "fmt", 0)
    with pytest.raises(StoreError, match="cannot merge .*writer 1 has dtype 'int8'"):
        StoreWriter(tmp_path / "fmt", layers=[0, 1], d_model=4, dtype="int8", part=(1, 2)).finish()
    part(tmp_path / "ok", 0)
    merged = part(tmp_path / "ok", 1)  # the last writer to finish merges
    assert merged.n_tokens == 60 and torch.equal(merged.shard(1)["window_ids"], torch.ones(30, dtype=torch.long))
    expected = torch.cat([merged.shard(0)["inputs"], merged.shard(1)["inputs"]]).double()
    assert torch.allclose(merged.stats.sums["in_sum"], expected.sum(0))
    assert float(merged.stats.sums["count"]) == 60
    with pytest.raises(StoreError, match="already holds a merged store"):
        part(tmp_path / "ok", 0)
