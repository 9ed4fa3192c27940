"""The CUDA LoRA ops: lora_shrink / lora_expand / lora_apply with the signatures of loramux.ops
(docs/internals.md), run by the NVRTC-compiled kernels of cuda/ on the current torch stream.

This module only translates tensors to raw pointers and sizes; the Rust core validates, plans
and launches (rust/src/cuda/). No host sync, no metadata copy: CUDA-graph capturable.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from typing import Sequence

import loramux._core as _core
from loramux.errors import LoraCudaError
from loramux.layout import ENTRY_WORDS, KERNEL_DTYPES
from loramux.modules import NUM_MODULES
from loramux.ops import tuning
from loramux.ops.nvrtc_library import nvrtc_library

__all__ = ["available", "supports", "segments", "lora_shrink", "lora_expand", "lora_apply", "lora_apply_beside"]

MAX_RANK = _core.KERNEL_MAX_RANK
MAX_SLICES = _core.KERNEL_MAX_SLICES
#: str(torch dtype) -> the core's name, for the dtypes the kernels take
_DTYPES = {f"torch.{name}": name for name in KERNEL_DTYPES}


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """True when a CUDA device, the driver and libnvrtc are all there (asked once per process)."""
    try:
        import torch
    except ImportError:
        return False
    if not torch.cuda.is_available():
        return False
    nvrtc_library()
    return bool(_core.nvrtc_available())


def supports(dtype, max_rank: int, num_slices: int = 1) -> bool:
    """Whether the kernels take this case (else loramux.ops keeps the torch reference)."""
    return str(dtype) in _DTYPES and 1 <= max_rank <= MAX_RANK and 1 <= num_slices <= MAX_SLICES


def _dtype_name(dtype) -> str:
    name = _DTYPES.get(str(dtype))
    if name is None:
        raise LoraCudaError(f"the CUDA LoRA kernels take {' or '.join(KERNEL_DTYPES)}, got {dtype}")
    return name


def _rows(name: str, t, device) -> None:
    if t.device != device:
        raise LoraCudaError(f"{name} is on {t.device}, expected {device}")
    if t.dim() != 2 or (t.shape[1] > 1 and t.stride(1) != 1):
        raise LoraCudaError(f"{name} must be 2-D with contiguous rows, got shape {tuple(t.shape)} strides {t.stride()}")


def _device_index(device) -> int:
    import torch

    return device.index if device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=None)
def _arch(index: int) -> int:
    import torch

    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def _tuning(device, hi: int, out_sizes, max_rank: int, tokens: int, adapters=None) -> tuning.Choice:
    """The launch table's choice for a lora_apply of this geometry and adapter count (ops/tuning.py)."""
    return tuning.choice(_arch(_device_index(device)), hi, out_sizes, max_rank, tokens, adapters)


def segments(slot_of_token, num_slots: int, adapters=None):
    """The token segments of slot_of_token over a table of num_slots slots (int32 tensor on its
    device), built by one kernel on the current stream: no host sync, CUDA-graph capturable (a
    captured build re-reads slot_of_token on every replay). `adapters`: the distinct slots among
    the tokens where the caller knows them (BatchMeta.adapters, which the applies must carry too)."""
    import torch

    if slot_of_token.dtype != torch.int32 or slot_of_token.dim() != 1 or not slot_of_token.is_contiguous():
        raise LoraCudaError(f"slot_of_token must be a contiguous 1-D int32 tensor, got {slot_of_token.dtype} "
                            f"{tuple(slot_of_token.shape)}")
    nvrtc_library()
    device = slot_of_token.device
    tokens = slot_of_token.shape[0]
    n = _core.segments_len(tokens, num_slots, adapters)
    buf = torch.empty(n, dtype=torch.int32, device=device)
    _core.build_segments(_device_index(device), torch.cuda.current_stream(device).cuda_stream,
                         slot_of_token.data_ptr(), tokens, num_slots, buf.data_ptr(), n, adapters)
    return buf


def _segments_of(meta, device, tokens: int):
    """meta.segments when they fit this batch (StepBatch builds them once per step), else new ones."""
    import torch

    seg = meta.segments
    num_slots = meta.table.shape[0]
    if seg is not None:
        need = _core.segments_len(tokens, num_slots, meta.adapters)
        if seg.device != device or seg.dtype != torch.int32 or seg.numel() != need or not seg.is_contiguous():
            raise LoraCudaError(f"meta.segments must be a contiguous int32 tensor of {need} elements on {device} "
                                f"(kernels.segments of its slot_of_token with adapters={meta.adapters}), "
                                f"got {seg.dtype} {tuple(seg.shape)} on {seg.device}")
        return seg
    return segments(meta.slot_of_token, num_slots, meta.adapters)


