"""The torch reference of the LoRA ops, grouped by adapter (one matmul per adapter present, no
per-token loop). It serves CPU tensors, float32 and what the kernels do not take; the tests check
the kernels against it. Adapters are read out of the cache's pool through the slot table."""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch

from loramux.layout import A_ADDR, B_ADDR, RANK, SCALE_ADDR
from loramux.ops.batch_meta import BatchMeta

__all__ = ["shrink", "expand", "pool_matrix"]


def pool_matrix(meta: BatchMeta, addr: int, rows: int, cols: int) -> torch.Tensor:
    """A [rows, cols] view of the pool at an absolute address, in the adapter dtype."""
    esize = torch.empty((), dtype=meta.dtype).element_size()
    offset = addr - meta.pool.data_ptr()
    nbytes = rows * cols * esize
    if offset < 0 or offset + nbytes > meta.pool.numel():
        raise ValueError(f"slot table address {addr:#x} (+{nbytes} bytes) lies outside the pool")
    return meta.pool[offset : offset + nbytes].view(meta.dtype).view(rows, cols)


def _entries(meta: BatchMeta, layer: int, module_ids: Sequence[int]) -> Dict[Tuple[int, int], List[int]]:
    """Table entries [(slot, module_id)] -> entry (loramux.layout.ENTRY_FIELDS) for the slots of the batch."""
    return {(slot, mid): rows[layer][mid] for slot, rows in meta.slot_entries.items() for mid in module_ids}


def shrink(x: torch.Tensor, meta: BatchMeta, layer: int, module_ids: Sequence[int]) -> torch.Tensor:
    """u[s, t, :rank] = x[t] @ A^T for slice s and token t's adapter; float32 [S, T, max_rank]."""
    u = torch.zeros(len(module_ids), x.shape[0], meta.max_rank, dtype=torch.float32, device=x.device)
    groups = meta.token_groups
    entries = _entries(meta, layer, module_ids)
    hi = x.shape[1]
    for slot, tokens in groups:
        xs = x[tokens].float()
        for s, mid in enumerate(module_ids):
            entry = entries[(slot, mid)]
            a_addr, rank = entry[A_ADDR], entry[RANK]
            if rank == 0:
                continue
            a = pool_matrix(meta, a_addr, rank, hi).float()
            u[s, tokens, :rank] = xs @ a.T
    return u


def expand(
    u: torch.Tensor,
    y: torch.Tensor,
    meta: BatchMeta,
    layer: int,
    module_ids: Sequence[int],
    out_sizes: Sequence[int],
) -> None:
    """y[:, slice s] += u[s] @ B^T per token's adapter, in place; DoRA rows: y = scale * (y + u B^T)."""
    groups = meta.token_groups
    entries = _entries(meta, layer, module_ids)
    starts = [sum(out_sizes[:s]) for s in range(len(out_sizes))]
    for slot, tokens in groups:
        for s, mid in enumerate(module_ids):
            entry = entries[(slot, mid)]
            b_addr, scale_addr, rank = entry[B_ADDR], entry[SCALE_ADDR], entry[RANK]
            if rank == 0:
                continue
            ho, c0 = out_sizes[s], starts[s]
            b = pool_matrix(meta, b_addr, ho, rank).float()
            delta = u[s, tokens, :rank] @ b.T
            cur = y[tokens, c0 : c0 + ho].float() + delta
            if scale_addr:
                cur = cur * pool_matrix(meta, scale_addr, 1, ho).float()
            y[tokens, c0 : c0 + ho] = cur.to(y.dtype)
