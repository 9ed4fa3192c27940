"""Measures the launch choices of lora_apply on this GPU and writes the launch table the package ships
(python/loramux/ops/launch_table.json, read by loramux.ops.tuning): per (Hi -> output slices, rank
bucket, token bucket) of the Llama-8B projections a decode or prefill step applies, every expand
kernel the path allows times a few shrink split targets, each graphed over weights beyond L2.

    python benchmarks/tune.py --out python/loramux/ops/launch_table.json [--quick]

Each token bucket is timed at a few adapter counts sharing the batch (TOKENS: one adapter, a few,
many; bucket 64 also at the decode step's own batch). A choice enters the table only where its
output matches an fp32 reference, its geomean over the counts beats the built-in rule by more than
--margin (noise stays out) and no count is slower than it by more than MAX_LOSS; where the counts
of one adapter bucket (tuning.adapter_bucket: one / few / many) pick another choice, that bucket
gets its own entry; the rest keeps the built-in rule. Shrink split targets below the built-in one are not
considered (the fused kernel's, 264, excepted: it is swept from 132, with both counts timed): the
planner sizes the split for a middle number of work items, and fewer adapters give fewer items, so
a coarser target starves them (measured on the H200: ops.py rows with 1 or 8 adapters up to 1.5x
slower under targets chosen at 16-32 adapters by a sweep that timed one count). Entries for one arch replace that arch's entries in an existing table and keep the
others. ~1-2 minutes. `--from-log tune.jsonl --arch 90` rebuilds the table from a sweep's log.
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
SHAPES = [(4096, (4096, 1024, 1024), (1, 2, 3)), (4096, (4096,), (4,)), (4096, (14336, 14336), (5, 7)),
          (14336, (4096,), (6,)),
          # one of gate|up alone (a model whose adapters leave the other out, or whose projections are not
          # attached together): one 14336-wide slice, which no entry of gate|up matches
          (4096, (14336,), (7,))]
RANKS = [16, 64]
# one token count per bucket of tuning.TOKEN_BUCKETS, each timed with one adapter and with many
# sharing the batch: a choice must not lose at any (the planner cannot see the adapter count). Past
# 64 tokens also 128 adapters: measured on the H200 (kernel-notes s15), 4-tile expand spans chosen at
# T = 2048 over 1 and 8 adapters were 0.84-0.87x the time there and 1.10-1.13x at 128
# Decode buckets (kernel-notes s16): 16 tokens also over 8 adapters (entries timed at 1 and 16 only
# were 1.15-1.24x slower there in ops.py); 64 tokens over 32 and 64 adapters: from 4 tokens an
# adapter up the pipelined kernels take a decode batch by its count whatever the table says
# (plan/pipe.rs pipe_on_small_items), so one adapter would time the same kernels under every choice.
# A count may name its own token count, (tokens, adapters), within the bucket: bucket 64 is also
# timed as the decode step's batch, 32 one-token requests of their own adapters (entries that won at
# 64 tokens alone made that step 1.05-1.18x slower, runs D and E).
# 256 and 512 tokens also over 8 adapters: "few" entries chosen at 32 adapters alone were up to 1.26x
# slower over 8 in ops.py (run I; 8 adapters take 64-token tiles there, 32 small items at T = 256).
TOKENS = [(1, (1,)), (16, (1, 8, 16)), (64, ((32, 32), 32, 64)), (256, (1, 8, 32, 128)), (512, (1, 8, 32, 128)),
          (2048, (1, 8, 128))]

TARGETS = [132, 264, 528, 1056]
#: the planner's own targets (rust/src/cuda/plan.rs): the flat decode expand's, the fused decode
#: kernel's, everyone else's
FUSED_KINDS = ("fused", "fused3", "fuseds", "fuseds4")  # A in registers or staged, built-in or named blocks an SM
BUILT_IN_TARGET = {"flat": 132, **{k: 264 for k in FUSED_KINDS}}
DEFAULT_TARGET = 528
#: the coarsest target swept per kernel: the built-in one, except for the fused kernel, which is
#: swept down to 132 (its few-adapter count, timed beside the many-adapter one, guards against the
#: starved splits that kept coarser targets out)
MIN_TARGET = dict(BUILT_IN_TARGET, **{k: 132 for k in FUSED_KINDS}, **{k: 264 for k in ("p", "p2", "p4", "p6", "p8", "p16")})
SELECTION = ("geomean over the adapter counts swept 3 % below the built-in rule's, none more than 1 % slower; split targets >= the built-in one (fused kinds: >= 132); "
             "per adapter bucket (one / few <= 32 / many) where its counts pick another choice")
KNOBS = ("LORAMUX_DECODE_DEVICE_SPLIT", "LORAMUX_EXPAND_DECODE", "LORAMUX_EXPAND_OPT", "LORAMUX_EXPAND_TILE_COLS", "LORAMUX_SHRINK_TARGET_BLOCKS",
         "LORAMUX_TUNING", "LORAMUX_DECODE_FUSED", "LORAMUX_FUSED_EXPAND_BLOCKS", "LORAMUX_FUSED_PDL",
         "LORAMUX_FUSED_BLOCKS_PER_SM", "LORAMUX_FUSED_STAGE_A", "LORAMUX_PREFILL", "LORAMUX_EXPAND_SPAN_TILES",
         "LORAMUX_PIPE_SMALL", "LORAMUX_PIPE_MAX_SPLIT", "LORAMUX_PIPE_USUM", "LORAMUX_PIPE_SPAN_RULE", "LORAMUX_PIPE_MERGE",
         "LORAMUX_PIPE_FRAGMENTS")


#: decode token counts (2..64) time every choice with the split sized on the host (False) and from the
#: step's item count on the device (True): the entry names the one it won with (the planner takes it).
#: The host plans a middle item count, right for some adapter counts and wrong for others, hence the
#: decode step's own batch among bucket 64's points (TOKENS). Measured (kernel-notes s16): the
#: device's split alone past 16 tokens cost 4096 -> 14336 r64 at 64 tokens over 32 adapters 1.12x.
DEVICE_SPLITS = (False, True)


def points(tokens, counts):
    """[(tokens, adapters)] a case times: each count at the case's token count unless it names its own."""
    return [c if isinstance(c, (tuple, list)) else (tokens, c) for c in counts]


