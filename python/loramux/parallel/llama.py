"""A tensor- and pipeline-parallel forward of a Llama-family HF model with per-row LoRA, over
torch.distributed (gloo on CPU, NCCL on GPUs).

Each process holds one shard: its pipeline stage's decoder layers, and in them its tensor-parallel
block of every projection. q/k/v and gate/up are column-parallel (rank r keeps its heads / FFN
block of the output rows), o_proj and down_proj row-parallel (rank r keeps the matching input
columns; the partial outputs, base + LoRA, are summed by one all-reduce, then the bias is added
once). q/k/v (and gate/up) run as one GEMM and one multi-slice LoRA launch per layer; the HF
modules' calls take their slices of it. Embedding, norms and lm_head are replicated. A request's
full adapter is sliced on load (loramux.parallel.slice_adapter) and each rank caches only its slice in
its own LoraCache. `load` is per rank: every rank must load the same adapters (a rank that fails,
e.g. on a full cache, leaves the layout inconsistent until the caller retries or drops the task).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from loramux.convert import hf_modules
from loramux.errors import LoraFormatError, LoraParallelError
from loramux.models.siblings import SharedOutputs
from loramux.models.targets import spec_from_config
from loramux.modules import MODULE_IDS
from loramux.ops import lora_apply
from loramux.ops.step_batch import StepBatch
from loramux.parallel.slicing import rank_spec, slice_adapter, stage_layers

_M = MODULE_IDS
# The projections of a Llama decoder layer by module id, in the order one layer computes them:
# q|k|v and gate|up each as one column-parallel GEMM + one multi-slice LoRA launch (the sibling
# groups attach() fuses too), o and down row-parallel. Their HF names come from the module map.
_GROUPS = (
    ((_M["attn_q"], _M["attn_k"], _M["attn_v"]), "column"),
    ((_M["attn_dense"],), "row"),
    ((_M["mlp_h_to_4h"], _M["mlp_gate"]), "column"),
    ((_M["mlp_4h_to_h"],), "row"),
)
#: the module ids the tensor-parallel forward serves
SERVED_MODULE_IDS = frozenset(m for ids, _ in _GROUPS for m in ids)


def _projection(block: nn.Module, arch: str, module_id: int):
    """(parent module, attribute) of the projection that holds `module_id` in a decoder block."""
    _, rule = hf_modules.hf_path_for(arch, module_id, 0)
    parent, attr = rule.inner.rsplit(".", 1)  # e.g. self_attn.q_proj
    return block.get_submodule(parent), attr


@dataclass(frozen=True)
class ParallelContext:
    """This process's place in a tp x pp layout; global rank = pp_rank * tp_size + tp_rank."""

    tp_size: int = 1
    tp_rank: int = 0
    pp_size: int = 1
    pp_rank: int = 0
    tp_group: Optional[object] = None  # torch.distributed ProcessGroup of this stage's tp ranks

    @property
    def prev_rank(self) -> Optional[int]:
        """Global rank of the same tp rank in the previous stage (None on the first stage)."""
        return (self.pp_rank - 1) * self.tp_size + self.tp_rank if self.pp_rank > 0 else None

    @property
    def next_rank(self) -> Optional[int]:
        return (self.pp_rank + 1) * self.tp_size + self.tp_rank if self.pp_rank + 1 < self.pp_size else None

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def init_parallel(tp_size: int, pp_size: int = 1) -> ParallelContext:
    """Splits an initialized default process group of tp_size * pp_size ranks into one tp group per
    pipeline stage (every rank must call this, in the same order)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if tp_size < 1 or pp_size < 1 or tp_size * pp_size != world:
        raise LoraParallelError(f"tp_size {tp_size} x pp_size {pp_size} must equal the world size {world}")
    groups = [dist.new_group(list(range(s * tp_size, (s + 1) * tp_size))) for s in range(pp_size)]
    pp_rank, tp_rank = divmod(rank, tp_size)
    return ParallelContext(tp_size, tp_rank, pp_size, pp_rank, groups[pp_rank])


class ParallelLoraLinear(nn.Module):
    """One rank's shard of one or more Linears that read the same input, plus their LoRA slices.
    column: y_r = x [W_r of each base]^T + LoRA_r + b_r, the bases side by side (q|k|v, gate|up:
    one GEMM and one multi-slice LoRA launch). row (one base): y = all_reduce(x_r W_r^T + LoRA_r)
    + b; DoRA scales each partial (the scale is linear over the sum)."""

    def __init__(self, bases: Sequence[nn.Linear], kind: str, ctx: ParallelContext, batch: StepBatch, layer: int,
                 module_ids: Sequence[int]):
        super().__init__()
        t, r = ctx.tp_size, ctx.tp_rank
        split_dim = 0 if kind == "column" else 1
        if kind == "row" and len(bases) != 1:
            raise LoraParallelError("a row-parallel layer has one base Linear")
        for base in bases:
            if base.weight.shape[split_dim] % t:
                raise LoraParallelError(f"a {kind}-parallel Linear of shape {tuple(base.weight.shape)} does not split by tp_size {t}")
        if len({base.bias is None for base in bases}) > 1:
            raise LoraParallelError("projections computed together must all have a bias or none")
        shards = [base.weight.detach().chunk(t, dim=split_dim)[r] for base in bases]
        self.weight = nn.Parameter(torch.cat(shards, dim=0), requires_grad=False)
        bias = None
        if bases[0].bias is not None:
            bias = torch.cat([b.bias.detach().chunk(t)[r] for b in bases]) if kind == "column" else bases[0].bias.detach()
        self.bias = None if bias is None else nn.Parameter(bias.clone(), requires_grad=False)
        self.kind, self.layer, self.module_ids = kind, layer, list(module_ids)
        self.out_sizes = [w.shape[0] for w in shards]
        self.tp_group = ctx.tp_group if t > 1 else None
        object.__setattr__(self, "_batch", batch)  # shared state, not a submodule
        self.shared = SharedOutputs()  # the slices of one input, each taken once by its SliceOf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        y = F.linear(x2, self.weight)
        used = any(self._batch.uses(self.layer, m) for m in self.module_ids)
        meta = self._batch.meta_for(x2) if used else None
        if meta is not None:  # module ids no adapter of a row has are rank 0 there: left untouched
            lora_apply(x2, y, meta, self.layer, self.module_ids, self.out_sizes)
        if self.tp_group is not None and self.kind == "row":
            dist.all_reduce(y, group=self.tp_group)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*lead, y.shape[-1])

    def slice_for(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Slice `index` of this layer's output for input x: the first call for an input computes
        every slice, the others take theirs (q, k, v are each asked for with the same tensor)."""
        key = self._batch.meta_for(x)
        compute = lambda: list(self(x).split(self.out_sizes, dim=-1))  # noqa: E731
        output = self.shared.take(index, x, key, compute)
        if output is None:  # another input than the pending one: start over for it
            self.shared.clear()
            output = self.shared.take(index, x, key, compute)
        return output


