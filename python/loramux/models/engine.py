"""The Engine: one attached model, its adapter cache, and the adapter slot of each row of the batch
being run. The LoRA layers ask it for the BatchMeta of their input (built once per token count)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Sequence

import torch

from loramux.errors import LoraError
from loramux.ops import BatchMeta


class Engine:
    """Holds the per-batch state the LoRA layers read. Build it with loramux.attach()."""

    def __init__(self, model, spec, cache, dtype: torch.dtype, device: torch.device, restore):
        self.model = model
        self.spec = spec
        self.cache = cache
        self.dtype = dtype
        self.device = device
        self._restore = restore  # [(parent module, attribute, original layer)], for detach()
        self._slot_of_row: Optional[torch.Tensor] = None
        self._table: Optional[torch.Tensor] = None
        self._pool: Optional[torch.Tensor] = None
        self._metas: Dict[int, BatchMeta] = {}
        self._used: List[List[bool]] = []
        self._in_batch = False
        # q|k|v and gate|up siblings computed by one multi-slice lora_apply (models/siblings.py);
        # False: one lora_apply per projection (same results, for A/B runs)
        self.fuse_siblings = True
        self.sibling_groups: list = []

    @property
    def max_rank(self) -> int:
        return self.spec.max_rank

    # --- the batch the layers see ---------------------------------------------------------------
    def set_batch(self, slot_of_row: Sequence[int], table: torch.Tensor, pool: torch.Tensor) -> None:
        """Rows of the coming forwards use these slots of `table` (-1: no adapter)."""
        slots = torch.as_tensor(list(slot_of_row), dtype=torch.int32)
        if slots.numel() == 0:
            raise LoraError("a batch needs at least one row")
        self._metas = {}
        self._drop_sibling_outputs()
        if bool((slots < 0).all()):
            self._slot_of_row = None  # no adapter anywhere: the layers run the base model untouched
            return
        self._slot_of_row = slots.to(table.device)
        self._rows = slots.numel()
        self._table, self._pool = table, pool
        # which (layer, module) any row's adapter has: read once per batch, so layers no adapter
        # touches run the base layer and launch nothing
        present = sorted({int(s) for s in slots.tolist() if s >= 0})
        self._used = (table[present][..., 3] > 0).any(dim=0).cpu().tolist()  # [layer][module_id]

    def clear_batch(self) -> None:
        self._slot_of_row = self._table = self._pool = None
        self._metas = {}
        self._drop_sibling_outputs()

    def _drop_sibling_outputs(self) -> None:
        for group in self.sibling_groups:
            group.clear()

    @contextmanager
    def batch(self, task_ids: Sequence[Optional[int]]) -> Iterator[List[int]]:
        """Acquires the cached adapters of `task_ids` (None: no adapter) for the rows of the forwards
        run inside; yields each row's slot. Every id must already be in the cache. One batch at a
        time per engine: the layers read one set of rows."""
        if self._in_batch:
            raise LoraError("this engine is already running a batch; finish it before starting another")
        wanted = [t for t in task_ids if t is not None]
        acquired = self.cache.acquire(wanted) if wanted else None
        self._in_batch = True
        try:
            slot_iter = iter(acquired.slots if acquired is not None else [])
            slots = [next(slot_iter) if t is not None else -1 for t in task_ids]
            table = acquired.table if acquired is not None else self.cache.table
            pool = acquired.pool if acquired is not None else self.cache.pool
            self.set_batch(slots, table, pool)
            yield slots
        finally:
            self._in_batch = False
            self.clear_batch()
            if acquired is not None:
                self.cache.release(acquired)

    def used_slices(self, layer: int, slices):
        """The module-id groups of `slices` that some adapter of the current batch has at `layer`."""
        used = self._used[layer]
        return [ids for ids in slices if any(used[m] for m in ids)]

    def meta_for(self, x: torch.Tensor) -> Optional[BatchMeta]:
        """The BatchMeta for an activation of this batch ([rows, seq, H] or [rows*seq, H]); None
        when no row holds an adapter."""
        if self._slot_of_row is None:
            return None
        tokens = x.numel() // x.shape[-1]
        meta = self._metas.get(tokens)
        if meta is None:
            if tokens % self._rows:
                raise LoraError(f"an activation of {tokens} tokens does not split into the batch's {self._rows} rows")
            slot_of_token = self._slot_of_row.repeat_interleave(tokens // self._rows)
            meta = BatchMeta(table=self._table, pool=self._pool, dtype=self.dtype,
                             slot_of_token=slot_of_token, max_rank=self.max_rank)
            self._metas[tokens] = meta
        return meta

    # --- attach / detach -------------------------------------------------------------------------
    def detach(self):
        """Puts the original layers back; returns the model."""
        for parent, attr, original in self._restore:
            setattr(parent, attr, original)
        self._restore = []
        self.clear_batch()
        self.sibling_groups = []
        return self.model
