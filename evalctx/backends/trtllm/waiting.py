"""Waiting for a TensorRT-LLM request's final response with a deadline the release cannot ignore, shared by the
LLM-API backend's requests and its KV-capacity probe."""

from __future__ import annotations

import threading
import time
from typing import Any

ABORT_GRACE_S = 60.0
"""After aborting, how long to wait for the aborted requests' final responses before giving up on the run."""


class Wait(threading.Thread):
    """``item.result()`` in a daemon thread: the caller can stop waiting at a deadline whatever the release does
    with ``result(timeout)``, and a result that never comes cannot keep the process alive at exit."""

    def __init__(self, item: Any) -> None:
        super().__init__(daemon=True, name="evalctx-trtllm-result")
        self.item = item
        self.error: BaseException | None = None
        self.ended_at: float | None = None

    def run(self) -> None:
        try:
            self.item.result()
        except BaseException as exc:  # reported by the caller as this request's row (or the run's error)
            self.error = exc
        self.ended_at = time.perf_counter()
