"""Text corpora and their tokenisation into context windows."""

from clt.data.corpus import TokenWindow, default_corpus, load_texts, token_windows

__all__ = ["TokenWindow", "default_corpus", "load_texts", "token_windows"]
