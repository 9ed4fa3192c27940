"""A/B figures of a benchmarks/ops.py run (--ab, --ab-small, --ab-decode): for each environment
timed beside the default, the geomean of its time over the default's per group of rows (token
count, shape, rank, adapter count: --by), how many rows it made faster or slower by more than
--tol, and its worst and best rows. Plain Python, no torch.

    python benchmarks/ab_summary.py ops.json [--by tokens,adapters] [--tokens 16,64] [--tol 0.02]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

from op_summary import geomean

FIELDS = {"tokens": "T", "adapters": "n", "r": "r", "shape": "shape", "order": "order"}


def env_name(env: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(env.items()))


def ab_rows(rows):
    """(environment name, row, its time there / the default's) for every A/B timing of every row."""
    for w in rows:
        if w.get("ab_us"):
            yield env_name(w["ab_env"]), w, w["ab_us"] / w["ours_us"]
        for more in w.get("ab_more") or []:
            yield env_name(more["env"]), w, more["us"] / w["ours_us"]


def key_of(w, by):
    return tuple(f"{w['hi']}->{w['ho']}" if f == "shape" else w[f] for f in by)


def summarize_ab(rows, by=("tokens",), tol=0.02):
    """{environment: {"all": stats, "groups": {key: stats}, "worst": row, "best": row}}, where stats
    is (rows, geomean ratio, faster by more than tol, slower by more than tol); ratio < 1: faster."""
    per_env = defaultdict(list)
    for env, w, ratio in ab_rows(rows):
        per_env[env].append((w, ratio))

    def stats(items):
        ratios = [r for _, r in items]
        return (len(ratios), geomean(ratios), sum(r < 1 - tol for r in ratios), sum(r > 1 + tol for r in ratios))

    out = {}
    for env, items in per_env.items():
        groups = defaultdict(list)
        for w, r in items:
            groups[key_of(w, by)].append((w, r))
        out[env] = dict(all=stats(items), groups={k: stats(v) for k, v in sorted(groups.items())},
                        worst=max(items, key=lambda x: x[1]), best=min(items, key=lambda x: x[1]))
    return out


def describe(w) -> str:
    return f"{w['hi']}->{w['ho']} r{w['r']} n{w['adapters']} T={w['tokens']} {w['order']}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("ops_json")
    ap.add_argument("--by", default="tokens", help=f"comma-separated group fields of {sorted(FIELDS)}")
    ap.add_argument("--tokens", default="", help="only these token counts (comma-separated)")
    ap.add_argument("--tol", type=float, default=0.02, help="a row counts as faster / slower past this fraction")
    args = ap.parse_args()
    with open(args.ops_json) as f:
        rows = [w for w in (json.loads(line) for line in f if line.strip()) if w.get("kind") == "op"]
    if args.tokens:
        keep = {int(t) for t in args.tokens.split(",")}
        rows = [w for w in rows if w["tokens"] in keep]
    by = [b for b in args.by.split(",") if b]
    bad = [b for b in by if b not in FIELDS]
    if bad:
        ap.error(f"unknown --by field(s) {bad}; one of {sorted(FIELDS)}")
    for env, s in summarize_ab(rows, by, args.tol).items():
        n, g, faster, slower = s["all"]
        print(f"{env}: {n} rows, {g:.3f}x the default's time (geomean), {faster} faster / {slower} slower by > {args.tol:.0%}")
        for key, (n, g, faster, slower) in s["groups"].items():
            label = " ".join(f"{FIELDS[f]}={v}" for f, v in zip(by, key))
            print(f"  {label}: {g:.3f}x over {n} ({faster} faster, {slower} slower)")
        (w, r), (wb, rb) = s["worst"], s["best"]
        print(f"  worst {r:.3f}x {describe(w)}; best {rb:.3f}x {describe(wb)}")


if __name__ == "__main__":
    main()
