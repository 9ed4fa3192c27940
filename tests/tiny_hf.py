"""Tiny random-weight HF models of each supported architecture, and PEFT adapters made on them on the
spot (no hub access). Shared by the converter tests; models are cached per session."""

from __future__ import annotations

import functools
from typing import Dict, List, Optional

import torch

VOCAB = 64

# name -> (config kwargs, model class name); the name is the HF model_type unless MODEL_TYPE says otherwise
MODEL_TYPE = {"gpt2-xattn": "gpt2"}
TINY_CONFIGS: Dict[str, tuple] = {
    "llama": (dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2), "LlamaForCausalLM"),
    "mistral": (dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=1), "MistralForCausalLM"),
    "qwen2": (dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2), "Qwen2ForCausalLM"),
    "gpt2": (dict(n_embd=32, n_layer=3, n_head=4, n_positions=64), "GPT2LMHeadModel"),
    "gpt2-xattn": (dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, add_cross_attention=True), "GPT2LMHeadModel"),
    "phi3": (dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, pad_token_id=0), "Phi3ForCausalLM"),
    "mixtral": (dict(hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2), "MixtralForCausalLM"),
    "qwen2_moe": (dict(hidden_size=32, intermediate_size=40, moe_intermediate_size=16, shared_expert_intermediate_size=40,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                       num_experts_per_tok=2), "Qwen2MoeForCausalLM"),
    "bart": (dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                  encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64), "BartForConditionalGeneration"),
}

# Every LoRA-able module of each architecture: (target_modules, target_parameters)
ALL_TARGETS: Dict[str, tuple] = {
    "llama": (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], None),
    "mistral": (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], None),
    "qwen2": (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], None),
    "gpt2": (["c_attn", "c_proj", "c_fc"], None),
    "gpt2-xattn": (["c_attn", "c_proj", "c_fc", "q_attn"], None),
    "phi3": (["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], None),
    "mixtral": (["q_proj", "k_proj", "v_proj", "o_proj"], ["mlp.gate.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj"]),
    "qwen2_moe": (["q_proj", "k_proj", "v_proj", "o_proj", "shared_expert.gate_proj", "shared_expert.up_proj",
                   "shared_expert.down_proj", "shared_expert_gate"],
                  ["mlp.gate.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj"]),
    "bart": (["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"], None),  # both stacks, cross attention too
}


@functools.lru_cache(maxsize=None)
def tiny_model(arch: str, seed: int = 0):
    """A tiny random-weight HF model of `arch` in eval mode (cached: do not modify it)."""
    import transformers

    kwargs, cls_name = TINY_CONFIGS[arch]
    config_cls = transformers.AutoConfig.for_model(MODEL_TYPE.get(arch, arch), vocab_size=VOCAB, **kwargs)
    torch.manual_seed(seed)
    return getattr(transformers, cls_name)(config_cls).eval()


def fresh_model(arch: str, seed: int = 0):
    """A private copy of the cached tiny model (PEFT wraps models in place)."""
    import copy

    return copy.deepcopy(tiny_model(arch, seed))


def make_adapter(arch: str, out_dir: str, *, r: int = 4, lora_alpha: float = 8, target_modules: Optional[List[str]] = None,
                 target_parameters: Optional[List[str]] = None, share_experts: bool = True, seed: int = 1, **lora_kwargs):
    """Makes a PEFT LoRA adapter with random non-zero A and B on a fresh tiny model and saves it;
    returns the PeftModel. MoE expert LoRA is made identical across experts when share_experts."""
    import peft

    default_modules, default_params = ALL_TARGETS[arch]
    if target_modules is None:
        target_modules = default_modules
    if target_parameters is None:
        target_parameters = default_params
    if arch.startswith("gpt2"):
        lora_kwargs.setdefault("fan_in_fan_out", True)
    cfg = peft.LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=target_modules, target_parameters=target_parameters,
                          init_lora_weights=False, **lora_kwargs)
    torch.manual_seed(seed)
    model = peft.get_peft_model(fresh_model(arch), cfg).eval()
    with torch.no_grad():
        for name, module in model.named_modules():
            if share_experts and type(module).__name__ == "ParamWrapper" and getattr(module, "num_experts", 1) > 1:
                for adapter in module.lora_A:
                    a, b, e = module.lora_A[adapter].weight, module.lora_B[adapter].weight, module.num_experts
                    rank = a.shape[0] // e
                    a.copy_(a[:rank].repeat(e, 1))
                    b.copy_(b[:, ::e].repeat_interleave(e, dim=1))
            if hasattr(module, "lora_magnitude_vector"):
                for adapter in module.lora_magnitude_vector:
                    mag = module.lora_magnitude_vector[adapter].weight
                    mag.mul_(1 + 0.1 * torch.rand_like(mag))  # move m off ||W0 + BA|| so the scale matters
    model.save_pretrained(out_dir)
    return model


def sample_inputs(arch: str, batch: int = 2, seq: int = 7, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    if arch == "bart":
        return dict(input_ids=ids, decoder_input_ids=torch.randint(3, VOCAB, (batch, 5), generator=g))
    if arch == "gpt2-xattn":
        return dict(input_ids=ids, encoder_hidden_states=torch.randn(batch, 5, 32, generator=g))
    return dict(input_ids=ids)


@torch.no_grad()
def logits(model, arch: str):
    return model(**sample_inputs(arch)).logits.float()
