"""LoRA op benchmark on Llama-8B module shapes: loramux's kernels vs a PEFT-style masked loop and
gather+bmm, all in one process, as % of the HBM/tensor-core roofline measured in the same run.

    python benchmarks/ops.py --out ops.json [--grid full|quick|small|ab|peers] [--commit SHA]

Every timed call reads a fresh set of adapters (rotation sets beyond L2, chosen through the slot
mapping), x and y rotate too; each method is captured in a CUDA graph (peers too, in their favour)
and timed by events over replays. Token order: "contiguous" (each adapter's tokens in one run, as
a prefill of whole requests) and "random" (the same assignment shuffled, as a decode batch whose
requests arrive in any order). The token segments are built once per step in use (StepBatch), so
here once per rotation set; their build is timed apart (segments_us).
Output: JSON lines (one per case, then one summary per regime and order) and a table;
benchmarks/readme_table.py turns the JSON into the README's table.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import random
import statistics

import torch
from _common import env_set, graph_time
from op_summary import ORDERS, summarize

from loramux.ops import BatchMeta, kernels

SHAPES = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]
RANKS = [8, 16, 64]
TOKENS = [1, 16, 64, 256, 512, 2048]
ADAPTERS = [1, 8, 32, 128]
GRIDS = {  # name -> (shapes, ranks, adapters, tokens)
    "full": (SHAPES, RANKS, ADAPTERS, TOKENS),
    "quick": ([(4096, 4096), (4096, 14336), (14336, 4096)], [16, 64], [1, 8, 32, 128], TOKENS),
    "small": ([(4096, 4096), (4096, 14336)], [16], [1, 8, 32, 128], TOKENS),
    "ab": ([(4096, 4096), (4096, 14336)], [16], [1, 32, 128], [16, 64, 256, 512, 2048]),
    # the quick grid's shapes, ranks and adapter counts at the prefill token counts
    "prefill": ([(4096, 4096), (4096, 14336), (14336, 4096)], [16, 64], [1, 8, 32, 128], [256, 512, 2048]),
    # the single-projection rows of the peer comparison: (Hi, Ho, r, adapters, T)
    "peers": None,
}
PEER_CASES = [(4096, 4096, 16, 32, 64), (4096, 4096, 16, 1, 64), (4096, 4096, 16, 32, 256),
               (4096, 4096, 16, 128, 256), (4096, 4096, 16, 8, 2048), (14336, 4096, 64, 32, 2048)]
DT = torch.bfloat16
DEV = "cuda"
#: --ab times the cases past the small items (rust/src/cuda/plan/items.rs SMALL_ITEMS_MAX_T)
AB_MIN_TOKENS = 256


def timed(fn, reps=10) -> float:
    """Median seconds of fn() over reps, by CUDA events."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def measure_ceilings():
    n = 1 << 29  # 1 GiB of bf16
    src = torch.randn(n, device=DEV, dtype=DT)
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src))
    bw = 2 * src.numel() * 2 / t  # bytes read + written
    del src, dst
    m = torch.randn(8192, 8192, device=DEV, dtype=DT)
    t = timed(lambda: m @ m)
    peak = 2 * 8192**3 / t
    return bw, peak


