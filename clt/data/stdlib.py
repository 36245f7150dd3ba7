"""The offline corpus of millions of tokens: CPython's documentation topics and standard library.

Every Python install holds it, so nothing is downloaded: the documentation topics of `pydoc_data`
(English prose) and the source of every standard-library module (code with its docstrings and
comments, the test suite included). Documents are deduplicated by their whitespace-normalised
text and split into a training part and a held-out part (about 3 % of the documents) by a hash of
their name, so the split does not depend on the order files are found in. For Python 3.11 it holds
about 9M SmolLM2 tokens.

Names: ``"stdlib"`` (the training split), ``"stdlib:heldout"`` (for evaluation), ``"stdlib:all"``.
The corpus is a function of the Python build; `stdlib_fingerprint` identifies it.
"""

from __future__ import annotations

import functools
import hashlib
import sysconfig
from pathlib import Path

STDLIB_CORPUS = "stdlib"
SPLITS = ("train", "heldout", "all")
HELDOUT_PER_MILLE = 30
"""Documents whose name hashes below this (out of 1000) form the held-out split."""
_MIN_LETTER_FRACTION = 0.3
"""Source files with fewer letters than this are data tables (codecs, Unicode maps) and are left out."""
_MAX_FILE_BYTES = 1_000_000


def split_of(name: str) -> str:
    """'heldout' or 'train': the split a document belongs to, from a hash of its name."""
    digest = int(hashlib.sha1(name.encode()).hexdigest()[:8], 16)
    return "heldout" if digest % 1000 < HELDOUT_PER_MILLE else "train"


@functools.lru_cache(maxsize=1)
def stdlib_documents() -> tuple[tuple[str, str], ...]:
    """(name, text) of every document, sorted by name, deduplicated (the first name keeps a text)."""
    from pydoc_data.topics import topics

    found = [(f"pydoc/{key}", topics[key]) for key in topics]
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if "site-packages" in rel.parts or rel.parts[0] == "pydoc_data" or path.stat().st_size > _MAX_FILE_BYTES:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        letters = sum(c.isalpha() for c in text)
        if text.strip() and letters >= _MIN_LETTER_FRACTION * len(text):
            found.append((rel.as_posix(), text))
    seen: set[str] = set()
    documents = []
    for name, text in sorted(found):
        key = hashlib.sha1(" ".join(text.split()).encode()).hexdigest()
        if text.strip() and key not in seen:
            seen.add(key)
            documents.append((name, text.strip()))
    return tuple(documents)


def stdlib_corpus(split: str = "train") -> list[str]:
    """Texts of one split ('train', 'heldout' or 'all') of the standard-library corpus."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} of the '{STDLIB_CORPUS}' corpus; use one of {SPLITS}")
    return [text for name, text in stdlib_documents() if split == "all" or split_of(name) == split]


def stdlib_eval_texts(split: str = "heldout", chars_per_document: int = 1500) -> list[str]:
    """A slice from the middle of every document of a split: evaluation text that spreads over all
    its documents instead of the first few (and skips licence headers and imports)."""
    texts = []
    for text in stdlib_corpus(split):
        start = max(0, len(text) // 2 - chars_per_document // 2)
        start = text.rfind("\n", 0, start) + 1  # from the start of a line
        texts.append(text[start : start + chars_per_document])
    return texts


def stdlib_fingerprint() -> str:
    """A short hash of the corpus's document names and texts (it differs between Python builds)."""
    digest = hashlib.sha1()
    for name, text in stdlib_documents():
        digest.update(name.encode())
        digest.update(hashlib.sha1(text.encode()).digest())
    return digest.hexdigest()[:12]


def parse_corpus_name(source: str) -> str | None:
    """The split named by 'stdlib', 'stdlib:heldout' or 'stdlib:all' (None for other sources)."""
    name, _, split = source.partition(":")
    if name != STDLIB_CORPUS:
        return None
    return split or "train"
