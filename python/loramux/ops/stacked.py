"""lora_apply off the kernels for decode-size batches: the batch's adapters stacked (padded to one
rank) and its tokens grouped by adapter (padded to the largest group), so an apply costs one
batched shrink GEMM and one batched expand GEMM per slice instead of a handful of small ops per
adapter and slice (at a few tokens per adapter the grouped reference's cost is those ops' fixed
overhead, not their arithmetic). The
stacks are built once per batch of adapters and reused by later steps while the pool's content is
unchanged (BatchMeta.derived). Results equal the reference's up to float32 summation order."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from loramux.layout import A_ADDR, B_ADDR, RANK, SCALE_ADDR
from loramux.ops.batch_meta import BatchMeta
from loramux.ops.reference import pool_matrix

__all__ = ["serves", "apply"]

# Grouping pads every adapter's tokens to the largest group, and the stacks hold a float32 copy of
# the batch's adapters (one per layer and apply, kept while the batch's adapters repeat). Measured on
# a 2-core CPU over SmolLM2-135M's shapes with 8 adapters (benchmarks/cpu_lora.py): stacked beats the
# grouped reference 1.3-6.6x at 1..256 tokens and 1.3-2x at 1024; it loses where padding dominates.
MAX_TOKENS = 1024
MAX_ADAPTERS = 64
MAX_PADDING = 2.0  # padded rows (adapters x largest group) over tokens with an adapter


# Tokens in runs this long on average (packed prompts) take loramux.ops.per_adapter, which adds
# each run in place: 2-10x faster there (benchmarks/cpu_lora.py --order prompts).
MIN_MEAN_RUN = 8


def serves(meta: BatchMeta, tokens: int) -> bool:
    """Whether stacking is the cheaper way to apply this batch's adapters to `tokens` tokens."""
    groups = meta.token_groups
    if tokens > MAX_TOKENS or not 0 < len(groups) <= MAX_ADAPTERS:
        return False
    sizes = [(sel.stop - sel.start) if isinstance(sel, slice) else sel.numel() for _, sel in groups]
    if sum(sizes) >= MIN_MEAN_RUN * sum(len(runs) for runs in meta.token_runs):
        return False
    return len(groups) * (max(sizes) + 1) <= MAX_PADDING * (sum(sizes) + len(groups))


class _Stack:
    """One apply's adapters at one layer, zero-padded to the batch's max rank: A of every slice side
    by side [groups, hi, slices * r], and per slice its columns of that, its B [groups, r, ho] and
    DoRA scales [groups + 1, ho] (row `groups`: tokens with no adapter; None when none has one). A
    rank-0 slice of an adapter (it lacks that module) stays zero, so its tokens gain nothing there."""

    def __init__(self, meta: BatchMeta, layer: int, module_ids: Sequence[int], hi: int, out_sizes: Sequence[int]):
        groups = meta.token_groups
        r = meta.max_rank
        device = meta.pool.device
        self.a = torch.zeros(len(groups), hi, len(module_ids) * r, dtype=torch.float32, device=device)
        self.slices: List[Tuple[int, int, int, torch.Tensor, Optional[torch.Tensor]]] = []  # empty: nothing to add
        c0 = 0
        for s, (mid, ho) in enumerate(zip(module_ids, out_sizes)):
            b = torch.zeros(len(groups), r, ho, dtype=torch.float32, device=device)
            scales: Optional[torch.Tensor] = None
            used = False
            for g, (slot, _) in enumerate(groups):
                entry = meta.slot_entries[slot][layer][mid]
                rank = entry[RANK]
                if rank == 0:
                    continue
                used = True
                self.a[g, :, s * r : s * r + rank] = pool_matrix(meta, entry[A_ADDR], rank, hi).T
                b[g, :rank] = pool_matrix(meta, entry[B_ADDR], ho, rank).T
                if entry[SCALE_ADDR]:
                    if scales is None:
                        scales = torch.ones(len(groups) + 1, ho, dtype=torch.float32, device=device)
                    scales[g] = pool_matrix(meta, entry[SCALE_ADDR], 1, ho)[0]
            if used:
                self.slices.append((c0, ho, s * r, b, scales))
            c0 += ho


def _stack(meta: BatchMeta, layer: int, module_ids: Sequence[int], hi: int, out_sizes: Sequence[int]) -> _Stack:
    return meta.derived_value(("stacked", layer, tuple(module_ids), hi, tuple(out_sizes)),
                              lambda: _Stack(meta, layer, module_ids, hi, out_sizes))


def apply(x: torch.Tensor, y: torch.Tensor, meta: BatchMeta, layer: int, module_ids: Sequence[int],
          out_sizes: Sequence[int]) -> None:
    """y[:, slice s] += x @ A^T @ B^T per token's adapter, in place; DoRA rows: y = scale * (y + ...)."""
    stack = _stack(meta, layer, module_ids, x.shape[1], out_sizes)
    if not stack.slices:
        return
    index, gather, place = meta.adapter_rows
    r = meta.max_rank
    # tokens grouped by adapter (padded with a zero row): one batched GEMM per side
    xs = torch.cat([x.float(), x.new_zeros(1, x.shape[1], dtype=torch.float32)])[gather]
    u = torch.bmm(xs, stack.a)
    for c0, ho, r0, b, scales in stack.slices:
        delta = torch.bmm(u[:, :, r0 : r0 + r], b).view(-1, ho)[place]  # back in token order
        ys = y[:, c0 : c0 + ho]
        if ys.dtype == torch.float32 and scales is None:
            ys.add_(delta)
            continue
        cur = delta.add_(ys.float())
        if scales is not None:
            cur.mul_(scales[index])
        ys.copy_(cur)