def _batch(meta, layer: int, device, tokens: int, choice: tuning.Choice = tuning.Choice(None, None)):
    """(the Rust KernelBatch, the segments tensor it points into: kept alive by the caller); its
    launches go to the current stream."""
    import torch

    nvrtc_library()
    table, slots = meta.table, meta.slot_of_token
    for name, t, dt in (("meta.table", table, torch.int64), ("meta.slot_of_token", slots, torch.int32)):
        if t.device != device:
            raise LoraCudaError(f"{name} is on {t.device}, the activations on {device}")
        if t.dtype != dt or not t.is_contiguous():
            raise LoraCudaError(f"{name} must be a contiguous {dt} tensor, got {t.dtype}")
    if table.dim() != 4 or tuple(table.shape[2:]) != (NUM_MODULES, ENTRY_WORDS):
        raise LoraCudaError(f"meta.table must be [max_slots, num_layers, {NUM_MODULES}, {ENTRY_WORDS}], got {tuple(table.shape)}")
    if slots.dim() != 1 or slots.shape[0] != tokens:
        raise LoraCudaError(f"meta.slot_of_token must be [{tokens}], got {tuple(slots.shape)}")
    if not 0 <= layer < table.shape[1]:
        raise LoraCudaError(f"layer {layer} is out of range for a slot table of {table.shape[1]} layers")
    seg = _segments_of(meta, device, tokens)
    return seg, _core.KernelBatch(
        device=_device_index(device),
        stream=torch.cuda.current_stream(device).cuda_stream,
        dtype=_dtype_name(meta.dtype),
        slot_of_token=slots.data_ptr(),
        segments=seg.data_ptr(),
        tokens=tokens,
        table=table.data_ptr(),
        num_slots=table.shape[0],
        num_layers=table.shape[1],
        layer=layer,
        max_rank=int(meta.max_rank),
        shrink_target_blocks=choice.shrink_target_blocks,
        expand_kernel=choice.expand_kernel,
        decode_device_split=choice.decode_device_split,
        adapters=meta.adapters,
    )


def _shrink_partials(x, meta, layer: int, module_ids: Sequence[int], choice: tuning.Choice = tuning.Choice(None, None),
                     device_split: bool = True):
    """Allocates the partials and launches the shrink, both on the current stream.
    `device_split`: decode batches may size the split from the step's item count (the plan's
    split_target, which the expand must be given); False for a shrink whose reduce sums every split."""
    batch, ids, plan, partial, seg = _partials(x, meta, layer, module_ids, choice, device_split)
    u_offset = batch.shrink(x.data_ptr(), x.stride(0), x.shape[1], ids, partial.data_ptr(), partial.numel(), plan)
    return batch, ids, plan, partial, seg, u_offset


def _partials(x, meta, layer: int, module_ids: Sequence[int], choice: tuning.Choice, device_split: bool = True):
    """The shrink's batch, plan and partial buffer (allocated on the current stream), nothing launched."""
    import torch

    _rows("x", x, x.device)
    if x.dtype != meta.dtype:
        raise LoraCudaError(f"x is {x.dtype} but the adapters are {meta.dtype}: serve in one dtype")
    tokens, hi = x.shape
    seg, batch = _batch(meta, layer, x.device, tokens, choice)
    ids = [int(m) for m in module_ids]
    plan = _core.plan_shrink(tokens, hi, len(ids), meta.table.shape[0], choice.shrink_target_blocks, choice.expand_kernel,
                             int(meta.max_rank), device_split, choice.decode_device_split, meta.adapters)
    # the partials, then room for u [S, T, max_rank], which the pipelined prefill shrink fills
    u_len = len(ids) * tokens * int(meta.max_rank)
    partial = torch.empty(plan[0] * u_len + u_len, dtype=torch.float32, device=x.device)
    return batch, ids, plan, partial, seg


def lora_shrink(x, meta, layer: int, module_ids: Sequence[int]):
    """u [len(module_ids), T, max_rank] float32: u[s, t, r] = sum_i x[t, i] A[r, i] (0 past rank)."""
    import torch

    batch, ids, plan, partial, _seg, _u_offset = _shrink_partials(x, meta, layer, module_ids, device_split=False)
    u = torch.empty((len(ids), x.shape[0], int(meta.max_rank)), dtype=torch.float32, device=x.device)
    batch.reduce(ids, partial.data_ptr(), plan, u.data_ptr())
    return u


