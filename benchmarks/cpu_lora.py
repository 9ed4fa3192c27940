"""The CPU LoRA paths side by side: the grouped reference (a few torch ops per adapter and slice),
loramux.ops.stacked (adapters stacked, tokens grouped by adapter: one bmm per side) and
loramux.ops.per_adapter (a GEMM per adapter over weights copied once, expands in place), per
token count, over SmolLM2-135M's projection shapes and the serving benchmark's adapters (ranks 8
and 16), tokens in random order, one BatchMeta (as a step shares it across layers); stacks built
(cold) and reused (warm, a later step over the same adapters). Decides loramux.ops.stacked's
MAX_TOKENS (above it lora_apply takes per_adapter). JSON lines on stdout.

    python benchmarks/cpu_lora.py [--adapters 8] [--tokens 1,8,32,64,128,256,512] [--order random|prompts]

--order random: one token per request, adapters in request order (a decode step); prompts: prompts of
5..300 tokens packed one after another, an adapter per prompt (a packed prefill).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform

import torch

from _common import median_seconds, random_adapter, resident_adapters

import loramux
from loramux.ops import per_adapter, reference, stacked

# SmolLM2-135M: hidden 576, 9 heads of 64, 3 KV heads, FFN 1536
SMOLLM2 = dict(hidden_size=576, num_heads=9, num_kv_heads=3, head_dim=64, ffn_size=1536)
SLICES = {"q|k|v": [1, 2, 3], "gate|up": [5, 6], "down": [7]}


def _assignment(tokens: int, adapters: int, order: str, gen: torch.Generator) -> list:
    """Each token's adapter (None: no adapter, every ninth request as in benchmarks/serving.py)."""
    if order == "random":
        which = torch.randint(0, adapters, (tokens,), generator=gen).tolist()
        return [None if i % 9 == 8 else a for i, a in enumerate(which)]
    which, request = [], 0
    while len(which) < tokens:
        adapter = None if request % 9 == 8 else int(torch.randint(0, adapters, (1,), generator=gen))
        which += [adapter] * int(torch.randint(5, 301, (1,), generator=gen))
        request += 1
    return which[:tokens]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--tokens", default="1,8,32,64,128,256,512")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--order", default="random", choices=["random", "prompts"])
    args = p.parse_args()
    spec = loramux.ModelSpec(num_layers=1, max_rank=16, **SMOLLM2)
    adapters = [random_adapter(spec, range(1, 8), [0], 8 if k % 2 else 16, dtype=torch.float32, seed=k)
                for k in range(args.adapters)]
    resident = resident_adapters(spec, adapters, dtype=torch.float32, device="cpu")
    gen = torch.Generator().manual_seed(0)
    for tokens in [int(t) for t in args.tokens.split(",")]:
        which = _assignment(tokens, args.adapters, args.order, gen)
        for name, ids in SLICES.items():
            dims = [spec.module_dims(m) for m in ids]
            hi, sizes = dims[0][0], [ho for _, ho in dims]
            x = torch.randn(tokens, hi, generator=gen)
            y = torch.zeros(tokens, sum(sizes))

            # one BatchMeta per step, read by every apply of it: its token layout is built here, once
            meta = resident.meta(which)
            meta.token_groups, meta.slot_entries, meta.adapter_rows

            def grouped():
                reference.expand(reference.shrink(x, meta, 0, ids), y, meta, 0, ids, sizes)

            def stacked_cold():  # the batch's first step: stacks built
                stacked.apply(x, y, dataclasses.replace(meta, derived={}), 0, ids, sizes)

            warm = dataclasses.replace(meta, derived={})

            def stacked_warm():  # later steps over the same adapters: stacks reused
                stacked.apply(x, y, warm, 0, ids, sizes)

            def per_adapter_warm():  # weights copied once per set of adapters, as the stacks
                per_adapter.apply(x, y, warm, 0, ids, sizes)

            timed = {key: median_seconds(fn, reps=args.reps, device="cpu") * 1e6 for key, fn in
                     (("grouped_us", grouped), ("stacked_cold_us", stacked_cold), ("stacked_us", stacked_warm),
                      ("per_adapter_us", per_adapter_warm))}
            row = {"kind": "cpu_lora", "tokens": tokens, "adapters": args.adapters, "slices": name, **timed,
                   "order": args.order, "stacked_serves": stacked.serves(meta, tokens),
                   "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()}
            row["grouped_over_stacked"] = row["grouped_us"] / row["stacked_us"]
            row["per_adapter_over_stacked"] = row["per_adapter_us"] / row["stacked_us"]
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
