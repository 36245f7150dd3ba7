"""The `clt` command line end to end on a tiny model, and its error handling."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from clt.cli import main
from clt.store import ActivationStore


def run_clt(words: str, **options: object) -> None:
    """Run `clt WORDS --OPTION VALUE ...` in this process (- for _ in option names) and check it exits 0."""
    argv = words.split()
    for name, value in options.items():
        argv += ["--" + name.replace("_", "-"), str(value)]
    assert main(argv) == 0


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clt.cli", *args], capture_output=True, text=True, timeout=300)


def test_extract_end_to_end(tmp_path, capsys):
    out = tmp_path / "store"
    run_clt("extract --model tiny-llama --max-tokens 300 --layers 0,2 --store-dtype float32", output_dir=out)
    store = ActivationStore.open(out)
    assert store.n_tokens == 300 and store.layers == [0, 2] and store.dtype == "float32"
    assert (out / "extraction.yaml").is_file()
    assert "size on disk" in capsys.readouterr().out


def test_extract_reads_a_config_file_and_overrides_it(tmp_path):
    config = tmp_path / "extract.yaml"
    config.write_text(f"model: tiny-gpt2\nmax_tokens: 150\noutput_dir: {tmp_path / 'a'}\n")
    run_clt("extract --max-tokens 120", config=config)
    assert ActivationStore.open(tmp_path / "a").n_tokens == 120


@pytest.mark.parametrize(
    "args, message",
    [
        (["extract", "--max-tokens", "ten"], "invalid int value"),
        (["extract", "--no-such-flag"], "unrecognized arguments"),
        (["frobnicate"], "invalid choice"),
    ],
)
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
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = run_cli("extract", "--model", "no-such/model", "--output-dir", str(blocker / "store"))
    assert result.returncode == 1 and "is a file, not a folder" in result.stderr  # checked before the model loads


def test_help_explains_every_option():
    result = run_cli("extract", "--help")
    assert result.returncode == 0
    assert "--context-length" in result.stdout and "Tokens per context window" in result.stdout


def _subcommands() -> dict[str, object]:
    from clt.cli import build_parser

    parser = build_parser()
    action = next(a for a in parser._actions if a.choices and "extract" in a.choices)
    return dict(action.choices)


@pytest.mark.parametrize("command", ["", *sorted(_subcommands())])
def test_every_subcommand_help_exits_0(command):
    """`clt COMMAND --help` for every command (argparse %-formats help text: a stray % crashes it)."""
    result = run_cli(*([command] if command else []), "--help")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "usage: clt" in result.stdout


def test_every_config_option_appears_in_its_commands_help():
    """Each field of each config a command is generated from has its flag and its docstring in the help."""
    import dataclasses

    from clt.cli import _DERIVED_CLT_FIELDS
    from clt.config import AttributionConfig, CLTConfig, ExtractionConfig, InterventionConfig, TrainingConfig
    from clt.config.base import field_docs

    commands = _subcommands()
    for command, configs in {
        "extract": [(ExtractionConfig, ())],
        "train": [(CLTConfig, _DERIVED_CLT_FIELDS), (TrainingConfig, ())],
        "attribute": [(AttributionConfig, ())],
        "steer": [(InterventionConfig, ())],
    }.items():
        text = " ".join(commands[command].format_help().split())
        for cls, skipped in configs:
            docs = field_docs(cls)
            for field in dataclasses.fields(cls):
                if field.name in skipped:
                    continue
                assert "--" + field.name.replace("_", "-") in text, (command, field.name)
                first_words = " ".join(docs[field.name].split()[:4])
                assert first_words in text, (command, field.name, first_words)


def test_train_with_seed_flags_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    run_clt(
        "train --model tiny-llama --max-tokens 600 --num-features 16 --batch-size 32 --learning-rate 1e-3 "
        "--training-steps 12 --sparsity-lambda 1e-3 --jumprelu-threshold 0.03 --device cpu --dataset pydoc",
        output_dir=out,
    )
    text = capsys.readouterr().out
    assert "FVU" in text and "replacement model: KL" in text
    from clt.models import CrossLayerTranscoder

    clt = CrossLayerTranscoder.from_pretrained(out / "transcoder")
    assert clt.cfg.num_features == 16 and clt.cfg.num_layers == 3 and clt.cfg.model_name == "tiny-llama"
    assert (out / "metrics.jsonl").is_file() and (out / "eval.json").is_file()
    # a second run trains on the existing store
    run_clt(
        "train --num-features 8 --activation-fn topk --topk 2 --training-steps 5 --batch-size 16",
        store=out / "store",
        output_dir=tmp_path / "b",
    )


def test_train_config_file_with_sections(tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text(
        "extraction:\n  model: tiny-gpt2\n  max_tokens: 400\n"
        "transcoder:\n  num_features: 8\n  cross_layer: false\n"
        f"training:\n  training_steps: 4\n  batch_size: 16\n  output_dir: {tmp_path / 'r'}\n"
    )
    run_clt("train --training-steps 6", config=config)
    import json

    steps = [json.loads(line)["step"] for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 6
    config.write_text("trainig:\n  training_steps: 4\n")
    result = run_cli("train", "--config", str(config))
    assert result.returncode == 1 and "unknown sections" in result.stderr


def test_demo_end_to_end_on_a_tiny_model(tmp_path, capsys, rendered_node_markers):
    out = tmp_path / "demo"
    run_clt(
        "demo --model tiny-gpt2 --max-tokens 1500 --num-features 16 --training-steps 30 --batch-size 64",
        output_dir=out,
    )
    text = capsys.readouterr().out
    assert "FVU" in text and "replacement model: KL" in text and "KiB/token" in text
    import json

    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["n_tokens"] == 1500 and 0 <= summary["reconstruction"]["fvu"] < 2
    assert (out / "train" / "transcoder" / "model.safetensors").is_file()
    _check_demo_graph(out, text, rendered_node_markers)


def _check_demo_graph(out, text, rendered_node_markers):
    """The demo's graph HTML renders in Chromium with one marker per kept node; scores are printed."""
    import json

    from clt.attribution import Graph, prune

    html = out / "attribution" / "graph.html"
    assert f"html: {html}" in text and "replacement score" in text
    graph = Graph.load(out / "attribution" / "graph.json")
    assert rendered_node_markers(html) == int(prune(graph).node_mask.sum())
    summary = json.loads((out / "demo_summary.json").read_text())["attribution"]
    assert 0 < summary["replacement_score"] <= 1 and 0 < summary["completeness_score"] <= 1
    # the cards of the page's features are in cards.json and inside the page (not separate HTML files)
    import re

    from clt.interp import FeatureCards

    cards = FeatureCards.load(out / "attribution" / "cards.json")
    page = re.search(r'<script type="application/json" id="clt-data">(.*?)</script>', html.read_text(), re.DOTALL)
    nodes = json.loads(page.group(1))["nodes"]
    columns = zip(nodes["kind"], nodes["layer"], nodes["feature"])
    on_page = {f"{layer}/{feature}" for kind, layer, feature in columns if kind == "f"}
    assert cards and summary["n_cards"] == len(cards) and on_page <= set(cards)
    assert all(card for kind, card in zip(nodes["kind"], nodes["card"]) if kind == "f")
    assert summary["labels"]["n"] == min(20, len(cards)) and "labels of the" in text


