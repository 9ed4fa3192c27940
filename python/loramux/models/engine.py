"""The Engine: one attached model, its adapter cache, and the StepBatch (each row's adapter slot)
of the batch being run, which the LoRA layers read."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator, List, Optional, Sequence

import torch

from loramux.errors import LoraError
from loramux.ops import BatchMeta
from loramux.ops.step_batch import StepBatch

# Batches up to this many tokens run each projection's LoRA branch beside its base GEMM by default:
# the decode kernels' range, where benchmarks/decode_step.py measured it faster than in order.
BESIDE_MAX_TOKENS = 64
BESIDE_DEFAULT = "auto"


def beside_setting(value: str, name: str = "LORAMUX_LORA_BESIDE_BASE") -> Optional[bool]:
    """LORAMUX_LORA_BESIDE_BASE: 1 / on (always), 0 / off / empty (never), auto (up to BESIDE_MAX_TOKENS)."""
    value = value.strip().lower()
    if value == "auto":
        return None
    if value in ("", "0", "off", "false"):
        return False
    if value in ("1", "on", "true"):
        return True
    raise LoraError(f"{name}={value!r}: expected 1, 0 or auto")


class Engine:
    """Holds the per-batch state the LoRA layers read. Build it with loramux.attach()."""

    def __init__(self, model, spec, cache, dtype: torch.dtype, device: torch.device, restore):
        self.model = model
        self.spec = spec
        self.cache = cache
        self.dtype = dtype
        self.device = device
        self._restore = restore  # [(parent module, attribute, original layer)], for detach()
        self.step = StepBatch(dtype, spec.max_rank)  # the adapter mapping every LoRA layer reads
        self._in_batch = False
        # rows of the batch() being run: its forwards' activations [rows * k, seq, H] (k > 1: generate's
        # beams or return sequences, each row's copies side by side); None under set_batch, whose
        # callers pack tokens as they like (a prefill of several requests is one row of T tokens)
        self._batch_rows: Optional[int] = None
        # q|k|v and gate|up siblings computed by one multi-slice lora_apply (models/siblings.py);
        # False: one lora_apply per projection (same results, for A/B runs)
        self.fuse_siblings = True
        # the LoRA branch of a projection on a side stream while its base GEMM runs (forked and
        # joined inside a captured graph too): True / False force it either way; None takes it for
        # batches of at most BESIDE_MAX_TOKENS tokens. LORAMUX_LORA_BESIDE_BASE=1|0|auto
        self.lora_beside_base = beside_setting(os.environ.get("LORAMUX_LORA_BESIDE_BASE", BESIDE_DEFAULT))
        self.sibling_groups: list = []

    @property
    def lora_beside_base(self) -> Optional[bool]:
        return self._beside

    @lora_beside_base.setter
    def lora_beside_base(self, value) -> None:
        # a truthy string such as "auto" or "0" must not read as True
        if isinstance(value, str):
            value = beside_setting(value, "lora_beside_base")
        elif value is not None and not isinstance(value, bool):
            raise TypeError(f"lora_beside_base takes True, False, None or 'auto', not {value!r}")
        self._beside = value

    @property
    def max_rank(self) -> int:
        return self.spec.max_rank

    # --- the batch the layers see ---------------------------------------------------------------
    def set_batch(self, slot_of_row: Sequence[int], table: torch.Tensor, pool: torch.Tensor,
                  pool_version: Optional[int] = None) -> None:
        """Rows of the coming forwards use these slots of `table` (-1: no adapter); `pool_version`
        (LoraCache.pool_version) lets steps over the same adapters reuse what was derived from them."""
        self._drop_sibling_outputs()
        self._batch_rows = None
        self.step.set(list(slot_of_row), table, pool, pool_version)

    def set_static_batch(self, slot_of_row: torch.Tensor, table: torch.Tensor, pool: torch.Tensor) -> None:
        """set_batch for CUDA-graph capture: the layers read `slot_of_row` in place (rewritten
        between replays) and launch for every module, so one graph serves any adapter mix."""
        self._drop_sibling_outputs()
        self._batch_rows = None
        self.step.set_static(slot_of_row, table, pool)

    def clear_batch(self) -> None:
        self._batch_rows = None
        self.step.clear()
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
        task_ids = list(task_ids)
        if not task_ids:  # a bad argument, like a forward whose rows do not match the ids
            raise ValueError("batch() needs one task id per row (None for the base model), got none")
        wanted = [t for t in task_ids if t is not None]
        acquired = self.cache.acquire(wanted) if wanted else None
        self._in_batch = True
        try:
            slot_iter = iter(acquired.slots if acquired is not None else [])
            slots = [next(slot_iter) if t is not None else -1 for t in task_ids]
            table = acquired.table if acquired is not None else self.cache.table
            pool = acquired.pool if acquired is not None else self.cache.pool
            self.set_batch(slots, table, pool, self.cache.pool_version)
            self._batch_rows = len(slots)
            yield slots
        finally:
            self._in_batch = False
            self.clear_batch()
            if acquired is not None:
                self.cache.release(acquired)

    def beside_for(self, tokens: int) -> bool:
        """Whether a projection of `tokens` tokens runs its LoRA branch beside its base GEMM."""
        if self.lora_beside_base is None:
            return tokens <= BESIDE_MAX_TOKENS
        return self.lora_beside_base

    def used_slices(self, layer: int, slices):
        """The module-id groups of `slices` that some adapter of the current batch has at `layer`."""
        return self.step.used_slices(layer, slices)

    def meta_for(self, x: torch.Tensor) -> Optional[BatchMeta]:
        """The BatchMeta for an activation of this batch; None when no row holds an adapter. Under
        batch(), an activation whose rows are not the batch's (or k copies of each) is a ValueError:
        its tokens would otherwise be dealt out to the rows' adapters in the wrong places."""
        rows = self._batch_rows
        if rows is not None and x.dim() >= 3 and x.shape[0] % rows:
            raise ValueError(f"the forward has {x.shape[0]} rows but the batch gave {rows} task ids, one per row "
                             "(None for the base model)")
        return self.step.meta_for(x)

    # --- attach / detach -------------------------------------------------------------------------
    # `with loramux.attach(model, ...) as engine:` puts the original layers back on the way out,
    # an exception or not (as a PEFT user restores a model with unload()).
    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def detach(self):
        """Puts the original layers back; returns the model."""
        for parent, attr, original in self._restore:
            setattr(parent, attr, original)
        self._restore = []
        self.clear_batch()
        # wrapper <-> group references form a cycle that would keep this engine, and the cache's pools
        # it holds (the host tier's gigabyte), until the cyclic GC ran
        for group in self.sibling_groups:
            for member in group.members:
                member.sibling = None
            group.members = []
        self.sibling_groups = []
        return self.model
