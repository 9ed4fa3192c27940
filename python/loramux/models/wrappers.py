"""LoRA-aware stand-ins for the layers attach() swaps: Linear / GPT-2 Conv1D, top-k MoE routers and
fused MoE experts. Each reads the current batch's BatchMeta from the engine; with none (no batch, or
no row holds an adapter) it runs the original layer untouched."""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import loramux.ops as ops  # ops.lora_apply looked up per call (a counting wrapper in tests sees it)


class _Wrapper(nn.Module):
    """Reads through to the wrapped layer, so model code that asks a layer for its weight,
    in_features, top_k, ... still gets its answer."""

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base":
                raise
            return getattr(self.base, name)


class LoraLinear(_Wrapper):
    """y = x W^T (+ each token's LoRA slices, DoRA scaling on the bias-free output) + bias."""

    def __init__(self, base: nn.Module, engine, layer: int, slices: Sequence[Tuple[int, ...]],
                 slice_sizes: Sequence[Tuple[int, ...]], conv1d: bool):
        super().__init__()
        self.base = base
        self.layer = layer
        self.slices = [tuple(s) for s in slices]
        self.slice_sizes = [tuple(s) for s in slice_sizes]
        self.conv1d = conv1d  # GPT-2 Conv1D keeps its weight as [in, out]
        object.__setattr__(self, "_engine", engine)  # not a submodule: the engine is not part of the model
        # set by models/siblings.py when q|k|v or gate|up siblings share one fused LoRA launch
        self.sibling = None
        self.sibling_index = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sibling is not None:
            fused = self.sibling.output_for(self.sibling_index, x)
            if fused is not None:
                return fused
        meta = self._engine.meta_for(x)
        used = self._engine.used_slices(self.layer, self.slices) if meta is not None else []
        if not used:
            return self.base(x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        w = self.base.weight
        applies = [(ids, sizes) for ids, sizes in zip(self.slices, self.slice_sizes) if ids in used]
        if self._engine.beside_for(x2.shape[0]):
            base = (lambda: x2 @ w) if self.conv1d else (lambda: F.linear(x2, w))
            y = ops.lora_apply_beside(x2, base, meta, self.layer, applies)
        else:
            y = x2 @ w if self.conv1d else F.linear(x2, w)
            for ids, sizes in applies:
                ops.lora_apply(x2, y, meta, self.layer, ids, sizes)
        if self.base.bias is not None:
            y = y + self.base.bias
        return y.view(*lead, y.shape[-1])


def _route(router: nn.Module, logits: torch.Tensor):
    """The top-k selection of Mixtral / Qwen2-MoE routers, given (LoRA-adjusted) logits."""
    probs = torch.softmax(logits.float(), dim=-1)
    top_value, top_index = torch.topk(probs, router.top_k, dim=-1)
    if getattr(router, "norm_topk_prob", True):
        top_value = top_value / top_value.sum(dim=-1, keepdim=True)
    if hasattr(router, "norm_topk_prob"):  # Qwen2-MoE returns scores in the logits' dtype
        top_value = top_value.to(logits.dtype)
    return logits, top_value, top_index


class LoraRouter(_Wrapper):
    """A top-k MoE router whose logits take the moe_router LoRA (module 16)."""

    def __init__(self, base: nn.Module, engine, layer: int, module_id: int, num_experts: int):
        super().__init__()
        self.base = base
        self.layer = layer
        self.module_id = module_id
        self.num_experts = num_experts
        object.__setattr__(self, "_engine", engine)

    def forward(self, hidden_states: torch.Tensor):
        meta = self._engine.meta_for(hidden_states)
        if meta is None or not self._engine.used_slices(self.layer, [(self.module_id,)]):
            return self.base(hidden_states)
        x = hidden_states.reshape(-1, self.base.weight.shape[1])
        logits = F.linear(x, self.base.weight)
        ops.lora_apply(x, logits, meta, self.layer, [self.module_id], [self.num_experts])
        return _route(self.base, logits)


class LoraExperts(_Wrapper):
    """Fused MoE experts (gate_up_proj [E, 2f, h], down_proj [E, h, f]) taking one adapter shared by
    all experts of the layer: moe_h_to_4h / moe_gate on the gate / up halves, moe_4h_to_h on down."""

    def __init__(self, base: nn.Module, engine, layer: int, gate_up_ids: Tuple[int, int], down_id: int):
        super().__init__()
        self.base = base
        self.layer = layer
        self.gate_up_ids = tuple(gate_up_ids)
        self.down_id = down_id
        object.__setattr__(self, "_engine", engine)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        meta = self._engine.meta_for(hidden_states)
        used = self._engine.used_slices(self.layer, [self.gate_up_ids, (self.down_id,)]) if meta is not None else []
        if not used:
            return self.base(hidden_states, top_k_index, top_k_weights)
        gate_up_used, down_used = self.gate_up_ids in used, (self.down_id,) in used
        base = self.base
        num_experts = base.gate_up_proj.shape[0]
        f = base.gate_up_proj.shape[1] // 2
        h = base.down_proj.shape[1]
        out = torch.zeros_like(hidden_states)
        # one (expert, token) pair per routed choice; the expert loop mirrors HF's eager experts
        for expert in torch.unique(top_k_index).tolist():
            if expert >= num_experts:
                continue
            token_idx, k_pos = torch.where(top_k_index == expert)
            # its own token segments: the step's are for all of the batch's tokens
            sub = replace(meta, slot_of_token=meta.slot_of_token[token_idx], segments=None)
            x = hidden_states[token_idx]
            gate_up = F.linear(x, base.gate_up_proj[expert])
            if gate_up_used:
                ops.lora_apply(x, gate_up, sub, self.layer, self.gate_up_ids, [f, f])
            gate, up = gate_up.chunk(2, dim=-1)
            inner = base.act_fn(gate) * up
            y = F.linear(inner, base.down_proj[expert])
            if down_used:
                ops.lora_apply(inner, y, sub, self.layer, [self.down_id], [h])
            y = y * top_k_weights[token_idx, k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out
