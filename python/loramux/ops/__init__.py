"""LoRA batch ops over the cache's slot table: CUDA kernels for fp16/bf16 CUDA tensors, a torch
reference for the rest."""

from loramux.ops.apply import lora_apply, lora_apply_beside, lora_expand, lora_shrink
from loramux.ops.batch_meta import BatchMeta

__all__ = ["BatchMeta", "lora_shrink", "lora_expand", "lora_apply", "lora_apply_beside"]
