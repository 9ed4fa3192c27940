"""Measures the launch choices of lora_apply on this GPU and writes the launch table the package ships
(python/loramux/ops/launch_table.json, read by loramux.ops.tuning): per (Hi -> output slices, rank
bucket, token bucket) of the Llama-8B projections a decode or prefill step applies, every expand
kernel the path allows times a few shrink split targets, each graphed over weights beyond L2.

    python benchmarks/tune.py --out python/loramux/ops/launch_table.json [--quick]

A choice enters the table only where it beats the built-in rule by more than --margin (noise
stays out) and its output matches an fp32 reference; the rest keeps the built-in rule. Shrink split
targets below the built-in one are not considered: the planner sizes the split for a middle number
of work items, and fewer adapters than the sweep's give fewer items, so a coarser target starves them
(measured on the H200: ops.py rows with 1 or 8 adapters up to 1.5x slower under targets chosen at
16-32 adapters). Entries for one arch replace that arch's entries in an existing table and keep the
others. ~1 minute. `--from-log tune.jsonl --arch 90` rebuilds the table from a sweep's log.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import random
import subprocess

import torch

from loramux.ops import BatchMeta, kernels, tuning

DT, DEV = torch.bfloat16, "cuda"
# (Hi, output slices, module ids): q|k|v, o, gate|up, down of Llama-8B
SHAPES = [(4096, (4096, 1024, 1024), (1, 2, 3)), (4096, (4096,), (4,)), (4096, (14336, 14336), (7, 5)),
          (14336, (4096,), (6,))]
RANKS = [16, 64]
# one token count per bucket of tuning.TOKEN_BUCKETS, adapters sharing the batch at that count
TOKENS = [(1, 1), (16, 16), (64, 32), (256, 32), (512, 32), (2048, 8)]
TARGETS = [132, 264, 528, 1056]
#: the planner's own targets (rust/src/cuda/plan.rs): the flat decode expand's, everyone else's
BUILT_IN_TARGET = {"flat": 132}
DEFAULT_TARGET = 528
KNOBS = ("LORAMUX_EXPAND_DECODE", "LORAMUX_EXPAND_OPT", "LORAMUX_EXPAND_TILE_COLS", "LORAMUX_SHRINK_TARGET_BLOCKS",
         "LORAMUX_TUNING")


def variants(tokens: int, targets):
    """(expand kernel, shrink target) pairs the path of `tokens` allows (rust/src/cuda/plan.rs)."""
    if tokens <= 64:
        kinds = ["flat", "o1", "o1w"]
    elif tokens <= 256:
        kinds = ["o1", "o1w", "o4"]
    else:
        kinds = ["c1", "c4"]
    return [(k, t) for k in kinds for t in targets if t >= BUILT_IN_TARGET.get(k, DEFAULT_TARGET)]


def forced_env(kind, target):
    """The environment overrides that force one variant (they win over the table in the planner)."""
    env = {"LORAMUX_TUNING": "off", "LORAMUX_SHRINK_TARGET_BLOCKS": str(target)}
    if kind == "flat":
        env["LORAMUX_EXPAND_DECODE"] = "flat"
    elif kind.startswith("o"):
        env.update(LORAMUX_EXPAND_DECODE="grouped", LORAMUX_EXPAND_OPT=kind[1:])
    else:
        env["LORAMUX_EXPAND_TILE_COLS"] = kind[1:]
    return env


def set_env(env):
    for k in KNOBS:
        os.environ.pop(k, None)
    os.environ.update(env)


def graph_time(calls, per_graph=32, reps=5) -> float:
    """Seconds per call, the calls (one per weight set) repeated in one CUDA graph, median of reps."""
    n = max(1, math.ceil(per_graph / len(calls)))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n):
            for c in calls:
                c()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / (n * len(calls)))
    return sorted(times)[len(times) // 2]


def tune_case(hi, sizes, mids, r, tokens, n, l2, targets, margin):
    """One (shape, rank, tokens) case: every variant's time; the entry to write or None."""
    ho = sum(sizes)
    set_bytes = n * r * (hi + ho) * 2
    nset = max(1, min(8, math.ceil(3 * l2 / set_bytes)))
    slots = nset * n
    a_all = torch.randn(slots, len(mids), r, hi, device=DEV, dtype=DT) / hi**0.5
    b_all = torch.randn(slots, ho, r, device=DEV, dtype=DT) / r**0.5  # each slice's B rows stacked
    table = torch.zeros(slots, 1, 19, 4, dtype=torch.int64)
    for s, (m, start, size) in enumerate(zip(mids, [sum(sizes[:i]) for i in range(len(sizes))], sizes)):
        table[:, 0, m, 0] = a_all.data_ptr() + (torch.arange(slots) * len(mids) + s) * (r * hi * 2)
        table[:, 0, m, 1] = b_all.data_ptr() + (torch.arange(slots) * ho + start) * (r * 2)
        table[:, 0, m, 3] = r
    table = table.to(DEV)
    adapter_of = [(t * n // tokens) for t in range(tokens)]
    random.Random(tokens * 1009 + n).shuffle(adapter_of)
    x = torch.randn(tokens, hi, device=DEV, dtype=DT)
    y0 = 0.1 * torch.randn(tokens, ho, device=DEV, dtype=DT)
    sots = [torch.tensor([k * n + a for a in adapter_of], dtype=torch.int32, device=DEV) for k in range(nset)]
    metas = [BatchMeta(table=table, pool=a_all.view(torch.uint8).view(-1), dtype=DT, slot_of_token=s, max_rank=r,
                       segments=kernels.segments(s, slots)) for s in sots]
    # fp32 reference on set 0
    ref = y0.float().clone()
    for a in sorted(set(adapter_of)):
        idx = torch.tensor([t for t in range(tokens) if adapter_of[t] == a], device=DEV)
        for s, start in enumerate([sum(sizes[:i]) for i in range(len(sizes))]):
            u = x[idx].float() @ a_all[a, s].float().T
            ref[idx, start:start + sizes[s]] += u @ b_all[a, start:start + sizes[s]].float().T
    ys = [y0.clone() for _ in range(nset)]

    def calls():
        return [lambda k=k: kernels.lora_apply(x, ys[k], metas[k], 0, list(mids), list(sizes)) for k in range(nset)]

    def measure(env):
        set_env(env)
        y = y0.clone()
        kernels.lora_apply(x, y, metas[0], 0, list(mids), list(sizes))
        err = float((y.float() - ref).norm() / (ref - y0.float()).norm())
        return graph_time(calls()), err

    default_s, default_err = measure({"LORAMUX_TUNING": "off"})
    rows = []
    for kind, target in variants(tokens, targets):
        t, err = measure(forced_env(kind, target))
        rows.append(dict(expand_kernel=kind, shrink_target_blocks=target, us=t * 1e6, rel_err=err))
    set_env({})
    case = dict(hi=hi, out_sizes=list(sizes), rank=r, tokens=tokens, adapters=n, default_us=default_s * 1e6,
                default_rel_err=default_err, variants=rows)
    entry = select(case, margin)
    del a_all, b_all
    torch.cuda.empty_cache()
    return case, entry


def select(case, margin):
    """The table entry a swept case earns (arch filled in by the caller), or None: the fastest variant
    that matches the reference, an allowed target, and beats the built-in rule by more than margin."""
    ok = [w for w in case["variants"] if w["rel_err"] < 2e-2
          and w["shrink_target_blocks"] >= BUILT_IN_TARGET.get(w["expand_kernel"], DEFAULT_TARGET)]
    best = min(ok, key=lambda w: w["us"]) if ok else None
    if best is None or best["us"] >= case["default_us"] * (1 - margin):
        return None
    return dict(arch=None, hi=case["hi"], out_sizes=list(case["out_sizes"]), rank_bucket=tuning.rank_bucket(case["rank"]),
                token_bucket=tuning.token_bucket(case["tokens"]), expand_kernel=best["expand_kernel"],
                shrink_target_blocks=best["shrink_target_blocks"], us=round(best["us"], 2),
                default_us=round(case["default_us"], 2))


def write_table(path, arch, measured_note, entries):
    """Replaces `arch`'s entries (and its measurement note) in the table at `path`, keeps the others."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except FileNotFoundError:
        doc = {}
    kept = [e for e in doc.get("entries", []) if e["arch"] != arch]
    measured = [m for m in doc.get("measured", []) if m.get("arch") != arch] + [measured_note]
    out = {
        "about": "lora_apply launch choices measured by benchmarks/tune.py; read by loramux.ops.tuning "
                 "(geometries without an entry keep the built-in rules of rust/src/cuda/plan.rs)",
        "measured": measured,
        "entries": kept + [dict(e, arch=arch) for e in entries],
    }
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


def rebuild(args):
    """The table from a saved sweep log (no GPU): the selection rule applied to the measured cases."""
    with open(args.from_log) as f:
        cases = [json.loads(line) for line in f if line.strip()]
    entries = [e for e in (select(c, args.margin) for c in cases) if e is not None]
    try:
        with open(args.out) as f:
            old = next((m for m in json.load(f).get("measured", []) if m.get("arch") == args.arch), {})
    except FileNotFoundError:
        old = {}
    note = dict(old, arch=args.arch, margin=args.margin, rebuilt_from=os.path.basename(args.from_log),
                selection="targets >= the built-in one")
    write_table(args.out, args.arch, note, entries)
    print(f"{len(entries)} entries for sm_{args.arch} from {len(cases)} cases -> {args.out}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(tuning.TABLE_PATH))
    ap.add_argument("--log", default="tune.jsonl", help="every variant's time, one JSON line per case")
    ap.add_argument("--margin", type=float, default=0.03, help="fraction a choice must beat the built-in rule by")
    ap.add_argument("--quick", action="store_true", help="two shrink targets instead of four")
    ap.add_argument("--commit", default="")
    ap.add_argument("--from-log", help="rebuild the table from this sweep log instead of measuring")
    ap.add_argument("--arch", type=int, default=90, help="with --from-log: the arch the log was measured on")
    args = ap.parse_args()
    if args.from_log:
        return rebuild(args)
    torch.set_grad_enabled(False)
    props = torch.cuda.get_device_properties(0)
    arch = 10 * props.major + props.minor
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    targets = [132, 528] if args.quick else TARGETS
    commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                           text=True).stdout.strip()
    note = dict(arch=arch, gpu=props.name, date=datetime.date.today().isoformat(), commit=commit,
                torch=torch.__version__, margin=args.margin, targets=targets, selection="targets >= the built-in one")
    entries = []

    def write():  # after every shape: a sweep cut short still leaves the shapes it finished
        write_table(args.out, arch, note, entries)

    with open(args.log, "w") as log:
        for hi, sizes, mids in SHAPES:
            for r in RANKS:
                for tokens, n in TOKENS:
                    case, entry = tune_case(hi, sizes, mids, r, tokens, n, l2, targets, args.margin)
                    log.write(json.dumps(case) + "\n")
                    log.flush()
                    best = min(case["variants"], key=lambda w: w["us"])
                    print(f"{hi}->{sizes} r{r} T{tokens} n{n}: default {case['default_us']:.1f} us, best "
                          f"{best['expand_kernel']}/{best['shrink_target_blocks']} {best['us']:.1f} us"
                          f"{'  -> table' if entry else ''}", flush=True)
                    if entry is not None:
                        entries.append(entry)
            write()
    print(f"{len(entries)} entries for sm_{arch} -> {args.out}")


if __name__ == "__main__":
    main()
