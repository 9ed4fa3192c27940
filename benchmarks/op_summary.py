"""Per-regime summaries of benchmarks/ops.py's cases (% of roofline, worst ratio to the floor,
ratios to the peers), shared by ops.py and readme_table.py; plain Python, no torch."""

from __future__ import annotations

import math
import statistics

ORDERS = ["contiguous", "random"]
REGIMES = [("decode T<=64", lambda t: t <= 64), ("T=256..512", lambda t: 256 <= t <= 512),
           ("T=2048", lambda t: t >= 2048)]


def geomean(xs):
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def summarize(rows):
    """One summary per (regime, order): geomean and median % of roofline (decode: >= 8 adapters
    used and weights beyond L2, as the targets are stated), the worst ratio to the floor, and the
    worst ratios to the peers (>= 1: loramux is faster)."""
    out = []
    for name, in_regime in REGIMES:
        for order in ORDERS:
            sel = [w for w in rows if in_regime(w["tokens"]) and w["order"] == order]
            if not sel:
                continue
            # decode roofline figures over the cases the target names: >= 8 adapters used, one
            # set of them larger than L2 (the rotation keeps every other case out of L2 only in part)
            roof = ([w for w in sel if w["weights_beyond_l2"] and w["adapters_used"] >= 8]
                    if name.startswith("decode") else sel)
            worst = max(sel, key=lambda w: w["ours_us"] / w["floor_us"])
            bmm = [w for w in sel if w["speedup_vs_bmm"]]
            out.append(dict(
                kind="summary", regime=name, order=order, cases=len(sel),
                geomean_pct_roofline=geomean([w["pct_roofline"] for w in roof]),
                median_pct_roofline=statistics.median([w["pct_roofline"] for w in roof]) if roof else None,
                roofline_cases=len(roof),
                worst_ratio_to_floor=worst["ours_us"] / worst["floor_us"],
                worst_case=f"{worst['hi']}->{worst['ho']} r{worst['r']} n{worst['adapters']} T{worst['tokens']}",
                geomean_speedup_vs_peft=geomean([w["speedup_vs_peft"] for w in sel]),
                min_speedup_vs_peft=min(w["speedup_vs_peft"] for w in sel),
                geomean_speedup_vs_bmm=geomean([w["speedup_vs_bmm"] for w in bmm]),
                min_speedup_vs_bmm=min((w["speedup_vs_bmm"] for w in bmm), default=None),
                slower_than_a_peer=sum(1 for w in sel if w["speedup_vs_peft"] < 1 or
                                       (w["speedup_vs_bmm"] or 2) < 1),
            ))
    return out
