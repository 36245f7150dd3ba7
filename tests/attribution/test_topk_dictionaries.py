"""Attribution with dictionaries from other libraries: a sparsify folder through `clt attribute`, TopK
kept exact with its selection frozen, or converted to JumpReLU, and partial coverage.

The oracle is test_attribution's `LinearOracle` (the frozen model rebuilt independently): replacement
logits equal the model's, and each graph row plus its constant terms sums to its target.
"""

from __future__ import annotations

import pytest
import torch
from helpers import random_transcoder
from test_attribution import PROMPT, LinearOracle, _graph_rows

from clt.attribution import Graph, ReplacementModel, attribute
from clt.attribution.topk import topk_for_attribution
from clt.cli import main
from clt.config.transcoder import CLTConfig
from clt.models.dictionaries import load_dictionary
from clt.models.sparsify_files import export_sparsify
from clt.models.transcoder import CrossLayerTranscoder

pytestmark = pytest.mark.usefixtures("one_thread")


def _plt(model, layers=(0, 2), **config) -> CrossLayerTranscoder:
    """A random skip transcoder (TopK, k=4, unless `config` says otherwise) covering model `layers`."""
    config = {"num_features": 24, "cross_layer": False, "skip_connection": True, "activation_fn": "topk",
              "topk": 4, **config}  # fmt: skip
    full = random_transcoder(model, **config)
    tc = CrossLayerTranscoder(full.cfg.replace(num_layers=len(layers), layers=list(layers)))
    idx, L = list(layers), full.cfg.num_layers
    state = {
        name: v[idx] if v.ndim and v.shape[0] == L else v
        for name, v in full.state_dict().items()
        if not name.startswith("W_dec.")
    }
    state |= {f"W_dec.{i}": full.W_dec[m].detach() for i, m in enumerate(idx)}
    tc.load_state_dict(state)
    return tc.eval()


def _topk_plt(model, layers=(0, 2), k=4) -> CrossLayerTranscoder:
    """A random TopK skip transcoder (sparsify's kind) covering model `layers`."""
    return _plt(model, layers, topk=k)


def _row_sums_hold(rm: ReplacementModel, graph: Graph) -> None:
    oracle = LinearOracle(rm, torch.tensor(graph.token_ids))
    targets = oracle.target_values(graph, *oracle.run())
    constants = oracle.target_values(graph, *oracle.all_sources_removed(graph))
    sums = graph.adjacency[_graph_rows(graph)].sum(1)
    assert ((sums + constants - targets).abs() / targets.abs().max()).max() <= 1e-4


def test_clt_attribute_reads_a_sparsify_folder(tiny_llama, tmp_path, capsys):
    """`clt attribute --transcoder <sparsify folder>`: a skip transcoder covering layers 0 and 2 of 3, in
    EleutherAI's published layout; the graph's replacement logits equal the model's, its rows sum."""
    model, tokenizer = tiny_llama
    export_sparsify(_topk_plt(model), tmp_path / "sparsify", hookpoint="model.layers.{}.mlp")
    out = tmp_path / "graph"
    args = ["attribute", "--transcoder", str(tmp_path / "sparsify"), "--model", "tiny-llama", "--prompt", PROMPT]
    args += ["--output-dir", str(out), "--zero-bos", "false", "--max-n-logits", "4", "--desired-logit-prob", "1"]
    assert main(args) == 0
    assert "replacement score" in capsys.readouterr().out
    graph = Graph.load(out / "graph.json")
    assert set(graph.features[:, 0].tolist()) == {0, 2} and graph.n_layers == 3
    rm = ReplacementModel(model, load_dictionary(tmp_path / "sparsify"), tokenizer)
    state = rm.prepare(PROMPT)
    assert (rm(PROMPT) - state.logits).abs().max() <= 1e-4  # replacement exactness
    _row_sums_hold(rm, graph)


