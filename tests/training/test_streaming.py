"""Following a store while it is written: batches wait for shards, producer failures, streaming training."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from clt.config.extraction import ExtractionConfig
from clt.config.training import TrainingConfig
from clt.config.transcoder import CLTConfig
from clt.store import ActivationStore, StoreError, StoreWriter


def rows(n=360, layers=2, d=6):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, layers, d, generator=g)
    x[:, 0, 0] = torch.arange(n, dtype=torch.float32)  # row id, read back from any batch
    return x, torch.randn(n, layers, d, generator=g)


class Producer(threading.Thread):
    """Writes `x, y` in shards of 40 rows. After `hold_after` shards it waits for `resume` (set by the
    test; `held_out` records a wait that gave up after 30 s); fails at shard `fail_after` if set."""

    def __init__(self, path, x, y, hold_after=None, fail_after=None):
        super().__init__(daemon=True)
        self.path, self.x, self.y, self.hold_after, self.fail_after = path, x, y, hold_after, fail_after
        self.resume = threading.Event()
        self.error = None
        self.held_out = False

    def run(self):
        try:
            writer = StoreWriter(self.path, layers=[0, 1], d_model=6, dtype="float32", shard_tokens=40)
            for k, lo in enumerate(range(0, len(self.x), 40)):
                if k == self.hold_after:
                    self.held_out = not self.resume.wait(30)
                if k == self.fail_after:
                    raise RuntimeError("simulated extraction failure")
                n = len(self.x[lo : lo + 40])
                writer.add(
                    self.x[lo : lo + 40],
                    self.y[lo : lo + 40],
                    token_ids=torch.arange(n),
                    positions=torch.zeros(n),
                    window_ids=torch.zeros(n),
                )
                writer.flush({"rows": lo + n})
            writer.finish()
        except Exception as err:
            self.error = err


def test_followed_store_yields_batches_before_the_producer_ends_and_covers_each_row_once(tmp_path):
    x, y = rows()
    producer = Producer(tmp_path / "s", x, y, hold_after=3)  # the rest is written once the first batch came
    producer.start()
    store = ActivationStore.open(tmp_path / "s", follow=producer, shuffle_shards=3)
    assert store.following and store.n_tokens <= 120
    seen = []
    batches = store.batches(30, seed=4)
    for _ in range(12):  # one epoch of 360 rows
        batch = next(batches)
        producer.resume.set()
        seen += batch.inputs[:, 0, 0].long().tolist()
        assert torch.equal(batch.outputs, y[batch.inputs[:, 0, 0].long()])
    producer.join(30)
    assert not producer.is_alive() and producer.error is None
    assert not producer.held_out, "the first batch waited for the whole store"
    assert sorted(seen) == list(range(360)) and seen != list(range(360))  # every row once, shuffled
    assert not store.following and store.n_tokens == 360
    nxt = next(batches)  # epoch 1 goes on over the whole store
    assert nxt.inputs.shape == (30, 2, 6)
    again = ActivationStore.open(tmp_path / "s", follow=True, shuffle_shards=3)  # complete: same order
    replay = [b.inputs[:, 0, 0].long().tolist() for b, _ in zip(again.batches(30, seed=4), range(12))]
    assert [row for batch in replay for row in batch] == seen
    resumed = next(ActivationStore.open(tmp_path / "s", follow=True, shuffle_shards=3).batches(30, seed=4, start=5))
    assert resumed.inputs[:, 0, 0].long().tolist() == seen[150:180]


def test_producer_failure_and_silence_give_clear_errors(tmp_path):
    x, y = rows()
    producer = Producer(tmp_path / "s", x, y, hold_after=2, fail_after=2)  # fails once it is followed
    producer.start()
    store = ActivationStore.open(tmp_path / "s", follow=producer, shuffle_shards=1)
    producer.resume.set()
    with pytest.raises(StoreError, match="stopped before finishing it .*simulated extraction failure.*resume"):
        batches = store.batches(40)
        for _ in range(20):
            next(batches)
    assert store.n_tokens == 80  # what was written stays readable
    stalled = ActivationStore.open(tmp_path / "s", follow=True, timeout=0.3)
    started = time.monotonic()
    with pytest.raises(StoreError, match="got no new shard within 0.3 s"):
        stalled.tensors()
    assert time.monotonic() - started < 5  # a hang guard: 16x the timeout
    with pytest.raises(StoreError, match="no shard of .* was written within 0.2 s"):
        ActivationStore.open(tmp_path / "empty", follow=True, timeout=0.2)
    with pytest.raises(StoreError, match="follow must be True or the producer"):
        ActivationStore.open(tmp_path / "s", follow="yes")


def streaming_configs(tmp_path, *, max_tokens, **training):
    """Extraction (tiny-llama, shards of 128 tokens into tmp_path/streamed), transcoder and training configs."""
    extraction = ExtractionConfig(
        model="tiny-llama",
        max_tokens=max_tokens,
        context_length=32,
        batch_size=2,
        shard_tokens=128,
        output_dir=str(tmp_path / "streamed"),
    )
    clt = CLTConfig(num_features=16, num_layers=1, d_model=1, activation_fn="topk", topk=4)
    return extraction, clt, TrainingConfig(batch_size=64, learning_rate=1e-3, lr_warmup_steps=0, **training)


def test_streaming_extraction_trains_while_extracting_on_the_same_tokens(tmp_path, monkeypatch):
    from clt.nnsight.extractors import ActivationExtractor
    from clt.pipeline import run_streaming, run_training

    extraction, clt, training = streaming_configs(tmp_path, max_tokens=1024, training_steps=16, log_every=1)
    following_at_step, traced, consumed = [], [], threading.Event()
    original_gather, original_activations = ActivationStore._gather, ActivationExtractor.activations

    def gather(self, *args, **kwargs):
        following_at_step.append(self.following)
        consumed.set()
        return original_gather(self, *args, **kwargs)

    def slow_activations(self, *args, **kwargs):  # after the first shards, a model slower than training
        traced.append(1)
        if len(traced) > 12:  # > 512 tokens: the first group of 4 shards is written, training can start
            consumed.wait(30)
        return original_activations(self, *args, **kwargs)

    monkeypatch.setattr(ActivationStore, "_gather", gather)
    monkeypatch.setattr(ActivationExtractor, "activations", slow_activations)
    streamed = run_streaming(extraction, clt, training, replacement=False, progress=False)
    monkeypatch.setattr(ActivationStore, "_gather", original_gather)
    offline = run_training(
        extraction.replace(output_dir=str(tmp_path / "offline")), clt, training, replacement=False, progress=False
    )
    assert following_at_step[0] and not streamed.store.following  # consumed while the producer was writing
    assert len(following_at_step) == 16
    for result in (streamed, offline):
        assert result.history[-1]["step"] == 16 and result.store.n_tokens == 1024  # 16 x 64 tokens, one epoch
    for a, b in zip(streamed.store.tensors(), offline.store.tensors()):
        assert torch.equal(a, b)
    assert streamed.reconstruction.n_tokens == offline.reconstruction.n_tokens


def test_failed_streaming_training_stops_the_extraction_and_the_store_resumes(tmp_path, monkeypatch):
    from clt.nnsight.extractors import ActivationExtractor
    from clt.pipeline import run_extraction, run_streaming
    from clt.training.trainer import CLTTrainer

    extraction, clt, training = streaming_configs(tmp_path, max_tokens=4096, training_steps=64)
    original, failed, traced = ActivationExtractor.activations, threading.Event(), []

    def held(self, *args, **kwargs):  # after 4 batches (2 shards), the model waits for the failure
        traced.append(1)
        if len(traced) > 4:
            failed.wait(60)
        return original(self, *args, **kwargs)

    def fail(self, batches):
        failed.set()
        raise FloatingPointError("simulated divergence")

    monkeypatch.setattr(ActivationExtractor, "activations", held)
    monkeypatch.setattr(CLTTrainer, "train_step", fail)
    monkeypatch.setattr(CLTTrainer, "_step", fail)
    before = {t.name for t in threading.enumerate()}
    with pytest.raises(FloatingPointError, match="simulated"):
        run_streaming(extraction, clt, training, replacement=False, progress=False)
    assert "clt-extraction" not in {t.name for t in threading.enumerate()} - before  # stopped, not left running
    partial = ActivationStore.open(extraction.output_dir)
    assert 0 < partial.n_tokens < 4096
    monkeypatch.undo()
    assert run_extraction(extraction, progress=False).n_tokens == 4096  # resumed to the end
