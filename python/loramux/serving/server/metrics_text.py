"""Counters and histograms kept by the server, and the Prometheus text exposition format (version
0.0.4: `# HELP`, `# TYPE`, one `name{labels} value` line per sample) they and the executor's and
cache's figures are written in."""

from __future__ import annotations

import bisect
import math
import threading
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

Labels = Tuple[Tuple[str, str], ...]

#: seconds: from a few milliseconds (a GPU decode step) to a minute (a long CPU prefill)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Labels, extra: Sequence[Tuple[str, str]] = ()) -> str:
    items = list(labels) + list(extra)
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in items) + "}" if items else ""


def _number(value: float) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class Counter:
    """A total, unlabelled (reported from 0) or split by labels (a sample per label set seen)."""

    def __init__(self, name: str, help: str, labelled: bool = False):
        self.name, self.help = name, help
        self._values: Dict[Labels, float] = {} if labelled else {(): 0}
        self._lock = threading.Lock()

    def inc(self, amount: float = 1, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._values[key] = self._values.get(key, 0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(tuple(sorted(labels.items())), 0)

    def lines(self) -> List[str]:
        with self._lock:
            items = sorted(self._values.items())
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        return out + [f"{self.name}{_labels(k)} {_number(v)}" for k, v in items]


class Histogram:
    def __init__(self, name: str, help: str, buckets: Sequence[float]):
        self.name, self.help = name, help
        self.bounds = sorted(buckets)
        self._counts = [0] * (len(self.bounds) + 1)  # the last one: above every bound (+Inf)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: Optional[float]) -> None:
        if value is None or not math.isfinite(value):
            return
        with self._lock:
            self._counts[bisect.bisect_left(self.bounds, value)] += 1
            self._sum += value

    @property
    def count(self) -> int:
        return sum(self._counts)

    def lines(self) -> List[str]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, n in zip(self.bounds + [math.inf], counts):
            cumulative += n
            out.append(f'{self.name}_bucket{{le="{_number(float(bound))}"}} {cumulative}')
        return out + [f"{self.name}_sum {_number(total)}", f"{self.name}_count {cumulative}"]


def gauge_lines(name: str, help: str, value: float, kind: str = "gauge") -> List[str]:
    """One unlabelled sample of a value read at scrape time (kind: gauge, or counter for a total)."""
    return [f"# HELP {name} {help}", f"# TYPE {name} {kind}", f"{name} {_number(value)}"]


def render(blocks: Iterable[List[str]]) -> str:
    return "\n".join(line for block in blocks for line in block) + "\n"


__all__ = ["Counter", "Histogram", "gauge_lines", "render", "TTFT_BUCKETS", "TPOT_BUCKETS"]
