"""The pipelined expand's built-in span rule against prefill-6's on fused projections of models the
launch table holds no entry for (Qwen2-7B: hidden 3584, q|k|v 3584/512/512, gate|up 2 x 18944; a
5120-hidden model: q|k|v 5120/1024/1024, gate|up 2 x 13824) and on Llama-8B's (where the table's
entry is timed too), table off, tokens in random order, weights rotated beyond L2, graphed: the
same lora_apply under each environment in one process (tune.measure_count).

    python benchmarks/span_ab.py --out span_ab.jsonl [--tokens 512,2048] [--ranks 16,64]
"""

from __future__ import annotations

import argparse
import json

import torch
from tune import measure_count

from loramux.ops import tuning

# (name, Hi, output slices, module ids): 1 q, 2 k, 3 v, 5 gate (mlp_h_to_4h), 7 up (mlp_gate)
SHAPES = [("qwen2-7b q|k|v", 3584, (3584, 512, 512), (1, 2, 3)), ("qwen2-7b gate|up", 3584, (18944, 18944), (5, 7)),
          ("5120 q|k|v", 5120, (5120, 1024, 1024), (1, 2, 3)), ("5120 gate|up", 5120, (13824, 13824), (5, 7)),
          ("llama-8b q|k|v", 4096, (4096, 1024, 1024), (1, 2, 3)), ("llama-8b gate|up", 4096, (14336, 14336), (5, 7))]
NEW = {"LORAMUX_TUNING": "off"}
OLD = {"LORAMUX_TUNING": "off", "LORAMUX_PIPE_SPAN_RULE": "old"}
TABLE = {}  # the shipped launch table decides (Llama-8B's shapes hold entries)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="span_ab.jsonl")
    ap.add_argument("--tokens", default="512,2048")
    ap.add_argument("--ranks", default="16,64")
    ap.add_argument("--adapters", default="1,8")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    with open(args.out, "w") as out:
        for name, hi, sizes, mids in SHAPES:
            for r in (int(v) for v in args.ranks.split(",")):
                for T in (int(v) for v in args.tokens.split(",")):
                    envs = [NEW, OLD] + ([TABLE] if name.startswith("llama") else [])
                    for n in (int(v) for v in args.adapters.split(",")):
                        got = measure_count(hi, sizes, mids, r, T, n, l2, envs)
                        row = dict(shape=name, hi=hi, out_sizes=list(sizes), rank=r, tokens=T, adapters=n,
                                   new_us=got[0][0], old_us=got[1][0], table_us=got[2][0] if len(got) > 2 else None,
                                   max_rel_err=max(e for _, e in got),
                                   table_choice=tuning.choice(90, hi, sizes, r, T).expand_kernel)
                        out.write(json.dumps(row) + "\n")
                        out.flush()
                        print(f"{name:18s} r{r:<3d} T{T:<5d} n{n:<3d} new {row['new_us']:7.1f} old {row['old_us']:7.1f} us"
                              f" old/new {row['old_us'] / row['new_us']:.3f}"
                              + (f" table {row['table_us']:7.1f}" if row["table_us"] else ""), flush=True)


if __name__ == "__main__":
    main()
