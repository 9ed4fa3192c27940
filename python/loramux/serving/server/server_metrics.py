"""What GET /metrics reports: the server's request and token counters and its TTFT/TPOT histograms,
with the executor's figures (queue depth, running requests, KV bytes) and the adapter cache's (hits,
misses, evictions, loads, host and device tier bytes) read at scrape time."""

from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping

from loramux.serving.server.metrics_text import (TPOT_BUCKETS, TTFT_BUCKETS, Counter, Histogram, gauge_lines,
                                                 render)

#: cache stats that only grow: Prometheus counters (the others are levels: gauges)
CACHE_TOTALS = {"puts", "put_hits", "replacements", "hits", "misses", "host_evictions", "device_evictions",
                "evictions", "loads", "load_bytes", "load_bytes_timed", "load_seconds"}


def _flat_numbers(prefix: str, values: Mapping[str, Any]) -> Dict[str, float]:
    """name -> number for the numeric entries of a (possibly nested) dict; names made Prometheus-safe."""
    out: Dict[str, float] = {}
    for key, value in values.items():
        name = re.sub(r"[^a-zA-Z0-9_]", "_", f"{prefix}_{key}")
        if isinstance(value, Mapping):
            out.update(_flat_numbers(name, value))
        elif isinstance(value, (int, float)) and not isinstance(value, complex):
            out[name] = value
    return out


class ServerMetrics:
    def __init__(self):
        self.requests = Counter("loramux_requests_total", "HTTP requests answered, by endpoint and status",
                                labelled=True)
        self.finished = Counter("loramux_request_finished_total", "generation requests finished, by finish reason",
                                labelled=True)
        self.prompt_tokens = Counter("loramux_prompt_tokens_total", "prompt tokens of finished generation requests")
        self.cancelled = Counter("loramux_requests_cancelled_total", "requests cancelled while running (their client "
                                 "went away, or another choice of their call failed)")
        self.generation_tokens = Counter("loramux_generation_tokens_total", "tokens generated")
        self.ttft = Histogram("loramux_time_to_first_token_seconds", "time to first token", TTFT_BUCKETS)
        self.tpot = Histogram("loramux_time_per_output_token_seconds", "time per output token after the first",
                              TPOT_BUCKETS)

    def observe_result(self, result: Any) -> None:
        self.finished.inc(finish_reason=str(getattr(result, "finish_reason", None) or "unknown"))
        self.prompt_tokens.inc(int(getattr(result, "prompt_tokens", 0) or 0))
        self.generation_tokens.inc(len(getattr(result, "token_ids", None) or []))
        self.ttft.observe(getattr(result, "ttft_s", None))
        self.tpot.observe(getattr(result, "tpot_s", None))

    def text(self, executor_metrics: Mapping[str, Any], cache_stats: Mapping[str, Any],
             levels: Mapping[str, float]) -> str:
        """The exposition: own metrics, then `levels` (name -> value, gauges), the executor's and the
        cache's figures."""
        blocks: List[List[str]] = [self.requests.lines(), self.finished.lines(), self.cancelled.lines(),
                                   self.prompt_tokens.lines(), self.generation_tokens.lines(), self.ttft.lines(),
                                   self.tpot.lines()]
        blocks += [gauge_lines(name, name.replace("_", " "), value) for name, value in levels.items()]
        for name, value in _flat_numbers("loramux_executor", executor_metrics).items():
            blocks.append(gauge_lines(name, "executor figure " + name[len("loramux_executor_"):], value))
        for key, value in _flat_numbers("", cache_stats).items():
            key = key.lstrip("_")
            if key in CACHE_TOTALS:
                blocks.append(gauge_lines(f"loramux_cache_{key}_total", f"adapter cache {key}", value, "counter"))
            else:
                blocks.append(gauge_lines(f"loramux_cache_{key}", f"adapter cache {key}", value))
        return render(blocks)


__all__ = ["ServerMetrics", "CACHE_TOTALS"]
