"""benchmarks/ab_summary.py reads an ops.py run's A/B timings as the kernel notes quote them: on
s17's run B (recorded in benchmarks/results), the grid wait against the per-item signal at 1024 and
2048 tokens and the signal forced on below 512 tokens."""

import json
import pathlib

import pytest

BENCH = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"
RUN_B = BENCH / "results" / "ops-h200-s17-signal.json"

pytestmark = pytest.mark.skipif(not RUN_B.is_file(), reason="not run from a source checkout")


@pytest.fixture
def ab(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import ab_summary

    return ab_summary


def _rows(tokens):
    with open(RUN_B) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [w for w in rows if w.get("kind") == "op" and w["tokens"] in tokens]


def test_the_grid_wait_against_the_signal_past_512_tokens(ab):
    s = ab.summarize_ab(_rows({1024, 2048}), by=("shape",))
    n, g, faster, slower = s["LORAMUX_PIPE_SIGNAL=0"]["all"]
    assert n == 96 and g == pytest.approx(1.020, abs=5e-4)  # the signal: 0.98x the time (kernel notes, s17)
    assert faster + slower <= n and slower > faster
    groups = s["LORAMUX_PIPE_SIGNAL=0"]["groups"]
    assert set(groups) == {("4096->4096",), ("4096->14336",), ("14336->4096",)}
    assert sum(v[0] for v in groups.values()) == 96
    assert groups[("4096->4096",)][1] == pytest.approx(0.998, abs=5e-4)


def test_the_signal_forced_on_below_512_tokens_at_one_adapter(ab):
    s = ab.summarize_ab(_rows({16, 64}), by=("tokens", "adapters"))["LORAMUX_PIPE_SIGNAL=1"]
    assert s["groups"][(16, 1)][1] == pytest.approx(1.085, abs=5e-4)
    assert s["groups"][(64, 1)][1] == pytest.approx(1.096, abs=5e-4)
    worst_row, worst = s["worst"]
    assert worst == pytest.approx(1.269, abs=5e-4) and (worst_row["adapters"], worst_row["tokens"]) == (1, 64)
    assert s["best"][1] <= s["all"][1] <= worst