def run_case(hi, ho, r, n, tokens, bw, peak, l2, orders, ab_env=None, ab_small_env=None, ab_decode_env=None):
    set_bytes = n * r * (hi + ho) * 2
    nset = max(1, min(16, math.ceil(3 * l2 / set_bytes)))
    slots = nset * n
    a_all = torch.randn(slots, r, hi, device=DEV, dtype=DT) / hi**0.5
    b_all = torch.randn(slots, ho, r, device=DEV, dtype=DT) / r**0.5
    table = torch.zeros(slots, 1, 19, 4, dtype=torch.int64)
    table[:, 0, 1, 0] = a_all.data_ptr() + torch.arange(slots) * (r * hi * 2)
    table[:, 0, 1, 1] = b_all.data_ptr() + torch.arange(slots) * (ho * r * 2)
    table[:, 0, 1, 3] = r
    table = table.to(DEV)
    rows = []
    for T, order in [(T, o) for T in tokens for o in orders]:
        used = min(n, T)
        adapter_of = [(t * n // T) if T >= n else t for t in range(T)]
        if order == "random":
            random.Random(T * 1009 + n).shuffle(adapter_of)
        io_sets = nset if T * (hi + ho) * 2 * nset < (1 << 30) else 1
        xs = [torch.randn(T, hi, device=DEV, dtype=DT) for _ in range(io_sets)]
        ys = [0.1 * torch.randn(T, ho, device=DEV, dtype=DT) for _ in range(io_sets)]
        sots = [torch.tensor([k * n + a for a in adapter_of], dtype=torch.int32, device=DEV) for k in range(nset)]
        # the token segments are built once per step and shared by all its applies (StepBatch): built
        # here once per rotation set; their build is timed on its own (segments_us)
        # with the adapter count a StepBatch knows (it may cut mid-size batches into tiles)
        metas = [BatchMeta(table=table, pool=a_all.view(torch.uint8).view(-1), dtype=DT, slot_of_token=s, max_rank=r,
                           segments=kernels.segments(s, slots, used), adapters=used) for s in sots]
        groups = [[(k * n + a, torch.tensor([t for t in range(T) if adapter_of[t] == a], device=DEV))
                   for a in sorted(set(adapter_of))] for k in range(nset)]

        def ours(k, metas=metas):
            return lambda: kernels.lora_apply(xs[k % io_sets], ys[k % io_sets], metas[k], 0, [1], [ho])

        def peft_loop(k):
            def f():
                x, y = xs[k % io_sets], ys[k % io_sets]
                for slot, idx in groups[k]:
                    y.index_add_(0, idx, (x.index_select(0, idx) @ a_all[slot].T) @ b_all[slot].T)
            return f

        def gather_bmm(k):
            def f():
                x, y = xs[k % io_sets], ys[k % io_sets]
                idx = sots[k].long()
                u = torch.bmm(a_all.index_select(0, idx), x.unsqueeze(2))
                y += torch.bmm(b_all.index_select(0, idx), u).squeeze(2)
            return f

        # correctness against the same formula in fp32 (same weights), on set 0
        x0, y0 = xs[0], ys[0].clone()
        ref = y0.float()
        for slot, idx in groups[0]:
            ref[idx] += (x0[idx].float() @ a_all[slot].float().T) @ b_all[slot].float().T
        y_k = y0.clone()
        kernels.lora_apply(x0, y_k, metas[0], 0, [1], [ho])
        err = float((y_k.float() - ref).norm() / (ref - y0.float()).norm())

        bytes_ = used * r * (hi + ho) * 2 + T * hi * 2 + 2 * T * ho * 2
        flops = 2 * T * r * (hi + ho)
        floor = max(bytes_ / bw, flops / peak)
        t_ours = graph_time([ours(k) for k in range(nset)], 64)
        abs_ = []  # (env, us, rel err) under each other launch choice, the calls graphed anew
        alts = (ab_env or []) if T > AB_MIN_TOKENS else ((ab_small_env or []) if T > 64 else ((ab_decode_env or []) if T > 1 else []))
        for alt in alts:
            with env_set(alt):  # segments built anew: an item-size knob changes their layout
                alt_metas = [dataclasses.replace(m, segments=kernels.segments(s, slots, used)) for m, s in zip(metas, sots)]
                y_ab = y0.clone()
                kernels.lora_apply(x0, y_ab, alt_metas[0], 0, [1], [ho])
                ab_err = float((y_ab.float() - ref).norm() / (ref - y0.float()).norm())
                abs_.append((alt, graph_time([ours(k, alt_metas) for k in range(nset)], 64), ab_err))
        t_seg = graph_time([(lambda k=k: kernels.segments(sots[k], slots, used)) for k in range(nset)], 16)
        t_peft = graph_time([peft_loop(k) for k in range(nset)], 4 if used > 32 else 16)
        gathered = T * r * (hi + ho) * 2
        t_bmm = graph_time([gather_bmm(k) for k in range(nset)], 8) if gathered < (1 << 31) else None
        row = dict(hi=hi, ho=ho, r=r, adapters=n, tokens=T, order=order, adapters_used=used, weights_beyond_l2=set_bytes > l2,
                   rotation_sets=nset, bytes=bytes_, flops=flops, floor_us=floor * 1e6, ours_us=t_ours * 1e6,
                   segments_us=t_seg * 1e6,
                   pct_roofline=100 * floor / t_ours, peft_loop_us=t_peft * 1e6, speedup_vs_peft=t_peft / t_ours,
                   gather_bmm_us=None if t_bmm is None else t_bmm * 1e6,
                   speedup_vs_bmm=None if t_bmm is None else t_bmm / t_ours, rel_err_vs_fp32=err)
        if abs_:  # the first --ab as ab_us, any further ones in ab_more
            (alt, t_ab, ab_err), more = abs_[0], abs_[1:]
            row.update(ab_env=alt, ab_us=t_ab * 1e6, ab_rel_err_vs_fp32=ab_err)
            if more:
                row["ab_more"] = [dict(env=e, us=t * 1e6, rel_err_vs_fp32=r) for e, t, r in more]
        rows.append(row)
        del xs, ys
    del a_all, b_all
    torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="ops.json")
    ap.add_argument("--grid", choices=sorted(GRIDS), default="full")
    ap.add_argument("--orders", default=",".join(ORDERS))
    ap.add_argument("--commit", default="", help="the source commit, recorded for readme_table.py")
    ap.add_argument("--tokens", default="", help="comma-separated token counts replacing the grid's")
    ap.add_argument("--adapters", default="", help="comma-separated adapter counts replacing the grid's")
    ap.add_argument("--ab", action="append", default=[], help="NAME=VALUE,...: also time each case past the small items "
                    "under this environment (e.g. LORAMUX_PREFILL=legacy), recorded as ab_us; given again, each "
                    "further one in ab_more")
    ap.add_argument("--ab-small", action="append", default=[], help="NAME=VALUE,...: the same for the cases of 65..256 "
                    "tokens (e.g. LORAMUX_PIPE_SMALL=1); given again, each further one in ab_more")
    ap.add_argument("--ab-decode", action="append", default=[], help="NAME=VALUE,...: the same for the decode cases (2..64 tokens; "
                    "e.g. LORAMUX_DECODE_DEVICE_SPLIT=0); given again, each further one in ab_more")
    args = ap.parse_args()
    orders = args.orders.split(",")
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    bw, peak = measure_ceilings()
    head = dict(gpu=props.name, sms=props.multi_processor_count, l2_bytes=l2, copy_bw_gbs=bw / 1e9,
                bf16_tflops=peak / 1e12, torch=torch.__version__, grid=args.grid, commit=args.commit,
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    print(json.dumps(head), flush=True)
    if args.grid == "peers":
        cases = [((hi, ho, r, n), [T]) for hi, ho, r, n, T in PEER_CASES]
    else:
        shapes, ranks, adapters, tokens = GRIDS[args.grid]
        tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else tokens
        adapters = [int(n) for n in args.adapters.split(",")] if args.adapters else adapters
        cases = [((hi, ho, r, n), tokens) for hi, ho in shapes for r in ranks for n in adapters]
    ab_env = [dict(kv.split("=", 1) for kv in ab.split(",") if kv) for ab in args.ab if ab] or None
    ab_small_env = [dict(kv.split("=", 1) for kv in ab.split(",") if kv) for ab in args.ab_small if ab] or None
    ab_decode_env = [dict(kv.split("=", 1) for kv in ab.split(",") if kv) for ab in args.ab_decode if ab] or None
    out = open(args.out, "w")
    out.write(json.dumps(dict(kind="ceilings", **head)) + "\n")
    rows = []
    for (hi, ho, r, n), tokens in cases:
        for row in run_case(hi, ho, r, n, tokens, bw, peak, l2, orders, ab_env, ab_small_env, ab_decode_env):
            out.write(json.dumps(dict(kind="op", **row)) + "\n")
            out.flush()
            rows.append(row)
    print(f"{'Hi':>5} {'Ho':>5} {'r':>3} {'n':>3} {'T':>4} {'order':>6} {'ours us':>8} {'%roof':>6} {'xPEFT':>6} "
          f"{'xbmm':>6} {'err':>7} {'ab us':>8}")
    for w in rows:
        bmm = f"{w['speedup_vs_bmm']:6.2f}" if w["speedup_vs_bmm"] else "     -"
        print(f"{w['hi']:5d} {w['ho']:5d} {w['r']:3d} {w['adapters']:3d} {w['tokens']:4d} {w['order'][:6]:>6} "
              f"{w['ours_us']:8.1f} {w['pct_roofline']:6.1f} {w['speedup_vs_peft']:6.2f} {bmm} "
              f"{w['rel_err_vs_fp32']:7.1e} {w.get('ab_us') or 0:8.1f}")
    summaries = summarize(rows)
    for sm in summaries:
        out.write(json.dumps(sm) + "\n")
        print(json.dumps(sm))
    out.write(json.dumps(dict(kind="total", max_rel_err=max(w["rel_err_vs_fp32"] for w in rows))) + "\n")


if __name__ == "__main__":
    main()
