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
    split: bool = False  # a fused layer seen as its parts (q|k|v, gate|up): used when writing only


_ATTN_FAMILIES = (LLAMA, MIXTRAL, QWEN2_MOE)
# Gated MLPs follow TensorRT-LLM's layers, whose names the module table uses: its h_to_4h layer
# ("fc") is the one the activation reads, HF's gate_proj (Mixtral's w1), and its "gate" layer is
# the multiplied branch, HF's up_proj (w3). TensorRT-LLM's own converter maps them so; mapping
# them by the HF names instead would swap the two adapters of files exchanged with it.
TARGET_RULES: List[TargetRule] = [
    TargetRule(_ATTN_FAMILIES + (BART,), "self_attn.q_proj", (_M["attn_q"],), LINEAR),
    TargetRule(_ATTN_FAMILIES + (BART,), "self_attn.k_proj", (_M["attn_k"],), LINEAR),
    TargetRule(_ATTN_FAMILIES + (BART,), "self_attn.v_proj", (_M["attn_v"],), LINEAR),
    TargetRule(_ATTN_FAMILIES + (PHI3,), "self_attn.o_proj", (_M["attn_dense"],), LINEAR),
    TargetRule((LLAMA,), "mlp.gate_proj", (_M["mlp_h_to_4h"],), LINEAR),
    TargetRule((LLAMA,), "mlp.up_proj", (_M["mlp_gate"],), LINEAR),
    TargetRule((LLAMA, PHI3), "mlp.down_proj", (_M["mlp_4h_to_h"],), LINEAR),
    # Phi-3: fused q|k|v and gate|up linears
    TargetRule((PHI3,), "self_attn.qkv_proj", (_M["attn_qkv"],), LINEAR),
    TargetRule((PHI3,), "mlp.gate_up_proj", (_M["mlp_gate_up"],), LINEAR),
    # GPT-2: Conv1D; attn.c_proj and mlp.c_proj are different modules
    TargetRule((GPT2,), "attn.c_attn", (_M["attn_qkv"],), CONV1D),
    TargetRule((GPT2,), "attn.c_proj", (_M["attn_dense"],), CONV1D),
    TargetRule((GPT2,), "mlp.c_fc", (_M["mlp_h_to_4h"],), CONV1D),
    TargetRule((GPT2,), "mlp.c_proj", (_M["mlp_4h_to_h"],), CONV1D),
    # GPT-2 with add_cross_attention: q alone, then k|v fused in one Conv1D over the encoder output
    TargetRule((GPT2,), "crossattention.q_attn", (_M["cross_attn_q"],), CONV1D),
    TargetRule((GPT2,), "crossattention.c_attn", (_M["cross_attn_k"], _M["cross_attn_v"]), CONV1D),
    TargetRule((GPT2,), "crossattention.c_proj", (_M["cross_attn_dense"],), CONV1D),
    # The same fused layers seen as their parts: format rows of attn_q/k/v or mlp_gate/mlp_h_to_4h are
    # written into the fused layer side by side (reading always yields the fused id above)
    TargetRule((PHI3,), "self_attn.qkv_proj", (_M["attn_q"], _M["attn_k"], _M["attn_v"]), LINEAR, split=True),
    TargetRule((PHI3,), "mlp.gate_up_proj", (_M["mlp_h_to_4h"], _M["mlp_gate"]), LINEAR, split=True),
    TargetRule((GPT2,), "attn.c_attn", (_M["attn_q"], _M["attn_k"], _M["attn_v"]), CONV1D, split=True),
    # Mixture of experts (transformers 5: router module + fused 3-D expert parameters)
    TargetRule((MIXTRAL, QWEN2_MOE), "mlp.gate", (_M["moe_router"],), ROUTER),
    TargetRule((MIXTRAL, QWEN2_MOE), "mlp.experts.gate_up_proj", (_M["moe_h_to_4h"], _M["moe_gate"]), EXPERTS),
    TargetRule((MIXTRAL, QWEN2_MOE), "mlp.experts.down_proj", (_M["moe_4h_to_h"],), EXPERTS),
    # Mixtral in transformers 4 (adapters on the Hub use these names)
    TargetRule((MIXTRAL,), "block_sparse_moe.gate", (_M["moe_router"],), LINEAR, legacy=True),
    TargetRule((MIXTRAL,), "block_sparse_moe.experts.{e}.w1", (_M["moe_h_to_4h"],), PER_EXPERT, legacy=True),
    TargetRule((MIXTRAL,), "block_sparse_moe.experts.{e}.w3", (_M["moe_gate"],), PER_EXPERT, legacy=True),
    TargetRule((MIXTRAL,), "block_sparse_moe.experts.{e}.w2", (_M["moe_4h_to_h"],), PER_EXPERT, legacy=True),
    TargetRule((QWEN2_MOE,), "mlp.experts.{e}.gate_proj", (_M["moe_h_to_4h"],), PER_EXPERT, legacy=True),
    TargetRule((QWEN2_MOE,), "mlp.experts.{e}.up_proj", (_M["moe_gate"],), PER_EXPERT, legacy=True),
    TargetRule((QWEN2_MOE,), "mlp.experts.{e}.down_proj", (_M["moe_4h_to_h"],), PER_EXPERT, legacy=True),
    # Qwen2-MoE shared expert: a dense gated MLP plus its sigmoid gate
    TargetRule((QWEN2_MOE,), "mlp.shared_expert.gate_proj", (_M["mlp_h_to_4h"],), LINEAR),
    TargetRule((QWEN2_MOE,), "mlp.shared_expert.up_proj", (_M["mlp_gate"],), LINEAR),
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

# The layer stacks of each family: HF path prefix of block `{l}`. An encoder-decoder numbers its
# encoder blocks 0..Le-1 and its decoder blocks Le..Le+Ld-1, so one adapter covers both stacks
# (the same numbering as loramux.models).
_STACKS: Dict[str, Dict[str, str]] = {
    LLAMA: {"decoder": "model.layers.{l}."},
    PHI3: {"decoder": "model.layers.{l}."},
    MIXTRAL: {"decoder": "model.layers.{l}."},
    QWEN2_MOE: {"decoder": "model.layers.{l}."},
    GPT2: {"decoder": "transformer.h.{l}."},
    BART: {"encoder": "model.encoder.layers.{l}.", "decoder": "model.decoder.layers.{l}."},
}
ENCODER_DECODER = frozenset({BART})
_LAYER_RE = re.compile(r"^(?P<stack>(?:.*\.)?(?:layers|h))\.(?P<layer>\d+)\.(?P<inner>.+)$")

# Module ids no supported HF architecture has (they are tested at the format level only).
IDS_WITHOUT_HF_ARCH = frozenset({_M["cross_attn_qkv"]})


class HfTarget(NamedTuple):
    """Where an HF path sits in the format: its module id(s), layer, component and weight kind."""

    module_ids: Tuple[int, ...]
    layer: int  # format layer index (decoder blocks of an encoder-decoder come after the encoder's)
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


def target_for(arch: str, hf_path: str, encoder_layers: Optional[int] = None) -> HfTarget:
    """Maps an HF module path (e.g. 'model.layers.3.self_attn.q_proj', 'transformer.h.0.attn.c_attn',
    'model.layers.1.mlp.experts.gate_up_proj') to its format target. A trailing '.weight' is
    ignored. Decoder paths of an encoder-decoder need `encoder_layers` (their layer index follows
    the encoder's). LoraConvertError names a path the format cannot hold (embeddings, lm_head, ...)."""
    family = family_of(arch)
    path = hf_path[: -len(".weight")] if hf_path.endswith(".weight") else hf_path
    m = _LAYER_RE.match(path)
    if m is None:
        raise LoraConvertError(
            f"{hf_path}: not inside a transformer layer (embedding, lm_head or a non-layer module); "
            "the LoRA format holds only per-layer modules")
    component = "encoder" if "encoder" in m.group("stack").split(".") else "decoder"
    for regex, rule in _RULE_RES:
        if family not in rule.families or rule.split:
            continue
        hit = regex.match(m.group("inner"))
        if hit:
            expert = int(hit.group("expert")) if "expert" in regex.groupindex else None
            layer = int(m.group("layer"))
            if family in ENCODER_DECODER and component == "decoder":
                if encoder_layers is None:
                    raise LoraConvertError(f"{hf_path}: decoder layers of {arch} are numbered after the encoder's; "
                                           "the encoder's layer count is needed (pass base_model / --base-model)")
                layer += encoder_layers
            return HfTarget(rule.module_ids, layer, component, rule.kind, expert)
    raise LoraConvertError(f"{hf_path}: no LoRA module id for this {arch} module; the format's modules are {sorted(MODULE_IDS)}")


def hf_path_for(arch: str, module_id: int, layer: int, encoder_layers: Optional[int] = None) -> Tuple[str, TargetRule]:
    """The inverse of target_for: the HF module path that holds `module_id` at format `layer` (the
    transformers-5 name), and its rule. For fused targets (experts' gate_up_proj, GPT-2's cross
    attention k|v) several ids share one path; rule.module_ids gives their order along the output.
    An encoder-decoder needs `encoder_layers` to tell its stacks apart."""
    family = family_of(arch)
    stacks = _STACKS[family]
    component, block = "decoder", layer
    if family in ENCODER_DECODER:
        if encoder_layers is None:
            raise LoraConvertError(f"{arch} numbers decoder layers after the encoder's: encoder_layers is needed")
        component, block = ("encoder", layer) if layer < encoder_layers else ("decoder", layer - encoder_layers)
    for rule in TARGET_RULES:
        if family in rule.families and module_id in rule.module_ids and not rule.legacy:
            if component == "encoder" and rule.inner.startswith("encoder_attn."):
                continue
            return stacks[component].format(l=block) + rule.inner, rule
    name = MODULE_NAMES.get(module_id, str(module_id))
    raise LoraConvertError(f"module {name} (id {module_id}) has no place in layer {layer} of a {arch} model")


def output_offset(rule: TargetRule, module_id: int, spec: ModelSpec) -> int:
    """Where `module_id`'s outputs start inside the fused output of `rule`'s HF layer."""
    ids = rule.module_ids
    return sum(spec.module_dims(m)[1] for m in ids[: ids.index(module_id)])


def module_ids_of(arch: str) -> List[int]:
    """The module ids an architecture can hold (in some layer), sorted."""
    ids = set()
    for mid in MODULE_NAMES:
        try:
            hf_path_for(arch, mid, 1, encoder_layers=1)
            ids.add(mid)
        except LoraConvertError:
            pass
    return sorted(ids)


def config_value(cfg: Any, name: str, default: Any = None) -> Any:
    """A field of an HF config given as a PretrainedConfig or a dict."""
    if isinstance(cfg, Mapping):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def encoder_layers_of(hf_config: Any) -> Optional[int]:
    """The encoder's layer count of an encoder-decoder config (None for decoder-only models)."""
    if hf_config is None or ARCH_FAMILY.get(config_value(hf_config, "model_type")) not in ENCODER_DECODER:
        return None
    return config_value(hf_config, "encoder_layers")


def spec_from_hf_config(hf_config: Any, max_rank: int = 64) -> ModelSpec:
    """ModelSpec of an HF config (a PretrainedConfig or its dict) for Llama/Mistral/Qwen2, GPT-2,
    Phi-3, Mixtral, Qwen2-MoE or BART (encoder blocks, then decoder blocks)."""
    arch = config_value(hf_config, "model_type")
    family = family_of(arch)
    if family == GPT2:
        h, heads = config_value(hf_config, "n_embd"), config_value(hf_config, "n_head")
        return ModelSpec(num_layers=config_value(hf_config, "n_layer"), hidden_size=h, num_heads=heads,
                         ffn_size=config_value(hf_config, "n_inner") or 4 * h, max_rank=max_rank,
                         encoder_hidden_size=h if config_value(hf_config, "add_cross_attention") else 0)
    if family == BART:
        sides = [(config_value(hf_config, f"{s}_ffn_dim"), config_value(hf_config, f"{s}_attention_heads")) for s in ("encoder", "decoder")]
        if sides[0] != sides[1]:
            raise LoraConvertError(f"bart with encoder (ffn, heads) {sides[0]} != decoder {sides[1]}: the format has one "
                                   "width per module for all layers")
        h = config_value(hf_config, "d_model")
        return ModelSpec(num_layers=config_value(hf_config, "encoder_layers") + config_value(hf_config, "decoder_layers"), hidden_size=h,
                         num_heads=sides[1][1], ffn_size=sides[1][0], encoder_hidden_size=h, max_rank=max_rank)
    h, heads = config_value(hf_config, "hidden_size"), config_value(hf_config, "num_attention_heads")
    common = dict(num_layers=config_value(hf_config, "num_hidden_layers"), hidden_size=h, num_heads=heads,
                  num_kv_heads=config_value(hf_config, "num_key_value_heads") or heads,
                  head_dim=config_value(hf_config, "head_dim") or h // heads, max_rank=max_rank)
    if family == MIXTRAL:
        return ModelSpec(expert_ffn_size=config_value(hf_config, "intermediate_size"),
                         num_experts=config_value(hf_config, "num_local_experts"), **common)
    if family == QWEN2_MOE:
        shared = config_value(hf_config, "shared_expert_intermediate_size")
        layers, step = common["num_layers"], config_value(hf_config, "decoder_sparse_step", 1) or 1
        dense = [i for i in range(layers) if i in (config_value(hf_config, "mlp_only_layers") or []) or (i + 1) % step != 0]
        if dense and config_value(hf_config, "intermediate_size") != shared:
            # One ffn_size per model: dense layers' MLP and the shared expert would need two.
            raise LoraConvertError(
                f"qwen2_moe with dense layers {dense} (intermediate_size {config_value(hf_config, 'intermediate_size')}) "
                f"beside shared experts of size {shared}: the format has one mlp width per model")
        return ModelSpec(ffn_size=shared, expert_ffn_size=config_value(hf_config, "moe_intermediate_size"),
                         num_experts=config_value(hf_config, "num_experts"), **common)
    return ModelSpec(ffn_size=config_value(hf_config, "intermediate_size"), **common)


__all__ = [
    "ARCH_FAMILY", "TARGET_RULES", "TargetRule", "HfTarget", "IDS_WITHOUT_HF_ARCH",
    "LINEAR", "CONV1D", "ROUTER", "EXPERTS", "PER_EXPERT",
    "family_of", "arch_from_class_name", "target_for", "hf_path_for", "output_offset", "module_ids_of", "encoder_layers_of", "config_value",
    "spec_from_hf_config",
]
