"""Sibling projections served together: HF calls q_proj, k_proj and v_proj (and gate_proj, up_proj)
on the same input, so the first one called computes every sibling's base output into one buffer and
all their LoRA slices with one multi-slice lora_apply; the others take their columns of it.

Fewer, wider launches are what a decode step costs (docs/kernel-notes.md, "Where the per-apply time goes"). A sibling called
with another input than the one its group computed for runs its own per-projection path.
"""

from __future__ import annotations

from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import loramux.ops as ops
from loramux.modules import MODULE_IDS

_M = MODULE_IDS
#: module ids whose HF layers read one input, in the order their outputs sit side by side
SIBLING_IDS: Tuple[Tuple[int, ...], ...] = (
    (_M["attn_q"], _M["attn_k"], _M["attn_v"]),  # self attention (Llama family, Mixtral, Qwen2-MoE, BART)
    (_M["mlp_h_to_4h"], _M["mlp_gate"]),  # gated MLP: HF gate_proj, up_proj (Llama family, Qwen2-MoE's shared expert)
    (_M["cross_attn_k"], _M["cross_attn_v"]),  # BART cross attention: k and v read the encoder output
)


class _Pending(NamedTuple):
    x: torch.Tensor
    version: Optional[int]  # x._version when computed: an in-place change to x is another input
    key: object  # what they were computed under (a new batch or token count is another BatchMeta)
    outputs: List[torch.Tensor]
    left: frozenset  # indices that have not taken their output yet


def _version_of(x: torch.Tensor) -> Optional[int]:
    """x's in-place version counter; None for inference-mode tensors, which keep none."""
    return None if x.is_inference() else x._version


class SharedOutputs:
    """Outputs computed together for one input (one GEMM and one multi-slice LoRA launch), each
    handed once to the sibling that asks for it; the first sibling called computes them all."""

    def __init__(self) -> None:
        self._pending: Optional[_Pending] = None

    def clear(self) -> None:
        """Drops outputs not taken (a batch ended, or a forward stopped half way)."""
        self._pending = None

    def take(self, index: int, x: torch.Tensor, key: object, compute: Callable[[], List[torch.Tensor]]
             ) -> Optional[torch.Tensor]:
        """Sibling `index`'s output for x under `key`: taken from the pending outputs when they are
        for this input, else computed with compute() (all of them). None when outputs for another
        input are still pending: the caller decides (stop fusing, or clear() and ask again)."""
        pending = self._pending
        if pending is not None and pending.key is key:
            same_input = pending.x is x and pending.version == _version_of(x)
            if same_input and index in pending.left:
                left = pending.left - {index}
                self._pending = pending._replace(left=left) if left else None
                return pending.outputs[index]
            if not same_input:
                return None
        outputs = compute()
        left = frozenset(range(len(outputs))) - {index}
        self._pending = _Pending(x, _version_of(x), key, outputs, left) if left else None
        return outputs[index]


class SiblingGroup:
    """LoraLinear layers of one block whose module ids form one SIBLING_IDS entry (two or more of it)."""

    def __init__(self, members: Sequence, engine):
        self.members = list(members)  # LoraLinear wrappers, in SIBLING_IDS order; not submodules
        self.engine = engine
        self.layer = self.members[0].layer
        self.module_ids = [m.slices[0][0] for m in self.members]
        self.out_sizes = [m.slice_sizes[0][0] for m in self.members]
        self.starts = [sum(self.out_sizes[:i]) for i in range(len(self.members))]
        self.fusable = True  # False once a sibling was called with another input (then never again)
        self.shared = SharedOutputs()

    def clear(self) -> None:
        self.shared.clear()

    def output_for(self, index: int, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Member `index`'s output for input x, or None when it should run its own per-projection
        path (fusing off, no adapter in the batch, fewer than two siblings used, or another input)."""
        engine = self.engine
        if not (self.fusable and engine.fuse_siblings):
            return None
        meta = engine.meta_for(x)
        if meta is None:
            return None
        used = sum(1 for m in self.members if engine.used_slices(self.layer, m.slices))
        if used < 2:  # one LoRA slice or none: the per-projection path launches no more than this
            return None
        output = self.shared.take(index, x, meta, lambda: self._compute(x, meta))
        if output is None:
            # this model calls the siblings on different inputs: stop guessing for this group
            self.fusable = False
            self.shared.clear()
        return output

    def _compute(self, x: torch.Tensor, meta) -> List[torch.Tensor]:
        """Every sibling's output for x: the bias-free base outputs side by side in one buffer (so a
        DoRA row's expand scales base + LoRA of each slice), one lora_apply, then each bias."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if self.engine.beside_for(x2.shape[0]):
            y = ops.lora_apply_beside(x2, lambda: self._base_outputs(x2), meta, self.layer,
                                      [(self.module_ids, self.out_sizes)])
        else:
            y = self._base_outputs(x2)
            ops.lora_apply(x2, y, meta, self.layer, self.module_ids, self.out_sizes)
        outputs = []
        for member, start, size in zip(self.members, self.starts, self.out_sizes):
            out = y[:, start : start + size]
            if member.base.bias is not None:
                out = out + member.base.bias
            outputs.append(out.view(*lead, size))
        return outputs

    def _base_outputs(self, x2: torch.Tensor) -> torch.Tensor:
        weights = [m.base.weight for m in self.members]
        tracked = torch.is_grad_enabled() and (x2.requires_grad or any(w.requires_grad for w in weights))
        if tracked or torch.is_autocast_enabled(x2.device.type):
            # out= has no autograd and skips autocast: concatenate (one extra copy) instead
            return torch.cat([F.linear(x2, w) for w in weights], dim=1)
        y = torch.empty(x2.shape[0], sum(self.out_sizes), dtype=x2.dtype, device=x2.device)
        for w, start, size in zip(weights, self.starts, self.out_sizes):
            torch.mm(x2, w.t(), out=y[:, start : start + size])  # strided rows: cuBLAS/BLAS write in place
        return y


def group_siblings(wrapped: Sequence[Tuple[str, object]], engine) -> List[SiblingGroup]:
    """Groups the single-module nn.Linear wrappers of each parent module (name, LoraLinear) into
    SiblingGroups and tells each member its group."""
    by_parent: Dict[str, Dict[int, object]] = {}
    for parent_name, layer in wrapped:
        if layer.conv1d or len(layer.slices) != 1 or len(layer.slices[0]) != 1:
            continue
        by_parent.setdefault(parent_name, {})[layer.slices[0][0]] = layer
    groups = []
    for layers in by_parent.values():
        for ids in SIBLING_IDS:
            members = [layers[m] for m in ids if m in layers]
            if len(members) < 2 or len({m.layer for m in members}) != 1:
                continue
            group = SiblingGroup(members, engine)
            for index, member in enumerate(members):
                member.sibling, member.sibling_index = group, index
            groups.append(group)
    return groups


__all__ = ["SIBLING_IDS", "SharedOutputs", "SiblingGroup", "group_siblings"]
