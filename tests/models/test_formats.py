"""`load_dictionary`: format detection, the sparsify and SAELens readers/writers, hub ids, clear errors.

The real libraries' side of the round trips is in test_formats_real.py; these run without them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import fake_hub_cache

import clt
from clt.config.transcoder import CLTConfig
from clt.files import NotAvailableOfflineError
from clt.models import CheckpointError, CrossLayerTranscoder, UnknownFormatError
from clt.models.dictionaries import detect_format, load_dictionary
from clt.models.export import export_circuit_tracer
from clt.models.perturb import randomize_parameters
from clt.models.saelens_files import export_saelens
from clt.models.sparsify_files import export_sparsify

D, F = 8, 12

pytestmark = pytest.mark.usefixtures("one_thread")


def _tc(layers=(1, 3), **kw) -> CrossLayerTranscoder:
    cfg = CLTConfig(**{"num_features": F, "num_layers": len(layers), "d_model": D, "layers": list(layers),
                       "cross_layer": False, "topk": 3, **kw})  # fmt: skip
    return randomize_parameters(CrossLayerTranscoder(cfg), seed=5)


def _same(a: CrossLayerTranscoder, b: CrossLayerTranscoder) -> None:
    x = torch.randn(6, a.cfg.num_layers, D, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out_a, out_b = a(x), b(x)
    torch.testing.assert_close(out_b.features, out_a.features, atol=2e-6, rtol=0)
    torch.testing.assert_close(out_b.reconstruction, out_a.reconstruction, atol=2e-6, rtol=0)


WRITERS = {
    "sparsify": [dict(activation_fn="topk", skip_connection=True), dict(activation_fn="topk", output_site="mlp_in")],
    "saelens": [
        dict(activation_fn="jumprelu", skip_connection=True),
        dict(activation_fn="relu"),
        dict(activation_fn="batchtopk"),
        dict(activation_fn="topk", output_site="mlp_in"),
        dict(activation_fn="jumprelu", output_site="mlp_in"),
    ],
}


@pytest.mark.parametrize(
    "fmt,kw",
    [(fmt, kw) for fmt, kws in WRITERS.items() for kw in kws],
    ids=lambda v: str(v) if isinstance(v, str) else "",
)
def test_written_dictionaries_load_back_and_compute_the_same(tmp_path, fmt, kw):
    tc = _tc(**kw)
    (export_sparsify if fmt == "sparsify" else export_saelens)(tc, tmp_path / "d")
    assert detect_format(tmp_path / "d") == fmt
    back = clt.load_dictionary(tmp_path / "d")
    assert back.cfg.layers == [1, 3] and back.cfg.is_sae == tc.cfg.is_sae
    assert back.cfg.skip_connection == tc.cfg.skip_connection
    assert back.cfg.activation_fn == ("jumprelu" if kw["activation_fn"] == "batchtopk" else kw["activation_fn"])
    _same(tc, back)
    one = sorted(p for p in (tmp_path / "d").iterdir())[1]  # a single layer's folder loads too
    assert load_dictionary(one).cfg.layers == [3]


def test_every_format_is_detected(tmp_path):
    plt = _tc(activation_fn="jumprelu")
    plt.save_pretrained(tmp_path / "ours")
    export_circuit_tracer(plt, tmp_path / "ct")
    assert detect_format(tmp_path / "ours") == "clt"
    assert detect_format(tmp_path / "ct") == "circuit-tracer"
    _same(plt, load_dictionary(tmp_path / "ours"))
    _same(plt, load_dictionary(tmp_path / "ct"))


def test_unknown_folder_names_what_it_found_and_the_formats(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0")
    (tmp_path / "cfg.json").write_text("{}")
    with pytest.raises(UnknownFormatError) as err:
        load_dictionary(tmp_path)
    message = str(err.value)
    assert "cfg.json, weights.bin" in message
    for name in ("clt", "circuit-tracer", "sparsify", "saelens", "sae.safetensors", "sae_weights.safetensors"):
        assert name in message


def test_writers_refuse_what_the_format_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match="TopK"):
        export_sparsify(_tc(activation_fn="jumprelu"), tmp_path / "a")
    with pytest.raises(ValueError, match="per-layer transcoder"):
        export_sparsify(_tc(activation_fn="topk", cross_layer=True), tmp_path / "b")
    with pytest.raises(ValueError, match="no TopK transcoder"):
        export_saelens(_tc(activation_fn="topk"), tmp_path / "c")
    export_saelens(_tc(activation_fn="relu"), tmp_path / "d")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_saelens(_tc(activation_fn="relu"), tmp_path / "d")


def _edit_cfg(folder: Path, **changes) -> None:
    file = folder / "cfg.json"
    cfg = json.loads(file.read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    file.write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "fmt,change,match",
    [
        ("sparsify", {"num_latent": 12, "num_latents": None}, "Did you mean 'num_latents'"),
        ("sparsify", {"d_in": None}, r"lacks \['d_in'\]"),
        ("sparsify", {"d_in": 9}, "d_in=9"),
        ("sparsify", {"activation": "groupmax"}, "groupmax"),
        ("sparsify", {"gram_lookup": True}, r"turns on \['gram_lookup'\]"),
        ("sparsify", {"embed_skip": False, "gram_table_hash": "x"}, None),
        ("saelens", {"d_sea": 12, "d_sae": None}, "Did you mean 'd_sae'"),
        ("saelens", {"d_sae": 13}, "d_sae=13"),
        ("saelens", {"architecture": "gated"}, "architecture 'gated' is not supported"),
        ("saelens", {"normalize_activations": "layer_norm"}, "layer_norm"),
        ("saelens", {"architecture": "jumprelu"}, "threshold"),
    ],
)
def test_bad_cfg_json_is_named(tmp_path, fmt, change, match):
    if fmt == "sparsify":
        export_sparsify(_tc(activation_fn="topk", layers=(2,)), tmp_path)
    else:
        export_saelens(_tc(activation_fn="relu", output_site="mlp_in", layers=(2,)), tmp_path)
    folder = next(p for p in tmp_path.iterdir() if p.is_dir())
    _edit_cfg(folder, **change)
    if match is None:  # accepted
        assert load_dictionary(tmp_path).cfg.layers == [2]
        return
    with pytest.raises(CheckpointError, match=match) as err:
        load_dictionary(tmp_path)
    assert str(folder) in str(err.value)


@pytest.mark.parametrize("fmt", ["sparsify", "saelens"])
def test_truncated_weights_are_reported_by_name(tmp_path, fmt):
    if fmt == "sparsify":
        export_sparsify(_tc(activation_fn="topk", layers=(0,)), tmp_path)
    else:
        export_saelens(_tc(activation_fn="relu", layers=(0,)), tmp_path)
    weights = next(tmp_path.rglob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt or truncated") as err:
        load_dictionary(tmp_path)
    assert weights.name in str(err.value)


def test_layers_that_differ_are_refused(tmp_path):
    export_sparsify(_tc(activation_fn="topk", layers=(0,)), tmp_path)
    export_sparsify(_tc(activation_fn="topk", layers=(1,), topk=2), tmp_path, overwrite=True)
    with pytest.raises(CheckpointError, match="differ in k"):
        load_dictionary(tmp_path)


# ---------------------------------------------------------------- hub ids


def test_a_cached_hub_id_resolves_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tc = _tc(activation_fn="topk", skip_connection=True, layers=(0, 1))
    export_sparsify(tc, tmp_path / "src", hookpoint="model.layers.{}.mlp")  # EleutherAI's published layout
    fake_hub_cache(tmp_path / "hub", "EleutherAI/skip-transcoder-tiny", tmp_path / "src")
    loaded = load_dictionary("EleutherAI/skip-transcoder-tiny", cache_dir=tmp_path / "hub")
    assert loaded.cfg.layers == [0, 1]
    _same(tc, loaded)
    one = load_dictionary("EleutherAI/skip-transcoder-tiny/model.layers.1.mlp", cache_dir=tmp_path / "hub")
    assert one.cfg.layers == [1]


@pytest.mark.parametrize("name", ["EleutherAI/not-cached", "EleutherAI/skip-transcoder-tiny/model.layers.7.mlp"])
def test_an_absent_hub_id_says_how_to_provide_it(tmp_path, monkeypatch, name):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    export_sparsify(_tc(activation_fn="topk", layers=(0,)), tmp_path / "src", hookpoint="model.layers.{}.mlp")
    fake_hub_cache(tmp_path / "hub", "EleutherAI/skip-transcoder-tiny", tmp_path / "src")
    with pytest.raises(NotAvailableOfflineError) as err:
        load_dictionary(name, cache_dir=tmp_path / "hub")
    message = str(err.value)
    assert f"dictionary '{name}' is not available offline" in message
    assert "local folder" in message and "Hugging Face cache" in message


def test_models_and_dictionaries_share_the_offline_message():
    from clt.nnsight.loading import ModelNotFoundError, load_model

    with pytest.raises(ModelNotFoundError) as err:
        load_model("no-such-owner/no-such-model")
    assert isinstance(err.value, NotAvailableOfflineError)
    assert "model 'no-such-owner/no-such-model' is not available offline. Provide it as" in str(err.value)


def test_a_circuit_tracer_set_listing_hub_files_resolves_from_the_cache(tmp_path, monkeypatch):
    """circuit-tracer's hub layout: config.yaml lists `hf://owner/repo/layer_i.safetensors` files."""
    import yaml

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tc = _tc(activation_fn="jumprelu", layers=(0, 1))
    export_circuit_tracer(tc, tmp_path / "weights")
    (tmp_path / "weights" / "config.yaml").unlink()
    fake_hub_cache(tmp_path / "hub", "someone/tc-weights", tmp_path / "weights")
    (tmp_path / "set").mkdir()
    config = {
        "model_kind": "transcoder_set",
        "feature_input_hook": "mlp.hook_in",
        "feature_output_hook": "mlp.hook_out",
    }
    files = [f"hf://someone/tc-weights/layer_{m}.safetensors" for m in range(2)]
    (tmp_path / "set" / "config.yaml").write_text(yaml.safe_dump({**config, "transcoders": files}))
    fake_hub_cache(tmp_path / "hub", "someone/tc-set", tmp_path / "set")
    loaded = load_dictionary("someone/tc-set", cache_dir=tmp_path / "hub")
    assert loaded.cfg.layers == [0, 1] and loaded.cfg.activation_fn == "jumprelu"
    _same(tc, loaded)
    (tmp_path / "set" / "config.yaml").write_text(
        yaml.safe_dump({**config, "transcoders": ["hf://someone/gone/l0.safetensors"]})
    )
    with pytest.raises(NotAvailableOfflineError, match="someone/gone/l0.safetensors' is not available offline"):
        load_dictionary(tmp_path / "set", cache_dir=tmp_path / "hub")


