"""Where each of the 19 module ids lives in a Hugging Face model: the per-architecture table from HF
module paths (q_proj, c_attn, qkv_proj, experts.gate_up_proj, encoder_attn.k_proj, ...) to
(module_id, layer), its inverse, and the ModelSpec of an HF config.

The converter and the model integration both read this table, so a name is mapped in one place.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Tuple

from loramux._core import ModelSpec
from loramux.errors import LoraConvertError
from loramux.modules import MODULE_IDS, MODULE_NAMES

# Architecture families: HF `model_type`s whose module names map the same way.
LLAMA, GPT2, PHI3, MIXTRAL, QWEN2_MOE, BART = "llama", "gpt2", "phi3", "mixtral", "qwen2_moe", "bart"
ARCH_FAMILY: Dict[str, str] = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
    "gpt2": GPT2,
    "phi3": PHI3,
    "mixtral": MIXTRAL,
    "qwen2_moe": QWEN2_MOE,
    "bart": BART,
}
# `auto_mapping.base_model_class` prefixes in adapter_config.json -> model_type (longest first).
_CLASS_PREFIX = [("Qwen2Moe", "qwen2_moe"), ("Qwen2", "qwen2"), ("Llama", "llama"), ("Mistral", "mistral"),
                 ("Mixtral", "mixtral"), ("GPT2", "gpt2"), ("Phi3", "phi3"), ("Bart", "bart")]

# How an HF target holds its weight, which decides how its LoRA factors are read and written.
LINEAR = "linear"  # nn.Linear, weight [out, in]
CONV1D = "conv1d"  # GPT-2 Conv1D, weight [in, out]; PEFT's lora_A/lora_B are still [r, in] / [out, r]
ROUTER = "router"  # a router module whose `weight` [out, in] PEFT targets as a parameter (transformers 5)
EXPERTS = "experts"  # a fused 3-D experts parameter [experts, out, in] (transformers 5, PEFT target_parameters)
PER_EXPERT = "per_expert"  # one nn.Linear per expert (transformers 4 naming); path holds `{e}`

_M = MODULE_IDS


class TargetRule(NamedTuple):
    """One HF target inside a layer. `module_ids` has two ids when one fused weight holds two format
    modules stacked along its output (experts' gate_up_proj = [gate; up])."""

    families: Tuple[str, ...]
    inner: str  # path inside a layer, e.g. "self_attn.q_proj"; `{e}` = expert index
    module_ids: Tuple[int, ...]
    kind: str
    legacy: bool = False  # accepted when reading; never written


_ATTN_FAMILIES = (LLAMA, MIXTRAL, QWEN2_MOE)
TARGET_RULES: List[TargetRule] = [
    TargetRule(_ATTN_FAMILIES + (BART,), "self_attn.q_proj", (_M["attn_q"],), LINEAR),
    TargetRule(_ATTN_FAMILIES + (BART,), "self_attn.k_proj", (_M["attn_k"],), LINEAR),
    TargetRule(_ATTN_FAMILIES + (BART,), "self_attn.v_proj", (_M["attn_v"],), LINEAR),
    TargetRule(_ATTN_FAMILIES + (PHI3,), "self_attn.o_proj", (_M["attn_dense"],), LINEAR),
    TargetRule((LLAMA,), "mlp.gate_proj", (_M["mlp_gate"],), LINEAR),
    TargetRule((LLAMA,), "mlp.up_proj", (_M["mlp_h_to_4h"],), LINEAR),
    TargetRule((LLAMA, PHI3), "mlp.down_proj", (_M["mlp_4h_to_h"],), LINEAR),
    # Phi-3: fused q|k|v and gate|up linears
    TargetRule((PHI3,), "self_attn.qkv_proj", (_M["attn_qkv"],), LINEAR),
    TargetRule((PHI3,), "mlp.gate_up_proj", (_M["mlp_gate_up"],), LINEAR),
    # GPT-2: Conv1D; attn.c_proj and mlp.c_proj are different modules
    TargetRule((GPT2,), "attn.c_attn", (_M["attn_qkv"],), CONV1D),
    TargetRule((GPT2,), "attn.c_proj", (_M["attn_dense"],), CONV1D),
    TargetRule((GPT2,), "mlp.c_fc", (_M["mlp_h_to_4h"],), CONV1D),
    TargetRule((GPT2,), "mlp.c_proj", (_M["mlp_4h_to_h"],), CONV1D),
    # Mixture of experts (transformers 5: router module + fused 3-D expert parameters)
    TargetRule((MIXTRAL, QWEN2_MOE), "mlp.gate", (_M["moe_router"],), ROUTER),
    TargetRule((MIXTRAL, QWEN2_MOE), "mlp.experts.gate_up_proj", (_M["moe_gate"], _M["moe_h_to_4h"]), EXPERTS),
    TargetRule((MIXTRAL, QWEN2_MOE), "mlp.experts.down_proj", (_M["moe_4h_to_h"],), EXPERTS),
    # Mixtral in transformers 4 (adapters on the Hub use these names)
    TargetRule((MIXTRAL,), "block_sparse_moe.gate", (_M["moe_router"],), LINEAR, legacy=True),
    TargetRule((MIXTRAL,), "block_sparse_moe.experts.{e}.w1", (_M["moe_gate"],), PER_EXPERT, legacy=True),
    TargetRule((MIXTRAL,), "block_sparse_moe.experts.{e}.w3", (_M["moe_h_to_4h"],), PER_EXPERT, legacy=True),
    TargetRule((MIXTRAL,), "block_sparse_moe.experts.{e}.w2", (_M["moe_4h_to_h"],), PER_EXPERT, legacy=True),
    TargetRule((QWEN2_MOE,), "mlp.experts.{e}.gate_proj", (_M["moe_gate"],), PER_EXPERT, legacy=True),
    TargetRule((QWEN2_MOE,), "mlp.experts.{e}.up_proj", (_M["moe_h_to_4h"],), PER_EXPERT, legacy=True),
    TargetRule((QWEN2_MOE,), "mlp.experts.{e}.down_proj", (_M["moe_4h_to_h"],), PER_EXPERT, legacy=True),
    # Qwen2-MoE shared expert: a dense gated MLP plus its sigmoid gate
    TargetRule((QWEN2_MOE,), "mlp.shared_expert.gate_proj", (_M["mlp_gate"],), LINEAR),
    TargetRule((QWEN2_MOE,), "mlp.shared_expert.up_proj", (_M["mlp_h_to_4h"],), LINEAR),
    TargetRule((QWEN2_MOE,), "mlp.shared_expert.down_proj", (_M["mlp_4h_to_h"],), LINEAR),
    TargetRule((QWEN2_MOE,), "mlp.shared_expert_gate", (_M["mlp_router"],), LINEAR),
    # BART (encoder-decoder): self attention, cross attention over the encoder output, fc1/fc2
    TargetRule((BART,), "self_attn.out_proj", (_M["attn_dense"],), LINEAR),
    TargetRule((BART,), "encoder_attn.q_proj", (_M["cross_attn_q"],), LINEAR),
    TargetRule((BART,), "encoder_attn.k_proj", (_M["cross_attn_k"],), LINEAR),
    TargetRule((BART,), "encoder_attn.v_proj", (_M["cross_attn_v"],), LINEAR),
    TargetRule((BART,), "encoder_attn.out_proj", (_M["cross_attn_dense"],), LINEAR),
    TargetRule((BART,), "fc1", (_M["mlp_h_to_4h"],), LINEAR),
    TargetRule((BART,), "fc2", (_M["mlp_4h_to_h"],), LINEAR),
]

# The layer stack of each family: HF path prefix of layer `{l}`, per component.
_STACKS: Dict[str, Dict[str, str]] = {
    LLAMA: {"decoder": "model.layers.{l}."},
    PHI3: {"decoder": "model.layers.{l}."},
    MIXTRAL: {"decoder": "model.layers.{l}."},
    QWEN2_MOE: {"decoder": "model.layers.{l}."},
    GPT2: {"decoder": "transformer.h.{l}."},
    BART: {"decoder": "model.decoder.layers.{l}.", "encoder": "model.encoder.layers.{l}."},
}
_LAYER_RE = re.compile(r"^(?P<stack>(?:.*\.)?(?:layers|h))\.(?P<layer>\d+)\.(?P<inner>.+)$")

# Module ids no supported HF architecture has (they are tested at the format level only).
IDS_WITHOUT_HF_ARCH = frozenset({_M["cross_attn_qkv"]})


class HfTarget(NamedTuple):
    """Where an HF path sits in the format: its module id(s), layer, component and weight kind."""

    module_ids: Tuple[int, ...]
    layer: int
    component: str  # "decoder" (decoder-only models, or an enc-dec decoder) or "encoder"
    kind: str
    expert: Optional[int]  # expert index for PER_EXPERT paths

    @property
    def module_id(self) -> int:
        return self.module_ids[0]


def family_of(arch: str) -> str:
    """The family of an HF model_type ('mistral' -> 'llama'); LoraConvertError if unsupported."""
    try:
        return ARCH_FAMILY[arch]
    except KeyError:
        raise LoraConvertError(f"architecture {arch!r} is not supported; supported model_types: {sorted(ARCH_FAMILY)}") from None


def arch_from_class_name(class_name: str) -> Optional[str]:
    """model_type of an HF class name such as 'MixtralForCausalLM', or None."""
    for prefix, arch in _CLASS_PREFIX:
        if class_name.startswith(prefix):
            return arch
    return None


def _inner_regex(inner: str) -> "re.Pattern[str]":
    return re.compile("^" + re.escape(inner).replace(re.escape("{e}"), r"(?P<expert>\d+)") + "$")


_RULE_RES = [(_inner_regex(r.inner), r) for r in TARGET_RULES]


def target_for(arch: str, hf_path: str) -> HfTarget:
    """Maps an HF module path (e.g. 'model.layers.3.self_attn.q_proj', 'transformer.h.0.attn.c_attn',
    'model.layers.1.mlp.experts.gate_up_proj') to its format target. A trailing '.weight' is
    ignored. LoraConvertError names a path the format cannot hold (embeddings, lm_head, ...)."""
    family = family_of(arch)
    path = hf_path[: -len(".weight")] if hf_path.endswith(".weight") else hf_path
    m = _LAYER_RE.match(path)
    if m is None:
        raise LoraConvertError(
            f"{hf_path}: not inside a transformer layer (embedding, lm_head or a non-layer module); "
            "the LoRA format holds only per-layer modules")
    component = "encoder" if "encoder" in m.group("stack").split(".") else "decoder"
    for regex, rule in _RULE_RES:
        if family not in rule.families:
            continue
        hit = regex.match(m.group("inner"))
        if hit:
            expert = int(hit.group("expert")) if "expert" in regex.groupindex else None
            return HfTarget(rule.module_ids, int(m.group("layer")), component, rule.kind, expert)
    raise LoraConvertError(f"{hf_path}: no LoRA module id for this {arch} module; the format's modules are {sorted(MODULE_IDS)}")


def hf_path_for(arch: str, module_id: int, layer: int, component: str = "decoder") -> Tuple[str, TargetRule]:
    """The inverse of target_for: the HF module path that holds `module_id` at `layer` (the
    transformers-5 name), and its rule. For fused targets (experts' gate_up_proj) several ids share
    one path; rule.module_ids gives their order along the output."""
    family = family_of(arch)
    stacks = _STACKS[family]
    if component not in stacks:
        raise LoraConvertError(f"{arch} has no {component} stack (it has {sorted(stacks)})")
    for rule in TARGET_RULES:
        if family in rule.families and module_id in rule.module_ids and not rule.legacy:
            if component == "encoder" and rule.inner.startswith("encoder_attn."):
                continue
            return stacks[component].format(l=layer) + rule.inner, rule
    name = MODULE_NAMES.get(module_id, str(module_id))
    raise LoraConvertError(f"module {name} (id {module_id}) has no place in a {arch} {component}")


def module_ids_of(arch: str, component: str = "decoder") -> List[int]:
    """The module ids an architecture (component) can hold, sorted."""
    ids = set()
    for mid in MODULE_NAMES:
        try:
            hf_path_for(arch, mid, 0, component)
            ids.add(mid)
        except LoraConvertError:
            pass
    return sorted(ids)


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def spec_from_hf_config(hf_config: Any, max_rank: int = 64, component: str = "decoder") -> ModelSpec:
    """ModelSpec of an HF config (a PretrainedConfig or its dict) for Llama/Mistral/Qwen2, GPT-2,
    Phi-3, Mixtral, Qwen2-MoE or BART. For BART, `component` picks the decoder (with cross
    attention over the encoder) or the encoder stack."""
    arch = _get(hf_config, "model_type")
    family = family_of(arch)
    if family == GPT2:
        h, heads = _get(hf_config, "n_embd"), _get(hf_config, "n_head")
        return ModelSpec(num_layers=_get(hf_config, "n_layer"), hidden_size=h, num_heads=heads,
                         ffn_size=_get(hf_config, "n_inner") or 4 * h, max_rank=max_rank)
    if family == BART:
        if component not in ("decoder", "encoder"):
            raise LoraConvertError(f"component must be 'decoder' or 'encoder', got {component!r}")
        side = component
        h = _get(hf_config, "d_model")
        return ModelSpec(num_layers=_get(hf_config, f"{side}_layers"), hidden_size=h,
                         num_heads=_get(hf_config, f"{side}_attention_heads"), ffn_size=_get(hf_config, f"{side}_ffn_dim"),
                         encoder_hidden_size=h if side == "decoder" else 0, max_rank=max_rank)
    h, heads = _get(hf_config, "hidden_size"), _get(hf_config, "num_attention_heads")
    common = dict(num_layers=_get(hf_config, "num_hidden_layers"), hidden_size=h, num_heads=heads,
                  num_kv_heads=_get(hf_config, "num_key_value_heads") or heads,
                  head_dim=_get(hf_config, "head_dim") or h // heads, max_rank=max_rank)
    if family == MIXTRAL:
        return ModelSpec(expert_ffn_size=_get(hf_config, "intermediate_size"),
                         num_experts=_get(hf_config, "num_local_experts"), **common)
    if family == QWEN2_MOE:
        shared = _get(hf_config, "shared_expert_intermediate_size")
        layers, step = common["num_layers"], _get(hf_config, "decoder_sparse_step", 1) or 1
        dense = [i for i in range(layers) if i in (_get(hf_config, "mlp_only_layers") or []) or (i + 1) % step != 0]
        if dense and _get(hf_config, "intermediate_size") != shared:
            # One ffn_size per model: dense layers' MLP and the shared expert would need two.
            raise LoraConvertError(
                f"qwen2_moe with dense layers {dense} (intermediate_size {_get(hf_config, 'intermediate_size')}) "
                f"beside shared experts of size {shared}: the format has one mlp width per model")
        return ModelSpec(ffn_size=shared, expert_ffn_size=_get(hf_config, "moe_intermediate_size"),
                         num_experts=_get(hf_config, "num_experts"), **common)
    return ModelSpec(ffn_size=_get(hf_config, "intermediate_size"), **common)


__all__ = [
    "ARCH_FAMILY", "TARGET_RULES", "TargetRule", "HfTarget", "IDS_WITHOUT_HF_ARCH",
    "LINEAR", "CONV1D", "ROUTER", "EXPERTS", "PER_EXPERT",
    "family_of", "arch_from_class_name", "target_for", "hf_path_for", "module_ids_of", "spec_from_hf_config",
]
