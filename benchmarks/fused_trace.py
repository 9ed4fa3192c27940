"""A per-block timeline of the fused decode kernel (cuda/lora_fused.cu): %globaltimer at each phase
of a block, printed by thread 0 at the block's end. `build` compiles an instrumented copy of the
kernel with the package's NVRTC (no GPU needed) and stores it in a fresh kernel cache under the
name of the shipped source, so a launch through that cache runs the traced kernel; `summary` reads
the printed lines back (median time of each phase over the blocks of the first wave, per role).

    python benchmarks/fused_trace.py build --arch 90 --cache .gpu/kcache_trace   # here
    LORAMUX_KERNEL_CACHE=.gpu/kcache_trace python benchmarks/profile_case.py --decode-step | grep LMXT > trace.txt
    python benchmarks/fused_trace.py summary trace.txt

Only the first wave's times mean what they say: the printf at each block's end delays the block
that takes its SM slot next (measured on the H200: the second wave began ~750 us late)."""

from __future__ import annotations

import argparse
import gzip
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

from ptxas_report import family_source, nvrtc_compile

ROOT = pathlib.Path(__file__).resolve().parents[1]
# mark -> phase reached, per role (the instrumented lines below)
MARKS = {0: ["start", "placed", "after griddepcontrol.wait", "item read", "ticket, tokens, entry",
             "partials written", "count published", None, None, "end"],
         1: ["start", "placed", "after griddepcontrol.wait", "item read", "ticket, tokens, entry",
             "B and y issued", "shrink count seen", "u summed, first tile in", "columns done", "end"]}

HEADER = '''
__shared__ unsigned long long lmx_t[10];
__device__ __forceinline__ unsigned long long lmx_now() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
#define TR(i) do { if (threadIdx.x == 0) lmx_t[i] = lmx_now(); } while (0)
'''
PRINT = '''    TR(9);
    if (threadIdx.x == 0) {
        unsigned smid;
        asm volatile("mov.u32 %0, %%smid;" : "=r"(smid));
        printf("LMXT %d %d %d %d %u %d %llu %llu %llu %llu %llu %llu %llu %llu %llu %llu\\n", blockIdx.x,
               role < f.ksplit ? 0 : 1, s, item, smid, w.count, lmx_t[0], lmx_t[1], lmx_t[2], lmx_t[3], lmx_t[4],
               lmx_t[5], lmx_t[6], lmx_t[7], lmx_t[8], lmx_t[9]);
    }
}'''
# (anchor in lora_fused.cu, what goes before it, what goes after it): each anchor must occur once
EDITS = [
    ("#define FUSED_COLS", HEADER, ""),
    ("    FusedShape f = fused_placed_shape(p);", "    TR(0);\n    for (int i = 1; i < 10; ++i) if (threadIdx.x == 0) lmx_t[i] = 0;\n", ""),
    ("    pdl_wait();\n    pdl_launch_dependents();  // a dependent launched after this one waits on it the same way\n",
     "    TR(1);\n", "    TR(2);\n"),
    ("    if (w.count == 0) return;  // no such item in this step: the whole group leaves, touching nothing\n", "",
     "    TR(3);\n"),
    ("    __syncthreads();\n    unsigned* done = reinterpret_cast<unsigned*>(&ws[1]);\n", "", "    TR(4);\n"),
    ("    __syncthreads();\n    if (threadIdx.x == 0) red_inc(done, wrap, true);\n", "    TR(5);\n", "    TR(6);\n"),
    ("    fused_wait(done, wrap, ksplit);\n    // u = the item's partials", "    TR(5);\n", ""),
    ("    // u = the item's partials summed over the splits", "    TR(6);\n", ""),
    ("        load_y(j + 1, yn, sn);\n", "        if (j == 0) TR(7);\n", ""),
    ("        sv = sn;\n    }\n", "", "    TR(8);\n"),
]


def instrument(src: str) -> str:
    for anchor, before, after in EDITS:
        if src.count(anchor) != 1:
            raise SystemExit(f"fused_trace: the anchor {anchor!r} occurs {src.count(anchor)} times in lora_fused.cu")
        src = src.replace(anchor, before + anchor + after)
    end = "            fused_expand<BF16, DECODE_TOKENS>(p, w, e, done, wrap, s, g, f.ksplit, f.col_steps, fsm);\n    }\n}"
    if src.count(end) != 1:
        raise SystemExit("fused_trace: fused_decode's end not found once in lora_fused.cu")
    return src.replace(end, end[:-1] + PRINT)


def build(arch: int, cache: pathlib.Path) -> None:
    if cache.exists() and any(cache.iterdir()):
        raise SystemExit(f"fused_trace: {cache} is not empty (it must hold one lora_fused cubin: the shipped one)")
    cache.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, LORAMUX_KERNEL_CACHE=str(cache))
    subprocess.run([sys.executable, "-m", "loramux.cli", "compile-kernels", "--arch", str(arch)], check=True, env=env)
    shipped = sorted(cache.glob(f"lora_fused-sm{arch}-*.cubin"))
    if len(shipped) != 1:
        raise SystemExit(f"fused_trace: expected one lora_fused cubin in {cache}, found {shipped}")
    source = family_source("lora_fused", instrument((ROOT / "cuda" / "lora_fused.cu").read_text()))
    # the package's options (rust/src/cuda/nvrtc.rs options)
    rc, log, cubin = nvrtc_compile(source, "lora_fused", [f"--gpu-architecture=sm_{arch}", "-std=c++17", "--fmad=true"])
    if rc != 0:
        raise SystemExit(f"fused_trace: NVRTC failed:\n{log[-4000:]}")
    shipped[0].write_bytes(cubin)
    print(f"traced lora_fused for sm_{arch} in {shipped[0]}")


def summary(path: str) -> None:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        rows = [line.split() for line in f if line.startswith("LMXT")]
    blocks = [(int(r[2]), list(map(int, r[7:17]))) for r in rows]
    if not blocks:
        raise SystemExit("fused_trace: no LMXT lines")
    # the first wave: blocks that started within 20 us of the first (a later start is the next wave
    # or another launch)
    t0 = min(t[0] for _, t in blocks)
    wave = [(role, t) for role, t in blocks if t[0] - t0 < 20_000]
    print(f"{len(wave)} blocks in the first wave of {len(blocks)} lines; us from the first block's start (median):")
    for role, names in MARKS.items():
        mine = [t for r, t in wave if r == role]
        if not mine:
            continue
        print(f"  {'shrink' if role == 0 else 'expand'} role, {len(mine)} blocks:")
        for i, name in enumerate(names):
            times = [(t[i] - t0) / 1000 for t in mine if name and t[i]]
            if times:
                print(f"    {i} {name:28s} {statistics.median(times):6.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--arch", type=int, default=90)
    b.add_argument("--cache", default=str(pathlib.Path(tempfile.gettempdir()) / "loramux-kcache-trace"))
    s = sub.add_parser("summary")
    s.add_argument("file")
    args = ap.parse_args()
    if args.cmd == "build":
        build(args.arch, pathlib.Path(args.cache))
    else:
        summary(args.file)


if __name__ == "__main__":
    main()
