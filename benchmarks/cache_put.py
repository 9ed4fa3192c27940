"""Putting an adapter into the host tier (validate, scan, convert, pack, digest, host memory), in
GB/s of the image it lands as, beside a memcpy of the same number of bytes measured in the same run.

    python benchmarks/cache_put.py [--layers 32] [--rank 16] [--adapters 6] [--rounds 3] [--device cpu|cuda]

Adapters: Llama-8B projections (q, k, v, o, gate, up, down) at rank 16 on every layer, put as
float16 into a float16 cache and as float32 into a bfloat16 cache. "build" is the LoraCache
constructor, which allocates the host tier's whole pool (budget + staging reserve; pinned with a
CUDA device, the default when one is present), in GB/s of pool bytes beside a memcpy into fresh
memory; "cold" are the first puts after it (the tier filling up), "steady" puts evict the oldest
adapter (the tier full), both beside a memcpy into mapped memory; "in_place" are steady puts into a
tier of 2 adapters, whose staging reserve (1/4 of the budget) is smaller than one image, so each put
checks first, then evicts and packs in place (two passes over the weights). Prints JSON lines,
then a table.
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
        t0 = time.perf_counter()
        cache = LoraCache(spec, dtype=cache_dtype, host_cache_bytes=image_bytes * args.adapters, device=args.device,
                          device_cache_bytes=image_bytes, page_bytes=page, max_slots=4)
        build_seconds = time.perf_counter() - t0
        pool_bytes = cache.stats()["host_pool_bytes"]
        cold = timed_puts(cache, range(args.adapters), weights, config)
        s = cache.stats()
        assert s["host_bytes"] == image_bytes * args.adapters, (s["host_bytes"], image_bytes)
        steady = timed_puts(cache, range(args.adapters, args.adapters * (1 + args.rounds)), weights, config)
        s = cache.stats()
        assert s["host_evictions"] == args.adapters * args.rounds
        assert s["host_pool_grows"] == 0 and s["host_pool_bytes"] == pool_bytes, "a put allocated host memory"
        del cache
        small = LoraCache(spec, dtype=cache_dtype, host_cache_bytes=image_bytes * 2, device=args.device,
                          device_cache_bytes=image_bytes, page_bytes=page, max_slots=4)
        timed_puts(small, range(2), weights, config)
        in_place = timed_puts(small, range(2, 2 + args.adapters), weights, config)
        assert small.stats()["host_pool_grows"] == 0
        del small
        copy_warm = memcpy_gbps(image_bytes, 5, fresh=False)
        copy_fresh = memcpy_gbps(image_bytes, 5, fresh=True)
        emit(rows, bench="cache_put", case=case, phase="build", pool_bytes=pool_bytes, seconds=build_seconds,
             gbps=pool_bytes / build_seconds / 1e9, memcpy_gbps=copy_fresh, memcpy_kind="fresh memory",
             ratio_to_memcpy=pool_bytes / build_seconds / 1e9 / copy_fresh, pinned=s["host_pinned_adapters"] > 0, **common)
        for phase, secs in (("cold", cold), ("steady", steady), ("in_place", in_place)):
            best, median = min(secs), float(np.median(secs))
            emit(rows, bench="cache_put", case=case, phase=phase, image_bytes=image_bytes, input_bytes=weights.nbytes,
                 puts=len(secs), gbps_median=image_bytes / median / 1e9, gbps_best=image_bytes / best / 1e9,
                 memcpy_gbps=copy_warm, memcpy_kind="mapped memory", ratio_to_memcpy=image_bytes / median / 1e9 / copy_warm,
                 pinned_adapters=s["host_pinned_adapters"], **common)

    print()
    print(f"{'case':18} {'phase':8} {'GB/s med':>9} {'GB/s best':>9} {'memcpy':>8} {'ratio':>6}")
    for r in rows:
        med, best = (r["gbps"], r["gbps"]) if r["phase"] == "build" else (r["gbps_median"], r["gbps_best"])
        print(f"{r['case']:18} {r['phase']:8} {med:9.2f} {best:9.2f} {r['memcpy_gbps']:8.2f} {r['ratio_to_memcpy']:6.2f}")
    build, put = rows[0], rows[1]
    print(f"image {put['image_bytes'] / 2**20:.1f} MiB per adapter (rank {args.rank}, {args.layers} layers, 7 modules); "
          f"device {args.device}; put threads {threads} of {os.cpu_count()} CPUs; GB/s = image bytes / put seconds "
          f"(build: host pool bytes / constructor seconds, {build['pool_bytes'] / 2**20:.0f} MiB in {build['seconds']:.2f} s)")


if __name__ == "__main__":
    main()