def test_frozen_topk_keeps_the_clean_selection_under_interventions(tiny_llama):
    """'freeze': in the local replacement model downstream features keep the clean run's active set
    however an upstream feature is pushed; with live TopK the set moves."""
    model, tokenizer = tiny_llama
    tc = _topk_plt(model, layers=(0, 1, 2), k=3)
    rm = ReplacementModel(model, tc, tokenizer)
    state = rm.prepare(PROMPT)
    assert state.selection is not None and int(state.selection[1:].sum(-1).max()) <= 3
    assert (rm(PROMPT) - state.logits).abs().max() <= 1e-4

    def active_sets(clean) -> list[torch.Tensor]:
        seen = []

        def edit(layer: int, a: torch.Tensor) -> torch.Tensor:
            if layer == 0:
                return a * 50.0  # a large push upstream
            seen.append(a[0] != 0)
            return a

        with torch.no_grad():
            rm.spliced_logits(state, errors=clean, edit=edit)
        return seen

    frozen = active_sets(state)
    assert all(bool((s <= state.selection[:, i + 1]).all()) for i, s in enumerate(frozen))
    live = active_sets(type(state)(**{**state.__dict__, "selection": None}))
    assert any(not torch.equal(s, state.selection[:, i + 1]) for i, s in enumerate(live))


def test_frozen_topk_graph_passes_the_oracle(tiny_llama):
    model, tokenizer = tiny_llama
    rm = ReplacementModel(model, _topk_plt(model), tokenizer)
    graph = attribute(PROMPT, rm, zero_bos=False, max_n_logits=3, desired_logit_prob=1.0, progress=False)
    assert graph.n_features > 0
    _row_sums_hold(rm, graph)


def test_topk_converted_to_jumprelu_matches_l0_and_stays_exact(tiny_llama):
    model, tokenizer = tiny_llama
    tc = _topk_plt(model, k=4)
    converted = topk_for_attribution(tc, model, tokenizer, "jumprelu", calibration_tokens=512)
    assert converted.cfg.activation_fn == "jumprelu" and converted.cfg.layers == [0, 2]
    assert topk_for_attribution(tc, model, tokenizer, "freeze") is tc
    rm = ReplacementModel(model, converted, tokenizer)
    state = rm.prepare(PROMPT)
    assert state.selection is None
    assert (rm(PROMPT) - state.logits).abs().max() <= 1e-4
    l0 = (state.activations[1:] > 0).float().sum(-1).mean(0)
    assert bool(((l0 > 1) & (l0 < 8)).all()), l0  # around k = 4 (calibrated on other text)
    graph = attribute(PROMPT, model, tc, tokenizer=tokenizer, topk_mode="jumprelu", calibration_tokens=512,
                      zero_bos=False, max_n_logits=3, desired_logit_prob=1.0, progress=False)  # fmt: skip
    _row_sums_hold(rm, graph)


def test_bad_topk_mode_and_mismatched_dictionaries_are_refused(tiny_llama):
    from clt.attribution import TranscoderMismatchError
    from clt.config.attribution import AttributionConfig
    from clt.config.base import ConfigError

    model, tokenizer = tiny_llama
    with pytest.raises(ConfigError, match="topk_mode"):
        AttributionConfig(topk_mode="live")
    wide = CrossLayerTranscoder(CLTConfig(num_features=8, num_layers=1, d_model=48, cross_layer=False))
    with pytest.raises(TranscoderMismatchError, match="d_model 48"):
        ReplacementModel(model, wide, tokenizer)
    deep = CrossLayerTranscoder(CLTConfig(num_features=8, num_layers=1, d_model=32, cross_layer=False, layers=[5]))
    with pytest.raises(TranscoderMismatchError, match="3 layers"):
        ReplacementModel(model, deep, tokenizer)


@pytest.mark.interop
def test_clt_attribute_on_coders_sparsify_trained(tiny_llama, tmp_path, capsys):
    """The acceptance run: skip transcoders trained and saved by sparsify itself (its venv) for layers 0
    and 2 of 3; `clt attribute` on their folder gives replacement logits equal to the model's and a
    graph that passes the row-sum oracle."""
    from helpers import library_python, mlp_activations, run_library

    python = library_python("sparsify")
    model, tokenizer = tiny_llama
    data = mlp_activations(model, tokenizer, tmp_path, "tiny-llama", [0, 2])
    run_library(python, "sparsify", "train", data, tmp_path / "out", "--features", 64, "--k", 6, "--steps", 10,
                "--variants", "skip")  # fmt: skip
    out = tmp_path / "graph"
    args = ["attribute", "--transcoder", str(tmp_path / "out" / "skip"), "--model", "tiny-llama", "--prompt", PROMPT]
    args += ["--output-dir", str(out), "--zero-bos", "false", "--max-n-logits", "4", "--desired-logit-prob", "1"]
    assert main(args) == 0
    graph = Graph.load(out / "graph.json")
    rm = ReplacementModel(model, load_dictionary(tmp_path / "out" / "skip"), tokenizer)
    state = rm.prepare(PROMPT)
    with torch.no_grad():
        gap = float((rm(PROMPT) - state.logits).abs().max())
    print(f"sparsify-trained skip transcoder: max |replacement - model logits| = {gap:.2e}")
    assert gap <= 1e-4
    assert graph.n_features > 0 and set(graph.features[:, 0].tolist()) <= {0, 2}
    _row_sums_hold(rm, graph)


