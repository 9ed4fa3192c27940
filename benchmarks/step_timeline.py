"""Where a graphed decode step's GPU time goes: the step of benchmarks/decode_step.py (4 Llama-8B
layers, batch 32, 32 adapters r=16 on 7 projections) replayed from a CUDA graph under
torch.profiler, its kernels sorted into categories (LoRA kernels, GEMMs, attention, the rest), and
per replay: the wall time from the first kernel's start to the last one's end, the time some kernel
runs, and per category its kernel count, summed duration, the time one of its kernels runs (union)
and the time only its kernels run (alone). In order, a LoRA apply's union is what it adds to the
step; beside the base GEMM, what of it overlaps a GEMM and what runs alone says whether the side
stream hides the branch or only moves it. lora_by_name splits the LoRA kernels' count, sum and
alone time by kernel name (alone time shared among the LoRA kernels running then), to say which of
them stand alone. Medians over the replays; event_us is the replay as CUDA events time it, a check
on the profiler's clock.

    python benchmarks/step_timeline.py --modes base,in_order,beside --out timeline.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Dict, List, Sequence

CATEGORIES = ("lora", "gemm", "attention", "other")


def category(name: str) -> str:
    """The category of a kernel by its name (loramux's kernels are all named lora_*)."""
    low = name.lower()
    if low.startswith("lora_"):
        return "lora"
    if any(k in low for k in ("gemm", "nvjet", "cutlass", "xmma", "cublas")):
        return "gemm"
    if any(k in low for k in ("flash", "fmha", "attention", "sdpa")):
        return "attention"
    return "other"


def split_replays(kernels: Sequence[dict], gap_us: float) -> List[List[dict]]:
    """Kernels ({name, start, end} in us) cut into replays wherever no kernel runs for gap_us."""
    replays: List[List[dict]] = []
    end = None
    for k in sorted(kernels, key=lambda k: k["start"]):
        if end is None or k["start"] > end + gap_us:
            replays.append([])
            end = k["end"]
        replays[-1].append(k)
        end = max(end, k["end"])
    return replays


def summarize(kernels: Sequence[dict]) -> Dict[str, object]:
    """One replay's wall, busy time and, per category, count / sum / union / alone (us): a sweep
    over the kernels' start and end points."""
    points = sorted([(k["start"], 1, k["name"]) for k in kernels] + [(k["end"], -1, k["name"]) for k in kernels],
                    key=lambda p: p[0])
    active = dict.fromkeys(CATEGORIES, 0)
    union = dict.fromkeys(CATEGORIES, 0.0)
    alone = dict.fromkeys(CATEGORIES, 0.0)
    lora_running: Dict[str, int] = {}  # LoRA kernel name -> instances running
    lora_alone: Dict[str, float] = {}
    busy, prev = 0.0, None
    for t, step, name in points:
        if prev is not None and t > prev:
            running = [c for c in CATEGORIES if active[c] > 0]
            if running:
                busy += t - prev
                for c in running:
                    union[c] += t - prev
                if len(running) == 1:
                    alone[running[0]] += t - prev
                if running == ["lora"]:
                    share = (t - prev) / sum(lora_running.values())
                    for n, count in lora_running.items():
                        lora_alone[n] = lora_alone.get(n, 0.0) + share * count
        cat = category(name)
        active[cat] += step
        if cat == "lora":
            lora_running[name] = lora_running.get(name, 0) + step
            if lora_running[name] == 0:
                del lora_running[name]
        prev = t
    per = {c: {"count": sum(1 for k in kernels if category(k["name"]) == c),
               "sum_us": sum(k["end"] - k["start"] for k in kernels if category(k["name"]) == c),
               "union_us": union[c], "alone_us": alone[c]} for c in CATEGORIES}
    by_name = {n: {"count": sum(1 for k in kernels if k["name"] == n),
                   "sum_us": sum(k["end"] - k["start"] for k in kernels if k["name"] == n),
                   "alone_us": lora_alone.get(n, 0.0)} for n in sorted({k["name"] for k in kernels if category(k["name"]) == "lora"})}
    wall = max(k["end"] for k in kernels) - min(k["start"] for k in kernels) if kernels else 0.0
    return {"wall_us": wall, "busy_us": busy, "streams": len({k.get("stream") for k in kernels}), "categories": per,
            "lora_by_name": by_name}


def median_summary(replays: Sequence[Sequence[dict]]) -> Dict[str, object]:
    """The per-field median of summarize() over replays (each field's median on its own)."""
    sums = [summarize(r) for r in replays]
    med = lambda key: statistics.median(s[key] for s in sums)  # noqa: E731
    out = {"replays": len(sums), "wall_us": med("wall_us"), "busy_us": med("busy_us"), "streams": med("streams")}
    out["categories"] = {c: {f: statistics.median(s["categories"][c][f] for s in sums)
                             for f in ("count", "sum_us", "union_us", "alone_us")} for c in CATEGORIES}
    # a name missing from a replay counts as zero there
    names = sorted({n for s in sums for n in s["lora_by_name"]})
    out["lora_by_name"] = {n: {f: statistics.median(s["lora_by_name"].get(n, {}).get(f, 0.0) for s in sums)
                               for f in ("count", "sum_us", "alone_us")} for n in names}
    return out


def profile_kernels(replay, reps: int) -> List[dict]:
    """The CUDA kernels torch.profiler records over `reps` replays, a host pause between replays
    so that split_replays can cut them apart."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            replay()
            torch.cuda.synchronize()
            time.sleep(0.002)
    kernels = []
    for e in prof.events():
        if "CUDA" not in str(getattr(e, "device_type", "")):
            continue
        kernels.append({"name": e.name, "start": float(e.time_range.start), "end": float(e.time_range.end),
                        "stream": getattr(e, "device_resource_id", None)})
    return kernels


def main():
    import torch
    from _common import capture, llama_spec, median_seconds, random_adapter, resident_adapters
    from decode_step import ADAPTERS, BATCH, DEV, DT, LAYERS, MODULE_IDS, RANK, build_model, fresh_metas

    from loramux.models.attach import attach_layers

    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", default="base,in_order,beside", help="comma-separated: base, in_order, beside")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--gap-us", type=float, default=500.0, help="no kernel for this long ends a replay")
    ap.add_argument("--out", default="timeline.json")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    model = build_model("sdpa")
    ids = torch.randint(0, 128256, (BATCH, 1), device=DEV)
    pos = torch.zeros(BATCH, 1, dtype=torch.long, device=DEV)
    step = lambda: model(input_ids=ids, position_ids=pos, use_cache=False).logits  # noqa: E731
    spec = llama_spec(LAYERS, RANK)
    engine = attach_layers(model, spec, None, DT, torch.device(DEV))
    mids = MODULE_IDS
    adapters = [random_adapter(spec, mids, range(LAYERS), RANK, seed=1 + a, std=0.03) for a in range(ADAPTERS)]
    ad = resident_adapters(spec, adapters, dtype=DT, device=DEV)
    res = {"gpu": torch.cuda.get_device_name(), "batch": BATCH, "adapters": ADAPTERS, "rank": RANK, "layers": LAYERS, "modes": {}}
    for mode in args.modes.split(","):
        if mode == "base":
            engine.clear_batch()
        else:
            engine.lora_beside_base = mode == "beside"
            engine.set_batch(list(ad.slots), ad.cache.table, ad.cache.pool)
        g, _ = capture(step, None if mode == "base" else (lambda: fresh_metas(engine)))
        replays = split_replays(profile_kernels(g.replay, args.reps), args.gap_us)
        res["modes"][mode] = median_summary(replays) if replays else {"error": "the profiler recorded no kernels"}
        # CUPTI's timing of graph kernels has been wrong on some CUDA versions (kineto's GitHub report
        # "Cudagraphs profiling is incorrect", fixed per CUPTI's notes for CUDA 13.1 update 1):
        # the replay as CUDA events time it, to set the profiled wall against
        res["modes"][mode]["event_us"] = median_seconds(g.replay) * 1e6
        print(mode, json.dumps(res["modes"][mode]), flush=True)
        del g
    with open(args.out, "w") as f:
        f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
