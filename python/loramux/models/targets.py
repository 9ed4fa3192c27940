"""Which layers of an HF model take LoRA, and as which module ids: loramux.spec's per-architecture
table applied to a live model, plus the layer numbering of encoder-decoder models.

Layer indices: a decoder-only model numbers its blocks 0..L-1. An encoder-decoder numbers the
decoder blocks 0..Ld-1 (so `loramux convert`'s default decoder output serves as is) and the encoder
blocks Ld..Ld+Le-1 (join_encoder_decoder shifts a converted encoder adapter there).
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import numpy as np

from loramux import format as fmt
from loramux import spec as hfspec
from loramux._core import ModelSpec
from loramux.errors import LoraConvertError, LoraFormatError
from loramux.modules import MODULE_IDS

_M = MODULE_IDS
# A fused layer also takes its parts side by side: attn_q|attn_k|attn_v on a fused qkv layer (as
# TensorRT-LLM's fused-qkv models do), mlp_gate|mlp_h_to_4h on a fused gate_up layer.
_PARTS = {
    _M["attn_qkv"]: (_M["attn_q"], _M["attn_k"], _M["attn_v"]),
    _M["mlp_gate_up"]: (_M["mlp_gate"], _M["mlp_h_to_4h"]),
}


class LayerTarget(NamedTuple):
    """A layer to wrap: `slices` are groups of module ids, each applied over the output columns in
    order; for "experts", slices = ((moe_gate, moe_h_to_4h), (moe_4h_to_h,))."""

    name: str
    kind: str  # hfspec.LINEAR / CONV1D / ROUTER / EXPERTS
    slices: Tuple[Tuple[int, ...], ...]
    layer: int


def _decoder_layers(config) -> int:
    return config.decoder_layers if config.is_encoder_decoder else 0


def spec_from_config(config, max_rank: int = 64) -> ModelSpec:
    """The ModelSpec of an attached model: loramux.spec's, with an encoder-decoder's two stacks as
    one (decoder layers first), which needs both stacks to have the same widths."""
    if not getattr(config, "is_encoder_decoder", False):
        return hfspec.spec_from_hf_config(config, max_rank)
    dec = hfspec.spec_from_hf_config(config, max_rank, "decoder")
    enc = hfspec.spec_from_hf_config(config, max_rank, "encoder")
    if (dec.num_heads, dec.ffn_size, dec.hidden_size) != (enc.num_heads, enc.ffn_size, enc.hidden_size):
        raise LoraFormatError(f"{config.model_type}: encoder and decoder differ in heads/ffn/hidden "
                              f"({enc.num_heads}/{enc.ffn_size}/{enc.hidden_size} vs {dec.num_heads}/{dec.ffn_size}/"
                              f"{dec.hidden_size}); one adapter cannot describe both stacks")
    return ModelSpec(num_layers=dec.num_layers + enc.num_layers, hidden_size=dec.hidden_size, num_heads=dec.num_heads,
                     num_kv_heads=dec.num_kv_heads, head_dim=dec.head_dim, ffn_size=dec.ffn_size,
                     encoder_hidden_size=dec.encoder_hidden_size, max_rank=max_rank)


def _target(arch: str, path: str) -> Optional[hfspec.HfTarget]:
    try:
        return hfspec.target_for(arch, path)
    except LoraConvertError:
        return None  # not a LoRA target (embeddings, norms, containers, ...)


def match_targets(model) -> List[LayerTarget]:
    """Every layer of `model` that takes LoRA, with its module-id slices and layer index."""
    config = model.config
    arch = config.model_type
    hfspec.family_of(arch)  # LoraConvertError for an unsupported architecture
    shift = _decoder_layers(config)
    found = []
    for name, module in model.named_modules():
        if hasattr(module, "gate_up_proj") and getattr(module.gate_up_proj, "ndim", 0) == 3:
            gate_up, down = _target(arch, name + ".gate_up_proj"), _target(arch, name + ".down_proj")
            if gate_up and down and gate_up.kind == down.kind == hfspec.EXPERTS:
                found.append(LayerTarget(name, hfspec.EXPERTS, (gate_up.module_ids, down.module_ids), gate_up.layer))
            continue
        t = _target(arch, name)
        if t is None or t.kind in (hfspec.EXPERTS, hfspec.PER_EXPERT):
            continue
        layer = t.layer + (shift if t.component == "encoder" else 0)
        slices = (t.module_ids,) + ((_PARTS[t.module_id],) if t.module_id in _PARTS else ())
        found.append(LayerTarget(name, t.kind, slices, layer))
    return found


def join_encoder_decoder(config, decoder: Optional[Tuple[np.ndarray, np.ndarray]],
                         encoder: Optional[Tuple[np.ndarray, np.ndarray]]) -> Tuple[np.ndarray, np.ndarray]:
    """One (weights, config) for an attached encoder-decoder model from `loramux convert`'s two
    outputs (component decoder and encoder): encoder rows move to layers Ld.. ."""
    if not config.is_encoder_decoder:
        raise LoraFormatError(f"{config.model_type} is not an encoder-decoder model")
    parts = [p for p in (decoder, encoder) if p is not None]
    if not parts:
        raise LoraFormatError("join_encoder_decoder needs a decoder or an encoder adapter")
    dtypes = {fmt.weights_dtype_name(w) for w, _ in parts}
    if len(dtypes) != 1:
        raise LoraFormatError(f"decoder and encoder weights have different dtypes {sorted(dtypes)}")
    configs, weights = [], []
    for (w, c), shift in ((decoder, 0), (encoder, config.decoder_layers)):
        if w is None:
            continue
        c = np.array(c, dtype=np.int64).reshape(-1, np.asarray(c).shape[-1])
        w = np.asarray(w).reshape(c.shape[0], -1)
        c[:, 1] += shift
        configs.append(c if c.shape[1] == 4 else np.concatenate([c, np.zeros((len(c), 1), np.int64)], axis=1))
        weights.append(w)
    width = max(w.shape[1] for w in weights)
    joined = np.zeros((sum(len(w) for w in weights), width), dtype=weights[0].dtype)
    row = 0
    for w in weights:
        joined[row : row + len(w), : w.shape[1]] = w
        row += len(w)
    cfg = np.concatenate(configs).astype(np.int32)
    return joined, (cfg if cfg[:, 3].any() else cfg[:, :3])