def _clt_branch_coder(folder: Path, gen: torch.Generator, *, transcode: bool, **extra) -> dict[str, torch.Tensor]:
    """A single-layer coder in the layout of sparsify's cross-layer branch, with normalize_io."""
    from safetensors.torch import save_file

    d, f = D, F
    tensors = {
        "encoder.weight": torch.randn(f, d, generator=gen) / d**0.5,
        "encoder.bias": torch.randn(f, generator=gen) * 0.3,
        "W_dec": torch.randn(f, d, generator=gen) / f**0.5,
        "b_dec": torch.randn(d, generator=gen) * 0.3,
        "in_norm": torch.tensor([3.7]),
        "out_norm": torch.tensor([0.6]),
        "post_enc": torch.zeros(f),
        **({"W_skip": torch.randn(d, d, generator=gen) * 0.1} if transcode else {}),
    }
    tensors |= extra.pop("tensors", {})
    cfg = {"dtype": "none", "activation": "topk", "expansion_factor": 32, "normalize_decoder": True,
           "num_latents": f, "k": 3, "skip_connection": transcode, "transcode": transcode, "tp_output": True,
           "n_targets": 0, "n_sources": 0, "normalize_io": True, "divide_cross_layer": False,
           "train_post_encoder": True, "post_encoder_scale": False, "per_source_tied": False,
           "secondary_target_tied": False, "coalesce_topk": "none", "topk_coalesced": False, "use_fp8": False,
           "d_in": d, "d_out": d, **extra}  # fmt: skip
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(cfg, indent=4))
    return tensors


