"""Text corpora, their tokenisation into context windows, and batches of windows."""

from clt.data.corpus import TokenWindow, default_corpus, load_texts, token_windows
from clt.data.windows import hash_window, pad_id, pad_windows

__all__ = ["TokenWindow", "default_corpus", "hash_window", "load_texts", "pad_id", "pad_windows", "token_windows"]
