"""Small items merged into the pipelined kernels' 64-token tile (65..256 tokens, rank bucket 64): the
shrink only, both kernels, neither (the default), timed in one process on Llama-8B's projections,
tokens in random order, weights rotated beyond L2, graphed (tune.measure_count).

    python benchmarks/merge_ab.py --out merge_ab.jsonl [--tokens 256] [--adapters 1,8,32,128]
"""

from __future__ import annotations

import argparse
import json

import torch
from tune import SHAPES, measure_count

VARIANTS = [("shrink", {"LORAMUX_PIPE_MERGE": "shrink"}), ("both", {"LORAMUX_PIPE_MERGE": "both"}), ("none", {})]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="merge_ab.jsonl")
    ap.add_argument("--tokens", default="256")
    ap.add_argument("--ranks", default="64")
    ap.add_argument("--adapters", default="1,8,32,128")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    with open(args.out, "w") as out:
        for hi, sizes, mids in SHAPES:
            for r in (int(v) for v in args.ranks.split(",")):
                for T in (int(v) for v in args.tokens.split(",")):
                    for n in (int(v) for v in args.adapters.split(",")):
                        got = measure_count(hi, sizes, mids, r, T, n, l2, [env for _, env in VARIANTS])
                        row = dict(hi=hi, out_sizes=list(sizes), rank=r, tokens=T, adapters=n,
                                   us={name: g[0] for (name, _), g in zip(VARIANTS, got)},
                                   max_rel_err=max(e for _, e in got))
                        out.write(json.dumps(row) + "\n")
                        out.flush()
                        print(f"{hi}->{sizes} r{r} T{T} n{n}: " + " ".join(f"{k} {v:.1f}" for k, v in row["us"].items()),
                              flush=True)


if __name__ == "__main__":
    main()
