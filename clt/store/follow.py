"""Waiting for a store that another thread or process is still writing."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

from clt.store.format import StoreError

_POLL_S = 0.05


@dataclasses.dataclass
class Follow:
    """How a followed store looks for new shards."""

    manifest: str
    """Name of the manifest file to re-read."""
    producer: Any
    """The thread or process writing the store (with ``is_alive()``), or None when unknown."""
    timeout: float
    """Seconds without a new shard before giving up."""


def producer_of(follow: Any) -> Any:
    """The producer named by the `follow` argument of `ActivationStore.open` (None for True)."""
    if follow is True:
        return None
    if not callable(getattr(follow, "is_alive", None)):
        raise StoreError(f"follow must be True or the producer (a thread or process with is_alive()), got {follow!r}")
    return follow


def wait_for(
    ready: Callable[[], bool], producer: Any, timeout: float, what: str, progress: Callable[[], int] | None = None
) -> None:
    """Poll until `ready()`; StoreError when the producer died or `progress()` stood still for `timeout` s."""
    deadline, last = time.monotonic() + timeout, progress() if progress else None
    while not ready():
        if producer is not None and not producer.is_alive() and not ready():
            error = getattr(producer, "error", None)
            cause = f"it failed with {error!r}" if error is not None else "see its log"
            raise StoreError(
                f"the extraction writing the store stopped before finishing it ({cause}); fix the cause "
                "and resume the extraction: the shards written so far are kept"
            )
        if progress is not None and progress() != last:
            deadline, last = time.monotonic() + timeout, progress()
        if time.monotonic() > deadline:
            raise StoreError(
                f"{what} within {timeout:g} s: is the extraction still running? Resume it, or open "
                "the store with a longer timeout"
            )
        time.sleep(_POLL_S)
