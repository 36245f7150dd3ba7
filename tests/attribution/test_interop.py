"""circuit-tracer interop: transcoder export/load (formats, exactness, numerics) and graph files.

The expected file names, keys and layouts are those circuit-tracer 0.5.0 reads
(decoderesearch/circuit-tracer): ``circuit_tracer/transcoder/single_layer_transcoder.py``
(``load_transcoder``, ``SingleLayerTranscoder.encode/decode``),
``circuit_tracer/transcoder/cross_layer_transcoder.py`` (``_load_state_dict``,
``encode_layer``, ``compute_reconstruction``), ``circuit_tracer/utils/caching.py``
(``load_transcoders_from_cache``: config.yaml) and ``circuit_tracer/graph.py`` (``Graph.to_pt``).
`_ct_reconstruction` re-implements circuit-tracer's forward on the files, so these tests run
without circuit-tracer installed (experiments/circuit_tracer/check_export.py runs the real one).
"""

from __future__ import annotations

import dataclasses
import sys
import types
from typing import Any, NamedTuple

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from clt.attribution.graph import Graph, GraphFileError
from clt.attribution.interop import (
    load_circuit_tracer_graph,
    to_circuit_tracer_dict,
)
from clt.config.attribution import AttributionConfig
from clt.config.transcoder import CLTConfig
from clt.models.export import export_circuit_tracer, load_circuit_tracer
from clt.models.perturb import randomize_parameters
from clt.models.transcoder import CheckpointError, CrossLayerTranscoder

F, D = 8, 16


pytestmark = pytest.mark.usefixtures("one_thread")


def _kw(cross_layer: bool, activation: str, skip: bool = False, **extra) -> dict[str, Any]:
    return {"cross_layer": cross_layer, "activation_fn": activation, "skip_connection": skip, **extra}


def _transcoder(*, layers=(0, 1, 2), stats: bool = True, seed: int = 0, **kw) -> CrossLayerTranscoder:
    """A random transcoder with biases, thresholds, skip and standardisation all non-trivial."""
    cfg = CLTConfig(num_features=F, num_layers=len(layers), d_model=D, layers=list(layers), seed=seed, **kw)
    return randomize_parameters(CrossLayerTranscoder(cfg), seed + 100, standardisation=stats)


# ---------------------------------------------------------------- circuit-tracer's reader, mirrored

# Keys circuit-tracer reads. single_layer_transcoder.py, load_transcoder: every key of
# layer_{i}.safetensors goes into a strict load_state_dict of SingleLayerTranscoder, whose
# parameters are W_enc [F, d], W_dec [F, d], b_enc [F], b_dec [d], W_skip [d, d] (optional) and
# activation_function.threshold [F] (JumpReLU; F.relu when absent).
PLT_KEYS = {"W_enc", "W_dec", "b_enc", "b_dec"}
# cross_layer_transcoder.py, _load_state_dict: W_enc_{i}.safetensors holds W_enc_{i} [F, d],
# b_enc_{i} [F], b_dec_{i} [d], threshold_{i} [F] (JumpReLU); W_dec_{i}.safetensors holds
# W_dec_{i} [F, n_layers - i, d]; n_layers = number of W_enc_*.safetensors files.
CLT_ENC_KEYS = {"W_enc_{}", "b_enc_{}", "b_dec_{}"}
# utils/caching.py, load_transcoders_from_cache: config.yaml keys.
CONFIG_KEYS = {"model_kind", "feature_input_hook", "feature_output_hook"}


def _ct_reconstruction(folder, x: torch.Tensor) -> torch.Tensor:
    """circuit-tracer's reconstruction [n, M, d] of raw inputs x [n, M, d], from the files alone."""
    config = yaml.safe_load((folder / "config.yaml").read_text())
    M = x.shape[1]
    out = torch.zeros_like(x)
    if config["model_kind"] == "transcoder_set":
        for m in range(M):
            t = load_file(str(folder / f"layer_{m}.safetensors"))
            pre = x[:, m] @ t["W_enc"].T + t["b_enc"]  # F.linear(x, W_enc, b_enc)
            thr = t.get("activation_function.threshold")
            a = torch.relu(pre) if thr is None else pre * (pre > thr)
            out[:, m] = a @ t["W_dec"] + t["b_dec"]
            if "W_skip" in t:
                out[:, m] += x[:, m] @ t["W_skip"].T  # compute_skip: input_acts @ W_skip.T
        return out
    for m in range(M):
        enc = load_file(str(folder / f"W_enc_{m}.safetensors"))
        dec = load_file(str(folder / f"W_dec_{m}.safetensors"))[f"W_dec_{m}"]
        pre = torch.einsum("bd,fd->bf", x[:, m], enc[f"W_enc_{m}"]) + enc[f"b_enc_{m}"]
        thr = enc.get(f"threshold_{m}")
        a = torch.relu(pre) if thr is None else pre * (pre > thr)
        out[:, m:] += torch.einsum("bf,ftd->btd", a, dec)
        out[:, m] += enc[f"b_dec_{m}"]
    return out


