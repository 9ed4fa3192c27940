"""PEFT parity: each row of a mixed batch (adapters of different ranks and targets, plus no-adapter
rows) gets PEFT's logits for that row's adapter, and greedy generation gives PEFT's tokens, on tiny
random-weight models of every supported architecture (together all module ids an HF model has)."""

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
DEVICES = [pytest.param("cpu", id="cpu"),
           pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                                      reason="needs CUDA")])]
SMALL = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
# PEFT needs every adapter of a model to target the same parameters
MOE_PARAMS = ["mlp.gate.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _lora(r, targets=(), alpha=None, params=(), **kw):
    """A LoraConfig maker, called when a test builds its model (target_parameters needs PEFT >= 0.17:
    with an older PEFT only the MoE tests fail, not the whole file)."""
    if params:
        kw["target_parameters"] = list(params)
    return lambda: LoraConfig(r=r, lora_alpha=alpha or 2 * r, target_modules=list(targets), init_lora_weights=False, **kw)


ARCHS = {
    "llama": (lambda: LlamaForCausalLM(LlamaConfig(**SMALL, intermediate_size=64)),
              [_lora(4, ["q_proj", "v_proj"]),
               _lora(8, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], use_rslora=True),
               _lora(2, ["down_proj"], layers_to_transform=[1])]),
    "qwen2": (lambda: Qwen2ForCausalLM(Qwen2Config(**SMALL, intermediate_size=48)),  # biased q/k/v
              [_lora(4, ["q_proj", "k_proj", "v_proj"]), _lora(2, ["o_proj", "up_proj"])]),
    "mistral": (lambda: MistralForCausalLM(MistralConfig(**SMALL, intermediate_size=48)),
                [_lora(8, ["v_proj", "gate_proj", "down_proj"])]),
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
                                                             encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                                                             tie_word_embeddings=False, forced_eos_token_id=None)),
             [_lora(4, ["q_proj", "v_proj", "fc1"]), _lora(8, ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])]),
}


def _share_experts(module, name):
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


def _build(arch, dtype, tmp_path, device="cpu"):
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
                    _share_experts(module, name)
                if dtype != torch.float32:  # a served adapter holds A and B*scaling in the model dtype
                    a, b, s = module.lora_A[name].weight, module.lora_B[name].weight, module.scaling[name]
                    a.copy_(a.to(dtype).float())
                    b.copy_((b * s).to(dtype).float() / s)
    formats = [converted(peft_model, n, tmp_path, dtype) for n in names]
    peft_model.eval()
    return ours, peft_model, names, formats


def _inputs(model, rows, seq=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (rows, seq), generator=gen).to(model.device)
    if model.config.is_encoder_decoder:
        return dict(input_ids=ids, decoder_input_ids=torch.randint(3, VOCAB, (rows, 4), generator=gen).to(model.device))
    return dict(input_ids=ids)


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


def _attach(ours, names, formats, **kw):
    engine = lm.attach(ours, max_rank=16, host_cache_bytes=8 << 20, device_cache_bytes=4 << 20, **kw)
    for task_id, (w, c) in enumerate(formats):
        engine.cache.put(task_id, w, c)
    return engine


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_mixed_batch_logits_and_greedy_tokens_match_peft(arch, device, tmp_path):
    ours, peft_model, names, formats = _build(arch, torch.float32, tmp_path, device)
    engine = _attach(ours, names, formats)
    row_adapter = [names[0], None, *names[1:], names[0]]
    row_task = [None if n is None else names.index(n) for n in row_adapter]
    inputs = _inputs(ours, len(row_adapter))
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = _peft_rows(peft_model, row_adapter, lambda m: m(**inputs).logits)
        base = _peft_rows(peft_model, [None] * len(row_adapter), lambda m: m(**inputs).logits)
        expected_tokens = _peft_rows(peft_model, row_adapter, lambda m: m.generate(input_ids=inputs["input_ids"], **kw))
        with engine.batch(row_task):
            got = ours(**inputs).logits
            got_tokens = ours.generate(input_ids=inputs["input_ids"], **kw)
        outside = ours(**inputs).logits  # no batch: the base model
    scale = expected.abs().max().item()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * scale)
    assert torch.equal(got_tokens, expected_tokens)
    assert (got[0] - base[0]).abs().max() > 1e-3 * scale, "the adapters must change the output for the test to mean anything"
    torch.testing.assert_close(outside, base, rtol=1e-5, atol=1e-5 * scale)
    engine.detach()
    assert not any("Lora" in type(m).__name__ for m in ours.modules())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["llama", "qwen2_moe"])
def test_mixed_batch_logits_match_peft_in_bfloat16(arch, device, tmp_path):
    ours, peft_model, names, formats = _build(arch, torch.bfloat16, tmp_path, device)
    engine = _attach(ours, names, formats)
    row_adapter = [None, *names]
    inputs = _inputs(ours, len(row_adapter))
    with torch.no_grad():
        expected = _peft_rows(peft_model, row_adapter, lambda m: m(**inputs).logits).float()
        with engine.batch([None, *range(len(names))]):
            got = ours(**inputs).logits.float()
        # the same weights in fp32 are the truth; loramux's bf16 error must be of PEFT's bf16 size
        truth = _peft_rows(peft_model.float(), row_adapter, lambda m: m(**inputs).logits)
    ours_err, peft_err = (got - truth).abs().max().item(), (expected - truth).abs().max().item()
    assert ours_err <= 2 * peft_err + 1e-3 * truth.abs().max().item(), (ours_err, peft_err)
    assert not torch.allclose(got[1], got[0], atol=4 * peft_err)  # the adapters do change the output


