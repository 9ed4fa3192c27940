"""Adapter loads host -> GPU through loramux's cache, as a share of the pinned H2D bandwidth that
torch reaches in the same process, alone and while a compute kernel (a big matmul) runs.

    python benchmarks/cache_gpu.py [--adapters 8] [--rank 16] [--layers 32] [--page-kib 64]

Adapters: Llama-8B projections (q, k, v, o, gate, up, down), fp16. The pool holds half of them, so
every acquire in the cycle is a miss that evicts and loads. Prints JSON lines, then a table.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from _common import h2d_bandwidth, llama_spec, random_adapter

from loramux.cache import LoraCache

MODULES = (1, 2, 3, 4, 5, 6, 7)  # attn_q, attn_k, attn_v, attn_dense, mlp_h_to_4h, mlp_4h_to_h, mlp_gate


def emit(rows, **row):
    rows.append(row)
    print(json.dumps(row), flush=True)


def load_cycle(cache, ids):
    """Acquires each id in turn (each a miss) and waits for its copy; (GB/s wall, GB/s copy-stream)."""
    before = cache.stats()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for tid in ids:
        with cache.acquire([tid]):
            pass
    cache.synchronize()
    wall = time.perf_counter() - t0
    after = cache.stats()
    assert after["misses"] - before["misses"] == len(ids), "expected every acquire to load"
    moved = after["load_bytes"] - before["load_bytes"]
    timed = after["load_bytes_timed"] - before["load_bytes_timed"]
    secs = after["load_seconds"] - before["load_seconds"]
    return moved / wall / 1e9, (timed / secs / 1e9 if secs > 0 else float("nan")), moved


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--page-kib", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--matmul", type=int, default=8192, help="square fp16 matmul size for the overlap run")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"

    rows = []
    gpu = torch.cuda.get_device_name()
    spec = llama_spec(args.layers, max(64, args.rank))
    weights, config = random_adapter(spec, MODULES, range(args.layers), args.rank, dtype=torch.float16)
    page = args.page_kib << 10
    # Whole pages per module-layer segment (A and B are multiples of 16 bytes at these shapes).
    per_adapter = sum(-(-(args.rank * (hi + ho) * 2) // page) * page for hi, ho in (spec.module_dims(m) for m in MODULES)) * args.layers
    cache = LoraCache(
        spec,
        host_cache_bytes=per_adapter * args.adapters + (1 << 20),
        device="cuda",
        device_cache_bytes=per_adapter * max(1, args.adapters // 2),
        page_bytes=page,
        max_slots=args.adapters,
    )
    t0 = time.perf_counter()
    for tid in range(args.adapters):
        cache.put(tid, weights, config)
    put_s = time.perf_counter() - t0
    s = cache.stats()
    assert s["host_bytes"] == per_adapter * args.adapters, (s["host_bytes"], per_adapter)
    emit(rows, bench="put", gpu=gpu, adapters=args.adapters, adapter_bytes=per_adapter, seconds=put_s,
         gbps=per_adapter * args.adapters / put_s / 1e9, host_pinned_adapters=s["host_pinned_adapters"], host_pageable_adapters=s["host_pageable_adapters"])

    copy_stream = torch.cuda.Stream()
    ceiling = max(h2d_bandwidth(per_adapter, 5, copy_stream) / 1e9 for _ in range(3))
    emit(rows, bench="h2d_pinned_torch", gpu=gpu, bytes=per_adapter, gbps=ceiling)

    ids = list(range(args.adapters))
    load_cycle(cache, ids)  # warm-up: first loads, event creation
    best_wall, best_stream = 0.0, 0.0
    for _ in range(args.rounds):
        wall, stream_rate, moved = load_cycle(cache, ids)
        best_wall, best_stream = max(best_wall, wall), max(best_stream, stream_rate)
    emit(rows, bench="cache_load", gpu=gpu, adapter_bytes=per_adapter, gbps_wall=best_wall, gbps_copy_stream=best_stream,
         pct_of_pinned_wall=100 * best_wall / ceiling, pct_of_pinned_copy_stream=100 * best_stream / ceiling, target_pct=85)

    # Overlap: the same loads while matmuls keep the compute stream busy.
    n = args.matmul
    a = torch.randn(n, n, device="cuda", dtype=torch.float16)
    b = torch.randn(n, n, device="cuda", dtype=torch.float16)

    def matmuls(k):
        for _ in range(k):
            torch.matmul(a, b)

    matmuls(2)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    matmuls(20)
    torch.cuda.synchronize()
    mm_alone = time.perf_counter() - t0
    reps = 2
    cycle_seconds = per_adapter * args.adapters / (ceiling * 1e9)
    k = int(1.5 * reps * cycle_seconds / (mm_alone / 20)) + 1  # enough matmuls to outlast the loads
    torch.cuda.synchronize()
    before = cache.stats()
    t0 = time.perf_counter()
    matmuls(k)  # queued; the loads below run on the copy stream meanwhile
    t_load = time.perf_counter()
    for _ in range(reps):
        for tid in ids:
            cache.prefetch([tid])
    cache.synchronize()
    load_wall = time.perf_counter() - t_load
    torch.cuda.synchronize()
    both = time.perf_counter() - t0
    after = cache.stats()
    moved = after["load_bytes"] - before["load_bytes"]
    secs = after["load_seconds"] - before["load_seconds"]
    stream_rate = (after["load_bytes_timed"] - before["load_bytes_timed"]) / secs / 1e9 if secs > 0 else float("nan")
    emit(rows, bench="cache_load_during_matmul", gpu=gpu, matmul=n, gbps_wall=moved / load_wall / 1e9, gbps_copy_stream=stream_rate,
         pct_of_pinned_wall=100 * moved / load_wall / 1e9 / ceiling, pct_of_pinned_copy_stream=100 * stream_rate / ceiling,
         matmuls=k, matmul_seconds_alone=mm_alone * k / 20, matmul_plus_loads_seconds=both, matmul_slowdown=both / (mm_alone * k / 20))

    print()
    print(f"{'bench':28} {'GB/s':>8} {'% pinned H2D':>13}")
    for r in rows:
        if r["bench"] == "h2d_pinned_torch":
            print(f"{r['bench']:28} {r['gbps']:8.2f} {100:12.1f}%")
        elif r["bench"].startswith("cache_load"):
            print(f"{r['bench'] + ' (wall)':28} {r['gbps_wall']:8.2f} {r['pct_of_pinned_wall']:12.1f}%")
            print(f"{r['bench'] + ' (copy stream)':28} {r['gbps_copy_stream']:8.2f} {r['pct_of_pinned_copy_stream']:12.1f}%")
    print(f"GPU: {gpu}; adapter {per_adapter / 2**20:.1f} MiB (rank {args.rank}, {args.layers} layers, 7 modules, fp16)")


if __name__ == "__main__":
    main()
