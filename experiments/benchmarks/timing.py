"""Timing helper shared by the benchmark scripts (imported as `timing`: the scripts' folder is on sys.path)."""

from __future__ import annotations

import time
from collections.abc import Callable


def rotated_min_s(
    variants: dict[str, Callable[[], object]],
    repeats: int,
    *,
    warm_up: int = 1,
    after: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """Best wall time (s) of each variant, run in rotation after `warm_up` untimed rounds.

    Taking the minimum over rounds and interleaving the variants keeps the comparison fair on a
    noisy machine: each variant sees the same disturbances. `after(name)` runs untimed after each call.
    """
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(warm_up + repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if round_ >= warm_up:
                times[name].append(elapsed)
            if after is not None:
                after(name)
    return {name: min(values) for name, values in times.items()}
