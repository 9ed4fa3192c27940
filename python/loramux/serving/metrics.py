"""The Executor's counters: requests by outcome, tokens, steps, and throughput over a recent window;
executor.metrics() adds the live figures (queue, running, KV memory, adapter cache)."""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Deque, Dict, Tuple


class Metrics:
    """Totals over the executor's life and tokens/s over the last `window_s` seconds of steps."""

    def __init__(self, window_s: float = 10.0):
        self.window_s = window_s
        self._lock = threading.Lock()
        self._recent: Deque[Tuple[float, int]] = deque()  # (step end time, tokens it made)
        self.totals: Dict[str, int] = dict(requests_submitted=0, requests_finished=0, requests_failed=0,
                                           requests_cancelled=0, prompt_tokens=0, generated_tokens=0,
                                           steps=0, prefill_chunks=0, prefill_forwards=0,
                                           step_errors=0)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, value in counts.items():
                self.totals[name] += value

    def step_done(self, tokens: int) -> None:
        now = time.perf_counter()
        with self._lock:
            self.totals["steps"] += 1
            self.totals["generated_tokens"] += tokens
            self._recent.append((now, tokens))
            while self._recent and self._recent[0][0] < now - self.window_s:
                self._recent.popleft()

    def tokens_per_s(self) -> float:
        """Tokens made over the window, per second of the window they span (0.0 when idle)."""
        with self._lock:
            now = time.perf_counter()
            while self._recent and self._recent[0][0] < now - self.window_s:
                self._recent.popleft()
            if len(self._recent) < 2:
                return 0.0
            span = self._recent[-1][0] - self._recent[0][0]
            made = sum(t for _, t in list(self._recent)[1:])
            return made / span if span > 0 else 0.0

    def snapshot(self) -> Dict[str, int]:
        with self._lock:
            return dict(self.totals)


__all__ = ["Metrics"]
