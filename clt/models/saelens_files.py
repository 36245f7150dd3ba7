"""SAELens's on-disk layout: read its SAEs and transcoders as a transcoder, and write ours for it.

SAELens (PyPI ``sae-lens`` 6.x; ``sae_lens/saes/sae.py``: ``SAE.save_model``, ``load_from_disk``,
``process_sae_in``; ``saes/{standard,topk,jumprelu}_sae.py``; ``saes/transcoder.py``;
``loading/pretrained_sae_loaders.py``: ``sae_lens_disk_loader``, ``handle_config_defaulting``)
saves one folder per SAE with

- ``cfg.json``: ``architecture`` (``standard`` = ReLU, ``topk``, ``jumprelu``; transcoders
  ``transcoder``, ``skip_transcoder``, ``jumprelu_transcoder``, ``jumprelu_skip_transcoder``),
  ``d_in``, ``d_sae``, ``d_out`` (transcoders), ``dtype``, ``device``, ``apply_b_dec_to_input``,
  ``normalize_activations``, ``reshape_activations``, ``k`` and ``rescale_acts_by_decoder_norm``
  (TopK) and ``metadata`` (``model_name``, ``hook_name``, ``hook_name_out``, ...);
- ``sae_weights.safetensors``: ``W_enc`` [d_in, d_sae] (pre-activations ``x @ W_enc + b_enc``,
  the transpose of this project's), ``b_enc`` [d_sae], ``W_dec`` [d_sae, d_out], ``b_dec`` [d_out],
  ``threshold`` [d_sae] (JumpReLU), ``W_skip`` [d_out, d_in] (skip transcoders).

Its forward, folded into raw-space weights here: an SAE with ``apply_b_dec_to_input`` encodes
``x − b_dec`` (b_enc − b_dec·W_enc); TopK keeps the k largest pre-activations then applies a ReLU
(this project's ``topk``); with ``rescale_acts_by_decoder_norm`` the pre-activations are multiplied
by the decoder row norms before the selection and divided by them in the decoder (W_enc, b_enc
scaled by the norms, W_dec divided); JumpReLU keeps ``relu(z)`` where ``z > threshold``.
``normalize_activations``: ``none``, and ``expected_average_only_in`` (no run-time effect in a
folder loaded from disk: its factor is folded in by ``from_pretrained``), load exactly; the per-token
``layer_norm`` and ``constant_norm_rescale`` are not affine and are refused, as are ``gated``,
``covariance_whitening`` and ``hook_z`` reshaping. An SAE loads as an SAE (``output_site='mlp_in'``),
a transcoder as a per-layer transcoder; the layer is the first number of ``metadata.hook_name``
(``blocks.5.ln2.hook_normalized`` → 5), else of the folder name. ``sparsity.safetensors`` is unused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from clt.files import atomic_save_tensors, atomic_write_text, read_tensors
from clt.models.layerwise import LayerWeights, from_layers, layer_number, read_json_config, to_layers
from clt.models.saving import CheckpointError
from clt.models.transcoder import CrossLayerTranscoder

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SAE_ARCHITECTURES = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}
TRANSCODER_ARCHITECTURES = {
    "transcoder": ("relu", False),
    "skip_transcoder": ("relu", True),
    "jumprelu_transcoder": ("jumprelu", False),
    "jumprelu_skip_transcoder": ("jumprelu", True),
}
CFG_FIELDS = (
    "architecture",
    "d_in",
    "d_sae",
    "d_out",
    "dtype",
    "device",
    "apply_b_dec_to_input",
    "normalize_activations",
    "reshape_activations",
    "metadata",
    "k",
    "rescale_acts_by_decoder_norm",
    "use_sparse_activations",
    "sae_lens_version",
    "sae_lens_training_version",
    "model_name",
    "hook_name",
    "hook_layer",
    "hook_head_index",
    "activation_fn",
    "activation_fn_kwargs",
    "finetuning_scaling_factor",
    "prepend_bos",
    "context_size",
    "dataset_path",
    "neuronpedia_id",
)
"""Keys of a SAELens ``cfg.json`` read here or common in published ones (others pass unchecked
unless they look like a typo of one of these)."""
_EXACT_NORMS = ("none", "expected_average_only_in")
DEFAULT_HOOKS = {"mlp_in": "blocks.{}.ln2.hook_normalized", "mlp_out": "blocks.{}.hook_mlp_out"}
"""TransformerLens hook names of model layer m's MLP input and output (SAELens's convention)."""


def is_sae_folder(folder: Path) -> bool:
    """Whether `folder` holds one SAELens SAE (``cfg.json`` and ``sae_weights.safetensors``)."""
    return (folder / CFG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


def sae_folders(folder: Path) -> list[Path]:
    """The SAE folders of a SAELens folder (itself when it is one SAE), sorted by name."""
    if is_sae_folder(folder):
        return [folder]
    return sorted((p for p in folder.iterdir() if p.is_dir() and is_sae_folder(p)), key=lambda p: p.name)


def detect(folder: Path) -> bool:
    """Whether `folder` is a SAELens SAE or a folder of them."""
    return folder.is_dir() and bool(sae_folders(folder))


def read_sae(folder: Path) -> tuple[dict[str, Any], LayerWeights]:
    """(cfg, raw-space `LayerWeights`) of one SAELens folder, its run-time steps folded into the weights."""
    file = folder / CFG_FILE
    cfg = read_json_config(file, CFG_FIELDS, ("d_in", "d_sae"), "save the SAE again")
    if "architecture" not in cfg:  # before SAELens 6: activation_fn_str / activation_fn
        act = cfg.get("activation_fn", "relu")
        cfg["architecture"] = {"relu": "standard", "topk": "topk"}.get(act, act)
        cfg.setdefault("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
        cfg.setdefault("apply_b_dec_to_input", True)
    arch = cfg["architecture"]
    if arch not in SAE_ARCHITECTURES and arch not in TRANSCODER_ARCHITECTURES:
        raise CheckpointError(
            f"{file}: architecture '{arch}' is not supported; readable: "
            f"{sorted(SAE_ARCHITECTURES) + sorted(TRANSCODER_ARCHITECTURES)}"
        )
    norm = cfg.get("normalize_activations", "none")
    if norm not in _EXACT_NORMS:
        raise CheckpointError(
            f"{file}: normalize_activations '{norm}' normalises each token by itself (not an affine map "
            f"this project's transcoder can hold); readable: {list(_EXACT_NORMS)}"
        )
    if cfg.get("reshape_activations", "none") != "none":
        raise CheckpointError(f"{file}: reshape_activations '{cfg['reshape_activations']}' (attention z) is not read")
    if arch == "topk" and not isinstance(cfg.get("k"), int):
        raise CheckpointError(f"{file}: a topk SAE needs an integer 'k'; add it")
    stored = read_tensors(folder / WEIGHTS_FILE, CheckpointError, missing="save the SAE again", corrupt="save it again")
    transcoder = arch in TRANSCODER_ARCHITECTURES
    needed = ["W_enc", "b_enc", "W_dec", "b_dec"]
    needed += ["threshold"] if "jumprelu" in arch else []
    needed += ["W_skip"] if transcoder and TRANSCODER_ARCHITECTURES[arch][1] else []
    missing = [k for k in needed if k not in stored]
    if missing:
        raise CheckpointError(
            f"{folder / WEIGHTS_FILE} lacks {missing} (it holds {sorted(stored)}): save the SAE again"
        )
    d_in, F = int(cfg["d_in"]), int(cfg["d_sae"])
    d_out = int(cfg.get("d_out", d_in)) if transcoder else d_in
    if d_out != d_in:
        raise CheckpointError(
            f"{file}: d_out={d_out} differs from d_in={d_in}; an MLP transcoder maps d_model to d_model"
        )
    if tuple(stored["W_enc"].shape) != (d_in, F):
        raise CheckpointError(
            f"{folder / WEIGHTS_FILE}: W_enc has shape {list(stored['W_enc'].shape)}, but {CFG_FILE} says "
            f"d_in={d_in}, d_sae={F} (expected [{d_in}, {F}]); the files come from different SAEs"
        )
    t = {k: stored[k] for k in needed}
    t["W_enc"] = stored["W_enc"].T.contiguous()
    if arch == "topk" and cfg.get("rescale_acts_by_decoder_norm", False):
        norms = t["W_dec"].norm(dim=-1)
        t["W_enc"], t["b_enc"], t["W_dec"] = (
            t["W_enc"] * norms[:, None],
            t["b_enc"] * norms,
            t["W_dec"] / norms[:, None],
        )
    if not transcoder and cfg.get("apply_b_dec_to_input", True):
        t["b_enc"] = t["b_enc"] - t["W_enc"] @ t["b_dec"]
    return cfg, t


def _layer(folder: Path, cfg: dict[str, Any]) -> int | None:
    hook = (cfg.get("metadata") or {}).get("hook_name") or cfg.get("hook_name") or ""
    layer = layer_number(hook)
    return layer if layer is not None else layer_number(folder.name)


def load_saelens(folder: str | Path, device: str | torch.device | None = None) -> CrossLayerTranscoder:
    """A per-layer transcoder (or SAE) from a SAELens SAE folder or a folder of them (one per layer)."""
    folder = Path(folder)
    found = sae_folders(folder) if folder.is_dir() else []
    if not found:
        raise FileNotFoundError(f"{folder} holds no SAELens SAE ({CFG_FILE} + {WEIGHTS_FILE})")
    saes = [read_sae(p) for p in found]
    layers = [_layer(p, cfg) for p, (cfg, _) in zip(found, saes)]
    if len(found) == 1 and layers[0] is None:
        layers = [0]
    if None in layers or len(set(layers)) != len(layers):
        raise CheckpointError(
            f"{folder}: the SAEs' layers ({dict(zip([p.name for p in found], layers))}, from metadata.hook_name "
            "or the folder name) are missing or repeated; load the SAEs one folder at a time"
        )
    order = sorted(range(len(found)), key=lambda i: layers[i])
    first = saes[order[0]][0]
    kinds = {(cfg["architecture"], cfg.get("k")) for cfg, _ in saes}
    if len(kinds) > 1:
        raise CheckpointError(
            f"{folder}: the SAEs differ in architecture or k ({sorted(kinds, key=str)}); load them one at a time"
        )
    arch = first["architecture"]
    activation = SAE_ARCHITECTURES.get(arch) or TRANSCODER_ARCHITECTURES[arch][0]
    F = int(first["d_sae"])
    config: dict[str, Any] = {
        "activation_fn": activation,
        "output_site": "mlp_out" if arch in TRANSCODER_ARCHITECTURES else "mlp_in",
    }
    if activation == "topk":
        config["topk"] = min(int(first["k"]), F)
    model_name = (first.get("metadata") or {}).get("model_name") or first.get("model_name")
    if model_name:
        config["model_name"] = model_name
    model = from_layers([layers[i] for i in order], [saes[i][1] for i in order], folder, **config)
    return model if device is None else model.to(device)


@torch.no_grad()
def export_saelens(
    transcoder: CrossLayerTranscoder,
    out_dir: str | Path,
    *,
    hook_name: str | None = None,
    hook_name_out: str = DEFAULT_HOOKS["mlp_out"],
    overwrite: bool = False,
) -> Path:
    """Write a per-layer transcoder or SAE as one SAELens folder per covered model layer m, named
    ``hook_name.format(m)`` (default: the TransformerLens name of the MLP input); each loads with
    ``SAE.load_from_disk(folder)``. ReLU → standard/transcoder, JumpReLU and BatchTopK (at its
    inference threshold) → jumprelu; TopK → topk for an SAE (SAELens has no TopK transcoder)."""
    cfg = transcoder.cfg
    act = cfg.activation_fn
    if act == "topk" and not cfg.is_sae:
        raise ValueError(
            "SAELens has no TopK transcoder architecture; export a TopK SAE, or a ReLU/JumpReLU/BatchTopK transcoder"
        )
    layers = to_layers(transcoder, "SAELens")
    hook_name = hook_name or DEFAULT_HOOKS["mlp_in"]
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite and detect(out_dir):
        raise FileExistsError(f"{out_dir} already holds SAELens SAEs; pass overwrite=True or choose another folder")
    jump = act in ("jumprelu", "batchtopk")
    if cfg.is_sae:
        arch = {"relu": "standard", "topk": "topk"}.get(act, "jumprelu")
    else:
        arch = ("jumprelu_" if jump else "") + ("skip_transcoder" if cfg.skip_connection else "transcoder")
    for m, t in zip(cfg.layers, layers):
        folder = out_dir / hook_name.format(m)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"W_enc": t["W_enc"].T, "b_enc": t["b_enc"], "W_dec": t["W_dec"], "b_dec": t["b_dec"]}
        if jump:
            tensors["threshold"] = t["threshold"]
        if "W_skip" in t:
            tensors["W_skip"] = t["W_skip"]
        atomic_save_tensors(tensors, folder / WEIGHTS_FILE)
        metadata: dict[str, Any] = {"hook_name": hook_name.format(m)}
        if cfg.model_name:
            metadata["model_name"] = cfg.model_name
        sae_cfg: dict[str, Any] = {
            "architecture": arch,
            "d_in": cfg.d_model,
            "d_sae": cfg.num_features,
            "dtype": cfg.dtype,
            "device": "cpu",
            "apply_b_dec_to_input": False,  # b_enc already includes any input centring
            "normalize_activations": "none",
            "reshape_activations": "none",
            "metadata": metadata,
        }
        if not cfg.is_sae:
            sae_cfg["d_out"] = cfg.d_model
            metadata["hook_name_out"] = hook_name_out.format(m)
        if act == "topk":
            sae_cfg |= {"k": cfg.topk, "rescale_acts_by_decoder_norm": False}
        atomic_write_text(json.dumps(sae_cfg), folder / CFG_FILE)
    return out_dir


__all__ = ["DEFAULT_HOOKS", "detect", "export_saelens", "load_saelens"]