def _clt_branch_forward(t: dict[str, torch.Tensor], x: torch.Tensor, transcode: bool, k: int = 3):
    """Their SparseCoder.encode / MidDecoder.__call__: x·√d/in_norm, (− b_dec), relu, top-k, decode,
    + skip of the scaled input, then ·out_norm/√d."""
    d = x.shape[-1]
    xn = x * (d**0.5 / t["in_norm"])
    pre = torch.relu((xn if transcode else xn - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"])
    values, indices = pre.topk(k, dim=-1)
    acts = torch.zeros_like(pre).scatter_(-1, indices, values)
    y = acts @ t["W_dec"] + t["b_dec"] + (xn @ t["W_skip"].T if transcode else 0)
    return acts, y * (t["out_norm"] / d**0.5)


@pytest.mark.parametrize("transcode", [True, False], ids=["skip-transcoder", "sae"])
def test_sparsify_clt_branch_normalize_io_is_read_exactly(tmp_path, transcode):
    gen = torch.Generator().manual_seed(7)
    t = _clt_branch_coder(tmp_path / "model.layers.4.mlp", gen, transcode=transcode)
    tc = load_dictionary(tmp_path)
    assert tc.cfg.layers == [4] and tc.cfg.skip_connection == transcode
    x = torch.randn(20, D, generator=gen) * 5
    acts, y = _clt_branch_forward(t, x, transcode)
    with torch.no_grad():
        out = tc(x[:, None])
    torch.testing.assert_close(out.features[:, 0], acts, atol=2e-6, rtol=0)
    torch.testing.assert_close(out.reconstruction[:, 0], y, atol=2e-6, rtol=0)


@pytest.mark.parametrize(
    "extra,match",
    [
        (dict(tensors={"post_enc": torch.full((F,), 0.1)}), "post_enc"),
        (dict(n_targets=2), "cross-layer coder"),
        (dict(coalesce_topk="concat"), "cross-layer coder"),
        (dict(per_source_tied=True), r"turns on \['per_source_tied'\]"),
        (dict(tensors={"in_norm": torch.ones(2)}), "in_norm/out_norm"),
    ],
)
def test_sparsify_clt_branch_features_this_reader_cannot_hold_are_refused(tmp_path, extra, match):
    _clt_branch_coder(tmp_path / "layers.0.mlp", torch.Generator().manual_seed(0), transcode=True, **extra)
    with pytest.raises(CheckpointError, match=match):
        load_dictionary(tmp_path)


def test_clt_load_dictionary_does_not_import_torch_on_import_clt():
    import subprocess
    import sys

    code = "import sys, clt; assert 'torch' not in sys.modules; assert callable(clt.load_dictionary)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
