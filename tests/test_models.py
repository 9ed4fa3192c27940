"""PEFT parity: each row of a mixed batch (adapters of different ranks and targets, plus no-adapter
rows) gets PEFT's logits for that row's adapter, and greedy generation gives PEFT's tokens, on tiny
random-weight models of every supported architecture (together all module ids an HF model has)."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from peft import get_peft_model
from peft_models import ARCHS, DEVICES, VOCAB, attach_converted, build, converted, lora_maker, make_inputs, peft_rows
from transformers import GPT2Config, GPT2LMHeadModel

import loramux as lm


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_mixed_batch_logits_and_greedy_tokens_match_peft(arch, device, tmp_path):
    ours, peft_model, names, formats = build(arch, torch.float32, tmp_path, device)
    engine = attach_converted(ours, names, formats)
    row_adapter = [names[0], None, *names[1:], names[0]]
    row_task = [None if n is None else names.index(n) for n in row_adapter]
    inputs = make_inputs(ours, len(row_adapter))
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = peft_rows(peft_model, row_adapter, lambda m: m(**inputs).logits)
        base = peft_rows(peft_model, [None] * len(row_adapter), lambda m: m(**inputs).logits)
        expected_tokens = peft_rows(peft_model, row_adapter, lambda m: m.generate(input_ids=inputs["input_ids"], **kw))
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
    ours, peft_model, names, formats = build(arch, torch.bfloat16, tmp_path, device)
    engine = attach_converted(ours, names, formats)
    row_adapter = [None, *names]
    inputs = make_inputs(ours, len(row_adapter))
    with torch.no_grad():
        expected = peft_rows(peft_model, row_adapter, lambda m: m(**inputs).logits).float()
        with engine.batch([None, *range(len(names))]):
            got = ours(**inputs).logits.float()
        # the same weights in fp32 are the truth; loramux's bf16 error must be of PEFT's bf16 size
        truth = peft_rows(peft_model.float(), row_adapter, lambda m: m(**inputs).logits)
    ours_err, peft_err = (got - truth).abs().max().item(), (expected - truth).abs().max().item()
    assert ours_err <= 2 * peft_err + 1e-3 * truth.abs().max().item(), (ours_err, peft_err)
    assert not torch.allclose(got[1], got[0], atol=4 * peft_err)  # the adapters do change the output


def test_adapters_cover_every_module_id_an_hf_architecture_has(tmp_path):
    covered = set()
    for arch in ARCHS:
        _, _, _, formats = build(arch, torch.float32, tmp_path / arch)
        covered |= {int(mid) for _, c in formats for mid in c[:, 0]}
    assert covered == set(range(19)) - {8}  # cross_attn_qkv: no HF model fuses cross-attention q, k, v


def test_fused_layers_take_their_parts_side_by_side(tmp_path):
    """Phi-3's fused qkv_proj / gate_up_proj also serve attn_q|k|v and mlp_h_to_4h|mlp_gate adapters:
    the same adapter written both ways gives the same logits."""
    ours, _, _, formats = build("phi3", torch.float32, tmp_path)
    spec = lm.models.spec_from_config(ours.config)
    rows = lm.format.to_rows(*formats[1], spec)
    split = []
    for r in rows:
        parts = {0: (1, 2, 3), 18: (5, 7)}.get(r.module_id)  # gate_up = [gate (5); up (7)]
        if parts is None:
            split.append(r)
            continue
        start = 0
        for mid in parts:
            ho = spec.module_dims(mid)[1]
            split.append(r._replace(module_id=mid, b=r.b[start : start + ho]))
            start += ho
    engine = attach_converted(ours, ["fused", "split"], [formats[1], lm.format.from_rows(split, "float32")])
    inputs = {k: v[:1].repeat(2, 1) for k, v in make_inputs(ours, 1).items()}  # one prompt, twice
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
    # refused before a cache is built: no host pool of that size is allocated, so it is no LoraCacheError
    with pytest.raises(ValueError, match="already"):
        lm.attach(model, host_cache_bytes=1 << 50)
    with pytest.raises(LoraNotCachedError, match="7"):
        with engine.batch([None, 7]):
            pass
    assert engine.meta_for(torch.zeros(2, 3, 32)) is None  # the failed batch left nothing behind
    for empty in (lambda: engine.batch([]), lambda: engine.batch(iter(()))):
        with pytest.raises(ValueError, match="one task id per row") as err:  # a bad argument, not a LoraError
            with empty():
                pass
        assert not isinstance(err.value, LoraError)
    with pytest.raises(ValueError, match="at least one row"):
        engine.set_batch([], engine.cache.table, engine.cache.pool)
    with engine.batch([None]):
        with pytest.raises(LoraError, match="already running"):
            with engine.batch([None]):
                pass
    lm.detach(engine)
    assert not any("Lora" in type(m).__name__ for m in model.modules())


@pytest.mark.parametrize("arch, module, layer", [("llama", "mlp_router", 0), ("gpt2", "mlp_gate_up", 1),
                                                 ("phi3", "attn_q", 0), ("gpt2", "mlp_gate", 1)])
def test_rows_the_attached_model_never_applies_are_refused(arch, module, layer):
    """An adapter row for a module-layer no wrapped layer applies (an mlp_router row on a Llama, an
    mlp_gate_up row on GPT-2, whose MLP has no gate) would be cached and served without effect: put
    refuses it, naming the row, and the cache keeps what it held. Phi-3's fused qkv takes attn_q|k|v
    as its parts, so there the plain attn_q row is served (and a Llama serves fused rows as their
    parts: tests/test_fused_rows.py)."""
    import numpy as np

    from loramux.modules import MODULE_IDS

    model = ARCHS[arch][0]().eval()
    engine = lm.attach(model, max_rank=16, device_cache_bytes=1 << 20)
    spec = lm.models.spec_from_config(model.config)
    q_hi, q_ho = spec.module_dims(MODULE_IDS["attn_q"])
    hi, ho = spec.module_dims(MODULE_IDS[module])
    rows = [lm.format.AdapterRow(MODULE_IDS["attn_q"], 0 if layer else 1, np.ones((2, q_hi), np.float32), np.ones((q_ho, 2), np.float32)),
            lm.format.AdapterRow(MODULE_IDS[module], layer, np.ones((2, hi), np.float32), np.ones((ho, 2), np.float32))]
    weights, config = lm.format.from_rows(rows, "float32")
    if arch == "phi3":
        assert engine.cache.put(1, weights, config) == "inserted"
        return
    with pytest.raises(lm.LoraFormatError, match=f"config row 1: module {module} layer {layer} is not applied") as err:
        engine.cache.put(1, weights, config)
    assert err.value.row == 1 and len(engine.cache) == 0 and engine.cache.stats()["host_bytes"] == 0
    assert engine.cache.put(1, weights[:1], config[:1]) == "inserted"  # the served row alone is fine


def test_wrapped_layers_read_through_to_the_original():
    model = ARCHS["gpt2"][0]().eval()
    conv = model.transformer.h[0].attn.c_attn
    engine = lm.attach(model, max_rank=16, device_cache_bytes=1 << 20)
    wrapped = model.transformer.h[0].attn.c_attn
    assert wrapped is not conv and wrapped.weight is conv.weight and wrapped.nf == conv.nf
    assert "base.weight" in dict(wrapped.named_parameters())
    engine.detach()
    assert model.transformer.h[0].attn.c_attn is conv


def test_an_attached_engine_as_a_context_detaches_on_the_way_out():
    model = ARCHS["gpt2"][0]().eval()
    conv = model.transformer.h[0].attn.c_attn
    with lm.attach(model, max_rank=16, device_cache_bytes=1 << 20) as engine:
        assert model.transformer.h[0].attn.c_attn is not conv and engine.model is model
    assert model.transformer.h[0].attn.c_attn is conv
    with pytest.raises(RuntimeError, match="inside"):
        with lm.attach(model, max_rank=16, device_cache_bytes=1 << 20):
            raise RuntimeError("inside")
    assert not any("Lora" in type(m).__name__ for m in model.modules())


def test_a_detached_engine_and_its_cache_go_with_their_last_reference():
    # no reference cycle outlives detach(), so the host tier's memory comes back at once, not at
    # the cyclic GC's next pass
    model = ARCHS["llama"][0]().eval()
    gc.disable()
    try:
        with lm.attach(model, max_rank=16, device_cache_bytes=1 << 20, host_cache_bytes=1 << 20) as engine:
            assert engine.sibling_groups  # q|k|v and gate|up, whose wrappers and groups refer to each other
            refs = weakref.ref(engine), weakref.ref(engine.cache)
        del engine
        assert [r() for r in refs] == [None, None]
    finally:
        gc.enable()


def test_gpt2_cross_attention_matches_peft(tmp_path):
    """GPT-2 with cross attention: q_attn (cross_attn_q) and the fused k|v c_attn (cross_attn_k,
    cross_attn_v side by side) read the encoder states; Conv1D layers throughout."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, add_cross_attention=True)
    base = GPT2LMHeadModel(config).eval()
    ours = copy.deepcopy(base)
    cfg = lora_maker(4, ["q_attn", "crossattention.c_attn", "crossattention.c_proj", "attn.c_attn"], fan_in_fan_out=True)()
    peft_model = get_peft_model(base, cfg, adapter_name="x").eval()
    w, c = converted(peft_model, "x", tmp_path, torch.float32)
    assert {9, 10, 11, 12} <= {int(m) for m in c[:, 0]}
    engine = attach_converted(ours, ["x"], [(w, c)])
    gen = torch.Generator().manual_seed(3)
    inputs = dict(input_ids=torch.randint(3, VOCAB, (2, 6), generator=gen),
                  encoder_hidden_states=torch.randn(2, 5, 32, generator=gen))
    with torch.no_grad():
        expected = peft_rows(peft_model, ["x", None], lambda m: m(**inputs).logits)
        with engine.batch([0, None]):
            got = ours(**inputs).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    assert (got[0] - peft_rows(peft_model, [None], lambda m: m(**inputs).logits)[0]).abs().max() > 1e-4


def test_a_batch_whose_task_ids_do_not_match_the_rows_is_refused(tmp_path):
    ours, peft_model, names, formats = build("llama", torch.float32, tmp_path)
    engine = attach_converted(ours, names, formats)
    inputs = make_inputs(ours, 3)
    with torch.no_grad():
        for task_ids in ([0, None], [0, 1, None, 0], [None, None]):
            with pytest.raises(ValueError, match=f"3 rows but the batch gave {len(task_ids)} task ids"):
                with engine.batch(task_ids):
                    ours(**inputs)
        # generate's beams are k copies of each row side by side: each copy keeps its row's adapter
        row_adapter = [names[0], None, names[1]]
        kw = dict(max_new_tokens=4, do_sample=False, num_beams=2, pad_token_id=0)
        expected = peft_rows(peft_model, row_adapter, lambda m: m.generate(input_ids=inputs["input_ids"], **kw))
        with engine.batch([0, None, 1]):
            got = ours.generate(input_ids=inputs["input_ids"], **kw)
    assert torch.equal(got, expected)
