"""Which fused attention kernels the serving forwards may use: on CUDA every one torch has except
cuDNN's, whose scaled-dot-product attention builds an execution plan for each new (batch, query,
key) shape. Serving shapes change with every prompt length and attended span, so that plan is
rebuilt almost every forward (on an H200, an HF Llama prefill at a new prompt length took 78-676 ms
with it and 19-31 ms without; repeated shapes 19-25 ms with it, 12-17 ms without)."""

from __future__ import annotations

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

_SHAPE_STABLE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def serving_attention(device: torch.device):
    """Context for one serving forward on `device`: leaves CPU forwards as they are."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel(_SHAPE_STABLE_BACKENDS)


__all__ = ["serving_attention"]
