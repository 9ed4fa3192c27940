"""The README's kernel benchmark table, decode-step line and targets are benchmarks/readme_table.py's
output for the JSON its command names, not typed by hand; the targets say met only where every
token order meets them."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
COMMAND = re.compile(r"python benchmarks/readme_table\.py\s+(\S+)\s+--decode\s+(\S+)\s+--no-cases")

pytestmark = pytest.mark.skipif(not (BENCH / "readme_table.py").is_file(), reason="not run from a source checkout")


@pytest.fixture
def readme_table(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import readme_table

    return readme_table


def test_the_readme_holds_the_generated_table(readme_table):
    readme = (ROOT / "README.md").read_text()
    found = COMMAND.search(readme)
    assert found, "the README names no readme_table.py command"
    ops_json, decode_json = (ROOT / p for p in found.groups())
    text = readme_table.table(readme_table.read_lines(ops_json), readme_table.read_lines(decode_json)[-1], cases=False)
    assert "Against the kernels' targets" in text
    assert text in readme, "README's benchmark table differs from readme_table.py's output: regenerate it"


def _summary(regime, order, median, worst=2.0, min_peft=2.0, min_bmm=2.0):
    return {"regime": regime, "order": order, "median_pct_roofline": median, "worst_ratio_to_floor": worst,
            "min_speedup_vs_peft": min_peft, "min_speedup_vs_bmm": min_bmm}


def _row(lines, start):
    return next(line for line in lines if line.startswith(f"| {start}"))


def test_a_target_is_met_only_in_both_orders(readme_table):
    sums = [_summary("T=256..512", "contiguous", 55.0), _summary("T=256..512", "random", 49.0),
            _summary("T=2048", "contiguous", 61.0, worst=2.4), _summary("T=2048", "random", 62.0, worst=2.6),
            _summary("decode T<=64", "contiguous", 61.0), _summary("decode T<=64", "random", 60.0)]
    lines = readme_table.targets(sums, {"overhead_over_floor": 1.4})
    assert _row(lines, "T=256..512").endswith("| 55.0 / 49.0 % | missed |")
    assert _row(lines, "T=2048").endswith("| 61.0 / 62.0 %, worst 2.4x / 2.6x | missed |")
    assert _row(lines, "decode T<=64").endswith("| met |")
    assert _row(lines, "decode-step").endswith("| 1.4x | met |")
    assert _row(lines, "no case slower").endswith("| none slower | met |")


def test_a_regime_slower_than_a_peer_misses(readme_table):
    sums = [_summary("T=2048", "random", 70.0, min_bmm=0.9)]
    lines = readme_table.targets(sums)
    assert _row(lines, "no case slower").endswith("| slower cases in 1 of 1 regime rows | missed |")
    assert not any(line.startswith("| decode-step") for line in lines)


def _results(readme_table, name):
    return readme_table.read_lines(ROOT / "benchmarks/results" / name)


def test_a_decode_run_from_another_gpu_is_named(readme_table):
    ops = _results(readme_table, "ops-h200-s17-signal.json")
    h100, h200 = _results(readme_table, "decode-h100-s23-beside.json")[-1], _results(readme_table, "decode-h200-s16j.json")[-1]
    assert "graphed, on NVIDIA H100 80GB HBM3)" in readme_table.table(ops, h100, cases=False)
    assert "graphed)" in readme_table.table(ops, h200, cases=False)
    dated = dict(h100, date="2026-12-05 10:29 UTC", commit="1a6aee3")
    assert "graphed, on NVIDIA H100 80GB HBM3, 2026-12-05 10:29 UTC, commit 1a6aee3)" in readme_table.table(ops, dated, cases=False)
    # the SMs kept from the base GEMM beside a branch, where the run recorded them
    assert "(`Engine.lora_beside_base`): overhead" in readme_table.table(ops, h100, cases=False)
    carved = _results(readme_table, "decode-h100-s24-carveout.json")[-1]
    assert "(`Engine.lora_beside_base`, the GEMM on all but 16 SMs): overhead 285 us" in readme_table.table(ops, carved, cases=False)
