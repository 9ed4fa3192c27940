"""The LoRA batch ops: lora_shrink (x -> u) and lora_expand (u -> y, in place), one adapter per token.

CPU tensors take the torch reference below, grouped by adapter (one matmul per adapter present,
no per-token loop); CUDA tensors take loramux.kernels when it is built and available.
Adapters are read out of the cache's pool through the slot table (docs/internals.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from loramux.errors import LoraFormatError

try:  # the CUDA kernels are optional: absent on builds without them, the reference serves CUDA too
    import loramux.kernels as _kernels
except ModuleNotFoundError as err:
    if err.name != "loramux.kernels":
        raise
    _kernels = None

#: a slot table entry: (a_addr, b_addr, scale_addr, rank)
_A, _B, _SCALE, _RANK = range(4)


@dataclass(frozen=True)
class BatchMeta:
    """What every LoRA layer of one forward needs: built once per forward, shared by all layers."""

    table: torch.Tensor  # int64 [max_slots, num_layers, 19, 4]: (a_addr, b_addr, scale_addr, rank)
    pool: torch.Tensor  # uint8 region the addresses point into
    dtype: torch.dtype  # dtype of the adapter values in the pool
    slot_of_token: torch.Tensor  # int32 [T], -1 = no adapter
    max_rank: int  # width of u

    # The CPU reference reads the token groups and the batch's table rows once per BatchMeta, not
    # once per layer (the slots of a batch stay pinned, so their entries do not change under it).
    @cached_property
    def token_groups(self) -> List[Tuple[int, object]]:
        return _token_groups(self.slot_of_token)

    @cached_property
    def slot_entries(self) -> Dict[int, list]:
        """slot -> table[slot] as nested lists [layer][module_id] = [a, b, scale, rank]."""
        slots = [slot for slot, _ in self.token_groups]
        if not slots:
            return {}
        rows = self.table[slots].to("cpu").tolist()
        return dict(zip(slots, rows))


def _use_kernels(t: torch.Tensor, meta: BatchMeta, num_slices: int) -> bool:
    """CUDA tensors go to the kernels when they are built, usable here, and take this case
    (e.g. fp16/bf16 only); everything else takes the torch reference."""
    return (t.is_cuda and _kernels is not None and t.dtype == meta.dtype and _kernels.available()
            and _kernels.supports(meta.dtype, meta.max_rank, num_slices))


def _pool_matrix(meta: BatchMeta, addr: int, rows: int, cols: int) -> torch.Tensor:
    """A [rows, cols] view of the pool at an absolute address, in the adapter dtype."""
    esize = torch.empty((), dtype=meta.dtype).element_size()
    offset = addr - meta.pool.data_ptr()
    nbytes = rows * cols * esize
    if offset < 0 or offset + nbytes > meta.pool.numel():
        raise LoraFormatError(f"slot table address {addr:#x} (+{nbytes} bytes) lies outside the pool")
    return meta.pool[offset : offset + nbytes].view(meta.dtype).view(rows, cols)


def _token_groups(slot_of_token: torch.Tensor) -> List[Tuple[int, object]]:
    """(slot, token selector) per adapter slot present; the selector is a slice when contiguous."""
    slots = slot_of_token.to(device="cpu", dtype=torch.int64)
    present = torch.unique(slots).tolist()
    groups: List[Tuple[int, object]] = []
    for slot in present:
        if slot < 0:
            continue
        idx = torch.nonzero(slots == slot).flatten()
        first, last = int(idx[0]), int(idx[-1])
        if last - first + 1 == idx.numel():
            groups.append((slot, slice(first, last + 1)))
        else:
            groups.append((slot, idx.to(slot_of_token.device)))
    return groups


def _entries(meta: BatchMeta, layer: int, module_ids: Sequence[int]) -> Dict[Tuple[int, int], List[int]]:
    """Table entries [(slot, module_id)] -> [a, b, scale, rank] for the slots of the batch."""
    return {(slot, mid): rows[layer][mid] for slot, rows in meta.slot_entries.items() for mid in module_ids}


def _check(x: torch.Tensor, meta: BatchMeta, layer: int) -> None:
    if x.dim() != 2:
        raise LoraFormatError(f"lora ops take x as [T, H], got shape {tuple(x.shape)}")
    if meta.slot_of_token.numel() != x.shape[0]:
        raise LoraFormatError(f"slot_of_token has {meta.slot_of_token.numel()} tokens but x has {x.shape[0]}")
    if not 0 <= layer < meta.table.shape[1]:
        raise LoraFormatError(f"layer {layer} is out of range for a slot table of {meta.table.shape[1]} layers")


def lora_shrink(x: torch.Tensor, meta: BatchMeta, layer: int, module_ids: Sequence[int]) -> torch.Tensor:
    """u[s, t, :rank] = x[t] @ A^T for slice s and token t's adapter; float32 [S, T, max_rank]."""
    _check(x, meta, layer)
    if _use_kernels(x, meta, len(module_ids)):
        return _kernels.lora_shrink(x, meta, layer, module_ids)
    u = torch.zeros(len(module_ids), x.shape[0], meta.max_rank, dtype=torch.float32, device=x.device)
    groups = meta.token_groups
    entries = _entries(meta, layer, module_ids)
    hi = x.shape[1]
    for slot, tokens in groups:
        xs = x[tokens].float()
        for s, mid in enumerate(module_ids):
            a_addr, _, _, rank = entries[(slot, mid)]
            if rank == 0:
                continue
            a = _pool_matrix(meta, a_addr, rank, hi).float()
            u[s, tokens, :rank] = xs @ a.T
    return u


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
    if len(out_sizes) != len(module_ids) or sum(out_sizes) != y.shape[1]:
        raise LoraFormatError(f"out_sizes {list(out_sizes)} must give one width per module id and sum to y's {y.shape[1]} columns")
    if _use_kernels(y, meta, len(module_ids)):
        _kernels.lora_expand(u, y, meta, layer, module_ids, out_sizes)
        return
    groups = meta.token_groups
    entries = _entries(meta, layer, module_ids)
    starts = [sum(out_sizes[:s]) for s in range(len(out_sizes))]
    for slot, tokens in groups:
        for s, mid in enumerate(module_ids):
            _, b_addr, scale_addr, rank = entries[(slot, mid)]
            if rank == 0:
                continue
            ho, c0 = out_sizes[s], starts[s]
            b = _pool_matrix(meta, b_addr, ho, rank).float()
            delta = u[s, tokens, :rank] @ b.T
            cur = y[tokens, c0 : c0 + ho].float() + delta
            if scale_addr:
                cur = cur * _pool_matrix(meta, scale_addr, 1, ho).float()
            y[tokens, c0 : c0 + ho] = cur.to(y.dtype)


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
    lora_expand(lora_shrink(x, meta, layer, module_ids), y, meta, layer, module_ids, out_sizes)


__all__ = ["BatchMeta", "lora_shrink", "lora_expand", "lora_apply"]
