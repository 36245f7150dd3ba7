"""The `clt` command line end to end on a tiny model, and its error handling."""

from __future__ import annotations

import subprocess
import sys

import pytest

from clt.cli import main
from clt.training.data import ActivationStore


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clt.cli", *args], capture_output=True, text=True, timeout=300)


def test_extract_end_to_end(tmp_path, capsys):
    out = tmp_path / "store"
    assert main(["extract", "--model", "tiny-llama", "--max-tokens", "300", "--output-dir", str(out),
                 "--layers", "0,2", "--store-dtype", "float32"]) == 0
    store = ActivationStore.open(out)
    assert store.n_tokens == 300 and store.layers == [0, 2] and store.dtype == "float32"
    assert (out / "extraction.yaml").is_file()
    assert "size on disk" in capsys.readouterr().out


def test_extract_reads_a_config_file_and_overrides_it(tmp_path):
    config = tmp_path / "extract.yaml"
    config.write_text(f"model: tiny-gpt2\nmax_tokens: 150\noutput_dir: {tmp_path / 'a'}\n")
    assert main(["extract", "--config", str(config), "--max-tokens", "120"]) == 0
    assert ActivationStore.open(tmp_path / "a").n_tokens == 120


@pytest.mark.parametrize("args, message", [
    (["extract", "--max-tokens", "ten"], "invalid int value"),
    (["extract", "--no-such-flag"], "unrecognized arguments"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_arguments_give_one_line_and_exit_2(args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_bad_values_give_one_line_and_exit_1(tmp_path):
    result = run_cli("extract", "--model", "no-such/model", "--output-dir", str(tmp_path / "x"))
    assert result.returncode == 1 and "not available offline" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("extract", "--max-tokens", "0", "--model", "tiny-llama")
    assert result.returncode == 1 and "max_tokens must be positive" in result.stderr
    config = tmp_path / "typo.yaml"
    config.write_text("max_token: 5\n")
    result = run_cli("extract", "--config", str(config), "--output-dir", str(tmp_path / "y"))
    assert result.returncode == 1 and "Did you mean 'max_tokens'" in result.stderr
    assert not (tmp_path / "y").exists()


def test_help_explains_every_option():
    result = run_cli("extract", "--help")
    assert result.returncode == 0
    assert "--context-length" in result.stdout and "Tokens per context window" in result.stdout


def test_train_with_seed_flags_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", "tiny-llama", "--max-tokens", "600", "--num-features", "16",
                 "--batch-size", "32", "--learning-rate", "1e-3", "--training-steps", "12", "--sparsity-lambda", "1e-3",
                 "--jumprelu-threshold", "0.03", "--device", "cpu", "--dataset", "pydoc",
                 "--output-dir", str(out)]) == 0
    text = capsys.readouterr().out
    assert "FVU" in text and "replacement model: KL" in text
    from clt.models import CrossLayerTranscoder

    clt = CrossLayerTranscoder.from_pretrained(out / "transcoder")
    assert clt.cfg.num_features == 16 and clt.cfg.num_layers == 3 and clt.cfg.model_name == "tiny-llama"
    assert (out / "metrics.jsonl").is_file() and (out / "eval.json").is_file()
    # a second run trains on the existing store
    assert main(["train", "--store", str(out / "store"), "--num-features", "8", "--activation-fn", "topk",
                 "--topk", "2", "--training-steps", "5", "--batch-size", "16", "--output-dir", str(tmp_path / "b")]) == 0


def test_train_config_file_with_sections(tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text(
        "extraction:\n  model: tiny-gpt2\n  max_tokens: 400\n"
        "transcoder:\n  num_features: 8\n  cross_layer: false\n"
        f"training:\n  training_steps: 4\n  batch_size: 16\n  output_dir: {tmp_path / 'r'}\n")
    assert main(["train", "--config", str(config), "--training-steps", "6"]) == 0
    import json

    steps = [json.loads(line)["step"] for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 6
    config.write_text("trainig:\n  training_steps: 4\n")
    result = run_cli("train", "--config", str(config))
    assert result.returncode == 1 and "unknown sections" in result.stderr


def test_demo_end_to_end_on_a_tiny_model(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--model", "tiny-gpt2", "--max-tokens", "1500", "--num-features", "16",
                 "--training-steps", "30", "--batch-size", "64", "--output-dir", str(out)]) == 0
    text = capsys.readouterr().out
    assert "FVU" in text and "replacement model: KL" in text and "KiB/token" in text
    import json

    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["n_tokens"] == 1500 and 0 <= summary["reconstruction"]["fvu"] < 2
    assert (out / "train" / "transcoder" / "model.safetensors").is_file()
