"""CrossLayerTranscoder: planted dictionaries, decode oracle, folding, I/O, config and shapes."""

from __future__ import annotations

import json

import pytest
import torch
from planted import max_cosines, planted_dictionary, train_planted

from clt.config.base import ConfigError
from clt.config.transcoder import CLTConfig
from clt.models import CheckpointError, CLTOutput, CrossLayerTranscoder
from clt.models.perturb import randomize_parameters
from clt.training.losses import compute_losses, fvu

L, D = 3, 16
ACTS = ("relu", "jumprelu", "topk", "batchtopk")


def _cfg(**kw) -> CLTConfig:
    return CLTConfig(**{"num_features": 8, "num_layers": L, "d_model": D, **kw})


def _model(seed: int = 0, **kw) -> CrossLayerTranscoder:
    """A random transcoder (training mode) with non-trivial biases, thresholds and standardisation statistics."""
    return randomize_parameters(CrossLayerTranscoder(_cfg(seed=seed, **kw)), seed + 100).train()


# ---------------------------------------------------------------- planted dictionary


@pytest.mark.parametrize("cross", [True, False], ids=["clt", "plt"])
@pytest.mark.parametrize("act", ACTS)
def test_planted_dictionary_is_recovered(act, cross, one_thread):
    steps, batch = 1000, 256
    true_dec, sample = planted_dictionary(L, D, cross=cross)
    x, y = sample(64_000)
    cfg = _cfg(num_features=48, activation_fn=act, cross_layer=cross, topk=1 if act == "batchtopk" else 3)
    model = train_planted(
        CrossLayerTranscoder(cfg), x, y, steps=steps, batch=batch, sparsity=1.0 if act in ("relu", "jumprelu") else 0.0
    )
    x_test, y_test = sample(4096)
    with torch.no_grad():
        per_layer_fvu = fvu(model(x_test).reconstruction, y_test)
        mean_max_cos = max_cosines(true_dec, model.fold_normalization().W_dec).mean().item()
    kind = "clt" if cross else "plt"
    assert mean_max_cos >= 0.9, f"{act}/{kind}: mean max cosine {mean_max_cos:.3f}"
    assert per_layer_fvu.max().item() <= 0.05, f"FVU per layer {per_layer_fvu.tolist()}"


# ---------------------------------------------------------------- structure and decode oracle


@pytest.mark.parametrize("cross", [True, False])
def test_parameter_shapes(cross):
    model = CrossLayerTranscoder(_cfg(cross_layer=cross, skip_connection=True))
    assert model.W_enc.shape == (L, 8, D) and model.b_enc.shape == (L, 8)
    expected = [(8, L - l if cross else 1, D) for l in range(L)]
    assert [tuple(w.shape) for w in model.W_dec] == expected
    assert model.b_dec.shape == (L, D) and model.log_threshold.shape == (L, 8)
    assert model.W_skip.shape == (L, D, D)
    for name in ("input_mean", "input_std", "output_mean", "output_std"):
        assert getattr(model, name).shape == (L, D) and getattr(model, name).dtype == torch.float32
    assert torch.allclose(model.threshold, torch.full((L, 8), 0.03))
    assert not hasattr(CrossLayerTranscoder(_cfg(activation_fn="relu")), "log_threshold")


@pytest.mark.parametrize("cross", [True, False])
def test_decode_matches_explicit_sum_over_source_layers(cross):
    model = _model(cross_layer=cross, skip_connection=True)
    g = torch.Generator().manual_seed(3)
    a, x_std = torch.rand(5, L, 8, generator=g), torch.randn(5, L, D, generator=g)
    expected = model.b_dec.detach().expand(5, L, D).clone()
    for target in range(L):
        for source in range(target + 1) if cross else [target]:
            expected[:, target] += a[:, source] @ model.W_dec[source][:, target - source].detach()
        expected[:, target] += x_std[:, target] @ model.W_skip[target].detach().T
    assert torch.allclose(model.decode_normalized(a, x_std), expected, atol=1e-5)
    norms = torch.stack([w.detach().flatten(1).norm(dim=1) for w in model.W_dec])
    assert torch.allclose(model.decoder_norms(), norms)


