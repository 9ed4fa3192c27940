"""BatchMeta: what every LoRA op of one forward reads (the slot table, the pool, each token's slot),
built once per forward and shared by all layers."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

__all__ = ["BatchMeta", "token_groups"]

@dataclass(frozen=True)
class BatchMeta:
    """What every LoRA layer of one forward needs: built once per forward, shared by all layers."""

    table: torch.Tensor  # int64 loramux.layout.table_shape(max_slots, num_layers), entries ENTRY_FIELDS
    pool: torch.Tensor  # uint8 region the addresses point into
    dtype: torch.dtype  # dtype of the adapter values in the pool
    slot_of_token: torch.Tensor  # int32 [T], -1 = no adapter
    max_rank: int  # width of u
    # The CUDA kernels' token segments of slot_of_token (tokens listed by slot, cut into work
    # items; cuda/lora_common.cuh), built on the device once per step by StepBatch so every apply
    # of the step reads them; None: each kernel call builds its own.
    segments: Optional[torch.Tensor] = None
    # Distinct adapter slots among the tokens, where the host knows them (StepBatch counts them; a
    # captured graph, which serves any mix, does not): with enough tokens an adapter, a mid-size
    # batch is cut into tensor-core tiles rather than small items (loramux._core.small_items). The
    # segments must be built with the same count (kernels.segments(..., adapters=)).
    adapters: Optional[int] = None
    # What CPU paths derive from the pool for this batch's adapters (e.g. stacked weights), shared
    # by the steps of one batch while the pool's content and the batch's slots stay the same (the
    # StepBatch decides); None: derived per BatchMeta.
    derived: Optional[dict] = field(default=None, compare=False, repr=False)

    # The CPU reference reads the token groups and the batch's table rows once per BatchMeta, not
    # once per layer (the slots of a batch stay pinned, so their entries do not change under it).
    @cached_property
    def token_groups(self) -> List[Tuple[int, object]]:
        return token_groups(self.slot_of_token)

    def derived_value(self, key: tuple, build: Callable[[], Any]) -> Any:
        """What a CPU path derives from the pool for this batch's adapters under `key`: build() once,
        then kept in `derived` (or, without one, in this meta). The batch's slots join the key, so a
        dict shared by metas over other adapters is still right."""
        derived = self.derived if self.derived is not None else self.__dict__.setdefault("_derived", {})
        key = (tuple(slot for slot, _ in self.token_groups), *key)
        value = derived.get(key)
        if value is None:
            value = derived[key] = build()
        return value

    @cached_property
    def token_runs(self) -> List[List[Tuple[int, int]]]:
        """Per token group, its tokens as runs of consecutive indices [(start, stop)]."""
        runs = []
        for _, sel in self.token_groups:
            if isinstance(sel, slice):
                runs.append([(sel.start, sel.stop)])
                continue
            idx = sel.tolist()
            cuts = [i for i in range(1, len(idx)) if idx[i] != idx[i - 1] + 1]
            runs.append([(idx[a], idx[b - 1] + 1) for a, b in zip([0] + cuts, cuts + [len(idx)])])
        return runs

    @cached_property
    def slot_entries(self) -> Dict[int, list]:
        """slot -> table[slot] as nested lists [layer][module_id] = entry (loramux.layout.ENTRY_FIELDS)."""
        slots = [slot for slot, _ in self.token_groups]
        if not slots:
            return {}
        rows = self.table[slots].to("cpu").tolist()
        return dict(zip(slots, rows))

    @cached_property
    def adapter_rows(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The stacked CPU path's token layout: each token's index into token_groups (len(groups)
        for no adapter) int64 [T]; `gather` int64 [groups, m + 1], row g the tokens of group g then
        padding (index T: a zero row appended to x), m the largest group; `place` int64 [T], each
        token's position in gather flattened (a padding position for a token with no adapter)."""
        groups = self.token_groups
        tokens = self.slot_of_token.numel()
        index = torch.full((tokens,), len(groups), dtype=torch.int64)
        members = [torch.arange(tokens)[sel if isinstance(sel, slice) else sel.cpu()] for _, sel in groups]
        width = max((len(m) for m in members), default=0) + 1
        gather = torch.full((len(groups), width), tokens, dtype=torch.int64)
        place = torch.full((tokens,), width - 1, dtype=torch.int64)
        for g, m in enumerate(members):
            index[m] = g
            gather[g, : len(m)] = m
            place[m] = g * width + torch.arange(len(m))
        device = self.slot_of_token.device
        return index.to(device), gather.to(device), place.to(device)


def token_groups(slot_of_token: torch.Tensor) -> List[Tuple[int, object]]:
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
