"""Preparation shared by the attribution benchmarks: the model as a transformers folder, random
transcoders standardised with the model's own statistics, prompts from the default corpus."""

from __future__ import annotations

import json
from pathlib import Path

CALIBRATION_TOKENS = 512
"""Tokens of the default corpus used for the transcoders' statistics and thresholds."""


def save_model_folder(model, tokenizer, folder: Path) -> None:
    """Save a (possibly GGUF-de-quantised) causal LM as a folder transformers 4.57 and 5 load."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in model.state_dict().items()}
    config = model.config.to_dict()
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config.pop(key, None)
    config["architectures"] = config.get("architectures") or [type(model).__name__]
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope and rope.get("rope_type", "default") == "default":
        config["rope_theta"] = rope["rope_theta"]  # transformers 4.57 reads rope_theta
    config["torch_dtype"] = config["dtype"] = "float32"
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(folder)
    tok_config = folder / "tokenizer_config.json"
    if tok_config.is_file():  # transformers 5's class name is unknown to 4.57
        data = json.loads(tok_config.read_text())
        if data.get("tokenizer_class") not in (None, "PreTrainedTokenizerFast"):
            data["tokenizer_class"] = "PreTrainedTokenizerFast"
            tok_config.write_text(json.dumps(data, indent=2))
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def prepare_model(name: str, work_dir: Path, prompt_ids: list[int] | None = None):
    """(model, tokenizer, folder): the model loaded from its saved folder (created once)."""
    import torch

    from clt.nnsight.loading import load_model

    folder = work_dir / "models" / name
    if not (folder / "config.json").is_file():
        print(f"saving {name} as a transformers folder in {folder} (once)", flush=True)
        model, tokenizer = load_model(name)
        save_model_folder(model, tokenizer, folder)
        reloaded, _ = load_model(str(folder))
        ids = torch.tensor([[int(tokenizer.bos_token_id or 0), 5, 6, 7, 8]])
        with torch.no_grad():
            diff = float((model(ids).logits - reloaded(ids).logits).abs().max())
        if diff > 1e-4:
            raise RuntimeError(f"the saved folder {folder} gives other logits (max |Δ| {diff})")
        del model, reloaded
    model, tokenizer = load_model(str(folder))
    return model, tokenizer, folder


def build_transcoder(model, tokenizer, kind: str, num_features: int, active_per_token: float, seed: int):
    """A random JumpReLU PLT/CLT over all model layers, standardised with the model's statistics
    on the default corpus, thresholds giving ~active_per_token features per layer and token."""
    import torch

    from clt.attribution import ReplacementModel
    from clt.config.transcoder import CLTConfig
    from clt.data.corpus import default_corpus, encode_prompt
    from clt.models.transcoder import CrossLayerTranscoder
    from clt.nnsight.loading import find_layout

    layout = find_layout(model)
    L, d, F = layout.num_layers, layout.d_model, num_features
    cfg = CLTConfig(
        num_features=F,
        num_layers=L,
        d_model=d,
        activation_fn="jumprelu",
        cross_layer=kind == "clt",
        skip_connection=False,
        seed=seed,
    )
    tc = CrossLayerTranscoder(cfg)
    text = "\n".join(default_corpus()[:20])
    rm = ReplacementModel(model, tc, tokenizer)
    window = min(CALIBRATION_TOKENS, rm.context_length or CALIBRATION_TOKENS)
    bos, *ids = encode_prompt(tokenizer, text)
    xs, ys = [], []
    for start in range(0, CALIBRATION_TOKENS, window - 1):  # windows of BOS + window-1 tokens
        clean = rm.prepare([bos, *ids[start : start + window - 1]], zero_bos=False)
        xs.append(clean.mlp_inputs[1:])  # without the BOS position
        ys.append(clean.mlp_outputs[1:])
    x, y = torch.cat(xs), torch.cat(ys)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        tc.b_enc.copy_(torch.randn(L, F, generator=gen) * 0.3)
        tc.b_dec.copy_(torch.randn(L, d, generator=gen) * 0.1)
        tc.set_normalization(x.mean(0), x.std(0).clamp_min(1e-6), y.mean(0), y.std(0).clamp_min(1e-6))
        z = tc.preactivations(x).float()  # [n, L, F]
        q = min(max(1.0 - active_per_token / F, 0.0), 1.0)
        theta = torch.quantile(z.transpose(0, 1).reshape(L, -1), q, dim=1).clamp_min(1e-3)
        tc.log_threshold.copy_(theta.log()[:, None].expand(L, F))
    return tc.eval()


def corpus_ids(tokenizer, n: int) -> list[int]:
    """The BOS token and the first n − 1 tokens of the default corpus."""
    from clt.data.corpus import default_corpus, encode_prompt

    topics, ids = default_corpus(), []
    for k in range(1, len(topics) + 1):
        ids = encode_prompt(tokenizer, "\n".join(topics[:k]))
        if len(ids) >= n:
            return ids[:n]
    raise ValueError(f"the default corpus has only {len(ids)} tokens; ask for fewer")
