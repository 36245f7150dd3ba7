"""ExtractionConfig: which model, corpus and layers to record, and how to store them."""

from __future__ import annotations

import dataclasses

from clt.config.base import ConfigBase, check
from clt.config.constants import (
    COMPRESSIONS,
    DEFAULT_MODEL,
    MODEL_DTYPES,
    STORE_DTYPES,
    check_choice,
    check_output_site,
)


@dataclasses.dataclass
class ExtractionConfig(ConfigBase):
    """Settings of `clt extract`: model, corpus, layers, context windows and store format."""

    model: str = DEFAULT_MODEL
    """Model alias (smollm2-135m, tiny-llama, tiny-gpt2), local folder, .gguf file or cached hub id."""
    model_dtype: str = "auto"
    """Precision of the model's forward: 'auto' (bfloat16 where the CPU computes it natively, AVX512-BF16
    or AMX, or on a GPU that does; float32 elsewhere), 'float32', 'bfloat16' or 'float16'."""
    corpus: str = "pydoc"
    """'pydoc' (offline default), 'stdlib' (CPython's documentation and standard library, ~9M tokens;
    'stdlib:heldout' is its held-out split), a .txt file, a folder of .txt files, or a .jsonl file."""
    text_field: str = "text"
    """Field holding the text in a .jsonl corpus."""
    layers: list[int] | None = None
    """Layers to record (default: all)."""
    max_tokens: int = 20_000
    """Number of tokens to record."""
    context_length: int = 128
    """Tokens per context window (long documents are split into several windows)."""
    batch_size: int = 8
    """Context windows per forward pass."""
    prepend_bos: bool = True
    """Prepend the BOS token to every window (the same convention is used in attribution)."""
    exclude_bos: bool = True
    """Leave BOS positions out of the store (their activations are outliers)."""
    store_dtype: str = "float16"
    """Precision of the stored activations: float16, bfloat16, float32 or int8 (symmetric codes with an
    absmax scale per token and layer, about half of float16's bytes)."""
    compression: str = "none"
    """Lossless compression of each shard file: 'none' or 'zstd' (needs `pip install zstandard`)."""
    output_site: str = "mlp_out"
    """Training targets recorded: 'mlp_out' (MLP outputs: a transcoder) or 'mlp_in' (the MLP inputs
    themselves, stored once: a transcoder trained on them is an SAE)."""
    shard_tokens: int = 8192
    """Tokens per shard file."""
    output_dir: str = "runs/store"
    """Folder of the activation store (an existing one is resumed)."""
    device: str = "cpu"
    """Device to run the model on."""
    writer_rank: int = 0
    """Index of this process among num_writers extraction processes filling one store (it takes
    context windows writer_rank, writer_rank + num_writers, ...)."""
    num_writers: int = 1
    """Number of extraction processes writing disjoint shards of one store; the last to finish merges them."""

    def __post_init__(self) -> None:
        check_choice("model_dtype", self.model_dtype, MODEL_DTYPES)
        check(self.max_tokens > 0, f"max_tokens must be positive, got {self.max_tokens}")
        check(self.context_length >= 2, f"context_length must be at least 2, got {self.context_length}")
        check(self.batch_size > 0, f"batch_size must be positive, got {self.batch_size}")
        check(self.shard_tokens > 0, f"shard_tokens must be positive, got {self.shard_tokens}")
        check_choice("store_dtype", self.store_dtype, STORE_DTYPES)
        check_choice("compression", self.compression, COMPRESSIONS)
        check_output_site(self.output_site)
        check(self.num_writers >= 1, f"num_writers must be at least 1, got {self.num_writers}")
        check(
            0 <= self.writer_rank < self.num_writers,
            f"writer_rank {self.writer_rank} is out of range for num_writers={self.num_writers}: "
            f"use 0..{self.num_writers - 1}",
        )
        check(self.layers is None or len(self.layers) > 0, "layers must be omitted (all) or a non-empty list")
