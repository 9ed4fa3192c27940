"""Which layers of an HF model take LoRA, and as which module ids: loramux.convert.hf_modules per-architecture
table (the converter's too) applied to a live model. Layer indices are spec's: an encoder-decoder
numbers its encoder blocks 0..Le-1 and its decoder blocks Le..Le+Ld-1, so one adapter covers both.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

from loramux.convert import hf_modules as hfspec
from loramux._core import ModelSpec
from loramux.errors import LoraConvertError
from loramux.modules import MODULE_IDS

_M = MODULE_IDS
# A fused layer also takes its parts side by side: attn_q|attn_k|attn_v on a fused qkv layer (as
# TensorRT-LLM's fused-qkv models do), mlp_h_to_4h|mlp_gate (HF gate|up) on a fused gate_up layer.
_PARTS = {
    _M["attn_qkv"]: (_M["attn_q"], _M["attn_k"], _M["attn_v"]),
    _M["mlp_gate_up"]: (_M["mlp_h_to_4h"], _M["mlp_gate"]),
}


class LayerTarget(NamedTuple):
    """A layer to wrap: `slices` are groups of module ids, each applied over the output columns in
    order; for "experts", slices = ((moe_h_to_4h, moe_gate), (moe_4h_to_h,))."""

    name: str
    kind: str  # hfspec.LINEAR / CONV1D / ROUTER / EXPERTS
    slices: Tuple[Tuple[int, ...], ...]
    layer: int


def spec_from_config(config, max_rank: int = 64) -> ModelSpec:
    """The ModelSpec (module dims, layer count) of an attached model's HF config."""
    return hfspec.spec_from_hf_config(config, max_rank)


def _target(arch: str, path: str, encoder_layers: Optional[int]) -> Optional[hfspec.HfTarget]:
    try:
        return hfspec.target_for(arch, path, encoder_layers)
    except LoraConvertError:
        return None  # not a LoRA target (embeddings, norms, containers, ...)


def served_modules(targets: List[LayerTarget]) -> List[Tuple[int, int]]:
    """The (module_id, layer) pairs the wrapped layers apply: what an adapter may hold."""
    return sorted({(mid, t.layer) for t in targets for ids in t.slices for mid in ids})


def match_targets(model) -> List[LayerTarget]:
    """Every layer of `model` that takes LoRA, with its module-id slices and layer index."""
    config = model.config
    arch = config.model_type
    hfspec.family_of(arch)  # LoraConvertError for an unsupported architecture
    encoder_layers = hfspec.encoder_layers_of(config)
    found = []
    for name, module in model.named_modules():
        if hasattr(module, "gate_up_proj") and getattr(module.gate_up_proj, "ndim", 0) == 3:
            gate_up, down = (_target(arch, f"{name}.{p}", encoder_layers) for p in ("gate_up_proj", "down_proj"))
            if gate_up and down and gate_up.kind == down.kind == hfspec.EXPERTS:
                found.append(LayerTarget(name, hfspec.EXPERTS, (gate_up.module_ids, down.module_ids), gate_up.layer))
            continue
        t = _target(arch, name, encoder_layers)
        if t is None or t.kind in (hfspec.EXPERTS, hfspec.PER_EXPERT):
            continue
        slices = (t.module_ids,) + ((_PARTS[t.module_id],) if t.module_id in _PARTS else ())
        found.append(LayerTarget(name, t.kind, slices, t.layer))
    return found
