"""Where a kernel's warps stall, from Nsight Compute's source page (SASS lines): the stall reasons
over the whole kernel, its hottest lines, and the samples and executed instructions per window of
lines (which part of a loop costs what). Input: the CSV of
`ncu -i report.ncu-rep --page source --csv --print-source sass` (a report taken with --set full).

    python benchmarks/ncu_source.py src.csv [--top 25] [--window 40]
"""

import argparse
import collections
import csv


def kernels(path):
    """{kernel name: [row dict per SASS line]} of one source-page CSV."""
    out, rows, header = {}, None, None
    with open(path) as f:
        for line in f.read().splitlines():
            if line.startswith('"Kernel Name"'):
                rows = out.setdefault(line.split(",")[1].strip('"'), [])
                header = None
                continue
            fields = next(csv.reader([line]), [])
            if fields and fields[0] == "Address":
                header = fields
            elif rows is not None and header:
                rows.append(dict(zip(header, fields)))
    return out


def _int(row, key):
    return int(row.get(key) or 0)


def report(name, rows, top, window):
    samples = "Warp Stall Sampling (All Samples)"
    total = max(1, sum(_int(r, samples) for r in rows))
    reasons = [c for c in rows[0] if c.startswith("stall_") and "Not Issued" not in c]
    by_reason = collections.Counter({c[6:]: sum(_int(r, c) for r in rows) for c in reasons})
    print(f"== {name}: {total} samples, {sum(_int(r, 'Instructions Executed') for r in rows)} warp instructions")
    print("   " + ", ".join(f"{k} {v * 100 / total:.1f}%" for k, v in by_reason.most_common(8)))
    hot = sorted(range(len(rows)), key=lambda i: -_int(rows[i], samples))[:top]
    for i in sorted(hot):
        r = rows[i]
        why = sorted(((_int(r, c), c[6:]) for c in reasons), reverse=True)[:2]
        print(f"  {i:5d} {_int(r, samples) * 100 / total:5.1f}% ex={r['Instructions Executed']:>8} {r['Source'].strip()[:58]:58s} {why}")
    print(f"  per {window} lines: samples, executed instructions")
    for start in range(0, len(rows), window):
        part = rows[start:start + window]
        s, ex = sum(_int(r, samples) for r in part), sum(_int(r, "Instructions Executed") for r in part)
        if s or ex:
            print(f"  {start:5d}-{start + window - 1:5d} {s * 100 / total:5.1f}% {ex:9d}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--window", type=int, default=40)
    args = ap.parse_args()
    for name, rows in kernels(args.csv).items():
        if rows:
            report(name, rows, args.top, args.window)


if __name__ == "__main__":
    main()
