"""Tiny random-weight HF models of every supported architecture with PEFT adapters on them, and the
helpers the parity tests share: build a (model, PeftModel, converted adapters) triple, make inputs,
run PEFT one adapter per row, attach loramux with the converted adapters put."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
)

import loramux as lm
from loramux import convert

VOCAB = 96
STORAGE = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
#: "cuda" carries the gpu mark: conftest.py skips it without a GPU
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]
SMALL = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
# PEFT needs every adapter of a model to target the same parameters
MOE_PARAMS = ["mlp.gate.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def lora_maker(r, targets=(), alpha=None, params=(), **kw):
    """A LoraConfig maker, called when a test builds its model (target_parameters needs PEFT >= 0.17:
    with an older PEFT only the MoE tests fail, not the whole file)."""
    if params:
        kw["target_parameters"] = list(params)
    return lambda: LoraConfig(r=r, lora_alpha=alpha or 2 * r, target_modules=list(targets), init_lora_weights=False, **kw)


ARCHS = {
    "llama": (lambda: LlamaForCausalLM(LlamaConfig(**SMALL, intermediate_size=64)),
              [lora_maker(4, ["q_proj", "v_proj"]),
               lora_maker(8, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], use_rslora=True),
               lora_maker(2, ["down_proj"], layers_to_transform=[1])]),
    "qwen2": (lambda: Qwen2ForCausalLM(Qwen2Config(**SMALL, intermediate_size=48)),  # biased q/k/v
              [lora_maker(4, ["q_proj", "k_proj", "v_proj"]), lora_maker(2, ["o_proj", "up_proj"])]),
    "mistral": (lambda: MistralForCausalLM(MistralConfig(**SMALL, intermediate_size=48)),
                [lora_maker(8, ["v_proj", "gate_proj", "down_proj"])]),
    "gpt2": (lambda: GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
             [lora_maker(4, ["c_attn", "attn.c_proj"], fan_in_fan_out=True),
              lora_maker(6, ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"], fan_in_fan_out=True)]),
    "phi3": (lambda: Phi3ForCausalLM(Phi3Config(**SMALL, intermediate_size=64, pad_token_id=0)),
             [lora_maker(4, ["qkv_proj", "gate_up_proj"]), lora_maker(8, ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])]),
    "mixtral": (lambda: MixtralForCausalLM(MixtralConfig(**SMALL, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)),
                [lora_maker(4, ["q_proj", "o_proj"], params=MOE_PARAMS), lora_maker(2, ["v_proj"], params=MOE_PARAMS)]),
    "qwen2_moe": (lambda: Qwen2MoeForCausalLM(Qwen2MoeConfig(**SMALL, intermediate_size=64, moe_intermediate_size=24,
                                                             shared_expert_intermediate_size=40, num_experts=4,
                                                             num_experts_per_tok=2)),
                  [lora_maker(4, ["shared_expert_gate", "gate_proj", "up_proj", "down_proj"], params=MOE_PARAMS),
                   lora_maker(8, ["k_proj", "shared_expert_gate"], params=MOE_PARAMS)]),
    "bart": (lambda: BartForConditionalGeneration(BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                                                             encoder_attention_heads=4, decoder_attention_heads=4,
                                                             encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                                                             tie_word_embeddings=False, forced_eos_token_id=None)),
             [lora_maker(4, ["q_proj", "v_proj", "fc1"]), lora_maker(8, ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])]),
}


def share_experts(module, name):
    """PEFT gives every expert its own LoRA; the format has one per layer: make all experts equal."""
    e = module.num_experts
    a, b = module.lora_A[name].weight, module.lora_B[name].weight
    a.copy_(a.view(e, -1, a.shape[-1])[:1].expand(e, -1, -1).reshape(a.shape))
    b.copy_(b.view(b.shape[0], -1, e)[:, :, :1].expand(-1, -1, e).reshape(b.shape))


def converted(peft_model, name, out_dir, dtype):
    """(weights, config) of one PEFT adapter through loramux.convert.from_peft, stored in `dtype`."""
    peft_model.save_pretrained(str(out_dir), selected_adapters=[name])
    base = peft_model.base_model.model  # for an encoder-decoder's layer numbering
    return convert.from_peft(str(out_dir / name), storage_type=STORAGE[dtype], base_model=base)


def build(arch, dtype, tmp_path, device="cpu"):
    """(model to attach, PeftModel holding adapters a0.. on a copy, adapter names, [(weights, config)])."""
    torch.manual_seed(0)
    make, lora_makers = ARCHS[arch]
    lora_configs = [m() for m in lora_makers]
    base = make().eval().to(device=device, dtype=dtype)
    ours = copy.deepcopy(base)
    peft_model = get_peft_model(base, lora_configs[0], adapter_name="a0")
    for i, cfg in enumerate(lora_configs[1:], start=1):
        peft_model.add_adapter(f"a{i}", cfg)
    names = [f"a{i}" for i in range(len(lora_configs))]
    with torch.no_grad():
        for module in peft_model.modules():
            for name in getattr(module, "lora_A", {}):
                if getattr(module, "num_experts", 1) > 1:
                    share_experts(module, name)
                if dtype != torch.float32:  # a served adapter holds A and B*scaling in the model dtype
                    a, b, s = module.lora_A[name].weight, module.lora_B[name].weight, module.scaling[name]
                    a.copy_(a.to(dtype).float())
                    b.copy_((b * s).to(dtype).float() / s)
    formats = [converted(peft_model, n, tmp_path, dtype) for n in names]
    peft_model.eval()
    return ours, peft_model, names, formats


def make_inputs(model, rows, seq=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (rows, seq), generator=gen).to(model.device)
    if model.config.is_encoder_decoder:
        return dict(input_ids=ids, decoder_input_ids=torch.randint(3, VOCAB, (rows, 4), generator=gen).to(model.device))
    return dict(input_ids=ids)


def peft_rows(peft_model, row_adapter, run):
    """run(model) on the whole batch once per adapter; row i keeps the run of its own adapter."""
    outs = {}
    for name in sorted(set(row_adapter), key=str):
        if name is None:
            with peft_model.disable_adapter():
                outs[name] = run(peft_model)
        else:
            peft_model.set_adapter(name)
            outs[name] = run(peft_model)
    return torch.stack([outs[name][i] for i, name in enumerate(row_adapter)])


def attach_converted(ours, names, formats, **kw):
    engine = lm.attach(ours, max_rank=16, host_cache_bytes=8 << 20, device_cache_bytes=4 << 20, **kw)
    for task_id, (w, c) in enumerate(formats):
        engine.cache.put(task_id, w, c)
    return engine
