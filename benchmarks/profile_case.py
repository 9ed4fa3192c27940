"""One lora_apply per case for Nsight Compute (ncu) to read: decode (T=32, 32 adapters) and prefill
(T=2048, 1 adapter), r=16, 4096 -> 14336 (mlp_h_to_4h), bf16, adapters read out of a LoraCache.

    ncu --kernel-name regex:lora python benchmarks/profile_case.py
"""

import torch
from _common import llama_spec, random_adapter, resident_adapters

from loramux.ops import kernels

MODULE, RANK = 5, 16  # mlp_h_to_4h: 4096 -> 14336 at Llama-8B shapes
spec = llama_spec(1, RANK)
hi, ho = spec.module_dims(MODULE)
for T, n in ((32, 32), (2048, 1)):
    adapters = resident_adapters(spec, [random_adapter(spec, [MODULE], [0], RANK, seed=i) for i in range(n)])
    meta = adapters.meta([t * n // T for t in range(T)])
    x = torch.randn(T, hi, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(T, ho, device="cuda", dtype=torch.bfloat16)
    for _ in range(2):
        kernels.lora_apply(x, y, meta, 0, [MODULE], [ho])
    torch.cuda.synchronize()
    adapters.batch.release()