def test_adapters_cover_every_module_id_an_hf_architecture_has(tmp_path):
    covered = set()
    for arch in ARCHS:
        _, _, _, formats = _build(arch, torch.float32, tmp_path / arch)
        covered |= {int(mid) for _, c in formats for mid in c[:, 0]}
    assert covered == set(range(19)) - {8}  # cross_attn_qkv: no HF model fuses cross-attention q, k, v


def test_fused_layers_take_their_parts_side_by_side(tmp_path):
    """Phi-3's fused qkv_proj / gate_up_proj also serve attn_q|k|v and mlp_gate|h_to_4h adapters:
    the same adapter written both ways gives the same logits."""
    ours, _, _, formats = _build("phi3", torch.float32, tmp_path)
    spec = lm.models.spec_from_config(ours.config)
    rows = lm.format.to_rows(*formats[1], spec)
    split = []
    for r in rows:
        parts = {0: (1, 2, 3), 18: (7, 5)}.get(r.module_id)
        if parts is None:
            split.append(r)
            continue
        start = 0
        for mid in parts:
            ho = spec.module_dims(mid)[1]
            split.append(r._replace(module_id=mid, b=r.b[start : start + ho]))
            start += ho
    engine = _attach(ours, ["fused", "split"], [formats[1], lm.format.from_rows(split, "float32")])
    inputs = {k: v[:1].repeat(2, 1) for k, v in _inputs(ours, 1).items()}  # one prompt, twice
    with torch.no_grad(), engine.batch([0, 1]):
        got = ours(**inputs).logits
    torch.testing.assert_close(got[1], got[0], rtol=1e-5, atol=1e-5 * got.abs().max().item())


def test_attach_errors_are_typed_and_change_nothing():
    from transformers import BertConfig, BertModel

    from loramux.errors import LoraConvertError, LoraError, LoraNotCachedError

    bert = BertModel(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                intermediate_size=64))
    with pytest.raises(LoraConvertError, match="bert"):
        lm.attach(bert)
    assert not any("Lora" in type(m).__name__ for m in bert.modules())
    model = ARCHS["llama"][0]().eval()
    engine = lm.attach(model, max_rank=16, device_cache_bytes=1 << 20)
    with pytest.raises(ValueError, match="already") as err:  # a bad argument, not a LoraError
        lm.attach(model)
    assert not isinstance(err.value, LoraError)
    with pytest.raises(LoraNotCachedError, match="7"):
        with engine.batch([None, 7]):
            pass
    assert engine.meta_for(torch.zeros(2, 3, 32)) is None  # the failed batch left nothing behind
    with engine.batch([None]):
        with pytest.raises(LoraError, match="already running"):
            with engine.batch([None]):
                pass
    lm.detach(engine)
    assert not any("Lora" in type(m).__name__ for m in model.modules())


def test_wrapped_layers_read_through_to_the_original():
    model = ARCHS["gpt2"][0]().eval()
    conv = model.transformer.h[0].attn.c_attn
    engine = lm.attach(model, max_rank=16, device_cache_bytes=1 << 20)
    wrapped = model.transformer.h[0].attn.c_attn
    assert wrapped is not conv and wrapped.weight is conv.weight and wrapped.nf == conv.nf
    assert "base.weight" in dict(wrapped.named_parameters())
    engine.detach()
    assert model.transformer.h[0].attn.c_attn is conv


def test_gpt2_cross_attention_matches_peft(tmp_path):
    """GPT-2 with cross attention: q_attn (cross_attn_q) and the fused k|v c_attn (cross_attn_k,
    cross_attn_v side by side) read the encoder states; Conv1D layers throughout."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, add_cross_attention=True)
    base = GPT2LMHeadModel(config).eval()
    ours = copy.deepcopy(base)
    cfg = _lora(4, ["q_attn", "crossattention.c_attn", "crossattention.c_proj", "attn.c_attn"], fan_in_fan_out=True)()
    peft_model = get_peft_model(base, cfg, adapter_name="x").eval()
    w, c = converted(peft_model, "x", tmp_path, torch.float32)
    assert {9, 10, 11, 12} <= {int(m) for m in c[:, 0]}
    engine = _attach(ours, ["x"], [(w, c)])
    gen = torch.Generator().manual_seed(3)
    inputs = dict(input_ids=torch.randint(3, VOCAB, (2, 6), generator=gen),
                  encoder_hidden_states=torch.randn(2, 5, 32, generator=gen))
    with torch.no_grad():
        expected = _peft_rows(peft_model, ["x", None], lambda m: m(**inputs).logits)
        with engine.batch([0, None]):
            got = ours(**inputs).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    assert (got[0] - _peft_rows(peft_model, [None], lambda m: m(**inputs).logits)[0]).abs().max() > 1e-4
