"""Shard files of an activation store: float or int8 codes, plain or zstd-compressed safetensors.

A shard holds ``inputs`` and (unless the store records MLP inputs only) ``outputs`` [n, L, d],
plus ``token_ids``, ``positions`` and ``window_ids`` [n]. In an int8 store each of ``inputs`` and
``outputs`` is symmetric int8 codes with a float32 absmax scale per token and layer, stored next to
them as ``inputs_scale`` / ``outputs_scale`` [n, L]: x ≈ codes · scale, |x − x̂| ≤ scale / 2.
A zstd shard is the same safetensors bytes compressed as one zstandard frame (with a checksum).
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes

from clt.config.constants import FLOAT_DTYPE_NAMES
from clt.files import atomic_path, atomic_save_tensors, read_tensors

FLOAT_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in FLOAT_DTYPE_NAMES}
"""The torch dtype of each float store dtype."""
META_KEYS = ("token_ids", "positions", "window_ids")
"""Per-row metadata of a shard, [n] each."""
SCALE_SUFFIX = "_scale"
_INT8_MAX = 127
_ZSTD_LEVEL = 3
_SAFETENSORS_DTYPES = {
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int8: "I8",
}
_MISSING = "the store is incomplete; re-run the extraction to resume it"
_CORRUPT = "delete it and its entry will be re-extracted when you resume the extraction"


class StoreError(ValueError):
    """A store is missing, corrupt or used inconsistently; the message says how to fix it."""


def zstandard() -> Any:
    """The `zstandard` module, or an ImportError that says how to install it."""
    try:
        import zstandard as zstd
    except ImportError as err:
        raise ImportError(
            "compression='zstd' needs the zstandard package: pip install zstandard (or pip install 'clt[compress]')"
        ) from err
    return zstd


def quantize_int8(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes of `values` [..., d] and their absmax scales [...] (float32): x ≈ codes · scale."""
    values = values.float()
    scale = values.abs().amax(-1) / _INT8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: codes 0, any scale
    codes = torch.round(values / scale.unsqueeze(-1)).clamp_(-_INT8_MAX, _INT8_MAX).to(torch.int8)
    return codes, scale


def dequantize_int8(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Values of int8 `codes` [..., d] with `scale` [...]."""
    return codes.to(dtype) * scale.to(dtype).unsqueeze(-1)


def encode(values: torch.Tensor, dtype: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(tensors to store for `values`, keyed by suffix; the values a reader gets back) in store dtype `dtype`."""
    if dtype == "int8":
        codes, scale = quantize_int8(values)
        return {"": codes, SCALE_SUFFIX: scale}, dequantize_int8(codes, scale)
    stored = values.to(FLOAT_DTYPES[dtype])
    return {"": stored}, stored


def decode(data: dict[str, torch.Tensor], key: str, rows: Any = None) -> torch.Tensor:
    """Rows `rows` (all when None) of the activations `key` of a loaded shard, as floats."""
    values = data[key] if rows is None else data[key][rows]
    scale = data.get(key + SCALE_SUFFIX)
    if scale is None:
        return values
    return dequantize_int8(values, scale if rows is None else scale[rows])


def shard_name(index: int, compression: str, prefix: str = "shard_") -> str:
    """File name of shard `index`."""
    return f"{prefix}{index:05d}.safetensors" + (".zst" if compression == "zstd" else "")


def save_shard(parts: dict[str, list[torch.Tensor]], path: Path, compression: str = "none") -> None:
    """Save ``{name: torch.cat(parts[name])}`` as safetensors (zstd-compressed if asked), atomically,
    without building the concatenation."""
    if sys.byteorder != "little":
        if compression != "none":
            raise OSError("zstd shards are written on little-endian machines only; use compression='none'")
        atomic_save_tensors({k: torch.cat(v) for k, v in parts.items()}, path)
        return
    parts = dict(sorted(parts.items(), key=lambda item: -item[1][0].element_size()))  # aligned offsets
    header: dict[str, Any] = {}
    offset = 0
    for key, tensors in parts.items():
        shape = [sum(t.shape[0] for t in tensors), *tensors[0].shape[1:]]
        size = sum(t.numel() for t in tensors) * tensors[0].element_size()
        header[key] = {
            "dtype": _SAFETENSORS_DTYPES[tensors[0].dtype],
            "shape": shape,
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with atomic_path(path) as tmp, tmp.open("wb") as file:
        sink: Any = file
        if compression == "zstd":
            compressor = zstandard().ZstdCompressor(level=_ZSTD_LEVEL, write_checksum=True)
            sink = compressor.stream_writer(file, size=8 + len(text) + offset, closefd=False)
        sink.write(struct.pack("<Q", len(text)) + text)
        for tensors in parts.values():
            for tensor in tensors:
                sink.write(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().data)
        if sink is not file:
            sink.close()


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a plain safetensors file of a store (memory-mapped), or a StoreError that says what to do."""
    return read_tensors(path, StoreError, missing=_MISSING, corrupt=_CORRUPT)


def load_shard(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a shard file (memory-mapped when plain; decompressed in memory when ``.zst``)."""
    if path.suffix != ".zst":
        return load_tensors(path)
    if not path.is_file():
        raise StoreError(f"{path} is missing: {_MISSING}")
    zstd = zstandard()
    try:
        return load_bytes(zstd.ZstdDecompressor().decompress(path.read_bytes()))
    except (zstd.ZstdError, SafetensorError, OSError, ValueError) as err:
        raise StoreError(f"{path} is corrupt or truncated ({err}); {_CORRUPT}") from err
