"""lora_apply off the kernels for decode-size batches: the batch's adapters stacked into one A per
apply and one B per slice, so an apply costs one masked shrink GEMM and one expand GEMM per slice
over all tokens instead of a handful of small ops per adapter and slice (at a few tokens per
adapter the grouped reference's cost is those ops' fixed overhead, not their arithmetic). The
stacks are built once per batch of adapters and reused by later steps while the pool's content is
unchanged (BatchMeta.derived). Results equal the reference's up to float32 summation order."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from loramux.layout import A_ADDR, B_ADDR, RANK, SCALE_ADDR
from loramux.ops.batch_meta import BatchMeta
from loramux.ops.reference import pool_matrix

__all__ = ["serves", "apply"]

# Stacking computes every token against every adapter of the batch, so its arithmetic grows with
# tokens x adapters x rank; past this the grouped reference, whose fixed cost is then amortized, is
# the cheaper one (measured on a 2-core CPU over SmolLM2-135M's shapes: benchmarks/cpu_lora.py).
MAX_TOKEN_RANKS = 1 << 15


def serves(meta: BatchMeta, tokens: int) -> bool:
    """Whether stacking is the cheaper way to apply this batch's adapters to `tokens` tokens."""
    return tokens * len(meta.token_groups) * meta.max_rank <= MAX_TOKEN_RANKS


class _Stack:
    """One apply's adapters at one layer: A of every slice and adapter stacked [R, hi] (R: the sum of
    their ranks), each stacked rank's adapter (an index into token_groups), and per slice its columns
    of R, its B [ho, ranks] and DoRA scales [groups + 1, ho] (row `groups`: tokens with no adapter)."""

    def __init__(self, meta: BatchMeta, layer: int, module_ids: Sequence[int], hi: int, out_sizes: Sequence[int]):
        a_parts: List[torch.Tensor] = []
        owners: List[int] = []
        self.slices: List[Tuple[int, int, int, torch.Tensor, Optional[torch.Tensor]]] = []
        groups = meta.token_groups
        c0 = 0
        for mid, ho in zip(module_ids, out_sizes):
            r0 = len(owners)
            b_parts: List[torch.Tensor] = []
            scales: Optional[torch.Tensor] = None
            for i, (slot, _) in enumerate(groups):
                entry = meta.slot_entries[slot][layer][mid]
                rank = entry[RANK]
                if rank == 0:
                    continue
                a_parts.append(pool_matrix(meta, entry[A_ADDR], rank, hi))
                b_parts.append(pool_matrix(meta, entry[B_ADDR], ho, rank))
                owners.extend([i] * rank)
                if entry[SCALE_ADDR]:
                    if scales is None:
                        scales = torch.ones(len(groups) + 1, ho, dtype=torch.float32, device=meta.pool.device)
                    scales[i] = pool_matrix(meta, entry[SCALE_ADDR], 1, ho)[0].float()
            if b_parts:
                self.slices.append((c0, ho, r0, torch.cat(b_parts, dim=1).float().T.contiguous(), scales))
            c0 += ho
        self.a_t = torch.cat(a_parts).float().T.contiguous() if a_parts else None  # [hi, R]
        self.owners = torch.tensor(owners, dtype=torch.int64, device=meta.pool.device)


def _stack(meta: BatchMeta, layer: int, module_ids: Sequence[int], hi: int, out_sizes: Sequence[int]) -> _Stack:
    derived = meta.derived if meta.derived is not None else meta.__dict__.setdefault("_derived", {})
    # the slots are in the key, so a dict shared by metas over other adapters is still right
    key = ("stacked", tuple(slot for slot, _ in meta.token_groups), layer, tuple(module_ids), hi, tuple(out_sizes))
    stack = derived.get(key)
    if stack is None:
        stack = derived[key] = _Stack(meta, layer, module_ids, hi, out_sizes)
    return stack


def apply(x: torch.Tensor, y: torch.Tensor, meta: BatchMeta, layer: int, module_ids: Sequence[int],
          out_sizes: Sequence[int]) -> None:
    """y[:, slice s] += x @ A^T @ B^T per token's adapter, in place; DoRA rows: y = scale * (y + ...)."""
    stack = _stack(meta, layer, module_ids, x.shape[1], out_sizes)
    if stack.a_t is None:
        return
    index, onehot = meta.adapter_of_token
    # each token keeps only its own adapter's ranks: the others' products are zeroed
    u = torch.mm(x.float(), stack.a_t).mul_(onehot[:, stack.owners])
    for c0, ho, r0, b_t, scales in stack.slices:
        ys = y[:, c0 : c0 + ho]
        rank_cols = u[:, r0 : r0 + b_t.shape[0]]
        if ys.dtype == torch.float32 and scales is None:
            ys.addmm_(rank_cols, b_t)
            continue
        cur = torch.addmm(ys.float(), rank_cols, b_t)
        if scales is not None:
            cur.mul_(scales[index])
        ys.copy_(cur)
