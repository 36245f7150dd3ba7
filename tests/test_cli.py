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