@pytest.mark.slow
def test_demo_on_the_default_model_renders(tmp_path, capsys, rendered_node_markers):
    """A short demo on SmolLM2 (all 30 layers): the real-model path up to the rendered graph."""
    out = tmp_path / "demo"
    run_clt("demo --max-tokens 3000 --num-features 32 --training-steps 40", output_dir=out)
    text = capsys.readouterr().out
    assert "layers=0..29" in text
    _check_demo_graph(out, text, rendered_node_markers)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny-llama store and a CLT trained on it by `clt train` (shared by the stage commands)."""
    out = tmp_path_factory.mktemp("run")
    run_clt(
        "train --model tiny-llama --max-tokens 800 --num-features 16 --activation-fn relu --batch-size 32 "
        "--training-steps 10",
        output_dir=out,
    )
    return out


def test_evaluate_end_to_end(trained_run, tmp_path, capsys):
    output = tmp_path / "eval.json"
    run_clt("evaluate", transcoder=trained_run, store=trained_run / "store", output=output)
    text = capsys.readouterr().out
    assert "FVU" in text and "replacement model: KL" in text
    import json

    metrics = json.loads(output.read_text())
    assert metrics["reconstruction"]["n_tokens"] == 800 and metrics["replacement"]["n_tokens"] > 0


def test_attribute_end_to_end(trained_run, tmp_path, capsys):
    out = tmp_path / "graph"
    run_clt(
        "attribute --max-n-logits 3",
        transcoder=trained_run / "transcoder",
        prompt="The for statement iterates",
        store=trained_run / "store",
        output_dir=out,
    )
    text = capsys.readouterr().out
    assert "replacement score" in text and "graph.html" in text
    from clt.attribution import Graph

    graph = Graph.load(out / "graph.json")
    from clt.nnsight.loading import load_model

    tokenizer = load_model("tiny-llama")[1]
    assert graph.prompt == "The for statement iterates" and 1 <= graph.n_logits <= 3
    assert graph.token_ids == [
        tokenizer.bos_token_id,
        *tokenizer("The for statement iterates", add_special_tokens=False)["input_ids"],
    ]
    html = (out / "graph.html").read_text()
    assert "<html" in html and "<script src=" not in html and len(html) > 3_000_000
    assert (out / "neuronpedia.json").is_file() and (out / "cards.json").is_file()


def test_steer_end_to_end(trained_run, tmp_path, capsys):
    """`clt steer` on features by LAYER:POS:FEATURE, then on a supernode of a graph page's saved state."""
    import json

    from clt.attribution import Graph, GraphState, Supernode

    output = tmp_path / "steer.json"
    run_clt(
        "steer --max-new-tokens 3 --mode add --value 8",
        transcoder=trained_run / "transcoder",
        prompt="The for statement iterates",
        features="0:2:1,2:4:3",
        output=output,
    )
    text = capsys.readouterr().out
    assert "next tokens with:" in text and "continuation with:" in text and "2 interventions (add 8)" in text
    saved = json.loads(output.read_text())
    assert saved["interventions"] == [[0, 2, 1, 8.0], [2, 4, 3, 8.0]] and saved["config"]["mode"] == "add"

    run_clt("attribute --max-n-logits 2", transcoder=trained_run / "transcoder", prompt="The for", output_dir=tmp_path)
    graph = Graph.load(tmp_path / "graph.json")
    members = [graph.node(i).id for i in range(2)]
    state = GraphState(pinned=["supernode:1"], supernodes=[Supernode("supernode:1", "pair", members)])
    state.save(tmp_path / "state.json")
    run_clt(
        "steer --max-new-tokens 0 --mode scale --value 0 --constrained-layers all --freeze-attention true",
        transcoder=trained_run / "transcoder",
        graph=tmp_path / "graph.json",
        nodes="pinned",
        state=tmp_path / "state.json",
        output=output,
    )
    saved = json.loads(output.read_text())
    assert [f"feature:{m}:{p}:{f}" for m, p, f, _ in saved["interventions"]] == members
    assert saved["continuation"] is None and saved["config"]["constrained_layers"] == "all"
    assert main(["steer", "--transcoder", str(trained_run / "transcoder"), "--features", "0:1:1"]) == 1
    assert "either --prompt" in capsys.readouterr().err


