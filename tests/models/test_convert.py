"""TopK/BatchTopK → JumpReLU conversion: matched L0 on held-out tokens, close reconstructions, errors."""

from __future__ import annotations

import pytest
import torch

from clt.attribution import attribute, graph_scores
from clt.config.training import TrainingConfig
from clt.config.transcoder import CLTConfig
from clt.models.convert import convert_to_jumprelu, source_features
from clt.models.export import export_circuit_tracer, load_circuit_tracer
from clt.models.transcoder import CrossLayerTranscoder
from clt.nnsight.extractors import ActivationExtractor
from clt.store import ActivationStore
from clt.training.trainer import CLTTrainer

CALIBRATION, BATCH = 2048, 256


@pytest.fixture(scope="module")
def trained(tiny_llama):
    """(model, tokenizer, store, BatchTopK CLT trained briefly on the tiny Llama)."""
    model, tokenizer = tiny_llama
    store = ActivationExtractor("tiny-llama", model=model, tokenizer=tokenizer, context_length=32).extract(
        max_tokens=4096, store_dtype="float32", progress=False
    )
    cfg = CLTConfig(
        num_features=64, num_layers=store.num_layers, d_model=store.d_model, activation_fn="batchtopk", topk=6
    )
    training = TrainingConfig(learning_rate=3e-3, batch_size=BATCH, training_steps=150, lr_warmup_steps=10)
    clt = CLTTrainer(cfg, training, store).train(progress=False).eval()
    return model, tokenizer, store, clt


def held_out(store: ActivationStore) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = store.tensors()
    return x[CALIBRATION:], y[CALIBRATION:]


def fvu(reconstruction: torch.Tensor, y: torch.Tensor) -> float:
    return float((reconstruction.detach() - y).square().sum() / (y - y.mean(0)).square().sum())


def test_jumprelu_matches_the_per_layer_l0_on_held_out_tokens(trained):
    _, _, store, clt = trained
    jump = convert_to_jumprelu(clt, store, calibration_tokens=CALIBRATION, batch_size=BATCH)
    assert jump.cfg.activation_fn == "jumprelu" and jump.cfg.num_features == clt.cfg.num_features
    assert torch.equal(jump.W_enc, clt.W_enc) and torch.equal(jump.W_dec[1], clt.W_dec[1])
    x, y = held_out(store)
    source = source_features(clt, clt.preactivations(x), BATCH)
    converted = jump.eval().encode(x)
    l0_source = (source > 0).float().sum(-1).mean(0)
    l0_converted = (converted > 0).float().sum(-1).mean(0)
    assert l0_source.tolist() == pytest.approx([6.0] * store.num_layers)  # BatchTopK: k per layer
    # stated tolerance: per-layer L0 within 10% of the source's on tokens not used for calibration
    assert torch.allclose(l0_converted, l0_source, rtol=0.10), (l0_converted, l0_source)
    fvu_source = fvu(clt.decode(source), y)
    fvu_converted = fvu(jump.decode(converted), y)
    assert fvu_converted < fvu_source + 0.05, (fvu_converted, fvu_source)
    # the same features mostly: most active entries agree
    agree = ((source > 0) & (converted > 0)).sum() / (source > 0).sum()
    assert agree > 0.8


def test_converted_transcoder_attributes_and_exports(trained, tmp_path):
    model, tokenizer, store, clt = trained
    jump = convert_to_jumprelu(clt, store, calibration_tokens=CALIBRATION, batch_size=BATCH)
    graph = attribute("The list is sorted", model, jump, tokenizer=tokenizer, progress=False)
    replacement, completeness = graph_scores(graph)
    assert graph.n_features > 0 and 0 <= replacement <= 1 and 0 <= completeness <= 1
    folder = export_circuit_tracer(jump, tmp_path / "ct")
    loaded = load_circuit_tracer(folder)
    assert torch.allclose(loaded.threshold, jump.fold_normalization().threshold, rtol=1e-5)


def test_bad_inputs_are_rejected(trained):
    _, _, store, clt = trained
    jump = convert_to_jumprelu(clt, store, calibration_tokens=CALIBRATION, batch_size=BATCH)
    with pytest.raises(ValueError, match="already"):
        convert_to_jumprelu(jump, store)
    wide = CrossLayerTranscoder(clt.cfg.replace(d_model=store.d_model * 2))
    with pytest.raises(ValueError, match="does not match the transcoder"):
        convert_to_jumprelu(wide, store)
    other = CrossLayerTranscoder(clt.cfg.replace(model_name="another-model"))
    with pytest.raises(ValueError, match="same model"):
        convert_to_jumprelu(other, store)
