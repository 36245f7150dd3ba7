"""Corpora for extraction: the offline default, files, folders, JSONL, lists, `datasets`.

Documents are tokenised into windows of at most ``context_length`` tokens. A document longer
than one window is split into consecutive windows (nothing is silently dropped); each window
starts with the BOS token when ``prepend_bos`` is set, so every position has the same context
convention in extraction, training metrics and attribution.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from clt.data.stdlib import parse_corpus_name, stdlib_corpus

DEFAULT_CORPUS = "pydoc"


class EmptyCorpusError(ValueError):
    """A corpus has no text in it."""


def default_corpus() -> list[str]:
    """The Python documentation topics shipped with CPython (~465 KB of English prose)."""
    from pydoc_data.topics import topics

    return [topics[key].strip() for key in sorted(topics) if topics[key].strip()]


def load_texts(source: Any = DEFAULT_CORPUS, *, text_field: str = "text") -> list[str]:
    """Documents from a corpus source: "pydoc", "stdlib" (or "stdlib:heldout"), a .txt/.jsonl file, a
    folder, a list, a dataset."""
    if isinstance(source, str) and source == DEFAULT_CORPUS:
        texts = default_corpus()
    elif isinstance(source, str) and parse_corpus_name(source) is not None:
        texts = stdlib_corpus(parse_corpus_name(source))
    elif isinstance(source, (str, Path)):
        texts = _texts_from_path(Path(source), text_field)
    elif _is_hf_dataset(source):
        if text_field not in source.column_names:
            raise ValueError(f"dataset has no column '{text_field}'; columns: {source.column_names}")
        texts = [str(t) for t in source[text_field]]
    elif isinstance(source, Sequence) and all(isinstance(t, str) for t in source):
        texts = list(source)
    else:
        raise TypeError(
            f"unsupported corpus source {type(source).__name__}: use 'pydoc', 'stdlib', a path to a .txt/.jsonl "
            "file or a folder of .txt files, a list of strings, or a datasets.Dataset"
        )
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise EmptyCorpusError(f"the corpus {source!r} contains no text; give a non-empty source")
    return texts


def _is_hf_dataset(source: Any) -> bool:
    return hasattr(source, "column_names") and hasattr(source, "__getitem__")


def _texts_from_path(path: Path, text_field: str) -> list[str]:
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise EmptyCorpusError(f"folder {path} contains no .txt files")
        return [f.read_text(encoding="utf-8", errors="replace") for f in files]
    if not path.is_file():
        raise FileNotFoundError(f"corpus not found: {path} (give a file, a folder, or 'pydoc')")
    if path.suffix == ".jsonl":
        return list(_jsonl_texts(path, text_field))
    return [path.read_text(encoding="utf-8", errors="replace")]


def _jsonl_texts(path: Path, text_field: str) -> Iterator[str]:
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number} is not valid JSON: {err}") from err
            if not isinstance(record, dict) or text_field not in record:
                raise ValueError(f"{path}:{number} has no '{text_field}' field (set text_field=...)")
            yield str(record[text_field])


@dataclasses.dataclass(frozen=True)
class TokenWindow:
    """One context window: token ids (BOS first when prepended) and where it came from."""

    token_ids: tuple[int, ...]
    document: int
    """Index of the source document."""
    start: int
    """Offset of the window's first content token within the tokenised document."""


def bos_id(tokenizer) -> int:
    """The BOS id used when prepending (tokenizer.bos_token_id, else its first special token)."""
    for candidate in (tokenizer.bos_token_id, tokenizer.cls_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    raise ValueError("the tokenizer has no BOS/CLS/EOS token; pass prepend_bos=False")


def token_windows(
    texts: Iterable[str], tokenizer, context_length: int, *, prepend_bos: bool = True
) -> Iterator[TokenWindow]:
    """Tokenise documents into windows of at most ``context_length`` tokens, splitting long ones."""
    body = context_length - 1 if prepend_bos else context_length
    if body < 1:
        raise ValueError(f"context_length={context_length} leaves no room for tokens")
    prefix = (bos_id(tokenizer),) if prepend_bos else ()
    for document, text in enumerate(texts):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), body):
            yield TokenWindow(prefix + tuple(ids[start : start + body]), document, start)


def encode_prompt(tokenizer, prompt: str, *, prepend_bos: bool = True, max_length: int | None = None) -> list[int]:
    """Token ids of a prompt with the project's BOS convention; errors if longer than the context."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = ([bos_id(tokenizer)] if prepend_bos else []) + list(ids)
    if not ids:
        raise ValueError("the prompt is empty")
    if max_length is not None and len(ids) > max_length:
        raise ValueError(f"the prompt has {len(ids)} tokens but the model's context is {max_length}; shorten it")
    return ids