def _features(trained_run, out, options):
    """Run `clt features` on the trained run and read the cards it wrote."""
    run_clt(f"features {options}", transcoder=trained_run, store=trained_run / "store", output_dir=out)
    from clt.interp import FeatureCards

    return FeatureCards.load(out / "cards.json")


def test_features_end_to_end(trained_run, tmp_path, capsys):
    out = tmp_path / "cards"
    cards = _features(trained_run, out, "--features 0:1,2:3 --figures 2")
    assert "2 feature cards" in capsys.readouterr().out
    assert sorted(cards) == ["0/1", "2/3"]
    assert (out / "feature_0_1.html").is_file() and (out / "feature_2_3.html").is_file()


def test_features_with_an_llm_labeller(trained_run, tmp_path):
    from clt.interp import llm_labeller

    card = _features(trained_run, tmp_path / "cards", "--features 0:1 --figures 0 --labeller tiny-llama").card(0, 1)
    assert card.label == llm_labeller("tiny-llama")(card)  # greedy: the model's answer, not the rule's


@pytest.mark.parametrize(
    "args, message",
    [
        (["attribute", "--prompt", "x"], "the following arguments are required: --transcoder"),
        (["features", "--transcoder", "t", "--store", "s", "--features", "0-1"], "is not LAYER:FEATURE"),
        (["evaluate", "--transcoder", "t"], "the following arguments are required: --store"),
    ],
)
def test_stage_commands_reject_bad_arguments(args, message):
    result = run_cli(*args)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_stage_commands_report_bad_values(trained_run, tmp_path):
    result = run_cli("attribute", "--transcoder", str(tmp_path / "none"), "--prompt", "x")
    assert result.returncode == 1 and "no transcoder at" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("evaluate", "--transcoder", str(trained_run), "--store", str(tmp_path / "none"))
    assert result.returncode == 1 and "no activation store at" in result.stderr
    long_prompt = "word " * 400
    result = run_cli(
        "attribute", "--transcoder", str(trained_run), "--prompt", long_prompt, "--output-dir", str(tmp_path / "g")
    )
    assert result.returncode == 1 and "the model's context is 256" in result.stderr


