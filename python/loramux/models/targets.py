"""Per-architecture maps from HF module names to LoRA module ids, and the ModelSpec of an HF config.

Layer indices: a decoder-only model numbers its blocks 0..L-1; an encoder-decoder numbers the
encoder blocks 0..Le-1 and the decoder blocks Le..Le+Ld-1 (one adapter covers both stacks).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from loramux._core import ModelSpec
from loramux.errors import LoraFormatError

# module ids, named for reading the maps below
QKV, Q, K, V, DENSE, H_TO_4H, FOURH_TO_H, GATE = range(8)
X_QKV, X_Q, X_K, X_V, X_DENSE = range(8, 13)
MOE_H_TO_4H, MOE_4H_TO_H, MOE_GATE, MOE_ROUTER, MLP_ROUTER, GATE_UP = range(13, 19)


@dataclass(frozen=True)
class Target:
    """Layers whose qualified name matches `pattern` (group 1: block index in its stack) take the
    LoRA slices `slices`: each tuple of module ids is applied side by side over the output columns,
    in order (a fused qkv layer takes (attn_qkv,) or (attn_q, attn_k, attn_v))."""

    pattern: str
    slices: Tuple[Tuple[int, ...], ...]
    kind: str = "linear"  # "linear" (nn.Linear / GPT-2 Conv1D), "router" (top-k router), "experts"
    decoder_stack: bool = False  # block index offset by the encoder's layer count


_LLAMA = (
    Target(r"layers\.(\d+)\.self_attn\.q_proj$", ((Q,),)),
    Target(r"layers\.(\d+)\.self_attn\.k_proj$", ((K,),)),
    Target(r"layers\.(\d+)\.self_attn\.v_proj$", ((V,),)),
    Target(r"layers\.(\d+)\.self_attn\.o_proj$", ((DENSE,),)),
    Target(r"layers\.(\d+)\.mlp\.gate_proj$", ((GATE,),)),
    Target(r"layers\.(\d+)\.mlp\.up_proj$", ((H_TO_4H,),)),
    Target(r"layers\.(\d+)\.mlp\.down_proj$", ((FOURH_TO_H,),)),
)
_ATTENTION = _LLAMA[:4]
_MOE = (
    Target(r"layers\.(\d+)\.mlp\.gate$", ((MOE_ROUTER,),), kind="router"),
    Target(r"layers\.(\d+)\.mlp\.experts$", ((MOE_GATE, MOE_H_TO_4H), (MOE_4H_TO_H,)), kind="experts"),
)


def _bart_stack(prefix: str, decoder: bool) -> Tuple[Target, ...]:
    attn = [
        Target(rf"{prefix}\.layers\.(\d+)\.self_attn\.{name}$", ((mid,),), decoder_stack=decoder)
        for name, mid in (("q_proj", Q), ("k_proj", K), ("v_proj", V), ("out_proj", DENSE))
    ]
    mlp = [
        Target(rf"{prefix}\.layers\.(\d+)\.fc1$", ((H_TO_4H,),), decoder_stack=decoder),
        Target(rf"{prefix}\.layers\.(\d+)\.fc2$", ((FOURH_TO_H,),), decoder_stack=decoder),
    ]
    cross = [
        Target(rf"{prefix}\.layers\.(\d+)\.encoder_attn\.{name}$", ((mid,),), decoder_stack=True)
        for name, mid in (("q_proj", X_Q), ("k_proj", X_K), ("v_proj", X_V), ("out_proj", X_DENSE))
    ]
    return tuple(attn + mlp + (cross if decoder else []))


TARGETS: Dict[str, Tuple[Target, ...]] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "phi3": (
        Target(r"layers\.(\d+)\.self_attn\.qkv_proj$", ((QKV,), (Q, K, V))),
        Target(r"layers\.(\d+)\.self_attn\.o_proj$", ((DENSE,),)),
        Target(r"layers\.(\d+)\.mlp\.gate_up_proj$", ((GATE_UP,), (GATE, H_TO_4H))),
        Target(r"layers\.(\d+)\.mlp\.down_proj$", ((FOURH_TO_H,),)),
    ),
    "gpt2": (
        Target(r"h\.(\d+)\.attn\.c_attn$", ((QKV,), (Q, K, V))),
        Target(r"h\.(\d+)\.attn\.c_proj$", ((DENSE,),)),
        Target(r"h\.(\d+)\.crossattention\.q_attn$", ((X_Q,),)),
        Target(r"h\.(\d+)\.crossattention\.c_attn$", ((X_K, X_V),)),
        Target(r"h\.(\d+)\.crossattention\.c_proj$", ((X_DENSE,),)),
        Target(r"h\.(\d+)\.mlp\.c_fc$", ((H_TO_4H,),)),
        Target(r"h\.(\d+)\.mlp\.c_proj$", ((FOURH_TO_H,),)),
    ),
    "mixtral": _ATTENTION + _MOE,
    "qwen2_moe": _ATTENTION
    + _MOE
    + (
        Target(r"layers\.(\d+)\.mlp\.shared_expert_gate$", ((MLP_ROUTER,),)),
        Target(r"layers\.(\d+)\.mlp\.shared_expert\.gate_proj$", ((GATE,),)),
        Target(r"layers\.(\d+)\.mlp\.shared_expert\.up_proj$", ((H_TO_4H,),)),
        Target(r"layers\.(\d+)\.mlp\.shared_expert\.down_proj$", ((FOURH_TO_H,),)),
    ),
    "bart": _bart_stack(r"encoder", False) + _bart_stack(r"decoder", True),
}


def _get(config, *names, default=None):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def spec_from_config(config, max_rank: int = 64) -> ModelSpec:
    """The ModelSpec (module dims) of an HF config of a supported architecture."""
    mt = config.model_type
    if mt not in TARGETS:
        raise LoraFormatError(f"model_type {mt!r} is not supported; supported: {sorted(TARGETS)}")
    if mt == "gpt2":
        h = config.n_embd
        return ModelSpec(num_layers=config.n_layer, hidden_size=h, num_heads=config.n_head,
                         ffn_size=config.n_inner or 4 * h, max_rank=max_rank,
                         encoder_hidden_size=h if config.add_cross_attention else 0)
    if mt == "bart":
        if config.encoder_ffn_dim != config.decoder_ffn_dim or config.encoder_attention_heads != config.decoder_attention_heads:
            raise LoraFormatError("BART with different encoder and decoder widths is not supported")
        return ModelSpec(num_layers=config.encoder_layers + config.decoder_layers, hidden_size=config.d_model,
                         num_heads=config.decoder_attention_heads, ffn_size=config.decoder_ffn_dim,
                         encoder_hidden_size=config.d_model, max_rank=max_rank)
    heads = config.num_attention_heads
    kw = dict(num_layers=config.num_hidden_layers, hidden_size=config.hidden_size, num_heads=heads,
              num_kv_heads=_get(config, "num_key_value_heads", default=heads),
              head_dim=_get(config, "head_dim", default=config.hidden_size // heads), max_rank=max_rank)
    if mt == "mixtral":
        return ModelSpec(**kw, expert_ffn_size=config.intermediate_size, num_experts=config.num_local_experts)
    if mt == "qwen2_moe":
        if config.mlp_only_layers or config.decoder_sparse_step != 1:
            raise LoraFormatError("Qwen2-MoE with dense MLP layers is not supported (the format has one ffn width)")
        return ModelSpec(**kw, ffn_size=config.shared_expert_intermediate_size,
                         expert_ffn_size=config.moe_intermediate_size, num_experts=config.num_experts)
    return ModelSpec(**kw, ffn_size=config.intermediate_size)


def match_targets(model) -> List[Tuple[str, Target, int]]:
    """(qualified name, target, layer index) of every layer of `model` that takes LoRA."""
    config = model.config
    targets = TARGETS.get(config.model_type)
    if targets is None:
        raise LoraFormatError(f"model_type {config.model_type!r} is not supported; supported: {sorted(TARGETS)}")
    offset = getattr(config, "encoder_layers", 0) if config.is_encoder_decoder else 0
    found = []
    for name, _ in model.named_modules():
        for target in targets:
            m: Optional[re.Match] = re.search(target.pattern, name)
            if m:
                layer = int(m.group(1)) + (offset if target.decoder_stack else 0)
                found.append((name, target, layer))
                break
    return found
