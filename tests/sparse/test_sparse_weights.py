"""Loading transcoders: circuit-tracer per-layer and CLT files, save_pretrained folders, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from clt.sparse import (
    SparseCLTEncoder,
    TranscoderLoadError,
    TranscoderWeights,
    load_transcoders,
    random_transcoders,
    save_transcoders,
)

H, F = 8, 24


def _clt_model(layers: list[int], activation_fn: str = "jumprelu", skip: bool = False):
    """A small CrossLayerTranscoder with random weights, biases, thresholds and standardisation."""
    from clt.config.transcoder import CLTConfig
    from clt.models.perturb import randomize_parameters
    from clt.models.transcoder import CrossLayerTranscoder

    cfg = CLTConfig(
        num_features=F,
        num_layers=len(layers),
        d_model=H,
        activation_fn=activation_fn,
        layers=layers,
        skip_connection=skip,
        jumprelu_threshold=0.2,
    )
    return randomize_parameters(CrossLayerTranscoder(cfg), seed=1)


def test_circuit_tracer_per_layer_round_trip(tmp_path: Path) -> None:
    weights = random_transcoders([0, 1, 2], H, F, jumprelu=True, seed=3)
    weights[1].W_skip = torch.randn(H, H)
    save_transcoders(weights, tmp_path)
    loaded = load_transcoders(tmp_path, layers=[2, 1], device="cpu")
    assert list(loaded) == [2, 1]
    for layer, w in loaded.items():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
            assert torch.equal(getattr(w, name), getattr(weights[layer], name)), name
    assert torch.equal(loaded[1].W_skip, weights[1].W_skip) and loaded[2].W_skip is None
    assert sorted(load_transcoders(tmp_path)) == [0, 1, 2]


def test_circuit_tracer_file_layout_is_transposed(tmp_path: Path) -> None:
    """circuit-tracer stores W_dec as [f, h]; TranscoderWeights.W_dec is the seed's [h, f]."""
    W_dec = torch.randn(F, H)
    save_file(
        {
            "W_enc": torch.randn(F, H),
            "W_dec": W_dec,
            "b_enc": torch.randn(F),
            "b_dec": torch.randn(H),
        },
        str(tmp_path / "layer_5.safetensors"),
    )
    w = load_transcoders(tmp_path, [5])[5]
    assert w.W_dec.shape == (H, F) and torch.equal(w.W_dec, W_dec.T)
    assert w.threshold is None and (w.d_features, w.d_hidden) == (F, H)
    assert load_transcoders(tmp_path, [5], load_decoder=False)[5].W_dec is None
    assert load_transcoders(tmp_path, [5], dtype=torch.float64)[5].W_enc.dtype == torch.float64


def test_circuit_tracer_clt_files(tmp_path: Path) -> None:
    L = 3
    files = {}
    for i in range(L):
        files[i] = {
            f"W_enc_{i}": torch.randn(F, H),
            f"b_enc_{i}": torch.randn(F),
            f"b_dec_{i}": torch.randn(H),
            f"threshold_{i}": torch.rand(F),
        }
        save_file(files[i], str(tmp_path / f"W_enc_{i}.safetensors"))
    W_dec_0 = torch.randn(F, L, H)
    save_file({"W_dec_0": W_dec_0}, str(tmp_path / "W_dec_0.safetensors"))
    loaded = load_transcoders(tmp_path, [0, 2])
    assert torch.equal(loaded[0].W_enc, files[0]["W_enc_0"])
    assert torch.equal(loaded[2].threshold, files[2]["threshold_2"])
    assert torch.equal(loaded[0].W_dec_cross, W_dec_0)
    assert torch.equal(loaded[0].W_dec, W_dec_0[:, 0, :].T)
    assert loaded[2].W_dec is None and loaded[2].W_dec_cross is None


