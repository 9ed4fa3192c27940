"""A/B of decode-path kernel variants in one process (docs/kernel-notes.md, "Where the per-apply
time goes"): the LoRA work of a Llama-8B-shaped decode step (4 layers, 32 adapters r=16 on all 7
projections, weights beyond L2, put into a LoraCache on the GPU) captured in CUDA graphs, 7 applies
per layer and 4 (q|k|v and gate|up fused), at batch 1, 8, 32 and 64, for each variant. A variant is
a set of environment variables the launchers read at launch: LORAMUX_EXPAND_DECODE=grouped|flat
forces the decode expand kernel (and the shrink split that goes with it, rust/src/cuda/plan.rs),
anything else lets the geometry choose ("auto"); the fused decode kernel's variants force it and
change one launch knob each (plain launch, 3/4/5 blocks an SM, the shrink's A staged or in
registers, expand blocks, shrink split target);
graphs are captured under each. Also checks every variant's y against the first one's.

    python benchmarks/decode_ab.py --out ab.json [--variants fused,plain,m4 --batches 32,64]
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from _common import capture, copy_bandwidth, env_set, llama_spec, median_seconds, random_adapter, resident_adapters

from loramux.ops import kernels

DEV, DT = "cuda", torch.bfloat16
ADAPTERS, RANK, LAYERS = 32, 16, 4

DIMS = {1: (4096, 4096), 2: (4096, 1024), 3: (4096, 1024), 4: (4096, 4096), 7: (4096, 14336), 5: (4096, 14336),
        6: (14336, 4096)}
PER_PROJ = [[1], [2], [3], [4], [7], [5], [6]]
FUSED = [[1, 2, 3], [4], [5, 7], [6]]
VARIANTS = {
    "grouped": {"LORAMUX_EXPAND_DECODE": "grouped"},
    "flat": {"LORAMUX_EXPAND_DECODE": "flat"},
    "auto": {"LORAMUX_EXPAND_DECODE": "auto"},
    # the fused decode kernel's launch forms and geometry (rust/src/cuda/plan.rs)
    "twokernel": {"LORAMUX_DECODE_FUSED": "0"},
    "fused": {"LORAMUX_DECODE_FUSED": "1"},
    "plain": {"LORAMUX_DECODE_FUSED": "1", "LORAMUX_FUSED_PDL": "0"},
    "m3": {"LORAMUX_DECODE_FUSED": "1", "LORAMUX_FUSED_BLOCKS_PER_SM": "3"},
    "m4": {"LORAMUX_DECODE_FUSED": "1", "LORAMUX_FUSED_BLOCKS_PER_SM": "4"},
    "m5": {"LORAMUX_DECODE_FUSED": "1", "LORAMUX_FUSED_BLOCKS_PER_SM": "5"},
    # the fused shrink's A in registers (the built-in form: 4 blocks an SM up to rank 32, 3 above), or
    # staged in shared memory by cp.async (5 blocks an SM where shared memory lets them reside; 4)
    "regs": {"LORAMUX_DECODE_FUSED": "1", "LORAMUX_FUSED_STAGE_A": "0"},
    "staged": {"LORAMUX_DECODE_FUSED": "1", "LORAMUX_FUSED_STAGE_A": "1"},
    "staged4": {"LORAMUX_DECODE_FUSED": "1", "LORAMUX_FUSED_STAGE_A": "1", "LORAMUX_FUSED_BLOCKS_PER_SM": "4"},
    "xb264": {"LORAMUX_DECODE_FUSED": "1", "LORAMUX_FUSED_EXPAND_BLOCKS": "264"},
    # a grid within the SM slots (4 blocks an SM: 528): the decode step's q|k|v apply as 384 shrink
    # and 128 expand blocks, so every expand block loads its B and y during the shrink's A burst
    # (kernel-notes s13: a third of the expand blocks otherwise start after the shrink). Measured
    # 1.2x slower on the H200 (kernel-notes s14: fewer expand blocks stream more column steps each)
    "m4xb128": {"LORAMUX_DECODE_FUSED": "1", "LORAMUX_FUSED_BLOCKS_PER_SM": "4", "LORAMUX_FUSED_EXPAND_BLOCKS": "128"},
    "xb792": {"LORAMUX_DECODE_FUSED": "1", "LORAMUX_FUSED_EXPAND_BLOCKS": "792"},
    "st132": {"LORAMUX_DECODE_FUSED": "1", "LORAMUX_SHRINK_TARGET_BLOCKS": "132"},
    "st528": {"LORAMUX_DECODE_FUSED": "1", "LORAMUX_SHRINK_TARGET_BLOCKS": "528"},
    # the decode split and the fused column steps planned on the host (planned_items), not sized
    # from the step's item count on the device (decode6)
    "hostsplit": {"LORAMUX_DECODE_DEVICE_SPLIT": "0"},
    "devicesplit": {"LORAMUX_DECODE_DEVICE_SPLIT": "1"},
    # another launch table: the file LORAMUX_AB_TABLE names (e.g. the one before a sweep)
    "abtable": {"LORAMUX_TUNING_TABLE": os.environ.get("LORAMUX_AB_TABLE", "")},
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="ab.json")
    ap.add_argument("--variants", default="grouped,flat,auto", help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--batches", default="32,1,8,64")
    args = ap.parse_args()
    chosen = {name: VARIANTS[name] for name in args.variants.split(",")}
    torch.set_grad_enabled(False)
    spec = llama_spec(LAYERS, RANK)
    assert all(spec.module_dims(m) == dims for m, dims in DIMS.items())
    adapters = resident_adapters(spec, [random_adapter(spec, sorted(DIMS), range(LAYERS), RANK, dtype=DT, seed=i, std=0.05)
                                        for i in range(ADAPTERS)], dtype=DT, device=DEV)
    bw = copy_bandwidth()
    res = dict(gpu=torch.cuda.get_device_name(), copy_bw_gbs=bw / 1e9, lora_floor_us=adapters.value_bytes / bw * 1e6, cases={})
    for batch in (int(b) for b in args.batches.split(",")):
        meta = adapters.meta([t % ADAPTERS for t in range(batch)])
        x = {4096: torch.randn(batch, 4096, device=DEV, dtype=DT), 14336: torch.randn(batch, 14336, device=DEV, dtype=DT)}
        y0 = {w: 0.1 * torch.randn(batch, w, device=DEV, dtype=DT) for w in (1024, 4096, 6144, 14336, 28672)}
        ref = None
        for vname, env in chosen.items():
            with env_set(env):
                y = {w: t.clone() for w, t in y0.items()}

                def run(groups):
                    for layer in range(LAYERS):
                        for mids in groups:
                            sizes = [DIMS[m][1] for m in mids]
                            kernels.lora_apply(x[DIMS[mids[0]][0]], y[sum(sizes)], meta, layer, mids, sizes)

                # correctness: one eager pass from y0 compared across variants
                run(PER_PROJ)
                torch.cuda.synchronize()
                got = torch.cat([y[w].float().flatten() for w in sorted(y)])
                if ref is None:
                    ref, err = got, 0.0
                else:
                    err = float((got - ref).norm() / ref.norm())
                row = {"rel_diff_vs_first": err}
                for name, groups in (("per_proj_us", PER_PROJ), ("fused_us", FUSED)):
                    g, _ = capture(lambda: (run(groups), None)[1])
                    row[name] = median_seconds(g.replay) * 1e6
                    del g
                res["cases"][f"T{batch}/{vname}"] = row
                print(f"T={batch:3d} {vname:12s} {row}", flush=True)
    with open(args.out, "w") as f:
        f.write(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
