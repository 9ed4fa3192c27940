"""PEFT parity: each row of a mixed batch (adapters of different ranks and targets, plus no-adapter
rows) gets PEFT's logits for that row's adapter, and greedy generation gives PEFT's tokens, on tiny
random-weight models of every supported architecture (together all module ids an HF model has)."""

from __future__ import annotations

import copy

import numpy as np
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
    MixtralConfig,
    MixtralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
)

from loramux.models import attach_layers, spec_from_config
from loramux.models.targets import match_targets
from test_ops import pack_pool

VOCAB = 96
SMALL = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
# PEFT needs every adapter of a model to target the same parameters
MOE_PARAMS = ["mlp.gate.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _lora(r, targets=(), alpha=None, params=(), **kw):
    return LoraConfig(r=r, lora_alpha=alpha or 2 * r, target_modules=list(targets), target_parameters=list(params) or None,
                      init_lora_weights=False, **kw)


ARCHS = {
    "llama": (lambda: LlamaForCausalLM(LlamaConfig(**SMALL, intermediate_size=64)),
              [_lora(4, ["q_proj", "v_proj"]),
               _lora(8, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], use_rslora=True),
               _lora(2, ["down_proj"], layers_to_transform=[1])]),
    "gpt2": (lambda: GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
             [_lora(4, ["c_attn", "attn.c_proj"], fan_in_fan_out=True),
              _lora(6, ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"], fan_in_fan_out=True)]),
    "phi3": (lambda: Phi3ForCausalLM(Phi3Config(**SMALL, intermediate_size=64, pad_token_id=0)),
             [_lora(4, ["qkv_proj", "gate_up_proj"]), _lora(8, ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])]),
    "mixtral": (lambda: MixtralForCausalLM(MixtralConfig(**SMALL, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)),
                [_lora(4, ["q_proj", "o_proj"], params=MOE_PARAMS), _lora(2, ["v_proj"], params=MOE_PARAMS)]),
    "qwen2_moe": (lambda: Qwen2MoeForCausalLM(Qwen2MoeConfig(**SMALL, intermediate_size=64, moe_intermediate_size=24,
                                                             shared_expert_intermediate_size=40, num_experts=4,
                                                             num_experts_per_tok=2)),
                  [_lora(4, ["shared_expert_gate", "gate_proj", "up_proj", "down_proj"], params=MOE_PARAMS),
                   _lora(8, ["k_proj", "shared_expert_gate"], params=MOE_PARAMS)]),
    "bart": (lambda: BartForConditionalGeneration(BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                                                             encoder_attention_heads=4, decoder_attention_heads=4,
                                                             encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)),
             [_lora(4, ["q_proj", "v_proj", "fc1"]), _lora(8, ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])]),
}


def _share_experts(module, name):
    """PEFT gives every expert its own LoRA; the format has one per layer: make all experts equal."""
    e = module.num_experts
    a, b = module.lora_A[name].weight, module.lora_B[name].weight
    with torch.no_grad():
        a.copy_(a.view(e, -1, a.shape[-1])[:1].expand(e, -1, -1).reshape(a.shape))
        b.copy_(b.view(b.shape[0], -1, e)[:, :, :1].expand(-1, -1, e).reshape(b.shape))
    r = a.shape[0] // e
    return a[:r], b.view(b.shape[0], r, e)[:, :, 0]


def peft_to_adapter(peft_model, base, name):
    """{(module_id, layer): (A, B * scaling, None)} of one PEFT adapter."""
    where = {n: (t, layer) for n, t, layer in match_targets(base)}
    adapter = {}
    for qual, module in peft_model.named_modules():
        if name not in getattr(module, "lora_A", {}):
            continue
        path = qual.removeprefix("base_model.model.").removesuffix(".base_layer")
        target, layer = where[path]
        scale = module.scaling[name]
        if target.kind == "experts":
            a, b = _share_experts(module, name)
            if module.parameter_name == "gate_up_proj":
                f = b.shape[0] // 2
                adapter[(target.slices[0][0], layer)] = (a, b[:f] * scale, None)
                adapter[(target.slices[0][1], layer)] = (a, b[f:] * scale, None)
            else:
                adapter[(target.slices[1][0], layer)] = (a, b * scale, None)
            continue
        a, b = module.lora_A[name].weight, module.lora_B[name].weight * scale
        ids = target.slices[0]
        rows = b.shape[0] // len(ids)
        for i, mid in enumerate(ids):
            adapter[(mid, layer)] = (a, b[i * rows : (i + 1) * rows], None)
    return {k: tuple(t.detach().clone() if t is not None else None for t in v) for k, v in adapter.items()}


def to_format(adapter, dtype=np.float32):
    """(weights [N, W], config [N, 3]) of a {(module_id, layer): (A, B, None)} adapter."""
    keys = sorted(adapter, key=lambda k: (k[1], k[0]))
    rows = [np.concatenate([adapter[k][0].numpy().ravel(), adapter[k][1].numpy().ravel()]) for k in keys]
    weights = np.zeros((len(rows), max(len(r) for r in rows)), dtype=dtype)
    for i, r in enumerate(rows):
        weights[i, : len(r)] = r
    config = np.array([[mid, layer, adapter[(mid, layer)][0].shape[0]] for mid, layer in keys], dtype=np.int32)
    return weights, config


