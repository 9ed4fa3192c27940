"""Roofline PNG from benchmarks/ops.py's JSON lines: achieved TFLOP/s of loramux's kernels (and the
two peers) against arithmetic intensity, under the HBM and tensor-core roofs measured in the same run.

    python benchmarks/plot.py ops.json roofline.png
"""

from __future__ import annotations

import json
import sys


def main(src: str, dst: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(src)]
    ceil = next(r for r in rows if r.get("kind") == "ceilings")
    ops = [r for r in rows if r.get("kind") == "op"]
    bw, peak = ceil["copy_bw_gbs"] * 1e9, ceil["bf16_tflops"] * 1e12
    fig, ax = plt.subplots(figsize=(9, 6))
    ai = [r["flops"] / r["bytes"] for r in ops]
    lo, hi = min(ai) / 2, max(ai) * 2
    xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    ax.plot(xs, [min(peak, bw * x) / 1e12 for x in xs], "k-", lw=1.5,
            label=f"roof: {bw / 1e12:.2f} TB/s copy, {peak / 1e12:.0f} TFLOP/s bf16")
    for key, marker, name in (("ours_us", "o", "loramux"), ("gather_bmm_us", "^", "gather+bmm"),
                              ("peft_loop_us", "x", "PEFT-style loop")):
        pts = [(r["flops"] / r["bytes"], r["flops"] / (r[key] * 1e-6) / 1e12, r["tokens"]) for r in ops if r.get(key)]
        sc = ax.scatter([p[0] for p in pts], [p[1] for p in pts], c=[p[2] for p in pts], marker=marker, s=18,
                        cmap="viridis", norm=matplotlib.colors.LogNorm(1, 2048), label=name, alpha=0.8)
    fig.colorbar(sc, ax=ax, label="tokens T")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte that must move)")
    ax.set_ylabel("achieved TFLOP/s")
    ax.set_title(f"LoRA shrink+expand, Llama-8B module shapes, {ceil['gpu']}")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(dst, dpi=120)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "ops.json", sys.argv[2] if len(sys.argv) > 2 else "roofline.png")