def _expand_checks(y, module_ids, out_sizes, device):
    _rows("y", y, device)
    if len(out_sizes) != len(module_ids):
        raise LoraCudaError(f"{len(out_sizes)} out_sizes for {len(module_ids)} module ids")
    if sum(out_sizes) > y.shape[1]:
        raise LoraCudaError(f"sum(out_sizes) = {sum(out_sizes)} is wider than y ({y.shape[1]} columns)")


def lora_expand(u, y, meta, layer: int, module_ids: Sequence[int], out_sizes: Sequence[int]) -> None:
    """In place: y[:, slice s] += u[s] @ B^T per token's adapter; DoRA rows: scale * (y + ...)."""
    import torch

    ids, sizes = [int(m) for m in module_ids], [int(o) for o in out_sizes]
    _expand_checks(y, ids, sizes, y.device)
    if y.dtype != meta.dtype:
        raise LoraCudaError(f"y is {y.dtype} but the adapters are {meta.dtype}: serve in one dtype")
    tokens = y.shape[0]
    want = (len(ids), tokens, int(meta.max_rank))
    if tuple(u.shape) != want or u.dtype != torch.float32 or not u.is_contiguous() or u.device != y.device:
        raise LoraCudaError(f"u must be a contiguous float32 {list(want)} tensor on {y.device}, got {u.dtype} {list(u.shape)}")
    _seg, batch = _batch(meta, layer, y.device, tokens)
    batch.expand(u.data_ptr(), 1, y.data_ptr(), y.stride(0), ids, sizes)


def _apply_checks(x, y, meta, module_ids, out_sizes):
    sizes = [int(o) for o in out_sizes]
    _expand_checks(y, list(module_ids), sizes, x.device)
    if y.shape[0] != x.shape[0] or y.dtype != x.dtype:
        raise LoraCudaError(f"y {tuple(y.shape)} {y.dtype} does not match x {tuple(x.shape)} {x.dtype}")
    return sizes


def _expand_after(batch, y, ids, sizes, plan, partial, u_offset, chained: bool, hi: int, max_rank: int) -> None:
    """The expand after the shrink that wrote `partial`: a prefill shrink that left u unsummed (the
    register-staged one, or the pipelined one's fallback: u_offset None, plan[2] set) gets the reduce
    of its split-K partials into u first, once instead of in every expand block; otherwise the expand
    reads what the shrink left (_expand_summed)."""
    import torch

    if u_offset is None and plan[2]:
        u = torch.empty((len(ids), y.shape[0], max_rank), dtype=torch.float32, device=y.device)
        batch.reduce(ids, partial.data_ptr(), plan, u.data_ptr())
        batch.expand(u.data_ptr(), 1, y.data_ptr(), y.stride(0), ids, sizes)
    else:
        _expand_summed(batch, y, ids, sizes, plan, partial, u_offset, chained, hi)


def _expand_summed(batch, y, ids, sizes, plan, partial, u_offset, chained: bool, hi: int) -> None:
    """The expand from u where the shrink summed its partials into it (u_offset floats into
    `partial`), else from the split-K partials themselves (summed as the expand loads them; where
    the shrink sized its split on the device, plan[3], the expand sums the same splits)."""
    if u_offset is not None:
        batch.expand(partial.data_ptr() + 4 * u_offset, 1, y.data_ptr(), y.stride(0), ids, sizes, chained=chained)
    else:
        batch.expand(partial.data_ptr(), plan[0], y.data_ptr(), y.stride(0), ids, sizes, chained=chained, hi=hi,
                     split_target=plan[3])


def _apply_fused(x, y, meta, layer: int, ids, sizes, choice, plan) -> None:
    """The fused decode kernel: shrink and expand in one launch (plan from _core.plan_fused)."""
    import torch

    _rows("x", x, x.device)
    if x.dtype != meta.dtype:
        raise LoraCudaError(f"x is {x.dtype} but the adapters are {meta.dtype}: serve in one dtype")
    tokens, hi = x.shape
    seg, batch = _batch(meta, layer, x.device, tokens, choice)
    partial = torch.empty(len(ids) * plan[0] * tokens * int(meta.max_rank), dtype=torch.float32, device=x.device)
    batch.fused(x.data_ptr(), x.stride(0), hi, y.data_ptr(), y.stride(0), ids, sizes, partial.data_ptr(),
                partial.numel(), plan)
    del seg  # alive until here: the launch reads it


