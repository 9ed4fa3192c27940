"""One forward of the attached HF decoder over the Executor's KV rows: prompt chunks of several
requests packed into one sequence, or a decode step of one token per row; eager, or (CUDA) a
captured graph replayed for the step's batch-size and length bucket (serving/cuda_graphs.py)."""

from __future__ import annotations

import contextlib
import inspect
from typing import List, Optional, Sequence, Tuple

import torch

from loramux.serving.attention import serving_attention
from loramux.serving.kv_cache import RowKVCache
from loramux.serving.packed_attention import packed_attention


def cache_argument(model) -> str:
    """The keyword the model's forward takes its cache under ("cache" from transformers 5.x on)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class ModelStep:
    """Runs forwards of `engine.model` over `kv`; the engine's StepBatch holds the step's adapters."""

    def __init__(self, engine, kv: RowKVCache, pad_id: int, cuda_graphs: bool):
        self.engine, self.model, self.kv = engine, engine.model, kv
        self.device = kv.device
        self.pad_id = pad_id
        self._cache_kw = cache_argument(self.model)
        self.graphs = None
        if cuda_graphs:
            from loramux.serving.cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(self, kv.max_rows)

    def _set_adapters(self, slots: List[int]) -> None:
        cache = self.engine.cache
        if any(s >= 0 for s in slots):
            self.engine.set_batch(slots, cache.table, cache.pool, cache.pool_version)
        else:
            self.engine.clear_batch()

    def forward(self, view, input_ids: torch.Tensor, positions: torch.Tensor, keep=None) -> torch.Tensor:
        """Logits [rows, vocab]: of every row's last token (decode: input_ids [rows, 1]), or of the
        sequence positions `keep` (a packed prefill: input_ids [1, T])."""
        kwargs = {self._cache_kw: view, "use_cache": True}
        if keep is not None:
            kwargs["logits_to_keep"] = keep
        per_chunk = packed_attention(self.model, view.blocks) if keep is not None and self.device.type == "cpu" \
            else contextlib.nullcontext()
        with serving_attention(self.device), per_chunk:
            out = self.model(input_ids=input_ids, position_ids=positions, attention_mask=view.mask(), **kwargs)
        return out.logits[0] if keep is not None else out.logits[:, -1]

    @torch.no_grad()
    def prefill(self, chunks: Sequence[Tuple[int, int, List[int], int]]) -> torch.Tensor:
        """Writes prompt chunks [(row, start, ids, adapter slot)] of several requests into their
        rows in one forward, each token with its request's adapter; logits [chunks, vocab] after
        each chunk's last token."""
        slots: List[int] = []
        ids: List[int] = []
        for _, _, chunk_ids, slot in chunks:
            ids.extend(chunk_ids)
            slots.extend([slot] * len(chunk_ids))
        # the packed sequence is one batch row of T tokens: the adapter mapping is per token
        self._set_adapters(slots)
        try:
            view = self.kv.prefill_view([(row, start, len(chunk_ids)) for row, start, chunk_ids, _ in chunks])
            input_ids = torch.tensor([ids], dtype=torch.long).to(self.device, non_blocking=True)
            return self.forward(view, input_ids, view.positions(), keep=view.last)
        finally:
            self.engine.clear_batch()

    @torch.no_grad()
    def decode(self, tokens: List[int], positions: List[int], slots: List[int]) -> torch.Tensor:
        """One token for each of rows 0..len(tokens)-1 at its position; logits [rows, vocab]."""
        span = max(positions) + 1
        if self.graphs is not None:
            logits = self.graphs.run(tokens, positions, slots, span)
            if logits is not None:
                return logits
        self._set_adapters(slots)
        try:
            pos = torch.tensor(positions, dtype=torch.long, device=self.device)
            view = self.kv.decode_view(pos, span)
            input_ids = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]
            return self.forward(view, input_ids, pos[:, None])
        finally:
            self.engine.clear_batch()


__all__ = ["ModelStep", "cache_argument"]
