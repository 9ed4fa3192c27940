"""lora_apply on a few cases for Nsight Compute (ncu) to read, tokens in random order, the step's
token segments built first: decode (T=32, 32 adapters, 4096 -> 14336), mid (T=256, 128 adapters,
4096 -> 4096) and prefill (T=2048, 8 adapters, 4096 -> 4096), r=16, bf16, adapters read out of a
LoraCache; each case twice.

    ncu --kernel-name regex:lora python benchmarks/profile_case.py
"""

from dataclasses import replace

import torch
from _common import llama_spec, random_adapter, resident_adapters

from loramux.ops import kernels

RANK = 16
spec = llama_spec(1, RANK)
# (tokens, adapters, module): mlp_h_to_4h is 4096 -> 14336 at Llama-8B shapes, attn_q 4096 -> 4096
for T, n, module in ((32, 32, 5), (256, 128, 1), (2048, 8, 1)):
    hi, ho = spec.module_dims(module)
    adapters = resident_adapters(spec, [random_adapter(spec, [module], [0], RANK, seed=i) for i in range(n)])
    order = torch.randperm(T, generator=torch.Generator().manual_seed(T)).tolist()
    meta = adapters.meta([order[t] * n // T for t in range(T)])
    meta = replace(meta, segments=kernels.segments(meta.slot_of_token, meta.table.shape[0]))
    x = torch.randn(T, hi, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(T, ho, device="cuda", dtype=torch.bfloat16)
    for _ in range(2):
        kernels.lora_apply(x, y, meta, 0, [module], [ho])
    torch.cuda.synchronize()