def lora_apply(x, y, meta, layer: int, module_ids: Sequence[int], out_sizes: Sequence[int]) -> None:
    """Shrink then expand over the batch's token segments (meta.segments, or built here first).
    Decode (T <= 64, rank <= 64), and batches of up to 512 tokens whose counted adapters
    (meta.adapters) average a few tokens each (rust/src/cuda/plan/fused.rs fused_past_decode): one fused
    launch (cuda/lora_fused.cu), or, where the launch table or LORAMUX_DECODE_FUSED=0 says so, two
    launches, the expand a programmatic dependent of the shrink on sm_90 (starts early, waits
    in-kernel) that sums the split-K partials as it loads u.
    Prefill: shrink, then the expand; the pipelined shrink sums its partials into u itself, elsewhere
    a reduce of the partials into u runs between them. Which kernels and how finely
    the shrink splits: the measured launch table where it has the geometry (tuning.py)."""
    sizes = _apply_checks(x, y, meta, module_ids, out_sizes)
    choice = _tuning(x.device, x.shape[1], sizes, int(meta.max_rank), x.shape[0], meta.adapters)
    ids = [int(m) for m in module_ids]
    fused = _core.plan_fused(x.shape[0], x.shape[1], max(sizes, default=0), len(ids), meta.table.shape[0],
                             int(meta.max_rank), choice.shrink_target_blocks, choice.expand_kernel,
                             choice.decode_device_split, meta.adapters)
    if fused is not None:
        _apply_fused(x, y, meta, layer, ids, sizes, choice, fused)
        return
    batch, ids, plan, partial, seg = _partials(x, meta, layer, module_ids, choice)
    # the pipelined pair, the expand waiting on each item's u; else the shrink, then the expand
    # chained to it (the same batch and segments)
    if not batch.apply_signalled(x.data_ptr(), x.stride(0), x.shape[1], y.data_ptr(), y.stride(0), ids, sizes,
                                 partial.data_ptr(), partial.numel(), plan):
        u_offset = batch.shrink(x.data_ptr(), x.stride(0), x.shape[1], ids, partial.data_ptr(), partial.numel(), plan)
        _expand_after(batch, y, ids, sizes, plan, partial, u_offset, True, x.shape[1], int(meta.max_rank))
    del seg  # alive until here: the launches read it


def lora_apply_beside(x, base, meta, layer: int, applies, width: int, side):
    """y = base() (a [T, width] tensor computed on the current stream) plus each token's LoRA slices
    of `applies` ([(module_ids, out_sizes)], each from column 0 of y), with the LoRA branch on
    stream `side` while base() runs: forked and joined by stream waits, so a captured CUDA graph
    holds both branches. The branch runs every apply, as lora_apply does, into a zeroed buffer;
    the current stream then merges it into y (cuda/lora_merge.cu), scaling y by the DoRA scales
    the branch's epilogues applied to that zero base."""
    import torch

    applies = [([int(m) for m in ids], [int(o) for o in sizes]) for ids, sizes in applies]
    for ids, sizes in applies:  # refused before anything is launched
        if len(ids) != len(sizes) or sum(sizes) > width:
            raise LoraCudaError(f"module ids {ids} with out sizes {sizes} do not fit a {width}-column output")
    if sum(len(ids) for ids, _ in applies) > MAX_SLICES:  # more than one merge takes: in order
        y = base()
        for ids, sizes in applies:
            lora_apply(x, y, meta, layer, ids, sizes)
        return y
    main = torch.cuda.current_stream(x.device)
    tokens = x.shape[0]
    if meta.segments is None:  # built before the fork, so the side branch sees them
        meta = replace(meta, segments=segments(meta.slot_of_token, meta.table.shape[0], meta.adapters))
    _rows("x", x, x.device)
    delta = torch.empty(tokens, width, dtype=x.dtype, device=x.device)
    side.wait_stream(main)
    try:
        with torch.cuda.stream(side):
            delta.zero_()
            for ids, sizes in applies:
                lora_apply(x, delta, meta, layer, ids, sizes)
        y = base()
    finally:
        # joined even where an apply or base() raised: delta (allocated on this stream) is freed
        # only after the side branch is done with it, and a capture does not end unjoined
        main.wait_stream(side)
    _rows("y", y, x.device)
    if tuple(y.shape) != (tokens, width) or y.dtype != x.dtype:
        raise LoraCudaError(f"base() gave {y.dtype} {list(y.shape)}, not {x.dtype} [{tokens}, {width}]")
    seg, batch = _batch(meta, layer, x.device, tokens)
    batch.merge_beside(applies, width, y.data_ptr(), y.stride(0), delta.data_ptr(), delta.stride(0))
    del seg  # alive until here: the launch reads it
    return y