def test_clt_attribute_takes_a_cached_hub_id_and_explains_an_absent_one(tiny_llama, tmp_path, monkeypatch, capsys):
    """`--transcoder owner/repo`: resolved in the local Hugging Face cache without a download; an id that
    is not cached exits 1 with the models' how-to-provide message."""
    import huggingface_hub.constants
    from helpers import fake_hub_cache

    model, _ = tiny_llama
    export_sparsify(_topk_plt(model), tmp_path / "src", hookpoint="model.layers.{}.mlp")
    fake_hub_cache(tmp_path / "hub", "EleutherAI/skip-transcoder-tiny", tmp_path / "src")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = ["attribute", "--model", "tiny-llama", "--prompt", PROMPT, "--output-dir", str(tmp_path / "g")]
    assert main([*args, "--transcoder", "EleutherAI/skip-transcoder-tiny"]) == 0
    assert Graph.load(tmp_path / "g" / "graph.json").n_features > 0
    capsys.readouterr()
    assert main([*args, "--transcoder", "EleutherAI/not-cached"]) == 1
    err = capsys.readouterr().err
    assert "dictionary 'EleutherAI/not-cached' is not available offline" in err and "Traceback" not in err


def test_clt_attribute_reads_a_saelens_folder_for_gpt2(tmp_path, capsys):
    """A GPT-2-style model and SAELens's layout (JumpReLU skip transcoders at `blocks.{m}.ln2.hook_normalized`)
    covering layers 1 and 2 of 3: exact replacement logits and row sums."""
    from clt.models.saelens_files import export_saelens
    from clt.nnsight.loading import load_model

    model, tokenizer = load_model("tiny-gpt2")
    tc = _plt(model, layers=(1, 2), activation_fn="jumprelu", jumprelu_threshold=0.05)
    export_saelens(tc, tmp_path / "saelens")
    out = tmp_path / "graph"
    args = ["attribute", "--transcoder", str(tmp_path / "saelens"), "--model", "tiny-gpt2", "--prompt", PROMPT]
    args += ["--output-dir", str(out), "--zero-bos", "false", "--max-n-logits", "4", "--desired-logit-prob", "1"]
    assert main(args) == 0
    graph = Graph.load(out / "graph.json")
    assert graph.n_features > 0 and set(graph.features[:, 0].tolist()) <= {1, 2}
    rm = ReplacementModel(model, load_dictionary(tmp_path / "saelens"), tokenizer)
    with torch.no_grad():
        assert (rm(PROMPT) - rm.prepare(PROMPT).logits).abs().max() <= 1e-4
    _row_sums_hold(rm, graph)


def test_clt_attribute_converts_topk_to_jumprelu_when_asked(tiny_llama, tmp_path):
    model, _ = tiny_llama
    export_sparsify(_topk_plt(model), tmp_path / "sparsify")
    out = tmp_path / "graph"
    args = ["attribute", "--transcoder", str(tmp_path / "sparsify"), "--model", "tiny-llama", "--prompt", PROMPT]
    args += ["--output-dir", str(out), "--topk-mode", "jumprelu", "--calibration-tokens", "256"]
    assert main(args) == 0
    frozen = attribute(PROMPT, model, load_dictionary(tmp_path / "sparsify"), tokenizer=tiny_llama[1], progress=False)
    converted = Graph.load(out / "graph.json")
    assert converted.config.topk_mode == "jumprelu" and converted.n_features > 0
    assert not torch.equal(converted.features, frozen.features)  # a different dictionary: other active sets
