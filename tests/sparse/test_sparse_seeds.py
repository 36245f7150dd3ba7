"""The README examples of `sparse-clt` and `sparse-transcoder`, run as written against `clt.sparse`.

Substitutions only: `from clt.sparse import ...`, device 'cpu', hidden size HIDDEN instead of 5120,
`transcoder_dir` a folder made here (circuit-tracer per-layer files, or a
`CrossLayerTranscoder.save_pretrained` folder), and in the interpretability use case layer 40 and
one layer's tensor where the README's stand-alone snippet uses layer 25 and an unnamed tensor.
"""

from __future__ import annotations

import pytest
import torch

import clt.sparse
from clt.sparse import load_transcoders, random_transcoders, save_transcoders

HIDDEN, FEATURES, LAYERS = 64, 256, [40, 41, 42, 43, 44]


@pytest.fixture(scope="module", params=["circuit-tracer", "save_pretrained"])
def transcoder_dir(request, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp(request.param)
    if request.param == "circuit-tracer":
        save_transcoders(random_transcoders(LAYERS, HIDDEN, FEATURES, jumprelu=True, seed=0), path)
    else:
        from clt.config.transcoder import CLTConfig
        from clt.models.transcoder import CrossLayerTranscoder

        model = CrossLayerTranscoder(CLTConfig(FEATURES, len(LAYERS), HIDDEN, layers=LAYERS))
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            model.b_enc.copy_(0.5 * torch.randn(model.b_enc.shape, generator=gen))
        L = len(LAYERS)
        model.set_normalization(
            torch.randn(L, HIDDEN, generator=gen),
            torch.rand(L, HIDDEN, generator=gen) + 0.5,
            torch.zeros(L, HIDDEN),
            torch.ones(L, HIDDEN),
        )
        model.save_pretrained(path)
    return str(path)


@pytest.fixture(params=["SparseCLTEncoder", "SparseTranscoderEncoder"])
def Encoder(request) -> type:
    """Seed 000 (`sparse_clt`) uses SparseCLTEncoder, seed 001 (`sparse_transcoder`) the other."""
    return getattr(clt.sparse, request.param)


def test_quick_start_and_advanced_usage(transcoder_dir: str, Encoder: type, capsys) -> None:
    # Load your trained CLT weights
    transcoders = load_transcoders(
        transcoder_dir=transcoder_dir,
        layers=[40, 41, 42, 43, 44],  # Which layers have CLTs
        device="cpu",
    )

    # Create encoder
    encoder = Encoder(
        transcoders=transcoders,
        top_k=50,  # Top 50 features per position
        activation_threshold=1.0,  # Minimum activation value
        chunk_size=512,  # Process 512 tokens at a time
    )

    # Extract CLT features from hidden states
    hidden_states = {
        40: torch.randn(1, 256, HIDDEN, device="cpu"),  # [batch, seq, hidden]
        41: torch.randn(1, 256, HIDDEN, device="cpu"),
        # ... more layers
    }

    # Get sparse features (batched across all layers!)
    features = encoder.encode_all_layers(hidden_states)

    # Access results
    for layer_idx, layer_features in features.items():
        print(f"Layer {layer_idx}:")
        print(f"  Activations: {layer_features['activations'].shape}")  # [B, T, top_k]
        print(f"  Indices: {layer_features['indices'].shape}")  # [B, T, top_k]
        print(f"  Sparsity: {layer_features['sparsity'].mean():.3f}")  # Fraction active

    # Automatically chunks long sequences
    encoder = Encoder(
        transcoders=transcoders,
        chunk_size=512,  # Process 512 tokens at a time
    )

    # Works with sequences of any length!
    long_hidden = torch.randn(1, 2048, HIDDEN, device="cpu")  # 2048 tokens
    features = encoder.encode_layer(40, long_hidden)
    long_features = features

    # Only keep features above threshold
    encoder = Encoder(
        transcoders=transcoders,
        activation_threshold=2.0,  # Higher threshold = sparser
        top_k=100,
    )

    # Get features formatted for attribution analysis
    graph_features = encoder.extract_attribution_features(
        hidden_states=hidden_states,
        top_k_global=100,  # Top 100 features across all positions
    )

    # Returns list of dicts ready for graph generation
    for feature in graph_features[:5]:
        print(f"Layer {feature['layer']}, Feature {feature['feature']}: {feature['activation']:.2f}")

    out = capsys.readouterr().out
    assert "Layer 40:\n  Activations: torch.Size([1, 256, 50])\n  Indices: torch.Size([1, 256, 50])" in out
    assert "Layer 41:" in out and "Sparsity: 0." in out
    assert long_features["activations"].shape == (1, 2048, 20)
    assert long_features["sparsity"].shape == (1, 2048)
    assert len(graph_features) == 100 and graph_features[0]["activation"] >= 2.0
    assert out.count("Feature ") == 5


def test_use_cases(transcoder_dir: str, Encoder: type, capsys) -> None:
    transcoders = load_transcoders(transcoder_dir=transcoder_dir, layers=LAYERS, device="cpu")
    encoder = Encoder(transcoders=transcoders, top_k=50, activation_threshold=1.0, chunk_size=512)
    all_layers = {layer: 3 * torch.randn(1, 32, HIDDEN) for layer in LAYERS}
    hidden_states = all_layers[40]

    features = encoder.encode_layer(layer_idx=40, hidden=hidden_states)
    top_features = features["indices"][0, -1, :10]  # Top 10 at last position
    print(f"Most active CLT features: {top_features}")

    graph_features = encoder.extract_attribution_features(hidden_states=all_layers, top_k_global=100)
    # Use in attribution graph generation

    hidden_states = all_layers
    # Find strongly activated features
    features = encoder.encode_all_layers(hidden_states)
    for layer, data in features.items():
        strong_features = data["indices"][data["activations"] > 5.0]
        print(f"Layer {layer}: {len(strong_features)} strong CLT features")

    out = capsys.readouterr().out
    assert "Most active CLT features: tensor([" in out
    assert top_features.shape == (10,)
    assert len(graph_features) == 100
    for layer in LAYERS:
        assert f"Layer {layer}: " in out
        data = features[layer]
        assert (data["indices"][data["activations"] > 5.0] >= 0).all()