class SliceOf(nn.Module):
    """Stands in for one projection (e.g. k_proj) that a ParallelLoraLinear computes together with
    its siblings; the first sibling holds the fused layer as a submodule."""

    def __init__(self, fused: ParallelLoraLinear, index: int):
        super().__init__()
        if index == 0:
            self.fused = fused
        else:
            object.__setattr__(self, "fused", fused)  # registered once, under the first sibling
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused.slice_for(x, self.index)


class TpLlama:
    """One rank's shard of a Llama-family ``*ForCausalLM`` (modified in place), its LoRA cache, and
    the forward of a batch whose rows may each use a different adapter."""

    def __init__(self, model, ctx: ParallelContext, *, max_rank: int = 64, host_cache_bytes: int = 256 << 20,
                 device=None, device_cache_bytes: Optional[int] = None, max_slots: int = 64):
        from loramux.cache import LoraCache  # imported on use: the cache needs torch

        cfg = model.config
        if cfg.model_type not in ("llama", "mistral", "qwen2"):
            raise ValueError(f"the tensor-parallel forward supports the Llama family, not model_type {cfg.model_type!r}")
        self.model, self.ctx = model, ctx
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        self.full_spec = spec_from_config(cfg, max_rank=max_rank)
        self.layers = stage_layers(cfg.num_hidden_layers, ctx.pp_size, ctx.pp_rank)
        self.spec = rank_spec(self.full_spec, ctx.tp_size, self.layers)  # raises if heads/ffn do not divide
        if device is None:  # adapters live where the model does (a host-memory tier for CPU models)
            device = self.device if self.device.type == "cuda" else "cpu"
        self.cache = LoraCache(self.spec, dtype=self.dtype, host_cache_bytes=host_cache_bytes, device=device,
                               device_cache_bytes=device_cache_bytes, max_slots=max_slots)
        self._batch = StepBatch(self.dtype, max_rank)
        self._fused: List[ParallelLoraLinear] = []
        self._empty_tasks: set = set()  # tasks whose adapter has no rows on this stage
        self._rows: Optional[int] = None  # rows of the current batch (None outside `batch`)
        self._shard(model)

    def _shard(self, model) -> None:
        start, end = self.layers
        inner = model.model
        inner.layers = nn.ModuleList(list(inner.layers)[start:end])
        arch = model.config.model_type
        for local, block in enumerate(inner.layers):
            # a stage's KV cache holds its own layers from 0 (positions are read off layer 0's)
            block.self_attn.layer_idx = local
            for ids, kind in _GROUPS:
                places = [_projection(block, arch, m) for m in ids]
                bases = [getattr(parent, attr) for parent, attr in places]
                fused = ParallelLoraLinear(bases, kind, self.ctx, self._batch, local, ids)
                self._fused.append(fused)
                if len(ids) == 1:
                    setattr(*places[0], fused)
                else:
                    for index, (parent, attr) in enumerate(places):
                        setattr(parent, attr, SliceOf(fused, index))
        if not self.ctx.is_last_stage:
            inner.norm = nn.Identity()  # the final norm and lm_head run on the last stage only
            model.lm_head = nn.Identity()
        if self.ctx.pp_rank > 0:
            inner.embed_tokens = nn.Identity()

    # --- adapters ----------------------------------------------------------------------------
    def load(self, task_id: int, weights, config, replace: bool = False) -> None:
        """Caches this rank's slice of a full adapter (the one every rank of the request receives)."""
        cfg = np.asarray(config)
        for row, mid in enumerate(cfg.reshape(-1, cfg.shape[-1])[:, 0].tolist()):
            if mid not in SERVED_MODULE_IDS:
                raise LoraFormatError(f"config row {row}: module_id {mid} is not applied by the Llama forward "
                                      f"(ids {sorted(SERVED_MODULE_IDS)})", row=row)
        sliced = slice_adapter(weights, config, self.full_spec, self.ctx.tp_size, self.ctx.tp_rank, self.layers)
        if sliced.config.shape[0] == 0:
            self._empty_tasks.add(task_id)
            return
        self.cache.put(task_id, sliced.weights, sliced.config, replace=replace)
        self._empty_tasks.discard(task_id)

    @contextmanager
    def batch(self, task_ids: Sequence[Optional[int]]) -> Iterator[None]:
        """Acquires this rank's slices of ``task_ids`` (row b's adapter; None = base) for the
        ``step`` calls inside; host work only, so a CUDA graph of ``step`` can be captured inside."""
        wanted = [t for t in task_ids if t is not None and t not in self._empty_tasks]
        held = self.cache.acquire(wanted) if wanted else None
        try:
            slots = iter(held.slots if held is not None else [])
            slot_of_row = [next(slots) if (t is not None and t not in self._empty_tasks) else -1 for t in task_ids]
            self._batch.set(slot_of_row, held.table if held else None, held.pool if held else None)
            self._rows = len(task_ids)
            yield
        finally:
            self._batch.clear()
            for fused in self._fused:
                fused.shared.clear()
            self._rows = None
            if held is not None:
                self.cache.release(held)

    # --- forward -----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, input_ids: torch.Tensor, **model_kwargs) -> Optional[torch.Tensor]:
        """This stage's pass over the current ``batch``: logits ``[B, S, vocab]`` on the last
        pipeline stage, None on the others (which send their hidden states on). Every rank of the
        layout calls it together. ``model_kwargs`` go to the HF decoder (a KV cache and
        ``use_cache=True`` for decode)."""
        if self._rows != input_ids.shape[0]:
            raise ValueError(f"{self._rows} task ids for a batch of {input_ids.shape[0]} rows")
        ctx, inner = self.ctx, self.model.model
        model_kwargs.setdefault("use_cache", False)
        if ctx.pp_rank == 0:
            hidden = inner(input_ids=input_ids, **model_kwargs).last_hidden_state
        else:
            shape = (*input_ids.shape, self.model.config.hidden_size)
            received = torch.empty(shape, dtype=self.dtype, device=self.device)
            dist.recv(received, src=ctx.prev_rank)
            hidden = inner(inputs_embeds=received, **model_kwargs).last_hidden_state
        if ctx.next_rank is not None:
            dist.send(hidden.contiguous(), dst=ctx.next_rank)
            return None
        return self.model.lm_head(hidden)

    def forward(self, input_ids: torch.Tensor, task_ids: Sequence[Optional[int]], **model_kwargs) -> Optional[torch.Tensor]:
        """One batch whose row b uses adapter ``task_ids[b]`` (None = base): ``batch`` + ``step``."""
        if len(task_ids) != input_ids.shape[0]:
            raise ValueError(f"{len(task_ids)} task ids for a batch of {input_ids.shape[0]} rows")
        with self.batch(task_ids):
            return self.step(input_ids, **model_kwargs)

    __call__ = forward


__all__ = ["ParallelContext", "init_parallel", "ParallelLoraLinear", "SliceOf", "TpLlama", "SERVED_MODULE_IDS"]
