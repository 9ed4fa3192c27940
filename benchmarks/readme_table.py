"""Writes the README's kernel benchmark table (markdown) from benchmarks/ops.py's JSON lines, and
the decode step's figures from benchmarks/decode_step.py's JSON when given: never typed by hand.

    python benchmarks/readme_table.py ops.json [--decode decode.json] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from op_summary import summarize  # noqa: E402


def _fmt(v, spec=".1f", none="-"):
    return none if v is None else format(v, spec)


def read_lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def table(ops_lines, decode=None, cases=True) -> str:
    head = next(x for x in ops_lines if x.get("kind") == "ceilings")
    rows = [x for x in ops_lines if x.get("kind") == "op"]
    # a run cut short has cases but no summary lines: summarize the cases it has
    sums = [x for x in ops_lines if x.get("kind") == "summary"] or summarize(rows)
    out = [
        f"Measured on {head['gpu']} ({head['sms']} SMs), {head.get('date', 'date not recorded')}, "
        f"commit {head.get('commit') or 'not recorded'}, torch {head['torch']}; ceilings measured in the same "
        f"run: copy {head['copy_bw_gbs']:.0f} GB/s, bf16 matmul {head['bf16_tflops']:.0f} TFLOP/s. "
        f"{len(rows)} cases (grid `{head.get('grid', 'full')}`), bf16, every method in a CUDA graph, "
        f"adapters rotated beyond L2. Speedups > 1: loramux is faster.",
        "",
        "| regime | token order | cases | % of roofline (geomean / median) | worst vs floor | vs PEFT loop (geomean / min) | vs gather+bmm (geomean / min) | slower than a peer |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in sums:
        out.append(
            f"| {s['regime']} | {s['order']} | {s['cases']} | {_fmt(s['geomean_pct_roofline'])} / "
            f"{_fmt(s['median_pct_roofline'])} % | {s['worst_ratio_to_floor']:.1f}x ({s['worst_case']}) | "
            f"{_fmt(s['geomean_speedup_vs_peft'], '.2f')}x / {_fmt(s['min_speedup_vs_peft'], '.2f')}x | "
            f"{_fmt(s['geomean_speedup_vs_bmm'], '.2f')}x / {_fmt(s['min_speedup_vs_bmm'], '.2f')}x | "
            f"{s['slower_than_a_peer']} |")
    if rows and cases:
        out += ["", "| Hi->Ho | r | adapters | T | order | loramux us | floor us | % roofline | PEFT loop us | gather+bmm us |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for w in rows:
            out.append(f"| {w['hi']}->{w['ho']} | {w['r']} | {w['adapters']} | {w['tokens']} | {w['order']} | "
                       f"{w['ours_us']:.1f} | {w['floor_us']:.1f} | {w['pct_roofline']:.0f}% | "
                       f"{w['peft_loop_us']:.1f} | {_fmt(w['gather_bmm_us'])} |")
    if decode:
        d = decode
        # a decode run from another GPU than the kernel table's says which; its date and commit
        # where the run recorded them (decode_step.py --commit)
        provenance = f", on {d['gpu']}" if d.get("gpu") and d["gpu"] != head["gpu"] else ""
        provenance += "".join(f", {label}{d[key]}" for key, label in (("date", ""), ("commit", "commit ")) if d.get(key))
        out += ["", f"Decode step ({d['layers']} Llama-8B layers, batch {d['batch']}, {d['adapters']} adapters "
                f"r={d['rank']} on 7 projections, graphed{provenance}): base {d['base_us']:.0f} us, with LoRA {d['lora_us']:.0f} us, "
                f"overhead {d['overhead_us']:.0f} us = {d['overhead_over_floor']:.1f}x its {d['lora_floor_us']:.0f} us "
                f"bytes floor" + (f"; PEFT {d['peft_us'] / 1e3:.0f} ms" if d.get("peft_us") else "") + "."]
        if d.get("overhead_beside_us") is not None:
            # the SMs kept from that GEMM, where the run recorded them (gemm_carveout.py)
            carveout = f", the GEMM on all but {d['beside_sm_carveout']} SMs" if d.get("beside_sm_carveout") else ""
            out[-1] += (f" With each projection's LoRA branch on a side stream beside its base GEMM "
                        f"(`Engine.lora_beside_base`{carveout}): overhead {d['overhead_beside_us']:.0f} us = "
                        f"{d['overhead_beside_over_floor']:.1f}x.")
        if d.get("overhead_static_us") is not None and d.get("overhead_static_beside_us") is not None:
            # before the merge kernel (no default_beside key) a static batch ran only its shrinks beside
            how = "with the branch beside" if "default_beside" in d else "with only the shrinks beside"
            out[-1] += (f" A static batch (as the serving graphs capture it): {d['overhead_static_us']:.0f} us in order, "
                        f"{d['overhead_static_beside_us']:.0f} us {how}.")
        if d.get("default_beside"):
            out[-1] += " The engine runs the branch beside by default at this batch."
    if sums:
        out += ["", *targets(sums, decode)]
    return "\n".join(out) + "\n"


# The kernels' targets (H200, graphed, both token orders): regime -> (least median % of the
# roofline, most times the floor for its worst case or None)
TARGETS = {"decode T<=64": (60.0, None), "T=256..512": (50.0, None), "T=2048": (60.0, 2.5)}
DECODE_STEP_TARGET = 1.5  # most times its bytes floor for the decode step's LoRA overhead


def targets(sums, decode=None):
    """The table of targets against the run: each regime's medians (one per token order) and worst
    case, the decode step, the rows slower than the PEFT loop or gather+bmm."""
    out = ["Against the kernels' targets (the runs above, both token orders):", "",
           "| target | measured | |", "|---|---|---|"]
    if decode:
        in_order, beside = decode["overhead_over_floor"], decode.get("overhead_beside_over_floor")
        if decode.get("default_beside") and beside is not None:  # the engine's default form meets the target or not
            met, shown = beside <= DECODE_STEP_TARGET, f"{beside:.1f}x beside the base GEMM, the default ({in_order:.1f}x in order)"
        else:
            met = in_order <= DECODE_STEP_TARGET
            shown = f"{in_order:.1f}x" + (f" ({beside:.1f}x beside the base GEMM)" if beside else "")
        out.append(f"| decode-step LoRA overhead <= {DECODE_STEP_TARGET}x its bytes floor | {shown} | {'met' if met else 'missed'} |")
    for regime, (median, worst) in TARGETS.items():
        rows = [s for s in sums if s["regime"] == regime]
        if not rows:
            continue
        medians = [s["median_pct_roofline"] for s in rows]
        met = all(m is not None and m >= median for m in medians)
        text = " / ".join(_fmt(m) for m in medians) + " %"
        goal = f"median >= {median:.0f} % of the roofline"
        if worst is not None:
            ratios = [s["worst_ratio_to_floor"] for s in rows]
            met = met and all(r <= worst for r in ratios)
            text += ", worst " + " / ".join(f"{r:.1f}x" for r in ratios)
            goal += f", worst within {worst}x of the floor"
        out.append(f"| {regime}: {goal} | {text} | {'met' if met else 'missed'} |")
    slower = sum(1 for s in sums if any(s.get(key) is not None and s[key] < 1.0
                                        for key in ("min_speedup_vs_peft", "min_speedup_vs_bmm")))
    found = "none slower" if not slower else f"slower cases in {slower} of {len(sums)} regime rows"
    out.append(f"| no case slower than the PEFT loop or gather+bmm | {found} | {'met' if not slower else 'missed'} |")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("ops_json")
    ap.add_argument("--decode", help="decode_step.py's JSON")
    ap.add_argument("--out", help="markdown file to write (default: stdout)")
    ap.add_argument("--no-cases", action="store_true", help="the summary table only, not every case")
    args = ap.parse_args(argv)
    decode = read_lines(args.decode)[-1] if args.decode else None
    text = table(read_lines(args.ops_json), decode, cases=not args.no_cases)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