def variants(tokens: int, targets, rank: int = 16, kinds_only=None):
    """(expand kernel, shrink target) pairs the path of `tokens` allows (rust/src/cuda/plan.rs),
    of the kinds in `kinds_only` where given; decode token counts: (kind, target, device split)."""
    if tokens <= 64:
        kinds = (list(FUSED_KINDS) if rank <= 64 else []) + ["flat", "o1", "o1w"]
    elif tokens <= 256:  # CUDA-core small items, or the pipelined tensor-core kernels over them at a planned / 2 .. 16-tile span
        kinds = ["o1", "o1w", "o4", "p", "p2", "p4", "p6", "p8", "p16"]
    else:  # register-staged tiles, and the pipelined kernels at a planned / 2 .. 16-tile expand span
        kinds = ["c1", "c4", "p", "p2", "p4", "p6", "p8", "p16"]
    pairs = [(k, t) for k in kinds for t in targets
             if t >= MIN_TARGET.get(k, DEFAULT_TARGET) and (kinds_only is None or k in kinds_only)]
    return [(k, t, d) for k, t in pairs for d in DEVICE_SPLITS] if 1 < tokens <= 64 else pairs


def forced_env(kind, target, device_split=None):
    """The environment overrides that force one variant (they win over the table in the planner)."""
    env = {"LORAMUX_TUNING": "off", "LORAMUX_SHRINK_TARGET_BLOCKS": str(target), "LORAMUX_DECODE_FUSED": "0"}
    if device_split is not None:
        env["LORAMUX_DECODE_DEVICE_SPLIT"] = "1" if device_split else "0"
    if kind in FUSED_KINDS:  # the shrink's A in registers or staged in shared memory; blocks an SM
        env.update(LORAMUX_DECODE_FUSED="1", LORAMUX_FUSED_STAGE_A="1" if kind.startswith("fuseds") else "0")
        if kind[-1].isdigit():
            env["LORAMUX_FUSED_BLOCKS_PER_SM"] = kind[-1]
    elif kind == "flat":
        env["LORAMUX_EXPAND_DECODE"] = "flat"
    elif kind.startswith("o"):
        env.update(LORAMUX_EXPAND_DECODE="grouped", LORAMUX_EXPAND_OPT=kind[1:], LORAMUX_PIPE_SMALL="0")
    elif kind.startswith("p"):
        env.update(LORAMUX_PREFILL="pipe", LORAMUX_PIPE_SMALL="1")
        if kind[1:]:
            env["LORAMUX_EXPAND_SPAN_TILES"] = kind[1:]
    else:
        env["LORAMUX_EXPAND_TILE_COLS"] = kind[1:]
    return env


def set_env(env):
    for k in KNOBS:
        os.environ.pop(k, None)
    os.environ.update(env)