def test_attribute_reads_the_yaml_config(trained_run, tmp_path):
    from pathlib import Path

    config = Path(__file__).resolve().parents[1] / "experiments" / "attribute_smollm2.yaml"
    out = tmp_path / "g"
    run_clt(
        "attribute --max-n-logits 2",
        transcoder=trained_run,
        prompt="The for statement",
        config=config,
        output_dir=out,
    )
    from clt.attribution import Graph

    graph = Graph.load(out / "graph.json")
    assert graph.config.max_feature_nodes == 4096 and graph.config.max_n_logits == 2


def test_train_without_config_or_store_uses_the_default_models_recipe(monkeypatch, tmp_path):
    """`clt train` alone trains the default model with its recipe, options override it, and the
    recipe file in experiments/configs/ is the same recipe."""
    import yaml

    from clt import cli, pipeline
    from clt.config.recipes import recipe

    seen = {}

    def capture(extraction, transcoder, training, store_path=None):
        seen.update(extraction=extraction, transcoder=transcoder, training=training)
        return _NoReport()

    monkeypatch.setattr(pipeline, "run_training", capture)
    assert cli.main(["train", "--learning-rate", "0.005", "--output-dir", str(tmp_path)]) == 0
    expected = recipe()
    assert seen["training"].stream and seen["training"].learning_rate == 0.005
    assert seen["training"].training_steps == expected["training"]["training_steps"]
    for name, value in expected["transcoder"].items():
        assert getattr(seen["transcoder"], name) == value, name
    assert seen["extraction"].corpus == expected["extraction"]["corpus"]
    file = Path(__file__).parents[1] / "experiments" / "configs" / "smollm2_recipe.yaml"
    assert yaml.safe_load(file.read_text()) == expected

    seen.clear()
    assert cli.main(["train", "--model", "tiny-gpt2", "--output-dir", str(tmp_path)]) == 0
    assert not seen["training"].stream
    assert seen["transcoder"].num_features == cli.TRAIN_DEFAULTS["transcoder"]["num_features"]


class _NoReport:
    """A training result that reports nothing (as on a rank other than 0)."""

    reconstruction = None
