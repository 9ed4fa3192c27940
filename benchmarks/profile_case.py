"""lora_apply on a few cases for Nsight Compute (ncu) to read, tokens in random order, the step's
token segments built first: decode (T=32, 32 adapters, 4096 -> 14336), mid (T=256, 128 adapters,
4096 -> 4096) and prefill (T=2048, 8 adapters, 4096 -> 4096), r=16, bf16; each case twice.

    ncu --kernel-name regex:lora python benchmarks/profile_case.py
"""

import os
import sys
from dataclasses import replace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from kernel_fixtures import BatchMeta  # noqa: E402

from loramux.ops import kernels  # noqa: E402

r = 16
for T, n, hi, ho in ((32, 32, 4096, 14336), (256, 128, 4096, 4096), (2048, 8, 4096, 4096)):
    a = torch.randn(n, r, hi, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, ho, r, device="cuda", dtype=torch.bfloat16)
    table = torch.zeros(n, 1, 19, 4, dtype=torch.int64)
    table[:, 0, 1, 0] = a.data_ptr() + torch.arange(n) * r * hi * 2
    table[:, 0, 1, 1] = b.data_ptr() + torch.arange(n) * ho * r * 2
    table[:, 0, 1, 3] = r
    gen = torch.Generator().manual_seed(T)
    sot = (torch.arange(T, dtype=torch.int32) * n // T)[torch.randperm(T, generator=gen)].contiguous().cuda()
    meta = BatchMeta(table=table.cuda(), pool=a.view(torch.uint8).view(-1), dtype=torch.bfloat16, slot_of_token=sot,
                     max_rank=r)
    meta = replace(meta, segments=kernels.segments(sot, n))
    x = torch.randn(T, hi, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(T, ho, device="cuda", dtype=torch.bfloat16)
    for _ in range(2):
        kernels.lora_apply(x, y, meta, 0, [1], [ho])
    torch.cuda.synchronize()
