"""lora_apply off the kernels for batches too long or too lopsided to stack (packed prefills): per
adapter, one GEMM for the shrink of all its slices and one in-place addmm per slice for the expand,
over the adapter's weights copied out of the pool once per batch of adapters (contiguous, float32,
only the ranks it has) and kept in BatchMeta.derived as the stacks are. The grouped reference does
the same arithmetic with a zeroed u buffer, a transposed B and a temporary per slice, which cost a
2048-token SmolLM2 prefill 38 % over its base forward on a 2-core CPU. Results equal the
reference's up to float32 summation order."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from loramux.layout import A_ADDR, B_ADDR, RANK, SCALE_ADDR
from loramux.ops.batch_meta import BatchMeta
from loramux.ops.reference import pool_matrix

__all__ = ["apply"]

# Up to this many runs of consecutive tokens an adapter's expand adds in place run by run; more
# (tokens interleaved in request order) gather, add and put back once per slice.
MAX_RUNS = 8


class _AdapterWeights:
    """One adapter's slices of one apply at one layer: A of every slice it has side by side
    [hi, sum of ranks] (None: it has none of them), and per such slice (first output column, width,
    first column of u, rank, B^T [rank, ho], DoRA scale [ho] or None)."""

    def __init__(self, meta: BatchMeta, slot: int, layer: int, module_ids: Sequence[int], hi: int,
                 out_sizes: Sequence[int]):
        a_parts: List[torch.Tensor] = []
        self.slices: List[Tuple[int, int, int, int, torch.Tensor, Optional[torch.Tensor]]] = []
        c0 = u0 = 0
        for mid, ho in zip(module_ids, out_sizes):
            entry = meta.slot_entries[slot][layer][mid]
            rank = entry[RANK]
            if rank:
                a_parts.append(pool_matrix(meta, entry[A_ADDR], rank, hi).T)
                b = pool_matrix(meta, entry[B_ADDR], ho, rank).T.float().contiguous()
                scale = pool_matrix(meta, entry[SCALE_ADDR], 1, ho)[0].float() if entry[SCALE_ADDR] else None
                self.slices.append((c0, ho, u0, rank, b, scale))
                u0 += rank
            c0 += ho
        self.a = torch.cat(a_parts, dim=1).float().contiguous() if a_parts else None


def _weights(meta: BatchMeta, layer: int, module_ids: Sequence[int], hi: int,
             out_sizes: Sequence[int]) -> List[_AdapterWeights]:
    return meta.derived_value(("per_adapter", layer, tuple(module_ids), hi, tuple(out_sizes)),
                              lambda: [_AdapterWeights(meta, slot, layer, module_ids, hi, out_sizes)
                                       for slot, _ in meta.token_groups])


def apply(x: torch.Tensor, y: torch.Tensor, meta: BatchMeta, layer: int, module_ids: Sequence[int],
          out_sizes: Sequence[int]) -> None:
    """y[:, slice s] += x @ A^T @ B^T per token's adapter, in place; DoRA rows: y = scale * (y + ...)."""
    weights = _weights(meta, layer, module_ids, x.shape[1], out_sizes)
    in_place = y.dtype == torch.float32
    for (_, tokens), runs, adapter in zip(meta.token_groups, meta.token_runs, weights):
        if adapter.a is None:
            continue
        u = torch.mm(x[tokens].float(), adapter.a)
        for c0, ho, u0, rank, b, scale in adapter.slices:
            us = u[:, u0 : u0 + rank]
            if in_place and scale is None and len(runs) <= MAX_RUNS:
                # a prompt's tokens are one run: add in place, run by run (no gather, no temporary)
                row = 0
                for start, stop in runs:
                    y[start:stop, c0 : c0 + ho].addmm_(us[row : row + stop - start], b)
                    row += stop - start
                continue
            # scattered tokens: gather, add, put back (index_add_ into a column slice is 2x slower)
            cur = torch.addmm(y[tokens, c0 : c0 + ho].float(), us, b)
            if scale is not None:
                cur.mul_(scale)
            y[tokens, c0 : c0 + ho] = cur.to(y.dtype)