@pytest.mark.parametrize("cross", [True, False])
def test_decode_gradients_match_autograd_of_explicit_sum(cross):
    model = _model(cross_layer=cross)
    g = torch.Generator().manual_seed(4)
    a = torch.rand(2, 3, L, 8, generator=g, requires_grad=True)
    upstream = torch.randn(2, 3, L, D, generator=g)
    (model.decode_normalized(a) * upstream).sum().backward()
    fast = [a.grad.clone()] + [w.grad.clone() for w in model.W_dec]
    a.grad = None
    model.zero_grad()
    expected = torch.zeros(2, 3, L, D)
    for source, w in enumerate(model.W_dec):
        for j in range(w.shape[1]):
            expected[..., source + j, :] += a[..., source, :] @ w[:, j]
    (expected * upstream).sum().backward()
    slow = [a.grad] + [w.grad for w in model.W_dec]
    for got, want in zip(fast, slow, strict=True):
        assert torch.allclose(got, want, atol=1e-5)


def _sparse_and_dense(seed: int = 0, **kw) -> tuple[CrossLayerTranscoder, CrossLayerTranscoder]:
    """The same random transcoder decoding sparsely and densely."""
    sparse = _model(seed=seed, sparse_decode="on", **kw)
    dense = CrossLayerTranscoder(sparse.cfg.replace(sparse_decode="off"))
    dense.load_state_dict(sparse.state_dict())
    return sparse, dense