@pytest.mark.parametrize("activation_fn", ["jumprelu", "relu"])
def test_save_pretrained_folder_is_raw_space(tmp_path: Path, activation_fn: str) -> None:
    """Per-layer encoding of loaded weights equals the model's own encode on raw inputs."""
    layers = [4, 5, 7]
    model = _clt_model(layers, activation_fn, skip=True)
    model.save_pretrained(tmp_path)
    loaded = load_transcoders(tmp_path, layers, "cpu")
    assert list(loaded) == layers
    x = 3 * torch.randn(2, 5, len(layers), H, generator=torch.Generator().manual_seed(0)) + 1
    with torch.no_grad():
        expected = model.encode(x)
        reconstruction = model.decode(expected, x)
    encoder = SparseCLTEncoder(loaded, top_k=F, activation_threshold=0.0, use_compile=False)
    assert encoder.batched
    features = encoder.encode_all_layers({layer: x[:, :, i] for i, layer in enumerate(layers)})
    for i, layer in enumerate(layers):
        dense = torch.zeros(2, 5, F)
        kept = features[layer]["indices"] >= 0
        dense[kept.nonzero(as_tuple=True)[:2] + (features[layer]["indices"][kept],)] = features[layer]["activations"][
            kept
        ]
        torch.testing.assert_close(dense, expected[:, :, i], atol=1e-5, rtol=1e-5)
    acts = expected.detach()
    for target, layer in enumerate(layers):
        out = loaded[layer].b_dec + x[:, :, target] @ loaded[layer].W_skip.T
        for source in range(target + 1):
            out = out + acts[:, :, source] @ loaded[layers[source]].W_dec_cross[:, target - source]
        torch.testing.assert_close(out, reconstruction[:, :, target], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(loaded[5].W_dec, loaded[5].W_dec_cross[:, 0].T)


def test_save_pretrained_encoder_weights_are_not_copied(tmp_path: Path) -> None:
    _clt_model([0, 1, 2]).save_pretrained(tmp_path)
    loaded = load_transcoders(tmp_path)
    encoder = SparseCLTEncoder(loaded, use_compile=False)
    stacked_W_enc = encoder._stacked[0]
    assert stacked_W_enc.untyped_storage().data_ptr() == loaded[0].W_enc.untyped_storage().data_ptr()


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="transcoder directory not found"):
        load_transcoders(tmp_path / "nope", [0])


def test_directory_without_transcoders(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(TranscoderLoadError, match="holds no transcoder"):
        load_transcoders(tmp_path, [0])


@pytest.mark.parametrize("kind", ["per_layer", "pretrained"])
def test_missing_layer_names_available(tmp_path: Path, kind: str) -> None:
    if kind == "per_layer":
        save_transcoders(random_transcoders([3, 4], H, F), tmp_path)
    else:
        _clt_model([3, 4]).save_pretrained(tmp_path)
    with pytest.raises(TranscoderLoadError, match=r"layer\(s\) \[9\].*available layers: \[3, 4\]"):
        load_transcoders(tmp_path, [3, 9])


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_per_layer_file(tmp_path: Path, damage: str) -> None:
    save_transcoders(random_transcoders([0, 1], H, F), tmp_path)
    path = tmp_path / "layer_1.safetensors"
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"not a file" * 3, "empty": b""}[damage])
    assert sorted(load_transcoders(tmp_path, [0])) == [0]
    with pytest.raises(TranscoderLoadError, match="layer_1.safetensors is not a readable safetensors"):
        load_transcoders(tmp_path, [0, 1])


def test_truncated_pretrained_file(tmp_path: Path) -> None:
    _clt_model([0, 1]).save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(TranscoderLoadError, match="corrupt or truncated"):
        load_transcoders(tmp_path)


def test_missing_tensor_names_contents(tmp_path: Path) -> None:
    save_file({"W_enc": torch.randn(F, H), "b_enc": torch.randn(F)}, str(tmp_path / "layer_0.safetensors"))
    with pytest.raises(TranscoderLoadError, match=r"no tensor 'W_dec'.*\['W_enc', 'b_enc'\]"):
        load_transcoders(tmp_path, [0])


def test_shape_mismatch_inside_a_file(tmp_path: Path) -> None:
    tensors = {
        "W_enc": torch.randn(F, H),
        "W_dec": torch.randn(F, H),
        "b_enc": torch.randn(F + 1),
        "b_dec": torch.randn(H),
    }
    save_file(tensors, str(tmp_path / "layer_0.safetensors"))
    with pytest.raises(TranscoderLoadError, match=r"layer_0.safetensors: b_enc has shape \[25\]"):
        load_transcoders(tmp_path, [0])


def test_shape_mismatch_between_layers(tmp_path: Path) -> None:
    save_transcoders(random_transcoders([0], H, F) | random_transcoders([1], H + 2, F), tmp_path)
    with pytest.raises(TranscoderLoadError, match="disagree on the hidden size"):
        load_transcoders(tmp_path)


def test_weights_validation() -> None:
    W_enc = torch.randn(F, H)
    with pytest.raises(ValueError, match="W_dec has shape"):
        TranscoderWeights(W_enc, torch.zeros(F), torch.randn(F, H))
    with pytest.raises(ValueError, match="W_enc must have 2 dimensions"):
        TranscoderWeights(torch.randn(F), torch.zeros(F))
    with pytest.raises(ValueError, match="floating-point"):
        TranscoderWeights(W_enc.long(), torch.zeros(F))
    with pytest.raises(ValueError, match="W_dec_cross has shape"):
        TranscoderWeights(W_enc, torch.zeros(F), W_dec_cross=torch.randn(F, 2, H + 1))
    with pytest.raises(ValueError, match="threshold must be a torch.Tensor"):
        TranscoderWeights(W_enc, torch.zeros(F), threshold=[0.0] * F)
    w = TranscoderWeights(W_enc, torch.zeros(F)).to(dtype=torch.float64)
    assert w.W_enc.dtype == torch.float64 and w.W_dec is None
