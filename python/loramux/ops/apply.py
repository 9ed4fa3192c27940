"""The LoRA batch ops: lora_shrink (x -> u), lora_expand (u -> y, in place) and lora_apply (both),
one adapter per token. CUDA tensors take the kernels (loramux.ops.kernels) when they take the case;
everything else takes torch: lora_apply on a decode-size batch stacks its adapters
(loramux.ops.stacked), on a longer one runs a GEMM per adapter (loramux.ops.per_adapter);
lora_shrink and lora_expand alone are the grouped reference (loramux.ops.reference)."""

from __future__ import annotations

import os
from typing import Callable, Sequence, Tuple

import torch

from loramux.ops import per_adapter, reference, stacked
from loramux.ops.batch_meta import BatchMeta
from loramux.ops.gemm_carveout import carved

try:  # the CUDA kernels are optional: absent on builds without them, the reference serves CUDA too
    from loramux.ops import kernels as _kernels
except ModuleNotFoundError as err:
    if err.name != "loramux.ops.kernels":
        raise
    _kernels = None

__all__ = ["lora_shrink", "lora_expand", "lora_apply", "lora_apply_beside"]

_side_streams = {}  # (device index, priority) -> the side stream LoRA branches run on beside the base GEMM


def _use_kernels(t: torch.Tensor, meta: BatchMeta, num_slices: int) -> bool:
    """CUDA tensors go to the kernels when they are built, usable here, and take this case
    (e.g. fp16/bf16 only); everything else takes the torch reference."""
    return (t.is_cuda and _kernels is not None and t.dtype == meta.dtype and _kernels.available()
            and _kernels.supports(meta.dtype, meta.max_rank, num_slices))


def _check(x: torch.Tensor, meta: BatchMeta, layer: int) -> None:
    """Shapes that do not fit the batch are bad arguments (ValueError), not bad adapters."""
    if x.dim() != 2:
        raise ValueError(f"lora ops take x as [T, H], got shape {tuple(x.shape)}")
    if meta.slot_of_token.numel() != x.shape[0]:
        raise ValueError(f"slot_of_token has {meta.slot_of_token.numel()} tokens but x has {x.shape[0]}")
    if not 0 <= layer < meta.table.shape[1]:
        raise ValueError(f"layer {layer} is out of range for a slot table of {meta.table.shape[1]} layers")


def _check_out_sizes(y: torch.Tensor, module_ids: Sequence[int], out_sizes: Sequence[int]) -> None:
    if len(out_sizes) != len(module_ids) or sum(out_sizes) != y.shape[1]:
        raise ValueError(f"out_sizes {list(out_sizes)} must give one width per module id and sum to y's {y.shape[1]} columns")


def lora_shrink(x: torch.Tensor, meta: BatchMeta, layer: int, module_ids: Sequence[int]) -> torch.Tensor:
    """u[s, t, :rank] = x[t] @ A^T for slice s and token t's adapter; float32 [S, T, max_rank]."""
    _check(x, meta, layer)
    if _use_kernels(x, meta, len(module_ids)):
        return _kernels.lora_shrink(x, meta, layer, module_ids)
    return reference.shrink(x, meta, layer, module_ids)


def lora_expand(
    u: torch.Tensor,
    y: torch.Tensor,
    meta: BatchMeta,
    layer: int,
    module_ids: Sequence[int],
    out_sizes: Sequence[int],
) -> None:
    """y[:, slice s] += u[s] @ B^T per token's adapter, in place; DoRA rows: y = scale * (y + u B^T)."""
    _check(y, meta, layer)
    _check_out_sizes(y, module_ids, out_sizes)
    if _use_kernels(y, meta, len(module_ids)):
        _kernels.lora_expand(u, y, meta, layer, module_ids, out_sizes)
        return
    reference.expand(u, y, meta, layer, module_ids, out_sizes)


def lora_apply(
    x: torch.Tensor,
    y: torch.Tensor,
    meta: BatchMeta,
    layer: int,
    module_ids: Sequence[int],
    out_sizes: Sequence[int],
) -> None:
    """Shrink then expand: y gains each token's LoRA term for the given module slices."""
    if _use_kernels(x, meta, len(module_ids)):
        _kernels.lora_apply(x, y, meta, layer, module_ids, out_sizes)
        return
    _check(x, meta, layer)
    _check(y, meta, layer)
    _check_out_sizes(y, module_ids, out_sizes)
    if stacked.serves(meta, x.shape[0]):
        stacked.apply(x, y, meta, layer, module_ids, out_sizes)
    else:
        per_adapter.apply(x, y, meta, layer, module_ids, out_sizes)


def _side_stream(device: torch.device) -> "torch.cuda.Stream":
    """The device's side stream for LoRA branches beside the base GEMM. LORAMUX_SIDE_STREAM_PRIORITY=high
    makes it a high-priority stream (captured graphs keep the priority on its kernel nodes), so the
    branch's blocks are dispatched ahead of the GEMM's waiting ones: an A/B switch, off by default."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    priority = -5 if os.environ.get("LORAMUX_SIDE_STREAM_PRIORITY") == "high" else 0  # clamped to the device's range
    stream = _side_streams.get((index, priority))
    if stream is None:
        stream = _side_streams[(index, priority)] = torch.cuda.Stream(device=index, priority=priority)
    return stream


def lora_apply_beside(
    x: torch.Tensor,
    base: Callable[[], torch.Tensor],
    meta: BatchMeta,
    layer: int,
    applies: Sequence[Tuple[Sequence[int], Sequence[int]]],
) -> torch.Tensor:
    """y = base() ([T, W], the projection's base output) plus each token's LoRA slices of `applies`
    ([(module_ids, out_sizes)], each over y's W columns). Where the kernels serve the batch the LoRA
    branch runs on a side stream while base() runs on the current one (a captured CUDA graph holds
    both branches), and the current stream merges it into y (DoRA rows scaled as in order). Elsewhere:
    base() then lora_apply per entry, in order."""
    if applies and _use_kernels(x, meta, max(len(ids) for ids, _ in applies)):
        width = sum(int(o) for o in applies[0][1])
        return _kernels.lora_apply_beside(x, carved(base, x.shape[0], x.device), meta, layer, applies, width, _side_stream(x.device))
    y = base()
    for ids, sizes in applies:
        lora_apply(x, y, meta, layer, ids, sizes)
    return y