def _grads(model: CrossLayerTranscoder) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("cross", [True, False], ids=["clt", "plt"])
@pytest.mark.parametrize("act", ["topk", "batchtopk"])
def test_sparse_decode_matches_dense_forward_and_gradients(act, cross):
    """Gathering the active decoder rows gives the dense sum, and the same gradients for W_dec,
    b_dec, W_skip, the feature values (through the activation: W_enc, b_enc) and the inputs."""
    sparse, dense = _sparse_and_dense(activation_fn=act, topk=3, cross_layer=cross, skip_connection=True)
    assert sparse.uses_sparse_decode() and not dense.uses_sparse_decode()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 5, L, D, generator=g)
    upstream = torch.randn(2, 5, L, D, generator=g)
    feature_weight = torch.randn(2, 5, L, 8, generator=g)  # a loss on the features too
    results = []
    for model in (sparse, dense):
        x_std = model.normalize_inputs(x).requires_grad_()
        out = model.forward_normalized(x_std)
        ((out.reconstruction * upstream).sum() + (out.features * feature_weight).sum()).backward()
        results.append((out, x_std.grad, _grads(model)))
    (out_s, x_grad_s, grads_s), (out_d, x_grad_d, grads_d) = results
    assert torch.equal(out_s.features, out_d.features)
    assert torch.equal(out_s.preactivations, out_d.preactivations)
    torch.testing.assert_close(out_s.reconstruction, out_d.reconstruction, atol=1e-5, rtol=1e-5)
    active = out_d.features != 0
    assert 0 < active.sum() < active.numel()
    torch.testing.assert_close(x_grad_s, x_grad_d, atol=1e-5, rtol=1e-5)
    assert grads_s.keys() == grads_d.keys() >= {"W_enc", "b_enc", "b_dec", "W_skip", "W_dec.0", f"W_dec.{L - 1}"}
    for name in grads_d:
        torch.testing.assert_close(grads_s[name], grads_d[name], atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("scope", ["layer", "all"])
def test_sparse_batchtopk_selects_and_updates_the_threshold_like_dense(scope):
    sparse, dense = _sparse_and_dense(activation_fn="batchtopk", topk=2, batchtopk_scope=scope)
    g = torch.Generator().manual_seed(10)
    for _ in range(3):
        x = torch.randn(7, L, D, generator=g)
        out_s, out_d = sparse(x), dense(x)
        assert torch.equal(out_s.features, out_d.features)
        torch.testing.assert_close(out_s.reconstruction, out_d.reconstruction, atol=1e-5, rtol=1e-5)
        assert torch.equal(sparse.batchtopk.threshold, dense.batchtopk.threshold)
    assert (sparse.batchtopk.threshold > 0).all()


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_sparse_features_output_equals_the_dense_one(activation):
    """forward_normalized(dense_features=False): the same entries as a sparse COO tensor, the
    same reconstruction and gradients, and fire counts equal to the nonzero count."""
    model, _ = _sparse_and_dense(activation_fn=activation, topk=2)
    x = torch.randn(9, L, D, generator=torch.Generator().manual_seed(11))
    outs, grads = [], []
    for dense_features in (True, False):
        model.zero_grad()
        out = model.forward_normalized(x, dense_features=dense_features)
        out.reconstruction.square().sum().backward()
        outs.append(out)
        grads.append(_grads(model))
    dense, sparse = outs
    assert sparse.features.is_sparse and not dense.features.is_sparse
    assert torch.equal(sparse.features.to_dense(), dense.features)
    assert torch.equal(sparse.reconstruction, dense.reconstruction)
    assert torch.equal(sparse.fire_counts, dense.fire_counts)
    assert torch.equal(dense.fire_counts, (dense.features != 0).sum(0))
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


@pytest.mark.parametrize("cross", [True, False], ids=["clt", "plt"])
def test_sparse_decode_normalized_gradient_of_feature_values(cross):
    """decode_normalized on given features: same output, same gradients for W_dec and for the
    values of the active features (0 at inactive ones, which ReLU/TopK never pass on)."""
    sparse, dense = _sparse_and_dense(activation_fn="topk", topk=2, cross_layer=cross)
    g = torch.Generator().manual_seed(9)
    pre = torch.randn(4, 3, L, 8, generator=g) - 0.5
    upstream = torch.randn(4, 3, L, D, generator=g)
    results = []
    for model in (sparse, dense):
        leaf = pre.clone().requires_grad_()
        features = torch.relu(leaf)  # not a leaf: the sparse path is used
        features.retain_grad()
        out = model.decode_normalized(features)
        (out * upstream).sum().backward()
        results.append((out, features.grad, leaf.grad, _grads(model)))
    (out_s, feat_s, leaf_s, grads_s), (out_d, feat_d, leaf_d, grads_d) = results
    torch.testing.assert_close(out_s, out_d, atol=1e-5, rtol=1e-5)
    active = pre > 0
    torch.testing.assert_close(feat_s[active], feat_d[active], atol=1e-5, rtol=1e-5)
    assert not feat_s[~active].any(), "inactive features get no decoder gradient"
    torch.testing.assert_close(leaf_s, leaf_d, atol=1e-5, rtol=1e-5)
    assert grads_s.keys() == grads_d.keys() >= {"b_dec", "W_dec.0"}
    for name in grads_d:
        torch.testing.assert_close(grads_s[name], grads_d[name], atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("features", [8, 64], ids=["dense-z-grad", "sparse-z-grad"])
@pytest.mark.parametrize("cross", [True, False], ids=["clt", "plt"])
def test_sparse_decode_matches_dense_in_the_losses(cross, features):
    """compute_losses (reconstruction, sparsity, auxiliary top-k on dead features): same terms
    and gradients on both paths (with F=64 the gradient of z stays below 1/8 nonzero)."""
    sparse, dense = _sparse_and_dense(activation_fn="topk", topk=2, cross_layer=cross, num_features=features)
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(16, L, D, generator=g), torch.randn(16, L, D, generator=g)
    dead = torch.rand(L, features, generator=g) < 0.5
    results = []
    for model in (sparse, dense):
        terms, _ = compute_losses(model, x, y, sparsity_coef=0.1, dead_mask=dead, k_aux=3)
        terms.total.backward()
        results.append((terms, _grads(model)))
    (terms_s, grads_s), (terms_d, grads_d) = results
    assert terms_d.auxiliary > 0
    for a, b in zip(terms_s, terms_d):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for name in grads_d:
        torch.testing.assert_close(grads_s[name], grads_d[name], atol=1e-5, rtol=1e-5, msg=name)


def test_sparse_decode_handles_any_count_of_active_features():
    """Rows with no active feature, many active features (BatchTopK at eval), an empty batch."""
    sparse, dense = _sparse_and_dense(activation_fn="batchtopk", topk=2)
    g = torch.Generator().manual_seed(7)
    a = torch.rand(6, L, 8, generator=g) * (torch.rand(6, L, 8, generator=g) < 0.4)
    a[0] = 0
    a[1, 2] = torch.rand(8, generator=g) + 0.1
    a[:, 1] = 0
    for batch in (a, a[:0]):
        torch.testing.assert_close(
            sparse.decode_normalized(batch), dense.decode_normalized(batch), atol=1e-5, rtol=1e-5
        )
    leaf = a.clone().requires_grad_()
    assert not sparse.uses_sparse_decode(leaf), "a leaf asking for its gradient decodes densely"
    sparse.decode_normalized(leaf).sum().backward()
    assert leaf.grad[~(a != 0)].abs().sum() > 0


def test_sparse_decode_under_bf16_autocast():
    """Under autocast the sparse path decodes in float32 and trains like the bf16 dense path."""
    sparse, dense = _sparse_and_dense(activation_fn="topk", topk=2)
    g = torch.Generator().manual_seed(8)
    x, y = torch.randn(32, L, D, generator=g), torch.randn(32, L, D, generator=g)
    results = []
    for model in (sparse, dense):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            x_std, y_std = model.normalize_inputs(x), model.normalize_outputs(y)
            terms, out = compute_losses(model, x_std, y_std)
        terms.total.backward()
        results.append((out.reconstruction, _grads(model)))
    (rec_s, grads_s), (rec_d, grads_d) = results
    assert rec_s.dtype == torch.float32
    torch.testing.assert_close(rec_s, rec_d.float(), atol=0.05, rtol=0.05)
    for name in grads_d:
        assert grads_s[name].dtype == torch.float32
        torch.testing.assert_close(grads_s[name], grads_d[name], atol=0.05, rtol=0.05, msg=name)


def test_sparse_decode_choice():
    auto = {act: CrossLayerTranscoder(_cfg(num_features=64, activation_fn=act, topk=8)) for act in ACTS}
    assert [auto[act].uses_sparse_decode() for act in ACTS] == [False, False, True, True]
    assert not CrossLayerTranscoder(_cfg(num_features=64, activation_fn="topk", topk=9)).uses_sparse_decode(), (
        "auto: only when F/k >= 8"
    )
    assert not CrossLayerTranscoder(
        _cfg(num_features=64, activation_fn="topk", topk=8, sparse_decode="off")
    ).uses_sparse_decode()
    g = torch.Generator().manual_seed(11)
    for density, sparse in ((0.5, False), (0.05, True)):  # 'auto' falls back above 1/8 nonzero
        pre = torch.randn(32, L, 64, generator=g)
        leaf = torch.relu(pre - torch.quantile(pre, 1 - density)).requires_grad_()
        features = leaf * 1.0  # not a leaf: eligible for the sparse path
        features.retain_grad()
        auto["topk"].decode_normalized(features).sum().backward()
        assert bool(features.grad[features == 0].any()) != sparse, density
    with pytest.raises(ConfigError, match="sparse_decode='on' needs activation_fn topk"):
        _cfg(activation_fn="jumprelu", sparse_decode="on")
    with pytest.raises(ConfigError, match="sparse_decode 'yes'"):
        _cfg(sparse_decode="yes")


def test_forward_is_standardised_forward_mapped_to_raw_space():
    model = _model(skip_connection=True)
    x = torch.randn(2, 4, L, D)
    out = model(x)
    assert isinstance(out, CLTOutput)
    assert out.features.shape == out.preactivations.shape == (2, 4, L, 8)
    assert out.reconstruction.shape == (2, 4, L, D)
    x_std = (x - model.input_mean) / model.input_std
    norm_out = model.forward_normalized(x_std)
    raw = norm_out.reconstruction * model.output_std + model.output_mean
    assert torch.allclose(out.reconstruction, raw, atol=1e-5)
    assert torch.allclose(model.decode(out.features, x), out.reconstruction, atol=1e-5)
    assert torch.allclose(model.encode(x), out.features)


def test_initialisation_is_trainable():
    model = CrossLayerTranscoder(_cfg(num_features=64, activation_fn="jumprelu"))
    x = torch.randn(2048, L, D, generator=torch.Generator().manual_seed(0))
    out = model(x)
    active = (out.features > 0).float().mean().item()
    assert 0.2 < active < 0.8, f"initially active fraction {active}"
    assert out.reconstruction.var().item() < 0.1, "initial reconstructions should be small"
    other = CrossLayerTranscoder(_cfg(num_features=64, seed=1))
    assert not torch.equal(model.W_enc, other.W_enc)
    assert torch.equal(model.W_enc, CrossLayerTranscoder(_cfg(num_features=64)).W_enc)


def test_dtype_from_config():
    model = CrossLayerTranscoder(_cfg(dtype="bfloat16"))
    assert model.W_enc.dtype == torch.bfloat16 and model.input_mean.dtype == torch.float32
    assert model(torch.randn(3, L, D)).reconstruction.dtype == torch.bfloat16


# ---------------------------------------------------------------- folding


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("cross", [True, False])
@pytest.mark.parametrize("act", ACTS)
def test_fold_normalization_keeps_raw_outputs(act, cross, skip):
    model = _model(activation_fn=act, cross_layer=cross, skip_connection=skip, topk=3).eval()
    folded = model.fold_normalization()
    for name in ("input_mean", "output_mean"):
        assert torch.equal(getattr(folded, name), torch.zeros(L, D))
    for name in ("input_std", "output_std"):
        assert torch.equal(getattr(folded, name), torch.ones(L, D))
    x = torch.randn(64, L, D, generator=torch.Generator().manual_seed(0)) * 2 + 1
    before, after = model(x), folded(x)
    for a, b in zip(before, after):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    if act == "jumprelu":
        assert torch.equal(folded.threshold, model.threshold)
    assert not torch.equal(folded.W_enc, model.W_enc), "the copy must carry the folded weights"


# ---------------------------------------------------------------- saving and loading


def _assert_same(a: CrossLayerTranscoder, b: CrossLayerTranscoder) -> None:
    assert a.cfg == b.cfg
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    x = torch.randn(16, L, D)
    a.eval()
    b.eval()
    for u, v in zip(a(x), b(x)):
        assert torch.equal(u, v)


@pytest.mark.parametrize("act", ACTS)
def test_save_pretrained_round_trip(tmp_path, act):
    model = _model(activation_fn=act, topk=3, skip_connection=True, model_name="tiny", layers=[1, 3, 4])
    if act == "batchtopk":
        model.train()(torch.randn(32, L, D))
        assert model.batchtopk.threshold.abs().sum() > 0
    model.save_pretrained(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["activation_fn"] == act
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()
    _assert_same(model, CrossLayerTranscoder.from_pretrained(tmp_path / "ckpt", device="cpu"))


@pytest.mark.parametrize("name", ["trained_clt.pt", "clt.safetensors"])
def test_save_load_single_file(tmp_path, name):
    model = _model(cross_layer=False)
    path = model.save(tmp_path / name)
    assert path.is_file() and path.read_bytes()[:1] != b"\x80", "must not be a pickle"
    _assert_same(model, CrossLayerTranscoder.load(path))
    _assert_same(model, CrossLayerTranscoder.from_pretrained(path))
    model.save(tmp_path / "folder")
    _assert_same(model, CrossLayerTranscoder.load(tmp_path / "folder"))


def test_corrupt_truncated_and_missing_files(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path / "ok")
    weights = tmp_path / "ok" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        CrossLayerTranscoder.from_pretrained(tmp_path / "ok")
    weights.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        CrossLayerTranscoder.from_pretrained(tmp_path / "ok")
    single = tmp_path / "model.pt"
    single.write_bytes(data[:100])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        CrossLayerTranscoder.load(single)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        CrossLayerTranscoder.from_pretrained(tmp_path / "ok")
    with pytest.raises(FileNotFoundError, match="no transcoder"):
        CrossLayerTranscoder.from_pretrained(tmp_path / "nowhere")


def test_config_and_weights_mismatch(tmp_path):
    _model().save_pretrained(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    (tmp_path / "a" / "config.json").write_text(json.dumps({**config, "num_features": 9}))
    with pytest.raises(CheckpointError, match="W_enc.*shape"):
        CrossLayerTranscoder.from_pretrained(tmp_path / "a")
    (tmp_path / "a" / "config.json").write_text(json.dumps({**config, "skip_connection": True}))
    with pytest.raises(CheckpointError, match="missing \\['W_skip'\\]"):
        CrossLayerTranscoder.from_pretrained(tmp_path / "a")


# ---------------------------------------------------------------- config and shapes


def test_config_errors():
    with pytest.raises(ConfigError, match="Did you mean 'num_features'"):
        CLTConfig.from_dict({"num_feature": 3, "num_layers": 2, "d_model": 4})
    with pytest.raises(ConfigError, match="activation_fn 'gelu'"):
        _cfg(activation_fn="gelu")
    with pytest.raises(ConfigError, match="layers has 2 entries but num_layers is 3"):
        _cfg(layers=[0, 1])
    with pytest.raises(ConfigError, match="increasing"):
        _cfg(layers=[2, 1, 0])
    with pytest.raises(ConfigError, match="topk"):
        _cfg(topk=9, activation_fn="topk")
    with pytest.raises(ConfigError, match="batchtopk_scope"):
        _cfg(batchtopk_scope="token")
    cfg = _cfg()
    assert cfg.layers == [0, 1, 2]
    assert CLTConfig.from_dict(cfg.to_dict()) == cfg


def test_wrong_input_shapes_raise():
    model = _model(skip_connection=True)
    with pytest.raises(ValueError, match=r"\[\.\.\., L=3, d_model=16\].*\[4, 16\]"):
        model(torch.randn(4, D))
    with pytest.raises(ValueError, match=r"\[\.\.\., L=3, d_model=16\]"):
        model(torch.randn(4, L + 1, D))
    with pytest.raises(ValueError, match=r"\[\.\.\., L=3, num_features=8\]"):
        model.decode(torch.randn(4, L, 7), torch.randn(4, L, D))
    with pytest.raises(ValueError, match="skip connection"):
        model.decode(torch.rand(4, L, 8))
    with pytest.raises(ValueError, match="input_std"):
        zeros = torch.zeros(L, D)
        model.set_normalization(zeros, zeros, zeros, torch.ones(L, D))


@pytest.mark.parametrize("act", ["relu", "jumprelu", "topk", "batchtopk"])
def test_encode_layer_equals_that_layer_of_encode(act):
    """One layer's features at 1/L of the cost are the features `encode` gives that layer."""
    torch.manual_seed(0)
    cfg = CLTConfig(num_features=24, num_layers=3, d_model=8, activation_fn=act, topk=4)
    clt = randomize_parameters(CrossLayerTranscoder(cfg), seed=1).eval()
    clt.set_normalization(torch.randn(3, 8), torch.rand(3, 8) + 0.5, torch.zeros(3, 8), torch.ones(3, 8))
    if act == "batchtopk":
        clt.batchtopk.threshold.copy_(torch.tensor([0.1, 0.3, 0.2]))
    x = torch.randn(5, 7, 3, 8)
    full = clt.encode(x)
    for layer in range(3):
        one = clt.encode_layer(x, layer)
        assert one.shape == (5, 7, 24)
        torch.testing.assert_close(one, full[..., layer, :])
    assert (full != 0).any() and (full == 0).any()  # both sides of the threshold are exercised
    with pytest.raises(IndexError, match="out of range"):
        clt.encode_layer(x, 3)


@pytest.mark.parametrize("act", ["relu", "jumprelu", "topk", "batchtopk"])
def test_activate_layer_has_the_values_and_gradients_of_activate(act):
    """The splice's per-layer nonlinearity: `activate` of all layers, read at one, values and
    gradients (w.r.t. the pre-activations and the JumpReLU thresholds) alike."""
    cfg = CLTConfig(num_features=24, num_layers=3, d_model=8, activation_fn=act, topk=4, jumprelu_bandwidth=0.5)
    clt = randomize_parameters(CrossLayerTranscoder(cfg), seed=2).eval()
    if act == "batchtopk":
        clt.batchtopk.threshold.copy_(torch.tensor([0.1, 0.3, 0.2]))
    z = torch.randn(5, 3, 24, generator=torch.Generator().manual_seed(3), requires_grad=True)
    weights = torch.randn(5, 24, generator=torch.Generator().manual_seed(4))
    params = [z, *([clt.log_threshold] if act == "jumprelu" else [])]
    for layer in range(3):
        full = clt.activate(z)[..., layer, :]
        one = clt.activate_layer(z[..., layer, :], layer)
        torch.testing.assert_close(one, full, rtol=0, atol=0)
        assert (one != 0).any() and (one == 0).any()
        expected = torch.autograd.grad((full * weights).sum(), params)
        got = torch.autograd.grad((one * weights).sum(), params)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=0, atol=0)
        if act == "jumprelu":
            assert got[1][layer].abs().sum() > 0  # the threshold's pseudo-gradient is exercised
    if act == "batchtopk":
        with pytest.raises(ValueError, match="eval"):
            clt.train().activate_layer(z[..., 0, :], 0)