def _model_inputs(model: CrossLayerTranscoder, M: int, n: int = 64, seed: int = 7):
    """Raw inputs for all M model layers and the transcoder's reconstruction at its layers."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, M, D, generator=g) * 2 + 0.5
    layers = model.cfg.layers
    with torch.no_grad():
        y = model(x[:, layers]).reconstruction
    return x, y


# ---------------------------------------------------------------- file layout


@pytest.mark.parametrize(
    "kw", [_kw(False, "jumprelu"), _kw(False, "relu", skip=True), _kw(True, "relu"), _kw(True, "jumprelu")]
)
def test_files_have_circuit_tracer_keys_and_shapes(tmp_path, kw):
    model = _transcoder(**kw)
    out = export_circuit_tracer(model, tmp_path / "ct", scan="my-scan")
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert set(config) >= CONFIG_KEYS
    assert (config["feature_input_hook"], config["feature_output_hook"], config["scan"]) == (
        "mlp.hook_in",
        "mlp.hook_out",
        "my-scan",
    )
    jump = kw["activation_fn"] == "jumprelu"
    if not kw["cross_layer"]:
        assert config["model_kind"] == "transcoder_set"
        assert sorted(p.name for p in out.glob("*.safetensors")) == [f"layer_{i}.safetensors" for i in range(3)]
        for i in range(3):
            t = load_file(str(out / f"layer_{i}.safetensors"))
            expected = set(PLT_KEYS)
            expected |= {"activation_function.threshold"} if jump else set()
            expected |= {"W_skip"} if kw.get("skip_connection") else set()
            assert set(t) == expected
            shapes = {
                "W_enc": (F, D),
                "W_dec": (F, D),
                "b_enc": (F,),
                "b_dec": (D,),
                "activation_function.threshold": (F,),
                "W_skip": (D, D),
            }
            assert all(tuple(v.shape) == shapes[k] and v.dtype == torch.float32 for k, v in t.items())
    else:
        assert config["model_kind"] == "cross_layer_transcoder"
        for i in range(3):
            enc = load_file(str(out / f"W_enc_{i}.safetensors"))
            dec = load_file(str(out / f"W_dec_{i}.safetensors"))
            expected = {k.format(i) for k in CLT_ENC_KEYS} | ({f"threshold_{i}"} if jump else set())
            assert set(enc) == expected and set(dec) == {f"W_dec_{i}"}
            assert tuple(enc[f"W_enc_{i}"].shape) == (F, D)
            assert tuple(enc[f"b_enc_{i}"].shape) == (F,) and tuple(enc[f"b_dec_{i}"].shape) == (D,)
            assert tuple(dec[f"W_dec_{i}"].shape) == (F, 3 - i, D)


# ---------------------------------------------------------------- numerics


@pytest.mark.parametrize(
    "kw",
    [
        _kw(False, "jumprelu"),
        _kw(True, "relu"),
        _kw(False, "relu", skip=True),
        _kw(False, "jumprelu", skip=True),
        _kw(True, "jumprelu"),
        _kw(True, "batchtopk", topk=2),
    ],
    ids=["plt-jumprelu", "clt-relu", "plt-relu-skip", "plt-jumprelu-skip", "clt-jumprelu", "clt-batchtopk"],
)
def test_exported_weights_reproduce_reconstruction(tmp_path, kw):
    model = _transcoder(**kw)
    out = export_circuit_tracer(model, tmp_path / "ct")
    x, y = _model_inputs(model, 3)
    ct = _ct_reconstruction(out, x)
    torch.testing.assert_close(ct, y, rtol=1e-4, atol=1e-4)
    active = model.encode(x).gt(0).float().mean()
    assert 0.05 < active < 0.95  # the activation function is exercised


@pytest.mark.parametrize("cross_layer", [False, True])
def test_uncovered_model_layers_are_zero_transcoders(tmp_path, cross_layer):
    model = _transcoder(layers=(1, 3), cross_layer=cross_layer, activation_fn="jumprelu")
    out = export_circuit_tracer(model, tmp_path / "ct", num_model_layers=5)
    x, y = _model_inputs(model, 5)
    ct = _ct_reconstruction(out, x)
    torch.testing.assert_close(ct[:, [1, 3]], y, rtol=1e-4, atol=1e-4)
    assert ct[:, [0, 2, 4]].abs().max() == 0
    loaded = load_circuit_tracer(out)
    assert loaded.cfg.layers == [1, 3]
    torch.testing.assert_close(loaded(x[:, [1, 3]]).reconstruction, y, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- round trip


@pytest.mark.parametrize("cross_layer", [False, True])
def test_round_trip_is_exact_without_standardisation(tmp_path, cross_layer):
    model = _transcoder(stats=False, cross_layer=cross_layer, activation_fn="relu", skip_connection=not cross_layer)
    loaded = load_circuit_tracer(export_circuit_tracer(model, tmp_path / "ct"))
    assert loaded.cfg == model.cfg
    state, back = model.state_dict(), loaded.state_dict()
    assert state.keys() == back.keys()
    for key in state:
        assert torch.equal(state[key], back[key]), key


@pytest.mark.parametrize(
    "kw", [_kw(False, "jumprelu", skip=True), _kw(True, "jumprelu"), _kw(True, "batchtopk", topk=2)]
)
def test_round_trip_gives_the_folded_transcoder(tmp_path, kw):
    model = _transcoder(**kw)
    first = export_circuit_tracer(model, tmp_path / "a")
    loaded = load_circuit_tracer(first)
    folded = model.fold_normalization()
    assert loaded.cfg == model.cfg
    for name, value in folded.state_dict().items():
        if name == "log_threshold":  # stored as θ = exp(log θ): equal up to rounding of log
            torch.testing.assert_close(loaded.threshold, folded.threshold, rtol=1e-6, atol=0)
        elif name != "batchtopk.num_updates":  # a training counter, not written
            assert torch.equal(loaded.state_dict()[name], value), name
    second = export_circuit_tracer(loaded, tmp_path / "b")
    for file in sorted(first.glob("*.safetensors")):
        a, b = load_file(str(file)), load_file(str(second / file.name))
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=0)
    x, y = _model_inputs(model, 3)
    torch.testing.assert_close(loaded.eval()(x).reconstruction, y, rtol=1e-4, atol=1e-4)


def test_loads_a_folder_circuit_tracer_wrote(tmp_path):
    """Files as circuit-tracer's CrossLayerTranscoder.to_safetensors writes (no config.yaml)."""
    g = torch.Generator().manual_seed(3)
    M = 3
    for i in range(M):
        enc = {
            f"W_enc_{i}": torch.randn(F, D, generator=g),
            f"b_enc_{i}": torch.randn(F, generator=g),
            f"b_dec_{i}": torch.randn(D, generator=g),
            f"threshold_{i}": torch.rand(F, generator=g),
        }
        save_file(enc, str(tmp_path / f"W_enc_{i}.safetensors"))
        save_file({f"W_dec_{i}": torch.randn(F, M - i, D, generator=g)}, str(tmp_path / f"W_dec_{i}.safetensors"))
    model = load_circuit_tracer(tmp_path)
    assert (model.cfg.num_layers, model.cfg.num_features, model.cfg.d_model) == (M, F, D)
    assert model.cfg.cross_layer and model.cfg.activation_fn == "jumprelu"
    x = torch.randn(32, M, D, generator=g)
    (tmp_path / "config.yaml").write_text("model_kind: cross_layer_transcoder\n")
    torch.testing.assert_close(model(x).reconstruction, _ct_reconstruction(tmp_path, x), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- bad inputs


def test_unsupported_transcoders_are_refused(tmp_path):
    with pytest.raises(ValueError, match="TopK"):
        export_circuit_tracer(_transcoder(activation_fn="topk", topk=2), tmp_path / "a")
    with pytest.raises(ValueError, match="skip"):
        export_circuit_tracer(_transcoder(cross_layer=True, skip_connection=True), tmp_path / "b")
    with pytest.raises(ValueError, match="num_model_layers"):
        export_circuit_tracer(_transcoder(), tmp_path / "c", num_model_layers=2)


def test_existing_export_needs_overwrite(tmp_path):
    out = export_circuit_tracer(_transcoder(layers=(0, 1, 2, 3)), tmp_path / "ct")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_circuit_tracer(_transcoder(), out)
    export_circuit_tracer(_transcoder(), out, overwrite=True)
    assert not (out / "layer_3.safetensors").exists()  # stale layers would be read as layer 3
    assert load_circuit_tracer(out).cfg.num_layers == 3


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="export_circuit_tracer"):
        load_circuit_tracer(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no circuit-tracer transcoder"):
        load_circuit_tracer(tmp_path / "empty")

    out = export_circuit_tracer(_transcoder(cross_layer=False), tmp_path / "plt")
    data = (out / "layer_1.safetensors").read_bytes()
    (out / "layer_1.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_circuit_tracer(out)
    (out / "layer_1.safetensors").unlink()
    with pytest.raises(CheckpointError, match="lacks layer_1.safetensors"):
        load_circuit_tracer(out)

    out = export_circuit_tracer(_transcoder(), tmp_path / "clt")
    for name in ("W_enc_2.safetensors", "W_dec_2.safetensors"):
        (out / name).unlink()
    with pytest.raises(CheckpointError, match="2 layers"):
        load_circuit_tracer(out)  # its config.yaml covers 3 layers

    out = export_circuit_tracer(_transcoder(), tmp_path / "clt2")
    (out / "config.yaml").unlink()
    (out / "W_dec_1.safetensors").unlink()
    with pytest.raises(CheckpointError, match="lacks W_dec_1"):
        load_circuit_tracer(out)
    save_file({"W_dec_1": torch.zeros(F, 5, D)}, str(out / "W_dec_1.safetensors"))
    with pytest.raises(CheckpointError, match="wrong layer count"):
        load_circuit_tracer(out)


# ---------------------------------------------------------------- graphs


class _Tokenizer:
    """Enough of a tokenizer for decoding: token i is 't{i}'."""

    def __len__(self) -> int:
        return 100

    def decode(self, ids: list[int]) -> str:
        return "".join(f"t{i}" for i in ids)


def _graph(n_layers: int = 2, n_pos: int = 4, n_features: int = 5, n_logits: int = 3) -> Graph:
    g = torch.Generator().manual_seed(0)
    features = torch.stack(
        [
            torch.randint(0, n_layers, (n_features,), generator=g),
            torch.randint(0, n_pos, (n_features,), generator=g),
            torch.randint(0, 50, (n_features,), generator=g),
        ],
        1,
    )
    features = features[torch.argsort(features[:, 0] * 10_000 + features[:, 1] * 100 + features[:, 2])]
    n = n_features + (n_layers + 1) * n_pos + n_logits
    tok = _Tokenizer()
    ids, logit_ids = [1, 7, 8, 9][:n_pos], [11, 12, 13][:n_logits]
    return Graph(
        prompt="t1t7t8t9",
        token_ids=ids,
        tokens=[tok.decode([i]) for i in ids],
        features=features,
        activations=torch.rand(n_features, generator=g),
        adjacency=torch.randn(n, n, generator=g),
        logit_token_ids=logit_ids,
        logit_tokens=[tok.decode([i]) for i in logit_ids],
        logit_probabilities=torch.tensor([0.5, 0.3, 0.1])[:n_logits],
        n_layers=n_layers,
        config=AttributionConfig(),
        model_name="tiny",
    )


def _assert_same_graph(a: Graph, b: Graph) -> None:
    assert torch.equal(a.adjacency, b.adjacency)
    assert torch.equal(a.features, b.features) and torch.equal(a.activations, b.activations)
    assert (a.token_ids, a.tokens, a.prompt) == (b.token_ids, b.tokens, b.prompt)
    assert (a.logit_token_ids, a.logit_tokens) == (b.logit_token_ids, b.logit_tokens)
    assert torch.equal(a.logit_probabilities, b.logit_probabilities)
    assert a.n_layers == b.n_layers and a.model_name == b.model_name


def test_graph_round_trip_through_circuit_tracer_dict(tmp_path):
    graph = _graph()
    data = to_circuit_tracer_dict(
        graph,
        model_config={
            "num_hidden_layers": 2,
            "hidden_size": 16,
            "num_attention_heads": 4,
            "vocab_size": 100,
            "architectures": ["LlamaForCausalLM"],
        },
    )
    assert set(data) == {
        "input_string",
        "adjacency_matrix",
        "cfg",
        "active_features",
        "logit_targets",
        "logit_probabilities",
        "vocab_size",
        "input_tokens",
        "selected_features",
        "activation_values",
        "scan",
    }  # Graph.to_pt's keys
    assert data["cfg"]["d_head"] == 4 and data["vocab_size"] == 100
    torch.save(data, tmp_path / "graph.pt")
    back = load_circuit_tracer_graph(tmp_path / "graph.pt", tokenizer=_Tokenizer())
    _assert_same_graph(graph, back)
    plain = load_circuit_tracer_graph(tmp_path / "graph.pt")
    assert plain.tokens == ["1", "7", "8", "9"] and plain.logit_tokens == ["11", "12", "13"]


@pytest.fixture
def fake_circuit_tracer(monkeypatch):
    """circuit-tracer's pickled classes under their real module names (for torch.save only)."""

    @dataclasses.dataclass
    class UnifiedConfig:
        n_layers: int
        d_model: int
        model_name: str
        dtype: Any = None

    class LogitTarget(NamedTuple):
        token_str: str
        vocab_idx: int

    names = {
        "circuit_tracer.utils.tl_nnsight_mapping": ("UnifiedConfig", UnifiedConfig),
        "circuit_tracer.attribution.targets": ("LogitTarget", LogitTarget),
    }
    for package in ("circuit_tracer", "circuit_tracer.utils", "circuit_tracer.attribution"):
        monkeypatch.setitem(sys.modules, package, types.ModuleType(package))
    for module_name, (name, cls) in names.items():
        module = types.ModuleType(module_name)
        cls.__module__, cls.__qualname__ = module_name, name
        setattr(module, name, cls)
        monkeypatch.setitem(sys.modules, module_name, module)
    return UnifiedConfig, LogitTarget


def test_reads_circuit_tracer_objects_safely(tmp_path, fake_circuit_tracer, monkeypatch):
    UnifiedConfig, LogitTarget = fake_circuit_tracer
    graph = _graph()
    data = to_circuit_tracer_dict(graph)
    # circuit-tracer keeps all active features and selects some: add two unselected ones
    extra = torch.tensor([[0, 0, 99], [1, 3, 98]])
    data["active_features"] = torch.cat([extra[:1], data["active_features"], extra[1:]])
    data["activation_values"] = torch.cat([torch.tensor([9.0]), data["activation_values"], torch.tensor([9.0])])
    data["selected_features"] = torch.arange(1, graph.n_features + 1)
    data["cfg"] = UnifiedConfig(n_layers=2, d_model=16, model_name="tiny", dtype=torch.float32)
    data["logit_targets"] = [LogitTarget(s, i) for s, i in zip(graph.logit_tokens, graph.logit_token_ids)]
    torch.save(data, tmp_path / "graph.pt")
    for name in list(sys.modules):
        if name.startswith("circuit_tracer"):
            monkeypatch.delitem(sys.modules, name)
    back = load_circuit_tracer_graph(tmp_path / "graph.pt")
    _assert_same_graph(graph, dataclasses.replace(back, tokens=graph.tokens))
    assert back.n_active_features == graph.n_features + 2
    assert back.config.max_feature_nodes == graph.n_features


class _Unknown:
    pass


def test_graph_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_circuit_tracer_graph(tmp_path / "absent.pt")
    data = to_circuit_tracer_dict(_graph())
    torch.save({**data, "cfg": _Unknown()}, tmp_path / "unsafe.pt")
    with pytest.raises(GraphFileError, match="re-save"):
        load_circuit_tracer_graph(tmp_path / "unsafe.pt")
    torch.save(data, tmp_path / "graph.pt")
    raw = (tmp_path / "graph.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(GraphFileError, match="truncated"):
        load_circuit_tracer_graph(tmp_path / "cut.pt")
    data["cfg"]["n_layers"] = 3  # wrong layer count: the adjacency no longer fits
    torch.save(data, tmp_path / "wrong.pt")
    with pytest.raises(GraphFileError, match="do not fit"):
        load_circuit_tracer_graph(tmp_path / "wrong.pt")
    torch.save({"adjacency": torch.zeros(2, 2)}, tmp_path / "other.pt")
    with pytest.raises(GraphFileError, match="not a circuit-tracer graph"):
        load_circuit_tracer_graph(tmp_path / "other.pt")
    del data["input_tokens"]
    torch.save(data, tmp_path / "partial.pt")
    with pytest.raises(GraphFileError, match="incomplete"):
        load_circuit_tracer_graph(tmp_path / "partial.pt")
