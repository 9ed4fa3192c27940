"""One lora_apply per case for Nsight Compute (ncu) to read: decode (T=32, 32 adapters) and
prefill (T=2048, 1 adapter), r=16, 4096 -> 14336, bf16.  ncu --kernel-name regex:lora python benchmarks/profile_case.py"""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from kernel_fixtures import BatchMeta  # noqa: E402

from loramux.ops import kernels  # noqa: E402

hi, ho, r = 4096, 14336, 16
for T, n in ((32, 32), (2048, 1)):
    a = torch.randn(n, r, hi, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, ho, r, device="cuda", dtype=torch.bfloat16)
    table = torch.zeros(n, 1, 19, 4, dtype=torch.int64)
    table[:, 0, 1, 0] = a.data_ptr() + torch.arange(n) * r * hi * 2
    table[:, 0, 1, 1] = b.data_ptr() + torch.arange(n) * ho * r * 2
    table[:, 0, 1, 3] = r
    sot = (torch.arange(T, dtype=torch.int32) * n // T).cuda()
    meta = BatchMeta(table=table.cuda(), pool=a.view(torch.uint8).view(-1), dtype=torch.bfloat16, slot_of_token=sot, max_rank=r)
    x = torch.randn(T, hi, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(T, ho, device="cuda", dtype=torch.bfloat16)
    for _ in range(2):
        kernels.lora_apply(x, y, meta, 0, [1], [ho])
    torch.cuda.synchronize()
