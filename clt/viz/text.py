"""Text that reaches a page: tokens shown safely, JSON safe inside a <script> block."""

from __future__ import annotations

import html
import json
from typing import Any


def token_label(token: str) -> str:
    """How a token is shown in a figure: HTML-escaped, newlines as ↵ and tabs as ⇥."""
    return html.escape(token.replace("\n", "↵").replace("\t", "⇥"), quote=False)


def script_json(data: Any) -> str:
    """JSON safe inside a <script> block: <, > and & become \\u escapes."""
    text = json.dumps(data, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


__all__ = ["script_json", "token_label"]
