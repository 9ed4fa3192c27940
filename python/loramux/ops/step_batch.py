"""StepBatch: the adapter mapping of one forward step, owned once and read by every LoRA layer of
the model (the Engine's wrappers and the tensor-parallel layers alike).

Which slot each row uses is the same for every layer and projection of a step, so it is turned
into per-token metadata once per token count, not once per layer: on CUDA that includes the
kernels' token segments (tokens listed by adapter slot), built on the device without a host sync; which (layer, module) pairs any
row's adapter has is read once per batch, so layers no adapter touches launch nothing.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

import torch

from loramux.errors import LoraError
from loramux.ops.batch_meta import BatchMeta

__all__ = ["StepBatch"]


def _segments(slot_of_token: torch.Tensor, table: torch.Tensor, dtype: torch.dtype,
              max_rank: int, adapters: Optional[int]) -> Optional[torch.Tensor]:
    """The CUDA kernels' token segments, when the kernels will serve this batch; else None."""
    if not slot_of_token.is_cuda:
        return None
    from loramux.ops import apply  # the kernels module is optional; apply knows whether it loaded

    k = apply._kernels
    if k is None or not k.available() or not k.supports(dtype, max_rank):
        return None
    return k.segments(slot_of_token, table.shape[0], adapters)


def _same_key(a: tuple, b: tuple) -> bool:
    """(pool, version, slots) keys: the pool compared by identity (a tensor's == is elementwise)."""
    return a[0] is b[0] and a[1:] == b[1:]


class StepBatch:
    """Each row's adapter slot for the forwards of one batch, and what the LoRA layers derive from it."""

    def __init__(self, dtype: torch.dtype, max_rank: int):
        self.dtype = dtype
        self.max_rank = max_rank
        self.rows = 0
        self.slot_of_row: Optional[torch.Tensor] = None  # int32 [rows] on the table's device; None: no adapter
        self.table: Optional[torch.Tensor] = None
        self.pool: Optional[torch.Tensor] = None
        self._used: Optional[List[List[bool]]] = None  # [layer][module_id]: some row's adapter has it
        self._adapters: Optional[int] = None  # distinct slots among the rows; None: unknown (a static batch)
        self._metas: Dict[int, BatchMeta] = {}  # token count -> BatchMeta
        # BatchMeta.derived kept across set() calls while (pool, pool version, adapter slots) repeat
        self._derived_key: Optional[tuple] = None
        self._derived: Optional[dict] = None

    def set(self, slot_of_row: Union[Sequence[int], torch.Tensor], table: Optional[torch.Tensor],
            pool: Optional[torch.Tensor], pool_version: Optional[int] = None) -> None:
        """Rows of the coming forwards use these slots of `table` (-1: no adapter). `pool_version`
        (LoraCache.pool_version: changes whenever adapter data is written into the pool) lets what
        was derived from the pool for the same slots at an earlier set() be reused; None: rebuilt."""
        slots = torch.as_tensor(slot_of_row, dtype=torch.int32).flatten()
        if slots.numel() == 0:
            raise ValueError("a batch needs at least one row")
        self.clear()
        self.rows = slots.numel()
        present = sorted({int(s) for s in slots.tolist() if s >= 0})
        if not present:
            return  # no adapter anywhere: the layers run the base model untouched
        if table is None or pool is None:
            raise LoraError("a batch with adapter slots needs the cache's slot table and pool")
        self.slot_of_row = slots.to(table.device)
        self.table, self.pool = table, pool
        self._adapters = len(present)
        key = (pool, pool_version, tuple(present))
        if pool_version is None or self._derived_key is None or not _same_key(self._derived_key, key):
            self._derived_key, self._derived = key, {}
        self._used = (table[present][..., 3] > 0).any(dim=0).cpu().tolist()

    def set_static(self, slot_of_row: torch.Tensor, table: torch.Tensor, pool: torch.Tensor) -> None:
        """For CUDA-graph capture: the rows read `slot_of_row` (int32, on the table's device) in
        place, so the caller rewrites it between replays, and every (layer, module) counts as used,
        so the captured launches serve any adapter mix (a slot without a module has rank 0 there)."""
        if slot_of_row.dtype != torch.int32 or slot_of_row.device != table.device or slot_of_row.dim() != 1:
            raise LoraError("a static slot tensor must be 1-D int32 on the slot table's device")
        self.clear()
        self.rows = slot_of_row.numel()
        self.slot_of_row = slot_of_row
        self.table, self.pool = table, pool
        self._used = [[True] * table.shape[2] for _ in range(table.shape[1])]

    def clear(self) -> None:
        self.rows = 0
        self.slot_of_row = self.table = self.pool = None
        self._used = None
        self._adapters = None
        self._metas = {}

    @property
    def has_adapters(self) -> bool:
        return self.slot_of_row is not None

    def uses(self, layer: int, module_id: int) -> bool:
        """Whether some row's adapter has `module_id` at `layer`."""
        return self._used is not None and self._used[layer][module_id]

    def used_slices(self, layer: int, slices: Sequence[Sequence[int]]) -> list:
        """The module-id groups of `slices` that some row's adapter has at `layer`."""
        if self._used is None:
            return []
        used = self._used[layer]
        return [ids for ids in slices if any(used[m] for m in ids)]

    def meta_for(self, x: torch.Tensor) -> Optional[BatchMeta]:
        """The BatchMeta for an activation of this batch ([rows, seq, H] or [rows*seq, H], rows
        major); None when no row holds an adapter."""
        if self.slot_of_row is None:
            return None
        tokens = x.numel() // x.shape[-1]
        meta = self._metas.get(tokens)
        if meta is None:
            if tokens % self.rows:
                raise LoraError(f"an activation of {tokens} tokens does not split into the batch's {self.rows} rows")
            # one token per row (decode) reads the row slots as they are: no copy, and a captured
            # graph keeps reading the tensor its caller rewrites
            slot_of_token = self.slot_of_row if tokens == self.rows else self.slot_of_row.repeat_interleave(tokens // self.rows)
            meta = BatchMeta(table=self.table, pool=self.pool, dtype=self.dtype, slot_of_token=slot_of_token,
                             max_rank=self.max_rank, segments=_segments(slot_of_token, self.table, self.dtype,
                                                                       self.max_rank, self._adapters),
                             adapters=self._adapters, derived=self._derived)
            self._metas[tokens] = meta
        return meta