def _inputs(model, rows, seq=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (rows, seq), generator=gen)
    if model.config.is_encoder_decoder:
        return dict(input_ids=ids, decoder_input_ids=torch.randint(3, VOCAB, (rows, 4), generator=gen))
    return dict(input_ids=ids)


def _build(arch, dtype):
    torch.manual_seed(0)
    make, lora_configs = ARCHS[arch]
    base = make().eval().to(dtype)
    ours = copy.deepcopy(base)
    peft_model = get_peft_model(base, lora_configs[0], adapter_name="a0")
    for i, cfg in enumerate(lora_configs[1:], start=1):
        peft_model.add_adapter(f"a{i}", cfg)
    names = [f"a{i}" for i in range(len(lora_configs))]
    if dtype != torch.float32:  # PEFT keeps fp32 adapters; served ones hold A and B*scaling in the model dtype
        with torch.no_grad():
            for module in peft_model.modules():
                for name in getattr(module, "lora_A", {}):
                    a, b, s = module.lora_A[name].weight, module.lora_B[name].weight, module.scaling[name]
                    a.copy_(a.to(dtype).float())
                    b.copy_((b * s).to(dtype).float() / s)
    adapters = [peft_to_adapter(peft_model, ours, n) for n in names]  # also equalizes expert LoRA
    peft_model.eval()
    return ours, peft_model, names, adapters


def _peft_rows(peft_model, row_adapter, run):
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


@pytest.mark.parametrize("arch", list(ARCHS))
def test_mixed_batch_logits_and_greedy_tokens_match_peft(arch):
    ours, peft_model, names, adapters = _build(arch, torch.float32)
    spec = spec_from_config(ours.config, max_rank=16)
    pool, table = pack_pool(adapters, spec.num_layers, torch.float32)
    engine = attach_layers(ours, spec, None, torch.float32, torch.device("cpu"))
    row_adapter = [names[0], None, *names[1:], names[0]]
    slots = [-1 if n is None else names.index(n) for n in row_adapter]
    inputs = _inputs(ours, len(row_adapter))
    with torch.no_grad():
        expected = _peft_rows(peft_model, row_adapter, lambda m: m(**inputs).logits)
        engine.set_batch(slots, table, pool)
        got = ours(**inputs).logits
        scale = expected.abs().max().item()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * scale)
        gen_inputs = {"input_ids": inputs["input_ids"]}
        kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
        expected_tokens = _peft_rows(peft_model, row_adapter, lambda m: m.generate(**gen_inputs, **kw))
        engine.set_batch(slots, table, pool)
        got_tokens = ours.generate(**gen_inputs, **kw)
    assert torch.equal(got_tokens, expected_tokens)
    # the adapters change the output: rows of different adapters differ from the base row
    assert not torch.allclose(got[0], _peft_rows(peft_model, [None] * len(row_adapter), lambda m: m(**inputs).logits)[0])
    engine.detach()
    assert not any("Lora" in type(m).__name__ for m in ours.modules())


@pytest.mark.parametrize("arch", ["llama", "qwen2_moe"])
def test_mixed_batch_logits_match_peft_in_bfloat16(arch):
    ours, peft_model, names, adapters = _build(arch, torch.bfloat16)
    spec = spec_from_config(ours.config, max_rank=16)
    pool, table = pack_pool(adapters, spec.num_layers, torch.bfloat16)
    engine = attach_layers(ours, spec, None, torch.bfloat16, torch.device("cpu"))
    row_adapter = [None, *names]
    inputs = _inputs(ours, len(row_adapter))
    with torch.no_grad():
        expected = _peft_rows(peft_model, row_adapter, lambda m: m(**inputs).logits).float()
        engine.set_batch([-1, *range(len(names))], table, pool)
        got = ours(**inputs).logits.float()
        # the same weights in fp32 are the truth; loramux's bf16 error must be of PEFT's bf16 size
        truth = _peft_rows(peft_model.float(), row_adapter, lambda m: m(**inputs).logits)
    ours_err, peft_err = (got - truth).abs().max().item(), (expected - truth).abs().max().item()
    assert ours_err <= 2 * peft_err + 1e-3 * truth.abs().max().item(), (ours_err, peft_err)
    assert not torch.allclose(got[1], got[0], atol=4 * peft_err)  # the adapters do change the output


def test_adapters_cover_every_module_id_an_hf_architecture_has():
    covered = set()
    for arch in ARCHS:
        _, _, _, adapters = _build(arch, torch.float32)
        covered |= {mid for adapter in adapters for mid, _ in adapter}
    assert covered == set(range(19)) - {8}  # cross_attn_qkv: no HF model fuses cross-attention q, k, v
