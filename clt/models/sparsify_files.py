"""EleutherAI sparsify's on-disk layout: read its sparse coders as a transcoder, and write ours for it.

sparsify (PyPI ``eai-sparsify`` 1.3.3, ``sparsify/sparse_coder.py``: ``SparseCoder.save_to_disk``,
``load_from_disk``, ``load_many``, ``encode``, ``decode``, ``forward``) saves one folder per
hookpoint (a module path, e.g. ``layers.3.mlp`` relative to the model's ``base_model`` in 1.3.3,
``model.layers.3.mlp`` in older runs such as EleutherAI's published skip transcoders), each with

- ``cfg.json``: the ``SparseCoderConfig`` fields ``activation`` (``topk`` or ``groupmax``),
  ``expansion_factor``, ``normalize_decoder``, ``num_latents``, ``k``, ``multi_topk``,
  ``skip_connection``, ``transcode`` and ``d_in``;
- ``sae.safetensors``: ``encoder.weight`` [F, d], ``encoder.bias`` [F], ``W_dec`` [F, d],
  ``b_dec`` [d] and ``W_skip`` [d, d] with a skip connection.

Its forward: an autoencoder (``transcode: false``) first subtracts ``b_dec`` from the input (its
input normalisation); pre-activations ``relu(x @ encoder.weight.T + encoder.bias)``; the k largest
are kept (this project's ``topk``, which also zeroes negative values); output ``a @ W_dec + b_dec``
plus ``x @ W_skip.T``. sparsify 1.3.3 stores no other normalisation: its trainer only initialises
the biases from batch means. A transcoder (``transcode: true``) on an MLP hookpoint maps the MLP
input to its output: a per-layer transcoder here; an autoencoder loads as an SAE
(``output_site='mlp_in'``), valid where its hookpoint holds the MLP input. ``groupmax`` has no
counterpart and is refused. The layer index of a hookpoint is the first number in its name.

EleutherAI's cross-layer branch of sparsify (not released on PyPI) writes single-layer coders with
more keys: ``normalize_io`` scales the input by √d / ``in_norm`` and the output by ``out_norm`` / √d
(scalar buffers in ``sae.safetensors``; the skip term and an autoencoder's ``b_dec`` act on the
scaled input): read exactly as this project's standardisation (σ = norm / √d, μ = 0). Its
``post_enc`` (added to active latents) and ``post_enc_scale`` are read only while zeros and ones,
storage and sharding keys (``dtype``, ``tp_output``, ...) are ignored, and cross-layer coders
(``n_targets`` > 0, ``coalesce_topk``) and any other switched-on key of another version are refused.

A run folder (``save_dir/run_name``) also holds ``config.json`` (the TrainConfig) and optimizer
state in pickle files, which are never read here.
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
WEIGHTS_FILE = "sae.safetensors"
CFG_FIELDS = (
    "activation",
    "expansion_factor",
    "normalize_decoder",
    "num_latents",
    "k",
    "multi_topk",
    "skip_connection",
    "transcode",
    "d_in",
)
"""The keys of a sparsify 1.3.3 ``cfg.json`` (SparseCoderConfig's fields and ``d_in``). Keys of
other versions are accepted while off (false, 0, null): e.g. a later ``embed_skip: false``."""
SPARSIFY_VERSION = "1.3.3"
_READ_LATER = ("normalize_io", "d_out")
"""Keys of EleutherAI's cross-layer branch of sparsify that this reader applies (see the module docstring)."""
_INERT = (
    "lookup_max_order",
    "gram_table_hash",
    "dtype",
    "tp_output",
    "train_post_encoder",
    "use_fp8",
    "encoder_tile_size",
    "post_encoder_scale",
)
"""Keys of other sparsify versions that do not change what a single-layer coder computes (storage,
sharding, training switches, provenance; ``post_enc``/``post_enc_scale`` are checked in the weights)."""
_OFF = (False, 0, None, "none", "")
DEFAULT_HOOKPOINT = "layers.{}.mlp"
"""Hookpoint of model layer m's MLP in sparsify 1.3.3 (relative to a Llama's ``base_model``;
GPT-2: ``h.{}.mlp``)."""


def is_coder_folder(folder: Path) -> bool:
    """Whether `folder` holds one sparse coder (``cfg.json`` and ``sae.safetensors``)."""
    return (folder / CFG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


def coder_folders(folder: Path) -> list[Path]:
    """The hookpoint folders of a sparsify folder (itself when it is one coder), by layer."""
    if is_coder_folder(folder):
        return [folder]
    found = [p for p in folder.iterdir() if p.is_dir() and is_coder_folder(p)]
    return sorted(found, key=lambda p: (hookpoint_layer(p.name, strict=False), p.name))


def detect(folder: Path) -> bool:
    """Whether `folder` is a sparsify coder or a folder of them."""
    return folder.is_dir() and bool(coder_folders(folder))


def hookpoint_layer(name: str, *, strict: bool = True) -> int:
    """Model layer of a hookpoint name: its first number (``model.layers.12.mlp`` → 12)."""
    layer = layer_number(name)
    if layer is None:
        if not strict:
            return -1
        raise CheckpointError(f"hookpoint '{name}' names no layer number (e.g. layers.3.mlp); rename the folder")
    return layer


def read_cfg(folder: Path) -> dict[str, Any]:
    """A coder's ``cfg.json``, checked: known keys (a typo names the closest), ``d_in`` and ``k``."""
    file = folder / CFG_FILE
    known = (*CFG_FIELDS, *_READ_LATER, *_INERT)
    cfg = read_json_config(file, known, ("d_in", "k"), "save the coder again")
    if cfg.get("n_targets") not in _OFF or cfg.get("coalesce_topk") not in _OFF:
        raise CheckpointError(
            f"{file} is a cross-layer coder of sparsify's CLT branch (n_targets={cfg.get('n_targets')}, "
            f"coalesce_topk={cfg.get('coalesce_topk')!r}); only single-layer coders are read"
        )
    other = sorted(k for k, v in cfg.items() if k not in known and not any(v is off or v == off for off in _OFF))
    if other:
        raise CheckpointError(
            f"{file} turns on {other}, which this reader does not apply (a later version's embedding skip, "
            f"n-gram lookup or cross-layer options change what the coder computes); it reads sparsify "
            f"{SPARSIFY_VERSION}'s fields and the CLT branch's normalize_io"
        )
    if cfg.get("activation", "topk") != "topk":
        raise CheckpointError(
            f"{file}: activation '{cfg['activation']}' has no counterpart here (only sparsify's 'topk' does)"
        )
    return cfg


def read_coder(folder: Path) -> tuple[dict[str, Any], LayerWeights]:
    """(cfg, raw-space `LayerWeights`) of one hookpoint folder (autoencoder centring folded into b_enc)."""
    cfg = read_cfg(folder)
    file = folder / WEIGHTS_FILE
    stored = read_tensors(file, CheckpointError, missing="save the coder again", corrupt="save the coder again")
    names = {"W_enc": "encoder.weight", "b_enc": "encoder.bias", "W_dec": "W_dec", "b_dec": "b_dec"}
    missing = [v for v in names.values() if v not in stored]
    if missing:
        raise CheckpointError(f"{file} has no {missing} (it holds {sorted(stored)}): not a sparsify coder")
    t = {k: stored[v] for k, v in names.items()}
    if cfg.get("skip_connection"):
        if "W_skip" not in stored:
            raise CheckpointError(f"{file} has no W_skip but {CFG_FILE} says skip_connection: true")
        t["W_skip"] = stored["W_skip"]
    F, d = t["W_enc"].shape
    if d != cfg["d_in"] or (cfg.get("num_latents") or d * cfg.get("expansion_factor", 32)) != F:
        raise CheckpointError(
            f"{file}: encoder.weight is {[F, d]} but {CFG_FILE} says d_in={cfg['d_in']}, "
            f"num_latents={cfg.get('num_latents')}; the files come from different coders"
        )
    if cfg.get("d_out", d) not in (None, d):
        raise CheckpointError(f"{file}: d_out={cfg['d_out']} differs from d_in={d}; an MLP transcoder maps d to d")
    _check_post_encoder(file, stored)
    if cfg.get("normalize_io"):  # x · √d / in_norm in, y · out_norm / √d out: a per-layer scale
        norms = [stored.get(name) for name in ("in_norm", "out_norm")]
        if any(n is None or n.numel() != 1 for n in norms):
            raise CheckpointError(f"{file} lacks the scalars in_norm/out_norm that normalize_io: true needs")
        t["input_std"], t["output_std"] = (n.double().reshape(()).expand(d) / d**0.5 for n in norms)
    if not cfg.get("transcode", False):  # encode(x) runs on x - b_dec (standardised x)
        t["b_enc"] = t["b_enc"] - t["W_enc"] @ t["b_dec"]
    return cfg, t


def _check_post_encoder(file: Path, stored: dict[str, torch.Tensor]) -> None:
    """The CLT branch adds ``post_enc`` to active latents and scales them by ``post_enc_scale``: read
    only where they change nothing (zeros, ones), as when they were never trained."""
    post, scale = stored.get("post_enc"), stored.get("post_enc_scale")
    if (post is not None and bool(post.any())) or (scale is not None and not bool((scale == 1).all())):
        raise CheckpointError(
            f"{file} has a trained post_enc/post_enc_scale (active latents shifted or scaled after TopK's "
            "choice), which this project's TopK cannot hold; only coders without them are read"
        )


def load_sparsify(folder: str | Path, device: str | torch.device | None = None) -> CrossLayerTranscoder:
    """A per-layer TopK transcoder (or SAE) from a sparsify hookpoint folder or a folder of them."""
    folder = Path(folder)
    found = coder_folders(folder) if folder.is_dir() else []
    if not found:
        raise FileNotFoundError(f"{folder} holds no sparsify coder ({CFG_FILE} + {WEIGHTS_FILE})")
    coders = [read_coder(p) for p in found]
    layers = [hookpoint_layer(p.name) if p != folder else _own_layer(p) for p in found]
    if len(set(layers)) != len(layers):
        raise CheckpointError(
            f"{folder}: several hookpoints name the same layer ({[p.name for p in found]}); "
            "load one of them by giving its folder"
        )
    first = coders[0][0]
    for p, (cfg, _) in zip(found, coders):
        for key in ("k", "transcode", "d_in"):
            if cfg.get(key) != first.get(key):
                raise CheckpointError(
                    f"{folder}: hookpoints differ in {key} ({found[0].name}: {first.get(key)}, {p.name}: "
                    f"{cfg.get(key)}); one dictionary needs one value: load the hookpoints separately"
                )
    F = coders[0][1]["W_enc"].shape[0]
    model = from_layers(
        layers,
        [t for _, t in coders],
        folder,
        activation_fn="topk",
        topk=min(int(first["k"]), F),
        output_site="mlp_out" if first.get("transcode", False) else "mlp_in",
    )
    return model if device is None else model.to(device)


def _own_layer(folder: Path) -> int:
    """Layer of a lone coder folder: from its name, else 0."""
    layer = hookpoint_layer(folder.name, strict=False)
    return max(layer, 0)


@torch.no_grad()
def export_sparsify(
    transcoder: CrossLayerTranscoder,
    out_dir: str | Path,
    *,
    hookpoint: str = DEFAULT_HOOKPOINT,
    overwrite: bool = False,
) -> Path:
    """Write a per-layer TopK transcoder (or SAE) as sparsify hookpoint folders ``hookpoint.format(m)``
    for each covered model layer m; ``SparseCoder.load_many(out_dir, local=True)`` loads them."""
    cfg = transcoder.cfg
    if cfg.activation_fn != "topk":
        raise ValueError(
            f"sparsify's coders are TopK; this transcoder is '{cfg.activation_fn}', which TopK would change: "
            "train with activation_fn='topk' (and cross_layer=False) to export to sparsify"
        )
    layers = to_layers(transcoder, "sparsify")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite and detect(out_dir):
        raise FileExistsError(f"{out_dir} already holds sparsify coders; pass overwrite=True or choose another folder")
    transcode = not cfg.is_sae
    for m, t in zip(cfg.layers, layers):
        folder = out_dir / hookpoint.format(m)
        folder.mkdir(parents=True, exist_ok=True)
        b_enc = t["b_enc"] if transcode else t["b_enc"] + t["W_enc"] @ t["b_dec"]  # sparsify subtracts b_dec
        tensors = {"encoder.weight": t["W_enc"], "encoder.bias": b_enc, "W_dec": t["W_dec"], "b_dec": t["b_dec"]}
        if cfg.skip_connection:
            tensors["W_skip"] = t["W_skip"]
        atomic_save_tensors(tensors, folder / WEIGHTS_FILE, {"format": "pt"})
        coder_cfg = {
            "activation": "topk",
            "expansion_factor": max(1, cfg.num_features // cfg.d_model),
            "normalize_decoder": False,  # our decoder rows are not unit-norm: keep them as trained
            "num_latents": cfg.num_features,
            "k": cfg.topk,
            "multi_topk": False,
            "skip_connection": cfg.skip_connection,
            "transcode": transcode,
            "d_in": cfg.d_model,
        }
        atomic_write_text(json.dumps(coder_cfg), folder / CFG_FILE)
    return out_dir


__all__ = ["DEFAULT_HOOKPOINT", "detect", "export_sparsify", "hookpoint_layer", "load_sparsify"]
