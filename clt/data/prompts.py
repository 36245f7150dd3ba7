"""A fixed set of short prompts of mixed kinds for scoring attribution graphs.

Written for this project (not taken from any training corpus): facts, code, lists and syntax, each
with a next token a small model can be expected to predict. `clt evaluate --graphs` and
`experiments/quality_vs_compute.py` report the mean graph scores over them.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class EvalPrompt:
    """One prompt and what kind of knowledge its next token needs."""

    kind: str
    """'fact', 'code', 'list' or 'syntax'."""
    text: str


EVAL_PROMPTS: tuple[EvalPrompt, ...] = (
    EvalPrompt("fact", "The capital of France is"),
    EvalPrompt("fact", "The Eiffel Tower is located in the city of"),
    EvalPrompt("fact", "Water freezes at a temperature of zero degrees"),
    EvalPrompt("fact", "The largest planet in our solar system is"),
    EvalPrompt("fact", "Shakespeare wrote Romeo and"),
    EvalPrompt("fact", "The opposite of hot is"),
    EvalPrompt("code", "def add(a, b):\n    return a +"),
    EvalPrompt("code", "for i in range(10):\n    print("),
    EvalPrompt("code", "import numpy as"),
    EvalPrompt("code", "if x is None:\n        raise ValueError("),
    EvalPrompt("code", "with open(path) as"),
    EvalPrompt("code", "class Point:\n    def __init__(self, x, y):\n        self.x ="),
    EvalPrompt("list", "Monday, Tuesday, Wednesday,"),
    EvalPrompt("list", "one, two, three, four,"),
    EvalPrompt("list", "January, February, March,"),
    EvalPrompt("list", "red, orange, yellow, green,"),
    EvalPrompt("list", "1, 2, 3, 4, 5,"),
    EvalPrompt("list", "a, b, c, d,"),
    EvalPrompt("syntax", 'She said, "I will be back'),
    EvalPrompt("syntax", "The function returns a list of (key, value"),
    EvalPrompt("syntax", "[1, [2, 3], [4, [5, 6"),
    EvalPrompt("syntax", "If the file does not exist, the function"),
    EvalPrompt("syntax", "The cat sat on the"),
    EvalPrompt("syntax", "Dear Sir or"),
)

__all__ = ["EVAL_PROMPTS", "EvalPrompt"]
