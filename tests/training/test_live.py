"""LiveActivations: batches from the live model's forward through a deterministic shuffle buffer."""

from __future__ import annotations

import collections

import pytest
import torch

from clt.training.live import LiveActivations

TEXTS = [f"Document {i} says " + " ".join(f"w{i}x{j}" for j in range(3 + 2 * i)) for i in range(12)]


class LabelledExtractor:
    """An extractor whose rows name their token: inputs[..., 0] = document, [..., 1] = position in it."""

    def __init__(self, tokenizer, context_length: int = 16, batch_size: int = 3) -> None:
        self.tokenizer, self.context_length, self.batch_size = tokenizer, context_length, batch_size
        self.layers, self.d_model, self.model_name = [0, 1], 4, "labelled"
        self.prepend_bos, self.exclude_bos = True, True
        self.model = torch.nn.Linear(1, 1)
        self.calls = 0

    def activations(self, windows, *, dtype=torch.float32, output_site="mlp_out"):
        self.calls += 1
        rows = []
        for w in windows:
            for p in range(1, len(w.token_ids)):  # BOS left out
                rows.append([w.document, w.start + p - 1, float(w.token_ids[p]), 1.0])
        x = torch.tensor(rows, dtype=torch.float32)[:, None, :].expand(-1, 2, -1).contiguous()
        x[:, 1, 3] = torch.arange(len(rows), dtype=torch.float32)  # vary a column: non-degenerate statistics
        return {"inputs": x.to(dtype), "outputs": (2 * x).to(dtype)}


@pytest.fixture
def tokenizer():
    from clt.nnsight.loading import tiny_tokenizer

    return tiny_tokenizer()


def labels(batches) -> list[tuple[int, int]]:
    return [(int(r[0]), int(r[1])) for b in batches for r in b.inputs[:, 0]]