def measure_count(hi, sizes, mids, r, tokens, n, l2, envs):
    """[(us, rel err vs fp32)] of lora_apply under each environment of `envs`, at `tokens` tokens
    spread over `n` adapters in random order, graphed over weight sets beyond L2."""
    from _common import graph_time  # here, not at the top: tests import this file for select() alone
    ho = sum(sizes)
    set_bytes = n * r * (hi + ho) * 2
    nset = max(1, min(8, math.ceil(3 * l2 / set_bytes)))
    slots = nset * n
    a_all = torch.randn(slots, len(mids), r, hi, device=DEV, dtype=DT) / hi**0.5
    b_all = torch.randn(slots, ho, r, device=DEV, dtype=DT) / r**0.5  # each slice's B rows stacked
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    table = torch.zeros(slots, 1, 19, 4, dtype=torch.int64)
    for s, (m, start) in enumerate(zip(mids, starts)):
        table[:, 0, m, 0] = a_all.data_ptr() + (torch.arange(slots) * len(mids) + s) * (r * hi * 2)
        table[:, 0, m, 1] = b_all.data_ptr() + (torch.arange(slots) * ho + start) * (r * 2)
        table[:, 0, m, 3] = r
    table = table.to(DEV)
    adapter_of = [(t * n // tokens) for t in range(tokens)]
    random.Random(tokens * 1009 + n).shuffle(adapter_of)
    x = torch.randn(tokens, hi, device=DEV, dtype=DT)
    y0 = 0.1 * torch.randn(tokens, ho, device=DEV, dtype=DT)
    sots = [torch.tensor([k * n + a for a in adapter_of], dtype=torch.int32, device=DEV) for k in range(nset)]
    # the adapter count a StepBatch passes (it decides the item layout of 65..512-token batches)
    used = len(set(adapter_of))
    metas = [BatchMeta(table=table, pool=a_all.view(torch.uint8).view(-1), dtype=DT, slot_of_token=s, max_rank=r,
                       segments=kernels.segments(s, slots, used), adapters=used) for s in sots]
    # fp32 reference on set 0
    ref = y0.float().clone()
    for a in sorted(set(adapter_of)):
        idx = torch.tensor([t for t in range(tokens) if adapter_of[t] == a], device=DEV)
        for s, start in enumerate(starts):
            u = x[idx].float() @ a_all[a, s].float().T
            ref[idx, start:start + sizes[s]] += u @ b_all[a, start:start + sizes[s]].float().T
    ys = [y0.clone() for _ in range(nset)]
    calls = [lambda k=k: kernels.lora_apply(x, ys[k], metas[k], 0, list(mids), list(sizes)) for k in range(nset)]
    out = []
    for env in envs:
        set_env(env)
        y = y0.clone()
        kernels.lora_apply(x, y, metas[0], 0, list(mids), list(sizes))
        err = float((y.float() - ref).norm() / (ref - y0.float()).norm())
        out.append((graph_time(calls) * 1e6, err))
    set_env({})
    del a_all, b_all
    torch.cuda.empty_cache()
    return out


def tune_case(hi, sizes, mids, r, tokens, counts, l2, targets, margin, kinds_only=None):
    """One (shape, rank, tokens) case at each adapter count of `counts`: every variant's times; the
    entry to write or None."""
    kinds = variants(tokens, targets, r, kinds_only)
    envs = [{"LORAMUX_TUNING": "off"}] + [forced_env(*v) for v in kinds]
    timed = points(tokens, counts)
    per_count = [measure_count(hi, sizes, mids, r, t, n, l2, envs) for t, n in timed]
    rows = [dict(expand_kernel=v[0], shrink_target_blocks=v[1], us=[m[i + 1][0] for m in per_count],
                 rel_err=max(m[i + 1][1] for m in per_count), **({"decode_device_split": v[2]} if len(v) > 2 else {}))
            for i, v in enumerate(kinds)]
    case = dict(hi=hi, out_sizes=list(sizes), rank=r, tokens=tokens, adapters=[n for _, n in timed],
                default_us=[m[0][0] for m in per_count], default_rel_err=max(m[0][1] for m in per_count), variants=rows)
    if any(t != tokens for t, _ in timed):
        case["point_tokens"] = [t for t, _ in timed]
    return case, entries_for(case, margin)


def _counts_in(case, bucket):
    """The case cut to the adapter counts of one bucket (tuning.adapter_bucket), or None where the
    sweep timed none there or nothing else (then the entry for every count says it all)."""
    counts = _as_list(case.get("adapters", []))
    keep = [i for i, n in enumerate(counts) if tuning.adapter_bucket(n) == bucket]
    if not keep or len(keep) == len(counts):
        return None
    cut = lambda v: [_as_list(v)[i] for i in keep]  # noqa: E731
    return dict(case, adapters=cut(counts), default_us=cut(case["default_us"]),
                variants=[dict(w, us=cut(w["us"])) for w in case["variants"]],
                **({"point_tokens": cut(case["point_tokens"])} if "point_tokens" in case else {}))


def entries_for(case, margin):
    """The table entries a swept case earns: the one for every adapter count (select), and, where
    the sweep timed counts in more than one of tuning.adapter_bucket's buckets, one for each bucket
    ("one" / "few" / "many") whose own counts pick another choice (the planner takes it for a batch
    of a known count)."""
    general = select(case, margin)
    entries = [general] if general is not None else []
    pick = lambda e: None if e is None else (e["expand_kernel"], e["shrink_target_blocks"], e.get("decode_device_split"))  # noqa: E731
    for bucket in ("one", "few", "many"):
        sub = _counts_in(case, bucket)
        e = select(sub, margin) if sub is not None else None
        if e is not None and pick(e) != pick(general):
            entries.append(dict(e, adapter_bucket=bucket))
    return entries


def _as_list(v):
    return list(v) if isinstance(v, (list, tuple)) else [v]


#: the most any adapter count of a case may lose to the built-in rule for a choice to enter: measured on
#: the H200 (kernel-notes s15), choices 2-3 % slower at one adapter in the sweep were 5-8 % slower in
#: ops.py's rows of that adapter count
MAX_LOSS = 0.01


def select(case, margin, max_loss=MAX_LOSS):
    """The table entry a swept case earns (arch filled in when written), or None: among the variants
    that match the reference and split no coarser than the built-in rule, the one with the lowest
    geomean time ratio to the built-in rule over the adapter counts swept, if that geomean is below
    1 - margin and no count is slower than 1 + max_loss (a log of one count per case also reads)."""
    default = _as_list(case["default_us"])
    best, best_g = None, None
    for w in case["variants"]:
        if w["rel_err"] >= 2e-2 or w["shrink_target_blocks"] < MIN_TARGET.get(w["expand_kernel"], DEFAULT_TARGET):
            continue
        ratios = [u / d for u, d in zip(_as_list(w["us"]), default)]
        g = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
        if g < 1 - margin and max(ratios) <= 1 + max_loss and (best_g is None or g < best_g):
            best, best_g = w, g
    if best is None:
        return None
    return dict(arch=None, hi=case["hi"], out_sizes=list(case["out_sizes"]), rank_bucket=tuning.rank_bucket(case["rank"]),
                token_bucket=tuning.token_bucket(case["tokens"]), expand_kernel=best["expand_kernel"],
                shrink_target_blocks=best["shrink_target_blocks"], adapters=_as_list(case.get("adapters", [])),
                us=[round(u, 2) for u in _as_list(best["us"])], default_us=[round(d, 2) for d in default],
                **({"point_tokens": case["point_tokens"]} if "point_tokens" in case else {}),
                **({"decode_device_split": best["decode_device_split"]} if "decode_device_split" in best else {}))


def shape_spec(hi, sizes):
    """`Hi:out|out` (tune.py --shapes), e.g. 4096:14336 or 4096:4096|1024|1024."""
    return f"{hi}:{'|'.join(str(o) for o in sizes)}"


def write_table(path, arch, measured_note, entries, token_buckets=None, replaced_note=None, swept=None):
    """Replaces `arch`'s entries (and its measurement note) in the table at `path`, keeps the others;
    with `token_buckets`, only that arch's entries of those buckets (a partial sweep), with `swept`
    (a set of (hi, out sizes, token bucket)) only those of these shapes and buckets, and the note
    `replaced_note` (a rebuilt sweep's own)."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except FileNotFoundError:
        doc = {}
    partial = token_buckets is not None or swept is not None
    kept = [e for e in doc.get("entries", [])
            if e["arch"] != arch or (token_buckets is not None and e["token_bucket"] not in token_buckets)
            or (swept is not None and (e["hi"], tuple(e["out_sizes"]), e["token_bucket"]) not in swept)]
    # a partial sweep keeps the arch's earlier notes (its other buckets' entries come from them)
    measured = [m for m in doc.get("measured", [])
                if (m.get("arch") != arch or partial) and m not in (measured_note, replaced_note)] + [measured_note]
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
    entries = [e for c in cases for e in entries_for(c, args.margin)]
    buckets = {tuning.token_bucket(c["tokens"]) for c in cases}
    shapes = {(c["hi"], tuple(c["out_sizes"])) for c in cases}
    # a log of some shapes (tune.py --shapes) replaces only those shapes' entries of its buckets
    swept = None if shapes >= {(hi, sizes) for hi, sizes, _ in SHAPES} else \
        {(c["hi"], tuple(c["out_sizes"]), tuning.token_bucket(c["tokens"])) for c in cases}
    try:
        with open(args.out) as f:
            notes = [m for m in json.load(f).get("measured", []) if m.get("arch") == args.arch]
    except FileNotFoundError:
        notes = []
    # the note of a rebuild from the same log (a selection rule changed since) gives way; the notes
    # of the sweeps behind the table's other entries stay
    name = os.path.basename(args.from_log)
    old = next((m for m in reversed(notes) if m.get("rebuilt_from") == name), None)
    note = dict(old or {}, arch=args.arch, rebuilt=datetime.date.today().isoformat(), margin=args.margin, rebuilt_from=name,
                selection=SELECTION, tokens=sorted(buckets))
    # a log of some token buckets (a partial sweep) replaces the table's entries of those only
    write_table(args.out, args.arch, note, entries, buckets if buckets != set(tuning.TOKEN_BUCKETS) else None, old, swept)
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
    ap.add_argument("--tokens", help="sweep only these token counts (comma-separated, of the sweep's list); the "
                                     "table keeps its entries for the other token buckets")
    ap.add_argument("--targets", help="shrink split targets to sweep (comma-separated) instead of the default four")
    ap.add_argument("--kinds", help="sweep only these expand kinds (comma-separated, e.g. o1,p,p4,p16)")
    ap.add_argument("--shapes", help="sweep only these shapes (comma-separated Hi:out|out, e.g. 4096:14336); the "
                                     "table keeps its entries for the others")
    args = ap.parse_args()
    if args.from_log:
        return rebuild(args)
    torch.set_grad_enabled(False)
    props = torch.cuda.get_device_properties(0)
    arch = 10 * props.major + props.minor
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    targets = [int(t) for t in args.targets.split(",")] if args.targets else [132, 528] if args.quick else TARGETS
    kinds_only = set(args.kinds.split(",")) if args.kinds else None
    commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                           text=True).stdout.strip()
    note = dict(arch=arch, gpu=props.name, date=datetime.date.today().isoformat(), commit=commit,
                torch=torch.__version__, margin=args.margin, targets=targets, selection=SELECTION)
    if kinds_only:
        note["kinds"] = sorted(kinds_only)
    entries = []
    sweep = TOKENS
    buckets = None
    if args.tokens:
        wanted = {int(t) for t in args.tokens.split(",")}
        sweep = [(t, c) for t, c in TOKENS if t in wanted]
        buckets = {tuning.token_bucket(t) for t, _ in sweep}
        note["tokens"] = sorted(wanted)

    shapes = SHAPES
    swept = None
    if args.shapes:
        wanted_shapes = set(args.shapes.split(","))
        shapes = [s for s in SHAPES if shape_spec(s[0], s[1]) in wanted_shapes]
        if len(shapes) != len(wanted_shapes):
            ap.error(f"--shapes: {sorted(wanted_shapes)}, of {[shape_spec(h, o) for h, o, _ in SHAPES]}")
        swept = {(hi, sizes, tuning.token_bucket(t)) for hi, sizes, _ in shapes for t, _ in sweep}
        note["shapes"] = sorted(wanted_shapes)

    def write():  # after every shape: a sweep cut short still leaves the shapes it finished
        write_table(args.out, arch, note, entries, buckets, swept=swept)

    with open(args.log, "w") as log:
        for hi, sizes, mids in shapes:
            for r in RANKS:
                for tokens, counts in sweep:
                    case, found = tune_case(hi, sizes, mids, r, tokens, counts, l2, targets, args.margin, kinds_only)
                    log.write(json.dumps(case) + "\n")
                    log.flush()
                    fmt = lambda us: "/".join(f"{u:.1f}" for u in us)  # noqa: E731
                    print(f"{hi}->{sizes} r{r} T{case.get('point_tokens', tokens)} adapters {fmt(case['adapters'])}: built-in {fmt(case['default_us'])} us"
                          + "".join(f", table{' (' + e['adapter_bucket'] + ')' if e.get('adapter_bucket') else ''} "
                                    f"{e['expand_kernel']}/{e['shrink_target_blocks']}"
                                    f"{'/dev' if e.get('decode_device_split') else ''} {fmt(e['us'])} us" for e in found),
                          flush=True)
                    entries.extend(found)
            write()
    print(f"{len(entries)} entries for sm_{arch} -> {args.out}")


if __name__ == "__main__":
    main()
