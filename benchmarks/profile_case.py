"""lora_apply on a few cases for Nsight Compute (ncu) to read, tokens in random order, the step's
token segments built first with its adapter count (as ops.py times them), r=16, bf16, adapters
read out of a LoraCache; each case twice.
Default: decode (T=32, 32 adapters, 4096 -> 14336), mid (T=256, 128 adapters, 4096 -> 4096) and
prefill (T=2048, 8 adapters, 4096 -> 4096). `--decode-step`: the decode step's four fused applies
at batch 32, one token per adapter (q|k|v 4096 -> 4096+1024+1024, o, gate|up 4096 -> 2 x 14336,
down 14336 -> 4096), then q|k|v at 64 tokens of one adapter. `--cases T:n:module,...` (e.g.
2048:1:4,256:1:6 with `--rank 64`): those cases instead (module ids as below).

    ncu --kernel-name regex:lora python benchmarks/profile_case.py [--decode-step | --cases ... --rank R]
"""

import sys
from dataclasses import replace

import torch
from _common import llama_spec, random_adapter, resident_adapters

from loramux.ops import kernels

def _arg(name, default):
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default


RANK = int(_arg("--rank", 16))
spec = llama_spec(1, RANK)


def run(T, n, modules, order_seed):
    hi = spec.module_dims(modules[0])[0]
    sizes = [spec.module_dims(m)[1] for m in modules]
    adapters = resident_adapters(spec, [random_adapter(spec, modules, [0], RANK, seed=i) for i in range(n)])
    order = torch.randperm(T, generator=torch.Generator().manual_seed(order_seed)).tolist()
    slots = [order[t] * n // T for t in range(T)]
    meta = adapters.meta(slots)
    # the step's adapter count, as StepBatch and ops.py give it: it decides items or tiles for 16..512 tokens
    used = len(set(slots))
    meta = replace(meta, adapters=used, segments=kernels.segments(meta.slot_of_token, meta.table.shape[0], used))
    x = torch.randn(T, hi, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(T, sum(sizes), device="cuda", dtype=torch.bfloat16)
    for _ in range(2):
        kernels.lora_apply(x, y, meta, 0, list(modules), sizes)
    torch.cuda.synchronize()


if "--decode-step" in sys.argv:
    # module ids: 1 q, 2 k, 3 v, 4 o, 5 gate (mlp_h_to_4h), 7 up (mlp_gate), 6 down (Llama-8B shapes)
    for modules in ([1, 2, 3], [4], [5, 7], [6]):
        run(32, 32, modules, 32)
    run(64, 1, [1, 2, 3], 64)
elif "--cases" in sys.argv:
    for case in _arg("--cases", "").split(","):
        T, n, module = (int(v) for v in case.split(":"))
        run(T, n, [module], T)
else:
    # (tokens, adapters, module): mlp_h_to_4h is 4096 -> 14336 at Llama-8B shapes, attn_q 4096 -> 4096
    for T, n, module in ((32, 32, 5), (256, 128, 1), (2048, 8, 1)):
        run(T, n, [module], T)
