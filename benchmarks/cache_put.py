"""Putting an adapter into the host tier (validate, scan, convert, pack, digest, host memory), in
GB/s of the image it lands as, beside a memcpy of the same number of bytes measured in the same run.

    python benchmarks/cache_put.py [--layers 32] [--rank 16] [--adapters 6] [--rounds 3] [--device cpu|cuda]

Adapters: Llama-8B projections (q, k, v, o, gate, up, down) at rank 16 on every layer, put as
float16 into a float16 cache and as float32 into a bfloat16 cache. "cold" puts land in fresh host
memory (the tier is filling up); "steady" puts evict the oldest adapter and reuse its image's memory,
as a serving cache does once full. With a CUDA device (the default when one is present) the host
images are pinned. Prints JSON lines, then a table.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

import loramux
import loramux._core as _core
from loramux.cache import LoraCache

MODULES = (1, 2, 3, 4, 5, 6, 7)  # attn_q, attn_k, attn_v, attn_dense, mlp_h_to_4h, mlp_4h_to_h, mlp_gate


def emit(rows, **row):
    rows.append(row)
    print(json.dumps(row), flush=True)


def make_adapter(spec, rank, layers, dtype):
    config = np.array([[m, layer, rank] for layer in range(layers) for m in MODULES], dtype=np.int64)
    width = max(rank * (hi + ho) for hi, ho in (spec.module_dims(m) for m in MODULES))
    rng = np.random.default_rng(0)
    weights = (rng.standard_normal((len(config), width), dtype=np.float32) * 0.01).astype(dtype)
    return weights, config


def memcpy_gbps(nbytes, reps, fresh):
    """numpy copy of `nbytes` on one thread; into fresh memory each time when `fresh` (its page
    faults included, as for a cold put), else into one destination already mapped."""
    src = np.random.default_rng(1).integers(0, 255, nbytes, dtype=np.uint8)
    warm = np.empty_like(src)
    np.copyto(warm, src)
    best = float("inf")
    for _ in range(reps):
        dst = np.empty_like(src) if fresh else warm
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
        del dst
    return nbytes / best / 1e9


def timed_puts(cache, ids, weights, config):
    seconds = []
    for tid in ids:
        t0 = time.perf_counter()
        assert cache.put(tid, weights, config) == "inserted"
        seconds.append(time.perf_counter() - t0)
    return seconds


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, default=6, help="adapters the host tier holds")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="steady-state rounds of --adapters puts each")
    ap.add_argument("--page-kib", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    rows = []
    spec = loramux.ModelSpec(num_layers=args.layers, hidden_size=4096, num_heads=32, num_kv_heads=8, ffn_size=14336, max_rank=max(64, args.rank))
    page = args.page_kib << 10
    threads = _core.AdapterCache.worker_threads()
    common = dict(device=args.device, threads=threads, cpus=os.cpu_count(), rank=args.rank, layers=args.layers)
    for in_dtype, cache_dtype in ((np.float16, torch.float16), (np.float32, torch.bfloat16)):
        weights, config = make_adapter(spec, args.rank, args.layers, in_dtype)
        case = f"{np.dtype(in_dtype).name}->{str(cache_dtype).removeprefix('torch.')}"
        # Whole pages per module-layer segment (A and B are multiples of 16 bytes at these shapes).
        image_bytes = sum(-(-(args.rank * (hi + ho) * 2) // page) * page for hi, ho in (spec.module_dims(m) for m in MODULES)) * args.layers
        cache = LoraCache(spec, dtype=cache_dtype, host_cache_bytes=image_bytes * args.adapters, device=args.device,
                          device_cache_bytes=image_bytes, page_bytes=page, max_slots=4)
        cold = timed_puts(cache, range(args.adapters), weights, config)
        s = cache.stats()
        assert s["host_bytes"] == image_bytes * args.adapters, (s["host_bytes"], image_bytes)
        steady = timed_puts(cache, range(args.adapters, args.adapters * (1 + args.rounds)), weights, config)
        s = cache.stats()
        assert s["host_evictions"] == args.adapters * args.rounds
        copy_warm = memcpy_gbps(image_bytes, 5, fresh=False)
        copy_fresh = memcpy_gbps(image_bytes, 5, fresh=True)
        for phase, secs, ceiling in (("cold", cold, copy_fresh), ("steady", steady, copy_warm)):
            best, median = min(secs), float(np.median(secs))
            emit(rows, bench="cache_put", case=case, phase=phase, image_bytes=image_bytes, input_bytes=weights.nbytes,
                 puts=len(secs), gbps_median=image_bytes / median / 1e9, gbps_best=image_bytes / best / 1e9,
                 memcpy_gbps=ceiling, memcpy_kind="fresh memory" if phase == "cold" else "mapped memory",
                 ratio_to_memcpy=image_bytes / median / 1e9 / ceiling, pinned_adapters=s["host_pinned_adapters"], **common)

    print()
    print(f"{'case':18} {'phase':7} {'GB/s med':>9} {'GB/s best':>9} {'memcpy':>8} {'ratio':>6}")
    for r in rows:
        print(f"{r['case']:18} {r['phase']:7} {r['gbps_median']:9.2f} {r['gbps_best']:9.2f} {r['memcpy_gbps']:8.2f} {r['ratio_to_memcpy']:6.2f}")
    print(f"image {rows[0]['image_bytes'] / 2**20:.1f} MiB per adapter (rank {args.rank}, {args.layers} layers, 7 modules); "
          f"device {args.device}; put threads {threads} of {os.cpu_count()} CPUs; GB/s = image bytes / put seconds")


if __name__ == "__main__":
    main()