def test_every_token_of_an_epoch_comes_exactly_once(tokenizer):
    extractor = LabelledExtractor(tokenizer)
    live = LiveActivations(extractor, TEXTS, buffer_tokens=150, chunk_windows=2, batch_size=7, buffer_dtype="float32")
    assert live.buffer_chunks > 2
    expected = collections.Counter(
        (d, p) for d, ids in enumerate(tokenizer(TEXTS, add_special_tokens=False)["input_ids"]) for p in range(len(ids))
    )
    assert sum(expected.values()) == live.n_tokens
    # the cycles before the first chunk of epoch 1 hold only epoch 0's rows
    first_of_epoch_1 = -(-live.tokens.windows_per_epoch // live.chunk_windows)
    rows = sum(live.cycle_size(c) for c in range(first_of_epoch_1 - 1))
    it = live.batches()
    seen = labels(next(it) for _ in range(rows // 7))
    assert max(collections.Counter(seen).values()) == 1  # no row twice
    assert set(seen) <= set(expected)
    # everything of the epoch but the rows still in the buffer (at most K chunks of 2 windows) has come
    assert len(expected) - len(seen) <= (live.buffer_chunks + 1) * 2 * 15 + 7
    steady = sum(live.cycle_size(c) for c in range(live.buffer_chunks)) // 7
    assert len({d for d, _ in labels([next(live.batches(start=steady))])}) > 2  # a batch mixes documents


def test_batches_are_a_function_of_seed_and_index_and_resume_without_the_past(tokenizer):
    make = lambda seed: LiveActivations(  # noqa: E731
        LabelledExtractor(tokenizer), TEXTS, buffer_tokens=150, chunk_windows=2, batch_size=5, seed=seed
    )
    live = make(0)
    run = [b.inputs for _, b in zip(range(40), live.batches())]
    resumed = make(0)
    again = resumed.batches(start=27)
    for i in range(27, 40):
        assert torch.equal(next(again).inputs, run[i])
    assert resumed.extractor.calls <= (resumed.buffer_chunks + 6) * 1  # no forward of the skipped past
    assert not torch.equal(next(make(1).batches()).inputs, run[0])
    assert len(live._chunks) <= live.buffer_chunks  # memory: at most the buffer's chunks


def test_rows_equal_the_extractors_own_forward(tiny_llama):
    """Each batch row is a row of `ActivationExtractor.activations` on the chunk's windows."""
    from clt.nnsight.extractors import ActivationExtractor

    model, tokenizer = tiny_llama
    extractor = ActivationExtractor("tiny-llama", model=model, tokenizer=tokenizer, context_length=16, batch_size=4)
    live = LiveActivations(extractor, TEXTS, buffer_tokens=100, chunk_windows=4, batch_size=32, buffer_dtype="float32")
    oracle = torch.cat(
        [extractor.activations(live._chunk_windows(j))["inputs"] for j in range(live.buffer_chunks)]
    ).flatten(1)
    batch = next(live.batches()).inputs.flatten(1)
    distance = torch.cdist(batch.double(), oracle.double()).min(1).values  # float64: cdist cancels
    assert float(distance.max()) < 1e-5
    stats = live.norm_stats()
    assert torch.allclose(stats.input_mean, oracle.view(-1, 3, 32).mean(0), atol=1e-5)


def test_bad_settings_are_refused(tokenizer):
    with pytest.raises(ValueError, match="buffer_tokens"):
        LiveActivations(LabelledExtractor(tokenizer), TEXTS, buffer_tokens=0)
    with pytest.raises(ValueError, match="buffer_dtype"):
        LiveActivations(LabelledExtractor(tokenizer), TEXTS, buffer_dtype="int8")
    live = LiveActivations(LabelledExtractor(tokenizer), TEXTS, buffer_tokens=150, chunk_windows=2, seed=2)
    with pytest.raises(ValueError, match="seed"):
        next(live.batches(seed=3))


def test_a_killed_streaming_run_resumes_to_the_uninterrupted_weights(tmp_path, caplog):
    """`clt train --stream` killed (SIGKILL) after its first checkpoint, then run again, ends with the
    weights of a run that was never interrupted (the checkpoint records the stream position)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from clt.cli import main
    from clt.models import CrossLayerTranscoder

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TEXTS * 4))
    args = ["train", "--stream", "--model", "tiny-llama", "--model-dtype", "float32", "--dataset", str(corpus)]
    args += ["--context-length", "24", "--num-features", "24", "--activation-fn", "batchtopk", "--topk", "3"]
    args += ["--batch-size", "48", "--training-steps", "160", "--checkpoint-every", "8", "--buffer-tokens", "600"]
    args += ["--learning-rate", "2e-3", "--log-every", "4"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(p) for p in sys.path if p])}
    crashed = tmp_path / "crashed"
    child = subprocess.Popen([sys.executable, "-m", "clt.cli", *args, "--output-dir", str(crashed)], env=env)
    deadline = time.monotonic() + 300
    from clt.training.checkpoint import list_checkpoints

    while not list_checkpoints(crashed / "checkpoints") and child.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (crashed / "transcoder").exists()
    latest = list_checkpoints(crashed / "checkpoints")[-1]  # complete ones only
    with caplog.at_level("INFO", logger="clt.training.trainer"):
        assert main([*args, "--output-dir", str(crashed)]) == 0
    # it resumed (a run from step 0 would also end with these weights)
    assert f"at step {int(latest.name.split('_')[1])}" in caplog.text
    assert main([*args, "--output-dir", str(tmp_path / "whole")]) == 0
    resumed = CrossLayerTranscoder.from_pretrained(crashed / "transcoder").state_dict()
    whole = CrossLayerTranscoder.from_pretrained(tmp_path / "whole" / "transcoder").state_dict()
    assert resumed.keys() == whole.keys()
    for name, value in whole.items():
        assert torch.equal(resumed[name], value), name
